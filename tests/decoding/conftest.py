"""Tiny targets and drafters for the decoding tests (built in-process, seeded)."""

from __future__ import annotations

import pytest
import torch

from dspark_lightning.drafters import DrafterConfig
from dspark_lightning.modules.drafter_module import build_drafter
from dspark_lightning.targets import FrozenTarget, TargetConfig, load_target_config


def tiny_target_config(vocab: int = 64, layers: int = 3, seed: int = 0) -> TargetConfig:
    """A peaked (initializer_range 0.2) random Qwen3 target."""
    return TargetConfig(tiny={"model_type": "qwen3", "vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64,
                              "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
                              "head_dim": 8, "max_position_embeddings": 512, "initializer_range": 0.2,
                              "tie_word_embeddings": False}, seed=seed)


DRAFTERS = {
    "dspark-vanilla": dict(algorithm="dspark", markov_rank=8, markov_head_type="vanilla"),
    "dspark-rnn": dict(algorithm="dspark", markov_rank=8, markov_head_type="rnn"),
    "dflash-deepspec": dict(algorithm="dflash", markov_rank=0, enable_confidence_head=False,
                            confidence_head_with_markov=False),
    "dflash-zlab": dict(algorithm="dflash", markov_rank=0, enable_confidence_head=False,
                        confidence_head_with_markov=False, block_layout="zlab"),
    "eagle3": dict(algorithm="eagle3", ttt_length=4),
}


def make_drafter(name: str, target_cfg: TargetConfig, *, block_size: int = 4, seed: int = 0,
                 layer_ids: tuple[int, ...] = (0, 2)) -> torch.nn.Module:
    hf = load_target_config(target_cfg)
    cfg = DrafterConfig(num_hidden_layers=1, target_layer_ids=list(layer_ids), block_size=block_size,
                        mask_token_id=hf.vocab_size - 1, **DRAFTERS[name]).resolve(hf)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        drafter = build_drafter(cfg)
    return drafter.eval()


@pytest.fixture(scope="module")
def target64() -> FrozenTarget:
    return FrozenTarget.from_config(tiny_target_config(), [0, 2])


@pytest.fixture(name="tiny_target_config")
def _tiny_target_config_factory():
    """``tiny_target_config(vocab=64, layers=3, seed=0) -> TargetConfig``."""
    return tiny_target_config


@pytest.fixture(name="make_drafter")
def _make_drafter_factory():
    """``make_drafter(name, target_cfg, block_size=4, seed=0, layer_ids=(0, 2))`` for the names in DRAFTERS."""
    return make_drafter


def greedy_reference(target: FrozenTarget, prompt: list[int], n: int) -> list[int]:
    """The target alone, no KV cache: a full forward per token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(target(torch.tensor([ids]), compute_logits=True).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def references_for(target64):
    """``references_for(prompts, n)``: :func:`greedy_reference` of ``target64`` for each prompt (computed once)."""
    cache: dict = {}

    def get(prompts: list[list[int]], n: int) -> list[list[int]]:
        key = (tuple(map(tuple, prompts)), n)
        if key not in cache:
            cache[key] = [greedy_reference(target64, p, n) for p in prompts]
        return cache[key]

    return get
