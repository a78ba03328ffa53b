"""The engine's device state: fixed-shape buffers one generate call decodes in, kept for the next call of the same
shapes (with the CUDA graphs captured on them).

A round reads and writes only these buffers, in place: the target's KV cache (slot = position, a prefix per row),
the drafter's context cache, each row's position (``committed``: tokens the target has seen, the anchor's position),
anchor, running flag, outputs and the per-round records. Rows beyond the call's requests (the batch is padded to a
bucket so calls of similar sizes share graphs) never run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..targets import FrozenTarget
from .graphs import CapturedStep
from .records import Rounds
from .sampling import CounterRNG, Sampling
from .slot_cache import SlotKVCache

CAPACITY_STEP = 64  # KV capacities are rounded up to a multiple of this, so that similar calls share buffers
CONFIDENCE_EPS = 1e-7


def batch_bucket(n: int) -> int:
    """Rows a call of ``n`` requests runs: a power of two up to 16, then a multiple of 16."""
    if n <= 16:
        return 1 << (n - 1).bit_length()
    return -(-n // 16) * 16


def _round_up(x: int, step: int) -> int:
    return -(-x // step) * step


@dataclass(frozen=True)
class StateKey:
    """What fixes the buffers' shapes and the graphs' contents."""

    batch: int  # rows (a bucket)
    capacity: int  # target KV slots per row
    context: int  # draft context entries per row
    max_rounds: int  # record slots: each round of a running row commits at least one token, and one more round runs
    gamma: int
    sampling: Sampling
    num_stops: int
    device: torch.device


def state_key(n: int, longest_prompt: int, max_new_tokens: int, gamma: int, sampling: Sampling, stops: list[int],
              device: torch.device) -> StateKey:
    """The key of a call: a row's positions reach at most prompt - 1 + max_new_tokens + gamma (the last round commits
    up to gamma + 1 tokens past what the budget keeps) and a round writes gamma + 1 slots from there."""
    reach = longest_prompt + max_new_tokens + 2 * gamma + 1
    return StateKey(batch_bucket(n), _round_up(reach, CAPACITY_STEP), _round_up(reach + gamma + 1, CAPACITY_STEP),
                    _round_up(max_new_tokens + 1, CAPACITY_STEP), gamma, sampling, len(stops), device)


@dataclass
class DecodeState:
    """The buffers (see the module docstring). ``B`` rows, ``K`` = gamma, ``W`` = K + 1, ``R`` record slots."""

    key: StateKey
    cache: SlotKVCache
    dcache: Any
    sliding_window: int | None  # the target's local attention window, when it has sliding layers
    has_confidence: bool  # the drafter has a confidence head (its confidences are recorded)
    offsets: Tensor  # [max(W, prompt)] 0, 1, 2, ...: positions relative to a row's anchor
    committed: Tensor  # [B] int64: tokens the target has seen = the anchor's position
    anchor: Tensor  # [B] int64: the last committed token
    alive: Tensor  # [B] bool: rows still generating
    stopped: Tensor  # [B] bool: rows that ended on a stop token
    budget: Tensor  # [B] int64: max_new_tokens
    out_tokens: Tensor  # [B, budget + W] int64: generated tokens (the first out_len valid)
    out_len: Tensor  # [B] int64
    stops: Tensor  # [S] int64 stop tokens
    rng: CounterRNG
    drafts: Tensor  # [B, K] this round's drafts
    draft_probs: Tensor  # [B, K, V] fp32 their distributions (sampled rounds)
    confidence: Tensor  # [B, K] fp32 per-step acceptance probabilities (or the proxy)
    verify_len: Tensor  # [B] int64 drafts each row verifies this round
    tokens_after: Tensor  # [B, W] int64 the token after each verified position
    counts: Tensor  # [B] int64 positions committed this round (0 for rows that did not run)
    round_index: Tensor  # [1] int64 rounds run in this call
    records: dict[str, Tensor]  # [R, B] per round: offered, accepted, tokens, ran; [R, B, K] confidence logits
    graphs: dict[str, CapturedStep] = field(default_factory=dict)
    pool: Any = None  # the CUDA graphs' shared memory pool

    @property
    def batch(self) -> int:
        return self.key.batch

    @property
    def sampling(self) -> Sampling:
        return self.key.sampling

    @property
    def max_rounds(self) -> int:
        return self.key.max_rounds

    # ------------------------------------------------------------------ per call
    def reset(self, rows: list[list[int]], max_new_tokens: int, seed: int, stops: list[int]) -> None:
        """Load a call's requests (padding rows copy the first request and never run) and zero the counters."""
        dev, b = self.committed.device, self.batch
        padded = rows + [rows[0]] * (b - len(rows))
        lengths = torch.tensor([len(p) for p in padded], device=dev)
        width = int(lengths.max())
        ids = torch.zeros(b, width, dtype=torch.long)
        for i, p in enumerate(padded):
            ids[i, :len(p)] = torch.tensor(p)
        self.prompt_ids = ids.to(dev)
        self.committed.copy_(lengths - 1)
        self.anchor.copy_(self.prompt_ids[torch.arange(b, device=dev), lengths - 1])
        self.alive.copy_(torch.arange(b, device=dev) < len(rows))
        self.stopped.zero_()
        self.budget.fill_(max_new_tokens)
        self.out_len.zero_()
        self.round_index.zero_()
        self.verify_len.zero_()
        self.confidence.fill_(float("nan"))
        self.rng.keys.copy_(CounterRNG(seed, torch.arange(b, device=dev)).keys)
        self.stops.copy_(torch.tensor(stops, dtype=torch.long))
        if self.dcache is not None:
            self.dcache.lengths.zero_()

    def attention_mask(self, positions: Tensor) -> Tensor | dict[str, Tensor]:
        """``[B, 1, T, capacity]`` bool for queries at ``positions [B, T]``: a row's slots up to the query's position
        (slot = position); with sliding layers also the windowed mask, keyed by HF's layer types."""
        slots = torch.arange(self.cache.capacity, device=positions.device)
        full = slots[None, None, None, :] <= positions[:, None, :, None]
        if self.sliding_window is None:
            return full
        local = full & (slots[None, None, None, :] > positions[:, None, :, None] - self.sliding_window)
        return {"full_attention": full, "sliding_attention": local}

    # ------------------------------------------------------------------ the commit (inside a round)
    def commit(self, accepted: Tensor, next_token: Tensor, drafts: Tensor, verify_len: Tensor) -> None:
        """Commit a verified round in place: outputs (cut at a stop token or the budget), records, positions, anchors,
        running flags, and the tokens after each verified position (what the draft context is extended with)."""
        ran = self.alive.clone()
        width = drafts.shape[1] + 1
        j = self.offsets[:width]
        after = torch.cat([drafts, next_token[:, None]], dim=1).scatter(1, accepted[:, None], next_token[:, None])
        counts = accepted + 1
        produced = counts
        stopped_now = torch.zeros_like(ran)
        room = self.budget - self.out_len
        if self.stops.numel():
            hit = (after[..., None] == self.stops).any(-1) & (j[None, :] < counts[:, None])
            first = hit.int().argmax(1)
            has_stop = hit.any(1)
            produced = torch.where(has_stop, first + 1, counts)
            stopped_now = has_stop & (first < room) & ran
        take = torch.minimum(produced, room) * ran
        self.out_tokens.scatter_(1, self.out_len[:, None] + j, after)
        self.out_len.add_(take)
        self.stopped.logical_or_(stopped_now)
        self._record(verify_len, accepted, produced, ran)
        self.counts.copy_(counts * ran)
        self.committed.add_(self.counts)
        self.anchor.copy_(torch.where(ran, next_token, self.anchor))
        self.alive.logical_and_(~(stopped_now | (self.out_len >= self.budget)))
        self.tokens_after[:, :width].copy_(after)
        self.round_index.add_(1)

    def _record(self, verify_len: Tensor, accepted: Tensor, produced: Tensor, ran: Tensor) -> None:
        at = self.round_index
        for name, value in (("offered", verify_len), ("accepted", accepted), ("tokens", produced),
                            ("ran", ran.long())):
            self.records[name].index_copy_(0, at, value[None])
        if self.has_confidence:
            logits = torch.logit(self.confidence.float().clamp(CONFIDENCE_EPS, 1 - CONFIDENCE_EPS))
            self.records["confidence"].index_copy_(0, at, logits[None])

    def any_alive(self) -> Tensor:
        return self.alive.any()

    # ------------------------------------------------------------------ graphs
    def snapshot(self) -> list[tuple[Tensor, Tensor]]:
        """The counters a round advances in place (a graph capture's warm-up runs must put them back)."""
        tensors = [self.committed, self.anchor, self.alive, self.stopped, self.out_len, self.round_index, self.counts]
        if self.dcache is not None:  # the context cache's own counters (its lengths; Eagle3's last hidden state)
            tensors += [t for t in vars(self.dcache).values() if isinstance(t, Tensor)]
        return [(t, t.clone()) for t in tensors]

    @staticmethod
    def restore(saved: list[tuple[Tensor, Tensor]]) -> None:
        for tensor, value in saved:
            tensor.copy_(value)

    # ------------------------------------------------------------------ results
    def collect(self, n: int, draft_seconds: list[float], verify_seconds: list[float],
                round_seconds: list[float]) -> tuple[list[list[int]], list[bool], Rounds]:
        """Read everything back once: the first ``n`` rows' tokens, stop flags and records."""
        steps = int(self.round_index)
        out_len = self.out_len[:n].tolist()
        tokens = [row[:m] for row, m in zip(self.out_tokens[:n].tolist(), out_len)]
        rec = {name: value[:steps, :n].cpu() for name, value in self.records.items()}
        ran = rec["ran"].bool()
        step, request = ran.nonzero(as_tuple=True)
        k = self.key.gamma
        conf = rec["confidence"][ran] if self.has_confidence else torch.full((int(ran.sum()), k), float("nan"))
        seconds = [torch.tensor(t[:steps], dtype=torch.float64) for t in (draft_seconds, verify_seconds, round_seconds)]
        rounds = Rounds(request, step, rec["offered"][ran], rec["accepted"][ran], rec["tokens"][ran], conf, *seconds)
        return tokens, self.stopped[:n].tolist(), rounds


