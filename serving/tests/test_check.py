"""dspark_sglang.check against the installed SGLang 0.5.23: good exports pass, broken ones fail by name."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_exports
import torch
from safetensors.torch import load_file, save_file

from dspark_sglang.check import Report, check_export

GOOD = {
    # export dir: (algorithm, draft class, worker, --speculative-num-draft-tokens); Eagle3: ttt_length 4 + 1
    "dspark_vanilla": ("DSPARK", "Qwen3DSparkModel", "DSparkWorkerV2", 5),
    "dspark_gated": ("DSPARK", "Qwen3DSparkModel", "DSparkWorkerV2", 5),
    "dspark_rnn": ("DSPARK", "Qwen3DSparkModel", "DSparkWorkerV2", 5),
    "dspark_conf_no_markov_features": ("DSPARK", "Qwen3DSparkModel", "DSparkWorkerV2", 5),
    "dspark_no_confidence": ("DSPARK", "Qwen3DSparkModel", "DSparkWorkerV2", 5),
    "dspark_zlab_layout": ("DSPARK", "Qwen3DSparkModel", "DSparkWorkerV2", 5),
    "dspark_no_markov": ("DSPARK", "Qwen3DSparkModel", "DSparkWorkerV2", 5),
    "dspark_sts": ("DSPARK", "Qwen3DSparkModel", "DSparkWorkerV2", 5),
    "dspark_llama": ("DSPARK", "DSparkLightningDraftModel", "DSparkWorkerV2", 5),
    "dflash_zlab": ("DFLASH", "DFlashDraftModel", "DFlashWorkerV2", 8),
    "dflash_llama": ("DFLASH", "DFlashLightningDraftModel", "DFlashWorkerV2", 8),
    "eagle3": ("EAGLE3", "LlamaForCausalLMEagle3", "EAGLEWorkerV2", 5),
    "eagle3_padded_vocab": ("EAGLE3", "LlamaForCausalLMEagle3", "EAGLEWorkerV2", 5),
    "attached": ("DSPARK", "Qwen3DSparkModel", "DSparkWorkerV2", 5),
    "dspark_smollm2": ("DSPARK", "DSparkLightningDraftModel", "DSparkWorkerV2", 8),
    "eagle3_smollm2": ("EAGLE3", "LlamaForCausalLMEagle3", "EAGLEWorkerV2", 5),
}


def _copy(exports: Path, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(exports / name, tmp_path / name))


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def _edit_tensors(path: Path, drop: tuple[str, ...] = (), **replace: torch.Tensor) -> None:
    file = path / "model.safetensors"
    tensors = {k: v for k, v in load_file(file).items() if not k.startswith(drop)}
    tensors.update(replace)
    save_file(tensors, file)


def _problems(report: Report) -> str:
    return "\n".join(report.problems)


@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_export_passes(exports: Path, name: str) -> None:
    algorithm, draft_class, worker, num_draft_tokens = GOOD[name]
    report = check_export(exports / name)
    assert report.ok, report.render()
    assert (report.algorithm, report.worker, report.num_draft_tokens) == (algorithm, worker, num_draft_tokens)
    assert report.draft_class.endswith("." + draft_class)
    assert report.tensors_checked > 10
    assert report.gamma == num_draft_tokens - 1
    if algorithm == "DSPARK":
        notes = "\n".join(report.notes)
        assert "Markov bias" in notes and "equals the reference" in notes
        assert report.modes == (["static"] if name == "dspark_no_confidence" else ["static", "compact"])
        if name != "dspark_no_confidence":
            assert "confidence (without STS) equals the reference" in notes
        assert "write_target_hidden_kv (the DSpark prefill/commit KV injection) writes the reference K/V" in notes
    if algorithm != "EAGLE3":
        assert any("context K/V of all 2 draft layers equal the reference" in n for n in report.notes)


def test_sts_temperatures_are_checked(exports: Path) -> None:
    report = check_export(exports / "dspark_sts")
    assert any("with the export's STS temperatures" in n for n in report.notes), report.render()


def test_zero_markov_head_is_recognised(exports: Path) -> None:
    report = check_export(exports / "dspark_no_markov")
    assert any("Markov head is all zeros" in n for n in report.notes), report.render()


# ----------------------------------------------------------------------------------------------- broken exports
def test_nested_only_keys_fail(exports: Path, tmp_path: Path) -> None:
    """SpecForge's training template nests the head keys under dflash_config; SGLang reads them top level."""
    path = _copy(exports, "dspark_vanilla", tmp_path)
    config = json.loads((path / "config.json").read_text())
    keys = ("markov_rank", "markov_head_type", "enable_confidence_head", "confidence_head_with_markov",
            "mask_token_id", "target_layer_ids")
    config["dflash_config"] = {k: config.pop(k) for k in keys}
    (path / "config.json").write_text(json.dumps(config))
    report = check_export(path)
    assert not report.ok
    assert "'markov_rank' is only nested under dflash_config" in _problems(report)
    assert "markov_rank > 0" in _problems(report)  # SGLang itself then refuses to build the head


