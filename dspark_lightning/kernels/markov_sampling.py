"""The DSpark Markov head's left-to-right sampling loop (vanilla head) as one fused step per draft position.

For a batch row with base logits ``U`` [K, V] (one backbone pass), first previous token ``x_{-1} = prev0`` and
Markov weights ``w1``, ``w2`` (both [V, r]; ``markov_w1.weight`` and ``markov_w2.weight``)::

    logits_k = U_k + w2 @ w1[x_{k-1}]                     (fp32 math whatever the input dtypes)
    x_k      = argmax_v(logits_k[v] / T + g_k[v])          T > 0, g_k i.i.d. Gumbel(0, 1) (Gumbel-max sampling)
    x_k      = argmax_v(logits_k[v])                       T = 0 (greedy; ``noise`` is ignored)

Gumbel-max draws ``x_k`` from ``softmax(logits_k / T)`` exactly, and because the caller passes the noise, the
draw is a pure function of the inputs: the torch loop and the Triton kernel pick the same tokens. Ties go to the
lowest index, as :func:`torch.argmax`. Inputs must be free of NaN.

Two implementations with one signature: :func:`markov_sample_reference` (plain torch; the CPU path and the parity
oracle) and Triton kernels (``_markov_sampling_triton``; CUDA, or CPU tensors under ``TRITON_INTERPRET=1``): one
launch per draft position on a ``(B, cdiv(V, block_v))`` grid, so that every step streams ``w2`` with the whole GPU,
each program reducing the previous step's per-tile argmax partials to find its row's previous token, plus one
tiny launch for the last token (K + 1 launches; the design note is in that module's docstring).
:func:`markov_sample` dispatches: Triton on CUDA when Triton is installed, torch elsewhere; ``backend=`` or
``$DSPARK_KERNEL_BACKEND`` (``auto`` / ``torch`` / ``triton``) forces one.

How ``DSpark.propose`` uses it (vanilla Markov head only; the gated and rnn heads read the hidden state and stay
on the drafter's own loop): the decoding engine installs :func:`markov_sampler` as ``DSpark.markov_sampler``, and
``DSpark._propose_vanilla`` turns its ``(tokens, logits)`` into the proposal's probabilities (``softmax(logits / T)``,
one-hot at T = 0: exactly the distribution each token was drawn from, as verification needs) and computes the
confidences vectorised over K. Two differences from the drafter's own loop: the Markov bias is added in fp32 rather
than in the weights' dtype, and the random stream is Gumbel noise rather than ``torch.multinomial`` (same
distribution, different draws for a given seed).
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from .vocab_ce_l1 import BACKEND_ENV, resolve_backend


def gumbel_noise(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
    """I.i.d. Gumbel(0, 1) noise ``-log(-log(u))``, fp32 of ``shape``.

    The uniforms are drawn in float64: fp32 uniforms sit on a 2^-24 grid, which coarsely quantises the upper tail
    of the Gumbel (exactly the part that decides the argmax over a 150k vocabulary).
    """
    u = torch.rand(tuple(shape), generator=generator, device=device, dtype=torch.float64)
    return u.log_().neg_().log_().neg_().float()  # u = 0 gives -inf: that entry never wins


def _check(base_logits: Tensor, prev0: Tensor, w1: Tensor, w2: Tensor, temperature: float,
           noise: Tensor | None) -> None:
    if base_logits.dim() != 3:
        raise ValueError(f"base_logits must be [B, K, V], got shape {tuple(base_logits.shape)}.")
    b, _, v = base_logits.shape
    if prev0.shape != (b,) or prev0.is_floating_point() or prev0.is_complex():
        raise ValueError(f"prev0 must be integer token ids of shape [{b}] (the anchor token of each row), got "
                         f"{prev0.dtype} of shape {tuple(prev0.shape)}.")
    if w1.dim() != 2 or w2.dim() != 2 or w1.shape != w2.shape or w2.shape[0] != v:
        raise ValueError(f"w1 and w2 must both be [V, r] with V = {v} (markov_w1.weight, markov_w2.weight), got "
                         f"{tuple(w1.shape)} and {tuple(w2.shape)}.")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature}.")
    if temperature > 0:
        if noise is None:
            raise ValueError(f"temperature {temperature} > 0 needs Gumbel noise of shape {tuple(base_logits.shape)}: "
                             "pass noise=gumbel_noise(base_logits.shape, generator, base_logits.device).")
        if noise.shape != base_logits.shape:
            raise ValueError(f"noise must have the shape of base_logits {tuple(base_logits.shape)}, got "
                             f"{tuple(noise.shape)}.")
    tensors = [base_logits, prev0, w1, w2] + ([noise] if noise is not None and temperature > 0 else [])
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}.")


def markov_sample_reference(base_logits: Tensor, prev0: Tensor, w1: Tensor, w2: Tensor, temperature: float,
                            noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Plain-torch version of :func:`markov_sample` (same arguments and results), the obvious loop over K."""
    _check(base_logits, prev0, w1, w2, temperature, noise)
    w2f = w2.float()  # cast once: [V, r]
    prev = prev0.long()
    tokens, logits = [], []
    for k in range(base_logits.shape[1]):
        z = base_logits[:, k].float() + w1[prev].float() @ w2f.t()  # [B, V]
        score = z if temperature == 0 else z / temperature + noise[:, k].float()
        prev = score.argmax(-1)
        tokens.append(prev)
        logits.append(z)
    b, _, v = base_logits.shape
    if not tokens:  # K = 0
        return prev0.new_empty(b, 0, dtype=torch.long), base_logits.new_empty(b, 0, v, dtype=torch.float32)
    return torch.stack(tokens, 1), torch.stack(logits, 1)


