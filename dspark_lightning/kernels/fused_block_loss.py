"""Fused block-drafter CE + L1 loss: logits, loss and their gradient in one chunked pass, no recomputation.

The unfused loss (``losses.chunked_ce_l1``) builds draft and target logits chunk by chunk under activation
checkpointing, so backward rebuilds both vocabulary-wide matmuls and autograd walks several fp32 [chunk, V]
tensors. Here the loss weights are known before the pass, so for every chunk of ``c`` tokens the forward

1. builds ``[h; h_t] W^T`` with one matmul (draft rows, then target rows) and adds the Markov term ``u W2^T``
   (into the draft rows in place without a soft cap, as a separate tile with one);
2. runs :func:`~.vocab_ce_l1.vocab_ce_l1` on the two tiles: per-token ``ce``, ``l1`` and ``dz = dLoss/dz``,
   written over the draft tile;
3. turns ``dz`` into ``grad_h = dz W``, ``grad_u = dz W2`` and ``grad_W2 += dz^T u`` right away.

No [c, V] tensor outlives its chunk. The frozen ``W`` gets no gradient, the target states none either. Backward
only multiplies the stored gradients by the incoming scalar gradient.

Loss::

    loss = sum_i weights_i (ce_weight * ce_i + l1_weight * l1_i)

With ``weights = w / (sum w + 1e-6)`` this equals ``ce_weight * wmean(ce) + l1_weight * wmean(l1)``.

Only ``loss`` is differentiable. The per-token ``ce`` and ``l1`` and the metric scalars ``ce_loss`` / ``l1_loss`` are
returned with ``requires_grad=False`` (they are marked non-differentiable: a confidence soft label or an
acceptance metric built from them is detached, exactly as in the unfused loss, which detaches both). Code that
needs gradients through the per-token values must use the unfused loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .vocab_ce_l1 import vocab_ce_l1


@dataclass
class FusedBlockLossOutput:
    loss: Tensor  # scalar fp32, differentiable: ce_weight * ce_loss + l1_weight * l1_loss
    ce_loss: Tensor  # scalar fp32, sum_i weights_i ce_i (no grad)
    l1_loss: Tensor  # scalar fp32, sum_i weights_i l1_i (no grad)
    ce: Tensor  # [T] fp32 per-token -log p_d(label) (no grad)
    l1: Tensor  # [T] fp32 per-token sum_v |p_d - p_t| (no grad)


def _run(hidden: Tensor, markov: Tensor | None, target_hidden: Tensor, weight: Tensor, markov_weight: Tensor | None,
         labels: Tensor, weights: Tensor, ce_weight: float, l1_weight: float, softcap: float | None, chunk_size: int,
         backend: str | None, need: tuple[bool, bool, bool], dtype: torch.dtype) -> tuple[Tensor, ...]:
    """The chunk loop. ``need`` = (grad_h, grad_u, grad_W2) wanted; returns ce, l1 and those grads (or None).

    Matmuls run in ``dtype`` (the autocast dtype under autocast, else the weight's), with autocast off; the
    gradients come back in their inputs' dtypes.
    """
    with torch.autocast(hidden.device.type, enabled=False):
        return _chunks(hidden, markov, target_hidden, weight, markov_weight, labels, weights, ce_weight, l1_weight,
                       softcap, chunk_size, backend, need, dtype)


def _chunks(hidden, markov, target_hidden, weight, markov_weight, labels, weights, ce_weight, l1_weight, softcap,
            chunk_size, backend, need, dtype):
    t = hidden.shape[0]
    need_h, need_u, need_w2 = need
    has_markov = markov is not None
    compute_grad = need_h or (has_markov and (need_u or need_w2))
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_u = torch.empty_like(markov) if has_markov and need_u else None
    grad_w2 = torch.zeros_like(markov_weight) if has_markov and need_w2 else None
    ce = torch.empty(t, device=hidden.device, dtype=torch.float32)
    l1 = torch.empty_like(ce)
    weights = weights.float()
    ce_coef, l1_coef = weights * ce_weight, weights * l1_weight
    weight = weight.to(dtype)  # one cast per call (a no-op without autocast)
    markov_weight = markov_weight.to(dtype) if has_markov else None
    w_t = weight.t()
    for start in range(0, t, chunk_size):
        stop = min(start + chunk_size, t)
        c = stop - start
        h = hidden[start:stop].to(dtype)
        logits = torch.cat([h, target_hidden[start:stop].to(dtype)]) @ w_t  # [2c, V]: draft rows, target rows
        draft, target = logits[:c], logits[c:]
        u = markov[start:stop].to(dtype) if has_markov else None
        bias = None
        if has_markov:
            if softcap:
                bias = u @ markov_weight.t()
            else:
                draft.addmm_(u, markov_weight.t())
        ce_c, l1_c, g_draft, g_bias = vocab_ce_l1(
            draft, target, labels[start:stop], ce_coef[start:stop], l1_coef[start:stop], bias=bias, softcap=softcap,
            compute_grad=compute_grad, inplace=True, backend=backend)
        ce[start:stop] = ce_c
        l1[start:stop] = l1_c
        if not compute_grad:
            continue
        if grad_h is not None:
            grad_h[start:stop] = g_draft @ weight
        if has_markov:
            g_z = g_bias if g_bias is not None else g_draft  # dLoss / d(u W2^T)
            if grad_u is not None:
                grad_u[start:stop] = g_z @ markov_weight
            if grad_w2 is not None and grad_w2.dtype == dtype:
                grad_w2.addmm_(g_z.t(), u)
            elif grad_w2 is not None:  # e.g. fp32 master weight under bf16 autocast: accumulate in fp32
                grad_w2 += g_z.t() @ u
        del logits, draft, target, bias, g_draft, g_bias
    return ce, l1, grad_h, grad_u, grad_w2


def _sums(ce: Tensor, l1: Tensor, weights: Tensor, ce_weight: float, l1_weight: float) -> tuple[Tensor, Tensor, Tensor]:
    weights = weights.float()
    ce_loss, l1_loss = (weights * ce).sum(), (weights * l1).sum()
    return ce_weight * ce_loss + l1_weight * l1_loss, ce_loss, l1_loss


class _FusedBlockLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, markov, target_hidden, weight, markov_weight, labels, weights, ce_weight, l1_weight,
                softcap, chunk_size, backend, need, dtype):
        ce, l1, grad_h, grad_u, grad_w2 = _run(hidden, markov, target_hidden, weight, markov_weight, labels, weights,
                                               ce_weight, l1_weight, softcap, chunk_size, backend, need, dtype)
        loss, ce_loss, l1_loss = _sums(ce, l1, weights, ce_weight, l1_weight)
        ctx.save_for_backward(grad_h, grad_u, grad_w2)
        ctx.mark_non_differentiable(ce_loss, l1_loss, ce, l1)
        return loss, ce_loss, l1_loss, ce, l1

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        # The other outputs are non-differentiable: autograd hands zeros (or None) for them and nothing flows back.
        grad_h, grad_u, grad_w2 = ctx.saved_tensors
        scale = lambda g: None if g is None else g * grad_loss  # keeps g's dtype: grad_loss is 0-dim
        return scale(grad_h), scale(grad_u), None, None, scale(grad_w2), *([None] * 9)


@torch.compiler.disable
def fused_block_loss(hidden: Tensor, target_hidden: Tensor, weight: Tensor, labels: Tensor, weights: Tensor, *,
                     markov: Tensor | None = None, markov_weight: Tensor | None = None, ce_weight: float = 1.0,
                     l1_weight: float = 0.0, softcap: float | None = None, chunk_size: int = 1024,
                     backend: str | None = None) -> FusedBlockLossOutput:
    """Weighted CE + L1 between ``softmax(cap(h W^T) + u W2^T)`` and ``softmax(cap(h_t W^T))`` (module docstring).

    Args:
        hidden: [T, H] draft states (differentiable).
        target_hidden: [T, H] target last hidden states (no gradient).
        weight: [V, H] frozen ``lm_head`` weight (must not require grad).
        labels: [T] tokens to predict.
        weights: [T] per-token weights (``losses.block_drafter_loss`` passes the raw position weights and divides the
            sums by the global ``sum w + 1e-6`` itself; ``w / (sum w + 1e-6)`` gives the batch's weighted mean).
        markov, markov_weight: optional [T, r] Markov features and the trainable [V, r] ``markov_w2`` weight.
        ce_weight, l1_weight: term weights folded into the gradient.
        softcap: optional final-logit cap applied to ``h W^T`` (and ``h_t W^T``), before the Markov term is added.
        chunk_size: tokens per chunk (peak extra memory ~ 2-3 x chunk x V in the logits dtype).

    Under autocast (``bf16-mixed``) the matmuls and logits use the autocast dtype, as ``nn.Linear`` would there;
    otherwise ``weight``'s dtype. Gradients come back in the dtypes of their inputs.
        backend: elementwise backend (see :func:`~.vocab_ce_l1.resolve_backend`).
    """
    if (markov is None) != (markov_weight is None):
        raise ValueError("markov and markov_weight go together.")
    if weight.requires_grad:
        raise ValueError("fused_block_loss assumes a frozen lm_head (weight.requires_grad is True).")
    if target_hidden.requires_grad:
        raise ValueError("fused_block_loss gives the target states no gradient; pass them detached.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    labels = labels.long()
    device_type = hidden.device.type
    # Under autocast (bf16-mixed training) the matmuls run in the autocast dtype, as nn.Linear would.
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    grad_on = torch.is_grad_enabled()
    need = (grad_on and hidden.requires_grad,
            grad_on and markov is not None and markov.requires_grad,
            grad_on and markov_weight is not None and markov_weight.requires_grad)
    if not any(need):  # evaluation: no gradient pass, no graph
        with torch.no_grad():
            ce, l1, *_ = _run(hidden, markov, target_hidden, weight, markov_weight, labels, weights, ce_weight,
                              l1_weight, softcap, chunk_size, backend, need, dtype)
            return FusedBlockLossOutput(*_sums(ce, l1, weights, ce_weight, l1_weight), ce, l1)
    out = _FusedBlockLoss.apply(hidden, markov, target_hidden, weight, markov_weight, labels, weights, float(ce_weight),
                                float(l1_weight), softcap, int(chunk_size), backend, need, dtype)
    return FusedBlockLossOutput(*out)
