"""`eval EXPORT_DIR`: the validate measurement for an exported drafter, through the command line."""

from __future__ import annotations

import json

from dspark_lightning.cli import main

from .conftest import TINY_TARGET


def test_eval_command_measures_an_hf_export(checkpoints, tmp_path):
    out = tmp_path / "export"
    main(["export", "--ckpt", str(checkpoints["dspark_vanilla"]), "--format", "hf", "--out", str(out)])
    target = TINY_TARGET["tiny"]
    args = ["eval", str(out), "--target.seed", str(TINY_TARGET["seed"]), "--suites", '["random"]',
            "--max_samples", "4", "--max_new_tokens", "12", "--batch_size", "2", "--temperature", "0",
            "--output_dir", str(tmp_path / "eval")]
    args += ["--target.tiny", json.dumps(target)]
    main(args)
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    suite = report["suites"]["random"]
    assert report["temperature"] == 0 and suite["num_samples"] == 4
    assert suite["tau"] >= 1.0 and suite["num_rounds"] > 0
    assert (tmp_path / "eval" / "report.md").is_file()
