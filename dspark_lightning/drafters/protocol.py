"""What every drafter provides, so that callers (the decoding engine, the LightningModule, the exporters) never ask
which algorithm they hold.

Inference is a loop of three calls on a drafter-owned context cache (``decoding/engine.py`` drives it):

1. ``cache = drafter.new_cache(batch, capacity=..., static=...)``, then ``drafter.extend_context(cache, target_hidden,
   tokens_after, counts)`` with the prompt's target features;
2. every round ``drafter.propose(cache, anchor_ids, sampler, num_tokens)``: ``num_tokens`` drafts per row after the
   anchor (the last committed token), each drawn through ``sampler`` (:class:`DraftSampler`) so that the caller
   owns temperature, filtering and randomness;
3. after verification ``drafter.extend_context`` with the target features of the verified positions, ``counts[b]`` of
   them committed for row b (``tokens_after[b, j]`` is the token that follows position j: Eagle3 pairs each feature
   with it, the block drafters ignore it).

A cache is right-padded per row: ``cache.lengths [B]`` committed positions. ``static`` caches never grow or read
back to the host (fixed shapes for CUDA graphs); ``cache.select_rows(index)`` keeps the given rows.

Training (:class:`TrainableDrafter`, driven by ``modules/drafter_module.py``) is two calls and a loss:

1. ``out = drafter.training_forward(batch, target_hidden)``: the teacher-forced pass over a batch of the batch
   contract (docs/design.md). A block drafter reads its anchors from the batch (the cache DataModule samples them in its
   workers, ``training_anchors(config)`` per row) or samples them itself;
2. ``losses.drafter_loss(drafter, out, target_last_hidden, weights)`` picks the loss by the type of ``out``; the
   fused block loss reads the head tensors from ``drafter.logits_head()`` (:class:`LogitsHead`).

Around them: ``load_target_embeddings`` copies the target's frozen embedding and head, ``layers`` are the decoder
layers (``compile_layers`` compiles each), and ``holds_target_head`` says whether the drafter's ``lm_head`` is the
target's (else the loss needs the target's own head for ``p_t``). Adding a drafter: docs/drafters.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@dataclass
class Proposal:
    """One drafted block per request."""

    tokens: Tensor  # [B, K] drafted tokens (target vocabulary)
    probs: Tensor | None  # [B, K, V] fp32 distribution each token was drawn from; None when drafted greedily
    confidence: Tensor | None = None  # [B, K] per-step conditional acceptance probabilities (DSpark's head)


@runtime_checkable
class DraftSampler(Protocol):
    """Draws draft tokens from draft logits, position by position.

    ``greedy`` samplers take the argmax and return no probabilities (verification at T = 0 compares tokens only).
    """

    greedy: bool

    def __call__(self, logits: Tensor, first_step: int) -> tuple[Tensor, Tensor | None]:
        """``logits [B, n, V]`` of draft steps ``first_step .. first_step + n - 1`` -> tokens ``[B, n]`` and the
        fp32 distribution ``[B, n, V]`` each was drawn from (None when greedy)."""
        ...


@dataclass
class TemperatureSampler:
    """``softmax(logits / temperature)`` through ``torch.multinomial`` (argmax at ``temperature <= 0``): the sampler
    for driving a drafter by hand. The decoding engine passes its own (filtered, counter-based randomness)."""

    temperature: float = 0.0
    generator: torch.Generator | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def __call__(self, logits: Tensor, first_step: int) -> tuple[Tensor, Tensor | None]:
        if self.greedy:
            return logits.argmax(-1), None
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        flat = probs.reshape(-1, probs.shape[-1])
        tokens = torch.multinomial(flat, 1, generator=self.generator).view(probs.shape[:-1])
        return tokens, probs


GREEDY = TemperatureSampler(0.0)


@runtime_checkable
class DraftCache(Protocol):
    """A drafter's context cache (see the module docstring)."""

    lengths: Tensor  # [B] committed positions per row
    static: bool

    def select_rows(self, index: Tensor) -> None:
        """Keep rows ``index`` (in that order), in place."""
        ...


@runtime_checkable
class Drafter(Protocol):
    """The inference contract of a draft model (see the module docstring). ``gamma`` is the most tokens one
    ``propose`` drafts (block drafters: ``block_size``; Eagle3: ``ttt_length``, its trained chain length)."""

    config: Any

    @property
    def gamma(self) -> int: ...

    @property
    def max_draft_tokens(self) -> int | None:
        """The most tokens one ``propose`` can draft (None: no limit)."""
        ...

    def new_cache(self, batch: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                  capacity: int = 256, static: bool = False) -> DraftCache: ...

    def extend_context(self, cache: DraftCache, target_hidden: Tensor, tokens_after: Tensor,
                       counts: Tensor | None = None) -> None: ...

    def propose(self, cache: DraftCache, anchor_ids: Tensor, sampler: DraftSampler = GREEDY,
                num_tokens: int | None = None) -> Proposal: ...


@dataclass(frozen=True)
class LogitsHead:
    """What a block drafter's ``compute_logits(h, u)`` applies, for the fused loss (``kernels/fused_block_loss.py``),
    which builds the logits itself: ``softcap(h @ weight.T) + u @ markov_w2.T``."""

    weight: Tensor  # [V, H] the frozen lm_head weight, detached
    markov_w2: Tensor | None = None  # [V, r] the trainable Markov factor (DSpark), None without a Markov head
    softcap: float | None = None  # Gemma's final-logit soft cap, applied before the Markov term


@runtime_checkable
class TrainableDrafter(Drafter, Protocol):
    """The training contract of a draft model (see the module docstring); block drafters (training output
    ``BlockDraftOutput``) also provide ``logits_head() -> LogitsHead``."""

    layers: nn.ModuleList  # the decoder layers

    @property
    def holds_target_head(self) -> bool: ...

    @classmethod
    def training_anchors(cls, config: Any) -> int | None:
        """Anchors per row that ``training_forward`` reads from a batch (None: it takes none)."""
        ...

    def training_forward(self, batch: Mapping[str, Tensor], target_hidden: Tensor) -> Any: ...

    def compute_logits(self, hidden: Tensor, *args: Any) -> Tensor: ...

    def load_target_embeddings(self, embed_weight: Tensor, lm_head_weight: Tensor) -> None: ...
