"""Golden, consistency and naming tests for the block drafters (DFlash, DSpark) and their loss.

The reference below is written from DeepSpec's source (``deepspec/modeling/dspark/``: ``qwen3/modeling.py``,
``common.py``, ``markov_head.py``, ``loss.py``) with plain torch ops in float64. It reads weights from
``state_dict()`` by name only, so it also pins the parameter names, and it builds the attention visibility rule
query by query (context ``p < anchor``, keys of the same block).
"""

from __future__ import annotations

import dataclasses
import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dspark_lightning.drafters import DFlash, DrafterConfig, DSpark
from dspark_lightning.drafters.protocol import TemperatureSampler
from dspark_lightning.losses import block_drafter_loss

V, H, NH, NKV, DH, INTER, EPS, THETA = 64, 32, 4, 2, 8, 64, 1e-6, 10000.0
NUM_LAYERS, RANK, GAMMA, MASK_ID = 2, 8, 4, 63
B, L = 2, 24
TOL = dict(atol=1e-5, rtol=1e-5)

# Fixed anchors: row 0 has blocks running off the end (20, 22); row 1 has a loss-mask tail (positions
# >= 20 untrained) and one padded, invalid anchor (0, False) as sample_anchors produces.
ANCHORS = torch.tensor([[6, 9, 13, 20, 22], [9, 12, 15, 18, 0]])
ANCHOR_VALID = torch.tensor([[True] * 5, [True, True, True, True, False]])


def target_config(**overrides) -> types.SimpleNamespace:
    base = dict(model_type="qwen3", vocab_size=V, hidden_size=H, intermediate_size=INTER,
                num_attention_heads=NH, num_key_value_heads=NKV, head_dim=DH, rms_norm_eps=EPS,
                max_position_embeddings=256, attention_bias=False, hidden_act="silu", num_hidden_layers=4,
                rope_theta=THETA)
    return types.SimpleNamespace(**{**base, **overrides})


def make_config(algorithm: str = "dspark", target: types.SimpleNamespace | None = None,
                **kw) -> DrafterConfig:
    fields = dict(algorithm=algorithm, num_hidden_layers=NUM_LAYERS, target_layer_ids=[0, 2],
                  block_size=GAMMA, num_anchors=5, markov_rank=RANK, mask_token_id=MASK_ID)
    return DrafterConfig(**{**fields, **kw}).resolve(target or target_config())


def build(cfg: DrafterConfig, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Module:
    """Seeded model whose weights are then spread out (default init leaves attention near uniform and
    biases/norms at 0/1, which would hide a swapped or unused parameter)."""
    torch.manual_seed(seed)
    model = (DSpark if cfg.algorithm == "dspark" else DFlash)(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.3 * noise)
            elif name in ("embed_tokens.weight", "markov_head.markov_w1.weight"):
                p.copy_(noise)  # lookup tables: unit-scale rows
            else:
                p.copy_(noise * p.shape[1] ** -0.5)
    return model.to(dtype)


def make_inputs(dtype: torch.dtype = torch.float64, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, V - 1, (B, L), generator=g)  # the mask token never occurs in the data
    loss_mask = torch.zeros(B, L, dtype=torch.bool)
    loss_mask[0, 6:] = True
    loss_mask[1, 9:20] = True
    return dict(
        input_ids=input_ids,
        target_hidden=torch.randn(B, L, 2 * H, generator=g, dtype=torch.float64).to(dtype),
        target_last_hidden=torch.randn(B, L, H, generator=g, dtype=torch.float64).to(dtype),
        loss_mask=loss_mask,
    )


def forward(model, inputs, anchors=ANCHORS, valid=ANCHOR_VALID):
    return model(inputs["input_ids"], inputs["target_hidden"], inputs["loss_mask"], anchors, valid)


def logits_of(model, out):
    return model.compute_logits(out.hidden, out.markov_features) if isinstance(model, DSpark) \
        else model.compute_logits(out.hidden)


# ------------------------------------------------------------------------------------------- reference
def ref_rms(x, w):
    return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + EPS)


def ref_rope(x, pos):
    """x [T, heads, dh] at integer positions pos [T]; HF rotate-half convention."""
    half = x.shape[-1] // 2
    inv_freq = THETA ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    angle = torch.as_tensor(pos, dtype=torch.float64)[:, None] * inv_freq
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@dataclasses.dataclass
class Spec:
    """What the reference needs to know, read from the test's own parameters."""

    zlab: bool = False
    head_type: str | None = "vanilla"  # None = no Markov head
    confidence: bool = True
    confidence_with_markov: bool = True
    qk_norm: bool = True

    @property
    def block_len(self):
        return GAMMA + 1 if self.zlab else GAMMA

    @property
    def offset(self):
        return 1 if self.zlab else 0


