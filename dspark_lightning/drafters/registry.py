"""The one registry of drafter classes: ``config.algorithm`` -> the class that implements it (drafters/protocol.py).

Everything that builds a drafter from its config goes through :func:`build`: the LightningModule, the exporters and
the Hub wrapper (``hf`` exports ship a copy of this file next to the drafter sources). Adding a drafter is its file
plus one line here (docs/drafters.md).
"""

from __future__ import annotations

import contextlib
import importlib

import torch
from torch import nn

from .config import ALGORITHMS, DrafterConfig
from .dflash import DFlash
from .dspark import DSpark
from .eagle3 import Eagle3

CLASSES: dict[str, type[nn.Module]] = {"dspark": DSpark, "dflash": DFlash, "eagle3": Eagle3}
# Imported on first use, by module name next to this file: DSparkV4 is built from transformers' DeepSeek-V4 blocks,
# so the other drafters stay torch-only (and an ``hf`` export, which cannot hold it, does not ship it).
LAZY_CLASSES: dict[str, tuple[str, str]] = {"dspark_v4": ("dspark_v4", "DSparkV4")}


def drafter_class(algorithm: str) -> type[nn.Module]:
    """The drafter class of ``algorithm``.

    Raises:
        ValueError: an algorithm no drafter implements, or one whose module is not beside this file.
    """
    if algorithm in CLASSES:
        return CLASSES[algorithm]
    if algorithm not in LAZY_CLASSES:
        raise ValueError(f"Unknown drafter algorithm {algorithm!r}; choose one of {sorted(ALGORITHMS)}.")
    module, name = LAZY_CLASSES[algorithm]
    try:
        return getattr(importlib.import_module(f".{module}", __package__), name)
    except ModuleNotFoundError as err:
        if err.name is None or not err.name.endswith(module):
            raise
        raise ValueError(f"The {algorithm!r} drafter ({module}.py) is not in this copy of the drafters "
                         f"({__package__}); load it with the dspark_lightning package.") from err


def build(config: DrafterConfig, device: torch.device | str | None = None) -> nn.Module:
    """Instantiate the drafter of ``config.algorithm`` (config resolved; ``device="meta"`` builds it without
    memory)."""
    cls = drafter_class(config.algorithm)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return cls(config)
