"""Triton kernel behind :func:`dspark_lightning.kernels.prefix_schedule.prefix_schedule` (imported on first use only).

The whole decision is one program (one launch, nothing read back by the host):

1. survival ``S [BLOCK_K, BLOCK_R]`` in float64, a sequential product down each request's drafts (the same rounding
   as torch's CPU ``cumprod``); padding gets the largest sort key, so it ranks last;
2. a 64-bit sort key per draft: ``(bits(1.0) - bits(S))`` with its low ``IDX_BITS`` bits replaced by the
   position-major flat index ``k*R + r``. For ``0 <= S <= 1`` the float64 bit pattern grows with ``S``, so an
   ascending ``tl.sort`` ranks by descending survival, ties by flat index (what the torch path's stable sort does);
3. the gains are read back from the sorted keys (``S`` with the low ``IDX_BITS`` mantissa bits cleared), summed with
   ``tl.cumsum``, multiplied by the SPS values of budgets ``R + j``; ``keep`` = the first rank whose admission lowers
   the objective (a min-reduction);
4. the admitted drafts are exactly the keys below the key ranked ``keep``, so each request's length is a column sum
   of ``key < threshold`` over the unsorted tile: no scatter, no atomics.

``TRITON_INTERPRET=1`` must be set before this module is imported to run the kernel on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ONE_BITS = tl.constexpr(0x3FF0000000000000)  # float64 1.0
PAD_KEY = tl.constexpr(0x7FFFFFFFFFFFFFFF)


@triton.jit
def _prefix_schedule_kernel(
    conf_ptr, sps_ptr, out_ptr, n_req, n_pos, stride_r, stride_k,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, IDX_BITS: tl.constexpr,
):
    rows = tl.arange(0, BLOCK_R)
    pos = tl.arange(0, BLOCK_K)[:, None]
    row_ok = rows < n_req
    valid = (pos < n_pos) & row_ok[None, :]
    n_drafts = n_req * n_pos

    # ---- 1. survival, position-major tile [BLOCK_K, BLOCK_R]
    run = tl.full([BLOCK_R], 1.0, tl.float64)
    survival = tl.zeros([BLOCK_K, BLOCK_R], tl.float64)
    for k in tl.static_range(BLOCK_K):
        c = tl.load(conf_ptr + rows * stride_r + k * stride_k, mask=row_ok & (rows * 0 + k < n_pos),
                    other=0.0)
        run = run * tl.minimum(tl.maximum(c.to(tl.float64), 0.0), 1.0)
        survival = tl.where(pos == k, run[None, :], survival)

    # ---- 2. sort keys: descending survival, then ascending flat index (abs() of the bits: -0.0 ranks as 0.0)
    bits = survival.to(tl.int64, bitcast=True) & PAD_KEY
    flat = (pos * n_req + rows[None, :]).to(tl.int64)
    key = tl.where(valid, (ONE_BITS - (bits >> IDX_BITS << IDX_BITS)) | flat, PAD_KEY)
    ranked = tl.sort(tl.reshape(key, [BLOCK_K * BLOCK_R]))
    rank = tl.arange(0, BLOCK_K * BLOCK_R)
    real = rank < n_drafts

    # ---- 3. objective before / after admitting rank j, and the causal early stop
    gain_bits = ONE_BITS - (ranked >> IDX_BITS << IDX_BITS)
    gains = tl.where(real, gain_bits.to(tl.float64, bitcast=True), 0.0)
    total = tl.cumsum(gains, 0)
    after = (n_req + total) * tl.load(sps_ptr + rank + 1, mask=real, other=0.0)
    before = (n_req + (total - gains)) * tl.load(sps_ptr + rank, mask=real, other=0.0)
    keep = tl.min(tl.where(real & (after < before), rank, n_drafts), 0)

    # ---- 4. per-request counts: drafts whose key ranks below position `keep`
    threshold = tl.min(tl.where(rank >= keep, ranked, PAD_KEY), 0)
    counts = tl.sum((valid & (key < threshold)).to(tl.int64), 0)
    tl.store(out_ptr + rows, counts, mask=row_ok)


def launch(confidence: torch.Tensor, sps_values: torch.Tensor, out: torch.Tensor, block_r: int, block_k: int,
           num_warps: int | None) -> None:
    r, k = confidence.shape
    block = block_r * block_k
    _prefix_schedule_kernel[(1,)](
        confidence, sps_values, out, r, k, confidence.stride(0), confidence.stride(1),
        BLOCK_R=block_r, BLOCK_K=block_k, IDX_BITS=block.bit_length() - 1,
        # 4 keys per thread, at most 16 warps: R*K = 2048 takes 16 (H200: 73 us per decision against 88 with 8)
        num_warps=num_warps or min(16, max(1, block // 128)),
    )
