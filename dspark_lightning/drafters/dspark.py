"""DSpark: the DFlash block backbone plus a tiny sequential head and a confidence head (DSpark paper §3).

Design:
- Composition: DSpark *holds* a :class:`DFlash` backbone and adopts its submodules under their own names,
  so the state dict reads ``fc``, ``layers.N.*``, ``markov_head.*``, ``confidence_head.*`` exactly as
  DeepSpec and SGLang expect (no ``backbone.`` prefix, exports need no renaming).
- Sequential head (paper §3.1, Eqs. 5-6) adds a low-rank bias to the parallel logits,
  ``logits_k = U_k + W2 u_k``, where the rank-r feature ``u_k`` depends on the previous token:
  ``vanilla`` u = W1[x_{k-1}]; ``gated`` u = sigmoid(gate([h_k ; W1[x_{k-1}]])) * W1[x_{k-1}];
  ``rnn`` s_k = sigma(g) s_{k-1} + (1-sigma(g)) tanh(c), u = tanh(o), (g, c, o) = joint([s_{k-1}; W1[x]; h_k]).
  Training feeds the ground-truth previous tokens (teacher forcing); inference samples left to right.
- Confidence head (paper Eq. 7): ``c_k = sigmoid(w . [h_k ; W1[x_{k-1}]] + b)``, the conditional probability
  that draft k is accepted given drafts < k were; trained against 1 - TV(p_d, p_t) (losses.py).
- With both heads off DSpark is DFlash, exactly (tested).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ._layers import init_weights, unfilled
from .blocks import BlockDrafter, BlockDraftOutput
from .config import DrafterConfig
from .dflash import ContextKVCache, DFlash
from .protocol import GREEDY, DraftSampler, Proposal


class MarkovHead(nn.Module):
    """Low-rank first-order token bias; ``markov_w1`` [V, r] embeds the previous token, ``markov_w2`` maps r -> V."""

    def __init__(self, vocab: int, hidden: int, rank: int, head_type: str) -> None:
        super().__init__()
        self.head_type, self.rank = head_type, rank
        self.markov_w1 = unfilled(nn.Embedding, vocab, rank)  # filled once, by the owner's init_weights
        self.markov_w2 = unfilled(nn.Linear, rank, vocab, bias=False)
        if head_type == "gated":
            self.gate_proj = nn.Linear(hidden + rank, rank, bias=True)
        elif head_type == "rnn":
            self.joint_proj = nn.Linear(2 * rank + hidden, 3 * rank, bias=True)

    def init_state(self, leading: tuple[int, ...], like: Tensor) -> Tensor | None:
        return like.new_zeros(*leading, self.rank) if self.head_type == "rnn" else None

    def step(self, prev: Tensor, hidden: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """One position: prev [...], hidden [..., H] -> (u [..., r], new state)."""
        e = self.markov_w1(prev).to(hidden.dtype)
        if self.head_type == "vanilla":
            return e, state
        if self.head_type == "gated":
            return torch.sigmoid(self.gate_proj(torch.cat([hidden, e], -1))) * e, state
        g, c, o = self.joint_proj(torch.cat([state, e, hidden], -1)).chunk(3, dim=-1)
        gate = torch.sigmoid(g)
        state = gate * state + (1 - gate) * torch.tanh(c)
        return torch.tanh(o), state

    def features(self, prev_ids: Tensor, hidden: Tensor) -> Tensor:
        """Teacher-forced features for a whole block: prev_ids [..., K], hidden [..., K, H] -> u [..., K, r]."""
        if self.head_type != "rnn":  # position-wise: vectorised
            return self.step(prev_ids, hidden, None)[0]
        state = self.init_state(prev_ids.shape[:-1], hidden)
        out = []
        for k in range(prev_ids.shape[-1]):
            u, state = self.step(prev_ids[..., k], hidden[..., k, :], state)
            out.append(u)
        return torch.stack(out, dim=-2)

    def bias(self, u: Tensor) -> Tensor:
        return self.markov_w2(u)


def sample_left_to_right(base: Tensor, hidden: Tensor, confidence_hidden: Tensor, anchor_ids: Tensor,
                         markov_head: MarkovHead | None, confidence_head: ConfidenceHead | None,
                         prev_embed: Callable[[Tensor], Tensor | None], sampler: DraftSampler) -> Proposal:
    """Draft a block position by position: ``base`` [B, K, V] plus the Markov bias of the previous token (its
    features read ``hidden`` [B, K, H]), the confidence of each position read from ``confidence_hidden`` and the
    previous token's embedding (``prev_embed``), then a draw through ``sampler``."""
    prev = anchor_ids
    state = markov_head.init_state(prev.shape, hidden) if markov_head is not None else None
    tokens, probs, conf = [], [], []
    for k in range(base.shape[1]):
        logits = base[:, k]
        if markov_head is not None:
            u, state = markov_head.step(prev, hidden[:, k], state)
            logits = logits + markov_head.bias(u).to(logits.dtype)
        if confidence_head is not None:
            conf.append(torch.sigmoid(confidence_head(confidence_hidden[:, k], prev_embed(prev))))
        tok, p = sampler(logits[:, None], k)
        tokens.append(tok[:, 0])
        probs.append(p)
        prev = tok[:, 0]
    return Proposal(torch.stack(tokens, 1), None if sampler.greedy else torch.cat(probs, 1),
                    torch.stack(conf, 1) if conf else None)


