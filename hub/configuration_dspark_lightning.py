"""Hugging Face config class of a dspark_lightning drafter, shipped as remote code in ``hf`` exports.

The drafter's hyper-parameters are kept as one dict under ``drafter`` (exactly ``DrafterConfig.to_dict()``), so
the same keys describe the model in the package, in the Lightning checkpoint and on the Hub; nothing here
re-derives or renames them.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class DSparkLightningConfig(PretrainedConfig):
    """Config of :class:`DSparkLightningDrafter`.

    Args:
        drafter: ``DrafterConfig.to_dict()`` of a resolved drafter (geometry filled from the target).
        kwargs: standard ``PretrainedConfig`` arguments.
    """

    model_type = "dspark_lightning"

    def __init__(self, drafter: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.drafter = dict(drafter or {})
        # The drafter holds its own frozen copies of the target's embedding and head: never tie them.
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
