"""The generic LightningModule that trains every drafter."""

from .drafter_module import DrafterModule, LossWeights

__all__ = ["DrafterModule", "LossWeights"]
