"""Pieces every checkpoint layout shares: the target-config base, geometry checks, provenance, config parsing.

DeepSpec and SGLang draft configs are a *copy of the target's HF config* with draft keys added on top
(DeepSpec ``deepspec/modeling/dspark/qwen3/config.py::build_draft_config``; SGLang 0.5.23
``python/sglang/srt/models/dspark.py`` reads it); :func:`target_base_config` makes that copy and
:func:`drafter_config_from_json` reads such a file back through ``DrafterConfig.resolve``, so geometry is parsed
by the same code that resolved it at training time.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import warnings
from typing import Any

from ..drafters import DrafterConfig
from .checkpoint import namespace

# Keys of a target config.json that describe the target checkpoint itself, not a draft copied from it.
_NOT_INHERITED = ("architectures", "auto_map", "quantization_config", "_name_or_path", "transformers_version",
                  "torch_dtype", "dtype", "_commit_hash")
EXPORTED_BY = "exported_by"


def package_version() -> str:
    try:
        return importlib.metadata.version("dspark-lightning")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def is_qwen3_family(model_type: str | None) -> bool:
    return (model_type or "").startswith("qwen3")


def heads(cfg: DrafterConfig) -> dict[str, Any]:
    """The heads a drafter really has (a DFlash config may carry unused DSpark defaults)."""
    markov = cfg.has_markov_head
    confidence = cfg.has_confidence_head
    return {
        "markov_rank": cfg.markov_rank if markov else 0,
        "markov_head_type": cfg.markov_head_type if markov else None,
        "enable_confidence_head": confidence,
        "confidence_head_with_markov": bool(confidence and markov and cfg.confidence_head_with_markov),
    }


def family_features(cfg: DrafterConfig) -> list[str]:
    """Layer features beyond the Qwen3/Llama layer (Gemma4 style) that a drafter config switches on."""
    found = []
    if (getattr(cfg, "norm_style", None) or "pre") != "pre":
        found.append(f"norm_style={cfg.norm_style!r}")
    if (getattr(cfg, "rope_type", None) or "default") != "default":
        found.append(f"rope_type={cfg.rope_type!r}")
    for name in ("attention_k_eq_v", "v_norm", "layer_scalar"):
        if getattr(cfg, name, None):
            found.append(f"{name}=True")
    scale = getattr(cfg, "attention_scale", None)
    if scale is not None and abs(scale - cfg.head_dim ** -0.5) > 1e-12:
        found.append(f"attention_scale={scale}")
    if getattr(cfg, "global_head_dim", None) not in (None, cfg.head_dim):
        found.append(f"global_head_dim={cfg.global_head_dim}")
    if cfg.embed_scale not in (None, 1.0):
        found.append(f"embed_scale={cfg.embed_scale}")
    if cfg.final_logit_softcapping:
        found.append(f"final_logit_softcapping={cfg.final_logit_softcapping}")
    return found


def target_base_config(target_config: dict[str, Any]) -> dict[str, Any]:
    """The language-model part of the target config, without the keys that describe the target checkpoint."""
    base = target_config.get("text_config") if isinstance(target_config.get("text_config"), dict) else target_config
    base = copy.deepcopy(base)
    for key in _NOT_INHERITED:
        base.pop(key, None)
    for key in [k for k in base if k.startswith("dspark_")]:  # a target that is itself an attached export
        base.pop(key)
    base.pop(EXPORTED_BY, None)
    return base


def check_geometry(cfg: DrafterConfig, target_config: dict[str, Any], where: str) -> None:
    """Raise unless the drafter fits the target: same hidden size, vocabulary, heads; context layers in range.

    Every message names both values, so a drafter trained for another model is caught at export time instead of
    as "acceptance ~1" at serving time.
    """
    text = target_config.get("text_config") if isinstance(target_config.get("text_config"), dict) else target_config
    pairs = [("hidden_size", "hidden_size"), ("vocab_size", "vocab_size"), ("intermediate_size", "intermediate_size"),
             ("num_attention_heads", "num_attention_heads"), ("num_key_value_heads", "num_key_value_heads")]
    for ours, theirs in pairs:
        value = text.get(theirs)
        if value is not None and getattr(cfg, ours) != value:
            raise ValueError(
                f"The drafter has {ours}={getattr(cfg, ours)} but {where} has {theirs}={value}: the drafter was "
                f"trained for another model. Export it against the target it was trained with."
            )
    layers = text.get("num_hidden_layers")
    if layers is not None:
        bad = [i for i in cfg.target_layer_ids if i >= layers]
        if bad:
            raise ValueError(
                f"target_layer_ids {bad} do not exist in {where}, which has num_hidden_layers={layers}."
            )


def exported_by(cfg: DrafterConfig, fmt: str) -> dict[str, Any]:
    """Provenance written into every config.json we produce; ``drafter`` restores fields a layout cannot express."""
    return {"library": "dspark_lightning", "version": package_version(), "format": fmt, "drafter": cfg.to_dict()}


def drafter_config_from_json(data: dict[str, Any], fields: dict[str, Any], *,
                             compare: tuple[str, ...]) -> DrafterConfig:
    """Rebuild a drafter config from a draft ``config.json`` (a target copy with draft keys on top).

    Args:
        data: the config.json content; ``num_target_layers`` (if present) is the target depth.
        fields: the drafter fields the layout expresses (algorithm, target_layer_ids, block_size, ...).
        compare: fields on which an embedded ``exported_by.drafter`` must agree with ``fields`` for it to be used.

    Returns the embedded original config when the file is ours and unedited (it also restores fields the layout
    cannot express, e.g. ``num_anchors``), else the config parsed from the layout's keys.
    """
    target_like = dict(data)
    if data.get("num_target_layers") is not None:
        target_like["num_hidden_layers"] = data["num_target_layers"]
    else:
        target_like.pop("num_hidden_layers", None)
    parsed = DrafterConfig(**fields).resolve(namespace(target_like))
    embedded = (data.get(EXPORTED_BY) or {}).get("drafter")
    if not isinstance(embedded, dict):
        return parsed
    try:
        original = DrafterConfig.from_dict(embedded)
        original.validate()
    except (TypeError, ValueError):
        return parsed
    geometry = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "head_dim", "rope_theta")
    differ = [k for k in (*compare, *geometry) if getattr(parsed, k) != getattr(original, k)]
    if heads(parsed) != heads(original) and parsed.algorithm != "eagle3":
        differ.append("heads")
    if differ:
        warnings.warn(
            f"config.json disagrees with its own exported_by.drafter on {differ} (edited after export?); using the "
            f"values of the layout keys.", stacklevel=2,
        )
        return parsed
    return dataclasses.replace(original)
