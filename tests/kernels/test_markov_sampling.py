"""The fused Markov-head sampling loop (kernels/markov_sampling.py) against a float64 loop and against itself.

Oracles: an independent float64 loop written here (golden tokens and logits for the torch reference), the torch
reference (for the Triton kernel: the same tokens exactly, logits to fp32 rounding) and ``softmax(logits / T)``
(chi-square tests that Gumbel-max draws from it). The Triton kernel runs natively on CUDA and under
``TRITON_INTERPRET=1`` on CPU; as in test_fused_block_loss.py, the variable is set before triton is imported, and
when another test module imported triton first the Triton cases run in a fresh process instead.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before anything imports triton (dspark_lightning.kernels does)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dspark_lightning.kernels import gumbel_noise, markov_sample, markov_sample_reference
from dspark_lightning.kernels import testing as kernel_testing

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton, test_triton_cases_in_fresh_process = kernel_testing.triton_test_kit(__file__)


def inputs(b, k, v, r, dtype=torch.float32, seed=0, device="cpu", scale=3.0):
    """Base logits, anchors, Markov weights and Gumbel noise; the bias ``w2 w1[x]`` is about as large as ``U``."""
    g = torch.Generator().manual_seed(seed)
    base = (scale * torch.randn(b, k, v, generator=g)).to(device, dtype)
    prev0 = torch.randint(0, v, (b,), generator=g).to(device)
    w1 = torch.randn(v, r, generator=g).to(device, dtype)
    w2 = (scale * r ** -0.5 * torch.randn(v, r, generator=g)).to(device, dtype)
    return base, prev0, w1, w2, gumbel_noise((b, k, v), g).to(device)


def golden(base, prev0, w1, w2, temperature, noise):
    """The sampling loop in float64, one row and one position at a time, first index on ties."""
    b, k, v = base.shape
    tokens, logits = torch.zeros(b, k, dtype=torch.long), torch.zeros(b, k, v, dtype=torch.float64)
    for i in range(b):
        prev = int(prev0[i])
        for j in range(k):
            z = base[i, j].double() + w2.double() @ w1[prev].double()
            score = z if temperature == 0 else z / temperature + noise[i, j].double()
            prev = int(torch.nonzero(score == score.max())[0])
            tokens[i, j], logits[i, j] = prev, z
    return tokens, logits


# ------------------------------------------------------------------------------------ torch reference
@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_float64_loop(temperature, dtype):
    base, prev0, w1, w2, noise = inputs(3, 5, 97, 8, dtype, seed=1)
    tokens, logits = markov_sample_reference(base, prev0, w1, w2, temperature, noise)
    want_tokens, want_logits = golden(base, prev0, w1, w2, temperature, noise)
    assert tokens.dtype == torch.long and logits.dtype == torch.float32
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logits.double(), want_logits, atol=1e-5, rtol=1e-5)


def test_reference_ties_go_to_the_lowest_index_and_noise_is_ignored_at_t0():
    base, prev0, w1, w2, _ = inputs(2, 3, 40, 8)
    w2 = torch.zeros_like(w2)
    base[:, :, [7, 21, 33]] = 50.0
    tokens, _ = markov_sample_reference(base, prev0, w1, w2, 0.0, noise=torch.full_like(base, float("nan")))
    assert (tokens == 7).all()


def test_dispatch_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("DSPARK_KERNEL_BACKEND", raising=False)
    args = inputs(2, 3, 50, 8)
    for got in (markov_sample(*args[:4], 1.0, args[4]), markov_sample(*args[:4], 1.0, args[4], backend="torch")):
        ref = markov_sample_reference(*args[:4], 1.0, args[4])
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    monkeypatch.setenv("DSPARK_KERNEL_BACKEND", "bogus")
    with pytest.raises(ValueError, match="Unknown kernel backend"):
        markov_sample(*args[:4], 1.0, args[4])


# ------------------------------------------------------------------------------------------ Triton
@needs_triton
@pytest.mark.parametrize("rank", [8, 32])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("batch", [1, 3, 5])
def test_triton_matches_reference(batch, temperature, rank):
    # V = 300 in 64-row tiles: a (B, 5) grid per step, the last tile partly masked
    base, prev0, w1, w2, noise = inputs(batch, 4, 300, rank, seed=10 * batch + rank, device=DEVICE)
    ref = markov_sample_reference(base, prev0, w1, w2, temperature, noise)
    got = markov_sample(base, prev0, w1, w2, temperature, noise, backend="triton", block_v=64, num_warps=2)
    assert got[0].dtype == torch.long and got[1].dtype == torch.float32
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("temperature", [0.0, 0.6])
def test_triton_bf16_strided_default_tile(temperature):
    """bf16 base logits and weights, a non-contiguous view of the base logits, the tile height chosen from r."""
    base, prev0, w1, w2, noise = inputs(3, 6, 211, 8, torch.bfloat16, seed=4, device=DEVICE)
    base = torch.cat([base, base], 1)[:, ::2]  # stride(1) = 2 V
    ref = markov_sample_reference(base, prev0, w1, w2, temperature, noise)
    got = markov_sample(base, prev0, w1, w2, temperature, noise, backend="triton")
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)


@needs_triton
def test_triton_ties_and_empty_shapes():
    base, prev0, w1, w2, noise = inputs(2, 3, 150, 8, device=DEVICE)
    base[:, :, [70, 3, 140]] = 50.0  # 3 and 70 sit in different 64-row tiles, 3 and 5 in the same one
    base[:, :, 5] = 50.0
    got = markov_sample(base, prev0, w1, torch.zeros_like(w2), 0.0, None, backend="triton", block_v=64)
    assert (got[0] == 3).all()
    for b, k in ((0, 3), (2, 0)):
        tokens, logits = markov_sample(base[:b, :k], prev0[:b], w1, w2, 1.0, noise[:b, :k], backend="triton")
        assert tokens.shape == (b, k) and logits.shape == (b, k, 150)


@needs_triton
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_triton_many_tiles_and_rank_chunks(temperature, monkeypatch):
    """V = 400 in 16-row tiles (25 programs per row and step) with the partials reduced 8 at a time, then r = 200
    in 64-wide chunks (the last one partly masked): both loops of the kernel against the torch loop."""
    from dspark_lightning.kernels import _markov_sampling_triton as tri

    monkeypatch.setattr(tri, "MAX_BLOCK_T", 8)
    base, prev0, w1, w2, noise = inputs(2, 4, 400, 24, seed=11, device=DEVICE)
    ref = markov_sample_reference(base, prev0, w1, w2, temperature, noise)
    got = markov_sample(base, prev0, w1, w2, temperature, noise, backend="triton", block_v=16, num_warps=1)
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)

    base, prev0, w1, w2, noise = inputs(2, 3, 700, 200, seed=12, device=DEVICE)  # block_r = 8192 // 128 = 64
    ref = markov_sample_reference(base, prev0, w1, w2, temperature, noise)
    got = markov_sample(base, prev0, w1, w2, temperature, noise, backend="triton", block_v=128)
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_triton_ties_across_many_tiles(temperature, monkeypatch):
    """Equal maxima spread over 16-row tiles of V = 330 (21 tiles, partials reduced 4 per chunk, so lane j holds
    tiles j, j + 4, ...): the lowest index wins whether the tied tiles share a chunk, a lane or neither. At T > 0 the
    noise is tied too, and a row whose scores are all -inf draws token 0, as torch.argmax."""
    from dspark_lightning.kernels import _markov_sampling_triton as tri

    monkeypatch.setattr(tri, "MAX_BLOCK_T", 4)
    b, k, v = 2, 5, 330
    base, prev0, w1, w2, _ = inputs(b, k, v, 8, seed=13, device=DEVICE)
    w2 = torch.zeros_like(w2)  # no Markov bias: the maxima below are exact ties
    noise = torch.zeros(b, k, v, device=DEVICE)
    ties = {0: [329, 250, 130, 131],  # tiles 20, 15, 8, 8: lanes 0, 3, 0, 0 -> 130
            1: [150, 100, 17, 16],  # tiles 9 (lane 1, chunk 2), 6 (lane 2, chunk 1), 1, 1 -> 16
            2: [150, 100],  # tile 6 beats tile 9 across lanes and chunks -> 100
            3: [40, 104, 328]}  # tiles 2 and 6 share lane 2; tile 20 is the last, partly masked one -> 40
    want = torch.tensor([130, 16, 100, 40, 0])
    for j, idx in ties.items():
        base[:, j, idx] = 50.0
    if temperature > 0:
        noise[:, 4] = float("-inf")  # every score of the last step is -inf
    else:
        base[:, 4] = -7.0  # all equal: the first index
    ref = markov_sample_reference(base, prev0, w1, w2, temperature, noise)
    got = markov_sample(base, prev0, w1, w2, temperature, noise, backend="triton", block_v=16)
    assert torch.equal(ref[0], want.expand(b, k).to(ref[0].device))
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- distribution
def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square goodness of fit; the survival function of chi2(df) is gammaincc(df / 2, x / 2)."""
    expected = counts.sum() * probs.double()
    stat = ((counts.double() - expected) ** 2 / expected).sum()
    df = torch.tensor((probs.numel() - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, stat / 2))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_gumbel_max_draws_from_softmax(temperature):
    """20k first tokens on a 6-token vocabulary follow softmax(logits_0 / T); the wrong temperature is rejected."""
    n, v = 20_000, 6
    _, _, w1, w2, _ = inputs(1, 1, v, 4, seed=2, scale=1.0)
    base = torch.tensor([0.3, -1.0, 1.2, 0.0, 0.8, -0.4]).expand(n, 1, v)
    prev0 = torch.full((n,), 2)
    noise = gumbel_noise((n, 1, v), torch.Generator().manual_seed(int(10 * temperature)))
    tokens, logits = markov_sample_reference(base, prev0, w1, w2, temperature, noise)
    counts = torch.bincount(tokens[:, 0], minlength=v)
    assert chi2_pvalue(counts, torch.softmax(logits[0, 0] / temperature, -1)) > 1e-3
    assert chi2_pvalue(counts, torch.softmax(logits[0, 0] / (1.3 * temperature), -1)) < 1e-6


