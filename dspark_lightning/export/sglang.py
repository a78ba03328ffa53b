"""SGLang 0.5.23 draft checkpoints: DSPARK, DFLASH (z-lab layout) and EAGLE3 (SGLang's loaders in
``python/sglang/srt/models/``: ``dspark.py``, ``dflash.py``, ``llama_eagle3.py``).

SGLang's loaders skip weights they do not know and leave missing ones at their initial values, so a wrong key
set loads "fine" and serves with acceptance near 1. Hence the exporter computes the tensor set each serving
class loads (:func:`required_tensors`, names *and* shapes, written here from those loaders, independently of our
drafter modules) and refuses to write an export whose tensors differ in any way (:func:`check_tensors`).

What SGLang reads, per algorithm:

- DSPARK (``Qwen3DSparkModel`` for Qwen3 targets, ``DSparkDraftModel`` otherwise): top-level ``block_size`` = gamma,
  ``target_layer_ids`` >= 0, ``num_target_layers``, ``mask_token_id``, ``markov_rank`` > 0, ``markov_head_type``,
  ``enable_confidence_head``, ``confidence_head_with_markov``, ``sample_from_anchor`` (False = z-lab block layout).
  No ``auto_map``. Embedding and head are the target's (dropped here). Upstream draft layers always have q/k norms.
- DFLASH (``DFlashDraftModel``): ``block_size`` = verify window = gamma + 1, ``dflash_config`` with
  ``mask_token_id`` and ``target_layer_ids``; masks predict (z-lab layout only).
- EAGLE3 (``LlamaForCausalLMEagle3``, a Llama layer: no q/k norms, no qkv bias): ``eagle_config`` with
  ``eagle_aux_hidden_state_layer_ids``, ``draft_vocab_size``, ``lm_head`` [draft_vocab, H], ``d2t``/``t2d``;
  the embedding is the target's (dropped here). ``tie_word_embeddings`` must be false (true makes SGLang use the
  target embedding as the head). ``ttt_length`` is ours (SGLang does not read it): the serve command's
  ``--speculative-num-steps``.

Two adaptations make drafters servable that the upstream classes would not serve as trained:

- Block drafters without q/k norm (Llama-family targets, e.g. SmolLM2): ``architectures`` is the ``dspark_sglang``
  plugin's ``DSparkLightningDraftModel`` / ``DFlashLightningDraftModel`` (upstream classes whose layers skip q/k
  norm) with ``"qk_norm": false``, and no ``q_norm``/``k_norm`` tensors. Serving needs the plugin installed in the
  SGLang environment (``pip install ./serving``). Qwen3-family exports keep the upstream classes.
- Block drafters without a Markov head that SGLang serves under DSPARK (a DFlash drafter in the DeepSpec block
  layout, a DSpark with ``markov_rank: 0``): SGLang's DSPARK requires ``markov_rank > 0``, so the export carries an
  all-zero rank-1 vanilla Markov head (``markov_w1``/``markov_w2`` zeros [V, 1]): the bias is exactly 0, the
  drafter computes what it was trained to, and upstream serves it unchanged (without a confidence head: static
  verification). :func:`drafter_tensors` drops the zero head again when reading such an export back.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import Tensor

from ..drafters import DrafterConfig
from .checkpoint import TrainedDrafter, shape_mismatches
from .common import EXPORTED_BY, exported_by, family_features, heads, is_qwen3_family, target_base_config

log = logging.getLogger(__name__)

SERVING = ("DSPARK", "DFLASH", "EAGLE3")
# Architectures of the dspark_sglang plugin (serving/): the upstream DSpark / DFlash draft classes with q/k norm off
# when config.json says "qk_norm": false.
PLUGIN_ARCHITECTURES = {"DSPARK": "DSparkLightningDraftModel", "DFLASH": "DFlashLightningDraftModel"}
PLUGIN_INSTALL = "pip install ./serving"
# Rank of the all-zero Markov head a head-less block drafter is exported with under DSPARK (bias exactly 0).
ZERO_MARKOV_RANK = 1
MARKOV_TENSORS = ("markov_head.markov_w1.weight", "markov_head.markov_w2.weight")
# Tensors SGLang never loads from a draft checkpoint: the target's embedding / head are attached at run time.
DROPPED = {"DSPARK": ("embed_tokens.weight", "lm_head.weight"), "DFLASH": ("embed_tokens.weight", "lm_head.weight"),
           "EAGLE3": ("embed_tokens.weight",)}
# config.json keys each serving class needs (nested keys as "parent.child").
REQUIRED_CONFIG_KEYS = {
    "DSPARK": ("architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "vocab_size",
               "max_position_embeddings", "layer_types", "block_size", "num_target_layers", "target_layer_ids",
               "mask_token_id", "markov_rank", "markov_head_type", "enable_confidence_head",
               "confidence_head_with_markov", "sample_from_anchor"),
    "DFLASH": ("architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "vocab_size",
               "max_position_embeddings", "layer_types", "block_size", "num_target_layers",
               "dflash_config.mask_token_id", "dflash_config.target_layer_ids"),
    "EAGLE3": ("architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "vocab_size",
               "draft_vocab_size", "max_position_embeddings", "tie_word_embeddings", "ttt_length",
               "eagle_config.eagle_aux_hidden_state_layer_ids", "eagle_config.use_aux_hidden_state"),
}
FORBIDDEN_CONFIG_KEYS = ("auto_map", "quantization_config")


def serving_of(cfg: DrafterConfig) -> str:
    """The SGLang algorithm serving ``cfg``: a DFlash drafter in the DeepSpec block layout (the anchor slot predicts)
    is served by DSPARK with a zero Markov head, since SGLang's DFLASH runs the z-lab layout only."""
    # dspark_v4: SGLang's DSPARK with DeepseekV4ForCausalLMDSpark, served only bundled into the V4 checkpoint
    # (export/v4.py); the standalone checks and writers below do not apply to it.
    if cfg.algorithm == "dflash" and cfg.block_layout != "zlab":
        return "DSPARK"
    return {"dspark": "DSPARK", "dflash": "DFLASH", "eagle3": "EAGLE3", "dspark_v4": "DSPARK"}[cfg.algorithm]


