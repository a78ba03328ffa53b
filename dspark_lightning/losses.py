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

Every mean is returned as its numerator and denominator (:class:`Ratio`): ``LossOutput.objective`` behind the loss,
``LossOutput.ratios`` behind each logged term and metric. The LightningModule sums both over the ranks (and the
micro-batches of an accumulated step) before dividing, so that a step's loss is the mean over the global batch
(``modules/global_loss.py``); no ``torch.distributed`` here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .drafters.blocks import BlockDraftOutput
from .drafters.eagle3 import Eagle3Output
from .drafters.protocol import LogitsHead

if TYPE_CHECKING:
    from .kernels.fused_block_loss import FusedBlockLossOutput

LogitsFn = Callable[[Tensor], Tensor]


@dataclass
class LossWeights:
    """Weights of the loss terms (DeepSpec ``deepspec/modeling/dspark/loss.py``, ``deepspec/modeling/eagle3/loss.py``).

    Args:
        ce: cross-entropy to the data token (DSpark 0.1, DFlash 1.0).
        l1: L1 distance to the target distribution (DSpark 0.9, DFlash 0.0).
        confidence: BCE of the confidence head (DSpark 1.0).
        decay: position-weight constant, ``w_k = exp(-k / decay)`` (block drafters).
        step_decay: Eagle3 per-step weight ``step_decay ** k``.
        chunk_size: tokens per chunk when vocabulary-sized logits are built.
        fused: block drafters use the fused loss (``kernels/fused_block_loss.py``: gradients w.r.t. the logits
            computed in the forward pass, a Triton kernel on CUDA) instead of checkpointed chunks; same values.
    """

    ce: float = 0.1
    l1: float = 0.9
    confidence: float = 1.0
    decay: float = 4.0
    step_decay: float = 0.8
    chunk_size: int = 1024
    fused: bool = False


@dataclass
class Ratio:
    """A mean kept as ``total / normaliser(weight)``, so that numerator and denominator can be summed over ranks and
    micro-batches before dividing. ``total`` and ``weight`` are scalars or share one shape (e.g. ``[K]``: one mean
    per position)."""

    total: Tensor  # sum of the weighted values; the loss objective's keeps the graph
    weight: Tensor  # sum of the weights, no graph
    eps: float = 0.0  # added to the weight: DeepSpec's 1e-6 of its weighted means
    floor: float = 0.0  # lower bound of the weight: 1 for counts, so that a mean over nothing is 0

    def normaliser(self, weight: Tensor | None = None) -> Tensor:
        """The divisor for ``weight`` (default this ratio's own)."""
        return ((self.weight if weight is None else weight) + self.eps).clamp(min=self.floor)

    def value(self) -> Tensor:
        return self.total / self.normaliser()

    def detach(self) -> Ratio:
        return Ratio(self.total.detach(), self.weight.detach(), self.eps, self.floor)

    def plus(self, other: Ratio) -> Ratio:
        """The ratio of the two batches together (``other`` must be a ratio of the same quantity)."""
        return Ratio(self.total + other.total, self.weight + other.weight, self.eps, self.floor)


@dataclass
class LossOutput:
    """Named loss terms (scalars) and per-position metrics of one batch, and the ratios behind them.

    ``loss``, ``terms`` and the metrics are this batch's own means; ``objective`` and ``ratios`` let the caller
    reduce over a larger batch: ``loss = objective.value().sum()``.
    """

    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)  # ce, l1, confidence, ...
    accept_rate: Tensor | None = None  # [K] mean (1 - TV) of supervised predictions per position
    position_counts: Tensor | None = None  # [K] supervised predictions per position
    expected_tau: Tensor | None = None  # scalar: 1 + sum_k prod_{i<=k} (1 - TV_i), mean over blocks
    num_tokens: int = 0
    objective: Ratio | None = None  # the loss's numerator(s) with the graph, term weights folded in, and denominators
    ratios: dict[str, Ratio] = field(default_factory=dict)  # behind the logged terms and metrics, detached


