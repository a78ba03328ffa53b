"""Parity of the fused block-drafter loss (kernels/fused_block_loss.py, kernels/vocab_ce_l1.py) with autograd.

Oracles: plain autograd through ``log_softmax`` / ``abs`` (for the elementwise op and the autograd Function) and
the default ``block_drafter_loss`` path (for the full tiny DSpark: loss terms, metrics and every trainable
parameter's gradient). The torch backend always runs; the Triton kernel runs natively on CUDA and under
``TRITON_INTERPRET=1`` on CPU. The variable must be set before ``triton.language`` is imported (its library functions
are decorated then): it is set below; when another test module of the session imported triton first, the Triton
cases run again in a fresh interpreter process instead (``test_triton_cases_in_fresh_process``).
``@pytest.mark.gpu`` tests check the CUDA kernel at the Qwen3-4B vocabulary.
"""

from __future__ import annotations

import os
import types

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # before anything imports triton (dspark_lightning.kernels does)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dspark_lightning.drafters import DFlash, DrafterConfig, DSpark
from dspark_lightning.kernels import fused_block_loss, vocab_ce_l1, vocab_ce_l1_reference
from dspark_lightning.kernels import testing as kernel_testing
from dspark_lightning.kernels.vocab_ce_l1 import resolve_backend
from dspark_lightning.losses import block_drafter_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton, test_triton_cases_in_fresh_process = kernel_testing.triton_test_kit(__file__)

V, H, RANK, GAMMA, B, L = 300, 32, 8, 4, 2, 28


# ------------------------------------------------------------------------------------------------ oracles
def autograd_ce_l1(draft, target, labels, bias=None, softcap=None):
    """Per-token CE and L1 written the obvious way (differentiable w.r.t. draft and bias)."""
    cap = (lambda x: torch.tanh(x / softcap) * softcap) if softcap else (lambda x: x)
    z = cap(draft) + (bias if bias is not None else 0.0)
    logp = F.log_softmax(z, dim=-1)
    ce = -logp.gather(-1, labels[:, None]).squeeze(-1)
    l1 = (logp.exp() - F.softmax(cap(target), dim=-1)).abs().sum(-1)
    return ce, l1


