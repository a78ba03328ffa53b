"""The DeepSeek-V4 DSpark drafter (drafters/dspark_v4.py): golden forward and loss, train/inference agreement, the
official ``mtp.*`` names, the SGLang config keys, the configs (smoke fit, V4-Flash/V4-Pro on the meta device).

The reference below re-derives the drafter's forward from the DeepSeek-V4 equations (mHC with Sinkhorn mixing,
low-rank q with per-head norm, one K=V head with interleaved partial RoPE, sinks, grouped output projection,
top-k ``sqrtsoftplus`` MoE with clamped SwiGLU, paper Eq. 2-3 context injection) in float64 with plain torch ops,
block by block, reading weights from ``state_dict()`` by name; the window rule is applied by slicing the context
(positions ``a - W .. a - 1``), not with a mask. transformers' V4 blocks compute norms, RoPE and mHC in float32
internally, and the loss works in float32, so they agree to float32 precision.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from dspark_lightning.drafters import DrafterConfig
from dspark_lightning.drafters.dspark_v4 import (
    DSparkV4,
    mtp_to_v4_names,
    parameter_counts,
    v4_config_keys,
    v4_to_mtp_names,
)
from dspark_lightning.drafters.protocol import TemperatureSampler
from dspark_lightning.losses import block_drafter_loss
from dspark_lightning.targets import TargetConfig, load_target_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "deepseek_v4"
TINY = yaml.safe_load((CONFIGS / "smoke.yaml").read_text())["model"]["target"]["tiny"]  # hidden 64, window 16
GAMMA, RANK, MASK_ID, B, L = 5, 8, 255, 2, 24
# Row 0: anchors past the window (17, 20, 22; window 16) and blocks running off the end; row 1: a loss-mask tail
# (positions >= 20 untrained) and one padded, invalid anchor, as sample_anchors produces.
ANCHORS = torch.tensor([[3, 9, 17, 20, 22], [6, 12, 18, 19, 0]])
ANCHOR_VALID = torch.tensor([[True] * 5, [True] * 4 + [False]])
TOL = dict(atol=1e-10, rtol=1e-10)
# transformers' V4 modules normalise, rotate and mix the mHC streams in float32 even for float64 inputs; the loss
# builds its probabilities in float32 (losses.py) and the confidence head returns float32 logits.
TOL_V4 = dict(atol=1e-5, rtol=1e-4)
TOL_LOSS = dict(atol=1e-6, rtol=1e-6)


@functools.cache
def target_hf_config():
    return load_target_config(TargetConfig(tiny=TINY))


def make_config(**overrides) -> DrafterConfig:
    fields = dict(algorithm="dspark_v4", num_hidden_layers=2, target_layer_ids=[0, 2], block_size=GAMMA,
                  num_anchors=5, markov_rank=RANK, mask_token_id=MASK_ID)
    return DrafterConfig(**{**fields, **overrides}).resolve(target_hf_config())


def build(cfg: DrafterConfig, seed: int = 0) -> DSparkV4:
    """A float64 drafter whose weights are spread out (the default init leaves sinks, biases and mHC bases at 0 and
    scales at 1, which would hide a swapped or unused tensor); matrices get std 1/sqrt(fan_in)."""
    torch.manual_seed(seed)
    model = DSparkV4(cfg).to(torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in sorted(model.state_dict(keep_vars=True).items()):
            noise = torch.randn(t.shape, generator=g, dtype=t.dtype)
            if "norm" in name or name.endswith("scale"):
                t.copy_(1.0 + 0.2 * noise)
            elif name.endswith(("base", "sinks", "e_score_correction_bias")):
                t.copy_(0.3 * noise)
            elif t.dim() >= 2:
                t.copy_(noise / (1.0 if "embed" in name or "markov_w1" in name else math.sqrt(t.shape[-1])))
    return model


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, MASK_ID, (B, L), generator=g)
    target_hidden = torch.randn(B, L, 2 * TINY["hidden_size"], generator=g, dtype=torch.float64)
    last_hidden = torch.randn(B, L, TINY["hidden_size"], generator=g, dtype=torch.float64)
    loss_mask = torch.ones(B, L, dtype=torch.bool)
    loss_mask[:, :2] = False
    loss_mask[1, 20:] = False
    return ids, target_hidden, last_hidden, loss_mask


# ---------------------------------------------------------------------- independent float64 reference
def rms(x, weight=None, eps=1e-6):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight


def rope(x, positions, cfg, inverse=False):
    """Rotate the trailing ``head_dim * partial_rotary_factor`` channels as pairs (a, b) -> (a + ib) e^{i pos f}."""
    rd = int(cfg.head_dim * cfg.partial_rotary_factor)
    freqs = cfg.rope_theta ** (-torch.arange(0, rd, 2, dtype=torch.float64) / rd)
    angle = positions.double()[:, None] * freqs * (-1.0 if inverse else 1.0)  # [T, rd/2]
    a, b = x[..., -rd:][..., 0::2], x[..., -rd:][..., 1::2]
    turned = torch.stack([a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()], -1).flatten(-2)
    return torch.cat([x[..., :-rd], turned], -1)


def mhc(sd, p, streams, cfg):
    """Hyper-connection weights of streams [T, n, H]: pre/post [T, n], doubly-stochastic comb [T, n, n]."""
    n, eps = cfg.v4_geometry["hc_mult"], cfg.v4_geometry["hc_eps"]
    mix = rms(streams.flatten(1)) @ sd[p + "fn"].T
    scale, base = sd[p + "scale"], sd[p + "base"]
    pre = torch.sigmoid(mix[:, :n] * scale[0] + base[:n]) + eps
    post = 2 * torch.sigmoid(mix[:, n:2 * n] * scale[1] + base[n:2 * n])
    comb = torch.softmax((mix[:, 2 * n:] * scale[2] + base[2 * n:]).view(-1, n, n), -1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(cfg.v4_geometry["hc_sinkhorn_iters"] - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return pre, post, comb


def attention(sd, p, x, pos, ctx, ctx_pos, cfg):
    """Block queries x [S, H] over keys [context rows ; block rows], all visible."""
    s, nh, d, g = x.shape[0], cfg.num_attention_heads, cfg.head_dim, cfg.v4_geometry["o_groups"]
    q = rms(x @ sd[p + "q_a_proj.weight"].T, sd[p + "q_a_norm.weight"]) @ sd[p + "q_b_proj.weight"].T
    q = rope(rms(q.view(s, nh, d)).transpose(0, 1), pos, cfg)  # [nh, S, d], per-head norm without weight

    def kv(h, at):
        return rope(rms(h @ sd[p + "kv_proj.weight"].T, sd[p + "kv_norm.weight"]), at, cfg)

    k = torch.cat([kv(ctx, ctx_pos), kv(x, pos)])  # K = V, [Lc + S, d]
    logits = q @ k.T / math.sqrt(d)
    sinks = sd[p + "sinks"][:, None, None].expand(nh, s, 1)
    probs = torch.softmax(torch.cat([logits, sinks], -1), -1)[..., :-1]
    o = rope(probs @ k, pos, cfg, inverse=True).transpose(0, 1).reshape(s, g, -1)
    o = torch.einsum("sgi,gri->sgr", o, sd[p + "o_a_proj.weight"].view(g, -1, o.shape[-1]))
    return o.reshape(s, -1) @ sd[p + "o_b_proj.weight"].T


def moe(sd, p, x, cfg):
    geo = cfg.v4_geometry
    limit, topk = geo["swiglu_limit"], geo["num_experts_per_tok"]

    def swiglu(h, gate, up, down):
        return (F.silu((h @ gate.T).clamp(max=limit)) * (h @ up.T).clamp(-limit, limit)) @ down.T

    scores = F.softplus(x @ sd[p + "gate.weight"].T).sqrt()
    chosen = (scores + sd[p + "gate.e_score_correction_bias"]).topk(topk, -1).indices
    weights = scores.gather(1, chosen)
    weights = weights / weights.sum(-1, keepdim=True) * geo["routed_scaling_factor"]
    out = swiglu(x, *(sd[p + f"shared_experts.{n}_proj.weight"] for n in ("gate", "up", "down")))
    gate_up, down = sd[p + "experts.gate_up_proj"], sd[p + "experts.down_proj"]
    inter = down.shape[-1]
    for t in range(x.shape[0]):
        for j in range(topk):
            e = chosen[t, j]
            out[t] += weights[t, j] * swiglu(x[t], gate_up[e, :inter], gate_up[e, inter:], down[e])
    return out


def stage(sd, i, streams, pos, ctx, ctx_pos, cfg):
    p = f"layers.{i}."
    for hc, norm, block in (("attn_hc.", "input_layernorm", "attn"), ("ffn_hc.", "post_attention_layernorm", "ffn")):
        pre, post, comb = mhc(sd, p + hc, streams, cfg)
        x = rms((pre[..., None] * streams).sum(1), sd[p + norm + ".weight"])
        y = attention(sd, p + "self_attn.", x, pos, ctx, ctx_pos, cfg) if block == "attn" else moe(sd, p + "mlp.", x,
                                                                                                       cfg)
        streams = post[..., None] * y[:, None] + torch.einsum("tjk,tjh->tkh", comb, streams)
    return streams


def reference_block(sd, cfg, ids, target_hidden, anchor):
    """(final-normed, collapsed) [gamma, H] of one block of one row."""
    geo = cfg.v4_geometry
    context = rms(target_hidden @ sd["fc.weight"].T, sd["hidden_norm.weight"])
    lo = max(0, anchor - geo["sliding_window"])
    ctx, ctx_pos = context[lo:anchor], torch.arange(lo, anchor)
    block = torch.tensor([int(ids[anchor])] + [MASK_ID] * (GAMMA - 1))
    pos = torch.arange(anchor, anchor + GAMMA)
    streams = sd["embed_tokens.weight"][block][:, None].expand(GAMMA, geo["hc_mult"], -1)
    for i in range(cfg.num_hidden_layers):
        streams = stage(sd, i, streams, pos, ctx, ctx_pos, cfg)
    pre = torch.sigmoid(rms(streams.flatten(1)) @ sd["hc_head.hc_fn"].T * sd["hc_head.hc_scale"]
                        + sd["hc_head.hc_base"]) + geo["hc_eps"]
    collapsed = (pre[..., None] * streams).sum(1)
    return rms(collapsed, sd["norm.weight"]), collapsed


# ---------------------------------------------------------------------- golden tests
def test_forward_matches_the_float64_reference_block_by_block():
    cfg = make_config()
    model = build(cfg)
    sd = model.state_dict()
    ids, target_hidden, _, loss_mask = inputs()
    out = model(ids, target_hidden, loss_mask, ANCHORS, ANCHOR_VALID)
    for b in range(B):
        for n, anchor in enumerate(ANCHORS[b].tolist()):
            normed, collapsed = reference_block(sd, cfg, ids[b], target_hidden[b], anchor)
            torch.testing.assert_close(out.hidden[b, n], normed, **TOL_V4)
            prev = ids[b, (anchor + torch.arange(GAMMA)).clamp(max=L - 1)]
            w1 = sd["markov_head.markov_w1.weight"][prev]
            torch.testing.assert_close(out.markov_features[b, n], w1, **TOL)
            confidence = torch.cat([collapsed, w1], -1) @ sd["confidence_head.proj.weight"][0]
            torch.testing.assert_close(out.confidence_logits[b, n], confidence.float(), **TOL_V4)


def test_loss_terms_match_a_float64_computation_from_the_drafter_logits():
    cfg = make_config()
    model = build(cfg)
    ids, target_hidden, last_hidden, loss_mask = inputs()
    out = model(ids, target_hidden, loss_mask, ANCHORS, ANCHOR_VALID)
    result = block_drafter_loss(out, model.compute_logits, last_hidden, ce_weight=0.1, l1_weight=0.9,
                                confidence_weight=1.0, decay=4.0)
    logits = model.compute_logits(out.hidden, out.markov_features).detach()  # [B, N, K, V]
    target_logits = last_hidden @ model.lm_head.weight.T
    sums = dict(ce=0.0, l1=0.0, confidence=0.0, weight=0.0)
    for b in range(B):
        for n, anchor in enumerate(ANCHORS[b].tolist()):
            for k in range(GAMMA):
                label_pos = anchor + 1 + k
                if not (ANCHOR_VALID[b, n] and label_pos < L and loss_mask[b, label_pos]):
                    break  # only a contiguous prefix of a block is supervised
                w = math.exp(-k / 4.0)
                p_draft = torch.softmax(logits[b, n, k], -1)
                p_target = torch.softmax(target_logits[b, anchor + k], -1)
                l1 = (p_draft - p_target).abs().sum()
                z, label = out.confidence_logits[b, n, k].detach().double(), (1 - 0.5 * l1).clamp(0, 1)
                sums["ce"] += w * -torch.log(p_draft[ids[b, label_pos]])
                sums["l1"] += w * l1
                sums["confidence"] += w * (F.softplus(z) - z * label)
                sums["weight"] += w
    expected = {k: sums[k] / (sums["weight"] + 1e-6) for k in ("ce", "l1", "confidence")}
    expected["loss"] = 0.1 * expected["ce"] + 0.9 * expected["l1"] + expected["confidence"]
    for name, value in expected.items():
        torch.testing.assert_close(result.terms[name].detach().double(), value, **TOL_LOSS)


def test_training_and_inference_give_the_same_block():
    """One backbone pass per row from a context cache filled in uneven chunks equals the training pass, and the
    sampled proposal's distributions equal the teacher-forced training logits when the data holds those samples."""
    cfg = make_config()
    model = build(cfg)
    ids, target_hidden, _, loss_mask = inputs(seed=1)
    anchors = torch.tensor([19, 7])  # row 0 attends to a full window (3..18), row 1 to positions 0..6
    cache = model.new_cache(B, capacity=4)  # grows while extending
    model.extend_context(cache, target_hidden[:, :5])
    model.extend_context(cache, target_hidden[:, 5:19], counts=anchors - 5)
    assert cache.lengths.tolist() == anchors.tolist()
    proposal = model.propose(cache, ids[torch.arange(B), anchors],
                             TemperatureSampler(1.0, torch.Generator().manual_seed(0)))
    forced = ids.clone()
    for b, a in enumerate(anchors.tolist()):
        forced[b, a + 1:a + GAMMA] = proposal.tokens[b, :GAMMA - 1]
    out = model(forced, target_hidden, loss_mask, anchors[:, None], torch.ones(B, 1, dtype=torch.bool))
    hidden, collapsed = model.draft_hidden(cache, ids[torch.arange(B), anchors])
    torch.testing.assert_close(hidden, out.hidden[:, 0], **TOL_V4)
    probs = torch.softmax(model.compute_logits(out.hidden, out.markov_features)[:, 0], -1)
    torch.testing.assert_close(proposal.probs.double(), probs, **TOL_V4)
    torch.testing.assert_close(proposal.confidence, torch.sigmoid(out.confidence_logits[:, 0]), **TOL_V4)