def test_gumbel_max_pairs_follow_the_markov_chain():
    """The first two tokens jointly follow p(x0) p(x1 | x0), the second distribution shifted by the Markov bias."""
    n, v, temperature = 20_000, 4, 1.0
    base, _, w1, w2, _ = inputs(1, 2, v, 4, seed=5, scale=1.0)
    prev0 = torch.zeros(n, dtype=torch.long)
    noise = gumbel_noise((n, 2, v), torch.Generator().manual_seed(3))
    tokens, _ = markov_sample_reference(base.expand(n, 2, v), prev0, w1, w2, temperature, noise)
    counts = torch.bincount(tokens[:, 0] * v + tokens[:, 1], minlength=v * v)
    p0 = torch.softmax(base[0, 0] + w2 @ w1[0], -1)
    p1 = torch.softmax(base[0, 1] + w1 @ w2.t(), -1)  # row x: p(x1 | x0 = x)
    joint = (p0[:, None] * p1).flatten()
    assert chi2_pvalue(counts, joint) > 1e-3
    assert chi2_pvalue(counts, (p0[:, None] * torch.softmax(base[0, 1], -1)).flatten()) < 1e-6  # bias matters


def test_gumbel_noise_is_reproducible_and_standard():
    a = gumbel_noise((4, 5000), torch.Generator().manual_seed(0))
    b = gumbel_noise((4, 5000), torch.Generator().manual_seed(0))
    assert a.dtype == torch.float32 and torch.equal(a, b)
    assert abs(float(a.mean()) - 0.5772) < 0.03 and abs(float(a.var()) - torch.pi ** 2 / 6) < 0.08