def tiles(t, v, dtype, seed=0, scale=3.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    draft = (scale * torch.randn(t, v, generator=g, dtype=torch.float64)).to(device, dtype)
    target = (scale * torch.randn(t, v, generator=g, dtype=torch.float64)).to(device, dtype)
    bias = torch.randn(t, v, generator=g, dtype=torch.float64).to(device, dtype)
    labels = torch.randint(0, v, (t,), generator=g).to(device)
    ce_coef = torch.rand(t, generator=g).to(device)
    l1_coef = torch.rand(t, generator=g).to(device)
    return draft, target, bias, labels, ce_coef, l1_coef


# ------------------------------------------------------------------------------------- elementwise op
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_reference_elementwise_matches_autograd(with_bias, softcap):
    draft, target, bias, labels, ce_coef, l1_coef = tiles(6, 53, torch.float64)
    bias = bias if with_bias else None
    d = draft.clone().requires_grad_()
    b = bias.clone().requires_grad_() if with_bias else None
    ce_ref, l1_ref = autograd_ce_l1(d, target, labels, b, softcap)
    (ce_coef.double() * ce_ref + l1_coef.double() * l1_ref).sum().backward()

    ce, l1, g_draft, g_bias = vocab_ce_l1_reference(draft, target, labels, ce_coef, l1_coef, bias=bias,
                                                    softcap=softcap)
    tol = dict(atol=1e-6, rtol=1e-6)  # ce/l1 come back in fp32, coefficients are fp32
    torch.testing.assert_close(ce.double(), ce_ref.detach(), **tol)
    torch.testing.assert_close(l1.double(), l1_ref.detach(), **tol)
    torch.testing.assert_close(g_draft, d.grad, **tol)
    if with_bias:
        torch.testing.assert_close(g_bias, b.grad, **tol)
        assert (g_bias is g_draft) == (softcap is None)
    else:
        assert g_bias is None

    # in place: the gradients land in the input tiles
    d2, b2 = draft.clone(), bias.clone() if with_bias else None
    _, _, g_in, gb_in = vocab_ce_l1_reference(d2, target, labels, ce_coef, l1_coef, bias=b2, softcap=softcap,
                                              inplace=True)
    assert g_in.data_ptr() == d2.data_ptr()
    torch.testing.assert_close(d2, g_draft, atol=0, rtol=0)
    if with_bias and softcap:
        assert gb_in.data_ptr() == b2.data_ptr()
        torch.testing.assert_close(b2, g_bias, atol=0, rtol=0)


def test_backend_resolution(monkeypatch):
    monkeypatch.delenv("DSPARK_KERNEL_BACKEND", raising=False)
    assert resolve_backend(None, torch.device("cpu")) == "torch"
    assert resolve_backend("torch", torch.device("cuda")) == "torch"
    monkeypatch.setenv("DSPARK_KERNEL_BACKEND", "torch")
    assert resolve_backend(None, torch.device("cuda")) == "torch"
    with pytest.raises(ValueError, match="Unknown kernel backend"):
        resolve_backend("cuda", torch.device("cpu"))


@needs_triton
@pytest.mark.parametrize(("dtype", "with_bias", "softcap"), [
    (torch.float32, False, None), (torch.float32, True, None), (torch.float32, False, 5.0),
    (torch.float32, True, 5.0), (torch.bfloat16, True, None), (torch.bfloat16, True, 5.0),
])
def test_triton_elementwise_matches_reference(dtype, with_bias, softcap):
    # V = 300 with 64-wide slices: five slices, the last one partly masked
    draft, target, bias, labels, ce_coef, l1_coef = tiles(5, V, dtype, seed=3, device=DEVICE)
    bias = bias if with_bias else None
    ref = vocab_ce_l1_reference(draft, target, labels, ce_coef, l1_coef, bias=bias, softcap=softcap)
    got = vocab_ce_l1(draft, target, labels, ce_coef, l1_coef, bias=bias, softcap=softcap, backend="triton",
                      block_v=64, num_warps=2)
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)
    # bf16 gradients: one rounding of the same fp32 value, so at most a unit in the last place apart
    gtol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-5, rtol=8e-3)
    torch.testing.assert_close(got[2], ref[2], **gtol)
    if with_bias:
        torch.testing.assert_close(got[3], ref[3], **gtol)
        assert (got[3] is got[2]) == (softcap is None)

    # in place over the inputs, and the loss-only variant
    d2, b2 = draft.clone(), bias.clone() if with_bias else None
    vocab_ce_l1(d2, target, labels, ce_coef, l1_coef, bias=b2, softcap=softcap, backend="triton", block_v=64,
                inplace=True)
    torch.testing.assert_close(d2, got[2], atol=0, rtol=0)
    if with_bias and softcap:
        torch.testing.assert_close(b2, got[3], atol=0, rtol=0)
    ce, l1, g, gb = vocab_ce_l1(draft, target, labels, ce_coef, l1_coef, bias=bias, softcap=softcap,
                                backend="triton", block_v=128, compute_grad=False)
    assert g is None and gb is None
    torch.testing.assert_close(ce, ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l1, ref[1], atol=1e-5, rtol=1e-5)


@needs_triton
def test_triton_elementwise_no_rows():
    draft, target, bias, labels, ce_coef, l1_coef = tiles(0, V, torch.float32, device=DEVICE)
    ce, l1, g, gb = vocab_ce_l1(draft, target, labels, ce_coef, l1_coef, bias=bias, backend="triton")
    assert ce.shape == l1.shape == (0,) and g.shape == (0, V) and gb is g


