"""``RunSummary``: what a fit measured, printed at the end and written to ``<log_dir>/summary.json``."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

PEAK_MEMORY_KINDS = {"cuda": "CUDA tensors (max_memory_allocated)", "host": "process peak RSS"}


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process in GiB: CUDA tensors on a CUDA device, else the peak resident set size (NaN where
    the platform reports neither)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource
    except ImportError:  # Windows
        return math.nan
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB on Linux


def tensorboard_dir(trainer: L.Trainer) -> str | None:
    """The directory to give ``tensorboard --logdir`` when the run logs to TensorBoard (all its versions)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
    return None if logger is None else str(Path(logger.root_dir))


def _memory_text(throughput: dict[str, Any]) -> str:
    peaks = throughput["peak_memory_gib_per_rank"]
    if not peaks or any(math.isnan(g) for g in peaks):
        return ""
    return f"; peak memory per rank, {throughput['peak_memory_kind']} (GiB): " + ", ".join(f"{g:.2f}" for g in peaks)


class RunSummary(L.Callback):
    """Record the training loss curve and the throughput; print first/last losses, validation metrics, output paths.

    Throughput counts the wall time between consecutive training batches (data loading included, validation
    runs excluded) after the first ``window`` steps (warm-up, compilation), and the tokens of those batches
    (``input_ids``, padding included). The part of it spent between one batch's end and the next batch's start
    is the loader wait: the loss was read at the batch end (a device sync), so the accelerator idles meanwhile.
    Peak memory is gathered from every rank: on CUDA the most the caching allocator held for tensors
    (``torch.cuda.max_memory_allocated``), elsewhere the process's peak resident set size (``getrusage``).
    Start-up is split into phases (rank 0's clock): ``setup`` (from the trainer's callbacks being built to
    ``on_fit_start``: loading the target, moving and wrapping the model), ``sanity_check`` (to ``on_train_start``)
    and ``first_steps`` (the ``window`` warm-up steps, where compilation happens).

    Args:
        window: steps averaged for the "first" and "last" training loss, and the warm-up steps left out of
            the throughput.
    """

    def __init__(self, window: int = 5) -> None:
        self.window = window
        self.losses: list[float] = []
        self._last_end: float | None = None
        self.timed_seconds = 0.0
        self.timed_tokens = 0
        self.timed_steps = 0
        self.data_wait_seconds = 0.0
        self._clock: dict[str, float] = {"built": time.perf_counter()}

    def _mark(self, phase: str) -> None:
        self._clock.setdefault(phase, time.perf_counter())

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark("fit_start")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark("train_start")

    def startup(self) -> dict[str, float]:
        """Seconds spent in each start-up phase that was reached."""
        order = ["built", "fit_start", "train_start", "warm"]
        names = {"fit_start": "setup", "train_start": "sanity_check", "warm": "first_steps"}
        return {names[b]: self._clock[b] - self._clock[a] for a, b in zip(order, order[1:])
                if a in self._clock and b in self._clock}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._last_end is not None and len(self.losses) >= self.window:
            self.data_wait_seconds += time.perf_counter() - self._last_end

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.losses.append(float(loss))  # a host sync: the step's GPU work is done when the clock reads
        now = time.perf_counter()
        if len(self.losses) == self.window:
            self._mark("warm")
        if self._last_end is not None and len(self.losses) > self.window:
            self.timed_seconds += now - self._last_end
            self.timed_steps += 1
            if isinstance(batch, dict) and isinstance(batch.get("input_ids"), torch.Tensor):
                self.timed_tokens += batch["input_ids"].numel()
        self._last_end = now

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_end = None  # the next interval would include the validation run

    def throughput(self, trainer: L.Trainer) -> dict[str, Any]:
        """Tokens/s of this rank and of all ranks, seconds per step, peak memory per rank (a collective)."""
        device = trainer.strategy.root_device
        peak = peak_memory_gib(device)
        rate = self.timed_tokens / self.timed_seconds if self.timed_seconds else math.nan
        local = torch.tensor([peak, rate], dtype=torch.float64, device=device)
        gathered = trainer.strategy.all_gather(local).reshape(-1, 2).cpu() if trainer.world_size > 1 \
            else local[None].cpu()
        return {
            "world_size": trainer.world_size,
            "timed_steps": self.timed_steps,
            "seconds_per_step": self.timed_seconds / self.timed_steps if self.timed_steps else math.nan,
            "data_wait_fraction": self.data_wait_seconds / self.timed_seconds if self.timed_seconds else math.nan,
            "tokens_per_s_per_rank": gathered[:, 1].tolist(),
            "tokens_per_s": float(gathered[:, 1].sum()),
            "peak_memory_gib_per_rank": gathered[:, 0].tolist(),
            "peak_memory_kind": PEAK_MEMORY_KINDS["cuda" if device.type == "cuda" else "host"],
        }

    def summary(self, trainer: L.Trainer) -> dict[str, Any]:
        n = min(self.window, len(self.losses))
        mean = lambda xs: sum(xs) / len(xs) if xs else math.nan
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        ckpt = trainer.checkpoint_callback
        return {
            "steps": trainer.global_step,
            "train_loss_first": mean(self.losses[:n]),
            "train_loss_last": mean(self.losses[-n:]),
            "train_losses": self.losses,
            "metrics": dict(sorted(metrics.items())),
            "throughput": self.throughput(trainer),
            "startup_seconds": self.startup(),
            "last_checkpoint": getattr(ckpt, "last_model_path", None) or None,
            "log_dir": trainer.log_dir,
            "tensorboard_dir": tensorboard_dir(trainer),
        }

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        info = self.summary(trainer)  # trainer.log_dir is a collective under DDP: every rank calls it
        self._report(info, Path(info["log_dir"] or trainer.default_root_dir))

    @rank_zero_only
    def _report(self, info: dict[str, Any], log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        tmp = log_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, log_dir / "summary.json")
        lines = [
            f"Trained {info['steps']} steps: train loss {info['train_loss_first']:.4f} (first {self.window}) -> "
            f"{info['train_loss_last']:.4f} (last {self.window})",
        ]
        val = {k: v for k, v in info["metrics"].items() if k.startswith("val/")}
        if val:
            lines.append("Validation: " + ", ".join(f"{k.removeprefix('val/')}={v:.4f}" for k, v in val.items()))
        tp = info["throughput"]
        if tp["timed_steps"]:
            lines.append(f"Throughput: {tp['tokens_per_s']:,.0f} tokens/s on {tp['world_size']} rank(s), "
                         f"{1e3 * tp['seconds_per_step']:.1f} ms/step ({100 * tp['data_wait_fraction']:.1f} % waiting "
                         f"for data)" + _memory_text(tp))
        if info["startup_seconds"]:
            lines.append("Start-up: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f} s"
                                                  for k, v in info["startup_seconds"].items()))
        lines.append(f"Checkpoint: {info['last_checkpoint']}")
        lines.append(f"Logs and summary.json: {log_dir}")
        if info.get("tensorboard_dir"):
            lines.append(f"Curves: tensorboard --logdir {info['tensorboard_dir']}")
        print("\n".join(lines), flush=True)
