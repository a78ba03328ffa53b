"""Draft models: pure ``nn.Module``s that import torch only (DSparkV4 also transformers' DeepSeek-V4 blocks)."""

from .config import DrafterConfig
from .dflash import DFlash
from .dspark import DSpark
from .eagle3 import Eagle3

__all__ = ["DrafterConfig", "DFlash", "DSpark", "DSparkV4", "Eagle3"]


def __getattr__(name: str):
    # DSparkV4 is built from transformers' DeepSeek-V4 blocks: import it (and transformers) only when asked for, so
    # the other drafters stay torch-only.
    if name == "DSparkV4":
        from .dspark_v4 import DSparkV4

        return DSparkV4
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
