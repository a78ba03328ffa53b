"""``PreTrainedModel`` wrapper of a dspark_lightning drafter, shipped as remote code in ``hf`` exports.

The exporter copies the drafter sources of the package next to this file (``drafter_registry.py``, which builds
the drafter of ``config.drafter["algorithm"]``, and what it imports: ``drafter_config.py``, ``drafter_layers.py``,
``drafter_dflash.py``, ``drafter_dspark.py``, ``drafter_eagle3.py``, ...) with their imports made local, so the model
that loads here is the very code that was trained, not a re-implementation.

Usage::

    model = AutoModel.from_pretrained(repo_or_dir, trust_remote_code=True)
    out = model(input_ids, target_hidden, loss_mask, anchors, anchor_valid)  # block drafters (training pass)
    out = model(input_ids, target_hidden, loss_mask)                          # Eagle3 (training-time test)
    drafter = model.drafter  # DSpark / DFlash / Eagle3: new_cache, extend_context, propose, compute_logits

Weights are stored under the drafter's own parameter names (``fc.weight``, ``layers.0.self_attn.q_proj.weight``,
``markov_head.markov_w1.weight``, ...); ``base_model_prefix`` maps them onto ``self.drafter``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

from .configuration_dspark_lightning import DSparkLightningConfig
from .drafter_config import DrafterConfig
from .drafter_layers import RotaryEmbedding
from .drafter_registry import build


class DSparkLightningDrafter(PreTrainedModel):
    """A DSpark, DFlash or Eagle3 drafter (chosen by ``config.drafter["algorithm"]``)."""

    config_class = DSparkLightningConfig
    base_model_prefix = "drafter"
    main_input_name = "input_ids"

    def __init__(self, config: DSparkLightningConfig) -> None:
        super().__init__(config)
        drafter_config = DrafterConfig.from_dict(config.drafter)
        self.drafter = build(drafter_config)  # the shipped copy of drafters/registry.py
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> DSparkLightningDrafter:
        """``PreTrainedModel.from_pretrained``, then every parameter is copied into freshly allocated memory.

        Loaded tensors can be views into a memory-mapped file at arbitrary byte offsets; CPU kernels take other
        code paths for such memory and may round differently in the last bit. Own, aligned copies make the
        outputs bit-identical to the same weights loaded any other way (and release the file).
        """
        model = super().from_pretrained(*args, **kwargs)
        with torch.no_grad():
            for module in model.modules():
                for name, param in list(module.named_parameters(recurse=False)):
                    module.register_parameter(
                        name, torch.nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
                    )
        return model

    def _init_weights(self, module: torch.nn.Module) -> None:
        # Every parameter and persistent buffer comes from the checkpoint. The rotary frequencies are a
        # non-persistent buffer: recompute them, since `from_pretrained` builds the module without data.
        if isinstance(module, RotaryEmbedding):
            fresh = RotaryEmbedding.from_config(self.drafter.config)
            with torch.no_grad():
                module.inv_freq.copy_(fresh.inv_freq.to(module.inv_freq.device))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The drafter's training forward; see ``drafter_dflash.DFlash.forward`` / ``drafter_eagle3.Eagle3.forward``."""
        return self.drafter(*args, **kwargs)
