"""Triton kernel behind :func:`dspark_lightning.kernels.vocab_ce_l1.vocab_ce_l1` (imported on first use only).

One program per token row; the row is streamed in ``BLOCK_V``-wide slices three times:

1. online max / sum-of-exp of the draft and target logits, kept per lane and folded at the end -> both
   log-normalisers (and the label's draft logit, one scalar load);
2. ``p_d``, ``p_t`` from those -> ``l1 = sum |p_d - p_t|`` and ``ps = <p_d, sign(p_d - p_t)>``;
3. (only when gradients are wanted) ``dz = c_ce (p_d - onehot) + c_l1 p_d (sign - ps)``, written in the
   gradient's dtype, optionally chained through the soft cap.

The gradient may alias the draft (and bias) input: each element is read and then written by the same program
in the same slice of pass 3, so overwriting the logits tile in place is safe.

``TRITON_INTERPRET=1`` must be set before this module is imported to run the kernel on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _capped(x, softcap, HAS_SOFTCAP: tl.constexpr):
    """``cap * tanh(x / cap)`` when capping, tanh written with exp (saturates to +-1 without NaN); else ``x``."""
    if HAS_SOFTCAP:
        x = softcap * (2.0 / (1.0 + tl.exp(-2.0 * x / softcap)) - 1.0)
    return x


@triton.jit
def _slice_logits(draft_row, target_row, bias_row, offs, mask, softcap, HAS_BIAS: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr):
    """One slice of the draft logits ``z`` (capped, plus the bias) and the capped target logits ``zt``, fp32, and
    the capped draft logits before the bias (pass 3 chains the gradient through the cap with them)."""
    capped = _capped(tl.load(draft_row + offs, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
    zt = _capped(tl.load(target_row + offs, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
    z = capped
    if HAS_BIAS:
        z += tl.load(bias_row + offs, mask=mask, other=0.0).to(tl.float32)
    return z, zt, capped


@triton.jit
def _vocab_ce_l1_kernel(
    draft_ptr, target_ptr, bias_ptr, grad_draft_ptr, grad_bias_ptr,
    labels_ptr, ce_coef_ptr, l1_coef_ptr, ce_ptr, l1_ptr,
    n_vocab, stride_draft, stride_target, stride_bias, stride_grad_draft, stride_grad_bias,
    softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr, SPLIT_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    draft_row = draft_ptr + row * stride_draft
    target_row = target_ptr + row * stride_target
    bias_row = bias_ptr + row * stride_bias
    cols = tl.arange(0, BLOCK_V)
    label = tl.load(labels_ptr + row).to(tl.int64)

    # ---- pass 1: per-lane running max and rescaled sum of exp for both rows (lanes start at a finite
    # floor so that exp(m_old - m_new) is never exp(-inf + inf)).
    m_d = tl.full([BLOCK_V], -1e30, tl.float32)
    s_d = tl.zeros([BLOCK_V], tl.float32)
    m_t = tl.full([BLOCK_V], -1e30, tl.float32)
    s_t = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, n_vocab, BLOCK_V):
        offs = start + cols
        mask = offs < n_vocab
        z, zt, _ = _slice_logits(draft_row, target_row, bias_row, offs, mask, softcap, HAS_BIAS, HAS_SOFTCAP)
        z = tl.where(mask, z, float("-inf"))
        zt = tl.where(mask, zt, float("-inf"))
        new_d = tl.maximum(m_d, z)
        s_d = s_d * tl.exp(m_d - new_d) + tl.exp(z - new_d)
        m_d = new_d
        new_t = tl.maximum(m_t, zt)
        s_t = s_t * tl.exp(m_t - new_t) + tl.exp(zt - new_t)
        m_t = new_t
    top_d = tl.max(m_d, axis=0)
    lse_d = top_d + tl.log(tl.sum(s_d * tl.exp(m_d - top_d), axis=0))
    top_t = tl.max(m_t, axis=0)
    lse_t = top_t + tl.log(tl.sum(s_t * tl.exp(m_t - top_t), axis=0))

    z_label = _capped(tl.load(draft_row + label).to(tl.float32), softcap, HAS_SOFTCAP)
    if HAS_BIAS:
        z_label += tl.load(bias_row + label).to(tl.float32)

    # ---- pass 2: L1 distance and <p_d, sign(p_d - p_t)> (the latter is needed by every element of dz).
    acc_l1 = tl.zeros([BLOCK_V], tl.float32)
    acc_ps = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, n_vocab, BLOCK_V):
        offs = start + cols
        mask = offs < n_vocab
        z, zt, _ = _slice_logits(draft_row, target_row, bias_row, offs, mask, softcap, HAS_BIAS, HAS_SOFTCAP)
        p = tl.where(mask, tl.exp(z - lse_d), 0.0)
        q = tl.where(mask, tl.exp(zt - lse_t), 0.0)
        diff = p - q
        sgn = tl.where(diff > 0, 1.0, 0.0) - tl.where(diff < 0, 1.0, 0.0)
        acc_l1 += tl.abs(diff)
        acc_ps += p * sgn
    l1 = tl.sum(acc_l1, axis=0)
    ps = tl.sum(acc_ps, axis=0)
    tl.store(ce_ptr + row, lse_d - z_label)
    tl.store(l1_ptr + row, l1)

    # ---- pass 3: gradient of c_ce * ce + c_l1 * l1 w.r.t. the (pre-cap) draft logits and the bias.
    if COMPUTE_GRAD:
        c_ce = tl.load(ce_coef_ptr + row).to(tl.float32)
        c_l1 = tl.load(l1_coef_ptr + row).to(tl.float32)
        grad_draft_row = grad_draft_ptr + row * stride_grad_draft
        grad_bias_row = grad_bias_ptr + row * stride_grad_bias
        for start in range(0, n_vocab, BLOCK_V):
            offs = start + cols
            mask = offs < n_vocab
            z, zt, capped = _slice_logits(draft_row, target_row, bias_row, offs, mask, softcap, HAS_BIAS,
                                          HAS_SOFTCAP)
            p = tl.where(mask, tl.exp(z - lse_d), 0.0)
            q = tl.where(mask, tl.exp(zt - lse_t), 0.0)
            diff = p - q
            sgn = tl.where(diff > 0, 1.0, 0.0) - tl.where(diff < 0, 1.0, 0.0)
            dz = c_l1 * p * (sgn - ps) + c_ce * (p - tl.where(offs == label, 1.0, 0.0))
            if HAS_SOFTCAP:
                th = capped / softcap  # tanh(x / cap)
                g = dz * (1.0 - th * th)
            else:
                g = dz
            tl.store(grad_draft_row + offs, g.to(grad_draft_ptr.dtype.element_ty), mask=mask)
            if SPLIT_GRAD:
                tl.store(grad_bias_row + offs, dz.to(grad_bias_ptr.dtype.element_ty), mask=mask)


def launch(draft: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
           ce_coef: torch.Tensor, l1_coef: torch.Tensor, ce: torch.Tensor, l1: torch.Tensor,
           grad_draft: torch.Tensor | None, grad_bias: torch.Tensor | None, softcap: float | None,
           block_v: int, num_warps: int) -> None:
    """Fill ``ce``, ``l1`` (and ``grad_draft`` / ``grad_bias`` when given) for every row; see the module doc."""
    rows, n_vocab = draft.shape
    if rows == 0:
        return
    compute_grad = grad_draft is not None
    split = compute_grad and grad_bias is not None and grad_bias.data_ptr() != grad_draft.data_ptr()
    bias_arg = bias if bias is not None else draft
    gd = grad_draft if compute_grad else draft
    gb = grad_bias if split else gd
    _vocab_ce_l1_kernel[(rows,)](
        draft, target, bias_arg, gd, gb,
        labels, ce_coef, l1_coef, ce, l1,
        n_vocab, draft.stride(0), target.stride(0), bias_arg.stride(0), gd.stride(0), gb.stride(0),
        float(softcap) if softcap else 1.0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=bool(softcap), COMPUTE_GRAD=compute_grad, SPLIT_GRAD=split,
        BLOCK_V=block_v, num_warps=num_warps,
    )
