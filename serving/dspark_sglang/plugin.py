"""SGLang plugin (entry point group ``sglang.srt.plugins``, see serving/pyproject.toml).

SGLang calls :func:`register` in every server process before it resolves arguments or builds models
(``srt/plugins/__init__.py::load_plugins``). It adds our draft classes to SGLang's ``ModelRegistry`` under the
architecture names an export selects in ``config.json``; upstream classes and the algorithms' names
(``DSPARK``, ``DFLASH``, ``EAGLE3``) stay as they are. Exports that upstream serves as written keep upstream
architecture names and never reach these classes. Restrict loading with ``SGLANG_PLUGINS=dspark_lightning``.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def register() -> None:
    """Register ``DSparkLightningDraftModel`` and ``DFlashLightningDraftModel`` (dspark_sglang.models)."""
    from sglang.srt.models.registry import ModelRegistry

    from dspark_sglang.models import EntryClass

    for cls in EntryClass:
        ModelRegistry.models[cls.__name__] = cls
    logger.info("dspark_sglang: registered draft classes %s", [c.__name__ for c in EntryClass])
