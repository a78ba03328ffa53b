"""Chain speculative decoding of a batch of prompts: a drafter proposes, the frozen target verifies.

One round, for every unfinished request at once:

1. **Draft** ``K`` tokens after the anchor (DSpark/DFlash: one block pass, DSpark's Markov head samples
   left to right; Eagle3: a chain of ``K`` single-layer steps). The anchor is the last committed token, which
   the target has not processed yet.
2. **Choose** how many drafts each request verifies (``policies.py``), from the confidence head's per-step
   probabilities (STS-calibrated when temperatures are given) or, for drafters without a head, from the
   draft's own max probability (a proxy; 1 at T = 0).
3. **Verify** ``[anchor, d_1..d_n]`` in one target forward with the KV cache, accept a prefix by rejection
   sampling (greedy match at T = 0) and draw the correction/bonus token (``sampling.py``).
4. **Commit** the anchor, the accepted drafts and the new token; extend the draft context with the target
   features of the verified positions (Eagle3 pairs feature ``h_j`` with token ``x_{j+1}``); the new token
   becomes the next anchor.

Prefill processes the prompt *without its last token*, which is the first anchor: so every generated token,
the first one included, comes out of a verify step, and the first round already drafts.

Uneven requests share one HF KV cache of "slots" that is never cropped: each forward appends its new tokens
for every row, and a per-row validity mask says which slots hold committed tokens. Rejected drafts and
padding stay in the cache but are masked out through a 4-D attention mask passed to the target, and each
row's rotary positions are given explicitly (``position_ids``), so a row with holes in its slots computes
exactly what it would alone. When most slots are dead the cache is compacted (valid slots gathered to the
front), and finished requests are dropped from the batch. Targets with sliding-window layers are refused:
a custom mask would bypass their windows.

``static_shapes`` keeps the buffers fixed for a whole call instead (a preallocated slot cache, finished requests
frozen in the batch, a round's verify width one of ``gamma + 1`` values), and ``cuda_graphs`` replays the greedy
draft pass, and for each width the rest of the round (verify, accept, commit, append to the draft context), from
CUDA graphs captured on those buffers (``graphs.py``), so a policy that verifies fewer drafts still saves the
target's work. Both decode the same tokens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..drafters import Eagle3
from ..kernels.markov_sampling import markov_sampler
from ..targets import FrozenTarget
from .graphs import GraphedCall
from .policies import FixedLength
from .sampling import verify_chain
from .slot_cache import SlotKVCache

CONFIDENCE_EPS = 1e-7


@dataclass
class Rounds:
    """Per-request records of the verify rounds of one :meth:`SpeculativeEngine.generate` call.

    ``N`` records (one per request per round it took part in) and ``S`` batch steps.
    """

    request: Tensor  # [N] int64 index of the prompt
    step: Tensor  # [N] int64 batch step the record belongs to
    proposal_length: Tensor  # [N] int64 drafts offered for verification
    accepted: Tensor  # [N] int64 drafts the target accepted (before any stop-token cut)
    num_tokens: Tensor  # [N] int64 tokens the round produced: accepted drafts + correction/bonus, cut after a stop
    confidence_logits: Tensor  # [N, K] fp32 raw confidence-head logits of all K drafts (NaN without a head)
    draft_seconds: Tensor  # [S] float64 drafting time per step (propose + policy + context extension)
    verify_seconds: Tensor  # [S] float64 target forward + acceptance per step

    @property
    def gamma(self) -> int:
        return self.confidence_logits.shape[1]

    @classmethod
    def empty(cls, gamma: int) -> Rounds:
        z = torch.zeros(0, dtype=torch.long)
        return cls(z, z, z, z, z, torch.zeros(0, gamma), torch.zeros(0, dtype=torch.float64),
                   torch.zeros(0, dtype=torch.float64))

    @classmethod
    def cat(cls, parts: Sequence[Rounds]) -> Rounds:
        """Concatenate records (their ``step`` indices are offset to stay distinct)."""
        offset, steps = 0, []
        for p in parts:
            steps.append(p.step + offset)
            offset += p.draft_seconds.numel()
        return cls(torch.cat([p.request for p in parts]), torch.cat(steps),
                   torch.cat([p.proposal_length for p in parts]), torch.cat([p.accepted for p in parts]),
                   torch.cat([p.num_tokens for p in parts]), torch.cat([p.confidence_logits for p in parts]),
                   torch.cat([p.draft_seconds for p in parts]), torch.cat([p.verify_seconds for p in parts]))

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
    """Result of :meth:`SpeculativeEngine.generate`.

    Attributes:
        tokens: generated tokens per prompt (at most ``max_new_tokens``, ending at a stop token if one came).
        rounds: per-round records.
        prefill_seconds, seconds: prefill time and total wall time (prefill included).
    """

    tokens: list[list[int]]
    rounds: Rounds
    prefill_seconds: float = 0.0
    seconds: float = 0.0
    stopped: list[bool] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


def _attention_mask(old_valid: Tensor, new_valid: Tensor) -> Tensor:
    """[B, 1, Q, S+Q] bool: query i of a row sees that row's valid old slots and its valid new slots <= i.

    Every query also sees itself, so padding queries never attend to nothing (no NaN reaches the cache).
    """
    b, q = new_valid.shape
    s = old_valid.shape[1]
    causal = torch.ones(q, q, dtype=torch.bool, device=new_valid.device).tril()
    new = (causal[None] & new_valid[:, None, :]) | torch.eye(q, dtype=torch.bool, device=new_valid.device)[None]
    return torch.cat([old_valid[:, None, :].expand(b, q, s), new], dim=-1)[:, None]


def _slot_attention_mask(slot_valid: Tensor, new_valid: Tensor, slots: Tensor) -> Tensor:
    """:func:`_attention_mask` over a fixed slot buffer: ``slot_valid [B, C]`` (the committed slots), the new
    tokens written at ``slots [Q]`` (a device tensor, so a captured graph reads the round's slots); returns
    ``[B, 1, Q, C]``."""
    b, q = new_valid.shape
    mask = slot_valid[:, None, :].expand(b, q, slot_valid.shape[1]).clone()
    mask.index_copy_(2, slots, _attention_mask(slot_valid[:, :0], new_valid)[:, 0])
    return mask[:, None]


def _tokens_after(drafts: Tensor, accepted: Tensor, next_token: Tensor) -> Tensor:
    """``[B, Q + 1]``: the token following each verified slot: the draft after it, and at the first rejected
    slot (or after the last draft) the target's next token."""
    after = torch.cat([drafts, next_token[:, None]], dim=1)
    return after.scatter(1, accepted[:, None], next_token[:, None])


STATIC_CAPACITY_STEP = 256  # fixed-shape buffers are sized in multiples of this, so that similar calls share them


def _round_up(x: int, step: int) -> int:
    return -(-x // step) * step


@dataclass
class _StaticState:
    """Buffers of the fixed-shape mode, kept between calls of the same shapes (with the graphs captured on them)."""

    key: tuple[Any, ...]
    cache: SlotKVCache
    dcache: Any
    offsets: Tensor  # [k + 1]: 0 .. k
    slot_valid: Tensor  # [B, slots] bool: the committed slots of the target cache
    committed: Tensor  # [B] tokens the target has seen per row (the anchor's position)
    alive: Tensor  # [B] bool: rows still generating
    graphs: dict[str, GraphedCall] = field(default_factory=dict)  # "draft", "round/<width>"
    round_slots: dict[int, Tensor] = field(default_factory=dict)  # per verify width: a captured graph reads its address

    def slots_from(self, first: int, width: int) -> Tensor:
        """The slots a round of ``width`` verified tokens writes, ``first .. first + width - 1``, in that width's one
        buffer."""
        if width not in self.round_slots:
            self.round_slots[width] = torch.empty_like(self.offsets[:width])
        return torch.add(self.offsets[:width], first, out=self.round_slots[width])


class SpeculativeEngine:
    """Batched chain speculative decoding (see module docstring).

    Args:
        target: the frozen target; its ``layer_ids`` must be the drafter's ``target_layer_ids``.
        drafter: a :class:`~dspark_lightning.drafters.DSpark`, ``DFlash`` or ``Eagle3`` (weights loaded), or
            ``None`` to decode with the target alone through the same loop (one token per step).
        gamma: drafted tokens per round; default the drafter's ``block_size`` (Eagle3: ``ttt_length``). A
            block drafter cannot draft more than its ``block_size``.
        policy: verify-length policy (``policies.py``); default: verify every drafted token.
        sts_temperatures: per-position STS temperatures applied to the confidences the policy sees.
        compact_min_slots: compact the target KV cache when it has at least this many slots and at most
            half of them are valid.
        fused_markov: let a DSpark drafter with a vanilla Markov head sample its block through
            ``kernels.markov_sampling`` (one fused step per position, Triton on CUDA, Gumbel-max sampling);
            False keeps the drafter's own loop (``torch.multinomial``).
        static_shapes: decode with fixed shapes: the target's KV cache is preallocated for the whole generation
            (:class:`~.slot_cache.SlotKVCache`), a round verifies as many slots as the longest verify length in the
            batch plus the anchor (one of ``gamma + 1`` widths; rows verifying fewer are masked), finished requests
            stay in the batch as masked rows, and the draft context spans its whole capacity. Same tokens as the
            default mode; no allocation and no host read-back inside a pass. DSpark, DFlash or the target alone.
        cuda_graphs: ``static_shapes`` with a round captured as two CUDA graphs (:mod:`.graphs`) and replayed: the
            draft pass, then the verify pass, acceptance, the commit and the draft context's append (one graph per
            verify width met). Between them the host runs the policy and reads the width. Graphs are captured at
            the first greedy round that needs them and kept for later calls of the same batch size and capacities
            (buffers sized in steps of :data:`STATIC_CAPACITY_STEP` slots).
            Greedy decoding only (T = 0; sampling runs the same fixed shapes without graphs); the target on CUDA.
        compile_passes: ``static_shapes`` with the greedy draft pass and the rest of the round (verify, accept,
            commit, append) compiled by ``torch.compile``; with ``cuda_graphs`` the graphs capture the compiled
            passes. The first round of each shape pays the compile.
    """

    def __init__(self, target: FrozenTarget, drafter: nn.Module | None = None, *, gamma: int | None = None,
                 policy: Any = None, sts_temperatures: Sequence[float] | None = None,
                 compact_min_slots: int = 256, fused_markov: bool = True, static_shapes: bool = False,
                 cuda_graphs: bool = False, compile_passes: bool = False) -> None:
        layer_types = getattr(target.text_config, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(
                f"The speculative engine supports full-attention targets only; this one has layer_types "
                f"{sorted(set(layer_types))} (sliding windows would be bypassed by the engine's custom mask)."
            )
        self.target, self.drafter = target, drafter
        self.is_eagle3 = isinstance(drafter, Eagle3)
        if (static_shapes or cuda_graphs or compile_passes) and self.is_eagle3:
            raise ValueError("static_shapes supports DSpark, DFlash or the target alone; Eagle3 drafts through its own "
                             "growing cache. Use static_shapes=False for Eagle3.")
        if cuda_graphs and target.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs the target on a CUDA device, not {target.device}; "
                             "use static_shapes=True (or neither) elsewhere.")
        self.static_shapes = static_shapes or cuda_graphs or compile_passes
        self.cuda_graphs = cuda_graphs
        # Inductor fuses the passes' many small kernels (rotary, norms, masks, sampling, acceptance); the first greedy
        # round of a shape compiles them, a second width or batch size recompiles once with dynamic sizes.
        self._compiled_draft = torch.compile(self._draft) if compile_passes else None
        self._compiled_round = torch.compile(self._static_round) if compile_passes else None
        self._static: _StaticState | None = None
        if fused_markov and hasattr(drafter, "markov_sampler"):
            drafter.markov_sampler = markov_sampler  # DSpark's vanilla head samples through kernels/ (Triton on CUDA)
        if drafter is None:
            self.gamma = 0
        else:
            cfg = drafter.config
            if list(cfg.target_layer_ids) != list(target.layer_ids):
                raise ValueError(
                    f"The target captures layers {target.layer_ids} but the drafter reads target_layer_ids="
                    f"{cfg.target_layer_ids}; build the FrozenTarget with the drafter's target_layer_ids."
                )
            limit = None if self.is_eagle3 else cfg.block_size
            self.gamma = gamma or (cfg.ttt_length if self.is_eagle3 else cfg.block_size)
            if self.gamma < 1 or (limit is not None and self.gamma > limit):
                raise ValueError(f"gamma={self.gamma} must be in [1, {limit or 'inf'}] for this drafter "
                                 f"({cfg.algorithm}, block_size={cfg.block_size}).")
        self.policy = policy or FixedLength()
        self.sts = None if sts_temperatures is None else torch.tensor(list(sts_temperatures), dtype=torch.float32)
        self.compact_min_slots = compact_min_slots

    @property
    def device(self) -> torch.device:
        return self.target.device

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _calibrate(self, confidence: Tensor) -> Tensor:
        if self.sts is None:
            return confidence
        k = min(confidence.shape[1], self.sts.numel())
        temps = self.sts[:k].to(confidence.device)
        logits = torch.logit(confidence[:, :k].float().clamp(CONFIDENCE_EPS, 1 - CONFIDENCE_EPS))
        return torch.cat([torch.sigmoid(logits / temps), confidence[:, k:].float()], dim=1)

    # ------------------------------------------------------------------ drafter plumbing
    def _draft(self, dcache: Any, anchor: Tensor, temperature: float,
               generator: torch.Generator | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        b, k = anchor.shape[0], self.gamma
        if self.drafter is None:
            empty = torch.zeros(b, 0, dtype=torch.long, device=anchor.device)
            return empty, None, None
        if self.is_eagle3:
            prop = self.drafter.propose(dcache, temperature, generator, num_tokens=k)
        else:
            prop = self.drafter.propose(dcache, anchor, temperature, generator)
        conf = None if prop.confidence is None else prop.confidence[:, :k]
        return prop.tokens[:, :k], prop.probs[:, :k], conf

    def _extend(self, dcache: Any, hidden: Tensor, tokens_after: Tensor, counts: Tensor) -> None:
        if self.drafter is None:
            return
        if self.is_eagle3:
            self.drafter.extend_context(dcache, hidden, tokens_after, counts)
        else:
            self.drafter.extend_context(dcache, hidden, counts)

    @staticmethod
    def _select_drafter_rows(dcache: Any, idx: Tensor) -> None:
        if dcache is None:
            return
        dcache.keys = [k[idx] for k in dcache.keys]
        dcache.values = [v[idx] for v in dcache.values]
        dcache.lengths = dcache.lengths[idx]
        if hasattr(dcache, "last_hidden"):
            dcache.last_hidden = dcache.last_hidden[idx]

    @staticmethod
    def _cache_layers(cache: Any) -> list[Any]:
        return [] if cache is None else list(cache.layers)

    # ------------------------------------------------------------------ the loop
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int] | Tensor], *, max_new_tokens: int, temperature: float = 0.0,
                 stop_token_ids: Sequence[int] = (), generator: torch.Generator | None = None,
                 seed: int = 0) -> Generation:
        """Generate up to ``max_new_tokens`` per prompt.

        Args:
            prompts: token ids per request (at least one token each; lengths may differ).
            max_new_tokens: generation budget per request.
            temperature: sampling temperature (``0`` = greedy).
            stop_token_ids: a request ends after generating one of these.
            generator: random source (on the target's device); default one seeded with ``seed``.
            seed: seed of the default generator.

        Returns:
            The generated tokens and per-round records.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1.")
        dev = self.device
        rows_in = [torch.as_tensor(p, dtype=torch.long).flatten().tolist() for p in prompts]
        if not rows_in or any(len(p) == 0 for p in rows_in):
            raise ValueError("Every prompt needs at least one token.")
        if generator is None and temperature > 0:
            generator = torch.Generator(device=dev).manual_seed(seed)
        stops = set(int(t) for t in stop_token_ids)
        start_time = time.perf_counter()
        n, k = len(rows_in), self.gamma
        lengths = torch.tensor([len(p) for p in rows_in], device=dev)
        width = int(lengths.max())
        ids = torch.zeros(n, width, dtype=torch.long, device=dev)
        for i, p in enumerate(rows_in):
            ids[i, : len(p)] = torch.tensor(p, device=dev)
        all_rows = torch.arange(n, device=dev)

        # ---- prefill: the prompt without its last token (the first anchor)
        static = self.static_shapes
        committed = lengths - 1  # tokens the target has seen, = the anchor's position
        pre = width - 1
        slot_valid = torch.arange(pre, device=dev)[None, :] < committed[:, None]  # [B, S] (static: [B, capacity])
        anchor = ids[all_rows, committed]
        cache = None
        dcache = None
        if static:  # the call's state lives in the kept buffers, reset in place (captured graphs read them)
            state = self._static_state(n, pre, width, max_new_tokens, dev)
            cache, dcache = state.cache, state.dcache
            state.slot_valid.zero_()
            state.slot_valid[:, :pre] = slot_valid
            state.committed.copy_(committed)
            state.alive.fill_(True)
            slot_valid, committed, alive = state.slot_valid, state.committed, state.alive
            cache.write_at(torch.arange(pre, device=dev), 0)
        elif self.drafter is not None:
            dcache = self.drafter.new_cache(n, device=dev, capacity=max(64, width + 4 * (k + 1)))
        if pre > 0:
            mask = (_slot_attention_mask(slot_valid, slot_valid[:, :pre], torch.arange(pre, device=dev)) if static
                    else _attention_mask(slot_valid[:, :0], slot_valid))
            positions = torch.arange(pre, device=dev).expand(n, pre)
            out = self.target(ids[:, :pre], mask, past_key_values=cache, position_ids=positions, use_cache=True)
            cache = out.past_key_values
            self._extend(dcache, out.hidden, ids[:, 1:pre + 1], committed)
        start = pre  # static: the first free slot
        graphs = state.graphs if self.cuda_graphs and temperature <= 0 else None
        self._sync()
        prefill_seconds = time.perf_counter() - start_time

        outputs: list[list[int]] = [[] for _ in range(n)]
        stopped = [False] * n
        active = list(range(n))  # unfinished requests; their rows: the same (static) or 0 .. len(active) - 1
        # static: the unfinished rows as an index (what the policy and the records read; the mask is `alive`), None
        # while every row is unfinished (nothing to gather then)
        live: Tensor | None = None
        compiled = self._compiled_draft is not None and temperature <= 0  # the greedy passes compiled
        draft_fn = self._compiled_draft if compiled else self._draft
        round_fn = self._compiled_round if compiled else self._static_round
        records: list[tuple[Tensor, ...]] = []
        draft_times: list[float] = []
        verify_times: list[float] = []
        step = 0
        while active:
            b = len(active)
            self._sync()
            t0 = time.perf_counter()
            if graphs is not None and self.drafter is not None:
                if "draft" not in graphs:
                    graphs["draft"] = self._draft_graph(draft_fn, dcache, anchor)
                drafted = graphs["draft"](anchor)
                drafts, probs, conf_raw = drafted[0], drafted[1], drafted[2] if len(drafted) == 3 else None
            else:
                drafts, probs, conf_raw = draft_fn(dcache, anchor, temperature, generator)
            if conf_raw is not None:
                conf = self._calibrate(conf_raw)
            elif probs is not None:
                conf = probs.max(-1).values  # causal proxy: depends only on earlier drafts
            else:
                conf = None
            if not k:
                verify_len = torch.zeros(n if static else b, dtype=torch.long, device=dev)
            elif live is not None:  # static: the policy decides for the unfinished rows; finished rows verify nothing
                verify_len = torch.zeros(n, dtype=torch.long, device=dev)
                verify_len[live] = self.policy(None if conf is None else conf[live], k, b).clamp(0, k).to(dev)
            else:
                verify_len = self.policy(conf, k, b).clamp(0, k).to(dev)
            kmax = self._verify_width(verify_len) - 1
            self._sync()
            t1 = time.perf_counter()

            if static:  # verify, accept, commit and append on the kept buffers: one graph per width
                slots = state.slots_from(start, kmax + 1)
                cache.write_at(slots, start)
                if graphs is not None:
                    key = f"round/{kmax + 1}"
                    if key not in graphs:
                        graphs[key] = self._round_graph(round_fn, state, anchor, drafts, verify_len, slots)
                    accepted, next_token, after = graphs[key](anchor, drafts, verify_len)
                else:
                    accepted, next_token, after = round_fn(state, anchor, drafts, probs, verify_len, slots,
                                                           temperature, generator)
                start += kmax + 1
                self._sync()
                t2 = t3 = time.perf_counter()
            else:
                verify_ids = torch.cat([anchor[:, None], drafts[:, :kmax]], dim=1)  # [B, kmax+1]
                j = torch.arange(kmax + 1, device=dev)
                mask = _attention_mask(slot_valid, j[None, :] <= verify_len[:, None])
                out = self.target(verify_ids, mask, past_key_values=cache, position_ids=committed[:, None] + j,
                                  use_cache=True, compute_logits=True)
                cache = out.past_key_values
                accepted, next_token = verify_chain(drafts[:, :kmax], None if probs is None else probs[:, :kmax],
                                                    out.logits, verify_len, temperature, generator)
                self._sync()
                t2 = time.perf_counter()

                slot_valid = torch.cat([slot_valid, j[None, :] <= accepted[:, None]], dim=1)
                counts = accepted + 1
                committed = committed + counts
                after = _tokens_after(drafts[:, :kmax], accepted, next_token)
                self._extend(dcache, out.hidden, after, counts)
                self._sync()
                t3 = time.perf_counter()
            anchor = next_token
            draft_times.append((t1 - t0) + (t3 - t2))
            verify_times.append(t2 - t1)

            # ---- bookkeeping on the host
            if live is not None:  # static, some rows finished: the unfinished rows only
                verify_len, accepted, after = verify_len[live], accepted[live], after[live]
                conf_raw = None if conf_raw is None else conf_raw[live]
            acc_list = accepted.tolist()
            made = after.tolist()
            num_tokens = []
            finished = []
            for i, req in enumerate(active):
                new = made[i][: acc_list[i] + 1]
                cut = next((t for t, tok in enumerate(new) if tok in stops), None)
                if cut is not None:
                    new = new[: cut + 1]
                num_tokens.append(len(new))
                room = max_new_tokens - len(outputs[req])
                outputs[req].extend(new[:room])
                done = cut is not None and cut < room
                stopped[req] = done
                finished.append(done or len(outputs[req]) >= max_new_tokens)
            conf_logits = (torch.logit(conf_raw.float().clamp(CONFIDENCE_EPS, 1 - CONFIDENCE_EPS)).cpu()
                           if conf_raw is not None else torch.full((b, k), float("nan")))
            records.append((torch.tensor(active), torch.full((b,), step), verify_len.cpu(), accepted.cpu(),
                            torch.tensor(num_tokens), conf_logits))
            step += 1

            keep = [i for i, f in enumerate(finished) if not f]
            if len(keep) < b:
                active = [active[i] for i in keep]
                if static:  # finished rows stay in the batch, frozen and masked
                    live = torch.tensor(active, dtype=torch.long, device=dev)
                    alive.zero_().index_fill_(0, live, True)
                if not active or static:
                    continue
                idx = torch.tensor(keep, dtype=torch.long, device=dev)
                for layer in self._cache_layers(cache):
                    layer.keys, layer.values = layer.keys[idx], layer.values[idx]
                slot_valid, committed, anchor = slot_valid[idx], committed[idx], anchor[idx]
                self._select_drafter_rows(dcache, idx)
            if not static:
                slot_valid = self._maybe_compact(cache, slot_valid)

        self._sync()
        parts = list(zip(*records)) if records else None
        rounds = Rounds.empty(k) if parts is None else Rounds(
            *(torch.cat(p) for p in parts),
            torch.tensor(draft_times, dtype=torch.float64), torch.tensor(verify_times, dtype=torch.float64))
        return Generation(outputs, rounds, prefill_seconds, time.perf_counter() - start_time, stopped)

    def _static_state(self, n: int, pre: int, width: int, max_new_tokens: int, dev: torch.device) -> _StaticState:
        """The fixed-shape buffers (and graphs) for this call: those of the previous call when the batch size and
        the capacities (rounded up to :data:`STATIC_CAPACITY_STEP`) are the same, reset; new ones otherwise."""
        k = self.gamma
        # Every round appends k + 1 slots and commits at least one token of every unfinished request; a row's draft
        # context ends at most at its prompt + max_new_tokens + the last round's overshoot (k), and a static append
        # writes k + 1 entries after it.
        slots = _round_up(pre + (max_new_tokens + 1) * (k + 1), STATIC_CAPACITY_STEP)
        context = _round_up(width + max_new_tokens + 2 * (k + 1), STATIC_CAPACITY_STEP)
        key = (n, slots, context, dev)
        state = self._static
        if state is None or state.key != key:
            dcache = None
            if self.drafter is not None:
                dcache = self.drafter.new_cache(n, device=dev, capacity=context)
                dcache.static = True
            state = self._static = _StaticState(
                key, SlotKVCache(slots), dcache, torch.arange(k + 1, device=dev),
                slot_valid=torch.zeros(n, slots, dtype=torch.bool, device=dev),
                committed=torch.zeros(n, dtype=torch.long, device=dev),
                alive=torch.ones(n, dtype=torch.bool, device=dev))
        elif state.dcache is not None:
            state.dcache.lengths.zero_()  # in place: a captured draft graph reads this tensor
        return state

    def _verify_width(self, verify_len: Tensor) -> int:
        """Tokens a round verifies per row: the anchor plus the longest verify length. Known on the host for a
        fixed-length policy; read back from ``verify_len`` otherwise (once per round, before the verify pass)."""
        if not self.gamma:
            return 1
        if isinstance(self.policy, FixedLength):
            return 1 + self.policy.verify_length(self.gamma)
        return 1 + int(verify_len.max())

    def _draft_graph(self, draft_fn: Any, dcache: Any, anchor: Tensor) -> GraphedCall:
        """``draft_fn`` (:meth:`_draft` or its compiled form), greedy, as a CUDA graph over the fixed-shape draft
        context (it reads, never writes it)."""
        def draft(anchor_ids: Tensor) -> tuple[Tensor, ...]:
            tokens, probs, conf = draft_fn(dcache, anchor_ids, 0.0, None)
            return (tokens, probs) if conf is None else (tokens, probs, conf)

        return GraphedCall(draft, anchor)

    def _static_round(self, state: _StaticState, anchor: Tensor, drafts: Tensor, probs: Tensor | None,
                      verify_len: Tensor, slots: Tensor, temperature: float,
                      generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
        """A fixed-shape round after the draft, on the device only: the verify pass of ``slots.numel()`` tokens per
        row written at ``slots``, acceptance, the commit (slot validity, positions) and the draft context's append,
        in place on ``state``. A finished row commits nothing: its slots stay invalid, its position and context
        frozen. Returns ``accepted``, ``next_token`` and the token following each verified slot."""
        w = slots.numel()
        j = state.offsets[:w]
        mask = _slot_attention_mask(state.slot_valid, j[None, :] <= verify_len[:, None], slots)
        out = self.target(torch.cat([anchor[:, None], drafts[:, :w - 1]], dim=1), mask, past_key_values=state.cache,
                          position_ids=state.committed[:, None] + j, use_cache=True, compute_logits=True)
        accepted, next_token = verify_chain(drafts[:, :w - 1], None if probs is None else probs[:, :w - 1],
                                            out.logits, verify_len, temperature, generator)
        state.slot_valid.index_copy_(1, slots, (j[None, :] <= accepted[:, None]) & state.alive[:, None])
        counts = (accepted + 1) * state.alive
        state.committed.add_(counts)
        after = _tokens_after(drafts[:, :w - 1], accepted, next_token)
        self._extend(state.dcache, out.hidden, after, counts)
        return accepted, next_token, after

    def _round_graph(self, round_fn: Any, state: _StaticState, anchor: Tensor, drafts: Tensor, verify_len: Tensor,
                     slots: Tensor) -> GraphedCall:
        """``round_fn`` (:meth:`_static_round` or its compiled form), greedy, for one width as a CUDA graph, captured
        on this round's inputs. Its warm-up writes this round's slots (target cache, slot validity, draft context),
        which the replay overwrites; the positions and context lengths it advances are put back after each warm-up
        run."""
        def round_(anchor: Tensor, drafts: Tensor, verify_len: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            return round_fn(state, anchor, drafts, None, verify_len, slots, 0.0, None)

        counters = [state.committed] + ([state.dcache.lengths] if state.dcache is not None else [])
        saved = [c.clone() for c in counters]

        def reset() -> None:
            for counter, value in zip(counters, saved):
                counter.copy_(value)

        return GraphedCall(round_, anchor, drafts, verify_len, reset=reset)

    def _maybe_compact(self, cache: Any, slot_valid: Tensor) -> Tensor:
        """Gather each row's valid slots to the front when at most half of the slots are valid."""
        s = slot_valid.shape[1]
        counts = slot_valid.sum(1)
        keep = int(counts.max()) if counts.numel() else 0
        if s < self.compact_min_slots or keep > s // 2:
            return slot_valid
        order = torch.sort((~slot_valid).int(), dim=1, stable=True).indices[:, :keep]  # valid slots first, in order
        for layer in self._cache_layers(cache):
            idx = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            layer.keys, layer.values = layer.keys.gather(2, idx), layer.values.gather(2, idx)
        return torch.arange(keep, device=slot_valid.device)[None, :] < counts[:, None]