def _output(objective: Ratio, terms: dict[str, Tensor], ratios: dict[str, Ratio], accept: Ratio, tau: Ratio,
            num_tokens: int) -> LossOutput:
    """The LossOutput of one batch: its own means from the ratios (expected tau NaN without a block)."""
    loss = objective.value().sum()
    expected_tau = tau.value() if tau.weight > 0 else tau.total.new_tensor(math.nan)
    ratios = {**ratios, "accept_rate": accept, "expected_tau": tau}
    return LossOutput(loss, {**terms, "loss": loss}, accept.value(), accept.weight, expected_tau, num_tokens,
                      objective, ratios)


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


def chunked(piece: Callable[[Tensor], tuple[Tensor, ...]], count: int, chunk_size: int,
            device: torch.device) -> tuple[Tensor, ...]:
    """``piece(idx)`` over ``idx = 0..count-1``, ``chunk_size`` indices at a time, each chunk under activation
    checkpointing when gradients are on (so only one chunk's [chunk, V] logits live, in forward and in backward);
    each of its per-index outputs concatenated. No chunk (``count == 0``) gives empty fp32 tensors."""
    parts = []
    for start in range(0, count, chunk_size):
        idx = torch.arange(start, min(start + chunk_size, count), device=device)
        parts.append(checkpoint(piece, idx, use_reentrant=False) if torch.is_grad_enabled() else piece(idx))
    if not parts:
        empty = torch.zeros(0, dtype=torch.float32, device=device)
        return empty, empty
    return tuple(torch.cat(values) for values in zip(*parts))


