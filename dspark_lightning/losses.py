"""Training losses, as pure functions (DeepSpec ``deepspec/modeling/dspark/loss.py::compute_dspark_loss`` semantics).

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
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .drafters.dflash import BlockDraftOutput, DFlash
from .drafters.dspark import DSpark
from .drafters.eagle3 import Eagle3Output

if TYPE_CHECKING:
    from .kernels.fused_block_loss import FusedBlockLossOutput

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
    fused: bool = False,
) -> LossOutput:
    """DSpark / DFlash loss for one batch.

    Args:
        out: the drafter's training output.
        compute_logits: ``drafter.compute_logits(hidden, markov_features=None)`` (frozen lm_head (+ Markov bias)).
        target_last_hidden: [B, L, H] final-norm target states; ``p_t = softmax(lm_head(.))``.
        ce_weight, l1_weight, confidence_weight: term weights (DSpark 0.1 / 0.9 / 1.0; DFlash 1 / 0 / 0).
        decay: position-weight decay constant.
        fused: compute CE + L1 with :func:`~dspark_lightning.kernels.fused_block_loss` (logits, loss and their
            gradient in one chunked pass, Triton on CUDA; no recomputation in backward). ``compute_logits`` must then
            be the bound ``compute_logits`` of a DFlash / DSpark / DSparkV4 drafter with a frozen ``lm_head`` and
            ``target_last_hidden`` must not require grad. Same values and gradients as the default path up to
            rounding; ``terms['ce']`` / ``terms['l1']`` are then metrics without a graph (``loss`` carries it).
    """
    sel = out.supervise.nonzero(as_tuple=True)  # (b, n, k) of supervised predictions
    b_idx, _, k_idx = sel
    hidden = out.hidden[sel]  # [T, H]
    markov = out.markov_features[sel] if out.markov_features is not None else None
    target = target_last_hidden[b_idx, out.target_index[sel]]  # [T, H]
    labels = out.labels[sel]

    if fused:
        w = position_weights(k_idx, decay)
        draft = _fused_ce_l1(compute_logits, hidden, markov, target, labels, w, ce_weight, l1_weight, chunk_size)
        ce, l1 = draft.ce, draft.l1
    else:
        draft_fn = lambda i: compute_logits(hidden[i], None if markov is None else markov[i])
        target_fn = lambda i: compute_logits(target[i].to(hidden.dtype))
        ce, l1 = chunked_ce_l1(draft_fn, target_fn, labels, chunk_size)
        w = position_weights(k_idx, decay)

    # Keep the graph connected when nothing is supervised (e.g. a sample with no trainable pair): the loss is
    # then an exact zero with zero gradients, so backward and DDP's gradient all-reduce still run.
    anchor = out.hidden.sum() * 0.0
    if out.markov_features is not None:
        anchor = anchor + out.markov_features.sum() * 0.0
    if fused:
        terms = {"ce": draft.ce_loss, "l1": draft.l1_loss}
        loss = draft.loss + anchor
    else:
        terms = {"ce": weighted_mean(ce, w) + anchor, "l1": weighted_mean(l1, w)}
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


def _fused_head(compute_logits: Callable[..., Tensor]) -> tuple[Tensor, Tensor | None, float | None]:
    """(lm_head weight, markov_w2 weight or None, soft cap) behind a block drafter's bound ``compute_logits``."""
    owner = getattr(compute_logits, "__self__", None)
    names = ("DFlash", "DSpark", "DSparkV4")  # compute_logits = cap(lm_head(h)) (+ markov_w2(u)), nothing else
    bound = getattr(compute_logits, "__name__", "") == "compute_logits"
    if owner is None or type(owner).__name__ not in names or not bound:
        raise ValueError(f"fused=True needs the bound compute_logits of a {'/'.join(names)} drafter "
                         f"(drafter.compute_logits), got {compute_logits!r}.")
    if owner.lm_head.bias is not None:
        raise ValueError("fused=True needs an lm_head without bias.")
    markov_head = getattr(owner, "markov_head", None)
    w2 = markov_head.markov_w2.weight if markov_head is not None else None
    cap = getattr(owner.config, "final_logit_softcapping", None) if isinstance(owner, (DFlash, DSpark)) else None
    # detach: the head is frozen by design, but under FSDP (use_orig_params) its weight is a view of a flat
    # parameter that requires grad
    return owner.lm_head.weight.detach(), w2, cap


def _fused_ce_l1(compute_logits: Callable[..., Tensor], hidden: Tensor, markov: Tensor | None, target: Tensor,
                 labels: Tensor, w: Tensor, ce_weight: float, l1_weight: float,
                 chunk_size: int) -> FusedBlockLossOutput:
    from .kernels.fused_block_loss import fused_block_loss  # imported on use: it pulls in torch._dynamo

    weight, w2, cap = _fused_head(compute_logits)
    if markov is not None and w2 is None:
        raise ValueError("markov features were given but the drafter has no Markov head.")
    return fused_block_loss(hidden, target, weight, labels, w / (w.sum() + 1e-6),
                            markov=markov, markov_weight=w2 if markov is not None else None,
                            ce_weight=ce_weight, l1_weight=l1_weight, softcap=cap, chunk_size=chunk_size)


