"""What one :meth:`~.engine.SpeculativeEngine.generate` call returns: the tokens and the per-round records."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class Rounds:
    """Per-request records of the verify rounds of one generate call.

    ``N`` records (one per request per round it took part in) and ``S`` batch steps (rounds).
    """

    request: Tensor  # [N] int64 index of the prompt
    step: Tensor  # [N] int64 batch step the record belongs to
    proposal_length: Tensor  # [N] int64 drafts offered for verification
    accepted: Tensor  # [N] int64 drafts the target accepted (before any stop-token cut)
    num_tokens: Tensor  # [N] int64 tokens the round produced: accepted drafts + correction/bonus, cut after a stop
    confidence_logits: Tensor  # [N, K] fp32 raw confidence-head logits of all K drafts (NaN without a head)
    draft_seconds: Tensor  # [S] float64 drafting time per step (propose + policy); NaN where not measured apart
    verify_seconds: Tensor  # [S] float64 target forward + acceptance + commit per step; NaN where not measured apart
    round_seconds: Tensor | None = None  # [S] float64 whole round per step (default: draft + verify)

    def __post_init__(self) -> None:
        if self.round_seconds is None:
            self.round_seconds = self.draft_seconds + self.verify_seconds

    @property
    def gamma(self) -> int:
        return self.confidence_logits.shape[1]

    @classmethod
    def empty(cls, gamma: int) -> Rounds:
        z = torch.zeros(0, dtype=torch.long)
        t = torch.zeros(0, dtype=torch.float64)
        return cls(z, z, z, z, z, torch.zeros(0, gamma), t, t, t)

    @classmethod
    def cat(cls, parts: Sequence[Rounds]) -> Rounds:
        """Concatenate records (their ``step`` indices are offset to stay distinct)."""
        offset, steps = 0, []
        for p in parts:
            steps.append(p.step + offset)
            offset += p.round_seconds.numel()
        join = lambda name: torch.cat([getattr(p, name) for p in parts])
        return cls(join("request"), torch.cat(steps), join("proposal_length"), join("accepted"), join("num_tokens"),
                   join("confidence_logits"), join("draft_seconds"), join("verify_seconds"), join("round_seconds"))

    def to_dicts(self, **extra: Any) -> list[dict[str, Any]]:
        """One JSON-ready dict per record (what ``rounds.jsonl`` holds and ``calibrate`` reads)."""
        has_conf = self.confidence_logits.numel() and not torch.isnan(self.confidence_logits).all()
        conf = self.confidence_logits.tolist() if has_conf else None
        rows = zip(self.request.tolist(), self.proposal_length.tolist(), self.accepted.tolist(),
                   self.num_tokens.tolist())
        return [
            {**extra, "request": r, "proposal_length": n, "accepted": a, "num_tokens": t,
             "confidence_logits": None if conf is None else conf[i]}
            for i, (r, n, a, t) in enumerate(rows)
        ]


@dataclass
class Generation:
    """Result of a generate call.

    Attributes:
        tokens: generated tokens per prompt (at most ``max_new_tokens``, ending at a stop token if one came).
        rounds: per-round records.
        prefill_seconds, seconds: prefill time and total wall time (prefill included).
        stopped: per prompt, whether it ended on a stop token (rather than the budget).
    """

    tokens: list[list[int]]
    rounds: Rounds
    prefill_seconds: float = 0.0
    seconds: float = 0.0
    stopped: list[bool] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)
