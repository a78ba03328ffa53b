"""Shared test setup: offline, single-threaded, CPU-first.

The environment is set before torch/transformers/huggingface_hub are imported, because they read
these variables at import time (HF_HOME in particular is frozen into huggingface_hub's constants).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import types

_HF_HOME = tempfile.mkdtemp(prefix="dspark-test-hf-home-")
os.environ.update(
    OMP_NUM_THREADS="1",  # 2 intra-op threads + loader workers oversubscribe a 2-core CI box
    HF_HUB_OFFLINE="1",  # a Hub id fails at once instead of after ~20 s of DNS retries
    TOKENIZERS_PARALLELISM="false",
    MPLBACKEND="Agg",
    HF_HOME=_HF_HOME,  # never read or write the developer's Hub cache
)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; run `make test-gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_HF_HOME, ignore_errors=True)


@pytest.fixture(autouse=True)
def _reset_default_dtype():
    """A test that switches the default dtype (e.g. to bf16) must not leak it into the next one."""
    yield
    torch.set_default_dtype(torch.float32)


@pytest.fixture
def tiny_target_config() -> types.SimpleNamespace:
    """A Qwen3-shaped target config small enough to build in milliseconds."""
    return types.SimpleNamespace(
        model_type="qwen3",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        attention_bias=False,
        hidden_act="silu",
        num_hidden_layers=4,
        rope_theta=10000.0,
    )
