"""Checkpoints in, through the command line: nothing is unpickled with full trust (local files, URLs, ``last``), a
checkpoint of another drafter is refused naming both, ``last.ckpt`` is the newest file, and the project's own
errors print as one line."""

from __future__ import annotations

import functools
import os
import shutil
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from unittest import mock

import pytest
import torch

from dspark_lightning.cli import lightning_main, main, own_error_message
from dspark_lightning.data.cache.format import CacheError, read_manifest
from dspark_lightning.modules.checkpoints import NewestLastCheckpoint, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke"
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0"]
VALIDATE = ["--data.init_args.max_samples", "2", "--data.init_args.max_new_tokens", "4", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false"]


def cli(args: list[str]):
    with mock.patch.object(sys, "argv", ["dspark_lightning"]):  # LightningCLI warns when pytest's argv is present
        return lightning_main(args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """last.ckpt of a 3-step smoke fit of DSpark and of DFlash (LightningCLI, checkpoints every step)."""
    root = tmp_path_factory.mktemp("runs")
    for name in ("dspark", "dflash"):
        cli(["fit", "--config", str(SMOKE / f"{name}.yaml"), "--trainer.default_root_dir", str(root / name),
             "--trainer.max_steps", "3", "--trainer.callbacks.init_args.every_n_train_steps", "1", *QUIET])
    return {name: root / name / "checkpoints" / "last.ckpt" for name in ("dspark", "dflash")}


class Payload:
    """Unpickling this runs ``touch <marker>``: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted(good: Path, path: Path, marker: Path) -> Path:
    data = load_checkpoint(good)
    data["hyper_parameters"]["payload"] = Payload(marker)
    torch.save(data, path)
    return path


@pytest.fixture
def server(tmp_path):
    """An HTTP server for the files of ``tmp_path / "www"``."""
    (tmp_path / "www").mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    handler.log_message = lambda *args: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", tmp_path / "www"
    httpd.shutdown()


# ---------------------------------------------------------------------- unpickling
def test_a_crafted_checkpoint_is_refused_unexecuted(runs, tmp_path):
    marker = tmp_path / "M"
    evil = crafted(runs["dspark"], tmp_path / "evil.ckpt", marker)
    with pytest.raises(ValueError, match=r"holds pickled objects that dspark_lightning does not unpickle "
                                         r"\(posix.system\); refusing"):
        load_checkpoint(evil)
    validate = ["validate", "--config", str(SMOKE / "validate_dspark.yaml"), *VALIDATE]
    with pytest.raises(ValueError, match="posix.system"):
        cli([*validate, "--ckpt_path", str(evil)])
    # `last` is resolved by the Trainer, which loads it with weights_only=True too.
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(evil, run / "checkpoints" / "last.ckpt")
    with pytest.raises(Exception, match="posix.system"):
        cli(["fit", "--config", str(SMOKE / "dspark.yaml"), "--trainer.default_root_dir", str(run), *QUIET,
             "--ckpt_path", "last"])
    with pytest.raises(ValueError, match="--weights_only false would unpickle the checkpoint with full trust"):
        cli([*validate, "--ckpt_path", str(runs["dspark"]), "--weights_only", "false"])
    assert not marker.exists()


def test_a_remote_checkpoint_is_downloaded_then_loaded_safely(runs, server, tmp_path):
    url, www = server
    shutil.copy(runs["dspark"], www / "good.ckpt")
    marker = tmp_path / "M"
    crafted(runs["dspark"], www / "evil.ckpt", marker)
    validate = ["validate", "--config", str(SMOKE / "validate_dspark.yaml"), *VALIDATE,
                "--trainer.default_root_dir", str(tmp_path / "val")]
    cli_run = cli([*validate, "--ckpt_path", f"{url}/good.ckpt"])
    local = Path(cli_run.config["validate"]["ckpt_path"])
    assert local.name.endswith("-good.ckpt") and local.read_bytes() == runs["dspark"].read_bytes()
    with pytest.raises(ValueError, match=r"posix.system"):
        cli([*validate, "--ckpt_path", f"{url}/evil.ckpt"])
    with pytest.raises(FileNotFoundError, match=rf"Cannot download the checkpoint {url}/missing.ckpt"):
        cli([*validate, "--ckpt_path", f"{url}/missing.ckpt"])
    assert not marker.exists()


def test_checkpoints_written_from_python_load_with_weights_only(runs, tmp_path):
    """DrafterModule built in Python pickles its config dataclasses; they are on torch's safe list."""
    from dspark_lightning.drafters import DrafterConfig
    from dspark_lightning.modules import DrafterModule, LossWeights
    from dspark_lightning.targets import TargetConfig

    data = load_checkpoint(runs["dspark"])
    hparams = data["hyper_parameters"]
    module = DrafterModule(DrafterConfig.from_dict(hparams["drafter"]), TargetConfig.from_dict(hparams["target"]),
                           loss=LossWeights(**hparams["loss"]))
    data["hyper_parameters"] = dict(module.hparams)
    torch.save(data, tmp_path / "python.ckpt")
    loaded = torch.load(tmp_path / "python.ckpt", weights_only=True)
    assert isinstance(loaded["hyper_parameters"]["drafter"], DrafterConfig)
    assert loaded["hyper_parameters"]["optimizer"].__name__ == "default_optimizer"


# ---------------------------------------------------------------------- checkpoint vs config
def test_a_checkpoint_of_another_drafter_is_refused_naming_both(runs, tmp_path):
    fit = ["fit", "--config", str(SMOKE / "dspark.yaml"), *QUIET, "--trainer.max_steps", "4"]
    named = r"holds another model than the configured one: algorithm: checkpoint 'dflash', config 'dspark'"
    with pytest.raises(ValueError, match=rf"Checkpoint {runs['dflash']} {named}.*--use_ckpt_config true"):
        cli([*fit, "--trainer.default_root_dir", str(tmp_path / "a"), "--ckpt_path", str(runs["dflash"])])
    # `last` is resolved by the Trainer; DrafterModule.on_load_checkpoint refuses it before loading the weights.
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copy(runs["dflash"], tmp_path / "b" / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match=named):
        cli([*fit, "--trainer.default_root_dir", str(tmp_path / "b"), "--ckpt_path", "last"])
    # Geometry: the same algorithm with another depth or rank is another model too.
    with pytest.raises(ValueError, match=r"num_hidden_layers: checkpoint 1, config 2; markov_rank: checkpoint 16, "
                                         r"config 8"):
        cli([*fit, "--trainer.default_root_dir", str(tmp_path / "c"), "--ckpt_path", str(runs["dspark"]),
             "--model.drafter.num_hidden_layers", "2", "--model.drafter.markov_rank", "8"])
    # Training-only settings may change on resume; --use_ckpt_config takes the checkpoint's model block.
    cli([*fit, "--trainer.default_root_dir", str(tmp_path / "d"), "--ckpt_path", str(runs["dspark"]),
         "--model.drafter.num_anchors", "8"])
    taken = cli([*fit, "--trainer.default_root_dir", str(tmp_path / "e"), "--ckpt_path", str(runs["dflash"]),
                 "--use_ckpt_config", "true"])
    assert taken.model.drafter_config.algorithm == "dflash" and taken.trainer.global_step == 4


# ---------------------------------------------------------------------- last.ckpt
def test_last_ckpt_is_written_first_and_replaces_a_previous_runs(tmp_path, monkeypatch):
    run = ["fit", "--config", str(SMOKE / "dspark.yaml"), "--trainer.default_root_dir", str(tmp_path), *QUIET,
           "--trainer.callbacks.init_args.every_n_train_steps", "2"]
    written = []
    real = NewestLastCheckpoint._save_checkpoint

    def spy(self, trainer, filepath):
        written.append((trainer.global_step, Path(filepath).name, self.save_last is True and
                        filepath != self.last_model_path))
        real(self, trainer, filepath)

    monkeypatch.setattr(NewestLastCheckpoint, "_save_checkpoint", spy)
    cli([*run, "--trainer.max_steps", "4"])
    # Each save point: the top-k file is deferred, last.ckpt written, then the top-k file linked to it. A kill at
    # any moment leaves last.ckpt at least as new as any other checkpoint.
    assert written == [(2, "epoch=0-step=2.ckpt", True), (2, "last.ckpt", False),
                       (4, "epoch=0-step=4.ckpt", True), (4, "last.ckpt", False)]
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]
    assert (folder / "last.ckpt").stat().st_ino == (folder / "epoch=0-step=4.ckpt").stat().st_ino
    # A new run in the same directory replaces last.ckpt (Lightning would write last-v1.ckpt beside it).
    cli([*run, "--trainer.max_steps", "2"])
    names = sorted(p.name for p in folder.iterdir())
    assert "last-v1.ckpt" not in names and load_checkpoint(folder / "last.ckpt")["global_step"] == 2
    newest = max(folder.iterdir(), key=lambda p: p.stat().st_mtime_ns)
    assert newest.stat().st_ino == (folder / "last.ckpt").stat().st_ino


# ---------------------------------------------------------------------- errors
def test_own_errors_print_one_line_and_a_traceback_with_debug(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["cache", "verify", str(tmp_path)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: No cache manifest at {tmp_path}/manifest.json: build the cache first")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2  # the message and the --debug hint
    with pytest.raises(CacheError, match="No cache manifest"):
        main(["cache", "verify", str(tmp_path), "--debug"])


def test_only_errors_raised_by_the_package_are_shortened(tmp_path):
    from torch._utils import ExceptionWrapper

    try:
        int("x")  # a ValueError raised outside dspark_lightning: keeps its traceback
    except ValueError as err:
        assert own_error_message(err) is None
    try:
        read_manifest(str(tmp_path))
    except CacheError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")  # as torch re-raises a worker's error
    with pytest.raises(CacheError) as info:
        wrapped.reraise()
    assert own_error_message(info.value).startswith(f"No cache manifest at {tmp_path}/manifest.json")
