"""Chain verification: how many drafted tokens the target accepts, and the token it adds.

Standard speculative sampling (Leviathan et al., 2023; Chen et al., 2023), applied per request to a chain
of ``lengths[b]`` drafts:

* T > 0: draft ``d_i`` (drawn from ``q_i``) is accepted with probability ``min(1, p_i(d_i) / q_i(d_i))``,
  left to right until the first rejection. At the first rejected position ``a`` the target draws from the
  residual ``norm(max(p_a - q_a, 0))`` (``p_a`` itself if the residual has no mass); when every draft was
  accepted it draws a bonus token from ``p`` at the position after the last draft. The committed tokens are
  then distributed exactly as the target's own samples, whatever ``q`` was.
* T = 0: greedy match against the target's argmax; the correction/bonus token is the target's argmax.

Losslessness also needs the number of drafts offered for verification (``lengths``) to be decided without
looking at the drafts it admits (DSpark paper, Appendix A): see ``policies.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

RESIDUAL_EPS = 1e-8


def target_probs(logits: Tensor, temperature: float) -> Tensor:
    """``softmax(logits / T)`` in fp32 (one-hot of the argmax at T = 0)."""
    if temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.softmax(logits.float() / temperature, dim=-1)


def verify_chain(draft_tokens: Tensor, draft_probs: Tensor | None, target_logits: Tensor, lengths: Tensor,
                 temperature: float, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Accept a prefix of each request's drafts and draw the next target token.

    Args:
        draft_tokens: [B, K] drafted tokens (columns ``>= lengths[b]`` are ignored).
        draft_probs: [B, K, V] distributions the drafts were drawn from (unused at T = 0).
        target_logits: [B, K + 1, V] target logits at the anchor and at each draft (row b's column i scores the
            token after the anchor and drafts ``< i``).
        lengths: [B] number of drafts offered for verification per request, ``0 <= lengths[b] <= K``.
        temperature: sampling temperature; ``<= 0`` means greedy.
        generator: random source for the uniforms and the correction/bonus draws.

    Returns:
        ``accepted`` [B] int64 (drafts accepted, ``<= lengths``) and ``next_token`` [B] int64 (the correction
        token at position ``accepted`` if a draft was rejected, else the bonus token).
    """
    b, k = draft_tokens.shape
    device = target_logits.device
    offered = torch.arange(k, device=device)[None, :] < lengths[:, None]  # [B, K]
    rows = torch.arange(b, device=device)
    if temperature <= 0:
        greedy = target_logits.argmax(-1)  # [B, K+1]
        ok = (draft_tokens == greedy[:, :k]) & offered
        accepted = ok.long().cumprod(1).sum(1)
        return accepted, greedy[rows, accepted]

    p = target_probs(target_logits, temperature)  # [B, K+1, V]
    if k:
        q = draft_probs.float()
        p_draft = p[:, :k].gather(-1, draft_tokens[..., None]).squeeze(-1)
        q_draft = q.gather(-1, draft_tokens[..., None]).squeeze(-1)
        u = torch.rand(b, k, device=device, generator=generator)
        ok = (u * q_draft < p_draft) & offered  # u < p/q without dividing by q
        accepted = ok.long().cumprod(1).sum(1)
        q_next = torch.cat([q, q.new_zeros(b, 1, q.shape[-1])], dim=1)[rows, accepted]  # [B, V]
    else:
        accepted = torch.zeros(b, dtype=torch.long, device=device)
        q_next = torch.zeros_like(p[:, 0])
    p_next = p[rows, accepted]  # [B, V]
    residual = (p_next - q_next).clamp(min=0)
    use_residual = (accepted < lengths) & (residual.sum(-1) > RESIDUAL_EPS)
    dist = torch.where(use_residual[:, None], residual, p_next)
    next_token = torch.multinomial(dist, 1, generator=generator).squeeze(-1)
    return accepted, next_token