def chunked_ce_l1(draft_logits_fn: LogitsFn, target_logits_fn: LogitsFn | None, labels: Tensor,
                  chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Per-token CE and L1 distance, computing logits for ``chunk_size`` tokens at a time.

    Args:
        draft_logits_fn / target_logits_fn: map an index tensor [t] to logits [t, V].
        labels: [T] target tokens.

    Returns:
        ce [T], l1 [T] in fp32 (l1 is zeros when ``target_logits_fn`` is None).
    """

    def piece(idx: Tensor) -> tuple[Tensor, Tensor]:
        target = target_logits_fn(idx) if target_logits_fn is not None else None
        return _ce_l1(draft_logits_fn(idx), target, labels[idx])

    return chunked(piece, labels.shape[0], chunk_size, labels.device)


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
    head: LogitsHead | None = None,
) -> LossOutput:
    """DSpark / DFlash loss for one batch.

    Args:
        out: the drafter's training output.
        compute_logits: ``drafter.compute_logits(hidden, markov_features=None)`` (frozen lm_head (+ Markov bias)).
        target_last_hidden: [B, L, H] final-norm target states; ``p_t = softmax(lm_head(.))``.
        ce_weight, l1_weight, confidence_weight: term weights (DSpark 0.1 / 0.9 / 1.0; DFlash 1 / 0 / 0).
        decay: position-weight decay constant.
        fused: compute CE + L1 with :func:`~dspark_lightning.kernels.fused_block_loss` (logits, loss and their
            gradient in one chunked pass, Triton on CUDA; no recomputation in backward) from ``head``;
            ``target_last_hidden`` must not require grad. Same values and gradients as the default path up to
            rounding; ``terms['ce']`` / ``terms['l1']`` are then metrics without a graph (``loss`` carries it).
        head: ``drafter.logits_head()``, the tensors ``compute_logits`` applies (needed by ``fused``).
    """
    if fused and head is None:
        raise ValueError("fused=True needs head=drafter.logits_head() (the lm_head weight, Markov factor and soft "
                         "cap the fused kernel applies itself); a bound compute_logits alone does not give them.")
    sel = out.supervise.nonzero(as_tuple=True)  # (b, n, k) of supervised predictions
    b_idx, _, k_idx = sel
    hidden = out.hidden[sel]  # [T, H]
    markov = out.markov_features[sel] if out.markov_features is not None else None
    target = target_last_hidden[b_idx, out.target_index[sel]]  # [T, H]
    labels = out.labels[sel]

    w = position_weights(k_idx, decay)
    if fused:
        draft = _fused_ce_l1(head, hidden, markov, target, labels, w, ce_weight, l1_weight, chunk_size)
        ce, l1 = draft.ce, draft.l1
        sums = {"ce": draft.ce_loss, "l1": draft.l1_loss}  # metrics without a graph; draft.loss carries it
        total = draft.loss
    else:
        draft_fn = lambda i: compute_logits(hidden[i], None if markov is None else markov[i])
        target_fn = lambda i: compute_logits(target[i].to(hidden.dtype))
        ce, l1 = chunked_ce_l1(draft_fn, target_fn, labels, chunk_size)
        sums = {"ce": (w * ce).sum(), "l1": (w * l1).sum()}
        total = ce_weight * sums["ce"] + l1_weight * sums["l1"]
    if out.confidence_logits is not None:
        soft_label = (1.0 - 0.5 * l1).clamp(0.0, 1.0).detach()
        bce = F.binary_cross_entropy_with_logits(out.confidence_logits[sel], soft_label, reduction="none")
        sums["confidence"] = (w * bce).sum()
        total = total + confidence_weight * sums["confidence"]
    # Keep the graph connected when nothing is supervised (e.g. a sample with no trainable pair): the loss is
    # then an exact zero with zero gradients, so backward and DDP's gradient all-reduce still run.
    total = total + out.hidden.sum() * 0.0
    if out.markov_features is not None:
        total = total + out.markov_features.sum() * 0.0
    weight = w.sum().detach()  # every term is a mean over the same weighted predictions (DeepSpec)
    objective = Ratio(total, weight, eps=1e-6)
    ratios = {name: Ratio(value.detach(), weight, eps=1e-6) for name, value in sums.items()}
    terms = {name: value / objective.normaliser() for name, value in sums.items()}

    accept = (1.0 - 0.5 * l1).detach()
    gamma = out.supervise.shape[-1]
    counts = torch.bincount(k_idx, minlength=gamma).float()
    accept_rate = Ratio(torch.zeros(gamma, device=accept.device).index_add_(0, k_idx, accept), counts, floor=1.0)
    per_block = torch.zeros(out.supervise.shape, device=accept.device)
    per_block[sel] = accept
    blocks = out.supervise[..., 0]
    tau = 1.0 + per_block.cumprod(-1).sum(-1)
    return _output(objective, terms, ratios, accept_rate, Ratio(tau[blocks].sum(), blocks.sum().float(), floor=1.0),
                   int(labels.shape[0]))


def _fused_ce_l1(head: LogitsHead, hidden: Tensor, markov: Tensor | None, target: Tensor, labels: Tensor, w: Tensor,
                 ce_weight: float, l1_weight: float, chunk_size: int) -> FusedBlockLossOutput:
    from .kernels.fused_block_loss import fused_block_loss  # imported on use: it pulls in torch._dynamo

    if markov is not None and head.markov_w2 is None:
        raise ValueError("markov features were given but the drafter has no Markov head.")
    return fused_block_loss(hidden, target, head.weight, labels, w,  # weighted sums: the caller normalises
                            markov=markov, markov_weight=head.markov_w2 if markov is not None else None,
                            ce_weight=ce_weight, l1_weight=l1_weight, softcap=head.softcap, chunk_size=chunk_size)


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

    Supervision: prediction ``(k, i)`` targets ``x[i+2+k]`` and is supervised iff ``loss_mask[i+2+k]``
    (``Eagle3.forward``), so step k trains exactly the answer tokens it can reach, among them ``x[s+1]`` (s the
    first answer position), the first token drafted after a prefill. DeepSpec supervises iff ``loss_mask[i+k]``
    with each row's last valid token cleared: it skips the first two answer tokens of every turn and adds one soft
    target past the end of the answer (the token after the end of turn, which decoding never drafts).

    Normaliser: the supervised-token mean of each step (``objective`` keeps the per-step sums and counts, which
    the LightningModule sums over ranks: the mean is over the global batch). DeepSpec divides each step's sum by
    B*T instead (padding and prompt positions included), which ties the loss scale to the batch's padding and
    answer density and shrinks late steps that have fewer valid positions; the per-step mean keeps every
    ``ploss_k`` a per-token quantity comparable across batches and steps. A step without supervised positions
    contributes 0. Both differences make our loss values differ from DeepSpec's on the same batch (docs/drafters.md).

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

    def piece(idx: Tensor) -> tuple[Tensor, Tensor]:
        return _soft_ce_accept(compute_logits(hidden[idx]), target_logits(target[idx].to(hidden.dtype)), hot_ids)

    soft_ce, accept = chunked(piece, hidden.shape[0], chunk_size, hidden.device)

    counts = torch.bincount(k_idx, minlength=steps).float()
    sums = torch.zeros(steps, device=soft_ce.device).index_add(0, k_idx, soft_ce)  # [K] per-step soft-CE sums
    weights = step_decay ** torch.arange(steps, device=soft_ce.device, dtype=torch.float32)
    # + 0 * hidden.sum(): keeps the graph alive with no supervised token
    objective = Ratio(weights * sums + 0.0 * hidden.sum(), counts, floor=1.0)
    ratios = {f"ploss_{k}": Ratio(sums[k].detach(), counts[k], floor=1.0) for k in range(steps)}
    terms = {name: ratio.value() for name, ratio in ratios.items()}
    terms["soft_ce"] = objective.value().sum()

    accept_rate = Ratio(torch.zeros(steps, device=accept.device).index_add_(0, k_idx, accept), counts, floor=1.0)
    chain = torch.zeros(out.supervise.shape, device=accept.device)
    chain[sel] = accept
    tau = 1.0 + chain.cumprod(0).sum(0)  # [B, T]
    starts = out.supervise[0]
    return _output(objective, terms, ratios, accept_rate, Ratio(tau[starts].sum(), starts.sum().float(), floor=1.0),
                   int(k_idx.shape[0]))


# ---------------------------------------------------------------------------------------------- by output type
def _block_loss(drafter: nn.Module, out: BlockDraftOutput, target_last_hidden: Tensor, w: LossWeights,
                target_logits: LogitsFn | None) -> LossOutput:
    return block_drafter_loss(out, drafter.compute_logits, target_last_hidden, ce_weight=w.ce, l1_weight=w.l1,
                              confidence_weight=w.confidence, decay=w.decay, chunk_size=w.chunk_size, fused=w.fused,
                              head=drafter.logits_head() if w.fused else None)


def _eagle3_loss(drafter: nn.Module, out: Eagle3Output, target_last_hidden: Tensor, w: LossWeights,
                 target_logits: LogitsFn | None) -> LossOutput:
    return eagle3_ttt_loss(out, drafter.compute_logits, target_last_hidden, target_logits or drafter.target_logits,
                           d2t=drafter.d2t if drafter.reduced_vocab else None, step_decay=w.step_decay,
                           chunk_size=w.chunk_size)


# The loss of each training output type (a new drafter with a new output type adds its loss here).
LOSSES: dict[type, Callable[..., LossOutput]] = {BlockDraftOutput: _block_loss, Eagle3Output: _eagle3_loss}


def drafter_loss(drafter: nn.Module, out: object, target_last_hidden: Tensor, weights: LossWeights,
                 target_logits: LogitsFn | None = None) -> LossOutput:
    """The training loss of ``drafter``'s ``training_forward`` output ``out``, chosen by the type of ``out``.

    Args:
        drafter: the drafter that produced ``out`` (its ``compute_logits``; block drafters' ``logits_head`` when
            ``weights.fused``).
        target_last_hidden: [B, L, H] final-normed target states.
        weights: the loss-term weights.
        target_logits: the target's own head, ``[t, H] -> [t, V]`` logits, for a drafter whose ``lm_head`` is not
            the target's (``holds_target_head`` False: Eagle3 with a reduced vocabulary); else None.
    """
    loss = LOSSES.get(type(out))
    if loss is None:
        raise ValueError(f"No loss for a training output of type {type(out).__name__}; register one in "
                         f"losses.LOSSES (known: {[t.__name__ for t in LOSSES]}).")
    return loss(drafter, out, target_last_hidden, weights, target_logits)