# ---------------------------------------------------------------------------------------- errors
def test_bad_arguments_name_the_value_and_the_fix():
    base, prev0, w1, w2, noise = inputs(2, 3, 50, 8)
    with pytest.raises(ValueError, match=r"base_logits must be \[B, K, V\], got shape \(3, 50\)"):
        markov_sample(base[0], prev0, w1, w2, 0.0)
    with pytest.raises(ValueError, match=r"prev0 must be integer token ids of shape \[2\].*torch.float32"):
        markov_sample(base, prev0.float(), w1, w2, 0.0)
    with pytest.raises(ValueError, match=r"prev0 .* shape \(2, 1\)"):
        markov_sample(base, prev0[:, None], w1, w2, 0.0)
    with pytest.raises(ValueError, match=r"w1 and w2 must both be \[V, r\] with V = 50.*\(50, 8\) and \(49, 8\)"):
        markov_sample(base, prev0, w1, w2[:49], 0.0)
    with pytest.raises(ValueError, match=r"finite and >= 0 \(0 = greedy\), got -0.5"):
        markov_sample(base, prev0, w1, w2, -0.5, noise)
    with pytest.raises(ValueError, match=r"temperature 0.7 > 0 needs Gumbel noise .*noise=gumbel_noise\("):
        markov_sample(base, prev0, w1, w2, 0.7)
    with pytest.raises(ValueError, match=r"noise must have the shape of base_logits \(2, 3, 50\), got \(2, 3, 49\)"):
        markov_sample(base, prev0, w1, w2, 0.7, noise[..., :49])


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_gpu_triton_matches_reference_at_drafter_size(temperature):
    """B = 32 rows, gamma = 7, V = 49,152, r = 256, bf16 base logits and weights: CUDA Triton vs the torch loop."""
    base, prev0, w1, w2, noise = inputs(32, 7, 49152, 256, torch.bfloat16, seed=7, device="cuda")
    ref = markov_sample_reference(base, prev0, w1, w2, temperature, noise)
    got = markov_sample(base, prev0, w1, w2, temperature, noise, backend="triton")
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1], atol=1e-4, rtol=1e-5)


def test_engine_hook_keeps_large_batch_times_vocab_on_torch(monkeypatch):
    """The hook's size rule (H200: Triton loses above 32 rows x 49,152 tokens) and the environment override."""
    from dspark_lightning.kernels.markov_sampling import TRITON_MAX_ROWS_X_VOCAB, sampler_backend

    monkeypatch.delenv("DSPARK_KERNEL_BACKEND", raising=False)
    assert sampler_backend(1, 151_936) is None and sampler_backend(32, 49_152) is None
    assert sampler_backend(32, 151_936) == "torch" and sampler_backend(TRITON_MAX_ROWS_X_VOCAB + 1, 1) == "torch"
    monkeypatch.setenv("DSPARK_KERNEL_BACKEND", "triton")
    assert sampler_backend(32, 151_936) is None  # forced: the usual dispatch honours the variable
