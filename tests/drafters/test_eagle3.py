"""Eagle3: golden values against an independent float64 re-implementation, training == inference,
uneven batches, the reduced vocabulary (d2t/t2d) and argument validation."""

from __future__ import annotations

import dataclasses
import math
import types

import pytest
import torch

from dspark_lightning.drafters import DrafterConfig, Eagle3
from dspark_lightning.drafters.eagle3 import build_draft_vocab
from dspark_lightning.drafters.protocol import TemperatureSampler
from dspark_lightning.losses import eagle3_ttt_loss

T, K = 12, 3


def tiny_config(head_dim: int = 8, **overrides) -> DrafterConfig:
    """A 4-layer qwen3-shaped target; ``head_dim`` is the target's (the drafter reads its geometry)."""
    target = types.SimpleNamespace(
        model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, head_dim=head_dim, rms_norm_eps=1e-6, max_position_embeddings=256,
        attention_bias=False, hidden_act="silu", num_hidden_layers=4, rope_theta=10000.0,
    )
    fields = dict(algorithm="eagle3", num_hidden_layers=1, target_layer_ids=[0, 1, 2], ttt_length=K)
    return DrafterConfig(**{**fields, **overrides}).resolve(target)


@torch.no_grad()
def randomise(model: Eagle3, seed: int = 0) -> Eagle3:
    """Weights large enough that attention, norms and the MLP all matter (init_weights' 0.02 is too flat)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        else:
            fan_in = p.shape[1] if p.dim() == 2 and "embed" not in name else 1
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (1.5 / math.sqrt(fan_in)))
    return model


def make_model(seed: int = 0, **overrides) -> Eagle3:
    return randomise(Eagle3(tiny_config(**overrides)).double(), seed)


def make_batch(b: int = 2, seed: int = 1, vocab: int = 64, h: int = 32):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, T), generator=g)
    target_hidden = torch.randn(b, T, 3 * h, generator=g, dtype=torch.float64)
    target_last = torch.randn(b, T, h, generator=g, dtype=torch.float64)
    loss_mask = torch.rand(b, T, generator=g) < 0.8
    return ids, target_hidden, target_last, loss_mask


# ---------------------------------------------------------------------------------------------- reference
def _rms(x, w, eps=1e-6):
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def _rope(x, pos, theta=10000.0):
    """x [..., dh] at integer position pos: rotate pairs (d, d + dh/2) by pos * theta^(-2d/dh)."""
    dh = x.shape[-1]
    half = dh // 2
    ang = pos * theta ** (-torch.arange(half, dtype=torch.float64) * 2 / dh)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1)


def reference_ttt(sd: dict, ids, target_hidden, steps: int, nh: int = 4, nkv: int = 2, dh: int = 8):
    """Eagle3 TTT written from the definition, one query (step k, position i) at a time.

    Returns the pre-norm hidden states [K, B, T, H]."""
    w = lambda name: sd[f"layers.0.{name}"]
    b, t = ids.shape
    tok = lambda n: ids[:, n] if n < t else torch.zeros(b, dtype=torch.long)
    h_in = target_hidden @ sd["fc.weight"].T  # [B, T, H]
    keys: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    outs = []
    for k in range(steps):
        queries = []
        for i in range(t):
            e = sd["embed_tokens.weight"][tok(i + 1 + k)]
            e_n, h_n = _rms(e, w("input_layernorm.weight")), _rms(h_in[:, i], w("hidden_norm.weight"))
            x = torch.cat([e_n, h_n], -1)
            q = _rms((x @ w("self_attn.q_proj.weight").T).view(b, nh, dh), w("self_attn.q_norm.weight"))
            kk = _rms((x @ w("self_attn.k_proj.weight").T).view(b, nkv, dh), w("self_attn.k_norm.weight"))
            v = (x @ w("self_attn.v_proj.weight").T).view(b, nkv, dh)
            queries.append(_rope(q, i + k))
            keys[(k, i)] = (_rope(kk, i + k), v)
        new_h = []
        for i in range(t):
            visible = [(0, j) for j in range(i + 1)] + [(c, i) for c in range(1, k + 1)]
            heads = []
            for head in range(nh):
                g = head // (nh // nkv)
                ks = torch.stack([keys[s][0][:, g] for s in visible], 1)  # [B, S, dh]
                vs = torch.stack([keys[s][1][:, g] for s in visible], 1)
                scores = (ks @ queries[i][:, head, :, None]).squeeze(-1) / math.sqrt(dh)  # [B, S]
                heads.append((scores.softmax(-1)[..., None] * vs).sum(1))
            r = h_in[:, i] + torch.cat(heads, -1) @ w("self_attn.o_proj.weight").T
            y = _rms(r, w("post_attention_layernorm.weight"))
            gate, up = y @ w("mlp.gate_proj.weight").T, y @ w("mlp.up_proj.weight").T
            new_h.append(r + (torch.nn.functional.silu(gate) * up) @ w("mlp.down_proj.weight").T)
        h_in = torch.stack(new_h, 1)
        outs.append(h_in)
    return torch.stack(outs)


def reference_loss(sd: dict, hidden, ids, target_last, loss_mask, target_head, hot=None, decay=0.8):
    """Per-step soft CE / acceptance from explicit loops over supervised predictions."""
    steps, b, t, _ = hidden.shape
    ploss, accept_rate = [], []
    accept = torch.zeros(steps, b, t, dtype=torch.float64)
    for k in range(steps):
        ces, accs = [], []
        for bi in range(b):
            for i in range(t):
                if not (i + 2 + k < t and loss_mask[bi, i + 2 + k]):
                    continue
                logp = (_rms(hidden[k, bi, i], sd["norm.weight"]) @ sd["lm_head.weight"].T).log_softmax(-1)
                p_full = (target_head @ target_last[bi, i + 1 + k]).softmax(-1)
                p_on_draft = p_full if hot is None else p_full[hot]
                p_t = p_on_draft / p_on_draft.sum()
                ces.append(-(p_t * logp).sum())
                accs.append(torch.minimum(logp.exp(), p_on_draft).sum())
                accept[k, bi, i] = accs[-1]
        ploss.append(torch.stack(ces).mean() if ces else torch.tensor(0.0, dtype=torch.float64))
        accept_rate.append(torch.stack(accs).mean() if accs else torch.tensor(0.0, dtype=torch.float64))
    loss = sum(decay**k * ploss[k] for k in range(steps))
    taus = []
    for bi in range(b):
        for i in range(t):
            if i + 2 < t and loss_mask[bi, i + 2]:
                prod, tau = 1.0, 1.0
                for k in range(steps):
                    prod = prod * accept[k, bi, i]
                    tau = tau + prod
                taus.append(tau)
    return loss, torch.stack(ploss), torch.stack(accept_rate), torch.tensor(taus).mean()


# ---------------------------------------------------------------------------------------------- tests
def test_parameter_names_and_frozen_vocab_modules():
    model = Eagle3(tiny_config())
    names = set(model.state_dict())
    expected = {"embed_tokens.weight", "fc.weight", "norm.weight", "lm_head.weight",
                "layers.0.hidden_norm.weight", "layers.0.input_layernorm.weight",
                "layers.0.post_attention_layernorm.weight", "layers.0.self_attn.q_norm.weight",
                "layers.0.self_attn.k_norm.weight", "layers.0.mlp.gate_proj.weight",
                "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight"}
    expected |= {f"layers.0.self_attn.{p}_proj.weight" for p in "qkvo"}
    assert names == expected
    assert model.layers[0].self_attn.q_proj.in_features == 64  # [embeds ; hidden] = 2H
    assert model.fc.weight.shape == (32, 96)
    assert not model.embed_tokens.weight.requires_grad and not model.lm_head.weight.requires_grad


def test_golden_logits_and_loss_match_independent_float64_reference():
    model = make_model()
    ids, target_hidden, target_last, loss_mask = make_batch()
    out = model(ids, target_hidden, loss_mask)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    ref_hidden = reference_ttt(sd, ids, target_hidden, K)
    assert out.hidden.shape == (K, 2, T, 32)
    norm = lambda h: _rms(h, sd["norm.weight"])
    torch.testing.assert_close(model.compute_logits(out.hidden), norm(ref_hidden) @ sd["lm_head.weight"].T,
                               atol=1e-5, rtol=1e-5)

    pos = torch.arange(T)
    for k in range(K):
        torch.testing.assert_close(out.supervise[k], (pos + 2 + k < T) & torch.nn.functional.pad(
            loss_mask, (0, K + 2))[:, 2 + k:2 + k + T])
        n = T - 1 - k  # positions whose target index is in range
        torch.testing.assert_close(out.target_index[k, :, :n], (pos + 1 + k)[:n].expand(2, -1))
        torch.testing.assert_close(out.labels[k, :, : T - 2 - k], ids[:, 2 + k:])

    res = eagle3_ttt_loss(out, model.compute_logits, target_last, model.target_logits, chunk_size=7)
    loss, ploss, accept_rate, tau = reference_loss(sd, ref_hidden, ids, target_last, loss_mask,
                                                   sd["lm_head.weight"])
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.loss.double(), loss, **tol)
    torch.testing.assert_close(res.terms["soft_ce"].double(), loss, **tol)
    for k in range(K):
        torch.testing.assert_close(res.terms[f"ploss_{k}"].double(), ploss[k], **tol)
    torch.testing.assert_close(res.accept_rate.double(), accept_rate, **tol)
    torch.testing.assert_close(res.expected_tau.double(), tau, **tol)
    assert res.num_tokens == int(out.supervise.sum())
    assert res.position_counts.tolist() == out.supervise.sum((1, 2)).float().tolist()


def test_ttt_supervises_exactly_the_answer_tokens_golden_float64():
    """Our rule (docs/drafters.md): step k trains the prediction of every answer token x[j] it can reach (from
    position i = j - 2 - k >= 0), the per-step mean over those. Pinned against a float64 computation that enumerates
    the answer tokens, not positions. DeepSpec's loss_mask[i+k] rule would instead start at x[s+2] and add x[e]."""
    model = make_model()
    ids, target_hidden, target_last, _ = make_batch()
    spans = [(3, 9), (6, T)]  # answers x[s:e]: one ending before the row does, one running to its end
    loss_mask = torch.zeros(2, T, dtype=torch.bool)
    for b, (s, e) in enumerate(spans):
        loss_mask[b, s:e] = True
    out = model(ids, target_hidden, loss_mask)
    for k in range(K):
        for b, (s, e) in enumerate(spans):
            targets = (out.supervise[k, b].nonzero().flatten() + 2 + k).tolist()
            assert targets == [j for j in range(s, e) if j >= 2 + k]
            assert s + 1 in targets and e not in targets  # the first token drafted after a prefill; nothing past

    sd = {k: v.detach() for k, v in model.state_dict().items()}
    ploss = []
    for k in range(K):
        ces = []
        for b, (s, e) in enumerate(spans):
            for j in range(max(s, 2 + k), e):
                logp = (_rms(out.hidden[k, b, j - 2 - k].detach(), sd["norm.weight"]) @ sd["lm_head.weight"].T)
                p_t = (sd["lm_head.weight"] @ target_last[b, j - 1]).softmax(-1)  # the target's view of x[j]
                ces.append(-(p_t * logp.log_softmax(-1)).sum())
        ploss.append(torch.stack(ces).mean())
    res = eagle3_ttt_loss(out, model.compute_logits, target_last, model.target_logits)
    for k in range(K):
        torch.testing.assert_close(res.terms[f"ploss_{k}"].double(), ploss[k], atol=0, rtol=1e-6)  # fp32 sums
    torch.testing.assert_close(res.loss.double(), sum(0.8**k * ploss[k] for k in range(K)), atol=0, rtol=1e-6)