def ref_block_hidden(sd, spec, input_ids, target_hidden, anchors):
    """Final-normed hidden of the prediction slots, [B, N, gamma, H]."""
    s = spec.block_len
    hidden = []
    for b in range(input_ids.shape[0]):
        length = input_ids.shape[1]
        ctx = ref_rms(target_hidden[b] @ sd["fc.weight"].T, sd["hidden_norm.weight"])  # [L, H]
        ids, pos = [], []
        for a in anchors[b].tolist():
            ids += [int(input_ids[b, a])] + [MASK_ID] * (s - 1)
            pos += [a + j for j in range(s)]
        q_len = len(ids)
        visible = torch.zeros(q_len, length + q_len, dtype=torch.bool)
        for q in range(q_len):
            block, anchor = q // s, int(anchors[b, q // s])
            for p in range(length):
                visible[q, p] = p < anchor
            for j in range(q_len):
                visible[q, length + j] = j // s == block
        key_pos = list(range(length)) + pos
        h = sd["embed_tokens.weight"][ids]
        for i in range(NUM_LAYERS):
            w = {k[len(f"layers.{i}."):]: v for k, v in sd.items() if k.startswith(f"layers.{i}.")}
            x = ref_rms(h, w["input_layernorm.weight"])
            q = (x @ w["self_attn.q_proj.weight"].T).view(q_len, NH, DH)
            kv_in = torch.cat([ctx, x])  # context and block share k_proj / v_proj
            k = (kv_in @ w["self_attn.k_proj.weight"].T).view(length + q_len, NKV, DH)
            v = (kv_in @ w["self_attn.v_proj.weight"].T).view(length + q_len, NKV, DH)
            if spec.qk_norm:
                q, k = ref_rms(q, w["self_attn.q_norm.weight"]), ref_rms(k, w["self_attn.k_norm.weight"])
            q, k = ref_rope(q, pos), ref_rope(k, key_pos)
            att = torch.zeros(q_len, NH, DH, dtype=torch.float64)
            for head in range(NH):
                kv_head = head // (NH // NKV)
                scores = (q[:, head] @ k[:, kv_head].T) / math.sqrt(DH)
                att[:, head] = torch.softmax(scores.masked_fill(~visible, -math.inf), -1) @ v[:, kv_head]
            h = h + att.reshape(q_len, NH * DH) @ w["self_attn.o_proj.weight"].T
            x = ref_rms(h, w["post_attention_layernorm.weight"])
            h = h + (F.silu(x @ w["mlp.gate_proj.weight"].T) * (x @ w["mlp.up_proj.weight"].T)) \
                @ w["mlp.down_proj.weight"].T
        h = ref_rms(h, sd["norm.weight"])
        hidden.append(h.view(len(anchors[b]), s, H)[:, spec.offset:])
    return torch.stack(hidden)


def ref_markov_step(sd, head_type, prev, h, state):
    """One sequential-head step: prev token id, hidden [H], state [r] -> (u [r], state)."""
    e = sd["markov_head.markov_w1.weight"][prev]
    if head_type == "vanilla":
        return e, state
    if head_type == "gated":
        gate = torch.sigmoid(sd["markov_head.gate_proj.weight"] @ torch.cat([h, e])
                             + sd["markov_head.gate_proj.bias"])
        return gate * e, state
    y = sd["markov_head.joint_proj.weight"] @ torch.cat([state, e, h]) + sd["markov_head.joint_proj.bias"]
    g, c, o = y[:RANK], y[RANK:2 * RANK], y[2 * RANK:]
    state = torch.sigmoid(g) * state + (1 - torch.sigmoid(g)) * torch.tanh(c)
    return torch.tanh(o), state


def ref_heads(sd, spec, h, prevs):
    """Logits and confidence logits of one block given its hidden [K, H] and previous tokens [K]."""
    state = torch.zeros(RANK, dtype=torch.float64)
    logits, conf = [], []
    for k, prev in enumerate(prevs):
        z = sd["lm_head.weight"] @ h[k]
        if spec.head_type is not None:
            u, state = ref_markov_step(sd, spec.head_type, prev, h[k], state)
            z = z + sd["markov_head.markov_w2.weight"] @ u
        logits.append(z)
        if spec.confidence:
            feat = h[k]
            if spec.confidence_with_markov and spec.head_type is not None:
                feat = torch.cat([h[k], sd["markov_head.markov_w1.weight"][prev]])
            conf.append((sd["confidence_head.proj.weight"] @ feat + sd["confidence_head.proj.bias"])[0])
    return torch.stack(logits), (torch.stack(conf) if conf else None)


