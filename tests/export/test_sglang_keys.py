"""Key sets of the SGLang exports against the lists of what SGLang 0.5.23 loads (reference notes: SGLang §3, §9).

The expected names are spelled out here for the tiny configs, from the notes, not computed by the exporter; the
serving issue re-checks ``sglang.required_tensors`` against the real SGLang package.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dspark_lightning.export import export_checkpoint
from dspark_lightning.export.checkpoint import TrainedDrafter, read_checkpoint
from dspark_lightning.export.sglang import (
    REQUIRED_CONFIG_KEYS,
    IncompleteExportError,
    check_config,
    check_tensors,
    prepare,
    required_tensors,
)

LAYER = [f"layers.0.{n}" for n in (
    "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
    "self_attn.v_proj.weight", "self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")]
BACKBONE = ["fc.weight", "hidden_norm.weight", "norm.weight", *LAYER]
MARKOV = ["markov_head.markov_w1.weight", "markov_head.markov_w2.weight"]
CONFIDENCE = ["confidence_head.proj.weight", "confidence_head.proj.bias"]
EAGLE3 = ["fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d", "layers.0.hidden_norm.weight",
          "layers.0.input_layernorm.weight", "layers.0.post_attention_layernorm.weight",
          *(f"layers.0.self_attn.{p}_proj.weight" for p in "qkvo"),
          *(f"layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down"))]

CASES = {
    "dspark_vanilla": ("DSPARK", BACKBONE + MARKOV + CONFIDENCE),
    "dspark_gated": ("DSPARK", BACKBONE + MARKOV + ["markov_head.gate_proj.weight", "markov_head.gate_proj.bias"]
                     + CONFIDENCE),
    "dspark_rnn": ("DSPARK", BACKBONE + MARKOV + ["markov_head.joint_proj.weight", "markov_head.joint_proj.bias"]
                   + CONFIDENCE),
    "dflash_zlab": ("DFLASH", BACKBONE),
    "eagle3_full_llama_style": ("EAGLE3", EAGLE3),
    "eagle3_reduced": ("EAGLE3", EAGLE3),
}


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


@pytest.mark.parametrize("variant", sorted(CASES))
def test_exported_key_set_is_exactly_what_sglang_loads(variant, checkpoints, tmp_path):
    serving, names = CASES[variant]
    out = tmp_path / variant
    export_checkpoint(ckpt=str(checkpoints[variant]), format="sglang", out=str(out))
    config = json.loads((out / "config.json").read_text())
    shapes = _shapes(out / "model.safetensors")
    assert sorted(shapes) == sorted(names)  # nothing missing, nothing SGLang would silently skip
    cfg = read_checkpoint(checkpoints[variant]).config
    assert shapes == required_tensors(serving, cfg)
    check_config(serving, config)
    assert "auto_map" not in config and "embed_tokens.weight" not in shapes
    h, v = cfg.hidden_size, cfg.vocab_size
    assert shapes["fc.weight"] == (h, len(cfg.target_layer_ids) * h)
    if serving == "DSPARK":
        assert config["architectures"] == ["Qwen3DSparkModel"] and config["block_size"] == cfg.block_size
        assert config["markov_rank"] == 16 and config["markov_head_type"] == cfg.markov_head_type
        assert config["enable_confidence_head"] is True and config["sample_from_anchor"] is True
        assert config["confidence_head_with_markov"] == (variant != "dspark_rnn")
        assert shapes["confidence_head.proj.weight"] == (1, h + (16 if variant != "dspark_rnn" else 0))
        assert config["target_layer_ids"] == [0, 2] and config["num_target_layers"] == 4
        assert config["mask_token_id"] == 255 and config["num_hidden_layers"] == 1
    elif serving == "DFLASH":
        assert config["architectures"] == ["DFlashDraftModel"] and config["block_size"] == cfg.block_size + 1
        assert config["dflash_config"] == {"mask_token_id": 255, "target_layer_ids": [0, 2]}
    else:
        vd = cfg.draft_vocab_size or v
        assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["model_type"] == "llama"
        assert config["draft_vocab_size"] == vd and shapes["lm_head.weight"] == (vd, h)
        assert shapes["d2t"] == (vd,) and shapes["t2d"] == (v,)
        assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]
        assert shapes["layers.0.self_attn.q_proj.weight"][1] == 2 * h


def test_required_config_keys_cover_the_notes():
    dspark = {"block_size", "target_layer_ids", "mask_token_id", "num_target_layers", "markov_rank",
              "markov_head_type", "enable_confidence_head", "confidence_head_with_markov"}
    assert dspark <= set(REQUIRED_CONFIG_KEYS["DSPARK"])
    assert {"dflash_config.mask_token_id", "dflash_config.target_layer_ids"} <= set(REQUIRED_CONFIG_KEYS["DFLASH"])
    assert {"draft_vocab_size", "eagle_config.eagle_aux_hidden_state_layer_ids"} <= set(REQUIRED_CONFIG_KEYS["EAGLE3"])


def test_partial_tensor_sets_are_refused(checkpoints):
    trained = read_checkpoint(checkpoints["dspark_vanilla"])
    serving, config, tensors = prepare(trained, "bfloat16")
    required = required_tensors(serving, trained.config)
    missing = {k: v for k, v in tensors.items() if not k.startswith("confidence_head.")}
    with pytest.raises(IncompleteExportError, match=r"missing \['confidence_head.proj.bias'"):
        check_tensors(serving, missing, required)
    extra = {**tensors, "lm_head.weight": torch.zeros(256, 64)}
    with pytest.raises(IncompleteExportError, match=r"unexpected \['lm_head.weight'\]"):
        check_tensors(serving, extra, required)
    wrong = {**tensors, "fc.weight": torch.zeros(64, 64)}
    with pytest.raises(IncompleteExportError, match=r"fc.weight \(64, 64\) \(expected \(64, 128\)\)"):
        check_tensors(serving, wrong, required)
    with pytest.raises(IncompleteExportError, match=r"missing keys \['mask_token_id'\].*forbidden keys \['auto_map'\]"):
        check_config(serving, {**{k: v for k, v in config.items() if k != "mask_token_id"}, "auto_map": {}})


def test_embedding_layer_id_is_refused_with_the_fix(checkpoints):
    trained = read_checkpoint(checkpoints["dspark_vanilla"])
    cfg = dataclasses.replace(trained.config, target_layer_ids=[-1, 2])
    with pytest.raises(ValueError, match=r"target_layer_ids=\[-1, 2\] contains -1.*ids >= 0"):
        prepare(TrainedDrafter(cfg, trained.state_dict, trained.target_config), "bfloat16")


def test_dspark_without_markov_head_is_refused(checkpoints):
    trained = read_checkpoint(checkpoints["dspark_vanilla"])
    cfg = dataclasses.replace(trained.config, markov_rank=0, enable_confidence_head=False)
    with pytest.raises(ValueError, match="markov_rank=0.*requires a Markov head"):
        prepare(TrainedDrafter(cfg, trained.state_dict, trained.target_config), "bfloat16")


def test_zlab_dspark_exports_sample_from_anchor_false(checkpoints, tmp_path):
    trained = read_checkpoint(checkpoints["dspark_vanilla"])
    cfg = dataclasses.replace(trained.config, block_layout="zlab")
    _, config, _ = prepare(TrainedDrafter(cfg, trained.state_dict, trained.target_config), "bfloat16")
    assert config["sample_from_anchor"] is False and config["block_size"] == cfg.block_size


@pytest.mark.parametrize("change", [{"norm_style": "sandwich"}, {"v_norm": True}, {"layer_scalar": True}])
def test_gemma_style_layers_are_refused(change, checkpoints):
    trained = read_checkpoint(checkpoints["dspark_vanilla"])
    cfg = dataclasses.replace(trained.config, **change)
    with pytest.raises(ValueError, match=f"{next(iter(change))}=.*Qwen3/Llama layers only"):
        prepare(TrainedDrafter(cfg, trained.state_dict, trained.target_config), "bfloat16")
