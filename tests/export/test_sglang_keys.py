"""Key sets of the SGLang exports against the lists of what SGLang 0.5.23 loads (``python/sglang/srt/models/``).

The expected names are spelled out here for the tiny configs, from those loaders, not computed by the exporter; the
serving tests (serving/tests/test_our_exports.py) check exports of the CLI against the real SGLang package.
Also: the two adaptations of the exporter -- the dspark_sglang plugin class for drafters without q/k norm
(Llama-family targets) and the all-zero rank-1 Markov head for head-less block drafters served by DSPARK.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dspark_lightning.export import export_checkpoint, load_drafter
from dspark_lightning.export.checkpoint import TrainedDrafter, instantiate, read_checkpoint
from dspark_lightning.export.exporter import write_export
from dspark_lightning.export.sglang import (
    REQUIRED_CONFIG_KEYS,
    IncompleteExportError,
    check_config,
    check_servable,
    check_tensors,
    drafter_tensors,
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
    "dflash_deepspec": ("DSPARK", BACKBONE + MARKOV),  # served by DSPARK with the zero rank-1 Markov head
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
    assert "qk_norm" not in config  # Qwen3 target: the upstream classes, exactly as before the plugin existed
    if serving == "DSPARK":
        assert config["architectures"] == ["Qwen3DSparkModel"] and config["block_size"] == cfg.block_size
        assert config["target_layer_ids"] == [0, 2] and config["num_target_layers"] == 4
        assert config["mask_token_id"] == 255 and config["num_hidden_layers"] == 1
        assert config["sample_from_anchor"] is True
        if variant == "dflash_deepspec":
            assert config["markov_rank"] == 1 and config["markov_head_type"] == "vanilla"
            assert config["enable_confidence_head"] is False and config["confidence_head_with_markov"] is False
            assert shapes["markov_head.markov_w1.weight"] == shapes["markov_head.markov_w2.weight"] == (v, 1)
            with safe_open(str(out / "model.safetensors"), framework="pt") as f:
                assert all(not f.get_tensor(n).any() for n in MARKOV)  # bias exactly 0
            return
        assert config["markov_rank"] == 16 and config["markov_head_type"] == cfg.markov_head_type
        assert config["enable_confidence_head"] is True
        assert config["confidence_head_with_markov"] == (variant != "dspark_rnn")
        assert shapes["confidence_head.proj.weight"] == (1, h + (16 if variant != "dspark_rnn" else 0))
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


def test_headless_dspark_gets_the_zero_markov_head_and_reads_back(checkpoints, tiny_target_dir, same_outputs,
                                                                   tmp_path):
    trained = read_checkpoint(checkpoints["dspark_rnn"])  # its confidence head reads h_k only: [1, H]
    cfg = dataclasses.replace(trained.config, markov_rank=0)
    reference = instantiate(cfg, {k: v for k, v in trained.state_dict.items() if not k.startswith("markov_head.")})
    headless = TrainedDrafter(cfg, reference.state_dict(), trained.target_config)
    serving, config, tensors = prepare(headless, "float32")
    assert serving == "DSPARK" and config["markov_rank"] == 1 and config["markov_head_type"] == "vanilla"
    assert config["enable_confidence_head"] is True and config["confidence_head_with_markov"] is False
    assert tensors["confidence_head.proj.weight"].shape == (1, cfg.hidden_size)
    assert not tensors["markov_head.markov_w1.weight"].any() and not tensors["markov_head.markov_w2.weight"].any()
    out = tmp_path / "headless"
    write_export(headless, fmt="sglang", out=out, dtype="float32")
    loaded = load_drafter(out, target_dir=tiny_target_dir)
    assert loaded.config == cfg and not loaded.config.has_markov_head
    same_outputs(reference, loaded)
    # An attached copy is not adapted: it still refuses (export/attached.py calls check_servable directly).
    with pytest.raises(ValueError, match="markov_rank=0.*requires a Markov head"):
        check_servable(cfg)


def test_a_nonzero_markov_head_of_a_headless_config_is_not_dropped(checkpoints):
    cfg = read_checkpoint(checkpoints["dflash_deepspec"]).config
    zero = {"markov_head.markov_w1.weight": torch.zeros(256, 1), "markov_head.markov_w2.weight": torch.zeros(256, 1)}
    assert drafter_tensors(cfg, {"fc.weight": torch.ones(1), **zero}) == {"fc.weight": torch.ones(1)}
    with pytest.raises(ValueError, match="not that all-zero head"):
        drafter_tensors(cfg, {**zero, "markov_head.markov_w2.weight": torch.ones(256, 1)})


def _llama_style(trained: TrainedDrafter, **change) -> TrainedDrafter:
    """``trained`` as if its target were a Llama model: no q/k norm (the family default), target model_type llama."""
    cfg = dataclasses.replace(trained.config, qk_norm=False, target_model_type="llama", **change)
    state = {k: v for k, v in trained.state_dict.items() if not k.endswith(("q_norm.weight", "k_norm.weight"))}
    target = {**trained.target_config, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    return TrainedDrafter(cfg, state, target)


@pytest.mark.parametrize(("variant", "serving", "architecture"), [
    ("dspark_gated", "DSPARK", "DSparkLightningDraftModel"),
    ("dflash_zlab", "DFLASH", "DFlashLightningDraftModel"),
    ("dflash_deepspec", "DSPARK", "DSparkLightningDraftModel"),
])
def test_llama_family_drafters_select_the_plugin_class(variant, serving, architecture, checkpoints, tiny_target_dir,
                                                       same_outputs, tmp_path, caplog):
    trained = _llama_style(read_checkpoint(checkpoints[variant]))
    got, config, tensors = prepare(trained, "float32")
    assert got == serving and config["architectures"] == [architecture] and config["qk_norm"] is False
    assert config["model_type"] == "llama"
    assert not any(k.endswith(("q_norm.weight", "k_norm.weight")) for k in tensors)
    assert {k: tuple(t.shape) for k, t in tensors.items()} == required_tensors(serving, trained.config)
    assert required_tensors(serving, trained.config).keys() == {
        k for k in required_tensors(serving, read_checkpoint(checkpoints[variant]).config)
        if not k.endswith(("q_norm.weight", "k_norm.weight"))}
    out = tmp_path / variant
    with caplog.at_level("WARNING", logger="dspark_lightning.export.sglang"):
        write_export(trained, fmt="sglang", out=out, dtype="float32")
    assert f"{architecture}" in caplog.text and "pip install ./serving" in caplog.text
    card = (out / "README.md").read_text()
    assert "dspark_sglang plugin" in card and "pip install ./serving" in card
    if variant == "dflash_deepspec":
        assert "all-zero rank-1 vanilla Markov head" in card and "SGLANG_RAGGED_VERIFY_MODE=static" in card
    reference = instantiate(trained.config, trained.state_dict)
    loaded = load_drafter(out, target_dir=tiny_target_dir)
    assert loaded.config == trained.config
    same_outputs(reference, loaded)
    # An attached copy is not adapted: it still refuses.
    with pytest.raises(ValueError, match="qk_norm=False"):
        check_servable(trained.config)


def test_qwen3_exports_need_no_plugin(checkpoints, tmp_path, caplog):
    out = tmp_path / "qwen3"
    with caplog.at_level("WARNING", logger="dspark_lightning.export.sglang"):
        export_checkpoint(ckpt=str(checkpoints["dspark_vanilla"]), format="sglang", out=str(out))
    assert "plugin" not in caplog.text and "plugin" not in (out / "README.md").read_text()


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
