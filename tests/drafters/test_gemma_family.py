"""The target family is configuration: a Gemma4 target gives DeepSpec's Gemma4 drafter
(``deepspec/modeling/{dspark,eagle3}/gemma4/``) from the same modules that serve Qwen3 and Llama.

Checked here: what ``DrafterConfig.resolve`` reads from a tiny Gemma4 text target built in-process (and from
the two places transformers versions keep the full-attention geometry), the DeepSpec Gemma4 tensor names, one
decoder layer against an independent float64 reference and against transformers' own Gemma4 full-attention
layer, train-time == inference-time block states (DFlash, DSpark) and TTT == cached inference (Eagle3), and
the errors for Gemma4 targets the variant does not cover. Qwen3/Llama keep their pre-norm layout.
"""

from __future__ import annotations

import dataclasses
import math
import types

import pytest
import torch

from dspark_lightning.drafters import DFlash, DrafterConfig, DSpark, Eagle3
from dspark_lightning.drafters._layers import DecoderLayer, RotaryEmbedding, scale_embedding
from dspark_lightning.targets import TargetConfig, load_target_config

V, H, NH, NKV, DH, INTER, LAYERS = 128, 64, 4, 2, 16, 96, 6
GDH, GKV, THETA, PARTIAL, CAP, EPS = 32, 1, 10000.0, 0.25, 30.0, 1e-6
MASK_ID, GAMMA = 4, 3
TINY_GEMMA4 = dict(
    model_type="gemma4_text", vocab_size=V, hidden_size=H, intermediate_size=INTER, num_hidden_layers=LAYERS,
    num_attention_heads=NH, num_key_value_heads=NKV, head_dim=DH, global_head_dim=GDH,
    num_global_key_value_heads=GKV, attention_k_eq_v=True, hidden_size_per_layer_input=0,
    final_logit_softcapping=CAP, max_position_embeddings=512, sliding_window=16, rms_norm_eps=EPS,
    rope_parameters={
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": PARTIAL, "rope_theta": THETA},
        "sliding_attention": {"rope_type": "default", "rope_theta": THETA},
    },
)
BLOCK_HEADS_OFF = dict(markov_rank=0, enable_confidence_head=False, confidence_head_with_markov=False)


def gemma4_target(**overrides):
    """HF Gemma4TextConfig of a tiny in-process target (through TargetConfig, as a YAML ``tiny:`` block would)."""
    return load_target_config(TargetConfig(tiny={**TINY_GEMMA4, **overrides}))


def drafter_config(algorithm: str = "dspark", target=None, **overrides) -> DrafterConfig:
    fields = dict(algorithm=algorithm, num_hidden_layers=1 if algorithm == "eagle3" else 2,
                  target_layer_ids=[0, 2, 4], block_size=GAMMA, num_anchors=4, markov_rank=8, ttt_length=3)
    fields |= BLOCK_HEADS_OFF if algorithm == "dflash" else {}
    return DrafterConfig(**{**fields, **overrides}).resolve(target if target is not None else gemma4_target())