def markov_sample(base_logits: Tensor, prev0: Tensor, w1: Tensor, w2: Tensor, temperature: float,
                  noise: Tensor | None = None, backend: str | None = None, block_v: int | None = None,
                  num_warps: int = 4) -> tuple[Tensor, Tensor]:
    """Draft K tokens with the vanilla Markov head (formulas in the module docstring).

    Args:
        base_logits: [B, K, V] parallel logits ``U`` of the block (any float dtype).
        prev0: [B] int token before the block (the anchor), in [0, V).
        w1: [V, r] ``markov_w1.weight``; row ``x`` is the feature of previous token ``x``.
        w2: [V, r] ``markov_w2.weight`` (the Linear r -> V).
        temperature: sampling temperature; 0 is greedy.
        noise: [B, K, V] Gumbel(0, 1) noise (:func:`gumbel_noise`), required when ``temperature > 0``.
        backend: ``auto`` / ``torch`` / ``triton`` (None reads ``$DSPARK_KERNEL_BACKEND``, default ``auto``).
        block_v, num_warps: Triton tile height over V (a power of two; None: 128), i.e. ``cdiv(V, block_v)``
            programs per row and step, and warps per program.

    Returns:
        ``tokens`` [B, K] int64 and ``logits`` [B, K, V] fp32, the logits each token was drawn from (before ``/ T``).
    """
    if resolve_backend(backend, base_logits.device) == "torch":
        return markov_sample_reference(base_logits, prev0, w1, w2, temperature, noise)
    _check(base_logits, prev0, w1, w2, temperature, noise)
    from . import _markov_sampling_triton as tri  # imports triton: only on first use

    b, k, v = base_logits.shape
    tokens = torch.empty(b, k, device=base_logits.device, dtype=torch.long)
    logits = torch.empty(b, k, v, device=base_logits.device, dtype=torch.float32)
    sampled = temperature > 0
    tri.launch(base_logits if base_logits.stride(-1) == 1 else base_logits.contiguous(), prev0.long().contiguous(),
               w1.contiguous(), w2.contiguous(), float(temperature),
               (noise if noise.stride(-1) == 1 else noise.contiguous()) if sampled else None,
               tokens, logits, block_v, num_warps)
    return tokens, logits


# Rows x vocabulary up to which the Triton kernel is used by default. Measured on the H200 (K = 7, r = 256): at
# B = 1 it is 1.4-2.1x faster than the torch loop (V = 49,152 and 151,936); at B = 32 it is about even with
# V = 49,152 (0.95-1.22x) and 2x slower with V = 151,936 (docs/results/performance.md).
TRITON_MAX_ROWS_X_VOCAB = 32 * 49_152


def sampler_backend(batch: int, vocab: int) -> str | None:
    """``torch`` above :data:`TRITON_MAX_ROWS_X_VOCAB` unless ``$DSPARK_KERNEL_BACKEND`` forces a backend;
    None (the usual dispatch: Triton on CUDA) otherwise."""
    if os.environ.get(BACKEND_ENV, "auto") != "auto":
        return None
    return "torch" if batch * vocab > TRITON_MAX_ROWS_X_VOCAB else None


def markov_sampler(base_logits: Tensor, prev0: Tensor, w1: Tensor, w2: Tensor, temperature: float,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """:func:`markov_sample` with its Gumbel noise drawn from ``generator`` and the backend chosen by size
    (:func:`sampler_backend`): the ``DSpark.markov_sampler`` hook the decoding engine installs."""
    noise = gumbel_noise(base_logits.shape, generator, base_logits.device) if temperature > 0 else None
    backend = sampler_backend(base_logits.shape[0], base_logits.shape[-1])
    return markov_sample(base_logits, prev0, w1, w2, temperature, noise, backend=backend)