# ------------------------------------------------------------------------------ the autograd Function
def function_inputs(t, dtype=torch.float64, markov=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, s=1.0: (s * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)
    return dict(hidden=rnd(t, H).requires_grad_(), target_hidden=rnd(t, H), weight=rnd(V, H, s=0.5),
                labels=torch.randint(0, V, (t,), generator=g), w=torch.rand(t, generator=g),
                markov=rnd(t, RANK).requires_grad_() if markov else None,
                markov_weight=rnd(V, RANK, s=0.5).requires_grad_() if markov else None)


def unfused_function_loss(x, ce_weight, l1_weight, softcap):
    cap = (lambda z: torch.tanh(z / softcap) * softcap) if softcap else (lambda z: z)
    draft = cap(x["hidden"] @ x["weight"].t())
    if x["markov"] is not None:
        draft = draft + x["markov"] @ x["markov_weight"].t()
    target = cap(x["target_hidden"] @ x["weight"].t())
    logp = F.log_softmax(draft.float(), -1)
    ce = -logp.gather(-1, x["labels"][:, None]).squeeze(-1)
    l1 = (logp.exp() - F.softmax(target.float(), -1)).abs().sum(-1)
    w = x["w"] / (x["w"].sum() + 1e-6)
    return ce_weight * (w * ce).sum() + l1_weight * (w * l1).sum(), ce, l1


def leaves(x):
    return {k: x[k] for k in ("hidden", "markov", "markov_weight") if x[k] is not None}


@pytest.mark.parametrize(("t", "chunk"), [(13, 4), (12, 4), (13, 64)])
@pytest.mark.parametrize(("markov", "softcap"), [(True, None), (False, None), (True, 4.0), (False, 4.0)])
def test_fused_function_matches_autograd(t, chunk, markov, softcap):
    x = function_inputs(t, markov=markov)
    ref_loss, ce_ref, l1_ref = unfused_function_loss(x, 0.3, 0.7, softcap)
    ref_grads = torch.autograd.grad(ref_loss, list(leaves(x).values()))

    w = x["w"] / (x["w"].sum() + 1e-6)
    out = fused_block_loss(x["hidden"], x["target_hidden"], x["weight"], x["labels"], w, markov=x["markov"],
                           markov_weight=x["markov_weight"], ce_weight=0.3, l1_weight=0.7, softcap=softcap,
                           chunk_size=chunk, backend="torch")
    grads = torch.autograd.grad(out.loss, list(leaves(x).values()))
    tol = dict(atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.loss.double(), ref_loss.double(), **tol)
    torch.testing.assert_close(out.ce, ce_ref, **tol)
    torch.testing.assert_close(out.l1, l1_ref, **tol)
    torch.testing.assert_close(out.ce_loss, (w * ce_ref).sum(), **tol)
    torch.testing.assert_close(out.l1_loss, (w * l1_ref).sum(), **tol)
    for name, got, want in zip(leaves(x), grads, ref_grads):
        assert want.abs().sum() > 0, name
        torch.testing.assert_close(got, want, **tol, msg=name)


@needs_triton
@pytest.mark.parametrize(("markov", "softcap"), [(True, None), (True, 4.0)])
def test_fused_function_triton_backend_matches_torch(markov, softcap):
    x = function_inputs(11, dtype=torch.float32, markov=markov, seed=5)
    x = {k: (v.detach().to(DEVICE).requires_grad_(v.requires_grad) if torch.is_tensor(v) else v) for k, v in x.items()}
    w = x["w"] / (x["w"].sum() + 1e-6)
    results = {}
    for backend in ("torch", "triton"):
        out = fused_block_loss(x["hidden"], x["target_hidden"], x["weight"], x["labels"], w, markov=x["markov"],
                               markov_weight=x["markov_weight"], ce_weight=0.1, l1_weight=0.9, softcap=softcap,
                               chunk_size=4, backend=backend)
        results[backend] = (out, torch.autograd.grad(out.loss, list(leaves(x).values())))
    (ref, ref_grads), (got, got_grads) = results["torch"], results["triton"]
    for field in ("loss", "ce_loss", "l1_loss", "ce", "l1"):
        torch.testing.assert_close(getattr(got, field), getattr(ref, field), atol=1e-5, rtol=1e-5, msg=field)
    for name, a, b in zip(leaves(x), got_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4, msg=name)


def test_fused_function_grad_output_outputs_and_no_grad():
    x = function_inputs(9)
    w = x["w"] / (x["w"].sum() + 1e-6)
    kw = dict(markov=x["markov"], markov_weight=x["markov_weight"], ce_weight=0.1, l1_weight=0.9, chunk_size=4)
    out = fused_block_loss(x["hidden"], x["target_hidden"], x["weight"], x["labels"], w, **kw)
    # per-token values and the metric sums carry no graph: callers use them detached (soft label, accept rate)
    for field in ("ce", "l1", "ce_loss", "l1_loss"):
        assert not getattr(out, field).requires_grad, field
    assert out.loss.requires_grad

    # backward scales the stored gradients by the incoming gradient, and may run twice with retain_graph
    once = torch.autograd.grad(out.loss, list(leaves(x).values()), retain_graph=True)
    scaled = torch.autograd.grad(-2.5 * out.loss + 0.0 * out.ce.sum(), list(leaves(x).values()))
    for a, b in zip(once, scaled):
        torch.testing.assert_close(b, -2.5 * a, atol=1e-12, rtol=1e-12)

    with torch.no_grad():  # evaluation: same values, no gradient pass
        ev = fused_block_loss(x["hidden"], x["target_hidden"], x["weight"], x["labels"], w, **kw)
    assert not ev.loss.requires_grad
    torch.testing.assert_close(ev.loss, out.loss.detach(), atol=0, rtol=0)
    torch.testing.assert_close(ev.l1, out.l1, atol=0, rtol=0)


def test_fused_function_empty_and_argument_checks():
    x = function_inputs(0)
    out = fused_block_loss(x["hidden"], x["target_hidden"], x["weight"], x["labels"], x["w"],
                           markov=x["markov"], markov_weight=x["markov_weight"], l1_weight=1.0)
    assert out.ce.shape == (0,) and float(out.loss.detach()) == 0.0
    grads = torch.autograd.grad(out.loss, list(leaves(x).values()))
    assert all(not g.any() for g in grads)

    x = function_inputs(3)
    args = (x["hidden"], x["target_hidden"], x["weight"], x["labels"], x["w"])
    with pytest.raises(ValueError, match="go together"):
        fused_block_loss(*args, markov=x["markov"])
    with pytest.raises(ValueError, match="frozen lm_head"):
        fused_block_loss(x["hidden"], x["target_hidden"], x["weight"].requires_grad_(), x["labels"], x["w"])
    with pytest.raises(ValueError, match="target states"):
        fused_block_loss(x["hidden"], x["hidden"], x["weight"].detach(), x["labels"], x["w"])


# ------------------------------------------------------------------------------- through the drafter
def tiny_drafter(algorithm="dspark", dtype=torch.float64, softcap=None, markov=True, seed=0):
    target = types.SimpleNamespace(
        model_type="qwen3", vocab_size=V, hidden_size=H, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6, max_position_embeddings=256, attention_bias=False,
        hidden_act="silu", num_hidden_layers=4, rope_theta=10000.0, final_logit_softcapping=softcap)
    kw = dict(markov_rank=RANK if markov else 0, enable_confidence_head=True, confidence_head_with_markov=markov) \
        if algorithm == "dspark" else {}
    cfg = DrafterConfig(algorithm=algorithm, num_hidden_layers=1, target_layer_ids=[0, 2], block_size=GAMMA + 1,
                        num_anchors=4, mask_token_id=V - 1, **kw).resolve(target)
    torch.manual_seed(seed)
    model = (DSpark if algorithm == "dspark" else DFlash)(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # spread the weights so that p_d and p_t differ clearly and every parameter matters
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.3 * noise)
            elif p.dim() == 2:
                p.copy_(noise * (1.0 if "embed" in name or "markov_w1" in name else 2.0 * p.shape[1] ** -0.5))
    return model.to(dtype)


def drafter_inputs(dtype, seed=1, supervised=True):
    g = torch.Generator().manual_seed(seed)
    loss_mask = torch.zeros(B, L, dtype=torch.bool)
    loss_mask[0, 5:] = True
    loss_mask[1, 9:22] = True
    anchors = torch.tensor([[5, 9, 14, 25], [9, 12, 17, 0]])  # blocks off the end, a loss-mask tail, a pad
    valid = torch.tensor([[True] * 4, [True, True, True, False]]) if supervised else torch.zeros(B, 4, dtype=bool)
    return dict(input_ids=torch.randint(0, V - 1, (B, L), generator=g),
                target_hidden=torch.randn(B, L, 2 * H, generator=g, dtype=torch.float64).to(dtype),
                loss_mask=loss_mask, anchors=anchors, anchor_valid=valid,
                last=(2.0 * torch.randn(B, L, H, generator=g, dtype=torch.float64)).to(dtype))


def run_loss(model, inputs, fused, **kw):
    model.zero_grad(set_to_none=True)
    out = model(inputs["input_ids"], inputs["target_hidden"], inputs["loss_mask"], inputs["anchors"],
                inputs["anchor_valid"])
    res = block_drafter_loss(out, model.compute_logits, inputs["last"], fused=fused, head=model.logits_head(), **kw)
    res.loss.backward()
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
             for n, p in model.named_parameters() if p.requires_grad}
    return res, grads