def test_missing_confidence_head_fails(exports: Path, tmp_path: Path) -> None:
    path = _copy(exports, "dspark_vanilla", tmp_path)
    _edit_tensors(path, drop=("confidence_head.",))
    report = check_export(path)
    assert not report.ok
    assert "confidence head is enabled but the checkpoint is missing" in _problems(report)
    assert "[compact]" in _problems(report) and "[static]" not in _problems(report)


def test_wrong_fc_shape_fails(exports: Path, tmp_path: Path) -> None:
    path = _copy(exports, "dspark_vanilla", tmp_path)
    fc = load_file(path / "model.safetensors")["fc.weight"]
    _edit_tensors(path, **{"fc.weight": fc[:, : tiny_exports.HIDDEN].contiguous()})
    report = check_export(path)
    assert not report.ok
    assert "fc.weight shape mismatch" in _problems(report)


def test_unknown_tensor_is_a_silent_skip(exports: Path, tmp_path: Path) -> None:
    path = _copy(exports, "dspark_vanilla", tmp_path)
    _edit_tensors(path, **{"layers.0.self_attn.v_norm.weight": torch.ones(tiny_exports.HEAD_DIM)})
    report = check_export(path)
    assert not report.ok
    assert "layers.0.self_attn.v_norm.weight (16,) has no parameter" in _problems(report)


def test_missing_backbone_tensor_fails(exports: Path, tmp_path: Path) -> None:
    path = _copy(exports, "dflash_zlab", tmp_path)
    _edit_tensors(path, drop=("layers.1.self_attn.v_proj.",))
    report = check_export(path)
    assert "layers.1.self_attn.qkv_proj.weight (128, 64) (2048 of 8192 values) not in the export" in _problems(report)


def test_llama_export_under_upstream_class_fails(exports: Path, tmp_path: Path) -> None:
    """No q/k norm in the export + an upstream class = SGLang would normalise q/k with its initial ones."""
    path = _copy(exports, "dspark_llama", tmp_path)
    _edit_config(path, architectures=["Qwen3DSparkModel"], qk_norm=None)
    report = check_export(path)
    assert not report.ok
    assert "the export has no q_norm/k_norm" in _problems(report)
    assert "DSparkLightningDraftModel" in _problems(report)


def test_markov_rank_zero_fails_with_the_fix(exports: Path, tmp_path: Path) -> None:
    path = tiny_exports.write_dspark(tmp_path / "r0", markov_rank=0, confidence_with_markov=False)
    report = check_export(path)
    assert not report.ok
    assert "all-zero rank-1 vanilla Markov head" in _problems(report)


def test_wrong_sts_length_fails(exports: Path, tmp_path: Path) -> None:
    path = _copy(exports, "dspark_sts", tmp_path)
    (path / "calibration.json").write_text(json.dumps({"temperatures": [1.0, 2.0]}))
    report = check_export(path)
    assert "calibration.json has 2 temperatures; SGLang requires gamma=4" in _problems(report)


def test_dflash_export_under_dspark_name_fails(exports: Path, tmp_path: Path) -> None:
    """A z-lab DFlash checkpoint relabelled as DSpark has no Markov head: SGLang's DSPARK refuses it."""
    path = _copy(exports, "dflash_zlab", tmp_path)
    _edit_config(path, architectures=["Qwen3DSparkModel"])
    report = check_export(path)
    assert not report.ok
    assert "markov_rank is 0 or missing" in _problems(report)


def test_eagle3_d2t_must_match_lm_head(exports: Path, tmp_path: Path) -> None:
    path = _copy(exports, "eagle3", tmp_path)
    d2t = load_file(path / "model.safetensors")["d2t"]
    _edit_tensors(path, d2t=d2t[:-1].contiguous())
    report = check_export(path)
    assert "d2t has 63 entries but lm_head.weight has 64 rows" in _problems(report)


def test_not_an_export(tmp_path: Path) -> None:
    report = check_export(tmp_path)
    assert not report.ok and "has no config.json" in _problems(report)


