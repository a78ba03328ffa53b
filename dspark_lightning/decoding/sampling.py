"""Sampling for the engine: the target's (filtered) distribution, counter-based randomness, chain verification.

**Verification** is standard speculative sampling (Leviathan et al., 2023; Chen et al., 2023), applied per request
to a chain of ``lengths[b]`` drafts:

* T > 0: draft ``d_i`` (drawn from ``q_i``) is accepted with probability ``min(1, p_i(d_i) / q_i(d_i))``, left to
  right until the first rejection. At the first rejected position ``a`` the target draws from the residual
  ``norm(max(p_a - q_a, 0))`` (``p_a`` itself if the residual has no mass); when every draft was accepted it draws a
  bonus token from ``p`` at the position after the last draft. The committed tokens are then distributed exactly as
  the target's own samples, whatever ``q`` was. ``p`` is the target's distribution after temperature, top-k and
  top-p (:func:`filtered_probs`): the distribution the output follows.
* T = 0: greedy match against the target's argmax; the correction/bonus token is the target's argmax.

Losslessness also needs the number of drafts offered for verification (``lengths``) to be decided without looking at
the drafts it admits (DSpark paper, Appendix A): see ``policies.py``.

**Randomness** is counter-based (:class:`CounterRNG`): every uniform is a hash of (seed, request, the absolute
position of the token it decides, what it decides: draft / accept / next token). No generator state advances, so a
captured CUDA graph replays fresh randomness every round (the counters are the positions it reads from its state),
and a request's draws do not depend on the batch it shares or on the engine mode (eager, compiled, graphed decode the
same tokens at T > 0). Reusing a position's uniforms in a later round is safe: what a round commits is decided by
uniforms of positions up to its first rejection, and the next round reads positions after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

RESIDUAL_EPS = 1e-8
STREAM_DRAFT, STREAM_ACCEPT, STREAM_NEXT = 1, 2, 3
_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Sampling:
    """How tokens are drawn: ``temperature`` (0 = greedy), then top-k (0 = off) and top-p (1 = off) filtering of the
    tempered distribution, as HF's ``TemperatureLogitsWarper`` / ``TopKLogitsWarper`` / ``TopPLogitsWarper`` do."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy).")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 = no nucleus filter).")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = no top-k filter).")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def filtered_probs(logits: Tensor, sampling: Sampling) -> Tensor:
    """``softmax`` of ``logits / T`` restricted to the top-k tokens and then to the smallest set of most likely
    tokens whose mass reaches top-p (the most likely token always stays); fp32 ``[..., V]``."""
    x = logits.float() / sampling.temperature
    if 0 < sampling.top_k < x.shape[-1]:
        kth = x.topk(sampling.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if sampling.top_p < 1:
        ordered = x.sort(dim=-1, descending=True).values
        p = torch.softmax(ordered, dim=-1)
        before = p.cumsum(-1) - p  # mass of the tokens ranked above each one
        keep = (before < sampling.top_p).sum(-1, keepdim=True).clamp(min=1)  # how many survive
        cutoff = ordered.gather(-1, keep - 1)  # the smallest surviving logit
        x = x.masked_fill(x < cutoff, float("-inf"))
    return torch.softmax(x, dim=-1)


def inverse_cdf(weights: Tensor, u: Tensor) -> Tensor:
    """Draw from the (unnormalised, non-negative) ``weights [..., V]`` with uniforms ``u [...]`` in (0, 1): the first
    index whose cumulative weight exceeds ``u * total`` (a zero-weight index is never drawn)."""
    cdf = weights.float().cumsum(-1)
    value = (u.float() * cdf[..., -1]).unsqueeze(-1)
    return torch.searchsorted(cdf.contiguous(), value.contiguous(), right=True).squeeze(-1).clamp(
        max=weights.shape[-1] - 1)


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer finaliser (two xor-shift-multiply rounds; constants below 2**27 keep every product inside
    int64), applied to int64 tensors holding 32-bit values."""
    x = x & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


class CounterRNG:
    """Uniforms keyed by (seed, request, position, stream): see the module docstring.

    Args:
        seed: any int.
        requests: the request index of each batch row, ``[B]`` int64 (padding rows may repeat one).
    """

    def __init__(self, seed: int, requests: Tensor) -> None:
        folded = (seed ^ (seed >> 32)) & _MASK32
        self.keys = _mix32(_mix32(torch.full_like(requests, folded)) ^ requests.long())  # [B]

    def uniform(self, positions: Tensor, stream: int) -> Tensor:
        """fp32 uniforms in (0, 1), one per entry of ``positions [B, n]`` (absolute token positions)."""
        h = _mix32(self.keys[:, None] ^ _mix32(positions.long() * 4 + stream))
        return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))


class EngineSampler:
    """The engine's :class:`~dspark_lightning.drafters.protocol.DraftSampler`: draft step ``k`` of a row whose anchor
    sits at position ``anchor_position[b]`` draws with the uniform of position ``anchor_position[b] + 1 + k``, from the
    same filtered distribution the target's tokens follow (which keeps the drafts close to what verification
    accepts)."""

    def __init__(self, sampling: Sampling, rng: CounterRNG | None, anchor_position: Tensor) -> None:
        self.sampling, self.rng, self.anchor_position = sampling, rng, anchor_position

    @property
    def greedy(self) -> bool:
        return self.sampling.greedy

    def __call__(self, logits: Tensor, first_step: int) -> tuple[Tensor, Tensor | None]:
        if self.greedy:
            return logits.argmax(-1), None
        n = logits.shape[1]
        steps = torch.arange(first_step + 1, first_step + 1 + n, device=logits.device)
        u = self.rng.uniform(self.anchor_position[:, None] + steps, STREAM_DRAFT)  # [B, n]
        probs = filtered_probs(logits, self.sampling)
        return inverse_cdf(probs, u), probs


def verify_chain(draft_tokens: Tensor, draft_probs: Tensor | None, target_logits: Tensor, lengths: Tensor,
                 sampling: Sampling, rng: CounterRNG | None = None,
                 anchor_position: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Accept a prefix of each request's drafts and draw the next target token.

    Args:
        draft_tokens: [B, K] drafted tokens (columns ``>= lengths[b]`` are ignored).
        draft_probs: [B, K, V] distributions the drafts were drawn from (unused when greedy).
        target_logits: [B, K + 1, V] target logits at the anchor and at each draft (row b's column i scores the
            token after the anchor and drafts ``< i``).
        lengths: [B] number of drafts offered for verification per request, ``0 <= lengths[b] <= K``.
        sampling: the target's sampling settings.
        rng, anchor_position: the randomness (sampled only) and each row's anchor position: draft i and the token
            drawn after it decide position ``anchor_position + 1 + i``.

    Returns:
        ``accepted`` [B] int64 (drafts accepted, ``<= lengths``) and ``next_token`` [B] int64 (the correction token
        at position ``accepted`` if a draft was rejected, else the bonus token).
    """
    b, k = draft_tokens.shape
    device = target_logits.device
    offered = torch.arange(k, device=device)[None, :] < lengths[:, None]  # [B, K]
    rows = torch.arange(b, device=device)
    if sampling.greedy:
        greedy = target_logits.argmax(-1)  # [B, K+1]
        ok = (draft_tokens == greedy[:, :k]) & offered
        accepted = ok.long().cumprod(1).sum(1)
        return accepted, greedy[rows, accepted]

    p = filtered_probs(target_logits, sampling)  # [B, K+1, V]
    if k:
        q = draft_probs.float()
        p_draft = p[:, :k].gather(-1, draft_tokens[..., None]).squeeze(-1)
        q_draft = q.gather(-1, draft_tokens[..., None]).squeeze(-1)
        steps = torch.arange(1, k + 1, device=device)
        u = rng.uniform(anchor_position[:, None] + steps, STREAM_ACCEPT)  # [B, K]
        ok = (u * q_draft < p_draft) & offered  # u < p/q without dividing by q
        accepted = ok.long().cumprod(1).sum(1)
        q_next = torch.cat([q, q.new_zeros(b, 1, q.shape[-1])], dim=1)[rows, accepted]  # [B, V]
    else:
        accepted = torch.zeros(b, dtype=torch.long, device=device)
        q_next = torch.zeros_like(p[:, 0])
    p_next = p[rows, accepted]  # [B, V]
    residual = (p_next - q_next).clamp(min=0)
    use_residual = (accepted < lengths) & (residual.sum(-1) > RESIDUAL_EPS)
    weights = torch.where(use_residual[:, None], residual, p_next)
    u_next = rng.uniform((anchor_position + 1 + accepted)[:, None], STREAM_NEXT)[:, 0]
    return accepted, inverse_cdf(weights, u_next)