def test_loss_backward_is_chunk_invariant_and_skips_frozen_weights():
    model = make_model()
    ids, target_hidden, target_last, loss_mask = make_batch()
    grads, losses = [], []
    for chunk in (5, 1024):
        model.zero_grad()
        res = eagle3_ttt_loss(model(ids, target_hidden, loss_mask), model.compute_logits, target_last,
                              model.target_logits, chunk_size=chunk)
        res.loss.backward()
        losses.append(res.loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name])
    assert "lm_head.weight" not in grads[0] and "embed_tokens.weight" not in grads[0]
    assert grads[0]["fc.weight"].abs().sum() > 0 and grads[0]["norm.weight"].abs().sum() > 0


@pytest.mark.parametrize("split", [None, 2])
def test_training_time_test_equals_cached_inference(split):
    model = make_model()
    ids, target_hidden, _, loss_mask = make_batch()
    with torch.no_grad():
        out = model(ids, target_hidden, loss_mask)
    for i in (0, 3, 5, T - K - 1):
        cache = model.new_cache(2, capacity=4)  # small capacity: exercises growth
        cuts = [0, i + 1] if split is None or split >= i + 1 else [0, split, i + 1]
        # Features h_a..h_{b-1} paired with the next tokens x_{a+1}..x_b.
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            model.extend_context(cache, target_hidden[:, a:b], ids[:, a + 1:b + 1])
        assert cache.lengths.tolist() == [i + 1, i + 1]
        states = model.draft_states(cache, ids[:, i + 2:i + 1 + K])  # teacher-forced drafts x_{i+2}..x_{i+K}
        torch.testing.assert_close(states, out.hidden[:, :, i].transpose(0, 1), atol=1e-10, rtol=1e-10)

        proposal = model.propose(cache)  # greedy by default
        assert proposal.tokens.shape == (2, K) and proposal.probs is None
        first = model.compute_logits(out.hidden[0, :, i]).argmax(-1)
        torch.testing.assert_close(proposal.tokens[:, 0], first)
        greedy = model.compute_logits(model.draft_states(cache, proposal.tokens[:, :-1])).argmax(-1)
        assert torch.equal(proposal.tokens, greedy)
        assert cache.lengths.tolist() == [i + 1, i + 1]  # propose leaves the committed cache alone