@torch.no_grad()
def spread_weights(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights large enough that every norm, projection and the layer scalar matter (0.02 init is too flat)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        if "norm" in name:
            p.copy_(1.0 + 0.3 * noise)
        elif name.endswith("bias"):
            p.copy_(0.3 * noise)
        elif "embed" in name or "markov_w1" in name:
            p.copy_(noise)
        else:
            p.copy_(noise * p.shape[1] ** -0.5)
    for name, buffer in model.named_buffers():
        if name.endswith("layer_scalar"):
            buffer.fill_(0.8)  # not 1: a layer that forgot to apply it would be caught
    return model


# ---------------------------------------------------------------------------------------------- resolve
def test_gemma4_target_resolves_the_gemma_features():
    cfg = drafter_config()
    assert (cfg.norm_style, cfg.attention_scale, cfg.attention_k_eq_v, cfg.v_norm, cfg.layer_scalar) == (
        "sandwich", 1.0, True, True, True)
    assert (cfg.global_head_dim, cfg.num_global_key_value_heads) == (GDH, GKV)
    assert (cfg.attention_head_dim, cfg.attention_num_kv_heads) == (GDH, GKV)  # full-attention geometry
    assert (cfg.head_dim, cfg.num_key_value_heads) == (DH, NKV)  # the target's own values, unchanged
    assert (cfg.rope_type, cfg.partial_rotary_factor, cfg.rope_theta) == ("proportional", PARTIAL, THETA)
    assert cfg.embed_scale == pytest.approx(math.sqrt(H)) and cfg.qk_norm is True
    assert (cfg.hidden_act, cfg.final_logit_softcapping, cfg.mask_token_id) == ("gelu_pytorch_tanh", CAP, 4)
    assert cfg.resolve(gemma4_target()) == cfg, "resolve is idempotent"


def test_gemma4_without_k_eq_v_keeps_v_proj_and_the_target_kv_heads():
    cfg = drafter_config("dflash", gemma4_target(attention_k_eq_v=False))
    assert cfg.attention_k_eq_v is False and (cfg.attention_head_dim, cfg.attention_num_kv_heads) == (GDH, NKV)
    names = DFlash(cfg).state_dict()
    assert tuple(names["layers.0.self_attn.v_proj.weight"].shape) == (NKV * GDH, H)


def test_full_attention_geometry_read_from_config_json_attributes():
    """Hub config.json files (and transformers <= 5.1x) keep global_head_dim/num_global_key_value_heads as plain
    attributes; newer transformers moves them into per_layer_config. Both give the same drafter."""
    text = types.SimpleNamespace(**{k: v for k, v in TINY_GEMMA4.items() if k != "model_type"},
                                 model_type="gemma4_unified_text", hidden_activation="gelu_pytorch_tanh",
                                 attention_bias=False)
    nested = types.SimpleNamespace(model_type="gemma4_unified", text_config=text)
    from_attributes = drafter_config(target=nested)
    from_transformers = drafter_config()
    assert dataclasses.replace(from_attributes, target_model_type="gemma4_text") == from_transformers


@pytest.mark.parametrize("model_type", ["qwen3", "llama"])
def test_qwen3_and_llama_keep_the_pre_norm_layout(model_type):
    target = types.SimpleNamespace(
        model_type=model_type, vocab_size=V, hidden_size=H, intermediate_size=INTER, num_attention_heads=NH,
        num_key_value_heads=NKV, head_dim=DH, rms_norm_eps=EPS, max_position_embeddings=256, attention_bias=False,
        hidden_act="silu", num_hidden_layers=LAYERS, rope_theta=THETA)
    cfg = drafter_config(target=target)
    assert (cfg.norm_style, cfg.attention_scale, cfg.attention_k_eq_v, cfg.v_norm, cfg.layer_scalar) == (
        "pre", None, False, False, False)
    assert (cfg.global_head_dim, cfg.rope_type, cfg.partial_rotary_factor) == (None, "default", 1.0)
    assert (cfg.attention_head_dim, cfg.attention_num_kv_heads) == (DH, NKV)
    keys = set(DSpark(cfg).state_dict())
    assert not {k for k in keys if "feedforward" in k or "layer_scalar" in k or "v_norm" in k}
    assert "layers.0.self_attn.v_proj.weight" in keys


# ------------------------------------------------------------------------------------------------ names
def gemma4_layer_shapes(prefix: str, attn_in: int) -> dict[str, tuple[int, ...]]:
    """DeepSpec's Gemma4 layer (``gemma4/modeling.py``): sandwich norms, layer_scalar, q/k norms, no v_proj (K = V)."""
    return {prefix + "input_layernorm.weight": (H,), prefix + "post_attention_layernorm.weight": (H,),
            prefix + "pre_feedforward_layernorm.weight": (H,), prefix + "post_feedforward_layernorm.weight": (H,),
            prefix + "layer_scalar": (1,),
            prefix + "self_attn.q_proj.weight": (NH * GDH, attn_in),
            prefix + "self_attn.k_proj.weight": (GKV * GDH, attn_in),
            prefix + "self_attn.o_proj.weight": (H, NH * GDH), prefix + "self_attn.q_norm.weight": (GDH,),
            prefix + "self_attn.k_norm.weight": (GDH,), prefix + "mlp.gate_proj.weight": (INTER, H),
            prefix + "mlp.up_proj.weight": (INTER, H), prefix + "mlp.down_proj.weight": (H, INTER)}


def test_dspark_and_dflash_state_dicts_use_deepspec_gemma4_names():
    rank, m = 8, 3
    shared = {"embed_tokens.weight": (V, H), "fc.weight": (H, m * H), "hidden_norm.weight": (H,),
              "norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(2):
        shared |= gemma4_layer_shapes(f"layers.{i}.", H)
    heads = {"markov_head.markov_w1.weight": (V, rank), "markov_head.markov_w2.weight": (V, rank),
             "confidence_head.proj.weight": (1, H + rank), "confidence_head.proj.bias": (1,)}
    dspark = {k: tuple(v.shape) for k, v in DSpark(drafter_config()).state_dict().items()}
    dflash = {k: tuple(v.shape) for k, v in DFlash(drafter_config("dflash")).state_dict().items()}
    assert dspark == shared | heads
    assert dflash == shared


def test_eagle3_state_dict_uses_deepspec_gemma4_names():
    model = Eagle3(drafter_config("eagle3"))
    expected = {"embed_tokens.weight": (V, H), "fc.weight": (H, 3 * H), "norm.weight": (H,), "lm_head.weight": (V, H),
                "layers.0.hidden_norm.weight": (H,)} | gemma4_layer_shapes("layers.0.", 2 * H)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == {"embed_tokens.weight", "lm_head.weight"}


# -------------------------------------------------------------------------------- one layer, float64 golden
def ref_rms(x, weight=None, eps=EPS):
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight


def ref_rotate(x, positions):
    """Proportional RoPE written out pair by pair: pair i = dims (i, i + dh/2); the first
    int(PARTIAL * dh / 2) pairs turn by pos * THETA^(-2i/dh), the others stay as they are."""
    dh = x.shape[-1]
    half, rotated = dh // 2, int(PARTIAL * dh // 2)
    out = x.clone()
    for i in range(rotated):
        angle = positions.double()[..., None] * THETA ** (-2.0 * i / dh)  # [B, T, 1] -> broadcast over heads
        a, b = x[..., i], x[..., i + half]
        c, s = torch.cos(angle)[..., 0][:, :, None], torch.sin(angle)[..., 0][:, :, None]
        out[..., i], out[..., i + half] = a * c - b * s, b * c + a * s
    return out


def ref_gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def ref_gemma4_layer(sd, h, context, block_pos, ctx_pos, visible):
    """DeepSpec ``deepspec/modeling/dspark/gemma4/modeling.py``: q/k/v from the block (and k/v from the context
    through the same k_proj), V = K before the norms, k_norm with scale, v_norm without, proportional RoPE, scale
    1.0, sandwich norms, layer scalar.
    h [B, Q, H], context [B, L, H], visible [B, Q, L + Q] bool. Layout of heads: [B, T, heads, dh]."""
    w = lambda name: sd[name]
    b, q_len, _ = h.shape
    x = ref_rms(h, w("input_layernorm.weight"))
    q = ref_rms((x @ w("self_attn.q_proj.weight").T).view(b, q_len, NH, GDH), w("self_attn.q_norm.weight"))
    k_raw = (torch.cat([context, x], 1) @ w("self_attn.k_proj.weight").T).view(b, -1, GKV, GDH)
    k = ref_rms(k_raw, w("self_attn.k_norm.weight"))
    v = ref_rms(k_raw)
    q = ref_rotate(q, block_pos)
    k = ref_rotate(k, torch.cat([ctx_pos, block_pos], 1))
    group = NH // GKV
    heads = []
    for head in range(NH):
        kv = head // group
        scores = torch.einsum("bqd,bkd->bqk", q[:, :, head], k[:, :, kv]) * 1.0
        scores = scores.masked_fill(~visible, float("-inf"))
        heads.append(torch.softmax(scores, -1) @ v[:, :, kv])
    attn = torch.cat(heads, -1) @ w("self_attn.o_proj.weight").T
    h = h + ref_rms(attn, w("post_attention_layernorm.weight"))
    y = ref_rms(h, w("pre_feedforward_layernorm.weight"))
    y = (ref_gelu_tanh(y @ w("mlp.gate_proj.weight").T) * (y @ w("mlp.up_proj.weight").T)) @ w("mlp.down_proj.weight").T
    h = h + ref_rms(y, w("post_feedforward_layernorm.weight"))
    return h * w("layer_scalar")


def test_gemma4_decoder_layer_golden_float64():
    cfg = drafter_config("dflash")
    layer = spread_weights(DecoderLayer(cfg).double())
    rope = RotaryEmbedding.from_config(cfg)
    g = torch.Generator().manual_seed(3)
    b, ctx_len, q_len, anchor = 2, 9, GAMMA, 6
    h = torch.randn(b, q_len, H, generator=g, dtype=torch.float64)
    context = torch.randn(b, ctx_len, H, generator=g, dtype=torch.float64)
    ctx_pos = torch.arange(ctx_len).expand(b, ctx_len)
    block_pos = (anchor + torch.arange(q_len)).expand(b, q_len)
    # The block sees context p < anchor and itself (bidirectionally), as in training and at inference.
    visible = torch.cat([torch.arange(ctx_len).expand(b, q_len, ctx_len) < anchor,
                         torch.ones(b, q_len, q_len, dtype=torch.bool)], -1)
    with torch.no_grad():
        extra = layer.self_attn.project_kv(context, *rope(ctx_pos, torch.float64))
        got = layer(h, *rope(block_pos, torch.float64), extra, visible[:, None])
    expected = ref_gemma4_layer(layer.state_dict(), h, context, block_pos, ctx_pos, visible)
    # The rotary tables are built in fp32 (as HF's are), the reference's angles in fp64: 1e-5 as the other goldens.
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_gemma4_layer_matches_transformers_full_attention_layer():
    """Without injected context, our layer is transformers' own Gemma4 full-attention decoder layer (same
    parameter names, K = V, v_norm, scale 1.0, proportional RoPE over global_head_dim, sandwich norms)."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextDecoderLayer, Gemma4TextRotaryEmbedding

    target = gemma4_target()
    target._attn_implementation = "eager"
    full = target.layer_types.index("full_attention")
    theirs = spread_weights(Gemma4TextDecoderLayer(target, layer_idx=full))
    cfg = drafter_config("dflash", target)
    ours = DecoderLayer(cfg)
    ours.load_state_dict(theirs.state_dict())  # strict: identical names and shapes
    g = torch.Generator().manual_seed(5)
    b, t = 2, 7
    x = torch.randn(b, t, H, generator=g)
    pos = (3 + torch.arange(t)).expand(b, t)
    their_cos, their_sin = Gemma4TextRotaryEmbedding(target)(x, pos, "full_attention")
    cos, sin = RotaryEmbedding.from_config(cfg)(pos, x.dtype)
    torch.testing.assert_close((cos, sin), (their_cos, their_sin))
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    with torch.no_grad():
        expected = theirs(x, per_layer_input=None, shared_kv_states={}, position_embeddings=(their_cos, their_sin),
                          attention_mask=torch.zeros(t, t).masked_fill(~causal, float("-inf"))[None, None],
                          position_ids=pos)
        got = ours(x, cos, sin, None, causal[None, None])
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------------------------ train == inference
B, L = 2, 20
CHECK_ANCHORS = [0, 1, 6, 11, 16]


def block_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(MASK_ID + 1, V, (B, L), generator=g)
    target_hidden = torch.randn(B, L, 3 * H, generator=g, dtype=torch.float64)
    return ids, target_hidden


@pytest.mark.parametrize("algorithm", ["dflash", "dspark"])
def test_gemma4_train_hidden_equals_inference_hidden(algorithm):
    cfg = drafter_config(algorithm)
    model = spread_weights((DSpark if algorithm == "dspark" else DFlash)(cfg)).double()
    backbone = model.backbone if algorithm == "dspark" else model
    ids, target_hidden = block_inputs()
    anchors = torch.tensor(CHECK_ANCHORS).expand(B, -1)
    with torch.no_grad():
        trained = model(ids, target_hidden, torch.ones(B, L, dtype=torch.bool), anchors,
                        torch.ones_like(anchors, dtype=torch.bool)).hidden  # [B, N, K, H]
        for b in range(B):
            for i, a in enumerate(CHECK_ANCHORS):
                cache = model.new_cache(1, capacity=2)  # grows while committing
                model.extend_context(cache, target_hidden[b:b + 1, :a // 2])
                model.extend_context(cache, target_hidden[b:b + 1, a // 2:a])
                drafted = backbone.draft_hidden(cache, ids[b:b + 1, a])
                torch.testing.assert_close(drafted[0], trained[b, i], atol=1e-10, rtol=1e-10)
    assert cache.keys[0].shape[1:] == (GKV, cache.capacity, GDH)


def test_gemma4_eagle3_training_time_test_equals_cached_inference():
    cfg = drafter_config("eagle3")
    model = spread_weights(Eagle3(cfg)).double()
    ids, target_hidden = block_inputs()
    steps = cfg.ttt_length
    with torch.no_grad():
        out = model(ids, target_hidden, torch.ones(B, L, dtype=torch.bool))
        for i in (0, 4, L - steps - 1):
            cache = model.new_cache(B, capacity=4)
            model.extend_context(cache, target_hidden[:, :i + 1], ids[:, 1:i + 2])
            states = model.draft_states(cache, ids[:, i + 2:i + 1 + steps])
            torch.testing.assert_close(states, out.hidden[:, :, i].transpose(0, 1), atol=1e-10, rtol=1e-10)


def test_gemma4_logits_are_soft_capped():
    model = DFlash(drafter_config("dflash"))
    hidden = 50.0 * torch.randn(3, H)
    raw = model.lm_head(hidden)
    torch.testing.assert_close(model.compute_logits(hidden), CAP * torch.tanh(raw / CAP))
    assert model.compute_logits(hidden).abs().max() < CAP


def test_embedding_scale_is_rounded_to_the_embedding_dtype():
    """HF Gemma (and so DeepSpec's Gemma4 drafter) multiplies by sqrt(H) cast to the weight dtype."""
    ones = torch.ones(2, dtype=torch.bfloat16)
    assert scale_embedding(ones, math.sqrt(3840)).tolist() == [62.0, 62.0]
    x = torch.randn(4, dtype=torch.float64)
    assert torch.equal(scale_embedding(x, math.sqrt(3840)), x * math.sqrt(3840))


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("overrides,message", [
    (dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32),
     r"MoE.*enable_moe_block=true.*dense"),
    (dict(hidden_size_per_layer_input=8), r"hidden_size_per_layer_input=8.*=0"),
])
def test_gemma4_targets_outside_the_variant_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        drafter_config(target=gemma4_target(**overrides))


@pytest.mark.parametrize("rope,message", [
    ({"rope_type": "yarn", "factor": 4.0, "rope_theta": THETA}, r"rope_type='yarn'.*default.*proportional"),
    ({"rope_type": "proportional", "partial_rotary_factor": 0.25, "factor": 8.0, "rope_theta": THETA},
     r"factor=8.0.*only factor 1.0"),
    ({"rope_type": "default", "partial_rotary_factor": 0.5, "rope_theta": THETA},
     r"partial_rotary_factor=0.5.*'default'.*not implemented"),
])
def test_unsupported_full_attention_rope_raises(rope, message):
    target = types.SimpleNamespace(**{**TINY_GEMMA4, "hidden_activation": "gelu_pytorch_tanh",
                                      "rope_parameters": {"full_attention": rope, "sliding_attention": {}}})
    with pytest.raises(ValueError, match=message):
        drafter_config(target=target)


def test_style_override_is_validated():
    with pytest.raises(ValueError, match=r"norm_style='post'.*pre.*sandwich"):
        drafter_config(norm_style="post")