DRAFTER_CASES = {  # name: (algorithm, markov, softcap, loss kwargs)
    "dspark": ("dspark", True, None, dict(ce_weight=0.1, l1_weight=0.9, confidence_weight=1.0, chunk_size=7)),
    "dspark-softcap": ("dspark", True, 3.0, dict(ce_weight=0.3, l1_weight=0.5, confidence_weight=0.7,
                                                 chunk_size=1024)),
    "dspark-no-markov": ("dspark", False, None, dict(ce_weight=0.1, l1_weight=0.9, chunk_size=5)),
    "dflash": ("dflash", False, None, dict(ce_weight=1.0, l1_weight=0.0, confidence_weight=0.0, chunk_size=8)),
}


# float64 for every case; float32 on the DSpark cases only (runtime).
FUSED_CASES = [(name, torch.float64) for name in DRAFTER_CASES] + [
    (name, torch.float32) for name in ("dspark", "dspark-softcap")]


@pytest.mark.parametrize(("name", "dtype"), FUSED_CASES)
def test_block_drafter_loss_fused_matches_default(name, dtype):
    algorithm, markov, softcap, kw = DRAFTER_CASES[name]
    model = tiny_drafter(algorithm, dtype, softcap, markov)
    inputs = drafter_inputs(dtype)
    ref, ref_grads = run_loss(model, inputs, False, **kw)
    got, got_grads = run_loss(model, inputs, True, **kw)
    assert ref.num_tokens == got.num_tokens > 0
    assert ref.num_tokens % kw["chunk_size"] != 0 or name == "dflash"  # a ragged last chunk in most cases

    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-4)
    assert set(got.terms) == set(ref.terms)
    for key in ref.terms:
        # the default path's ce/loss are float64 here (its graph anchor is), the fused sums fp32: compare values
        torch.testing.assert_close(got.terms[key].detach().double(), ref.terms[key].detach().double(), **tol, msg=key)
    torch.testing.assert_close(got.accept_rate, ref.accept_rate, **tol)
    torch.testing.assert_close(got.expected_tau, ref.expected_tau, **tol)
    torch.testing.assert_close(got.position_counts, ref.position_counts, atol=0, rtol=0)
    gtol = dict(atol=1e-8, rtol=1e-5) if dtype == torch.float64 else dict(atol=1e-6, rtol=2e-3)
    assert set(got_grads) == set(ref_grads)
    for n in ref_grads:
        if n.startswith("confidence_head") and kw.get("confidence_weight", 1.0) == 0.0:
            continue
        assert ref_grads[n].abs().sum() > 0, f"{n} gets no gradient"
        torch.testing.assert_close(got_grads[n], ref_grads[n], **gtol, msg=n)


