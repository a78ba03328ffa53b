"""``RunSummary``: what a fit measured, printed at the end and written to ``<log_dir>/summary.json``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


class RunSummary(L.Callback):
    """Record the training loss curve and print first/last losses, validation metrics and output paths.

    Args:
        window: steps averaged for the "first" and "last" training loss.
    """

    def __init__(self, window: int = 5) -> None:
        self.window = window
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.losses.append(float(loss))

    def summary(self, trainer: L.Trainer) -> dict[str, Any]:
        n = min(self.window, len(self.losses))
        mean = lambda xs: sum(xs) / len(xs) if xs else math.nan  # noqa: E731
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        ckpt = trainer.checkpoint_callback
        return {
            "steps": trainer.global_step,
            "train_loss_first": mean(self.losses[:n]),
            "train_loss_last": mean(self.losses[-n:]),
            "train_losses": self.losses,
            "metrics": dict(sorted(metrics.items())),
            "last_checkpoint": getattr(ckpt, "last_model_path", None) or None,
            "log_dir": trainer.log_dir,
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
        lines.append(f"Checkpoint: {info['last_checkpoint']}")
        lines.append(f"Logs and summary.json: {log_dir}")
        print("\n".join(lines), flush=True)
