"""Speculative-decoding metrics per suite, as a torchmetrics ``Metric`` (summed across ranks).

Definitions (per suite, pooled over every round of every prompt, as DeepSpec's
``deepspec/eval/base_evaluator.py::build_metrics_row`` does):

* ``tau``: mean tokens produced per verify round, the correction/bonus token included (the paper's
  accepted length). A round that ends on an accepted stop token counts the tokens up to it.
* ``accept_rate[i]`` (prefix survival, DeepSpec's ``accept_rate@i``): rounds that accepted at least ``i+1``
  drafts / rounds that offered at least ``i+1`` drafts for verification.
* ``conditional_accept[i]`` (the paper's Fig. 2): rounds that accepted at least ``i+1`` drafts / rounds that
  offered draft ``i+1`` and accepted the ``i`` before it, i.e. P(draft i+1 accepted | drafts 1..i were).
* ``verify_rate``: produced tokens / verified tokens (drafts offered + 1 per round).
* ``mean_proposal``: drafts offered per round.
* ``draft_ms`` / ``verify_ms``: milliseconds per batch step spent drafting (propose, policy) and verifying (target
  forward, acceptance, commit, draft-context update); measured in split rounds only (``time_phases``).
* ``tokens_per_second``: tokens kept (after the stop / ``max_new_tokens`` cut) / the rounds' seconds (whole rounds,
  fused or split), i.e. decoding throughput per device, prefill excluded.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from ..decoding import Rounds


class DecodingMetrics(Metric):
    """Counters of verify rounds for ``num_suites`` suites and ``gamma`` draft positions.

    Args:
        num_suites: suites tracked (indexed 0..num_suites-1).
        gamma: drafted tokens per round (0 for the target alone).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_suites: int, gamma: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_suites, self.gamma = num_suites, gamma
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64)
        for name in ("rounds", "tokens", "kept_tokens", "offered", "samples", "steps", "draft_seconds",
                     "verify_seconds", "round_seconds"):
            self.add_state(name, default=zeros(num_suites), dist_reduce_fx="sum")
        for name in ("survived", "offered_at", "reached"):
            self.add_state(name, default=zeros(num_suites, gamma), dist_reduce_fx="sum")

    def update(self, suite: int, rounds: Rounds, kept_tokens: int, samples: int) -> None:
        """Add the rounds of one batch of suite ``suite`` (``kept_tokens`` generated tokens, ``samples`` prompts)."""
        dev = self.rounds.device
        offered, accepted = rounds.proposal_length.to(dev), rounds.accepted.to(dev)
        position = torch.arange(1, self.gamma + 1, device=dev)
        self.rounds[suite] += offered.numel()
        self.tokens[suite] += rounds.num_tokens.sum().to(dev)
        self.kept_tokens[suite] += kept_tokens
        self.offered[suite] += offered.sum()
        self.samples[suite] += samples
        self.steps[suite] += rounds.draft_seconds.numel()
        self.draft_seconds[suite] += rounds.draft_seconds.sum().to(dev)
        self.verify_seconds[suite] += rounds.verify_seconds.sum().to(dev)
        self.round_seconds[suite] += rounds.round_seconds.sum().to(dev)
        was_offered = offered[:, None] >= position[None]
        self.offered_at[suite] += was_offered.sum(0)
        self.survived[suite] += (accepted[:, None] >= position[None]).sum(0)
        self.reached[suite] += (was_offered & (accepted[:, None] >= position[None] - 1)).sum(0)

    def compute(self) -> dict[str, Tensor]:
        """Per-suite tensors ([S] or [S, gamma]); NaN where nothing was counted."""
        div = lambda a, b: a / torch.where(b > 0, b, torch.nan)
        return {
            "tau": div(self.tokens, self.rounds),
            "accept_rate": div(self.survived, self.offered_at),
            "conditional_accept": div(self.survived, self.reached),
            "verify_rate": div(self.tokens, self.offered + self.rounds),
            "mean_proposal": div(self.offered, self.rounds),
            "draft_ms": 1e3 * div(self.draft_seconds, self.steps),
            "verify_ms": 1e3 * div(self.verify_seconds, self.steps),
            "tokens_per_second": div(self.kept_tokens, self.round_seconds),
            "num_rounds": self.rounds.clone(),
            "num_samples": self.samples.clone(),
        }
