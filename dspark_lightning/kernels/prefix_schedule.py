"""One decision of the hardware-aware prefix scheduler (DSpark paper Algorithm 1, causal early stop) per call.

Inputs: per-step confidences ``c [R, K]`` and the steps per second of a verify batch of ``B`` tokens for every
``B = R, R + 1, ..., R + R*K`` (``sps_values [R*K + 1]``; the policy reads them from its SPS table). Output: the
verify length ``n_r`` of every request. With ``S_rk = prod_{i<=k} clamp(c_ri, 0, 1)``, the R*K drafts are ranked by
descending ``S`` (ties: position-major flat index ``k*R + r``, so ``(r, k)`` precedes ``(r, k+1)``), and the first
``keep`` of them are admitted, where ``keep`` is the first rank j whose admission would lower
``V_j = (R + sum of the j best S) * SPS(R + j)``; ``n_r`` counts request r's admitted drafts (always a prefix).

Two implementations with one signature: :func:`prefix_schedule_reference` (plain torch, float64; no host sync, so a
CUDA caller is never blocked) and a one-launch Triton kernel (``_prefix_schedule_triton``; CUDA, or CPU tensors under
``TRITON_INTERPRET=1``). :func:`prefix_schedule` dispatches: Triton on CUDA when Triton is installed and the batch
fits one program, torch elsewhere; ``backend=`` or ``DSPARK_KERNEL_BACKEND`` forces one.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .vocab_ce_l1 import BACKEND_ENV, resolve_backend

# One Triton program holds every draft; beyond this many (padded to powers of two) the torch path is used.
MAX_TRITON_DRAFTS = 16384


def _check(confidence: Tensor, sps_values: Tensor) -> None:
    if confidence.dim() != 2:
        raise ValueError(f"confidence must be [R, K], got shape {tuple(confidence.shape)}.")
    r, k = confidence.shape
    if sps_values.shape != (r * k + 1,):
        raise ValueError(f"sps_values must hold SPS(B) for B = R..R+R*K, i.e. shape ({r * k + 1},) for R={r}, K={k}; "
                         f"got {tuple(sps_values.shape)} (SpsTable.arange(R, R + R*K + 1) builds it).")


def prefix_schedule_reference(confidence: Tensor, sps_values: Tensor) -> Tensor:
    """Plain-torch version of :func:`prefix_schedule` (float64, no host synchronisation)."""
    _check(confidence, sps_values)
    r, k = confidence.shape
    if r == 0 or k == 0:
        return torch.zeros(r, dtype=torch.long, device=confidence.device)
    # [K, R] contiguous: the flat order is position-major, so the stable sort ranks (r, k) before (r, k+1) on ties
    survival = confidence.new_empty((k, r), dtype=torch.float64).copy_(confidence.t()).clamp_(0, 1).cumprod_(0)
    gains, order = torch.sort(survival.view(-1), descending=True, stable=True)
    # [R*K + 1]: the objective after admitting the 0, 1, ..., R*K best drafts
    value = torch.cat([gains.new_zeros(1), gains]).cumsum_(0).add_(r).mul_(sps_values)
    # Causal early stop: rank j is admitted iff no rank <= j lowered the objective (a prefix of the ranking).
    admitted = (value[1:] >= value[:-1]).cumprod(0)
    return admitted.new_empty(r * k).scatter_(0, order, admitted).view(k, r).sum(0)


def prefix_schedule(confidence: Tensor, sps_values: Tensor, *, backend: str | None = None,
                    num_warps: int | None = None) -> Tensor:
    """Verify lengths ``[R]`` (int64) from confidences ``[R, K]`` (Algorithm 1 with the causal early stop).

    Args:
        confidence: [R, K] per-step confidences, any float dtype, any strides.
        sps_values: [R*K + 1] steps per second for ``R, R+1, ..., R+R*K`` verified tokens, on the same device.
        backend: ``auto`` / ``torch`` / ``triton`` (None reads ``$DSPARK_KERNEL_BACKEND``, default ``auto``).
        num_warps: Triton warps of the single program (default: by size).

    Returns:
        ``n [R]`` int64, ``0 <= n_r <= K``. The Triton kernel ranks by float64 survival with the lowest
        ``log2(padded R*K)`` mantissa bits dropped (room for the flat index in a 64-bit sort key) and sums in a
        different order; it agrees with the torch path unless two survivals or two objective values agree to about
        1e-11 relative at the cut. Exact ties are broken alike, and the result stays causal (Appendix A).
    """
    _check(confidence, sps_values)
    r, k = confidence.shape
    choice = resolve_backend(backend, confidence.device)
    fits = _padded(r) * _padded(k, 2) <= MAX_TRITON_DRAFTS
    forced = (backend or os.environ.get(BACKEND_ENV) or "auto").lower() == "triton"
    if choice == "torch" or r == 0 or k == 0 or (not fits and not forced):
        return prefix_schedule_reference(confidence, sps_values)
    if not fits:
        raise ValueError(f"R*K = {r}x{k} drafts do not fit one Triton program (at most {MAX_TRITON_DRAFTS} after "
                         "padding to powers of two); use backend='torch'.")
    from . import _prefix_schedule_triton as tri  # imports triton: only on first use

    out = torch.empty(r, dtype=torch.long, device=confidence.device)
    tri.launch(confidence, sps_values.to(device=confidence.device, dtype=torch.float64).contiguous(), out,
               _padded(r), _padded(k, 2), num_warps)
    return out


def _padded(n: int, floor: int = 16) -> int:
    """Power-of-two tile size (tl.arange and tl.sort need powers of two; tiny tiles are padded up)."""
    return max(floor, 1 << max(n - 1, 0).bit_length())
