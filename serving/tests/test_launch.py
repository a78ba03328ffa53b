"""Command construction of dspark_sglang.launch (no SGLang import, no server start)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import tiny_exports

from dspark_sglang.export_dir import ExportError
from dspark_sglang.launch import build_command, main

PY = "python"
SERVER = [PY, "-m", "sglang.launch_server"]


def test_dspark_static(exports: Path) -> None:
    cmd = build_command(exports / "dspark_vanilla", "Qwen/Qwen3-8B", python=PY)
    assert cmd.argv == SERVER + [
        "--model-path", "Qwen/Qwen3-8B", "--speculative-draft-model-path", str(exports / "dspark_vanilla"),
        "--speculative-algorithm", "DSPARK", "--speculative-dspark-block-size", "4",
        "--speculative-num-draft-tokens", "5", "--dtype", "bfloat16",
    ]  # fmt: skip
    assert cmd.env == {"SGLANG_RAGGED_VERIFY_MODE": "static"}
    assert cmd.shell().startswith("SGLANG_RAGGED_VERIFY_MODE=static python -m sglang.launch_server --model-path")


def test_dspark_compact_with_sps_and_export_sts(exports: Path, tmp_path: Path) -> None:
    table = tmp_path / "sps.json"  # SGLang's SpsCostTable format, as profile-sps --format sglang writes it
    table.write_text(json.dumps({"sample_batch_tokens": [5, 10], "sample_steps_per_sec": [90.0, 50.0],
                                 "max_batch_tokens": 10, "device": "NVIDIA H200"}))
    cmd = build_command(exports / "dspark_sts", "T", mode="compact", sps_table=table, python=PY)
    assert cmd.env == {"SGLANG_RAGGED_VERIFY_MODE": "compact"}
    args = cmd.argv
    assert args[args.index("--speculative-dspark-sps-table-path") + 1] == str(table)
    sts = args[args.index("--speculative-dspark-confidence-sts-path") + 1]
    assert sts == str(exports / "dspark_sts" / "calibration.json")


def test_compact_without_sps_table_warns(exports: Path) -> None:
    cmd = build_command(exports / "dspark_vanilla", "T", mode="compact", python=PY)
    assert "--speculative-dspark-sps-table-path" not in cmd.argv
    assert any("verify-all" in n for n in cmd.notes)


def test_compact_needs_confidence_head(exports: Path) -> None:
    with pytest.raises(ExportError, match="enable_confidence_head false or missing"):
        build_command(exports / "dspark_no_confidence", "T", mode="compact", python=PY)


def test_static_mode_does_not_pass_calibration(exports: Path) -> None:
    cmd = build_command(exports / "dspark_sts", "T", mode="static", sts="x.json", python=PY)
    assert "--speculative-dspark-confidence-sts-path" not in cmd.argv


def test_dflash_uses_block_size_as_window(exports: Path) -> None:
    cmd = build_command(exports / "dflash_zlab", "T", python=PY)
    assert cmd.argv[cmd.argv.index("--speculative-algorithm") + 1] == "DFLASH"
    assert cmd.argv[cmd.argv.index("--speculative-num-draft-tokens") + 1] == "8"
    assert cmd.env == {}
    with pytest.raises(ExportError, match="DSpark exports only"):
        build_command(exports / "dflash_zlab", "T", mode="compact", python=PY)


def test_eagle3_is_served_as_the_chain_it_was_trained_for(exports: Path, tmp_path: Path) -> None:
    """ttt_length 4: 4 steps, top-k 1, 5 draft tokens (SGLang's own choice for a Llama target is 5 / 4 / 8)."""
    cmd = build_command(exports / "eagle3", "meta-llama/Llama-3.1-8B-Instruct", python=PY)
    assert cmd.argv[cmd.argv.index("--speculative-algorithm"):] == [
        "--speculative-algorithm", "EAGLE3", "--speculative-num-steps", "4", "--speculative-eagle-topk", "1",
        "--speculative-num-draft-tokens", "5", "--dtype", "bfloat16"]
    other = build_command(tiny_exports.write_eagle3(tmp_path / "e3", ttt_length=None), "T", python=PY)
    assert "--speculative-num-steps" not in other.argv and any("no ttt_length" in n for n in other.notes)


def test_float32_export_passes_dtype(exports: Path, tmp_path: Path) -> None:
    """SGLang's --dtype auto serves a float32 config as float16."""
    path = tiny_exports.write_dflash_zlab(tmp_path / "fp32")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32"}))
    cmd = build_command(path, "T", python=PY)
    assert cmd.argv[-2:] == ["--dtype", "float32"]


def test_sps_table_must_be_sglangs_format(exports: Path, tmp_path: Path) -> None:
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps({"num_tokens": [5, 10], "steps_per_second": [90.0, 50.0]}))
    with pytest.raises(ExportError, match=r"dspark_lightning's own format .* profile-sps ... --format sglang"):
        build_command(exports / "dspark_vanilla", "T", mode="compact", sps_table=ours, python=PY)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"sample_batch_tokens": [10, 5], "sample_steps_per_sec": [1.0, 2.0],
                                  "max_batch_tokens": 10}))
    with pytest.raises(ExportError, match="strictly increasing"):
        build_command(exports / "dspark_vanilla", "T", mode="compact", sps_table=broken, python=PY)


