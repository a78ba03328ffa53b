"""Verify-length policies: how many of each request's drafted tokens go to the target this round.

A policy maps per-step confidences ``c [R, K]`` (``c_k`` = predicted probability that draft k is accepted
given drafts ``< k`` were; DSpark paper Eq. 7) to a verify length ``0 <= n_r <= K`` per request:

* :class:`FixedLength`: verify every drafted token (or the first ``length``).
* :class:`ConfidenceThreshold`: stop before the first position whose per-step ``c_k < threshold`` (DeepSpec's
  ``--confidence-threshold``; per step, not the cumulative product).
* :class:`PrefixScheduler`: the hardware-aware prefix scheduler (paper Algorithm 1). Survival probabilities
  ``S_rk = prod_{i<=k} c_ri`` of every request's every draft are ranked in one batch-global list; drafts are
  admitted greedily in that order while the expected accepted tokens times the steps per second of the
  verify batch, ``(R + sum of admitted S) * SPS(R + admitted)``, does not decrease, and the scan stops at the
  first draft that would lower it (the causal early stop). Each request always verifies its anchor, so the
  budget starts at ``B = R``. The decision is ``kernels.prefix_schedule``: a sync-free torch path, or on CUDA
  one Triton launch.

Why the early stop and not the best budget over the whole list (paper Appendix A): a draft must be admitted
(or not) without looking at itself, else the verified tokens are no longer distributed as the target's.
``c_{k+1}`` is computed from draft ``k`` (the confidence head reads the previous token), so a rule that
peeks at later survival probabilities, as an arg-max over all budgets does, lets the value of draft ``k``
decide whether draft ``k`` is verified. With the early stop, the decision about the draft ranked j uses
only the drafts ranked before it, i.e. the same request's earlier drafts and other requests' drafts, never
the token itself (survival is non-increasing along a request, and ties are broken position-first). All
three policies have this property; ``tests/decoding`` checks it and the resulting losslessness.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels.prefix_schedule import prefix_schedule
from .sps import SpsTable

POLICIES = ("fixed", "threshold", "scheduler")


@dataclass
class FixedLength:
    """Verify all drafted tokens, or the first ``length`` of them."""

    length: int | None = None

    def verify_length(self, num_drafted: int) -> int:
        """The drafts every request verifies (known without looking at the confidences)."""
        return num_drafted if self.length is None else min(self.length, num_drafted)

    def fixed_length(self, batch: int, num_drafted: int) -> int:
        """What every request verifies in a batch of ``batch`` (the engine then runs fused rounds)."""
        return self.verify_length(num_drafted)

    def __call__(self, confidence: Tensor | None, num_drafted: int, batch: int) -> Tensor:
        device = confidence.device if confidence is not None else None
        return torch.full((batch,), self.verify_length(num_drafted), dtype=torch.long, device=device)


@dataclass
class ConfidenceThreshold:
    """Verify drafts up to (excluding) the first position whose per-step confidence is below ``threshold``."""

    threshold: float

    def fixed_length(self, batch: int, num_drafted: int) -> None:
        """Never known ahead: it reads each round's confidences."""
        return None

    def __call__(self, confidence: Tensor | None, num_drafted: int, batch: int) -> Tensor:
        if confidence is None:
            raise ValueError("The threshold policy needs confidences; this drafter gives none.")
        keep = (confidence[:, :num_drafted] >= self.threshold).long()
        return keep.cumprod(1).sum(1)


@dataclass
class PrefixScheduler:
    """Paper Algorithm 1 over a batch-global ranking of survival probabilities (see module docstring).

    Args:
        sps: steps per second as a function of the tokens verified in one step.
        backend: ``torch`` / ``triton`` / ``auto`` (None: ``$DSPARK_KERNEL_BACKEND``, else ``auto`` = the one-launch
            Triton kernel for CUDA tensors when Triton is installed, the torch path otherwise).
    """

    sps: SpsTable
    backend: str | None = None
    flat_tolerance: float = 0.03

    def fixed_length(self, batch: int, num_drafted: int) -> int | None:
        """``num_drafted`` when verifying every draft of a batch of ``batch`` requests costs at most ``flat_tolerance``
        more step time than verifying the anchors alone, else None (decide each round).

        On a flat table Algorithm 1 admits every draft whose survival is worth more than the step-time increase
        (here at most 3 %), so at most the far tail of low-survival drafts would be cut; deciding per round costs a
        host round trip and verify widths that vary, which cost more than that tail saves. The decision depends on
        the table and the batch size only, never on a draft, so losslessness is untouched.
        """
        tokens = torch.tensor([batch, batch * (num_drafted + 1)], dtype=torch.float64)
        anchors, everything = self.sps.step_time(tokens).tolist()
        return num_drafted if everything <= anchors * (1 + self.flat_tolerance) else None

    def __call__(self, confidence: Tensor | None, num_drafted: int, batch: int) -> Tensor:
        if confidence is None:
            raise ValueError("The prefix scheduler needs confidences; this drafter gives none.")
        return schedule_prefix(confidence[:, :num_drafted], self.sps, backend=self.backend)


def schedule_prefix(confidence: Tensor, sps: SpsTable, backend: str | None = None) -> Tensor:
    """Verify lengths [R] from per-step confidences [R, K] (Algorithm 1 with the causal early stop).

    One sort of the R*K survival probabilities, a cumulative sum against SPS(R..R+R*K) (cached per batch shape by
    the table), per-request counts; nothing is read back to the host, so a CUDA caller is not blocked. The work
    is ``kernels.prefix_schedule``: a torch path, or on CUDA one Triton launch (``backend`` as in
    :class:`PrefixScheduler`).
    """
    r, k = confidence.shape
    return prefix_schedule(confidence, sps.arange(r, r + r * k + 1, confidence.device), backend=backend)


def build_policy(name: str = "fixed", *, length: int | None = None, threshold: float = 0.5,
                 sps_table: SpsTable | None = None) -> FixedLength | ConfidenceThreshold | PrefixScheduler:
    """A policy by name: ``fixed``, ``threshold`` or ``scheduler`` (needs ``sps_table``)."""
    if name == "fixed":
        return FixedLength(length)
    if name == "threshold":
        return ConfidenceThreshold(threshold)
    if name == "scheduler":
        if sps_table is None:
            raise ValueError("policy 'scheduler' needs an SPS table: run `python -m dspark_lightning profile-sps "
                             "--output sps.json ...` and pass its path as sps_table.")
        return PrefixScheduler(sps_table)
    raise ValueError(f"Unknown verify policy {name!r}; choose one of {POLICIES}.")
