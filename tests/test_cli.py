"""The command line end to end on the smoke configs: fit lowers the loss, resumes, runs under 2-process DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dspark_lightning.cli import COMMANDS, lightning_main, main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke"


def _summary(root: Path) -> dict:
    found = sorted(root.rglob("summary.json"), key=lambda p: p.stat().st_mtime)
    assert found, f"no summary.json under {root}"
    return json.loads(found[-1].read_text())


def _run_cli(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "dspark_lightning", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_fit_smoke_dspark_from_the_command_line_lowers_the_loss(tmp_path):
    proc = _run_cli(["fit", "--config", str(SMOKE / "dspark.yaml"), "--trainer.default_root_dir", str(tmp_path)])
    summary = _summary(tmp_path)
    assert summary["steps"] == 40
    assert summary["train_loss_last"] < summary["train_loss_first"] - 0.05, summary
    assert "Trained 40 steps" in proc.stdout
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert 0.0 < summary["metrics"]["val/accept_rate@0"] <= 1.0
    assert summary["metrics"]["val/expected_tau"] >= 1.0
    tp = summary["throughput"]  # 40 steps less 5 warm-up, less the step right after the validation at step 20
    assert tp["world_size"] == 1 and tp["timed_steps"] == 40 - 5 - 1
    assert tp["tokens_per_s"] > 0 and tp["tokens_per_s_per_rank"] == [tp["tokens_per_s"]]
    assert 0.0 < tp["data_wait_fraction"] < 1.0  # the in-process loader takes some, never all, of the step
    assert "tokens/s on 1 rank(s)" in proc.stdout
    startup = summary["startup_seconds"]  # phases in order: setup, sanity check, the 5 warm-up steps
    assert list(startup) == ["setup", "sanity_check", "first_steps"] and all(v >= 0 for v in startup.values())
    assert "Start-up: setup" in proc.stdout


@pytest.mark.parametrize("algorithm", ["dflash", "eagle3"])
def test_fit_smoke_in_process_lowers_the_loss(tmp_path, algorithm):
    lightning_main(["fit", "--config", str(SMOKE / f"{algorithm}.yaml"), "--trainer.default_root_dir", str(tmp_path),
                    "--trainer.enable_progress_bar", "false"])
    summary = _summary(tmp_path)
    assert summary["train_loss_last"] < summary["train_loss_first"], summary


def test_fit_resumes_from_last_checkpoint(tmp_path):
    base = ["fit", "--config", str(SMOKE / "dspark.yaml"), "--trainer.default_root_dir", str(tmp_path),
            "--trainer.enable_progress_bar", "false"]
    lightning_main([*base, "--trainer.max_steps", "20"])
    first = _summary(tmp_path)
    assert first["steps"] == 20
    lightning_main([*base, "--trainer.max_steps", "30", "--ckpt_path", "last"])
    resumed = _summary(tmp_path)
    assert resumed["steps"] == 30
    assert len(resumed["train_losses"]) == 10  # only the 10 new steps ran
    # The optimizer and weights came back: the resumed loss continues from the trained level, far from the start.
    start, trained = first["train_losses"][0], first["train_loss_last"]
    assert abs(resumed["train_losses"][0] - trained) < abs(resumed["train_losses"][0] - start), (first, resumed)


@pytest.mark.slow
def test_fit_ddp_two_processes_on_cpu(tmp_path):
    proc = _run_cli(["fit", "--config", str(SMOKE / "dspark.yaml"), "--trainer.default_root_dir", str(tmp_path),
                     "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.max_steps", "8",
                     "--trainer.val_check_interval", "4", "--trainer.enable_progress_bar", "false"])
    summary = _summary(tmp_path)
    assert summary["steps"] == 8
    assert "distributed_backend=gloo" in proc.stdout + proc.stderr
    assert "MEMBER: 2/2" in proc.stdout + proc.stderr
    tp = summary["throughput"]
    assert tp["world_size"] == 2 and len(tp["tokens_per_s_per_rank"]) == 2
    assert tp["tokens_per_s"] == pytest.approx(sum(tp["tokens_per_s_per_rank"]))
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_a_lightning_command_ends_the_process_group_it_leaves(tmp_path, monkeypatch):
    """Lightning keeps a DDP run's process group after the Trainer ends; ``main`` destroys it, so that Gloo's threads
    do not outlive the interpreter (an abort after a finished run)."""
    import torch.distributed as dist

    import dspark_lightning.cli as cli

    def fit_leaving_a_group(args):  # what a finished 1-process DDP fit leaves
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        assert args == ["fit"]

    monkeypatch.setattr(cli, "lightning_main", fit_leaving_a_group)
    main(["fit"])
    assert not dist.is_initialized()


def test_help_lists_every_command(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for name in ("fit", "validate", *COMMANDS):
        assert name in out


def test_unknown_command_names_the_choices():
    with pytest.raises(SystemExit, match="Unknown command 'fitt'.*'fit'"):
        main(["fitt"])
