"""`eval EXPORT_DIR`: the validate measurement for an exported drafter, through the command line; exports its users
could not load, or built for another target, are refused before any decoding."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

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


def _eval_args(export: Path, out: Path, **target_overrides) -> list[str]:
    target = {**TINY_TARGET["tiny"], **target_overrides}
    return ["eval", str(export), "--target.tiny", json.dumps(target), "--suites", '["random"]', "--max_samples", "2",
            "--max_new_tokens", "4", "--temperature", "0", "--output_dir", str(out)]


@pytest.fixture(scope="module")
def hf_export(checkpoints, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "dspark-hf"
    main(["export", "--ckpt", str(checkpoints["dspark_vanilla"]), "--format", "hf", "--out", str(out)])
    return out


def _copy(export: Path, tmp_path: Path, name: str) -> Path:
    shutil.copytree(export, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("missing", ["modeling_dspark_lightning.py", "drafter_dspark.py", "drafter_layers.py"])
def test_eval_refuses_an_export_without_its_remote_code(hf_export, tmp_path, missing):
    export = _copy(hf_export, tmp_path, f"no-{missing.removesuffix('.py')}")
    (export / missing).unlink()
    with pytest.raises(FileNotFoundError, match=rf"lacks the remote code \['{missing}'\] that "
                                                r"AutoModel.from_pretrained\(\.\.\., trust_remote_code=True\) imports"):
        main([*_eval_args(export, tmp_path / "eval"), "--debug"])
    assert not (tmp_path / "eval").exists()  # refused before any decoding


def test_eval_names_a_truncated_weights_file(hf_export, tmp_path):
    export = _copy(hf_export, tmp_path, "truncated")
    weights = export / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{weights} is not a complete safetensors file .*truncated or corrupted"):
        main([*_eval_args(export, tmp_path / "eval"), "--debug"])


def test_eval_refuses_a_target_of_another_geometry(hf_export, tmp_path):
    with pytest.raises(ValueError, match=r"was trained for another target than the tiny target: hidden_size: the "
                                         r"drafter's target has 64, this target 32"):
        main([*_eval_args(hf_export, tmp_path / "eval", hidden_size=32, head_dim=8), "--debug"])
    with pytest.raises(ValueError, match=r"num_hidden_layers: the drafter's target has 4, this target 2"):
        main([*_eval_args(hf_export, tmp_path / "eval", num_hidden_layers=2), "--debug"])
    assert not (tmp_path / "eval").exists()


def test_eval_loads_an_hf_export_as_its_users_do(hf_export, tmp_path):
    export = _copy(hf_export, tmp_path, "broken-wrapper")
    modeling = export / "modeling_dspark_lightning.py"
    modeling.write_text(modeling.read_text().replace("self.post_init()", "raise RuntimeError('broken wrapper')"))
    with pytest.raises(ValueError, match=r"AutoModel.from_pretrained\(.*broken-wrapper', trust_remote_code=True\) "
                                         r"fails \(RuntimeError: broken wrapper\)"):
        main([*_eval_args(export, tmp_path / "eval"), "--debug"])
    main([*_eval_args(export, tmp_path / "eval"), "--trust_remote_code", "false"])  # our own loader still reads it
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["suites"]["random"]["num_samples"] == 2