class ConfidenceHead(nn.Module):
    """``proj: Linear(H (+ r), 1)``; returns fp32 logits of the per-step acceptance probability."""

    def __init__(self, hidden: int, rank: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden + rank, 1, bias=True)

    def forward(self, hidden: Tensor, prev_embed: Tensor | None) -> Tensor:
        x = hidden if prev_embed is None else torch.cat([hidden, prev_embed.to(hidden.dtype)], -1)
        return self.proj(x).squeeze(-1).float()


class DSpark(BlockDrafter):
    """DFlash backbone + Markov head + confidence head (see module docstring).

    ``markov_sampler``: optional fused replacement of the vanilla head's greedy loop in :meth:`propose`,
    ``(base [B, K, V], anchor_ids [B], markov_w1 [V, r], markov_w2 [V, r], temperature, generator) -> (tokens
    [B, K], logits [B, K, V] fp32)``, called with temperature 0. None (the default, and what Hub copies of this file
    use) keeps the plain loop; the decoding engine installs ``kernels.markov_sampling.markov_sampler`` (Triton on
    CUDA). Sampled drafts always go through the caller's :class:`~.protocol.DraftSampler`.
    """

    markov_sampler = None

    def __init__(self, config: DrafterConfig) -> None:
        super().__init__()
        config.validate()
        if config.algorithm not in ("dspark", "dflash"):
            raise ValueError(f"DSpark needs algorithm 'dspark', got {config.algorithm!r}.")
        self.config = config
        backbone = DFlash(dataclasses.replace(config, algorithm="dflash"))
        # Hold the backbone without registering it as a child; adopt its children under their own names.
        self.__dict__["backbone"] = backbone
        for name, child in backbone.named_children():
            self.add_module(name, child)
        h, v = config.hidden_size, config.vocab_size
        self.markov_head = MarkovHead(v, h, config.markov_rank, config.markov_head_type) \
            if config.has_markov_head else None
        use_markov_features = config.has_markov_head and config.confidence_head_with_markov
        self.confidence_head = ConfidenceHead(h, config.markov_rank if use_markov_features else 0) \
            if config.has_confidence_head else None
        for head in (self.markov_head, self.confidence_head):
            if head is not None:
                init_weights(head)

    # Backbone pieces, so callers treat DSpark and DFlash alike.
    def compute_logits(self, hidden: Tensor, markov_features: Tensor | None = None) -> Tensor:
        """``U_k + W2 u_k`` for any leading shape."""
        logits = self.backbone.compute_logits(hidden)
        if markov_features is not None:
            logits = logits + self.markov_head.bias(markov_features).to(logits.dtype)
        return logits

    def new_cache(self, batch: int, **kwargs) -> ContextKVCache:
        return self.backbone.new_cache(batch, **kwargs)

    def extend_context(self, cache: ContextKVCache, target_hidden: Tensor, tokens_after: Tensor | None = None,
                       counts: Tensor | None = None) -> None:
        self.backbone.extend_context(cache, target_hidden, tokens_after, counts)

    def _prev_embed(self, prev_ids: Tensor) -> Tensor | None:
        if self.confidence_head is None or self.confidence_head.proj.in_features == self.config.hidden_size:
            return None
        return self.markov_head.markov_w1(prev_ids)

    def forward(self, input_ids: Tensor, target_hidden: Tensor, loss_mask: Tensor, anchors: Tensor,
                anchor_valid: Tensor) -> BlockDraftOutput:
        """Training pass (args as :meth:`DFlash.forward`), plus teacher-forced Markov features and confidences."""
        out = self.backbone(input_ids, target_hidden, loss_mask, anchors, anchor_valid)
        if self.markov_head is not None:
            out.markov_features = self.markov_head.features(out.prev_ids, out.hidden)
        if self.confidence_head is not None:
            out.confidence_logits = self.confidence_head(out.hidden, self._prev_embed(out.prev_ids))
        return out

    @torch.no_grad()
    def propose(self, cache: ContextKVCache, anchor_ids: Tensor, sampler: DraftSampler = GREEDY,
                num_tokens: int | None = None) -> Proposal:
        """Draft ``num_tokens`` (default gamma) tokens: one backbone pass, then the Markov head samples left to
        right."""
        hidden = self.backbone.draft_hidden(cache, anchor_ids)[:, :num_tokens or self.gamma]  # [B, K, H]
        base = self.backbone.compute_logits(hidden)
        if self.markov_head is None and self.confidence_head is None:
            tokens, probs = sampler(base, 0)
            return Proposal(tokens, probs)
        vanilla = self.markov_head is not None and self.markov_head.head_type == "vanilla"
        if self.markov_sampler is not None and vanilla and sampler.greedy:
            return self._propose_vanilla_greedy(hidden, base, anchor_ids)
        return sample_left_to_right(base, hidden, hidden, anchor_ids, self.markov_head, self.confidence_head,
                                    self._prev_embed, sampler)

    def _propose_vanilla_greedy(self, hidden: Tensor, base: Tensor, anchor_ids: Tensor) -> Proposal:
        """The vanilla head's greedy left-to-right loop through :attr:`markov_sampler` (the decoding engine installs
        the fused kernel of ``kernels/markov_sampling``), then confidences vectorised over K."""
        head = self.markov_head
        tokens, _ = self.markov_sampler(base, anchor_ids, head.markov_w1.weight, head.markov_w2.weight, 0.0, None)
        conf = None
        if self.confidence_head is not None:
            prev = torch.cat([anchor_ids[:, None], tokens[:, :-1]], dim=1)
            conf = torch.sigmoid(self.confidence_head(hidden, self._prev_embed(prev)))
        return Proposal(tokens, None, conf)