# ---------------------------------------------------------------------- config
def test_resolve_reads_the_v4_geometry_and_checks_the_pairing(tiny_target_config):
    cfg = make_config()
    hf = target_hf_config()
    assert cfg.v4_geometry["sliding_window"] == hf.sliding_window == 16
    assert (cfg.head_dim, cfg.intermediate_size, cfg.partial_rotary_factor) == (32, 64, 0.125)
    smaller = make_config(v4_geometry={"n_routed_experts": 2, "num_experts_per_tok": 1})
    assert DSparkV4(smaller).layers[0].mlp.experts.gate_up_proj.shape[0] == 2
    with pytest.raises(ValueError, match="only .*may differ"):
        make_config(v4_geometry={"hc_mult": 2})
    with pytest.raises(ValueError, match="algorithm 'dspark_v4'"):
        make_config(algorithm="dspark")
    with pytest.raises(ValueError, match="one draft stage per target feature layer"):
        make_config(num_hidden_layers=3)
    with pytest.raises(ValueError, match="vanilla"):
        make_config(markov_head_type="gated")
    with pytest.raises(ValueError, match="DeepSeek-V4 targets"):
        DrafterConfig(algorithm="dspark_v4", num_hidden_layers=2, target_layer_ids=[0, 2]).resolve(tiny_target_config)