def test_uneven_batch_equals_single_rows():
    model = make_model()
    ids, target_hidden, target_last, loss_mask = make_batch()
    short = 8
    loss_mask[1, short:] = False  # row 1 is right-padded after 8 tokens
    with torch.no_grad():
        out = model(ids, target_hidden, loss_mask)
        one = model(ids[1:, :short], target_hidden[1:, :short], loss_mask[1:, :short])
    sup = one.supervise[:, 0]
    assert torch.equal(out.supervise[:, 1, :short], sup) and not out.supervise[:, 1, short:].any()
    torch.testing.assert_close(out.hidden[:, 1, :short][sup], one.hidden[:, 0][sup], atol=1e-10, rtol=1e-10)
    # The per-step supervised mean makes the loss independent of padding.
    padded = eagle3_ttt_loss(model(ids[1:], target_hidden[1:], loss_mask[1:]), model.compute_logits,
                             target_last[1:], model.target_logits)
    alone = eagle3_ttt_loss(one, model.compute_logits, target_last[1:, :short], model.target_logits)
    torch.testing.assert_close(padded.loss, alone.loss)
    torch.testing.assert_close(padded.expected_tau, alone.expected_tau)

    # Inference: rows committed in uneven chunks, then drafted together.
    cache = model.new_cache(2)
    model.extend_context(cache, target_hidden[:, :5], ids[:, 1:6], counts=torch.tensor([5, 2]))
    model.extend_context(cache, target_hidden[:, :3], ids[:, :3], counts=torch.tensor([0, 0]))  # a no-op
    model.extend_context(cache, torch.stack([target_hidden[0, 5:9], target_hidden[1, 2:6]]),
                         torch.stack([ids[0, 6:10], ids[1, 3:7]]), counts=torch.tensor([4, 4]))
    assert cache.lengths.tolist() == [9, 6]
    batch = model.propose(cache)
    forced = torch.randint(0, 64, (2, K - 1), generator=torch.Generator().manual_seed(3))
    states = model.draft_states(cache, forced)
    for row, n in ((0, 9), (1, 6)):
        single = model.new_cache(1)
        model.extend_context(single, target_hidden[row:row + 1, :n], ids[row:row + 1, 1:n + 1])
        alone_prop = model.propose(single)
        assert torch.equal(batch.tokens[row], alone_prop.tokens[0])
        torch.testing.assert_close(states[row], model.draft_states(single, forced[row:row + 1])[0],
                                   atol=1e-10, rtol=1e-10)


