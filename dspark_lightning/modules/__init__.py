"""The generic LightningModule that trains every drafter."""

from .checkpoints import allow_our_globals
from .drafter_module import DrafterModule, LossWeights

allow_our_globals()  # checkpoints written from Python pickle our config classes; let weights_only loads accept them

__all__ = ["DrafterModule", "LossWeights"]
