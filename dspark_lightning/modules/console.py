"""What a fit shows on the console besides :class:`~.summary.RunSummary`: a progress bar that counts the unit the run
is bounded by, and none of Lightning's noise (an advertisement, a deprecation warning of its own making).

Lightning's default bars count the batches of the current epoch and title them ``Epoch e/max_epochs - 1``. A run
bounded by ``max_steps`` has ``max_epochs = -1``, so they read "Epoch 0/-2" and restart at 0 every epoch. The bars here
count optimizer steps out of ``max_steps`` for such runs and behave as Lightning's otherwise.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

STEPS_DESCRIPTION = "Steps"
# Lightning logs this through its rank-zero logger on every Trainer built without a LitLogger.
LITLOGGER_TIP = "litlogger"
_RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"
# Lightning 2.6's own pytree helper (lightning/pytorch/utilities/_pytree.py) builds torch's deprecated LeafSpec, and
# torch >= 2.10 warns at every fit: nothing a user of this package can act on.
LEAFSPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


def bounded_by_steps(trainer: L.Trainer) -> bool:
    """True when ``max_steps`` ends the run (``max_epochs`` left unset, which Lightning stores as -1)."""
    return trainer.max_steps is not None and trainer.max_steps > 0 and trainer.max_epochs in (None, -1)


class RichStepProgressBar(RichProgressBar):
    """Lightning's rich bar; in a run bounded by ``max_steps`` it shows ``Steps n/max_steps`` over the whole run."""

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if bounded_by_steps(self.trainer) else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if bounded_by_steps(self.trainer):
            return f"{STEPS_DESCRIPTION:{len(self.validation_description)}}"  # padded like Lightning's, no flicker
        return super()._get_train_description(current_epoch)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)  # resets the bar to 0: put it back at the step count
        if bounded_by_steps(trainer) and self.train_progress_bar_id is not None:
            self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if bounded_by_steps(trainer):
            self._update(self.train_progress_bar_id, trainer.global_step)


class TQDMStepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar; in a run bounded by ``max_steps`` it counts ``global_step`` out of ``max_steps``."""

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if bounded_by_steps(self.trainer) else super().total_train_batches

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        if bounded_by_steps(trainer):
            self.train_progress_bar.set_description(STEPS_DESCRIPTION)
            self.train_progress_bar.n = trainer.global_step
            self.train_progress_bar.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not bounded_by_steps(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar = self.train_progress_bar
        if self._should_update(trainer.global_step, bar.total):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar
        return None


def use_step_progress_bar(trainer: L.Trainer) -> None:
    """Swap the trainer's default progress bar for its step-counting variant (a bar the config chose stays)."""
    swaps = {RichProgressBar: RichStepProgressBar, TQDMProgressBar: TQDMStepProgressBar}
    for i, callback in enumerate(trainer.callbacks):
        if isinstance(callback, ProgressBar) and type(callback) in swaps:
            bar = swaps[type(callback)]()
            if not callback.is_enabled:
                bar.disable()
            trainer.callbacks[i] = bar


class _DropLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return LITLOGGER_TIP not in record.getMessage()


def quiet_lightning() -> None:
    """Drop what Lightning prints that a user cannot act on: the "try installing litlogger" tip (every Trainer; it
    advertises a cloud service this project does not use) and torch's LeafSpec deprecation warning, which Lightning's
    own code triggers. Idempotent."""
    logger = logging.getLogger(_RANK_ZERO_LOGGER)
    if not any(isinstance(f, _DropLitLoggerTip) for f in logger.filters):
        logger.addFilter(_DropLitLoggerTip())
    warnings.filterwarnings("ignore", message=LEAFSPEC_WARNING, category=FutureWarning)