def test_sampled_proposal_is_a_distribution():
    model = make_model()
    ids, target_hidden, _, _ = make_batch()
    cache = model.new_cache(2)
    model.extend_context(cache, target_hidden, ids)
    prop = model.propose(cache, sampler=TemperatureSampler(1.0, torch.Generator().manual_seed(0)), num_tokens=5)
    assert prop.tokens.shape == (2, 5)
    torch.testing.assert_close(prop.probs.sum(-1), torch.ones(2, 5))
    assert (prop.probs.gather(-1, prop.tokens[..., None]) > 0).all()


def test_build_draft_vocab_round_trip():
    counts = torch.tensor([5, 1, 5, 0, 3, 3, 7, 3, 0, 2])
    d2t, t2d = build_draft_vocab(counts, 5)
    hot = d2t + torch.arange(5)
    assert hot.tolist() == [0, 2, 4, 5, 6]  # 7 > 5 = 5 > 3 = 3 = 3: ties keep the lower ids (4, 5 before 7)
    assert d2t.dtype == torch.long and t2d.dtype == torch.bool and t2d.shape == (10,)
    assert torch.equal(t2d.nonzero().squeeze(1), hot)  # target -> draft -> target
    assert torch.equal((t2d.cumsum(0) - 1)[hot], torch.arange(5))  # draft -> target -> draft
    with pytest.raises(ValueError, match="draft_vocab_size=11"):
        build_draft_vocab(counts, 11)


