"""What a fit prints: the step-counting progress bars, no litlogger tip, peak memory that is never NaN on a CPU, and
the TensorBoard line (``modules/console.py``, ``modules/summary.py``)."""

from __future__ import annotations

import logging
import math
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader

from dspark_lightning.cli import lightning_main
from dspark_lightning.modules.console import (
    LITLOGGER_TIP,
    STEPS_DESCRIPTION,
    RichStepProgressBar,
    TQDMStepProgressBar,
    quiet_lightning,
    use_step_progress_bar,
)
from dspark_lightning.modules.summary import RunSummary, peak_memory_gib, tensorboard_dir

ROOT = Path(__file__).resolve().parents[1]
BATCHES_PER_EPOCH = 4


class _Regression(L.LightningModule):
    """A one-weight model: enough for the Trainer to step."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return ((self.weight - batch) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(torch.ones(BATCHES_PER_EPOCH, 1), batch_size=1)


def _fit(tmp_path: Path, bar: L.Callback, **trainer: object) -> L.Trainer:
    fit = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_model_summary=False, callbacks=[bar], default_root_dir=tmp_path, **trainer)
    fit.fit(_Regression())
    return fit


def test_rich_bar_counts_steps_out_of_max_steps_across_epochs(tmp_path):
    bar = RichStepProgressBar(leave=True)
    _fit(tmp_path, bar, max_steps=6)  # 6 steps over 1.5 epochs of 4 batches
    task = next(t for t in bar.progress.tasks if t.id == bar.train_progress_bar_id)
    assert (task.total, task.completed) == (6, 6)  # Lightning's bar ends at 2/4, titled "Epoch 1/-2"
    assert task.description.strip() == STEPS_DESCRIPTION


def test_tqdm_bar_counts_steps_out_of_max_steps_across_epochs(tmp_path):
    bar = TQDMStepProgressBar()
    _fit(tmp_path, bar, max_steps=6)
    assert (bar.train_progress_bar.total, bar.train_progress_bar.n) == (6, 6)
    assert bar.train_progress_bar.desc.startswith(STEPS_DESCRIPTION)


def test_a_run_bounded_by_epochs_keeps_lightnings_epoch_bar(tmp_path):
    bar = TQDMStepProgressBar()
    _fit(tmp_path, bar, max_epochs=2)
    assert (bar.train_progress_bar.total, bar.train_progress_bar.n) == (BATCHES_PER_EPOCH, BATCHES_PER_EPOCH)
    assert bar.train_progress_bar.desc.startswith("Epoch 1")


def test_default_bars_are_swapped_and_a_configured_one_stays():
    class MyBar(TQDMProgressBar):
        pass

    for default, expected in ((RichProgressBar(), RichStepProgressBar), (TQDMProgressBar(), TQDMStepProgressBar),
                              (MyBar(), MyBar)):
        fit = L.Trainer(accelerator="cpu", logger=False, callbacks=[default])
        use_step_progress_bar(fit)
        assert type(fit.progress_bar_callback) is expected
    disabled = TQDMProgressBar()
    disabled.disable()
    fit = L.Trainer(accelerator="cpu", logger=False, callbacks=[disabled])
    use_step_progress_bar(fit)
    assert type(fit.progress_bar_callback) is TQDMStepProgressBar and fit.progress_bar_callback.is_disabled


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_the_litlogger_tip_is_dropped_and_other_trainer_messages_stay():
    records = _Records()
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(records)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        quiet_lightning()
        quiet_lightning()  # idempotent: one filter
        L.Trainer(accelerator="cpu", logger=False)
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    assert sum(type(f).__name__ == "_DropLitLoggerTip" for f in logger.filters) == 1
    assert not any(LITLOGGER_TIP in m for m in records.messages), records.messages
    assert any("GPU available" in m for m in records.messages), records.messages


def test_lightnings_own_leafspec_deprecation_warning_is_silenced():
    from lightning.pytorch.utilities._pytree import _tree_flatten

    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        _tree_flatten([1, 2])  # a container of primitives: Lightning builds torch's deprecated LeafSpec
        before = [str(w.message) for w in caught]
        quiet_lightning()
        _tree_flatten([1, 2])
        after = [str(w.message) for w in caught][len(before):]
    assert any("LeafSpec" in m for m in before), before
    assert after == []


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads Linux's /proc for the reference")
def test_peak_memory_on_cpu_is_the_processes_peak_rss():
    peak = peak_memory_gib(torch.device("cpu"))
    # Independent reference: the kernel's high-water mark of the resident set, in kB.
    line = next(row for row in Path("/proc/self/status").read_text().splitlines() if row.startswith("VmHWM:"))
    hwm_gib = int(line.split()[1]) / 2**20
    assert math.isfinite(peak) and peak > 0.05  # torch alone is over 50 MiB
    assert abs(peak - hwm_gib) <= 0.01 * hwm_gib + 2 / 1024, (peak, hwm_gib)


def test_tensorboard_dir_is_the_tensorboard_loggers_root(tmp_path):
    fit = L.Trainer(accelerator="cpu", logger=TensorBoardLogger(tmp_path, name="runs"))
    assert tensorboard_dir(fit) == str(tmp_path / "runs")
    assert tensorboard_dir(L.Trainer(accelerator="cpu", logger=CSVLogger(tmp_path))) is None


def test_cli_fit_prints_steps_memory_and_tensorboard_without_nan_or_tips(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["dspark_lightning"])  # LightningCLI warns when pytest's argv is present
    records = _Records()
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(records)
    try:
        cli = lightning_main(["fit", "--config", str(ROOT / "configs/smoke/dspark.yaml"), "--trainer.max_steps", "8",
                              "--trainer.val_check_interval", "8", "--trainer.default_root_dir", str(tmp_path)])
    finally:
        logger.removeHandler(records)
    out = capsys.readouterr().out
    summary = next(c for c in cli.trainer.callbacks if isinstance(c, RunSummary))
    info = summary.summary(cli.trainer)
    assert type(cli.trainer.progress_bar_callback) in (RichStepProgressBar, TQDMStepProgressBar)
    assert isinstance(cli.trainer.logger, TensorBoardLogger)  # tensorboard is a dependency: Lightning's default
    assert f"Curves: tensorboard --logdir {tmp_path / 'lightning_logs'}" in out
    assert "peak memory per rank, process peak RSS (GiB): " in out
    assert info["throughput"]["peak_memory_gib_per_rank"][0] > 0
    assert "nan" not in out.lower(), out
    assert not any(LITLOGGER_TIP in m for m in records.messages)
