"""The sglang.srt.plugins entry point and the draft classes it registers."""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

import pytest

from dspark_sglang.check import _prepare_sglang


@pytest.fixture(scope="module", autouse=True)
def sglang_on_cpu() -> None:
    _prepare_sglang(verbose=False)


def test_entry_point_is_installed() -> None:
    eps = {e.name: e.value for e in md.entry_points(group="sglang.srt.plugins")}
    assert eps.get("dspark_lightning") == "dspark_sglang.plugin:register"


def test_load_plugins_registers_our_architectures() -> None:
    from sglang.srt.models.registry import ModelRegistry
    from sglang.srt.plugins import load_plugins

    load_plugins()
    for arch in ("DSparkLightningDraftModel", "DFlashLightningDraftModel"):
        cls, name = ModelRegistry.resolve_model_cls([arch])
        assert (cls.__module__, name) == ("dspark_sglang.models", arch)
    # Upstream classes stay upstream.
    assert ModelRegistry.resolve_model_cls(["Qwen3DSparkModel"])[0].__module__ == "sglang.srt.models.dspark"


def _build(exports: Path, name: str, **config_changes):
    from transformers import AutoConfig

    from dspark_sglang.models import DFlashLightningDraftModel, DSparkLightningDraftModel

    config = AutoConfig.from_pretrained(exports / name)
    for key, value in config_changes.items():
        setattr(config, key, value)
    cls = DSparkLightningDraftModel if "dspark" in name else DFlashLightningDraftModel
    return cls(config=config)


@pytest.mark.parametrize("name", ["dspark_llama", "dflash_llama"])
def test_no_qk_norm_layers(exports: Path, name: str) -> None:
    model = _build(exports, name)
    for layer in model.layers:
        assert not hasattr(layer.self_attn, "q_norm") and not hasattr(layer.self_attn, "k_norm")
        assert layer.self_attn.use_table_qk_norm_rope is False
    assert model.supports_fused_context_kv is False
    assert not any("norm" in n and "self_attn" in n for n, _ in model.named_parameters())


def test_with_qk_norm_our_class_is_upstream(exports: Path) -> None:
    """qk_norm true (or absent): the plugin class has exactly the upstream parameters."""
    from sglang.srt.models.dspark import Qwen3DSparkModel
    from transformers import AutoConfig

    ours = _build(exports, "dspark_llama", qk_norm=True)
    upstream = Qwen3DSparkModel(config=AutoConfig.from_pretrained(exports / "dspark_vanilla"))
    shapes = lambda m: {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes(ours) == shapes(upstream)
