"""Exported drafters written by hand, following the checkpoint conventions SGLang 0.5.23's loaders read.

Default geometry (``TINY``): hidden 64, 4 heads, 2 kv heads, head_dim 16, intermediate 128, vocab 256, 2 draft
layers, a 4-layer target. ``SMOLLM2`` has the geometry of SmolLM2-135M-Instruct (Llama: hidden 576, 9 heads,
3 kv heads, head_dim 64, vocab 49152, 30 layers, tied embeddings, rope_theta 1e5) with 2 draft layers. Weights are
random (seeded) bf16 tensors: the tests need their names, shapes and values to reach SGLang's parameters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class Geometry:
    model_type: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    target_layers: int
    target_layer_ids: list[int] = field(default_factory=list)
    mask_token_id: int = 0
    rope_theta: float = 1000000.0
    tie_word_embeddings: bool = False
    draft_layers: int = 2


TINY = Geometry("qwen3", 64, 4, 2, 16, 128, 256, 4, [0, 2], mask_token_id=250)
TINY_LLAMA = Geometry("llama", 64, 4, 2, 16, 128, 256, 4, [0, 2], mask_token_id=250)
SMOLLM2 = Geometry("llama", 576, 9, 3, 64, 1536, 49152, 30, [1, 7, 14, 20, 27], mask_token_id=0,
                   rope_theta=100000.0, tie_word_embeddings=True)
HIDDEN, HEAD_DIM = TINY.hidden, TINY.head_dim


def target_config(model_type: str = "qwen3", geometry: Geometry | None = None) -> dict[str, Any]:
    """A target config (Qwen3 or Llama) of the given geometry."""
    g = geometry or (TINY if model_type == "qwen3" else TINY_LLAMA)
    arch = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}[g.model_type]
    return {
        "architectures": [arch],
        "model_type": g.model_type,
        "hidden_size": g.hidden,
        "intermediate_size": g.intermediate,
        "num_attention_heads": g.heads,
        "num_key_value_heads": g.kv_heads,
        "head_dim": g.head_dim,
        "num_hidden_layers": g.target_layers,
        "vocab_size": g.vocab,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5 if g.model_type == "llama" else 1e-6,
        "rope_theta": g.rope_theta,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": g.tie_word_embeddings,
        "torch_dtype": "bfloat16",
    }


def write_target(path: Path, model_type: str = "qwen3") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(target_config(model_type), indent=2))
    return path


def _rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * 0.2).to(torch.bfloat16)


def _backbone(gen: torch.Generator, g: Geometry, qk_norm: bool) -> dict[str, torch.Tensor]:
    """``layers.N.*``, ``norm``, ``fc`` [H, m*H], ``hidden_norm`` (DeepSpec / z-lab names)."""
    h, q, kv = g.hidden, g.heads * g.head_dim, g.kv_heads * g.head_dim
    t: dict[str, torch.Tensor] = {}
    for i in range(g.draft_layers):
        p = f"layers.{i}."
        t[p + "self_attn.q_proj.weight"] = _rand(gen, q, h)
        t[p + "self_attn.k_proj.weight"] = _rand(gen, kv, h)
        t[p + "self_attn.v_proj.weight"] = _rand(gen, kv, h)
        t[p + "self_attn.o_proj.weight"] = _rand(gen, h, q)
        if qk_norm:
            t[p + "self_attn.q_norm.weight"] = 1 + _rand(gen, g.head_dim)
            t[p + "self_attn.k_norm.weight"] = 1 + _rand(gen, g.head_dim)
        t[p + "mlp.gate_proj.weight"] = _rand(gen, g.intermediate, h)
        t[p + "mlp.up_proj.weight"] = _rand(gen, g.intermediate, h)
        t[p + "mlp.down_proj.weight"] = _rand(gen, h, g.intermediate)
        t[p + "input_layernorm.weight"] = 1 + _rand(gen, h)
        t[p + "post_attention_layernorm.weight"] = 1 + _rand(gen, h)
    t["norm.weight"] = 1 + _rand(gen, h)
    t["fc.weight"] = _rand(gen, h, len(g.target_layer_ids) * h)
    t["hidden_norm.weight"] = 1 + _rand(gen, h)
    return t


def _draft_config(g: Geometry, architecture: str, qk_norm: bool) -> dict[str, Any]:
    """The target config with the draft's depth, as DeepSpec's build_draft_config does."""
    config = target_config(geometry=g)
    if not qk_norm:
        config["qk_norm"] = False
    config.update(
        architectures=[architecture],
        num_hidden_layers=g.draft_layers,
        num_target_layers=g.target_layers,
        layer_types=["full_attention"] * g.draft_layers,
        tie_word_embeddings=False,
    )
    return config


def _write(path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


def write_dspark(path: Path, *, markov_head_type: str = "vanilla", markov_rank: int = 8, gamma: int = 4,
                 confidence: bool = True, confidence_with_markov: bool = True, target_model_type: str = "qwen3",
                 sample_from_anchor: bool | None = None, architecture: str | None = None,
                 zero_markov: bool = False, sts: list[float] | None = None, geometry: Geometry | None = None,
                 seed: int = 0) -> Path:
    """DSpark in SGLang's built-in DSPARK format: a copy of the target config plus the DSpark keys, top level.

    A Llama target has no q/k norm: the export then selects the plugin's ``DSparkLightningDraftModel`` with
    ``"qk_norm": false`` (unless ``architecture`` says otherwise). ``zero_markov`` writes an all-zero Markov head
    (how a DSpark without a Markov head is exported for SGLang); ``sts`` writes the STS temperatures to
    ``calibration.json`` as dspark_lightning's exporter does.
    """
    g = geometry or (TINY if target_model_type == "qwen3" else TINY_LLAMA)
    gen = torch.Generator().manual_seed(seed)
    qk_norm = g.model_type != "llama"
    config = _draft_config(g, architecture or ("Qwen3DSparkModel" if qk_norm else "DSparkLightningDraftModel"),
                           qk_norm)
    config.update(
        block_size=gamma,
        target_layer_ids=g.target_layer_ids,
        mask_token_id=g.mask_token_id,
        markov_rank=markov_rank,
        markov_head_type=markov_head_type,
        enable_confidence_head=confidence,
        confidence_head_with_markov=confidence_with_markov,
    )
    if sample_from_anchor is not None:
        config["sample_from_anchor"] = sample_from_anchor
    t = _backbone(gen, g, qk_norm)
    r, h = markov_rank, g.hidden
    if r > 0:
        t["markov_head.markov_w1.weight"] = _rand(gen, g.vocab, r) * (0 if zero_markov else 1)
        t["markov_head.markov_w2.weight"] = _rand(gen, g.vocab, r) * (0 if zero_markov else 1)
    if markov_head_type == "gated":
        t["markov_head.gate_proj.weight"] = _rand(gen, r, h + r)
        t["markov_head.gate_proj.bias"] = _rand(gen, r)
    elif markov_head_type == "rnn":
        t["markov_head.joint_proj.weight"] = _rand(gen, 3 * r, 2 * r + h)
        t["markov_head.joint_proj.bias"] = _rand(gen, 3 * r)
    if confidence:
        width = h + (r if confidence_with_markov and r > 0 else 0)
        t["confidence_head.proj.weight"] = _rand(gen, 1, width)
        t["confidence_head.proj.bias"] = _rand(gen, 1)
    _write(path, config, t)
    if sts is not None:
        (path / "calibration.json").write_text(json.dumps({"temperatures": sts}))
    return path


def write_dflash_zlab(path: Path, *, block_size: int = 8, target_model_type: str = "qwen3", seed: int = 1) -> Path:
    """DFlash in the z-lab layout: ``block_size`` = verify window, keys nested in ``dflash_config``.

    A Llama target (no q/k norm) selects the plugin's ``DFlashLightningDraftModel`` with ``"qk_norm": false``.
    """
    g = TINY if target_model_type == "qwen3" else TINY_LLAMA
    gen = torch.Generator().manual_seed(seed)
    qk_norm = g.model_type != "llama"
    config = _draft_config(g, "DFlashDraftModel" if qk_norm else "DFlashLightningDraftModel", qk_norm)
    config.update(
        auto_map={"AutoModel": "dflash.DFlashDraftModel"},
        block_size=block_size,
        dflash_config={"mask_token_id": g.mask_token_id, "target_layer_ids": g.target_layer_ids},
    )
    return _write(path, config, _backbone(gen, g, qk_norm))


def write_eagle3(path: Path, *, draft_vocab: int = 64, geometry: Geometry = TINY_LLAMA, ttt_length: int | None = 4,
                 seed: int = 2) -> Path:
    """Eagle3 as SGLang's LlamaForCausalLMEagle3 loads it: one ``midlayer`` with 2H-wide q/k/v, d2t/t2d; with
    dspark_lightning's ``ttt_length`` (the trained chain length; SGLang does not read it) unless None."""
    g = geometry
    gen = torch.Generator().manual_seed(seed)
    h, q, kv = g.hidden, g.heads * g.head_dim, g.kv_heads * g.head_dim
    config = target_config(geometry=g)
    config.update(
        architectures=["LlamaForCausalLMEagle3"],
        num_hidden_layers=1,
        draft_vocab_size=draft_vocab,
        target_hidden_size=h,
        tie_word_embeddings=False,
        eagle_config={"eagle_aux_hidden_state_layer_ids": [0, 1, 2], "use_aux_hidden_state": True},
    )
    if ttt_length is not None:
        config["ttt_length"] = ttt_length
    t = {
        "midlayer.self_attn.q_proj.weight": _rand(gen, q, 2 * h),
        "midlayer.self_attn.k_proj.weight": _rand(gen, kv, 2 * h),
        "midlayer.self_attn.v_proj.weight": _rand(gen, kv, 2 * h),
        "midlayer.self_attn.o_proj.weight": _rand(gen, h, q),
        "midlayer.mlp.gate_proj.weight": _rand(gen, g.intermediate, h),
        "midlayer.mlp.up_proj.weight": _rand(gen, g.intermediate, h),
        "midlayer.mlp.down_proj.weight": _rand(gen, h, g.intermediate),
        "midlayer.input_layernorm.weight": 1 + _rand(gen, h),
        "midlayer.hidden_norm.weight": 1 + _rand(gen, h),
        "midlayer.post_attention_layernorm.weight": 1 + _rand(gen, h),
        "norm.weight": 1 + _rand(gen, h),
        "fc.weight": _rand(gen, h, 3 * h),
        "lm_head.weight": _rand(gen, draft_vocab, h),
    }
    hot = torch.randperm(g.vocab, generator=gen)[:draft_vocab].sort().values
    t["d2t"] = hot - torch.arange(draft_vocab)
    t2d = torch.zeros(g.vocab, dtype=torch.bool)
    t2d[hot] = True
    t["t2d"] = t2d
    return _write(path, config, t)