def test_reduced_vocabulary_head_loss_and_proposal():
    model = make_model(draft_vocab_size=16)
    assert model.reduced_vocab and model.lm_head.weight.shape == (16, 32)
    assert model.lm_head.weight.requires_grad
    assert model.state_dict()["d2t"].dtype == torch.long and model.state_dict()["t2d"].dtype == torch.bool
    g = torch.Generator().manual_seed(5)
    d2t, t2d = build_draft_vocab(torch.randint(0, 100, (64,), generator=g), 16)
    model.set_draft_vocab(d2t, t2d)
    embed = torch.randn(64, 32, generator=g, dtype=torch.float64)
    target_head = torch.randn(64, 32, generator=g, dtype=torch.float64) * 0.5
    model.load_target_embeddings(embed, target_head)
    hot = d2t + torch.arange(16)
    torch.testing.assert_close(model.lm_head.weight.detach(), target_head[hot])
    torch.testing.assert_close(model.embed_tokens.weight, embed)
    with torch.no_grad():  # move the trainable head away from the target rows so the test can tell them apart
        model.lm_head.weight.add_(0.3 * torch.randn(16, 32, generator=g, dtype=torch.float64))

    ids, target_hidden, target_last, loss_mask = make_batch()
    out = model(ids, target_hidden, loss_mask)
    target_fn = lambda h: h @ target_head.T
    res = eagle3_ttt_loss(out, model.compute_logits, target_last, target_fn, d2t=model.d2t, chunk_size=4)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    loss, ploss, accept_rate, tau = reference_loss(sd, out.hidden.detach(), ids, target_last, loss_mask,
                                                   target_head, hot=hot)
    torch.testing.assert_close(res.loss.double(), loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.accept_rate.double(), accept_rate, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.expected_tau.double(), tau, atol=1e-5, rtol=1e-5)
    res.loss.backward()
    assert model.lm_head.weight.grad is not None and model.embed_tokens.weight.grad is None
    with pytest.raises(ValueError, match="d2t=drafter.d2t"):
        eagle3_ttt_loss(out, model.compute_logits, target_last, target_fn)
    with pytest.raises(ValueError, match="reduced draft vocabulary"):
        model.target_logits(target_last)

    cache = model.new_cache(2)
    model.extend_context(cache, target_hidden, ids)
    for temperature in (0.0, 1.0):
        prop = model.propose(cache, sampler=TemperatureSampler(temperature, torch.Generator().manual_seed(0)))
        assert t2d[prop.tokens].all()  # drafts are target ids inside the draft vocabulary
        if temperature > 0:
            assert (prop.probs[..., ~t2d] == 0).all()
            torch.testing.assert_close(prop.probs.sum(-1), torch.ones(2, K))
    greedy = model.compute_logits(cache.last_hidden).argmax(-1)
    assert torch.equal(model.propose(cache).tokens[:, 0], hot[greedy])

    with pytest.raises(ValueError, match="disagree"):
        model.set_draft_vocab(d2t, ~t2d)