# ----------------------------------------------------------------------------------------------- command line
def test_cli_exit_codes(exports: Path, tmp_path: Path) -> None:
    """What the main project's tests do: run the check in the serving venv as a subprocess."""
    good = subprocess.run([sys.executable, "-m", "dspark_sglang.check", str(exports / "dspark_rnn"), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stdout + good.stderr
    assert json.loads(good.stdout)["ok"] is True
    broken = _copy(exports, "dspark_vanilla", tmp_path)
    _edit_tensors(broken, drop=("confidence_head.",))
    bad = subprocess.run([sys.executable, "-m", "dspark_sglang.check", str(broken)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    assert bad.stdout.startswith("FAIL") and "confidence head is enabled" in bad.stdout


def test_config_bundled_draft_needs_deepseek_v4(tmp_path: Path) -> None:
    config = tiny_exports.target_config() | {"dspark_block_size": 4, "dspark_markov_rank": 8,
                                              "dspark_noise_token_id": 250, "dspark_target_layer_ids": [0, 2]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    report = check_export(tmp_path)
    assert not report.ok
    assert "loads that form only for DeepseekV4ForCausalLM targets" in _problems(report)


# ----------------------------------------------------------------------- exports SGLang would serve other than trained
def test_dspark_export_labelled_dflash_fails(exports: Path, tmp_path: Path) -> None:
    """DFLASH's draft class has no Markov or confidence head: SGLang would drop both without a word."""
    path = _copy(exports, "dspark_vanilla", tmp_path)
    _edit_config(path, architectures=["DFlashDraftModel"])
    report = check_export(path)
    assert report.algorithm == "DFLASH" and not report.ok
    assert ("the export is a DSpark drafter (confidence_head and markov_head: 4 tensors) but config.json names "
            "architectures ['DFlashDraftModel']: SGLang serves it as DFLASH") in _problems(report)
    assert "markov_head.markov_w1.weight (256, 8) has no parameter in DFlashDraftModel" in _problems(report)


def test_eagle3_with_tied_embeddings_fails(exports: Path, tmp_path: Path) -> None:
    path = _copy(exports, "eagle3", tmp_path)
    _edit_config(path, tie_word_embeddings=True)
    report = check_export(path)
    assert not report.ok
    assert "tie_word_embeddings is true" in _problems(report)
    assert "drops the exported draft lm_head" in _problems(report)
    assert "lm_head.weight (64, 64) has no parameter in LlamaForCausalLMEagle3" in _problems(report)


def test_a_removed_q_norm_is_a_missing_tensor_not_a_missing_plugin(exports: Path, tmp_path: Path) -> None:
    path = _copy(exports, "dspark_vanilla", tmp_path)
    _edit_tensors(path, drop=("layers.1.self_attn.q_norm.",))
    report = check_export(path)
    assert not report.ok
    assert "layers.1.self_attn.q_norm.weight (16,) (16 of 16 values) not in the export: SGLang would serve its " \
           "initial values" in _problems(report)
    assert "plugin" not in _problems(report) and "DSparkLightningDraftModel" not in _problems(report)


def test_float32_export_is_served_in_float32(exports: Path, tmp_path: Path) -> None:
    """SGLang's --dtype auto serves a float32 config as float16; the launch flags (--dtype float32) must not."""
    path = _copy(exports, "dspark_vanilla", tmp_path)
    _edit_config(path, torch_dtype="float32")
    report = check_export(path)
    assert report.ok, report.render()
    assert "with SGLang's default --dtype auto this float32 export is served as float16; the export's command " \
           "passes --dtype float32" in "\n".join(report.notes)


def test_missing_plugin_says_what_to_install(exports: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sglang.srt.models.registry import ModelRegistry

    monkeypatch.delitem(ModelRegistry.models, "DSparkLightningDraftModel")
    report = check_export(exports / "dspark_llama")
    assert not report.ok
    assert "is a class of the dspark_sglang plugin, which this SGLang did not load" in _problems(report)
    assert "pip install ./serving" in _problems(report) and "Cannot find model module" in _problems(report)


def test_eagle3_without_a_trained_chain_length_gets_sglangs_defaults(exports: Path, tmp_path: Path) -> None:
    """An Eagle3 exported by others (no ttt_length): SGLang picks the chain (5 / 4 / 8 for a Llama target)."""
    path = tiny_exports.write_eagle3(tmp_path / "eagle3", ttt_length=None)
    report = check_export(path)
    assert report.ok, report.render()
    assert report.num_draft_tokens == 8
    assert "SGLang alone serves this Eagle3 with steps / top-k / draft tokens 5 / 4 / 8." in report.notes
    trained = check_export(exports / "eagle3")
    assert ("SGLang alone serves this Eagle3 with steps / top-k / draft tokens 5 / 4 / 8; the export's command "
            "passes the trained 4 / 1 / 5.") in trained.notes


# ----------------------------------------------------------------------------------------------- SPS tables
SGLANG_SPS = {"sample_batch_tokens": [5, 10, 20], "sample_steps_per_sec": [90.0, 80.0, 50.0], "max_batch_tokens": 20}


def test_sps_table_is_loaded_with_sglangs_loader(exports: Path, tmp_path: Path) -> None:
    good = tmp_path / "sps.json"
    good.write_text(json.dumps({**SGLANG_SPS, "device": "NVIDIA H200"}))  # extra keys: SGLang ignores them
    report = check_export(exports / "dspark_vanilla", sps_table=good)
    assert report.ok, report.render()
    assert "SPS table sps.json loads in SGLang (SpsCostTable, 3 probes up to 20 tokens)" in report.notes
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps({"num_tokens": [5, 10, 20], "steps_per_second": [90.0, 80.0, 50.0]}))
    bad = check_export(exports / "dspark_vanilla", sps_table=ours)
    assert "SGLang cannot load the SPS table" in _problems(bad) and "--format sglang" in _problems(bad)
    assert "dspark_sglang.launch refuses the export: SPS table" in _problems(bad)
