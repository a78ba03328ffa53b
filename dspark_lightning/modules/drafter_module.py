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
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor, nn

from ..drafters import DFlash, DrafterConfig, DSpark, Eagle3
from ..drafters.blocks import sample_anchors
from ..losses import LossOutput, block_drafter_loss, eagle3_ttt_loss
from ..targets import FrozenTarget, TargetConfig, load_target_config


@dataclass
class LossWeights:
    """Weights of the loss terms (DeepSpec ``deepspec/modeling/dspark/loss.py``, ``deepspec/modeling/eagle3/loss.py``).

    Args:
        ce: cross-entropy to the data token (DSpark 0.1, DFlash 1.0).
        l1: L1 distance to the target distribution (DSpark 0.9, DFlash 0.0).
        confidence: BCE of the confidence head (DSpark 1.0).
        decay: position-weight constant, ``w_k = exp(-k / decay)`` (block drafters).
        step_decay: Eagle3 per-step weight ``step_decay ** k``.
        chunk_size: tokens per chunk when vocabulary-sized logits are built.
        fused: block drafters use the fused loss (``kernels/fused_block_loss.py``: gradients w.r.t. the logits
            computed in the forward pass, a Triton kernel on CUDA) instead of checkpointed chunks; same values.
    """

    ce: float = 0.1
    l1: float = 0.9
    confidence: float = 1.0
    decay: float = 4.0
    step_decay: float = 0.8
    chunk_size: int = 1024
    fused: bool = False


def build_drafter(config: DrafterConfig) -> nn.Module:
    """Instantiate the drafter class for ``config.algorithm`` (config must be resolved)."""
    from ..drafters.dspark_v4 import DSparkV4  # imports transformers' DeepSeek-V4 blocks: only when built

    classes = {"dspark": DSpark, "dflash": DFlash, "eagle3": Eagle3, "dspark_v4": DSparkV4}
    return classes[config.algorithm](config)


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

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Self-describing checkpoints: `export` needs neither the target's files nor network access
        # (dspark_lightning.export.checkpoint.EXPORT_INFO_KEY).
        checkpoint["dspark_lightning"] = {
            "drafter_config": self.drafter_config.to_dict(),
            "target_config": {k: v for k, v in self.target_hf_config.to_diff_dict().items()
                              if not k.startswith("_") and k != "transformers_version"},
            "training_config": getattr(self, "training_config_yaml", None),  # set by the CLI
        }

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
            for layer in getattr(self.drafter, "backbone", self.drafter).layers:
                if layer._compiled_call_impl is None:  # compiled in place: parameter names do not change
                    layer.compile()
        if self.copy_target_embeddings and self._needs_embedding_copy():
            target = self._load_target()
            with torch.no_grad():
                self.drafter.embed_tokens.weight.copy_(target.embed_weight)
                if hasattr(self.drafter, "load_target_embeddings"):
                    self.drafter.load_target_embeddings(target.embed_weight, target.lm_head_weight)
                else:
                    self.drafter.lm_head.weight.copy_(target.lm_head_weight)

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
        w = self.loss_weights
        if self.drafter_config.algorithm == "eagle3":
            out = self.drafter(batch["input_ids"], hidden, batch["loss_mask"])
            # A reduced draft vocabulary needs the target's own head for p_t; the full one is the drafter's copy.
            target_logits = self._load_target().logits if self.drafter.reduced_vocab else self.drafter.target_logits
            return eagle3_ttt_loss(out, self.drafter.compute_logits, last_hidden, target_logits,
                                   d2t=self.drafter.d2t if self.drafter.reduced_vocab else None,
                                   step_decay=w.step_decay, chunk_size=w.chunk_size)
        anchors, valid = batch.get("anchors"), batch.get("anchor_valid")
        if anchors is None:
            anchors, valid = sample_anchors(batch["loss_mask"], self.drafter_config.num_anchors)
        out = self.drafter(batch["input_ids"], hidden, batch["loss_mask"], anchors, valid)
        return block_drafter_loss(out, self.drafter.compute_logits, last_hidden, ce_weight=w.ce, l1_weight=w.l1,
                                  confidence_weight=w.confidence, decay=w.decay, chunk_size=w.chunk_size,
                                  fused=w.fused)

    def _log_step(self, result: LossOutput, stage: str, batch_size: int) -> None:
        on_step = stage == "train"
        sync = stage != "train"
        logs = {f"{stage}/{k}": v.detach() for k, v in result.terms.items()}
        if result.expected_tau is not None and not torch.isnan(result.expected_tau):
            logs[f"{stage}/expected_tau"] = result.expected_tau
        if result.accept_rate is not None:
            for k, (rate, count) in enumerate(zip(result.accept_rate, result.position_counts)):
                if count > 0:
                    logs[f"{stage}/accept_rate@{k}"] = rate
        self.log_dict(logs, on_step=on_step, on_epoch=not on_step, sync_dist=sync, batch_size=batch_size,
                      prog_bar=False)
        self.log(f"{stage}_loss", result.loss.detach(), on_step=on_step, on_epoch=not on_step, sync_dist=sync,
                 batch_size=batch_size, prog_bar=True)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        result = self.compute_loss(batch)
        self._log_step(result, "train", batch["input_ids"].shape[0])
        return result.loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if "prompt_ids" in batch:
            if self.decoding is None:
                raise ValueError(
                    "The validation data yields prompts (SuitesDataModule) but the model has no decoder: set "
                    "model.decoding (class_path: dspark_lightning.eval.validate.SpeculativeValidation)."
                )
            self.decoding.validation_step(self, batch, batch_idx)
            return
        result = self.compute_loss(batch)
        self._log_step(result, "val", batch["input_ids"].shape[0])

    def on_validation_epoch_start(self) -> None:
        if self.decoding is not None:
            self.decoding.on_validation_epoch_start(self)

    def on_validation_epoch_end(self) -> None:
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
