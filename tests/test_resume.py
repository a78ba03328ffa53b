"""``kill -9`` during ``fit``, then ``fit --ckpt_path last``: the resumed run trains on the very batches (tokens and
anchors) and reaches the very losses of an uninterrupted run, step by step, online and from a cache, with 0 and 2
DataLoader workers. The killed run is a real process that dies by SIGKILL (no cleanup, no on-exception save)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY, KILL_AT = 12, 3, 8  # epochs of 8 batches: the kill and the resume cross the epoch boundary
SAMPLES, BATCH = 32, 4

# Callbacks the runs load by class_path (a module in the test's tmp dir, on the path of every run).
CALLBACKS = '''
import hashlib, json, os, signal
import lightning as L


class Record(L.Callback):
    """One JSON line per step: the step, a digest of the batch's tokens and anchors, the loss."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        digest = hashlib.sha256()
        for name in ("input_ids", "anchors", "anchor_valid"):
            digest.update(batch[name].cpu().numpy().tobytes())
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "batch": digest.hexdigest(),
                                "loss": float(outputs["loss"])}) + "\\n")


class KillAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
'''


@pytest.fixture(scope="module")
def helpers(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("resume_helpers")
    (folder / "resume_callbacks.py").write_text(CALLBACKS)
    return folder


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory) -> Path:
    """The online runs' samples as a cache: 8 shards of 4 (2 workers get 4 shards each)."""
    from dspark_lightning.data.cache.build import build_cache
    from dspark_lightning.data.online import RandomTokensDataModule
    from dspark_lightning.targets import TargetConfig

    root = tmp_path_factory.mktemp("resume_cache")
    model = yaml.safe_load((REPO / "configs/smoke/dspark.yaml").read_text())["model"]
    target = TargetConfig.from_dict(model["target"])
    online = RandomTokensDataModule(target=target, num_samples=SAMPLES, seq_len=24, prompt_len=4)
    with (root / "rows.jsonl").open("w") as f:
        for i, s in enumerate(online._make_samples()):
            f.write(json.dumps({"id": i, "input_ids": s["input_ids"].tolist(),
                                "loss_mask": s["loss_mask"].int().tolist()}) + "\n")
    build_cache(str(root / "rows.jsonl"), str(root / "cache"), target, model["drafter"]["target_layer_ids"],
                min_loss_tokens=1, max_shard_samples=4, progress=False)
    return root / "cache"


def _config(tmp: Path, name: str, data: dict, record: Path, kill: bool) -> Path:
    config = yaml.safe_load((REPO / "configs/smoke/dspark.yaml").read_text())
    config["data"] = data
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"save_last": True, "every_n_train_steps": EVERY}},
                 {"class_path": "resume_callbacks.Record", "init_args": {"path": str(record)}}]
    if kill:
        callbacks.append({"class_path": "resume_callbacks.KillAt", "init_args": {"step": KILL_AT}})
    config["trainer"].update(max_steps=STEPS, default_root_dir=str(tmp / name), logger=False, callbacks=callbacks,
                             enable_progress_bar=False, limit_val_batches=0, num_sanity_val_steps=0,
                             val_check_interval=None, check_val_every_n_epoch=1)
    path = tmp / f"{name}-{'kill' if kill else 'run'}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _steps(record: Path) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, record.read_text().splitlines())}


def _fit(config: Path, helpers: Path, *extra: str) -> None:
    from dspark_lightning.cli import lightning_main

    sys.path.insert(0, str(helpers))
    try:
        lightning_main(["fit", "--config", str(config), *extra])
    finally:
        sys.path.remove(str(helpers))


def _killed_fit(config: Path, helpers: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(helpers)])}
    proc = subprocess.run([sys.executable, "-m", "dspark_lightning", "fit", "--config", str(config)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-2000:]  # died by SIGKILL, as planned


def _data(kind: str, workers: int, cache: Path) -> dict:
    if kind == "online":
        return {"class_path": "dspark_lightning.data.online.RandomTokensDataModule",
                "init_args": {"num_samples": SAMPLES, "seq_len": 24, "prompt_len": 4, "batch_size": BATCH,
                              "val_fraction": 0.0, "num_workers": workers}}
    return {"class_path": "dspark_lightning.data.cache.datamodule.TargetCacheDataModule",
            "init_args": {"path": str(cache), "batch_size": BATCH, "num_workers": workers, "shuffle_buffer": 4}}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["online", "cache"])
def test_kill_9_then_resume_trains_on_the_uninterrupted_stream(kind, helpers, token_cache, tmp_path):
    # The online stream does not depend on the number of workers: one uninterrupted run is the reference of both.
    # The cache deals its shards to the workers, so each worker count has its own reference.
    references: dict[int, dict[int, dict]] = {}
    for workers in (0, 2):
        data = _data(kind, workers, token_cache)
        if kind == "cache" or not references:
            record = tmp_path / f"whole-{workers}.jsonl"
            _fit(_config(tmp_path, f"whole-{workers}", data, record, kill=False), helpers)
            references[workers] = _steps(record)
        reference = references.get(workers) or references[0]
        assert sorted(reference) == list(range(1, STEPS + 1))

        record = tmp_path / f"killed-{workers}.jsonl"
        _killed_fit(_config(tmp_path, f"killed-{workers}", data, record, kill=True), helpers)
        before = _steps(record)
        assert sorted(before) == list(range(1, KILL_AT + 1))  # the process got to step 8, saved at 3 and 6
        checkpoints = tmp_path / f"killed-{workers}" / "checkpoints"
        assert (checkpoints / "last.ckpt").is_file()

        _fit(_config(tmp_path, f"killed-{workers}", data, record, kill=False), helpers, "--ckpt_path", "last")
        resumed = [row for row in map(json.loads, record.read_text().splitlines())][KILL_AT:]
        resume_from = (KILL_AT // EVERY) * EVERY  # the last save before the kill: steps 7.. are trained again
        assert [row["step"] for row in resumed] == list(range(resume_from + 1, STEPS + 1))
        for row in resumed:
            want = reference[row["step"]]
            assert row["batch"] == want["batch"], f"{kind}, {workers} workers: step {row['step']} saw another batch"
            assert row["loss"] == want["loss"], f"{kind}, {workers} workers: step {row['step']} loss differs"
        for step in range(1, resume_from + 1):  # and the killed run itself followed the reference
            assert before[step]["batch"] == reference[step]["batch"]
