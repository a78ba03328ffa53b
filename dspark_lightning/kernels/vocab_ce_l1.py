"""Vocabulary-wide elementwise work of one token chunk: CE, L1 and their gradient w.r.t. the draft logits.

For each row (token) ``i`` with draft logits ``z`` and target logits ``z_t`` (both [V])::

    z      = cap * tanh(draft / cap) + bias          (cap optional; bias = the DSpark Markov term, optional)
    z_t    = cap * tanh(target / cap)
    p, q   = softmax(z), softmax(z_t)                 (fp32 math whatever the input dtype)
    ce_i   = logsumexp(z) - z[label_i]                = -log p[label_i]
    l1_i   = sum_v |p_v - q_v|
    grad   = d(c_ce_i * ce_i + c_l1_i * l1_i) / dz
           = c_ce_i (p - onehot(label_i)) + c_l1_i p (s - <p, s>),   s = sign(p - q)  (sign(0) = 0, as torch.abs)

and the gradient is chained to the inputs: ``grad_bias = grad`` and ``grad_draft = grad * (1 - tanh^2)`` (just
``grad`` without a cap). The coefficients ``c_ce``, ``c_l1`` are the final loss weights of each token, known
before the pass, so the gradient can be produced in the same pass as the loss (nothing is kept for backward).

Two implementations with one signature: :func:`vocab_ce_l1_reference` (plain torch; the CPU path and the parity
oracle) and a Triton kernel (``_vocab_ce_l1_triton``; CUDA, or CPU tensors under ``TRITON_INTERPRET=1``).
:func:`vocab_ce_l1` dispatches: Triton on CUDA when Triton is installed, torch elsewhere; ``backend=`` or the
environment variable ``DSPARK_KERNEL_BACKEND`` (``auto`` / ``torch`` / ``triton``) forces one.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

BACKEND_ENV = "DSPARK_KERNEL_BACKEND"
BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """``torch`` or ``triton`` for tensors on ``device``; ``backend`` (else ``$DSPARK_KERNEL_BACKEND``) forces one."""
    choice = (backend or os.environ.get(BACKEND_ENV) or "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"Unknown kernel backend {choice!r}; expected one of {BACKENDS}.")
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if choice == "triton" and not triton_available():
        raise RuntimeError("backend 'triton' was requested but triton is not installed (pip install triton).")
    return choice


def _check(draft: Tensor, target: Tensor, bias: Tensor | None, labels: Tensor, ce_coef: Tensor,
           l1_coef: Tensor) -> None:
    if draft.dim() != 2 or target.shape != draft.shape or (bias is not None and bias.shape != draft.shape):
        raise ValueError(f"draft/target/bias must share one [t, V] shape, got {tuple(draft.shape)}, "
                         f"{tuple(target.shape)}, {None if bias is None else tuple(bias.shape)}.")
    t = draft.shape[0]
    if labels.shape != (t,) or ce_coef.shape != (t,) or l1_coef.shape != (t,):
        raise ValueError(f"labels, ce_coef and l1_coef must be [{t}].")


def _cap(x: Tensor, softcap: float | None) -> Tensor:
    return x if not softcap else torch.tanh(x / softcap) * softcap


def vocab_ce_l1_reference(draft: Tensor, target: Tensor, labels: Tensor, ce_coef: Tensor, l1_coef: Tensor, *,
                          bias: Tensor | None = None, softcap: float | None = None, compute_grad: bool = True,
                          inplace: bool = False) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Plain-torch version of :func:`vocab_ce_l1` (same arguments and results; materialises fp32 [t, V] temporaries)."""
    _check(draft, target, bias, labels, ce_coef, l1_coef)
    math_dtype = torch.promote_types(draft.dtype, torch.float32)
    x = draft.to(math_dtype)
    th = torch.tanh(x / softcap) if softcap else None
    z = th * softcap if softcap else x
    if bias is not None:
        z = z + bias.to(math_dtype)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    ce = (lse.squeeze(-1) - z.gather(-1, labels[:, None].long()).squeeze(-1)).float()
    p = torch.exp(z - lse)
    diff = torch.softmax(_cap(target.to(math_dtype), softcap), dim=-1).neg_().add_(p)  # p - q
    l1 = torch.linalg.vector_norm(diff, ord=1, dim=-1).float()
    if not compute_grad:
        return ce, l1, None, None
    sgn = diff.sign_()
    ps = torch.linalg.vecdot(p, sgn)[:, None]  # <p, s>
    c_ce = ce_coef.to(math_dtype)[:, None]
    dz = sgn.sub_(ps).mul_(p).mul_(l1_coef.to(math_dtype)[:, None]).addcmul_(p, c_ce)  # c_l1 p (s - ps) + c_ce p
    dz.scatter_add_(-1, labels[:, None].long(), -c_ce)  # - c_ce onehot
    g_draft = dz * (1.0 - th * th) if softcap else dz
    if inplace:
        grad_draft = draft.copy_(g_draft)
    else:
        grad_draft = g_draft.to(draft.dtype)
    if bias is None:
        return ce, l1, grad_draft, None
    if not softcap:
        return ce, l1, grad_draft, grad_draft
    grad_bias = bias.copy_(dz) if inplace else dz.to(bias.dtype)
    return ce, l1, grad_draft, grad_bias


