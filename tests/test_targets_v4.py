"""DeepSeek-V4 targets (targets.py): a tiny V4 model builds in-process and eagerly, the captured hidden states are
the mean of each layer's mHC streams (what SGLang's V4 target hands a DSpark draft), and the builtin V4-Flash /
V4-Pro configs give the drafter its geometry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from dspark_lightning.drafters import DrafterConfig
from dspark_lightning.targets import (
    FrozenTarget,
    TargetConfig,
    attention_implementation,
    builtin_target_config,
    load_target_config,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((ROOT / "configs/deepseek_v4/smoke.yaml").read_text())["model"]["target"]["tiny"]


@pytest.fixture(scope="module")
def target() -> FrozenTarget:
    return FrozenTarget.from_config(TargetConfig(tiny=TINY), [-1, 0, 2])


def test_tiny_v4_target_builds_eagerly_and_captures_the_mean_of_the_mhc_streams(target):
    assert target.config.model_type == "deepseek_v4" and target.config._attn_implementation == "eager"
    assert target.num_layers == 4 and target.config.hc_mult == 4
    ids = torch.randint(0, TINY["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(0))
    out = target(ids, compute_logits=True)
    with torch.no_grad():
        reference = target.model(ids, output_hidden_states=True)
    # hidden_states: the widened embedding, then each layer's output streams [B, L, hc, H] (the last one post-norm).
    streams = reference.hidden_states
    h = TINY["hidden_size"]
    assert out.hidden.shape == (2, 40, 3 * h) and streams[1].shape == (2, 40, 4, h)
    torch.testing.assert_close(out.hidden[..., :h], target.model.get_input_embeddings()(ids), rtol=0, atol=0)
    torch.testing.assert_close(out.hidden[..., h:2 * h], streams[1].mean(2), rtol=0, atol=0)
    torch.testing.assert_close(out.hidden[..., 2 * h:], streams[3].mean(2), rtol=0, atol=0)
    torch.testing.assert_close(out.last_hidden, streams[-1], rtol=0, atol=0)
    torch.testing.assert_close(out.logits, reference.logits, rtol=0, atol=0)


def test_attention_implementation_is_eager_for_v4_only():
    assert attention_implementation(load_target_config(TargetConfig(tiny=TINY))) == "eager"
    qwen = load_target_config(TargetConfig(tiny=dict(model_type="qwen3", vocab_size=64, hidden_size=32,
                                                     num_hidden_layers=2, num_attention_heads=4)))
    assert attention_implementation(qwen) == "sdpa"


@pytest.mark.parametrize(("repo", "layers", "hidden", "experts", "q_lora", "groups"), [
    ("deepseek-ai/DeepSeek-V4-Flash", 43, 4096, 256, 1024, 8),
    ("deepseek-ai/DeepSeek-V4-Pro", 61, 7168, 384, 1536, 16),
])
def test_builtin_v4_configs_resolve_the_drafter_geometry(repo, layers, hidden, experts, q_lora, groups):
    hf = builtin_target_config(repo)
    cfg = DrafterConfig(algorithm="dspark_v4", num_hidden_layers=3, target_layer_ids=[1, layers // 2, layers - 2],
                        block_size=5).resolve(hf)
    assert (cfg.num_target_layers, cfg.hidden_size, cfg.vocab_size, cfg.head_dim) == (layers, hidden, 129280, 512)
    assert (cfg.rope_theta, cfg.partial_rotary_factor) == (10000, 0.125)  # the main (sliding-window) rotary
    geometry = cfg.v4_geometry
    assert (geometry["n_routed_experts"], geometry["num_experts_per_tok"], geometry["q_lora_rank"]) == (experts, 6,
                                                                                                         q_lora)
    assert (geometry["o_groups"], geometry["sliding_window"], geometry["hc_mult"]) == (groups, 128, 4)
    assert cfg.mask_token_id == 129279  # no pad token: the last embedding row