def test_invalid_configs_raise_naming_the_value():
    with pytest.raises(ValueError, match="num_hidden_layers=2"):
        Eagle3(tiny_config(num_hidden_layers=2))
    with pytest.raises(ValueError, match="draft_vocab_size=100"):
        tiny_config(draft_vocab_size=100)
    with pytest.raises(ValueError, match="draft_vocab_size=100"):
        Eagle3(dataclasses.replace(tiny_config(), draft_vocab_size=100))
    with pytest.raises(ValueError, match="'dflash'"):
        Eagle3(dataclasses.replace(tiny_config(), algorithm="dflash", mask_token_id=5))
    model = Eagle3(tiny_config())
    with pytest.raises(ValueError, match="width 64"):
        model(torch.zeros(1, T, dtype=torch.long), torch.zeros(1, T, 64), torch.ones(1, T, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------- flex attention
def test_flex_ttt_mask_is_the_dense_mask_of_every_step():
    from torch.nn.attention.flex_attention import create_mask

    from dspark_lightning.drafters.eagle3 import dense_ttt_mask, ttt_block_mask

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for k in range(K):
        dense = torch.cat([causal] + [torch.eye(T, dtype=torch.bool)] * k, dim=1)
        block = ttt_block_mask(T, k, device=torch.device("cpu"))
        assert torch.equal(create_mask(block.mask_mod, None, None, T, (k + 1) * T, device="cpu")[0, 0], dense)
        assert torch.equal(dense_ttt_mask(T, k, torch.device("cpu"))[0, 0], dense)
        assert ttt_block_mask(T, k, device=torch.device("cpu")) is block  # built once per shape, not per batch


def test_flex_attention_gives_the_golden_training_time_test():
    """The sparse TTT mask through flex attention (CPU: its unfused reference, forward only) gives the float64
    reference's hidden states, as the dense mask does; training with flex on CPU is refused, naming the fix."""
    model = make_model()
    ids, target_hidden, _, loss_mask = make_batch()
    ref = reference_ttt({k: v.detach() for k, v in model.state_dict().items()}, ids, target_hidden, K)
    model.attn_implementation = "flex"
    with torch.no_grad():
        out = model(ids, target_hidden, loss_mask)
    torch.testing.assert_close(out.hidden, ref, atol=1e-6, rtol=1e-5)  # flex on CPU: differences of about 1e-7
    with pytest.raises(ValueError, match="'flex' has no backward on CPU.*'sdpa' or 'auto'"):
        model(ids, target_hidden, loss_mask)


@pytest.mark.gpu
def test_flex_attention_gradients_match_dense_on_cuda():
    """Compiled flex attention with the sparse TTT mask on CUDA: the dense mask's hidden states and parameter
    gradients (fp32; head dim 16, the compiled kernel's minimum)."""
    dense, flex = (randomise(Eagle3(tiny_config(head_dim=16)).float().cuda()) for _ in range(2))
    dense.attn_implementation, flex.attn_implementation = "sdpa", "flex"
    ids, target_hidden, _, loss_mask = (x.cuda() for x in make_batch())
    outs = [m(ids, target_hidden.float(), loss_mask) for m in (dense, flex)]
    torch.testing.assert_close(outs[1].hidden, outs[0].hidden, atol=2e-5, rtol=2e-5)
    for out in outs:
        out.hidden.pow(2).sum().backward()
    grads = dict(dense.named_parameters())
    checked = [name for name, p in flex.named_parameters() if p.grad is not None]
    for name in checked:  # gradients reach 1e4 here: the tolerance scales with each tensor's largest entry
        want = grads[name].grad
        torch.testing.assert_close(dict(flex.named_parameters())[name].grad, want, rtol=1e-4,
                                   atol=1e-5 * want.abs().max().item(), msg=name)
    assert len(checked) > 5
