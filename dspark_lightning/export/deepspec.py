"""DeepSpec's checkpoint layout (``Qwen3DSparkModel`` / ``Qwen3Eagle3Model``, ``Gemma4DSparkModel`` /
``Gemma4Eagle3Model``), both ways: DeepSpec's ``deepspec/modeling/{dspark,eagle3}/{qwen3,gemma4}/{config,modeling}.py``
and ``deepspec/trainer/ckpt_manager.py``, and the released ``deepseek-ai/dspark_qwen3_4b_block7`` files.

A DeepSpec draft directory is ``config.json`` + ``model.safetensors``: the config is the target's config (Qwen3:
the top-level one; Gemma4: its text config, ``model_type: gemma4_text``, plus ``target_model_type`` and
``target_text_model_type``) with the draft keys on top (``num_target_layers``, ``num_hidden_layers`` = draft depth,
``block_size`` = gamma, ``mask_token_id``, ``target_layer_ids``, ``num_anchors``, ``markov_rank``, ...), the tensors
carry the module names of the DeepSpec model, frozen ``embed_tokens``/``lm_head`` copies included. Our parameter
names are DeepSpec's (Gemma4's sandwich norms and ``layer_scalar`` buffers included, ``v_proj`` absent with K = V),
so no tensor is renamed either way. DeepSpec's "DFlash" is the same class with ``markov_rank: 0`` and no confidence
head, in the anchor-predicts (``deepspec``) block layout. The Gemma4 layer features (sandwich norms, K = V, scale-free
``v_norm``, attention scale 1, ``sqrt(H)`` embedding scale, proportional RoPE, logit soft cap) are not keys of the
file: both sides derive them from the Gemma4 text config (DeepSpec ``deepspec/modeling/dspark/gemma4/``,
``deepspec/modeling/eagle3/gemma4/``), as ``DrafterConfig.resolve`` does.

``python -m dspark_lightning import-deepspec DIR --out OUT`` reads such a directory (for instance the released
``deepseek-ai/dspark_qwen3_4b_block7``) into our drafter classes.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ..drafters import DrafterConfig
from .checkpoint import EXPORT_INFO_KEY, TrainedDrafter, check_state_dict
from .common import drafter_config_from_json, exported_by, family_features, heads, is_qwen3_family, target_base_config
from .fileio import DTYPE_NAMES, SAFE_INDEX, SAFE_WEIGHTS, load_tensors, read_json, torch_dtype
from .sglang import block_fields

DSPARK_ARCHS = ("Qwen3DSparkModel", "Gemma4DSparkModel")
EAGLE3_ARCHS = ("Qwen3Eagle3Model", "Eagle3DraftModel", "Gemma4Eagle3Model")  # Eagle3DraftModel: a legacy Qwen3 name
# What DeepSpec's Gemma4 classes build (``deepspec/modeling/dspark/gemma4/modeling.py``); a Gemma4 drafter configured
# otherwise has no DeepSpec class.
_GEMMA4_LAYOUT = {"norm_style": "sandwich", "attention_scale": 1.0, "v_norm": True, "layer_scalar": True,
                  "qk_norm": True}


def _family(cfg: DrafterConfig) -> str | None:
    """``Qwen3`` / ``Gemma4``: the prefix of DeepSpec's class names for this drafter's target, None without one."""
    if is_qwen3_family(cfg.target_model_type):
        return "Qwen3"
    if (cfg.target_model_type or "").startswith("gemma4"):
        return "Gemma4"
    return None


def check_exportable(cfg: DrafterConfig) -> None:
    """Raise, naming the setting, when DeepSpec has no class for this drafter."""
    problems = []
    family = _family(cfg)
    if family is None:
        problems.append(f"the target family is {cfg.target_model_type!r}; DeepSpec has Qwen3 and Gemma4 draft "
                        f"classes only")
    elif family == "Qwen3" and (family_features(cfg) or not cfg.qk_norm):
        features = family_features(cfg) or ["qk_norm=False"]
        problems.append(f"{', '.join(features)}: DeepSpec's Qwen3 layers have none of these")
    elif family == "Gemma4":
        wrong = [f"{k}={getattr(cfg, k)!r}" for k, v in _GEMMA4_LAYOUT.items() if getattr(cfg, k) != v]
        if abs(cfg.embed_scale - cfg.hidden_size ** 0.5) > 1e-9:
            wrong.append(f"embed_scale={cfg.embed_scale}")
        if wrong:
            problems.append(f"{', '.join(wrong)}: DeepSpec's Gemma4 layers have {_GEMMA4_LAYOUT} and embed_scale "
                            f"sqrt(hidden_size)")
    if cfg.algorithm != "eagle3" and cfg.block_layout != "deepspec":
        problems.append("block_layout='zlab'; DeepSpec's DSpark model has the anchor slot predict "
                        "(block_layout: deepspec)")
    if cfg.algorithm == "eagle3" and cfg.draft_vocab_size is not None:
        problems.append(f"draft_vocab_size={cfg.draft_vocab_size}; DeepSpec's Eagle3 has the full vocabulary "
                        f"(no d2t/t2d)")
    if problems:
        raise ValueError("Cannot export this drafter in DeepSpec's layout: " + "; ".join(problems) + ".")


def deepspec_config(trained: TrainedDrafter, dtype: str) -> dict[str, Any]:
    """DeepSpec's ``config.json``: the target (text) config with DeepSpec's draft keys on top."""
    cfg = trained.config
    check_exportable(cfg)
    family = _family(cfg)
    config = target_base_config(trained.target_config)
    if family == "Gemma4":  # DeepSpec's gemma4/config.py: the text config, naming the target's model types
        # The full-attention geometry as the attributes DeepSpec's loader reads; newer transformers keeps it in
        # per_layer_config, keyed by *target* layer, which the draft's own layer_types would misindex.
        config.pop("per_layer_config", None)
        full = {"global_head_dim": cfg.global_head_dim, "num_global_key_value_heads": cfg.num_global_key_value_heads}
        config.update({k: v for k, v in full.items() if v is not None})
        config.update({"target_model_type": trained.target_config.get("model_type"),
                       "target_text_model_type": config.get("model_type")})
    layers = {"num_target_layers": cfg.num_target_layers, "num_hidden_layers": cfg.num_hidden_layers,
              "layer_types": ["full_attention"] * cfg.num_hidden_layers, "tie_word_embeddings": False,
              "target_layer_ids": list(cfg.target_layer_ids)}
    if cfg.algorithm == "eagle3":
        step_decay = (trained.hyper_parameters.get("loss") or {}).get("step_decay", 0.8)
        config.update({"architectures": [f"{family}Eagle3Model"], **layers, "draft_num_hidden_layers": 1,
                       "ttt_length": cfg.ttt_length, "step_loss_decay": step_decay,
                       "target_model_name_or_path": (trained.target or {}).get("path") or ""})
    else:
        head = heads(cfg)
        config.update({"architectures": [f"{family}DSparkModel"], **layers, "block_size": cfg.block_size,
                       "mask_token_id": cfg.mask_token_id, "num_anchors": cfg.num_anchors,
                       "enable_confidence_head": head["enable_confidence_head"], "markov_rank": head["markov_rank"]})
        if head["enable_confidence_head"]:
            config["confidence_head_with_markov"] = head["confidence_head_with_markov"]
        if head["markov_rank"] > 0:
            config["markov_head_type"] = head["markov_head_type"]
    config["dtype"] = dtype
    config["exported_by"] = exported_by(cfg, "deepspec")
    return config


def parse_config(config: dict[str, Any]) -> DrafterConfig:
    """Our drafter config of a DeepSpec ``config.json`` (DSpark, DFlash or Eagle3; Qwen3 or Gemma4 family)."""
    arch = (config.get("architectures") or [""])[0]
    if arch in EAGLE3_ARCHS:
        fields = {"algorithm": "eagle3", "num_hidden_layers": 1, "target_layer_ids": list(config["target_layer_ids"]),
                  "ttt_length": int(config.get("ttt_length", 7)), "qk_norm": True, "embed_scale": 1.0}
        compare: tuple[str, ...] = ("algorithm", "target_layer_ids", "ttt_length")
    elif arch in DSPARK_ARCHS:
        fields = block_fields(config)
        compare = ("block_size", "block_layout", "mask_token_id", "target_layer_ids", "num_hidden_layers")
    else:
        raise ValueError(
            f"architectures={config.get('architectures')!r} is not a DeepSpec Qwen3 draft, nor a Gemma4 one; expected "
            f"one of {DSPARK_ARCHS + EAGLE3_ARCHS}."
        )
    if arch.startswith("Gemma4"):
        fields.pop("embed_scale")  # sqrt(hidden_size), from the Gemma4 family (DrafterConfig.resolve)
    return drafter_config_from_json(config, fields, compare=compare)


def read_deepspec(directory: str | Path) -> tuple[DrafterConfig, dict[str, Tensor], dict[str, Any]]:
    """(drafter config, tensors, target config) of a DeepSpec draft directory.

    Raises:
        FileNotFoundError: no ``config.json`` or no weights in ``directory``.
        ValueError: not a DeepSpec draft, or tensors that do not match the config.
    """
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} has no config.json; give a DeepSpec draft checkpoint directory.")
    config = read_json(directory / "config.json")
    cfg = parse_config(config)
    tensors = _read_weights(directory)
    tensors.pop("rotary_emb.inv_freq", None)  # written by some transformers versions; recomputed here
    check_state_dict(cfg, tensors, f"DeepSpec checkpoint {directory}")
    return cfg, tensors, _target_config_of(config)


def _read_weights(directory: Path) -> dict[str, Tensor]:
    if (directory / SAFE_WEIGHTS).is_file():
        return load_tensors(directory / SAFE_WEIGHTS)
    if (directory / SAFE_INDEX).is_file():
        weight_map = read_json(directory / SAFE_INDEX)["weight_map"]
        tensors: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(load_tensors(directory / shard))
        return tensors
    raise FileNotFoundError(f"{directory} has no {SAFE_WEIGHTS} or {SAFE_INDEX}.")


def _target_config_of(config: dict[str, Any]) -> dict[str, Any]:
    """The target's HF config recovered from a DeepSpec draft config (a copy of it with draft keys on top)."""
    draft_keys = ("num_target_layers", "block_size", "mask_token_id", "target_layer_ids", "num_anchors",
                  "enable_confidence_head", "confidence_head_with_markov", "markov_rank", "markov_head_type",
                  "draft_num_hidden_layers", "ttt_length", "step_loss_decay", "target_model_name_or_path",
                  "layer_types", "exported_by", "architectures", "dtype", "transformers_version", "target_model_type",
                  "target_text_model_type")
    target = {k: v for k, v in config.items() if k not in draft_keys}
    if config.get("num_target_layers") is not None:
        target["num_hidden_layers"] = config["num_target_layers"]
    if config.get("model_type") == "qwen3":
        target["architectures"] = ["Qwen3ForCausalLM"]
    if config.get("model_type") == "gemma4_text":  # the text model of the target (its top level is not in the file)
        target["architectures"] = ["Gemma4ForCausalLM"]
    return target