def needs_plugin(cfg: DrafterConfig) -> bool:
    """Whether the export selects a ``dspark_sglang`` plugin class (a block drafter without q/k norm)."""
    return cfg.algorithm in ("dspark", "dflash") and not cfg.qk_norm


def zero_markov_head(cfg: DrafterConfig) -> bool:
    """Whether the export adds an all-zero rank-1 Markov head (a head-less block drafter served by DSPARK)."""
    return cfg.algorithm in ("dspark", "dflash") and serving_of(cfg) == "DSPARK" and not cfg.has_markov_head


def served_config(cfg: DrafterConfig) -> DrafterConfig:
    """``cfg`` as SGLang's DSPARK class sees it: a head-less block drafter becomes a DSpark with the zero rank-1
    vanilla Markov head (and its own confidence head, if any, without Markov features); others unchanged."""
    if not zero_markov_head(cfg):
        return cfg
    return dataclasses.replace(cfg, algorithm="dspark", markov_rank=ZERO_MARKOV_RANK, markov_head_type="vanilla",
                               enable_confidence_head=cfg.has_confidence_head, confidence_head_with_markov=False)


def serving_notes(cfg: DrafterConfig) -> list[str]:
    """What a user must know to serve the SGLang export of ``cfg`` (logged at export, written into the model card)."""
    notes = []
    serving = serving_of(cfg)
    if needs_plugin(cfg):
        notes.append(
            f"architectures [{PLUGIN_ARCHITECTURES[serving]!r}] with \"qk_norm\": false (the target family has no q/k "
            f"norm): serving needs the dspark_sglang plugin installed in the SGLang environment "
            f"(`{PLUGIN_INSTALL}` from the dspark_lightning repository); without it SGLang does not know the class."
        )
    if zero_markov_head(cfg):
        what = "a DFlash drafter in the DeepSpec block layout" if cfg.algorithm == "dflash" else \
            "a DSpark drafter without a Markov head"
        notes.append(
            f"{what}, exported for SGLang's DSPARK with an all-zero rank-1 vanilla Markov head (markov_rank 1, "
            f"markov_w1/markov_w2 zeros: the bias is exactly 0, so it drafts as trained); upstream SGLang serves it "
            + ("with --speculative-algorithm DSPARK." if cfg.has_confidence_head else
               "with --speculative-algorithm DSPARK in static verification (SGLANG_RAGGED_VERIFY_MODE=static, the "
               "default; it has no confidence head).")
        )
    return notes


