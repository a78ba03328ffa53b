"""Training losses, as pure functions (DeepSpec ``compute_dspark_loss`` semantics, reference notes §3).

Block drafters (DSpark, DFlash), per supervised prediction k (0-based) of a block:

    w_k   = exp(-k / decay)
    CE_k  = -log p_d(x*_k)                       p_d includes the Markov bias (teacher forced)
    L1_k  = sum_v |p_d - p_t|                    full L1 = 2 TV
    c*_k  = clamp(1 - L1_k / 2, 0, 1), detached  analytic acceptance probability (paper Eq. 8)
    BCE_k = BCEWithLogits(conf_logit_k, c*_k)
    L     = a_ce wmean(CE) + a_l1 wmean(L1) + a_conf wmean(BCE)

Logits over a 150k vocabulary are built ``chunk_size`` tokens at a time under activation checkpointing,
so at most one [chunk, V] fp32 tensor per term is alive, in forward and in backward.
No ``torch.distributed`` here: the LightningModule reduces across ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .drafters.dflash import BlockDraftOutput

LogitsFn = Callable[[Tensor], Tensor]


@dataclass
class LossOutput:
    """Named loss terms (scalars) and per-position metrics."""

    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)  # ce, l1, confidence, ...
    accept_rate: Tensor | None = None  # [K] mean (1 - TV) of supervised predictions per position
    position_counts: Tensor | None = None  # [K] supervised predictions per position
    expected_tau: Tensor | None = None  # scalar: 1 + sum_k prod_{i<=k} (1 - TV_i), mean over blocks
    num_tokens: int = 0


def weighted_mean(values: Tensor, weights: Tensor) -> Tensor:
    """``sum(w x) / (sum(w) + 1e-6)`` (DeepSpec's normaliser)."""
    return (values * weights).sum() / (weights.sum() + 1e-6)


def position_weights(k: Tensor, decay: float) -> Tensor:
    """``exp(-k / decay)`` for 0-based positions ``k`` (DeepSpec ``loss_decay_gamma``; 4.0 for block 7)."""
    return torch.exp(-k.float() / decay)


def _ce_l1(draft_logits: Tensor, target_logits: Tensor | None, labels: Tensor) -> tuple[Tensor, Tensor]:
    logp = F.log_softmax(draft_logits.float(), dim=-1)
    ce = -logp.gather(-1, labels[:, None]).squeeze(-1)
    if target_logits is None:
        return ce, torch.zeros_like(ce)
    l1 = (logp.exp() - F.softmax(target_logits.float(), dim=-1)).abs().sum(-1)
    return ce, l1


def chunked_ce_l1(draft_logits_fn: LogitsFn, target_logits_fn: LogitsFn | None, labels: Tensor,
                  chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Per-token CE and L1 distance, computing logits for ``chunk_size`` tokens at a time.

    Args:
        draft_logits_fn / target_logits_fn: map an index tensor [t] to logits [t, V].
        labels: [T] target tokens.

    Returns:
        ce [T], l1 [T] in fp32 (l1 is zeros when ``target_logits_fn`` is None).
    """
    ces, l1s = [], []
    for start in range(0, labels.shape[0], chunk_size):
        idx = torch.arange(start, min(start + chunk_size, labels.shape[0]), device=labels.device)

        def piece(idx: Tensor = idx) -> tuple[Tensor, Tensor]:
            target = target_logits_fn(idx) if target_logits_fn is not None else None
            return _ce_l1(draft_logits_fn(idx), target, labels[idx])

        if torch.is_grad_enabled():
            ce, l1 = checkpoint(piece, use_reentrant=False)
        else:
            ce, l1 = piece()
        ces.append(ce)
        l1s.append(l1)
    if not ces:
        empty = labels.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(ces), torch.cat(l1s)


def block_drafter_loss(
    out: BlockDraftOutput,
    compute_logits: Callable[..., Tensor],
    target_last_hidden: Tensor,
    *,
    ce_weight: float = 0.1,
    l1_weight: float = 0.9,
    confidence_weight: float = 1.0,
    decay: float = 4.0,
    chunk_size: int = 1024,
) -> LossOutput:
    """DSpark / DFlash loss for one batch.

    Args:
        out: the drafter's training output.
        compute_logits: ``drafter.compute_logits(hidden, markov_features=None)`` (frozen lm_head (+ Markov bias)).
        target_last_hidden: [B, L, H] final-norm target states; ``p_t = softmax(lm_head(.))``.
        ce_weight, l1_weight, confidence_weight: term weights (DSpark 0.1 / 0.9 / 1.0; DFlash 1 / 0 / 0).
        decay: position-weight decay constant.
    """
    sel = out.supervise.nonzero(as_tuple=True)  # (b, n, k) of supervised predictions
    b_idx, _, k_idx = sel
    hidden = out.hidden[sel]  # [T, H]
    markov = out.markov_features[sel] if out.markov_features is not None else None
    target = target_last_hidden[b_idx, out.target_index[sel]]  # [T, H]
    labels = out.labels[sel]

    draft_fn = lambda i: compute_logits(hidden[i], None if markov is None else markov[i])  # noqa: E731
    target_fn = lambda i: compute_logits(target[i].to(hidden.dtype))  # noqa: E731
    ce, l1 = chunked_ce_l1(draft_fn, target_fn, labels, chunk_size)
    w = position_weights(k_idx, decay)

    terms = {"ce": weighted_mean(ce, w), "l1": weighted_mean(l1, w)}
    loss = ce_weight * terms["ce"] + l1_weight * terms["l1"]
    if out.confidence_logits is not None:
        soft_label = (1.0 - 0.5 * l1).clamp(0.0, 1.0).detach()
        bce = F.binary_cross_entropy_with_logits(out.confidence_logits[sel], soft_label, reduction="none")
        terms["confidence"] = weighted_mean(bce, w)
        loss = loss + confidence_weight * terms["confidence"]
    terms["loss"] = loss

    accept = (1.0 - 0.5 * l1).detach()
    gamma = out.supervise.shape[-1]
    counts = torch.bincount(k_idx, minlength=gamma).float()
    accept_rate = torch.zeros(gamma, device=accept.device).index_add_(0, k_idx, accept) / counts.clamp(min=1)
    per_block = torch.zeros(out.supervise.shape, device=accept.device)
    per_block[sel] = accept
    blocks = out.supervise[..., 0]
    tau = 1.0 + per_block.cumprod(-1).sum(-1)
    expected_tau = tau[blocks].mean() if blocks.any() else tau.new_tensor(math.nan)
    return LossOutput(loss, terms, accept_rate, counts, expected_tau, int(labels.shape[0]))
