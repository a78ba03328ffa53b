"""Losses and metrics over the global batch: the same gradient on 1 rank or N, with or without accumulation.

A loss (``losses.py``) is a :class:`~dspark_lightning.losses.Ratio`: numerators over denominators (the weighted
count of supervised predictions; Eagle3 one per step). A rank's own mean would let a rank with few supervised
tokens weigh as much as one with many, so the denominators are summed over the ranks first (one all-reduce per
step, with the logged ratios) and each rank backpropagates ``world_size x its numerators / global denominators``:
DDP's (and FSDP's) gradient mean of those is the gradient of the loss of the concatenated global batch, as DeepSpec
reduces (``deepspec/modeling/dspark/loss.py``: denominators all-reduced, loss times world size).

Gradient accumulation: Lightning runs ``training_step`` and backward per micro-batch and steps after
``accumulate_grad_batches`` of them, so the step's denominators are known only after its last micro-batch.
:class:`AccumulatedStep` weighs micro-batch m's loss by ``d(W_m) / d(W_1)`` (``W`` its global weight, the
objective's first denominator, ``d`` the normaliser, ``W_1`` the step's first micro-batch's) and, before the
optimizer step, multiplies the summed gradients by ``A d(W_1) / d(W_1 + ... + W_A)`` (Lightning divided each
micro-batch's loss by ``A``). With one denominator (the block drafters: every term is a mean over the same weighted
predictions) this is exactly the gradient of the whole step's global mean. Eagle3's per-step means are exact as
long as every micro-batch has the same count in every step, i.e. no answer token among a row's first
``ttt_length + 1`` positions (true of chat-formatted rows, whose template precedes the answer); otherwise each
micro-batch's per-step means weigh by its step-0 count.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..losses import LossOutput, Ratio

SumOverRanks = Callable[[Tensor], Tensor]


def summed_over_ranks(ratios: dict[str, Ratio], sum_over_ranks: SumOverRanks) -> dict[str, Ratio]:
    """``ratios`` (detached) with every total and weight summed over the ranks, in one collective."""
    parts = [t.reshape(-1) for r in ratios.values() for t in (r.total, r.weight)]
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in parts], torch.float32)  # fp64 runs stay fp64
    flat = sum_over_ranks(torch.cat([t.to(dtype) for t in parts])) if parts else torch.zeros(0)
    out, start = {}, 0
    for name, r in ratios.items():
        n = r.total.numel()
        total, weight = flat[start:start + n].view(r.total.shape), flat[start + n:start + 2 * n].view(r.weight.shape)
        out[name] = Ratio(total, weight, r.eps, r.floor)
        start += 2 * n
    return out


def batch_ratios(result: LossOutput) -> dict[str, Ratio]:
    """What a batch contributes to the global loss (``"loss"``: the objective) and to each logged ratio."""
    return {"loss": result.objective.detach(), **{name: r.detach() for name, r in result.ratios.items()}}


@dataclass
class GlobalStep:
    """One (micro-)batch reduced over the ranks."""

    share: Tensor  # this rank's part of the global loss, with the graph (DDP's gradient mean is the global one)
    ratios: dict[str, Ratio]  # global ratios: "loss" (the objective) and the logged terms and metrics

    @property
    def loss(self) -> Tensor:
        return self.ratios["loss"].value().sum()


def reduce_step(result: LossOutput, sum_over_ranks: SumOverRanks, world_size: int) -> GlobalStep:
    """The global loss of a batch split over ``world_size`` ranks (module docstring)."""
    ratios = summed_over_ranks(batch_ratios(result), sum_over_ranks)
    objective = result.objective
    share = world_size * (objective.total / objective.normaliser(ratios["loss"].weight.to(objective.total))).sum()
    return GlobalStep(share, ratios)


def logged_values(ratios: dict[str, Ratio]) -> dict[str, Tensor]:
    """Name -> value of every ratio with a positive weight (a mean over nothing is not logged); ``loss`` always;
    a ratio per position ``name`` [K] as ``name@k``."""
    values = {"loss": ratios["loss"].value().sum()}
    for name, r in ratios.items():
        if name == "loss":
            continue
        if r.total.dim() == 0:
            if r.weight > 0:
                values[name] = r.value()
            continue
        for k, (value, weight) in enumerate(zip(r.value(), r.weight)):
            if weight > 0:
                values[f"{name}@{k}"] = value
    return values


class AccumulatedStep:
    """Rescales an accumulated optimizer step to the global mean over all its micro-batches (module docstring)."""

    def __init__(self) -> None:
        self.first: Tensor | None = None  # d(W_1)
        self.total: Tensor | None = None  # W_1 + ... + W_m so far
        self.objective: Ratio | None = None  # for its normaliser

    def weigh(self, step: GlobalStep) -> Tensor:
        """The micro-batch's share, weighted by ``d(W_m) / d(W_1)``."""
        objective = step.ratios["loss"]
        weight = objective.weight.reshape(-1)[0]
        if self.first is None:
            self.first, self.total, self.objective = objective.normaliser(weight), weight, objective
            return step.share
        self.total = self.total + weight
        return step.share * (objective.normaliser(weight) / self.first).to(step.share)

    def finish(self, parameters: list[torch.nn.Parameter], accumulate: int) -> None:
        """Multiply the accumulated gradients by ``A d(W_1) / d(sum W)`` and start the next step."""
        if self.first is None:
            return
        scale = float(accumulate * self.first / self.objective.normaliser(self.total))
        for p in parameters:
            if p.grad is not None:
                p.grad.mul_(scale)
        self.first = self.total = self.objective = None