def ref_forward(model, spec, inputs, anchors=ANCHORS):
    """Teacher-forced reference: hidden [B,N,K,H], logits [B,N,K,V], confidence [B,N,K] (NaN where the
    previous token a+k lies past the sequence end), and that validity mask."""
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    ids = inputs["input_ids"]
    hidden = ref_block_hidden(sd, spec, ids, inputs["target_hidden"].double(), anchors)
    n = anchors.shape[1]
    logits = torch.full((B, n, GAMMA, V), math.nan, dtype=torch.float64)
    conf = torch.full((B, n, GAMMA), math.nan, dtype=torch.float64)
    prev_ok = torch.zeros(B, n, GAMMA, dtype=torch.bool)
    for b in range(B):
        for i, a in enumerate(anchors[b].tolist()):
            kk = min(GAMMA, L - a)  # predictions whose previous token x_{a+k} exists
            prev_ok[b, i, :kk] = True
            z, c = ref_heads(sd, spec, hidden[b, i], ids[b, a:a + kk].tolist())
            logits[b, i, :kk] = z
            if c is not None:
                conf[b, i, :kk] = c
    return hidden, logits, conf, prev_ok


# -------------------------------------------------------------------------------------------- variants
VARIANTS = {
    "dflash": (dict(algorithm="dflash"), Spec(head_type=None, confidence=False)),
    "dspark-vanilla": (dict(markov_head_type="vanilla"), Spec(head_type="vanilla")),
    "dspark-vanilla-conf-h": (dict(markov_head_type="vanilla", confidence_head_with_markov=False),
                              Spec(head_type="vanilla", confidence_with_markov=False)),
    "dspark-gated": (dict(markov_head_type="gated"), Spec(head_type="gated")),
    "dspark-gated-conf-h": (dict(markov_head_type="gated", confidence_head_with_markov=False),
                            Spec(head_type="gated", confidence_with_markov=False)),
    "dspark-rnn": (dict(markov_head_type="rnn"), Spec(head_type="rnn")),
    "dspark-rnn-conf-h": (dict(markov_head_type="rnn", confidence_head_with_markov=False),
                          Spec(head_type="rnn", confidence_with_markov=False)),
    "dspark-confidence-only": (dict(markov_rank=0, confidence_head_with_markov=False),
                               Spec(head_type=None, confidence_with_markov=False)),
    "dspark-markov-only": (dict(enable_confidence_head=False), Spec(head_type="vanilla", confidence=False)),
}


def variant(name: str, layout: str = "deepspec"):
    kw, spec = VARIANTS[name]
    kw = {**kw, "block_layout": layout}
    return make_config(**kw), dataclasses.replace(spec, zlab=layout == "zlab")