def allocate_state(key: StateKey, target: FrozenTarget, drafter: nn.Module | None) -> DecodeState:
    """New buffers for ``key``."""
    dev, b, k = key.device, key.batch, key.gamma
    w = k + 1
    long = dict(dtype=torch.long, device=dev)
    vocab = target.vocab_size
    dcache = None
    if drafter is not None:
        dcache = drafter.new_cache(b, device=dev, capacity=key.context, static=True)
    layer_types = getattr(target.text_config, "layer_types", None) or []
    window = getattr(target.text_config, "sliding_window", None) if "sliding_attention" in layer_types else None
    has_confidence = drafter is not None and bool(getattr(drafter.config, "has_confidence_head", False))
    records = {name: torch.zeros(key.max_rounds, b, **long) for name in ("offered", "accepted", "tokens", "ran")}
    if has_confidence:
        records["confidence"] = torch.zeros(key.max_rounds, b, k, dtype=torch.float32, device=dev)
    return DecodeState(
        key=key, cache=SlotKVCache(key.capacity), dcache=dcache, sliding_window=window, has_confidence=has_confidence,
        offsets=torch.arange(key.capacity, **long), committed=torch.zeros(b, **long), anchor=torch.zeros(b, **long),
        alive=torch.zeros(b, dtype=torch.bool, device=dev), stopped=torch.zeros(b, dtype=torch.bool, device=dev),
        budget=torch.zeros(b, **long), out_tokens=torch.zeros(b, key.max_rounds + w, **long),
        out_len=torch.zeros(b, **long), stops=torch.zeros(key.num_stops, **long),
        rng=CounterRNG(0, torch.arange(b, device=dev)), drafts=torch.zeros(b, k, **long),
        draft_probs=torch.zeros(b, k, vocab if not key.sampling.greedy else 0, dtype=torch.float32, device=dev),
        confidence=torch.ones(b, k, dtype=torch.float32, device=dev), verify_len=torch.zeros(b, **long),
        tokens_after=torch.zeros(b, w, **long), counts=torch.zeros(b, **long), round_index=torch.zeros(1, **long),
        records=records)