# ---------------------------------------------------------------------------------------------- Eagle3
def _soft_ce_accept(draft_logits: Tensor, target_logits: Tensor,
                    hot_ids: Tensor | None) -> tuple[Tensor, Tensor]:
    """Soft CE to the target (restricted to the draft vocabulary and renormalised) and 1 - TV."""
    logp = F.log_softmax(draft_logits.float(), dim=-1)  # [t, Vd]
    with torch.no_grad():
        target_logits = target_logits.float()
        if hot_ids is None and target_logits.shape[-1] != logp.shape[-1]:
            raise ValueError(
                f"Draft logits have {logp.shape[-1]} columns but target logits {target_logits.shape[-1]}: "
                "with a reduced draft vocabulary pass d2t=drafter.d2t to eagle3_ttt_loss."
            )
        p_full = F.softmax(target_logits, dim=-1)  # [t, V]
        if hot_ids is not None:
            p_full = p_full[:, hot_ids]  # target mass on the draft vocabulary, [t, Vd]
            p_t = F.softmax(target_logits[:, hot_ids], dim=-1)  # restricted and renormalised
        else:
            p_t = p_full
    soft_ce = -(p_t * logp).sum(-1)
    # Acceptance sum_v min(p_d, p_t) = 1 - TV is measured against the *full* target distribution: that is
    # what speculative sampling accepts at inference (draft mass outside the target's support is rejected).
    accept = torch.minimum(logp.detach().exp(), p_full).sum(-1)
    return soft_ce, accept


def eagle3_ttt_loss(
    out: Eagle3Output,
    compute_logits: LogitsFn,
    target_last_hidden: Tensor,
    target_logits: LogitsFn,
    *,
    d2t: Tensor | None = None,
    step_decay: float = 0.8,
    chunk_size: int = 1024,
) -> LossOutput:
    """Eagle3 training-time-test loss (DeepSpec ``deepspec/modeling/eagle3/loss.py::compute_eagle3_loss``).

    Per step k, over the supervised positions of that step::

        p_t      = softmax(target_logits(target_last_hidden[b, i+1+k]))   restricted to the draft
                   vocabulary through d2t and renormalised when it is reduced
        ploss_k  = mean_supervised( -sum_v p_t log softmax(compute_logits(hidden[k, b, i])) )
        loss     = soft_ce = sum_k step_decay^k ploss_k

    Normaliser: the supervised-token mean of each step. DeepSpec divides each step's sum by B*T instead
    (padding and prompt positions included), which ties the loss scale to the batch's padding and answer
    density and shrinks late steps that have fewer valid positions; the per-step mean keeps every
    ``ploss_k`` a per-token quantity comparable across batches and steps. A step without supervised
    positions contributes 0.

    Args:
        out: :meth:`Eagle3.forward` output (pre-norm hidden states).
        compute_logits: ``drafter.compute_logits`` (applies the final norm; draft-vocabulary logits).
        target_last_hidden: [B, T, H] final-normed target states.
        target_logits: maps target states [t, H] to target logits [t, V] (``drafter.target_logits`` for the
            full vocabulary; the target's own head when the vocabulary is reduced).
        d2t: ``drafter.d2t`` when the draft vocabulary is reduced (``target_id = d2t[i] + i``), else None.
        step_decay: weight ``step_decay^k`` of step k (DeepSpec 0.8).
        chunk_size: supervised predictions per logits chunk (activation-checkpointed).

    Returns:
        terms ``soft_ce``, ``loss`` and ``ploss_{k}``; ``accept_rate[k]`` = mean (1 - TV) of step k;
        ``expected_tau`` = 1 + sum_k prod_{i<=k} accept_i along each start position's chain, averaged
        over start positions whose step 0 is supervised.
    """
    steps = out.supervise.shape[0]
    sel = out.supervise.nonzero(as_tuple=True)  # (k, b, i)
    k_idx, b_idx, _ = sel
    hidden = out.hidden[sel]  # [N, H]
    target = target_last_hidden[b_idx, out.target_index[sel]]  # [N, H]
    hot_ids = None if d2t is None else d2t + torch.arange(d2t.shape[0], device=d2t.device)

    pieces_ce, pieces_acc = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        idx = torch.arange(start, min(start + chunk_size, hidden.shape[0]), device=hidden.device)

        def piece(idx: Tensor = idx) -> tuple[Tensor, Tensor]:
            draft = compute_logits(hidden[idx])
            return _soft_ce_accept(draft, target_logits(target[idx].to(hidden.dtype)), hot_ids)

        ce, acc = checkpoint(piece, use_reentrant=False) if torch.is_grad_enabled() else piece()
        pieces_ce.append(ce)
        pieces_acc.append(acc)
    soft_ce = torch.cat(pieces_ce) if pieces_ce else hidden.new_zeros(0, dtype=torch.float32)
    accept = torch.cat(pieces_acc) if pieces_acc else hidden.new_zeros(0, dtype=torch.float32)

    counts = torch.bincount(k_idx, minlength=steps).float()
    per_step = torch.zeros(steps, device=soft_ce.device).index_add(0, k_idx, soft_ce) / counts.clamp(min=1)
    weights = step_decay ** torch.arange(steps, device=soft_ce.device, dtype=torch.float32)
    loss = (weights * per_step).sum() + 0.0 * hidden.sum()  # keeps the graph alive with no supervised token
    terms = {f"ploss_{k}": per_step[k].detach() for k in range(steps)}
    terms["soft_ce"] = loss
    terms["loss"] = loss

    accept_rate = torch.zeros(steps, device=accept.device).index_add_(0, k_idx, accept) / counts.clamp(min=1)
    chain = torch.zeros(out.supervise.shape, device=accept.device)
    chain[sel] = accept
    tau = 1.0 + chain.cumprod(0).sum(0)  # [B, T]
    starts = out.supervise[0]
    expected_tau = tau[starts].mean() if starts.any() else tau.new_tensor(math.nan)
    return LossOutput(loss, terms, accept_rate, counts, expected_tau, int(k_idx.shape[0]))
