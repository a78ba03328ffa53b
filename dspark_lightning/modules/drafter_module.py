"""The one LightningModule: trains any drafter against a frozen target, online or from a cache.

Everything algorithm-specific lives in the drafter (its training forward) and in ``losses.py``; this module
only wires them to Lightning: it builds the drafter from its config and the target's geometry, copies the
target's frozen embedding/head, runs the frozen target when the batch carries no cached states (online
mode), logs losses and acceptance metrics, and builds AdamW with warmup + cosine decay.

Validation has two modes. Token batches (``input_ids``) get the training losses, as in fit. Prompt batches
(``prompt_ids``, from ``eval.suites.SuitesDataModule``) are decoded by an injected
:class:`ValidationDecoder` (``model.decoding``; ``eval.validate.SpeculativeValidation`` runs speculative
decoding and writes the report), so this module never imports the decoding engine.
"""

from __future__ import annotations

import abc
import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor

from ..drafters import DrafterConfig
from ..drafters.registry import build as build_drafter
from ..losses import LossOutput, LossWeights, Ratio, drafter_loss
from ..targets import FrozenTarget, TargetConfig, load_target_config
from .global_loss import AccumulatedStep, batch_ratios, logged_values, reduce_step, summed_over_ranks

__all__ = ["DrafterModule", "LossWeights", "ValidationDecoder", "build_drafter"]


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """AdamW(lr 6e-4, no weight decay), the reference recipe (fused on CUDA when available)."""
    return torch.optim.AdamW(params, lr=6e-4, weight_decay=0.0)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup_ratio`` of the steps (first step at lr/W), then cosine to zero."""
    warmup = max(1, int(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class ValidationDecoder(abc.ABC):
    """What ``DrafterModule`` calls to validate on prompt batches (implemented in ``dspark_lightning.eval``).

    The module hands over batches that carry ``prompt_ids`` and the epoch boundaries; the decoder owns its
    engine, metrics and report.
    """

    def on_validation_epoch_start(self, module: DrafterModule) -> None:  # noqa: B027 - optional hook
        """Prepare for an epoch (metrics, engine)."""

    @abc.abstractmethod
    def validation_step(self, module: DrafterModule, batch: dict[str, Any], batch_idx: int) -> None:
        """Decode one prompt batch."""

    def on_validation_epoch_end(self, module: DrafterModule) -> None:  # noqa: B027 - optional hook
        """Reduce, log and report."""


class DrafterModule(L.LightningModule):
    """Train a DSpark / DFlash / Eagle3 drafter.

    Args:
        drafter: the drafter's hyper-parameters; geometry left unset is read from the target config.
        target: the frozen target (its config gives the geometry; its embedding and head are copied into
            the drafter; in online mode it computes the hidden states of each batch).
        loss: loss-term weights.
        optimizer: optimizer factory (default AdamW, lr 6e-4).
        lr_scheduler: scheduler factory; default linear warmup + cosine over the run's steps.
        warmup_ratio: warmup fraction for the default scheduler.
        copy_target_embeddings: copy ``embed_tokens``/``lm_head`` from the target at ``setup`` (off only in tests
            that set weights by hand).
        decoding: how to validate on prompt batches (``eval.validate.SpeculativeValidation``: speculative
            decoding, tau, calibration, report); None keeps loss-only validation.
        compile_layers: ``torch.compile`` each decoder layer of the drafter at ``setup`` (its norms, rotary and
            SwiGLU fuse around the matmuls and the flex kernel). ``benchmarks/train_step.py --compile layers``
            measured the DSpark step at the Qwen3-4B geometry at 58.3 ms against 71.4 ms eager on the H200.
    """

    def __init__(
        self,
        drafter: DrafterConfig,
        target: TargetConfig,
        loss: LossWeights | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        warmup_ratio: float = 0.04,
        copy_target_embeddings: bool = True,
        decoding: ValidationDecoder | None = None,
        compile_layers: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["decoding"])
        self.target_config = target
        self.target_hf_config = load_target_config(target)
        self.drafter_config = drafter.resolve(self.target_hf_config)
        self.drafter = build_drafter(self.drafter_config)
        self.loss_weights = loss or LossWeights()
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.warmup_ratio = warmup_ratio
        self.copy_target_embeddings = copy_target_embeddings
        self.decoding = decoding
        self.compile_layers = compile_layers
        self.__dict__["target"] = None  # frozen target, kept out of the state dict and the optimizer
        self._accumulated = AccumulatedStep()  # the micro-batches of the optimizer step under way
        self._val_ratios: dict[str, Ratio] | None = None  # summed over this validation epoch's token batches

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Self-describing checkpoints: `export` needs neither the target's files nor network access
        # (dspark_lightning.export.checkpoint.EXPORT_INFO_KEY).
        checkpoint["dspark_lightning"] = {
            "drafter_config": self.drafter_config.to_dict(),
            "target_config": {k: v for k, v in self.target_hf_config.to_diff_dict().items()
                              if not k.startswith("_") and k != "transformers_version"},
            "training_config": getattr(self, "training_config_yaml", None),  # set by the CLI
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Before its weights are loaded: refuse a checkpoint of another drafter, naming both (modules/checkpoints.py).
        from .checkpoints import check_checkpoint_fits

        check_checkpoint_fits(checkpoint, self.drafter_config, self.target_hf_config)

    # ------------------------------------------------------------------ target
    def _load_target(self) -> FrozenTarget:
        if self.target is None:
            device = self.device
            strategy = getattr(self._trainer, "strategy", None)
            if self.target_config.init_on_device and strategy is not None:
                device = strategy.root_device  # at setup the module itself is still on the CPU
            self.__dict__["target"] = FrozenTarget.from_config(
                self.target_config, self.drafter_config.target_layer_ids, device=device
            )
        return self.target

    def setup(self, stage: str) -> None:
        if self.compile_layers:
            for layer in self.drafter.layers:
                if layer._compiled_call_impl is None:  # compiled in place: parameter names do not change
                    layer.compile()
        if self.copy_target_embeddings and self._needs_embedding_copy():
            target = self._load_target()
            self.drafter.load_target_embeddings(target.embed_weight, target.lm_head_weight)

    def frozen_target(self) -> FrozenTarget:
        """The frozen target on this module's device (loaded on first use)."""
        target = self._load_target()
        if target.device != self.device:
            target.to(self.device)
        return target

    def _needs_embedding_copy(self) -> bool:
        # A restored checkpoint already holds the (frozen) copies; Lightning restores weights after setup,
        # so copying is harmless but loading a large target just for it is not.
        return self.trainer is None or self.trainer.ckpt_path is None

    @torch.no_grad()
    def target_states(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Cached ``(target_hidden, target_last_hidden)`` from the batch, or computed by the frozen target."""
        if "target_hidden" in batch:
            return batch["target_hidden"], batch["target_last_hidden"]
        target = self._load_target()
        if target.device != self.device:
            target.to(self.device)
        out = target(batch["input_ids"], batch.get("attention_mask"))
        return out.hidden, out.last_hidden

    # ------------------------------------------------------------------ steps
    def compute_loss(self, batch: dict[str, Tensor]) -> LossOutput:
        hidden, last_hidden = self.target_states(batch)
        out = self.drafter.training_forward(batch, hidden)
        # A drafter without the target's head (Eagle3's reduced vocabulary) needs the target's own for p_t.
        target_logits = None if self.drafter.holds_target_head else self._load_target().logits
        return drafter_loss(self.drafter, out, last_hidden, self.loss_weights, target_logits)

    def _sum_over_ranks(self, flat: Tensor) -> Tensor:
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return flat
        return trainer.strategy.reduce(flat, reduce_op="sum")

    def _log_ratios(self, ratios: dict[str, Ratio], stage: str) -> None:
        """Log the global values of ``ratios`` (``modules/global_loss.py``): per step in training, once per epoch in
        validation (the ratios summed over the epoch), the same on every rank (no further sync)."""
        values = logged_values(ratios)
        loss = values.pop("loss")
        on_step = stage == "train"
        logs = {f"{stage}/{name}": value for name, value in values.items()}
        logs[f"{stage}/loss"] = loss
        self.log_dict(logs, on_step=on_step, on_epoch=not on_step, batch_size=1, prog_bar=False)
        self.log(f"{stage}_loss", loss, on_step=on_step, on_epoch=not on_step, batch_size=1, prog_bar=True)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """The loss of the global batch (the same value on every rank); its gradient, after DDP's mean over ranks
        (and the rescale of an accumulated step, :meth:`on_before_optimizer_step`), is the global batch's."""
        step = reduce_step(self.compute_loss(batch), self._sum_over_ranks, self.trainer.world_size)
        share = step.share
        if self.trainer.accumulate_grad_batches > 1:
            share = self._accumulated.weigh(step)
        self._log_ratios(step.ratios, "train")
        return step.loss + (share - share.detach())  # value: the global loss; gradient: this rank's share

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # After the step's last backward (and the unscaling of a fp16 run), before clipping and the update.
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self._accumulated.finish(params, self.trainer.accumulate_grad_batches)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if "prompt_ids" in batch:
            if self.decoding is None:
                raise ValueError(
                    "The validation data yields prompts (SuitesDataModule) but the model has no decoder: set "
                    "model.decoding (class_path: dspark_lightning.eval.validate.SpeculativeValidation)."
                )
            self.decoding.validation_step(self, batch, batch_idx)
            return
        ratios = batch_ratios(self.compute_loss(batch))
        seen = self._val_ratios
        self._val_ratios = ratios if seen is None else {k: seen[k].plus(r) for k, r in ratios.items()}

    def on_validation_epoch_start(self) -> None:
        self._val_ratios = None
        if self.decoding is not None:
            self.decoding.on_validation_epoch_start(self)

    def on_validation_epoch_end(self) -> None:
        if self._val_ratios is not None:  # token batches: the epoch's ratios, summed over the ranks once
            self._log_ratios(summed_over_ranks(self._val_ratios, self._sum_over_ranks), "val")
            self._val_ratios = None
        if self.decoding is not None:
            self.decoding.on_validation_epoch_end(self)

    # ------------------------------------------------------------------ optim
    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Lightning's default, except under FSDP, whose precision plugin refuses to clip by norm: there the
        wrapped root module clips its sharded gradients by their global norm itself."""
        if gradient_clip_val and isinstance(self.trainer.strategy, FSDPStrategy) \
                and gradient_clip_algorithm in (None, "norm"):
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.drafter.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        trainer = self._trainer
        clip = trainer.gradient_clip_val if trainer is not None else None
        precision = str(trainer.precision) if trainer is not None else ""
        if optimizer.defaults.get("fused") and clip and "mixed" in precision:
            raise ValueError(
                f"{type(optimizer).__name__}(fused=True) cannot be combined with trainer.gradient_clip_val={clip} "
                f"under precision {precision!r}: Lightning refuses to clip gradients a fused optimizer unscales "
                f"itself. Drop the optimizer's `fused: true` or set `trainer.gradient_clip_val: null`."
            )
        if self.scheduler_factory is not None:
            scheduler = self.scheduler_factory(optimizer)
        else:
            total = int(self.trainer.estimated_stepping_batches) if self.trainer else 1
            scheduler = warmup_cosine(optimizer, max(1, total), self.warmup_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
