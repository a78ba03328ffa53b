"""Draft models: pure ``nn.Module``s that import torch only."""

from .config import DrafterConfig
from .dflash import DFlash
from .dspark import DSpark
from .eagle3 import Eagle3

__all__ = ["DrafterConfig", "DFlash", "DSpark", "Eagle3"]