# ---------------------------------------------------------------------- what SGLang loads
def required_tensors(serving: str, cfg: DrafterConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the SGLang 0.5.23 class of ``serving`` loads for this config."""
    h, v, i = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    q, kv, m = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.num_context_layers
    if serving == "EAGLE3":
        vd = cfg.draft_vocab_size or v
        p = "layers.0."
        return {
            "fc.weight": (h, m * h), "norm.weight": (h,), "lm_head.weight": (vd, h), "d2t": (vd,), "t2d": (v,),
            p + "hidden_norm.weight": (h,), p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, 2 * h), p + "self_attn.k_proj.weight": (kv, 2 * h),
            p + "self_attn.v_proj.weight": (kv, 2 * h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
        }
    if serving == "DSPARK":
        cfg = served_config(cfg)
    out: dict[str, tuple[int, ...]] = {"fc.weight": (h, m * h), "hidden_norm.weight": (h,), "norm.weight": (h,)}
    for n in range(cfg.num_hidden_layers):
        p = f"layers.{n}."
        out.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
        })
        if cfg.qk_norm:  # without: the plugin classes build no q/k norm (needs_plugin)
            out.update({p + "self_attn.q_norm.weight": (cfg.head_dim,), p + "self_attn.k_norm.weight": (cfg.head_dim,)})
        if cfg.attention_bias:
            out.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                        p + "self_attn.v_proj.bias": (kv,), p + "self_attn.o_proj.bias": (h,)})
    if serving == "DSPARK":
        r = heads(cfg)["markov_rank"]
        out.update({"markov_head.markov_w1.weight": (v, r), "markov_head.markov_w2.weight": (v, r)})
        if cfg.markov_head_type == "gated":
            out.update({"markov_head.gate_proj.weight": (r, h + r), "markov_head.gate_proj.bias": (r,)})
        elif cfg.markov_head_type == "rnn":
            out.update({"markov_head.joint_proj.weight": (3 * r, 2 * r + h), "markov_head.joint_proj.bias": (3 * r,)})
        if cfg.has_confidence_head:
            width = h + (r if heads(cfg)["confidence_head_with_markov"] else 0)
            out.update({"confidence_head.proj.weight": (1, width), "confidence_head.proj.bias": (1,)})
    return out


class IncompleteExportError(ValueError):
    """The tensors or config of an export would not load completely into the serving class."""


def check_tensors(serving: str, tensors: dict[str, Tensor], required: dict[str, tuple[int, ...]]) -> None:
    missing, unexpected, wrong = shape_mismatches(required, {k: tuple(t.shape) for k, t in tensors.items()})
    if missing or unexpected or wrong:
        raise IncompleteExportError(
            f"Refusing to write an SGLang {serving} export that would load partially: missing {missing}, "
            f"unexpected {unexpected}, wrong shapes {wrong}."
        )


def check_config(serving: str, config: dict[str, Any]) -> None:
    missing = []
    for key in REQUIRED_CONFIG_KEYS[serving]:
        node: Any = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            missing.append(key)
    forbidden = [k for k in FORBIDDEN_CONFIG_KEYS if k in config]
    if missing or forbidden:
        raise IncompleteExportError(
            f"Refusing to write an SGLang {serving} config.json: missing keys {missing}, forbidden keys {forbidden}."
        )


# ---------------------------------------------------------------------- what we can serve
def check_servable(cfg: DrafterConfig, *, adapt: bool = False) -> str:
    """Return the SGLang algorithm serving ``cfg``, or raise naming the setting SGLang 0.5.23 cannot serve and the fix.

    Args:
        adapt: allow the two adaptations of the standalone ``sglang`` export (module docstring): the plugin class
            for block drafters without q/k norm, and the zero Markov head for head-less block drafters served by
            DSPARK. Off for callers that write the draft elsewhere (``attached`` copies), which refuse both.
    """
    serving = serving_of(cfg)
    problems: list[str] = []
    if any(i < 0 for i in cfg.target_layer_ids):
        problems.append(f"target_layer_ids={cfg.target_layer_ids} contains -1 (the embedding output); SGLang "
                        f"captures decoder-layer outputs only, so use ids >= 0")
    if cfg.hidden_act != "silu":
        problems.append(f"hidden_act={cfg.hidden_act!r}; SGLang's draft MLPs are SiLU-gated")
    features = family_features(cfg)
    if features:
        problems.append(f"{', '.join(features)} (Gemma-style layers); SGLang 0.5.23's DSpark/DFlash/Eagle3 draft "
                        f"classes build Qwen3/Llama layers only")
    if serving == "EAGLE3":
        if cfg.qk_norm:
            problems.append("qk_norm=True; SGLang's LlamaForCausalLMEagle3 layer has no q/k norms: train the Eagle3 "
                            "drafter with qk_norm: false")
        if cfg.attention_bias:
            problems.append("attention_bias=True; LlamaForCausalLMEagle3 builds qkv_proj without bias")
    elif not adapt:
        if not cfg.qk_norm:
            problems.append("qk_norm=False; SGLang's upstream DFlash/DSpark draft layers always apply q/k RMSNorm "
                            "(export --format sglang selects the dspark_sglang plugin class for it, or train with "
                            "qk_norm: true)")
        if serving == "DSPARK" and not cfg.has_markov_head:
            problems.append(f"markov_rank=0; SGLang's DSPARK requires a Markov head (markov_rank > 0); export "
                            f"--format sglang writes this {cfg.algorithm} drafter with an all-zero rank-1 Markov head")
    if problems:
        raise ValueError(f"Cannot export this {cfg.algorithm} drafter for SGLang {serving}: "
                         + "; ".join(problems) + ".")
    return serving


# ---------------------------------------------------------------------- writing
def sglang_config(cfg: DrafterConfig, target_config: dict[str, Any], dtype: str, serving: str) -> dict[str, Any]:
    """The draft ``config.json`` for ``serving`` (a copy of the target config with the draft keys on top)."""
    base = target_base_config(target_config)
    layer_types = ["full_attention"] * cfg.num_hidden_layers
    if serving == "EAGLE3":
        rope = {k: base[k] for k in ("rope_parameters", "rope_scaling", "rope_theta") if base.get(k) is not None}
        if not rope:
            rope = {"rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}
        config = {
            "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size, "num_hidden_layers": 1,
            "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim, "hidden_act": cfg.hidden_act, "rms_norm_eps": cfg.rms_norm_eps,
            "max_position_embeddings": cfg.max_position_embeddings, "vocab_size": cfg.vocab_size,
            "draft_vocab_size": cfg.draft_vocab_size or cfg.vocab_size, "target_hidden_size": cfg.hidden_size,
            "num_target_layers": cfg.num_target_layers, "attention_bias": False, "mlp_bias": False,
            "tie_word_embeddings": False, "layer_types": layer_types, **rope,
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(cfg.target_layer_ids),
                             "use_aux_hidden_state": True, "norm_before_fc": False},
            # Not read by SGLang (it picks steps / top-k / draft tokens by target architecture, 3 / 1 / 4 for
            # most); the chain length the drafter was trained to unroll (DeepSpec's key), from which the serve
            # command takes --speculative-num-steps (dspark_sglang.launch, the model card).
            "ttt_length": cfg.ttt_length,
        }
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if base.get(key) is not None:
                config[key] = base[key]
    else:
        config = base
        config.update({
            "num_hidden_layers": cfg.num_hidden_layers, "num_target_layers": cfg.num_target_layers,
            "layer_types": layer_types, "tie_word_embeddings": False, "use_sliding_window": False,
            "head_dim": cfg.head_dim,
        })
        if serving == "DSPARK":
            arch = "Qwen3DSparkModel" if is_qwen3_family(cfg.target_model_type) else "DSparkDraftModel"
            config.update({
                "architectures": [arch], "block_size": cfg.block_size, "target_layer_ids": list(cfg.target_layer_ids),
                "mask_token_id": cfg.mask_token_id, **heads(served_config(cfg)),
                "sample_from_anchor": cfg.block_layout == "deepspec",
            })
        else:
            config.update({
                "architectures": ["DFlashDraftModel"], "block_size": cfg.block_size + 1,
                "dflash_config": {"mask_token_id": cfg.mask_token_id, "target_layer_ids": list(cfg.target_layer_ids)},
            })
        if needs_plugin(cfg):
            config.update({"architectures": [PLUGIN_ARCHITECTURES[serving]], "qk_norm": False})
    config["dtype"] = dtype
    config["exported_by"] = exported_by(cfg, f"sglang-{serving.lower()}")
    return config


def sglang_tensors(cfg: DrafterConfig, state_dict: dict[str, Tensor], serving: str) -> dict[str, Tensor]:
    """The drafter tensors SGLang loads: target-shared ones dropped; a head-less block drafter under DSPARK gets the
    zero rank-1 Markov head; an Eagle3 always ships ``d2t``/``t2d``."""
    tensors = {k: v for k, v in state_dict.items() if k not in DROPPED[serving]}
    if serving == "DSPARK" and zero_markov_head(cfg):
        like = next(t for t in tensors.values() if t.is_floating_point())
        for name in MARKOV_TENSORS:
            tensors[name] = torch.zeros(cfg.vocab_size, ZERO_MARKOV_RANK, dtype=like.dtype)
    if serving == "EAGLE3" and "d2t" not in tensors:
        # Full vocabulary: the identity map, so SGLang uses the shipped head instead of borrowing the target's.
        tensors["d2t"] = torch.zeros(cfg.vocab_size, dtype=torch.long)
        tensors["t2d"] = torch.ones(cfg.vocab_size, dtype=torch.bool)
    return tensors


def prepare(trained: TrainedDrafter, dtype: str) -> tuple[str, dict[str, Any], dict[str, Tensor]]:
    """Check servability, build config and tensors, and validate both; returns (serving, config, tensors)."""
    cfg = trained.config
    serving = check_servable(cfg, adapt=True)
    config = sglang_config(cfg, trained.target_config, dtype, serving)
    tensors = sglang_tensors(cfg, trained.state_dict, serving)
    check_config(serving, config)
    check_tensors(serving, tensors, required_tensors(serving, cfg))
    for note in serving_notes(cfg):
        log.warning("SGLang %s export: %s", serving, note)
    return serving, config, tensors


# ---------------------------------------------------------------------- reading back
def config_fields(config: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Drafter fields expressed by an SGLang draft config, and those an embedded original must agree on."""
    arch = (config.get("architectures") or [""])[0]
    if arch == "LlamaForCausalLMEagle3":
        eagle = config.get("eagle_config") or {}
        draft_vocab = config.get("draft_vocab_size")
        fields = {"algorithm": "eagle3", "num_hidden_layers": 1, "qk_norm": False, "embed_scale": 1.0,
                  "target_layer_ids": list(eagle.get("eagle_aux_hidden_state_layer_ids") or []),
                  "draft_vocab_size": None if draft_vocab in (None, config.get("vocab_size")) else draft_vocab}
        compare: tuple[str, ...] = ("algorithm", "target_layer_ids", "num_hidden_layers")
        if config.get("ttt_length") is not None:
            fields["ttt_length"] = int(config["ttt_length"])
            compare += ("ttt_length",)
        return fields, compare
    compare = ("block_size", "block_layout", "mask_token_id", "target_layer_ids", "num_hidden_layers")
    if arch in ("DFlashDraftModel", PLUGIN_ARCHITECTURES["DFLASH"]):
        dflash = config.get("dflash_config") or {}
        fields = {"algorithm": "dflash", "block_layout": "zlab", "block_size": int(config["block_size"]) - 1,
                  "num_hidden_layers": config["num_hidden_layers"], "qk_norm": bool(config.get("qk_norm", True)),
                  "embed_scale": 1.0, "mask_token_id": dflash.get("mask_token_id", config.get("mask_token_id")),
                  "target_layer_ids": list(dflash.get("target_layer_ids") or config.get("target_layer_ids") or []),
                  "markov_rank": 0, "enable_confidence_head": False, "confidence_head_with_markov": False}
        return fields, compare
    fields = block_fields(config)
    original = (config.get(EXPORTED_BY) or {}).get("drafter")
    if fields["markov_rank"] == ZERO_MARKOV_RANK and isinstance(original, dict) and (
            original.get("algorithm") == "dflash" or original.get("markov_rank") == 0):
        # Our zero rank-1 Markov head of a head-less drafter (served_config); drafter_tensors checks it is zero.
        fields.update(algorithm=original["algorithm"], markov_rank=0, confidence_head_with_markov=False,
                      enable_confidence_head=fields["enable_confidence_head"] and original["algorithm"] == "dspark")
    return fields, compare


def block_fields(config: dict[str, Any]) -> dict[str, Any]:
    """Fields of a DeepSpec / SGLang DSpark-style config (``Qwen3DSparkModel``, ``DSparkDraftModel``,
    ``DSparkLightningDraftModel``)."""
    rank = int(config.get("markov_rank") or 0)
    confidence = bool(config.get("enable_confidence_head", False))
    with_markov = bool(config.get("confidence_head_with_markov", False)) and rank > 0
    return {
        "algorithm": "dspark" if rank > 0 or confidence else "dflash",
        "num_hidden_layers": config["num_hidden_layers"], "target_layer_ids": list(config["target_layer_ids"]),
        "block_size": int(config["block_size"]),
        "block_layout": "deepspec" if config.get("sample_from_anchor", True) else "zlab",
        "mask_token_id": config.get("mask_token_id"), "num_anchors": int(config.get("num_anchors", 512)),
        "markov_rank": rank, "markov_head_type": config.get("markov_head_type") or "vanilla",
        "enable_confidence_head": confidence, "confidence_head_with_markov": with_markov,
        "qk_norm": bool(config.get("qk_norm", True)), "embed_scale": 1.0,
    }


def drafter_tensors(cfg: DrafterConfig, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`sglang_tensors` (without the target-shared tensors, which the caller adds).

    Raises:
        ValueError: a drafter without a Markov head whose export carries a Markov head that is not all zero.
    """
    out = dict(tensors)
    if cfg.algorithm == "eagle3" and cfg.draft_vocab_size is None:
        out.pop("d2t", None)
        out.pop("t2d", None)
    if cfg.algorithm in ("dspark", "dflash") and not cfg.has_markov_head and any(n in out for n in MARKOV_TENSORS):
        if set(n for n in out if n.startswith("markov_head.")) != set(MARKOV_TENSORS) or \
                any(bool(out[n].any()) for n in MARKOV_TENSORS):
            raise ValueError(
                f"The config describes a {cfg.algorithm} drafter without a Markov head (exported with the zero rank-1 "
                f"head SGLang's DSPARK needs), but the Markov head tensors are not that all-zero head; dropping them "
                f"would change the drafter's outputs."
            )
        for name in MARKOV_TENSORS:
            del out[name]
    return out
