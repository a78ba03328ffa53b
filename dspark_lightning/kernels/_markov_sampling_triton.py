"""Triton kernels behind :func:`dspark_lightning.kernels.markov_sampling.markov_sample` (imported on first use only).

Design. The K steps of a row are sequential (step k needs the token drawn at step k - 1), but the work of one step,
``z = U[k] + w2 @ w1[prev]`` over V rows of ``w2`` followed by an argmax over V, is a vocabulary-wide stream that
one program cannot carry: with one program per batch row, at B = 1 a single SM would read all of ``w2`` (78 MB in
bf16 at V = 151,936, r = 256) once per step. So the vocabulary is split across programs, and the sequential
dependence goes through global memory between launches:

* Python loops over the K steps; step k is one launch of :func:`_markov_step_kernel` on the grid
  ``(B, cdiv(V, BLOCK_V))``: program ``(b, t)`` owns rows ``[t * BLOCK_V, (t + 1) * BLOCK_V)`` of the vocabulary
  for batch row b. The batch index is the fastest-varying program id, so the B programs that stream the same
  ``w2`` tile run next to each other and share it through L2.
* Each program first finds the previous token of its row: ``prev0[b]`` at k = 0; for k > 0 it reduces the
  per-tile partials of step k - 1 (``[B, n_tiles]`` best scores and their indices) itself. Every program of the
  row repeats this tiny reduction (9.5 KB read from L2 at V = 151,936 and BLOCK_V = 128, against the 64 KB bf16
  ``w2`` tile the program streams), which is cheaper than a separate launch per step; tile 0 also writes
  ``tokens[b, k - 1]``.
* It gathers ``u = w1[prev]`` (r values) and computes its slice ``z = U[b, k, tile] + w2[tile] @ u`` in fp32,
  looping over r in ``BLOCK_R`` chunks (a broadcast multiply and a row sum: a gemv, so ``tl.dot`` buys nothing and
  the register tile stays at ``BLOCK_V x BLOCK_R``), and stores ``z`` to ``logits[b, k, tile]``.
* It reduces its tile to one partial: the best score ``z / T + g`` (``z`` at T = 0) and its lowest index among
  equal maxima, written to the partial buffer of step k. The buffers alternate with the parity of k (step k reads
  ``k - 1``'s buffer while writing the other one; launches on one stream are ordered, so that is race-free).
* After the loop :func:`_markov_last_token_kernel` (grid ``(B,)``) reduces the partials of step K - 1 into
  ``tokens[:, K - 1]``: K + 1 launches in all.

Ties go to the lowest index, as :func:`torch.argmax`: within a tile the index is the minimum over the positions that
reach the tile maximum; across tiles the reduction keeps, per lane, a value only when it is strictly larger (lanes
visit tiles in increasing order), then takes the minimum index over the lanes that reach the row maximum, and tile
indices increase with the tile number.

Limits (not measured here). One row per program means each ``w2`` tile is read from L2 once per batch row: at
B = 32 that is 32 x 78 MB of L2 reads and 1.2 G fp32 multiply-adds per step at V = 151,936, r = 256, so large
batches would gain from several rows per program (a ``[rows, r] x [r, BLOCK_V]`` product, ``tl.dot`` then pays).
The K + 1 launches are host-side Python; a CUDA graph around the call would remove their overhead.

``TRITON_INTERPRET=1`` must be set before this module is imported to run the kernels on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _argmax_of_partials(score_ptr, idx_ptr, n_tiles, n_vocab, BLOCK_T: tl.constexpr):
    """Index of the best of ``n_tiles`` partials (score, index), lowest index on ties; an int32 scalar."""
    lanes = tl.arange(0, BLOCK_T)
    mask = lanes < n_tiles
    # the first chunk is taken as is, so that a row whose scores are all -inf still yields tile 0's index (0)
    best = tl.load(score_ptr + lanes, mask=mask, other=float("-inf"))
    best_idx = tl.load(idx_ptr + lanes, mask=mask, other=n_vocab)
    for start in range(BLOCK_T, n_tiles, BLOCK_T):
        offs = start + lanes
        m = offs < n_tiles
        score = tl.load(score_ptr + offs, mask=m, other=float("-inf"))
        idx = tl.load(idx_ptr + offs, mask=m, other=n_vocab)
        take = score > best  # strictly: a lane keeps its earlier (lower-index) tile on ties
        best = tl.where(take, score, best)
        best_idx = tl.where(take, idx, best_idx)
    top = tl.max(best, axis=0)
    return tl.min(tl.where(best == top, best_idx, n_vocab), axis=0)


@triton.jit(do_not_specialize=["step"])
def _markov_step_kernel(
    base_ptr, noise_ptr, prev0_ptr, w1_ptr, w2_ptr, tokens_ptr, logits_ptr,
    prev_score_ptr, prev_idx_ptr, part_score_ptr, part_idx_ptr,
    step, n_steps, n_vocab, rank, n_tiles,
    stride_base_b, stride_base_k, stride_noise_b, stride_noise_k,
    temperature,
    FIRST: tl.constexpr, SAMPLE: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)

    # (a) the previous token of this row
    if FIRST:
        prev = tl.load(prev0_ptr + row).to(tl.int64)
    else:
        prev = _argmax_of_partials(prev_score_ptr + row * n_tiles, prev_idx_ptr + row * n_tiles, n_tiles, n_vocab,
                                   BLOCK_T).to(tl.int64)
        tl.store(tokens_ptr + row * n_steps + (step - 1), prev, mask=tile == 0)

    # (b) this tile's slice of z = U[k] + w2 @ w1[prev], in fp32
    offs = tile * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < n_vocab
    w2_rows = w2_ptr + offs.to(tl.int64)[:, None] * rank
    w1_row = w1_ptr + prev * rank
    bias = tl.zeros([BLOCK_V], tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        u = tl.load(w1_row + offs_r, mask=mask_r, other=0.0).to(tl.float32)
        w = tl.load(w2_rows + offs_r[None, :], mask=mask[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
        bias += tl.sum(w * u[None, :], axis=1)
    base_row = base_ptr + row * stride_base_b + step * stride_base_k
    z = tl.load(base_row + offs, mask=mask, other=0.0).to(tl.float32) + bias
    tl.store(logits_ptr + (row * n_steps + step) * n_vocab + offs, z, mask=mask)

    # (c) the tile's best score and its lowest index
    if SAMPLE:  # IEEE division, as torch's z / T (the default fp32 divide may be approximate)
        noise_row = noise_ptr + row * stride_noise_b + step * stride_noise_k
        g = tl.load(noise_row + offs, mask=mask, other=0.0).to(tl.float32)
        score = tl.math.div_rn(z, temperature) + g
    else:
        score = z
    score = tl.where(mask, score, float("-inf"))
    top = tl.max(score, axis=0)
    idx = tl.min(tl.where(score == top, offs, n_vocab), axis=0)  # masked lanes are >= n_vocab: never below a valid one
    tl.store(part_score_ptr + row * n_tiles + tile, top)
    tl.store(part_idx_ptr + row * n_tiles + tile, idx)


@triton.jit
def _markov_last_token_kernel(score_ptr, idx_ptr, tokens_ptr, n_steps, n_vocab, n_tiles, BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    prev = _argmax_of_partials(score_ptr + row * n_tiles, idx_ptr + row * n_tiles, n_tiles, n_vocab, BLOCK_T)
    tl.store(tokens_ptr + row * n_steps + (n_steps - 1), prev.to(tl.int64))


DEFAULT_BLOCK_V = 128  # ~1,200 tiles at V = 151,936: enough programs to fill the GPU at B = 1, partials stay small
MAX_BLOCK_T = 1024  # partials reduced per chunk


def launch(base: torch.Tensor, prev0: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, temperature: float,
           noise: torch.Tensor | None, tokens: torch.Tensor, logits: torch.Tensor, block_v: int | None,
           num_warps: int) -> None:
    """Fill ``tokens`` [B, K] and ``logits`` [B, K, V] (both contiguous); see the module doc.

    ``base`` and ``noise`` need unit stride over V, ``prev0`` is int64, ``w1`` and ``w2`` are contiguous.
    """
    rows, n_steps, n_vocab = base.shape
    if rows == 0 or n_steps == 0:
        return
    rank = w2.shape[1]
    block_v = DEFAULT_BLOCK_V if block_v is None else block_v
    if block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}.")
    block_r = min(triton.next_power_of_2(rank), max(1, 8192 // block_v))  # w2 register tile <= 8k fp32 values
    n_tiles = triton.cdiv(n_vocab, block_v)
    block_t = min(triton.next_power_of_2(n_tiles), MAX_BLOCK_T)
    # per-tile partials (best score, its index), double-buffered by the parity of the step
    part_score = torch.empty(2, rows, n_tiles, device=base.device, dtype=torch.float32)
    part_idx = torch.empty(2, rows, n_tiles, device=base.device, dtype=torch.int32)
    sample = noise is not None
    noise_arg = noise if sample else base
    for k in range(n_steps):
        cur, prv = k % 2, (k + 1) % 2
        _markov_step_kernel[(rows, n_tiles)](
            base, noise_arg, prev0, w1, w2, tokens, logits,
            part_score[prv], part_idx[prv], part_score[cur], part_idx[cur],
            k, n_steps, n_vocab, rank, n_tiles,
            base.stride(0), base.stride(1), noise_arg.stride(0), noise_arg.stride(1),
            float(temperature) if sample else 1.0,
            FIRST=k == 0, SAMPLE=sample, BLOCK_V=block_v, BLOCK_R=block_r, BLOCK_T=block_t, num_warps=num_warps,
        )
    last = (n_steps - 1) % 2
    _markov_last_token_kernel[(rows,)](part_score[last], part_idx[last], tokens, n_steps, n_vocab, n_tiles,
                                       BLOCK_T=block_t, num_warps=num_warps)