def test_sts_file_must_have_gamma_temperatures(exports: Path, tmp_path: Path) -> None:
    sts = tmp_path / "sts.json"
    sts.write_text(json.dumps({"temperatures": [1.0, 2.0]}))
    with pytest.raises(ExportError, match="has 2 temperatures; the drafter proposes gamma=4 tokens"):
        build_command(exports / "dspark_vanilla", "T", mode="compact", sts=sts, python=PY)


def test_missing_plugin_is_named_before_sglang_starts(exports: Path, tmp_path: Path, monkeypatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Without the plugin SGLang says only 'Cannot find model module'; the launcher says what to install."""
    drafter = str(exports / "dspark_llama")
    assert main(["--target", "T", "--drafter", drafter, "--python", sys.executable, "--dry-run"]) == 0
    capsys.readouterr()
    bare = tmp_path / "python-without-site"  # this interpreter without site-packages: no entry points
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -I -S \"$@\"\n")
    bare.chmod(0o755)
    assert main(["--target", "T", "--drafter", drafter, "--python", str(bare), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "has no 'dspark_lightning' sglang.srt.plugins entry point" in err
    assert "pip install ./serving" in err and "Cannot find model module" in err
    monkeypatch.setenv("SGLANG_PLUGINS", "someone_else")
    assert main(["--target", "T", "--drafter", drafter, "--python", sys.executable, "--dry-run"]) == 2
    assert "SGLANG_PLUGINS='someone_else' does not include 'dspark_lightning'" in capsys.readouterr().err


def test_extra_args_override(exports: Path) -> None:
    cmd = build_command(exports / "dspark_vanilla", "T", extra=["--speculative-num-draft-tokens=5", "--tp", "2"],
                        python=PY)
    assert cmd.argv.count("--speculative-num-draft-tokens") == 0
    assert cmd.argv[-3:] == ["--speculative-num-draft-tokens=5", "--tp", "2"]
    assert any("taken from the extra arguments" in n for n in cmd.notes)


def test_attached_subfolder(exports: Path) -> None:
    cmd = build_command(exports / "attached", None, python=PY)
    assert cmd.argv[3:5] == ["--model-path", str(exports / "attached")]
    assert "--speculative-draft-model-path" not in cmd.argv  # SGLang finds dspark/ itself
    other = build_command(exports / "attached", "/copies/target", python=PY)
    assert other.argv[other.argv.index("--speculative-draft-model-path") + 1] == str(exports / "attached" / "dspark")


def test_attached_config_only_for_deepseek_v4(tmp_path: Path) -> None:
    config = tiny_exports.target_config() | {"dspark_block_size": 5, "dspark_markov_rank": 256}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="only for DeepseekV4ForCausalLM"):
        build_command(tmp_path, None, python=PY)
    config["architectures"] = ["DeepseekV4ForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    cmd = build_command(tmp_path, None, python=PY)
    assert cmd.argv[3:] == ["--model-path", str(tmp_path), "--speculative-algorithm", "DSPARK",
                            "--speculative-dspark-block-size", "5", "--speculative-num-draft-tokens", "6",
                            "--dtype", "bfloat16"]


def test_plugin_architecture_is_noted(exports: Path) -> None:
    cmd = build_command(exports / "dspark_llama", "HuggingFaceTB/SmolLM2-135M-Instruct", python=PY)
    assert any("dspark_sglang plugin" in n for n in cmd.notes)


def test_draft_dir_needs_target(exports: Path) -> None:
    with pytest.raises(ExportError, match="pass the target model with --target"):
        build_command(exports / "dspark_vanilla", None, python=PY)


def test_main_dry_run_prints_command(exports: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--target", "T", "--drafter", str(exports / "dspark_vanilla"), "--mode", "compact", "--dry-run",
               "--python", PY, "--", "--port", "30001"])
    out = capsys.readouterr()
    assert rc == 0
    assert out.out.strip().endswith("--speculative-num-draft-tokens 5 --dtype bfloat16 --port 30001")
    assert out.out.startswith("SGLANG_RAGGED_VERIFY_MODE=compact python -m sglang.launch_server")
    assert "verify-all" in out.err


def test_main_reports_bad_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--target", "T", "--drafter", str(tmp_path), "--dry-run"]) == 2
    assert "has no config.json" in capsys.readouterr().err
