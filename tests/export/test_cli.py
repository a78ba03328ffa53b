"""The command lines: ``export``, ``import-deepspec`` and ``push`` through ``dspark_lightning.cli.main`` (jsonargparse
turns the typed signatures into options), run in-process."""

from __future__ import annotations

import json

import pytest

from dspark_lightning.cli import main
from dspark_lightning.export import load_drafter


def test_export_command(checkpoints, original, same_outputs, tmp_path):
    out = tmp_path / "sglang"
    main(["export", "--ckpt", str(checkpoints["dspark_cli"]), "--format", "sglang", "--out", str(out),
          "--dtype", "float32", "--base_model", "Qwen/Qwen3-4B"])
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen3DSparkModel"]
    assert "base_model: Qwen/Qwen3-4B" in (out / "README.md").read_text()
    with pytest.raises(FileExistsError):  # --debug: the exception itself rather than the one-line message
        main(["export", "--ckpt", str(checkpoints["dspark_cli"]), "--format", "sglang", "--out", str(out), "--debug"])
    main(["export", "--ckpt", str(checkpoints["dspark_cli"]), "--format", "hf", "--out", str(out),
          "--dtype", "float32", "--overwrite", "true"])
    same_outputs(original(checkpoints["dspark_cli"]), load_drafter(out))


def test_export_command_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        main(["export", "--ckpt", str(tmp_path / "missing.ckpt"), "--format", "hf", "--out", str(tmp_path / "o"),
              "--debug"])


def test_help_documents_every_option(capsys):
    for command, options in [("export", ["--ckpt", "--format", "--calibration", "--report", "--target_dir",
                                         "--attached_layout", "--overwrite", "{hf,deepspec,sglang,attached}"]),
                             ("import-deepspec", ["deepspec_dir", "--out", "--target"]),
                             ("push", ["folder", "--repo_id", "--revision", "--private", "--commit_message",
                                       "--dry_run"])]:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        for option in options:
            assert option in text, (command, option)


def test_import_and_push_commands(checkpoints, tmp_path, capsys):
    deepspec = tmp_path / "deepspec"
    main(["export", "--ckpt", str(checkpoints["dspark_vanilla"]), "--format", "deepspec", "--out", str(deepspec)])
    ckpt = tmp_path / "imported.ckpt"
    main(["import-deepspec", str(deepspec), "--out", str(ckpt)])
    assert ckpt.is_file()
    main(["push", str(deepspec), "--repo_id", "me/drafter", "--dry_run", "true"])
    assert "upload_folder" in capsys.readouterr().out
    with pytest.raises(ValueError, match="Invalid --repo_id 'not valid'"):
        main(["push", str(deepspec), "--repo_id", "not valid", "--dry_run", "true", "--debug"])
