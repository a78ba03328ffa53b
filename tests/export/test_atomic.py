"""An export interrupted halfway leaves no directory that looks complete; existing outputs are protected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dspark_lightning.export import attached, export_checkpoint, exporter
from dspark_lightning.export.fileio import save_tensors


def _fail_midway(real):
    def save_then_fail(tensors, path, metadata=None):
        real(tensors, path, metadata)  # a complete-looking weights file is on disk...
        raise KeyboardInterrupt("simulated interruption")  # ...when the export dies

    return save_then_fail


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


@pytest.mark.parametrize("fmt", ["hf", "sglang", "attached"])
def test_interrupted_export_leaves_nothing_that_looks_complete(fmt, checkpoints, tiny_target_dir, tmp_path,
                                                               monkeypatch):
    module = attached if fmt == "attached" else exporter
    monkeypatch.setattr(module, "save_tensors", _fail_midway(save_tensors))
    parent = tmp_path / "exports"
    parent.mkdir()
    kw = {"target_dir": str(tiny_target_dir)} if fmt == "attached" else {}
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(ckpt=str(checkpoints["dspark_vanilla"]), format=fmt, out=str(parent / "drafter"), **kw)
    assert _leftovers(parent) == []  # no final directory, no staging directory
    assert (tiny_target_dir / "model.safetensors").is_file()  # the linked target survives the cleanup


def test_interrupted_overwrite_keeps_the_previous_export(checkpoints, tmp_path, monkeypatch):
    out = tmp_path / "drafter"
    export_checkpoint(ckpt=str(checkpoints["dflash_deepspec"]), format="deepspec", out=str(out))
    before = json.loads((out / "config.json").read_text())
    monkeypatch.setattr(exporter, "save_tensors", _fail_midway(save_tensors))
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(ckpt=str(checkpoints["dspark_vanilla"]), format="deepspec", out=str(out), overwrite=True)
    assert json.loads((out / "config.json").read_text()) == before
    assert _leftovers(tmp_path) == ["drafter"]


def test_existing_output_needs_overwrite_and_must_look_like_an_export(checkpoints, tmp_path):
    out = tmp_path / "drafter"
    export_checkpoint(ckpt=str(checkpoints["dspark_vanilla"]), format="sglang", out=str(out))
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_checkpoint(ckpt=str(checkpoints["dspark_vanilla"]), format="sglang", out=str(out))
    export_checkpoint(ckpt=str(checkpoints["dspark_rnn"]), format="sglang", out=str(out), overwrite=True)
    assert json.loads((out / "config.json").read_text())["markov_head_type"] == "rnn"
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="does not look like a model export"):
        export_checkpoint(ckpt=str(checkpoints["dspark_vanilla"]), format="sglang", out=str(precious),
                          overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("fmt", ["sglang", "attached"])
def test_exported_files_get_the_mode_of_a_new_file(fmt, checkpoints, tiny_target_dir, tmp_path):
    """safetensors writes through a 0600 temporary file; the export's files must be readable by the user who
    serves them, as a Hub download is (0644 under the usual umask 022)."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        kw = {"target_dir": str(tiny_target_dir)} if fmt == "attached" else {}
        out = tmp_path / "drafter"
        export_checkpoint(ckpt=str(checkpoints["dspark_vanilla"]), format=fmt, out=str(out), **kw)
        os.umask(0o027)  # a stricter umask is honoured too
        strict = tmp_path / "strict"
        export_checkpoint(ckpt=str(checkpoints["dspark_vanilla"]), format="sglang", out=str(strict))
    finally:
        os.umask(old)
    weights = out / ("dspark" if fmt == "attached" else "") / "model.safetensors"
    written = [p for p in out.rglob("*") if p.is_file() and p.stat().st_nlink == 1]  # not the linked target files
    assert weights in written and len(written) >= 4
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {p.name: "0o644" for p in written}
    assert oct(stat.S_IMODE((strict / "model.safetensors").stat().st_mode)) == "0o640"