# ---------------------------------------------------------------------- official names and config keys
def test_mtp_names_round_trip_and_follow_the_official_layout():
    cfg = make_config()
    model = build(cfg)
    sd = model.state_dict()
    for offset in (0, 3):
        official = v4_to_mtp_names(sd, stage_offset=offset)
        back = mtp_to_v4_names(official, stage_offset=offset)
        assert set(sd) - set(back) == {"embed_tokens.weight", "lm_head.weight"}
        assert all(torch.equal(back[k], sd[k]) for k in back)
    official = v4_to_mtp_names(sd)
    experts = cfg.v4_geometry["n_routed_experts"]
    stage = {"attn.wq_a.weight", "attn.q_norm.weight", "attn.wq_b.weight", "attn.wkv.weight", "attn.kv_norm.weight",
             "attn.wo_a.weight", "attn.wo_b.weight", "attn.attn_sink", "attn_norm.weight", "ffn_norm.weight",
             "ffn.gate.weight", "ffn.gate.bias", *(f"hc_{s}_{p}" for s in ("attn", "ffn") for p in ("fn", "base",
                                                                                                      "scale")),
             *(f"ffn.shared_experts.w{i}.weight" for i in (1, 2, 3)),
             *(f"ffn.experts.{e}.w{i}.weight" for e in range(experts) for i in (1, 2, 3))}
    first = {"main_proj.weight", "main_norm.weight"}
    last = {"norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale", "markov_head.embed.weight",
            "markov_head.head.weight", "confidence_head.proj.weight"}
    expected = {f"mtp.0.{n}" for n in stage | first} | {f"mtp.1.{n}" for n in stage | last}
    assert set(official) == expected
    gate_up = sd["layers.1.mlp.experts.gate_up_proj"]
    inter = gate_up.shape[1] // 2
    assert torch.equal(official["mtp.1.ffn.experts.1.w3.weight"], gate_up[1, inter:])  # w1 gate, w3 up, w2 down
    # A model loaded from the official tensors (plus the target's embed/head) drafts the same logits.
    fresh = build(cfg, seed=5)
    missing, unexpected = fresh.load_state_dict(mtp_to_v4_names(official), strict=False)
    assert sorted(missing) == ["embed_tokens.weight", "lm_head.weight"] and not unexpected
    fresh.embed_tokens.weight.data.copy_(model.embed_tokens.weight)
    fresh.lm_head.weight.data.copy_(model.lm_head.weight)
    ids, target_hidden, _, loss_mask = inputs()
    a, b = (m(ids, target_hidden, loss_mask, ANCHORS, ANCHOR_VALID) for m in (model, fresh))
    torch.testing.assert_close(model.compute_logits(a.hidden, a.markov_features),
                               fresh.compute_logits(b.hidden, b.markov_features), **TOL)
    with pytest.raises(ValueError, match="not a DSpark V4 draft tensor"):
        mtp_to_v4_names({"mtp.0.e_proj.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="not a DSparkV4 tensor"):
        v4_to_mtp_names({"layers.0.unknown": torch.zeros(1)})


def test_config_keys_name_what_sglang_reads_from_the_target_config():
    cfg = make_config()
    keys = v4_config_keys(cfg)
    assert keys == {
        "dspark_block_size": 5, "dspark_markov_rank": RANK, "dspark_markov_head_type": "vanilla",
        "dspark_noise_token_id": MASK_ID, "dspark_target_layer_ids": [0, 2], "dspark_n_routed_experts": 4,
        "dspark_num_experts_per_tok": 2, "enable_confidence_head": True, "confidence_head_with_markov": True,
    }
    json.dumps(keys)  # goes into config.json as is
    with pytest.raises(ValueError, match="Markov head"):
        v4_config_keys(make_config(markov_rank=0, confidence_head_with_markov=False))
    with pytest.raises(ValueError, match="ids >= 0"):
        v4_config_keys(make_config(target_layer_ids=[-1, 2]))


# ---------------------------------------------------------------------- shipped configs
def test_smoke_config_fits_on_cpu_and_lowers_the_loss(tmp_path):
    from dspark_lightning.cli import lightning_main

    lightning_main(["fit", "--config", str(CONFIGS / "smoke.yaml"), "--trainer.default_root_dir", str(tmp_path),
                    "--trainer.enable_progress_bar", "false"])
    summary = json.loads(sorted(tmp_path.rglob("summary.json"))[-1].read_text())
    assert summary["steps"] == 30
    assert summary["train_loss_last"] < summary["train_loss_first"] - 0.05, summary


# Parameter counts of docs/deepseek_v4.md (total, trainable, activated per drafted token).
PRODUCTION = {
    "dspark_v4_flash": dict(hidden=4096, experts=256,
                            counts=dict(total=20_904_911_975, trainable=19_845_850_215, activated=1_467_921_767)),
    "dspark_v4_pro": dict(hidden=7168, experts=384,
                          counts=dict(total=79_285_573_415, trainable=77_432_215_335, activated=3_413_439_527)),
}


@pytest.mark.parametrize("name", sorted(PRODUCTION))
def test_production_configs_instantiate_on_the_meta_device(name):
    from dspark_lightning.cli import lightning_main

    with torch.device("meta"):
        cli = lightning_main(["--config", str(CONFIGS / f"{name}.yaml")], run=False)
    drafter, cfg = cli.model.drafter, cli.model.drafter_config
    assert isinstance(drafter, DSparkV4) and drafter.fc.weight.is_meta
    assert (cfg.block_size, cfg.num_hidden_layers, len(cfg.target_layer_ids)) == (5, 3, 3)
    assert cfg.v4_geometry["sliding_window"] == 128 and cfg.has_markov_head and cfg.has_confidence_head
    assert (cfg.hidden_size, cfg.v4_geometry["n_routed_experts"]) == (PRODUCTION[name]["hidden"],
                                                                      PRODUCTION[name]["experts"])
    assert parameter_counts(drafter) == PRODUCTION[name]["counts"]
