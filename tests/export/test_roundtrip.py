"""Round trips per drafter and layout: export -> load (ours; AutoModel with remote code for hf) -> identical
forward logits, confidences and T=0 proposals; and the refusals of layouts that cannot hold a drafter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dspark_lightning.export import detect_format, export_checkpoint, load_drafter

ALL = ("dspark_vanilla", "dspark_gated", "dspark_rnn", "dflash_deepspec", "dflash_zlab", "eagle3_full",
       "eagle3_full_llama_style", "eagle3_reduced")
DEEPSPEC = ("dspark_vanilla", "dspark_gated", "dspark_rnn", "dflash_deepspec", "eagle3_full")
SGLANG = ("dspark_vanilla", "dspark_gated", "dspark_rnn", "dflash_deepspec", "dflash_zlab", "eagle3_full_llama_style",
          "eagle3_reduced")


def _export(checkpoints, variant: str, fmt: str, out: Path, **kw) -> Path:
    export_checkpoint(ckpt=str(checkpoints[variant]), format=fmt, out=str(out), dtype="float32", **kw)
    return out


@pytest.mark.parametrize("variant", ALL)
def test_hf_round_trip_ours_and_automodel(variant, checkpoints, original, same_outputs, same_weights, tmp_path):
    from transformers import AutoModel

    out = _export(checkpoints, variant, "hf", tmp_path / variant)
    assert detect_format(out) == "hf"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "dspark_lightning" and config["architectures"] == ["DSparkLightningDrafter"]
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel"}
    reference = original(checkpoints[variant])
    ours = load_drafter(out)
    same_weights(reference, ours)
    same_outputs(reference, ours)
    hub = AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    assert type(hub).__module__.startswith("transformers_modules")  # the shipped copy, not our package
    same_weights(reference, hub.drafter)
    same_outputs(reference, hub.drafter)


@pytest.mark.parametrize("variant", DEEPSPEC)
def test_deepspec_round_trip(variant, checkpoints, original, same_outputs, tmp_path):
    out = _export(checkpoints, variant, "deepspec", tmp_path / variant)
    assert detect_format(out) == "deepspec"
    config = json.loads((out / "config.json").read_text())
    reference = original(checkpoints[variant])
    loaded = load_drafter(out)
    assert loaded.config == reference.config  # exported_by restores fields DeepSpec cannot express
    same_outputs(reference, loaded)
    # DeepSpec's own keys: target config + draft keys, frozen embed/lm_head shipped.
    assert config["num_target_layers"] == 4 and config["tie_word_embeddings"] is False
    assert config["num_hidden_layers"] == reference.config.num_hidden_layers
    if variant.startswith("eagle3"):
        assert config["architectures"] == ["Qwen3Eagle3Model"] and config["ttt_length"] == 4
        assert config["draft_num_hidden_layers"] == 1
    else:
        assert config["architectures"] == ["Qwen3DSparkModel"] and config["block_size"] == 4
        has_markov = variant.startswith("dspark")
        assert config["markov_rank"] == (16 if has_markov else 0)
        assert ("markov_head_type" in config) == has_markov
        assert ("confidence_head_with_markov" in config) == config["enable_confidence_head"]


@pytest.mark.parametrize("variant", SGLANG)
def test_sglang_round_trip_with_target_vocab(variant, checkpoints, original, same_outputs, tiny_target_dir, tmp_path):
    out = _export(checkpoints, variant, "sglang", tmp_path / variant)
    assert detect_format(out) == "sglang"
    with pytest.raises(ValueError, match="target_dir"):
        load_drafter(out)  # no embedding / head shipped: the target's are needed
    reference = original(checkpoints[variant])
    loaded = load_drafter(out, target_dir=tiny_target_dir)
    assert loaded.config == reference.config
    same_outputs(reference, loaded)


def test_default_bf16_export_holds_the_cast_weights(checkpoints, original, outputs, tmp_path):
    out = tmp_path / "bf16"
    export_checkpoint(ckpt=str(checkpoints["dspark_rnn"]), format="hf", out=str(out))
    reference = original(checkpoints["dspark_rnn"])
    loaded = load_drafter(out)
    for name, tensor in reference.state_dict().items():
        assert loaded.state_dict()[name].dtype == torch.bfloat16
        assert torch.equal(loaded.state_dict()[name], tensor.to(torch.bfloat16)), name
    ref, got = outputs(reference), outputs(loaded)
    torch.testing.assert_close(got["logits"].float(), ref["logits"], atol=0.05, rtol=0.05)


@pytest.mark.parametrize(
    ("variant", "fmt", "message"),
    [
        ("dflash_zlab", "deepspec", "block_layout='zlab'"),
        ("eagle3_reduced", "deepspec", "draft_vocab_size=96"),
        ("eagle3_full", "sglang", "qk_norm=True"),
        ("dflash_zlab", "attached", "needs a DSpark drafter"),
    ],
)
def test_layouts_refuse_drafters_they_cannot_hold(variant, fmt, message, checkpoints, tiny_target_dir, tmp_path):
    out = tmp_path / "out"
    kw = {"target_dir": str(tiny_target_dir)} if fmt == "attached" else {}
    with pytest.raises(ValueError, match=message):
        _export(checkpoints, variant, fmt, out, **kw)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_card_carries_report_calibration_and_training_config(checkpoints, tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"temperature": 1.0, "drafter": "dspark", "macro_tau": 3.21, "suites": {
        "gsm8k": {"tau": 3.5, "accept_rate": [0.9, 0.7, 0.5, 0.3], "num_rounds": 120},
        "mt-bench": {"tau": 2.92, "accept_rate": [0.8, 0.6, 0.4, 0.2], "num_rounds": 80}}}))
    sts = tmp_path / "sts.json"
    sts.write_text(json.dumps({"temperatures": [1.0, 1.1, 1.2, 1.3]}))
    out = tmp_path / "card"
    export_checkpoint(ckpt=str(checkpoints["dspark_cli"]), format="sglang", out=str(out), report=str(report),
                      calibration=str(sts), base_model="Qwen/Qwen3-4B")
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    for line in ("base_model: Qwen/Qwen3-4B", "library_name: sglang", "license: apache-2.0", "- speculative-decoding"):
        assert line in front
    assert "| gsm8k | 3.500 | 120 | 0.900 | 0.700 | 0.500 | 0.300 |" in card and "**3.210**" in card
    assert "--speculative-algorithm DSPARK" in card and "--speculative-num-draft-tokens 5" in card
    assert "--speculative-dspark-confidence-sts-path <this repo>/calibration.json" in card
    assert "class_path: dspark_lightning.data.online.RandomTokensDataModule" in card  # the exact CLI config
    assert json.loads((out / "calibration.json").read_text()) == {"temperatures": [1.0, 1.1, 1.2, 1.3]}
    assert (out / "validation_report.json").is_file() and (out / "training_config.yaml").is_file()


@pytest.mark.parametrize(
    ("payload", "option", "message"),
    [
        ({"suites": {}}, "report", "no 'suites'"),
        ({"drafter": "eagle3", "suites": {"a": {"tau": 2.0}}}, "report", "measured a 'eagle3' drafter"),
        ({"temperatures": [1.0, 2.0]}, "calibration", "must be 4 positive numbers"),
    ],
)
def test_bad_report_or_calibration_is_refused(payload, option, message, checkpoints, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=message):
        export_checkpoint(ckpt=str(checkpoints["dspark_vanilla"]), format="hf", out=str(tmp_path / "o"),
                          **{option: str(bad)})