# ---------------------------------------------------------------------------------------------- golden
@pytest.mark.parametrize("layout", ["deepspec", "zlab"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_golden_block_logits_and_confidence(name, layout):
    cfg, spec = variant(name, layout)
    model = build(cfg)
    inputs = make_inputs()
    out = forward(model, inputs)
    hidden, logits, conf, prev_ok = ref_forward(model, spec, inputs)

    assert out.hidden.shape == (B, 5, GAMMA, H)
    torch.testing.assert_close(out.hidden, hidden, **TOL)
    torch.testing.assert_close(logits_of(model, out)[prev_ok], logits[prev_ok], **TOL)
    assert (out.markov_features is not None) == (spec.head_type is not None)
    if spec.confidence:
        assert out.confidence_logits.dtype == torch.float32
        torch.testing.assert_close(out.confidence_logits.double()[prev_ok], conf[prev_ok], **TOL)
    else:
        assert out.confidence_logits is None


# ------------------------------------------------------------------------------------------------ loss
def ref_loss(model, spec, inputs, weights, decay=4.0):
    """Every term of the DSpark / DFlash loss (DeepSpec ``compute_dspark_loss``) in float64 from reference logits."""
    _, logits, conf, _ = ref_forward(model, spec, inputs)
    lm_head = model.state_dict()["lm_head.weight"].double()
    ids, lm = inputs["input_ids"], inputs["loss_mask"]
    ce, l1, bce, w = (torch.zeros(B, 5, GAMMA, dtype=torch.float64) for _ in range(4))
    sup = torch.zeros(B, 5, GAMMA, dtype=torch.bool)
    for b in range(B):
        for i, a in enumerate(ANCHORS[b].tolist()):
            for k in range(GAMMA):
                label_pos = a + 1 + k
                if not (ANCHOR_VALID[b, i] and label_pos < L and lm[b, label_pos]):
                    break  # only a contiguous prefix of a block is supervised
                sup[b, i, k] = True
                w[b, i, k] = math.exp(-k / decay)
                logp = torch.log_softmax(logits[b, i, k], -1)
                p_t = torch.softmax(lm_head @ inputs["target_last_hidden"][b, a + k].double(), -1)
                ce[b, i, k] = -logp[ids[b, label_pos]]
                l1[b, i, k] = (logp.exp() - p_t).abs().sum()
                if spec.confidence:
                    c, z = (1 - l1[b, i, k] / 2).clamp(0, 1), conf[b, i, k]
                    bce[b, i, k] = -(c * F.logsigmoid(z) + (1 - c) * F.logsigmoid(-z))
    norm = w.sum() + 1e-6
    terms = {"ce": (w * ce).sum() / norm, "l1": (w * l1).sum() / norm}
    loss = weights["ce_weight"] * terms["ce"] + weights["l1_weight"] * terms["l1"]
    if spec.confidence:
        terms["confidence"] = (w * bce).sum() / norm
        loss = loss + weights["confidence_weight"] * terms["confidence"]
    terms["loss"] = loss
    accept = (1 - l1 / 2) * sup
    counts = sup.sum((0, 1))
    accept_rate = accept.sum((0, 1)) / counts
    taus = [1 + accept[b, i].cumprod(0).sum() for b in range(B) for i in range(5) if sup[b, i, 0]]
    return terms, accept_rate, counts, torch.stack(taus).mean()


LOSS_CASES = {
    "dspark-vanilla": ("deepspec", dict(ce_weight=0.1, l1_weight=0.9, confidence_weight=1.0)),
    "dspark-rnn": ("zlab", dict(ce_weight=0.1, l1_weight=0.9, confidence_weight=1.0)),
    "dspark-gated-conf-h": ("deepspec", dict(ce_weight=0.3, l1_weight=0.5, confidence_weight=0.7)),
    "dflash": ("deepspec", dict(ce_weight=1.0, l1_weight=0.0, confidence_weight=0.0)),
}


def loss_logits_fn(model):
    # DFlash.compute_logits takes no Markov features; see test_loss_accepts_dflash_compute_logits.
    return model.compute_logits if isinstance(model, DSpark) else (lambda h, m=None: model.compute_logits(h))


@pytest.mark.parametrize("name", list(LOSS_CASES))
def test_golden_loss_terms(name):
    layout, weights = LOSS_CASES[name]
    cfg, spec = variant(name, layout)
    model = build(cfg)
    inputs = make_inputs()
    with torch.no_grad():
        out = forward(model, inputs)
        res = block_drafter_loss(out, loss_logits_fn(model), inputs["target_last_hidden"], **weights)
    terms, accept_rate, counts, tau = ref_loss(model, spec, inputs, weights)

    assert set(res.terms) == set(terms)
    for key, value in terms.items():
        torch.testing.assert_close(res.terms[key].double(), value, **TOL, msg=key)
    torch.testing.assert_close(res.loss, res.terms["loss"])
    torch.testing.assert_close(res.accept_rate.double(), accept_rate, **TOL)
    torch.testing.assert_close(res.position_counts, counts.float())
    assert res.num_tokens == int(counts.sum())
    torch.testing.assert_close(res.expected_tau.double(), tau, **TOL)


def test_loss_accepts_dflash_compute_logits():
    model = build(make_config("dflash"))
    inputs = make_inputs()
    out = forward(model, inputs)
    block_drafter_loss(out, model.compute_logits, inputs["target_last_hidden"], ce_weight=1.0, l1_weight=0.0)


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_confidence_loss_trains_features_not_the_draft_distribution():
    """The soft label is detached (as in ``compute_dspark_loss``): the confidence term reaches the backbone and W1
    through the confidence features, never W2 (which only shapes p_d); CE + L1 never reach the confidence head."""
    model = build(make_config(markov_head_type="vanilla"))
    inputs = make_inputs()
    target_last = inputs["target_last_hidden"]
    conf_only = block_drafter_loss(forward(model, inputs), model.compute_logits, target_last,
                                   ce_weight=0.0, l1_weight=0.0, confidence_weight=1.0)
    grads = _grads(model, conf_only.loss)
    assert grads["markov_head.markov_w2.weight"] is None or not grads["markov_head.markov_w2.weight"].any()
    for name in ("markov_head.markov_w1.weight", "fc.weight", "layers.0.self_attn.q_proj.weight",
                 "confidence_head.proj.weight"):
        assert grads[name].abs().sum() > 0, name

    draft_only = block_drafter_loss(forward(model, inputs), model.compute_logits, target_last,
                                    ce_weight=0.1, l1_weight=0.9, confidence_weight=0.0)
    grads = _grads(model, draft_only.loss)
    for name in ("confidence_head.proj.weight", "confidence_head.proj.bias"):
        assert grads[name] is None or not grads[name].any(), name
    assert grads["markov_head.markov_w2.weight"].abs().sum() > 0


@pytest.mark.parametrize("name", ["dflash", "dspark-markov-only", "dspark-vanilla"])
def test_loss_without_supervised_predictions_backpropagates_zeros(name):
    cfg, _ = variant(name)
    model = build(cfg)
    inputs = make_inputs()
    out = forward(model, inputs, ANCHORS, torch.zeros_like(ANCHOR_VALID))  # every block is padding
    res = block_drafter_loss(out, loss_logits_fn(model), inputs["target_last_hidden"])
    assert res.num_tokens == 0 and float(res.loss.detach()) == 0.0
    assert math.isnan(float(res.expected_tau))
    grads = _grads(model, res.loss)
    assert all(g is None or not g.any() for g in grads.values())


@pytest.mark.parametrize("name,layout", [("dspark-vanilla", "deepspec"), ("dspark-rnn", "zlab")])
def test_loss_chunking_changes_nothing(name, layout):
    cfg, _ = variant(name, layout)
    model = build(cfg)
    inputs = make_inputs()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    results, grads = {}, {}
    for chunk in (3, 1024):
        model.zero_grad(set_to_none=True)
        res = block_drafter_loss(forward(model, inputs), model.compute_logits, inputs["target_last_hidden"],
                                 chunk_size=chunk)
        res.loss.backward()
        results[chunk] = res
        grads[chunk] = {n: p.grad.clone() for n, p in trainable.items()}
    for key in results[3].terms:
        torch.testing.assert_close(results[3].terms[key], results[1024].terms[key], atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(results[3].accept_rate, results[1024].accept_rate, atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(results[3].expected_tau, results[1024].expected_tau, atol=1e-7, rtol=1e-7)
    for n in trainable:
        assert grads[1024][n].abs().sum() > 0, f"{n} gets no gradient"
        torch.testing.assert_close(grads[3][n], grads[1024][n], atol=1e-9, rtol=1e-6, msg=n)


# ---------------------------------------------------------------------------------- train == inference
CONSISTENCY = [("dflash", "deepspec"), ("dspark-vanilla", "deepspec"), ("dspark-rnn", "zlab"),
               ("dflash", "zlab")]
CHECK_ANCHORS = [0, 1, 7, 16, 23]


def draft_hidden(model, cache, anchor_ids):
    return (model.backbone if isinstance(model, DSpark) else model).draft_hidden(cache, anchor_ids)


def train_hidden(model, inputs, anchors):
    anchors = torch.as_tensor(anchors).expand(B, -1)
    with torch.no_grad():
        return forward(model, inputs, anchors, torch.ones_like(anchors, dtype=torch.bool)).hidden


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,layout", CONSISTENCY)
def test_train_hidden_equals_inference_hidden(name, layout, dtype):
    cfg, _ = variant(name, layout)
    model = build(cfg, dtype)
    inputs = make_inputs(dtype)
    ids, th = inputs["input_ids"], inputs["target_hidden"]
    expected = train_hidden(model, inputs, CHECK_ANCHORS)  # [B, N, K, H]
    # |h| reaches ~3.7 with these weights, so fp32 gets a few ulps of relative slack on top of 1e-6.
    tol = dict(atol=1e-6, rtol=1e-6 if dtype == torch.float32 else 0.0)
    with torch.no_grad():
        for b in range(B):
            for i, a in enumerate(CHECK_ANCHORS):
                cache = model.new_cache(1)
                model.extend_context(cache, th[b:b + 1, :a])
                got = draft_hidden(model, cache, ids[b:b + 1, a])
                torch.testing.assert_close(got[0], expected[b, i], **tol)

                # The same context committed in two uneven pieces, through a cache that has to grow.
                cache = model.new_cache(1, capacity=2)
                cut = a // 3
                model.extend_context(cache, th[b:b + 1, :cut])
                model.extend_context(cache, th[b:b + 1, cut:a])
                assert cache.lengths.tolist() == [a]
                got = draft_hidden(model, cache, ids[b:b + 1, a])
                torch.testing.assert_close(got[0], expected[b, i], **tol)


@pytest.mark.parametrize("name,layout", [("dspark-vanilla", "deepspec"), ("dflash", "zlab")])
def test_batched_inference_with_uneven_contexts(name, layout):
    """Two requests of different context lengths in one cache equal the per-request results, also when
    each round commits a different number of tokens per row."""
    cfg, _ = variant(name, layout)
    model = build(cfg, torch.float32)
    inputs = make_inputs(torch.float32)
    ids, th = inputs["input_ids"], inputs["target_hidden"]
    anchors = [17, 8]
    expected = train_hidden(model, inputs, [[17], [8]])[:, 0]  # [B, K, H]
    anchor_ids = torch.tensor([ids[0, 17], ids[1, 8]])
    with torch.no_grad():
        single = [draft_hidden(model, _committed(model, th[b:b + 1, :a]), anchor_ids[b:b + 1])[0]
                  for b, a in enumerate(anchors)]
        cache = model.new_cache(2, capacity=4)
        model.extend_context(cache, th[:, :17], counts=torch.tensor(anchors))
        batched = draft_hidden(model, cache, anchor_ids)

        rounds = [[5, 2], [0, 4], [12, 2]]  # per-row tokens committed per round; sums are the anchors
        cache, done = model.new_cache(2, capacity=4), [0, 0]
        for counts in rounds:
            t = max(counts)
            piece = torch.zeros(2, t, th.shape[-1], dtype=th.dtype)
            for b in range(2):
                piece[b, :counts[b]] = th[b, done[b]:done[b] + counts[b]]
                done[b] += counts[b]
            model.extend_context(cache, piece, counts=torch.tensor(counts))
        assert done == anchors and cache.lengths.tolist() == anchors
        stepwise = draft_hidden(model, cache, anchor_ids)
    for b in range(2):
        torch.testing.assert_close(single[b], expected[b], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(batched[b], single[b], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(stepwise[b], single[b], atol=1e-6, rtol=1e-6)


def _committed(model, target_hidden):
    cache = model.new_cache(target_hidden.shape[0])
    model.extend_context(cache, target_hidden)
    return cache


# ------------------------------------------------------------------------------------ DSpark == DFlash
@pytest.mark.parametrize("layout", ["deepspec", "zlab"])
def test_dspark_with_heads_off_is_dflash(layout):
    off = dict(markov_rank=0, enable_confidence_head=False, confidence_head_with_markov=False,
               block_layout=layout)
    torch.manual_seed(0)
    spark = DSpark(make_config("dspark", **off))
    torch.manual_seed(0)
    flash = DFlash(make_config("dflash", **off))
    s_sd, f_sd = spark.state_dict(), flash.state_dict()
    assert list(s_sd) == list(f_sd)
    assert all(torch.equal(s_sd[k], f_sd[k]) for k in s_sd)

    inputs = make_inputs(torch.float32)
    with torch.no_grad():
        s_out, f_out = forward(spark, inputs), forward(flash, inputs)
    assert torch.equal(s_out.hidden, f_out.hidden)
    assert torch.equal(spark.compute_logits(s_out.hidden), flash.compute_logits(f_out.hidden))
    assert s_out.markov_features is None and s_out.confidence_logits is None
    for field in ("labels", "prev_ids", "target_index", "supervise"):
        assert torch.equal(getattr(s_out, field), getattr(f_out, field))

    th, anchor_ids = inputs["target_hidden"][:, :11], inputs["input_ids"][:, 11]
    for temperature in (0.0, 1.0):
        s_prop = spark.propose(_committed(spark, th), anchor_ids,
                               TemperatureSampler(temperature, torch.Generator().manual_seed(3)))
        f_prop = flash.propose(_committed(flash, th), anchor_ids,
                               TemperatureSampler(temperature, torch.Generator().manual_seed(3)))
        assert torch.equal(s_prop.tokens, f_prop.tokens)
        assert (s_prop.probs is None and f_prop.probs is None) if temperature == 0 else \
            torch.equal(s_prop.probs, f_prop.probs)
        assert s_prop.confidence is None and f_prop.confidence is None


# --------------------------------------------------------------------------------------------- propose
PROPOSE = ["dspark-vanilla", "dspark-gated", "dspark-rnn", "dspark-rnn-conf-h", "dspark-markov-only"]


def _proposal_setup(name, layout="deepspec"):
    cfg, spec = variant(name, layout)
    model = build(cfg)
    inputs = make_inputs()
    lengths = torch.tensor([15, 9])  # two requests, different context lengths
    cache = model.new_cache(2)
    model.extend_context(cache, inputs["target_hidden"][:, :15], counts=lengths)
    anchor_ids = inputs["input_ids"][torch.arange(2), lengths]
    return model, spec, cache, anchor_ids


@pytest.mark.parametrize("layout", ["deepspec", "zlab"])
@pytest.mark.parametrize("name", PROPOSE)
def test_greedy_propose_equals_left_to_right_loop(name, layout):
    model, spec, cache, anchor_ids = _proposal_setup(name, layout)
    sd = {k: v.double() for k, v in model.state_dict().items()}
    with torch.no_grad():
        hidden = model.backbone.draft_hidden(cache, anchor_ids).double()
        prop = model.propose(cache, anchor_ids)  # the default sampler is greedy
    assert prop.tokens.shape == (2, GAMMA) and prop.probs is None  # greedy drafts carry no distribution
    for b in range(2):
        prev, state, tokens, conf = int(anchor_ids[b]), torch.zeros(RANK, dtype=torch.float64), [], []
        for k in range(GAMMA):
            z = sd["lm_head.weight"] @ hidden[b, k]
            u, state = ref_markov_step(sd, spec.head_type, prev, hidden[b, k], state)
            z = z + sd["markov_head.markov_w2.weight"] @ u
            if spec.confidence:
                feat = torch.cat([hidden[b, k], sd["markov_head.markov_w1.weight"][prev]]) \
                    if spec.confidence_with_markov else hidden[b, k]
                z_conf = sd["confidence_head.proj.weight"] @ feat + sd["confidence_head.proj.bias"]
                conf.append(torch.sigmoid(z_conf))
            prev = int(z.argmax())
            tokens.append(prev)
        assert prop.tokens[b].tolist() == tokens
        if spec.confidence:
            torch.testing.assert_close(prop.confidence[b].double(), torch.cat(conf), **TOL)
        else:
            assert prop.confidence is None


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("name", ["dspark-vanilla", "dspark-gated", "dspark-rnn"])
def test_sampled_propose_distributions(name, temperature):
    """At T > 0 each row of ``probs`` is softmax((U_k + B_k) / T) given the tokens drafted before it."""
    model, spec, cache, anchor_ids = _proposal_setup(name)
    sd = {k: v.double() for k, v in model.state_dict().items()}
    with torch.no_grad():
        hidden = model.backbone.draft_hidden(cache, anchor_ids).double()
        prop = model.propose(cache, anchor_ids, TemperatureSampler(temperature, torch.Generator().manual_seed(5)))
        again = model.propose(cache, anchor_ids, TemperatureSampler(temperature, torch.Generator().manual_seed(5)))
    assert torch.equal(prop.tokens, again.tokens)
    torch.testing.assert_close(prop.probs.sum(-1), torch.ones(2, GAMMA), atol=1e-6, rtol=0)
    assert ((prop.confidence > 0) & (prop.confidence < 1)).all()
    for b in range(2):
        prevs = [int(anchor_ids[b])] + prop.tokens[b, :-1].tolist()
        logits, _ = ref_heads(sd, spec, hidden[b], prevs)
        torch.testing.assert_close(prop.probs[b].double(), torch.softmax(logits / temperature, -1), **TOL)
        assert all(prop.probs[b, k, t] > 0 for k, t in enumerate(prop.tokens[b].tolist()))


# ----------------------------------------------------------------------------------------------- names
def expected_shapes(qk_norm=True, heads=True, with_markov=True, head_type="vanilla"):
    shapes = {"embed_tokens.weight": (V, H), "fc.weight": (H, 2 * H), "hidden_norm.weight": (H,),
              "norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(NUM_LAYERS):
        p = f"layers.{i}."
        shapes |= {p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                   p + "self_attn.q_proj.weight": (NH * DH, H), p + "self_attn.k_proj.weight": (NKV * DH, H),
                   p + "self_attn.v_proj.weight": (NKV * DH, H), p + "self_attn.o_proj.weight": (H, NH * DH),
                   p + "mlp.gate_proj.weight": (INTER, H), p + "mlp.up_proj.weight": (INTER, H),
                   p + "mlp.down_proj.weight": (H, INTER)}
        if qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (DH,), p + "self_attn.k_norm.weight": (DH,)}
    if heads:
        shapes |= {"markov_head.markov_w1.weight": (V, RANK), "markov_head.markov_w2.weight": (V, RANK),
                   "confidence_head.proj.weight": (1, H + RANK if with_markov else H),
                   "confidence_head.proj.bias": (1,)}
        if head_type == "gated":
            shapes |= {"markov_head.gate_proj.weight": (RANK, H + RANK),
                       "markov_head.gate_proj.bias": (RANK,)}
        if head_type == "rnn":
            shapes |= {"markov_head.joint_proj.weight": (3 * RANK, 2 * RANK + H),
                       "markov_head.joint_proj.bias": (3 * RANK,)}
    return shapes


@pytest.mark.parametrize("model_type", ["qwen3", "llama"])
@pytest.mark.parametrize("head_type,with_markov", [("vanilla", True), ("vanilla", False), ("gated", True),
                                                   ("rnn", True)])
def test_dspark_parameter_names(model_type, head_type, with_markov):
    cfg = make_config(target=target_config(model_type=model_type), markov_head_type=head_type,
                      confidence_head_with_markov=with_markov)
    model = DSpark(cfg)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_shapes(model_type == "qwen3", True, with_markov, head_type)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"embed_tokens.weight", "lm_head.weight"}


@pytest.mark.parametrize("model_type", ["qwen3", "llama"])
def test_dflash_parameter_names(model_type):
    model = DFlash(make_config("dflash", target=target_config(model_type=model_type)))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_shapes(model_type == "qwen3", heads=False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"embed_tokens.weight", "lm_head.weight"}


def test_golden_llama_target_without_qk_norm():
    cfg = make_config(target=target_config(model_type="llama"))
    assert cfg.qk_norm is False
    model = build(cfg)
    inputs = make_inputs()
    out = forward(model, inputs)
    hidden, logits, conf, ok = ref_forward(model, Spec(qk_norm=False), inputs)
    torch.testing.assert_close(out.hidden, hidden, **TOL)
    torch.testing.assert_close(logits_of(model, out)[ok], logits[ok], **TOL)
    torch.testing.assert_close(out.confidence_logits.double()[ok], conf[ok], **TOL)


# ------------------------------------------------------------------------------------ flex attention
@pytest.mark.parametrize("layout", ["deepspec", "zlab"])
def test_flex_attention_matches_the_float64_reference(layout):
    """The sparse flex-attention mask (what CUDA training uses) gives the golden hidden states and confidences.
    On CPU flex runs its unfused eager reference, forward only; tests/gpu checks gradients on CUDA."""
    cfg, spec = variant("dspark-vanilla", layout)
    model = build(cfg)
    inputs = make_inputs()
    hidden, logits, conf, prev_ok = ref_forward(model, spec, inputs)
    model.backbone.attn_implementation = "flex"
    with torch.no_grad():
        out = forward(model, inputs)
    torch.testing.assert_close(out.hidden, hidden, **TOL)
    torch.testing.assert_close(out.confidence_logits.double()[prev_ok], conf[prev_ok], **TOL)


def test_unknown_attention_implementation_is_named():
    model = build(make_config("dflash"))
    model.attn_implementation = "flash"
    with pytest.raises(ValueError, match="attn_implementation='flash' unknown"):
        forward(model, make_inputs())
    model.attn_implementation = "flex"
    with pytest.raises(ValueError, match="no backward on CPU.*'sdpa' or 'auto'"):
        forward(model, make_inputs())


def assert_same_cuda_training_pass(reference: nn.Module, model: nn.Module) -> None:
    """The two drafters (same weights, on CUDA, fp32) give the same hidden states and parameter gradients."""
    inputs = {k: v.float().cuda() if v.is_floating_point() else v.cuda() for k, v in make_inputs().items()}
    outs = [forward(m, inputs, ANCHORS.cuda(), ANCHOR_VALID.cuda()) for m in (reference, model)]
    torch.testing.assert_close(outs[1].hidden, outs[0].hidden, atol=2e-5, rtol=2e-5)
    for out in outs:
        (out.hidden.pow(2).sum() + out.confidence_logits.sum()).backward()
    grads = dict(reference.named_parameters())
    checked = 0
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-4, rtol=1e-4, msg=name)
            checked += 1
    assert checked > 10


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["deepspec", "zlab"])
def test_flex_attention_gradients_match_dense_on_cuda(layout):
    """Compiled flex attention on CUDA: same forward and parameter gradients as the dense SDPA mask (fp32).
    Head dim 16: the compiled flex kernel needs at least 16."""
    cfg = make_config(markov_head_type="vanilla", block_layout=layout, target=target_config(head_dim=16))
    dense, flex = build(cfg, torch.float32).cuda(), build(cfg, torch.float32).cuda()
    dense.backbone.attn_implementation, flex.backbone.attn_implementation = "sdpa", "flex"
    assert_same_cuda_training_pass(dense, flex)


@pytest.mark.gpu
def test_compiled_layers_with_flex_match_eager_on_cuda():
    """What ``DrafterModule(compile_layers=True)`` trains with on CUDA: each decoder layer compiled in place, flex
    attention inside; same forward and parameter gradients as the eager layers (fp32)."""
    cfg = make_config(markov_head_type="vanilla", target=target_config(head_dim=16))
    eager, compiled = build(cfg, torch.float32).cuda(), build(cfg, torch.float32).cuda()
    for model in (eager, compiled):
        model.backbone.attn_implementation = "flex"
    for layer in compiled.backbone.layers:
        layer.compile()
    assert_same_cuda_training_pass(eager, compiled)


# ------------------------------------------------------------------------------------ construction
def test_unfilled_allocates_on_the_default_device_without_initialising():
    from dspark_lightning.drafters._layers import unfilled

    layer = unfilled(nn.Linear, 4, 3, bias=False)
    assert layer.weight.device.type == "cpu" and layer.weight.shape == (3, 4) and layer.weight.requires_grad
    with torch.device("meta"):
        assert unfilled(nn.Embedding, 10, 4).weight.device.type == "meta"
    assert unfilled(nn.Embedding, 10, 4, dtype=torch.float64).weight.dtype == torch.float64


@pytest.mark.parametrize("algorithm", ["dspark", "dflash"])
def test_vocabulary_matrices_are_filled_once_by_init_weights(algorithm):
    """embed_tokens, lm_head and the Markov tables skip their default init; init_weights fills them with
    N(0, 0.02), like every other Linear/Embedding (and the same seed builds the same drafter)."""
    cfg = make_config(algorithm, target_config(vocab_size=4096, hidden_size=64, head_dim=16))
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append((DSpark if algorithm == "dspark" else DFlash)(cfg))
    names = ["embed_tokens.weight", "lm_head.weight"] + (
        ["markov_head.markov_w1.weight", "markov_head.markov_w2.weight"] if algorithm == "dspark" else [])
    params = dict(models[0].named_parameters())
    for name in names:
        w = params[name].double()
        assert torch.isfinite(w).all(), name
        assert abs(float(w.std()) - 0.02) < 1e-3 and abs(float(w.mean())) < 1e-3, name
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(a, b), name
