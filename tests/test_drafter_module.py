"""DrafterModule checks that must fire before training starts."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from dspark_lightning.drafters import DrafterConfig
from dspark_lightning.modules.drafter_module import DrafterModule
from dspark_lightning.targets import TargetConfig

SMOKE = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "smoke" / "dspark.yaml").read_text())


def module_with(optimizer, clip, precision):
    model = SMOKE["model"]
    module = DrafterModule(DrafterConfig(**model["drafter"]), TargetConfig(**model["target"]), optimizer=optimizer)
    module._trainer = SimpleNamespace(gradient_clip_val=clip, precision=precision, estimated_stepping_batches=10)
    return module


def test_fused_optimizer_with_clipping_under_amp_is_refused_with_the_fix():
    fused = lambda params: torch.optim.AdamW(params, lr=1e-3, fused=True)  # noqa: E731
    with pytest.raises(ValueError, match=r"AdamW\(fused=True\).*gradient_clip_val=1.0.*bf16-mixed.*Drop the"):
        module_with(fused, 1.0, "bf16-mixed").configure_optimizers()
    # without clipping, or in full precision, Lightning accepts it: so do we
    for clip, precision in ((None, "bf16-mixed"), (1.0, "32-true")):
        out = module_with(fused, clip, precision).configure_optimizers()
        assert out["optimizer"].defaults["fused"] is True


def test_gradient_clipping_under_fsdp_clips_through_the_wrapped_module(monkeypatch):
    """Lightning's FSDP precision plugin refuses norm clipping; the module hands it to the FSDP root module."""
    from lightning.pytorch.strategies import FSDPStrategy

    calls = []
    strategy = FSDPStrategy.__new__(FSDPStrategy)  # no process group: only the type and .model are used
    monkeypatch.setattr(FSDPStrategy, "model", SimpleNamespace(clip_grad_norm_=calls.append), raising=False)
    module = module_with(lambda p: torch.optim.AdamW(p), 1.0, "bf16-mixed")
    module._trainer.strategy = strategy
    module.configure_gradient_clipping(None, 0.5, "norm")
    module.configure_gradient_clipping(None, 0.25, None)  # Lightning passes None for its default, norm
    assert calls == [0.5, 0.25]