def import_deepspec(
    deepspec_dir: str,
    *,
    out: str,
    target: str | None = None,
    dtype: Literal["bfloat16", "float16", "float32"] | None = None,
    overwrite: bool = False,
) -> str:
    """Import a DeepSpec draft checkpoint directory into our drafter classes.

    Args:
        deepspec_dir: a DeepSpec draft directory (``config.json`` + ``model.safetensors``), e.g. a download of
            ``deepseek-ai/dspark_qwen3_4b_block7``.
        out: ``*.ckpt`` writes a weights-only DrafterModule checkpoint (for ``export --ckpt``, ``validate``);
            anything else writes an ``hf`` export directory there (``load_drafter`` / ``AutoModel`` load it).
        target: the target model the drafter serves (HF directory or Hub id), recorded as the checkpoint's
            target; default: the config's ``target_model_name_or_path`` when it has one.
        dtype: cast floating-point weights (default: keep the file's dtype).
        overwrite: replace ``out`` if it exists.

    Returns:
        The path written.
    """
    cfg, tensors, target_config = read_deepspec(deepspec_dir)
    target_path = target or read_json(Path(deepspec_dir) / "config.json").get("target_model_name_or_path") or None
    trained = TrainedDrafter(
        config=cfg, state_dict=tensors, target_config=target_config,
        target={"path": target_path} if target_path else None,
        hyper_parameters={"drafter": cfg.to_dict(), "imported_from": f"DeepSpec checkpoint {Path(deepspec_dir).name}"},
        source=f"DeepSpec checkpoint {Path(deepspec_dir).name}",
    )
    if out.endswith(".ckpt"):
        return write_checkpoint(trained, Path(out), dtype=dtype, overwrite=overwrite)
    from .exporter import write_export

    file_dtype = dtype or DTYPE_NAMES.get(_float_dtype(tensors), "float32")
    return write_export(trained, fmt="hf", out=out, dtype=file_dtype, overwrite=overwrite)