@needs_triton
def test_block_drafter_loss_fused_triton_backend_from_env(monkeypatch):
    """``DSPARK_KERNEL_BACKEND=triton`` routes the fused loss through the Triton kernel (interpreted on CPU)."""
    algorithm, markov, softcap, kw = DRAFTER_CASES["dspark-softcap"]
    model = tiny_drafter(algorithm, torch.float32, softcap, markov).to(DEVICE)
    inputs = {k: v.to(DEVICE) for k, v in drafter_inputs(torch.float32).items()}
    ref, ref_grads = run_loss(model, inputs, False, **kw)
    monkeypatch.setenv("DSPARK_KERNEL_BACKEND", "triton")
    got, got_grads = run_loss(model, inputs, True, **kw)
    torch.testing.assert_close(got.loss.detach(), ref.loss.detach(), atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(got.accept_rate, ref.accept_rate, atol=2e-5, rtol=2e-4)
    for n in ref_grads:
        torch.testing.assert_close(got_grads[n], ref_grads[n], atol=1e-6, rtol=2e-3, msg=n)


def test_block_drafter_loss_fused_under_bf16_autocast():
    """bf16-mixed training: fp32 weights, bf16 logits in both paths; gradients in the parameters' fp32."""
    algorithm, markov, softcap, kw = DRAFTER_CASES["dspark"]
    model = tiny_drafter(algorithm, torch.float32, softcap, markov)
    inputs = drafter_inputs(torch.float32)
    results = {}
    for fused in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[fused] = run_loss(model, inputs, fused, **kw)
    (ref, ref_grads), (got, got_grads) = results[False], results[True]
    torch.testing.assert_close(got.loss.detach().float(), ref.loss.detach().float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got.accept_rate, ref.accept_rate, atol=1e-2, rtol=1e-2)
    for n, want in ref_grads.items():
        assert got_grads[n].dtype == want.dtype == torch.float32, n
        rel = (got_grads[n] - want).norm() / want.norm()
        assert rel < 3e-2, f"{n}: relative error {rel:.2e}"


@pytest.mark.parametrize("name", ["dspark", "dflash"])
def test_block_drafter_loss_fused_nothing_supervised(name):
    algorithm, markov, softcap, kw = DRAFTER_CASES[name]
    model = tiny_drafter(algorithm, markov=markov)
    res, grads = run_loss(model, drafter_inputs(torch.float64, supervised=False), True, **kw)
    assert res.num_tokens == 0 and float(res.loss.detach()) == 0.0
    assert all(not g.any() for g in grads.values())


def test_block_drafter_loss_fused_needs_a_drafter_method():
    model = tiny_drafter("dflash", markov=False)
    inputs = drafter_inputs(torch.float64)
    out = model(inputs["input_ids"], inputs["target_hidden"], inputs["loss_mask"], inputs["anchors"],
                inputs["anchor_valid"])
    with pytest.raises(ValueError, match="bound compute_logits"):
        block_drafter_loss(out, lambda h, m=None: model.compute_logits(h), inputs["last"], fused=True)


def test_block_drafter_loss_fused_with_a_head_that_requires_grad():
    """Under FSDP (use_orig_params) the frozen head's weight is a view of a flat parameter that requires grad:
    the fused loss treats it as frozen (same loss and drafter gradients, none for the head)."""
    algorithm, markov, softcap, kw = DRAFTER_CASES["dspark"]
    model = tiny_drafter(algorithm, torch.float64, softcap, markov)
    inputs = drafter_inputs(torch.float64)
    ref, ref_grads = run_loss(model, inputs, True, **kw)
    model.lm_head.weight.requires_grad_(True)
    got, got_grads = run_loss(model, inputs, True, **kw)
    assert model.lm_head.weight.grad is None
    torch.testing.assert_close(got.loss.detach(), ref.loss.detach(), atol=0, rtol=0)
    for n, want in ref_grads.items():
        torch.testing.assert_close(got_grads[n], want, atol=0, rtol=0, msg=n)


# ------------------------------------------------------------------------------------------------ GPU
QWEN3_VOCAB = 151936


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_gpu_triton_elementwise_qwen3_vocab(softcap):
    """One 1024-token chunk at the Qwen3-4B vocabulary, bf16 tiles: CUDA Triton vs the torch reference."""
    draft, target, bias, labels, ce_coef, l1_coef = tiles(1024, QWEN3_VOCAB, torch.bfloat16, seed=7, scale=4.0,
                                                          device="cuda")
    ce_coef, l1_coef = ce_coef / 3584, l1_coef / 3584  # the scale of real loss weights
    bias = bias if softcap else None
    ref = vocab_ce_l1_reference(draft, target, labels, ce_coef, l1_coef, bias=bias, softcap=softcap)
    got = vocab_ce_l1(draft.clone(), target, labels, ce_coef, l1_coef, bias=None if bias is None else bias.clone(),
                      softcap=softcap, backend="triton", inplace=True)
    torch.testing.assert_close(got[0], ref[0], atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(got[1], ref[1], atol=2e-4, rtol=1e-4)
    for a, b in zip(got[2:], ref[2:]):
        if b is None:
            continue
        scale = b.float().abs().max()
        torch.testing.assert_close(a.float(), b.float(), atol=float(scale) * 1e-3, rtol=1e-2)


@pytest.mark.gpu
@needs_triton
def test_gpu_fused_block_loss_qwen3_vocab_matches_autograd():
    """fused_block_loss (Triton, bf16, hidden 2560, Markov rank 256) vs autograd over bf16 logits, 1,100 tokens."""
    t, h, r = 1100, 2560, 256
    g = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *s, sc=1.0: (sc * torch.randn(*s, generator=g, device="cuda")).bfloat16()
    hidden, target_h, u = rnd(t, h).requires_grad_(), rnd(t, h), rnd(t, r).requires_grad_()
    weight, w2 = rnd(QWEN3_VOCAB, h, sc=0.04), rnd(QWEN3_VOCAB, r, sc=0.05).requires_grad_()
    labels = torch.randint(0, QWEN3_VOCAB, (t,), device="cuda", generator=g)
    w = torch.exp(-(torch.arange(t, device="cuda") % 7).float() / 4.0)
    wn = w / (w.sum() + 1e-6)
    out = fused_block_loss(hidden, target_h, weight, labels, wn, markov=u, markov_weight=w2, ce_weight=0.1,
                           l1_weight=0.9, chunk_size=512, backend="triton")
    grads = torch.autograd.grad(out.loss, [hidden, u, w2])
    ref_ce, ref_l1, ref_grads = [], [], [torch.zeros_like(hidden), torch.zeros_like(u), torch.zeros_like(w2)]
    for s in range(0, t, 256):  # the unfused computation, in slices to bound memory
        sl = slice(s, s + 256)
        ce, l1 = autograd_ce_l1((hidden[sl] @ weight.t() + u[sl] @ w2.t()).float(), (target_h[sl] @ weight.t()).float(),
                                labels[sl])
        part = torch.autograd.grad((wn[sl] * (0.1 * ce + 0.9 * l1)).sum(), [hidden, u, w2])
        for acc, p in zip(ref_grads, part):
            acc += p
        ref_ce.append(ce.detach())
        ref_l1.append(l1.detach())
    torch.testing.assert_close(out.ce, torch.cat(ref_ce), atol=5e-2, rtol=1e-2)  # bf16 logits rounded differently
    torch.testing.assert_close(out.l1, torch.cat(ref_l1), atol=2e-2, rtol=1e-2)
    for name, a, b in zip(("hidden", "u", "w2"), grads, ref_grads):
        rel = (a.float() - b.float()).norm() / b.float().norm()
        assert rel < 2e-2, f"{name}: relative error {rel:.3e}"