def vocab_ce_l1(draft: Tensor, target: Tensor, labels: Tensor, ce_coef: Tensor, l1_coef: Tensor, *,
                bias: Tensor | None = None, softcap: float | None = None, compute_grad: bool = True,
                inplace: bool = False, backend: str | None = None, block_v: int = 2048,
                num_warps: int = 8) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """CE, L1 and the draft-logit gradient of one chunk (formulas in the module docstring).

    Args:
        draft: [t, V] draft logits before the soft cap (``h W^T``), any float dtype.
        target: [t, V] target logits before the soft cap (``h_t W^T``).
        labels: [t] int token ids.
        ce_coef, l1_coef: [t] loss weight of each token's CE / L1 (the gradient is that of their weighted sum).
        bias: optional [t, V] term added after the cap (``u W2^T``).
        softcap: optional Gemma-style final logit cap.
        compute_grad: False skips the gradient pass.
        inplace: write the gradients over ``draft`` (and ``bias``) instead of new tensors.
        backend: ``auto`` / ``torch`` / ``triton`` (None reads ``$DSPARK_KERNEL_BACKEND``, default ``auto``).
        block_v, num_warps: Triton tile width and warps per program.

    Returns:
        ``ce`` [t] fp32, ``l1`` [t] fp32, ``grad_draft`` [t, V] (draft's dtype) and ``grad_bias`` [t, V] (None without
        a bias; the very same tensor as ``grad_draft`` without a cap). Both grads are None if not ``compute_grad``.
    """
    if resolve_backend(backend, draft.device) == "torch":
        return vocab_ce_l1_reference(draft, target, labels, ce_coef, l1_coef, bias=bias, softcap=softcap,
                                     compute_grad=compute_grad, inplace=inplace)
    _check(draft, target, bias, labels, ce_coef, l1_coef)
    for name, x in (("draft", draft), ("target", target), ("bias", bias)):
        if x is not None and x.shape[1] > 1 and x.stride(1) != 1:
            raise ValueError(f"{name} must be contiguous along the vocabulary (stride(1) == 1).")
    from . import _vocab_ce_l1_triton as tri  # imports triton: only on first use

    t = draft.shape[0]
    ce = torch.empty(t, device=draft.device, dtype=torch.float32)
    l1 = torch.empty_like(ce)
    grad_draft = grad_bias = None
    if compute_grad:
        grad_draft = draft if inplace else torch.empty_like(draft, memory_format=torch.contiguous_format)
        if bias is not None:
            if softcap:
                grad_bias = bias if inplace else torch.empty_like(bias, memory_format=torch.contiguous_format)
            else:
                grad_bias = grad_draft
    tri.launch(draft, target, bias, labels.contiguous(), ce_coef.float().contiguous(), l1_coef.float().contiguous(),
               ce, l1, grad_draft, grad_bias, softcap, block_v, num_warps)
    return ce, l1, grad_draft, grad_bias