def _lightning_version() -> str:
    """Lightning's version, which ``load_from_checkpoint`` reads to migrate a checkpoint (metadata only)."""
    for dist in ("lightning", "pytorch-lightning"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "2.0.0"


def _float_dtype(tensors: dict[str, Tensor]) -> torch.dtype:
    return next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)


def write_checkpoint(trained: TrainedDrafter, out: Path, *, dtype: str | None = None, overwrite: bool = False) -> str:
    """A weights-only DrafterModule checkpoint: ``state_dict`` (``drafter.*``), hyper-parameters and the resolved
    drafter / target configs under ``dspark_lightning`` (so :func:`read_checkpoint` needs no target files)."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"Output {out} already exists; pass --overwrite true to replace it.")
    cast = torch_dtype(dtype) if dtype else None
    state = {f"drafter.{k}": (v.to(cast) if cast is not None and v.is_floating_point() else v).contiguous()
             for k, v in trained.state_dict.items()}
    hparams: dict[str, Any] = {"drafter": trained.config.to_dict()}
    if trained.target:
        hparams["target"] = {"path": trained.target.get("path")}
        hparams["_instantiator"] = "lightning.pytorch.cli.instantiate_module"
    data = {"state_dict": state, "hyper_parameters": hparams, "epoch": 0, "global_step": 0,
            "pytorch-lightning_version": _lightning_version(),
            EXPORT_INFO_KEY: {"drafter_config": trained.config.to_dict(), "target_config": trained.target_config,
                              "source": trained.source}}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        torch.save(data, tmp)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"Wrote a weights-only DrafterModule checkpoint to {out} ({trained.config.algorithm}).")
    return str(out)
