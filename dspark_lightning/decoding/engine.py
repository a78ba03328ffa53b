"""Chain speculative decoding of a batch of prompts: a drafter proposes, the frozen target verifies.

One round, for every unfinished request at once (:meth:`SpeculativeEngine._round`):

1. **Draft** ``K`` tokens after the anchor through the drafter's ``propose`` (``drafters/protocol.py``; DSpark/DFlash:
   one block pass, DSpark's Markov head samples left to right; Eagle3: a chain of single-layer steps). The anchor is
   the last committed token, which the target has not processed yet.
2. **Choose** how many drafts each request verifies (``policies.py``), from the confidence head's per-step
   probabilities (STS-calibrated when temperatures are given) or, for drafters without a head, from the draft's own
   max probability (a proxy; 1 at T = 0).
3. **Verify** ``[anchor, d_1..d_n]`` in one target forward, accept a prefix by rejection sampling (greedy match at
   T = 0) and draw the correction/bonus token (``sampling.py``).
4. **Commit** the anchor, the accepted drafts and the new token; cut at a stop token or the budget; extend the
   draft context with the target features of the verified positions; the new token becomes the next anchor.

Prefill processes the prompt *without its last token*, which is the first anchor: so every generated token, the
first one included, comes out of a verify step, and the first round already drafts.

Everything lives in fixed-shape buffers on the device (:mod:`.state`): the target's KV cache holds each row's tokens
at their positions (a round's rejected drafts are overwritten by the next round's tokens, so the cache stays a
prefix per row and its mask is causal with a per-row offset; sliding-window layers get that mask with their window),
finished rows stay in the batch, frozen and masked, and the outputs and the per-round records are written on the
device. A round reads nothing back to the host: the host only learns, one round late, whether any row is still
running (so at most one round runs after the last row finished, on frozen rows). Two ways to run a round:

* **fused** (when the policy's verify length is known before the call: :class:`FixedLength`, the default, or a
  prefix scheduler whose SPS table is flat at this batch size): steps 1-4 are one pass; with ``cuda_graphs`` one CUDA
  graph, replayed back to back while the host waits on the previous round's flag.
* **split** (otherwise, or ``time_phases=True``): the draft pass, then the host runs the policy and reads the verify
  width (``1 +`` the longest verify length), then the verify pass of that width (one graph per width), so a policy
  that verifies fewer drafts saves the target's work; with ``time_phases`` draft and verify are timed apart.

``compile_passes`` runs the passes through ``torch.compile`` (their small ops fused); with ``cuda_graphs`` the graphs
capture the compiled code. Every mode decodes the same tokens, at T > 0 too (the randomness is counter-based).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..kernels.markov_sampling import markov_sampler
from ..targets import FrozenTarget
from .graphs import CapturedStep
from .policies import FixedLength
from .records import Generation, Rounds
from .sampling import EngineSampler, Sampling, verify_chain
from .state import DecodeState, allocate_state, state_key

CONFIDENCE_EPS = 1e-7

__all__ = ["Generation", "Rounds", "SpeculativeEngine"]


class SpeculativeEngine:
    """Batched chain speculative decoding (see module docstring).

    Args:
        target: the frozen target; its ``layer_ids`` must be the drafter's ``target_layer_ids``.
        drafter: any drafter of ``drafters/protocol.py`` (weights loaded), or ``None`` to decode with the target
            alone through the same loop (one token per step).
        gamma: drafted tokens per round; default the drafter's ``gamma``. A block drafter cannot draft more than its
            ``block_size``.
        policy: verify-length policy (``policies.py``); default: verify every drafted token.
        sts_temperatures: per-position STS temperatures applied to the confidences the policy sees.
        fused_markov: let a DSpark drafter with a vanilla Markov head draft greedily through
            ``kernels.markov_sampling`` (one fused step per position, Triton on CUDA).
        cuda_graphs: capture rounds as CUDA graphs and replay them (the target on CUDA). Graphs are captured at the
            first round that needs them and kept for later calls of the same batch size, capacities (rounded up to
            :data:`~.state.CAPACITY_STEP`), sampling settings and stop tokens.
        compile_passes: run the passes through ``torch.compile``; the first round of each shape pays the compile.
        time_phases: run split rounds (draft, then verify) with a host synchronisation between them, so that
            ``Rounds.draft_seconds`` / ``verify_seconds`` are measured apart (otherwise NaN in fused rounds).
    """

    def __init__(self, target: FrozenTarget, drafter: nn.Module | None = None, *, gamma: int | None = None,
                 policy: Any = None, sts_temperatures: Sequence[float] | None = None, fused_markov: bool = True,
                 cuda_graphs: bool = False, compile_passes: bool = False, time_phases: bool = False) -> None:
        if cuda_graphs and target.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs the target on a CUDA device, not {target.device}; use "
                             "cuda_graphs=False elsewhere.")
        self.target, self.drafter = target, drafter
        self.cuda_graphs, self.time_phases = cuda_graphs, time_phases
        self.gamma = 0 if drafter is None else self._check_drafter(drafter, gamma)
        self.policy = policy or FixedLength()
        self.sts = None if sts_temperatures is None else torch.tensor(list(sts_temperatures), dtype=torch.float32)
        if fused_markov and hasattr(drafter, "markov_sampler"):
            drafter.markov_sampler = markov_sampler  # DSpark's vanilla head drafts greedily through kernels/
        # Inductor fuses the passes' many small kernels (rotary, norms, masks, sampling, acceptance).
        wrap = torch.compile if compile_passes else (lambda fn: fn)
        self._fused_round, self._draft_pass = wrap(self._round), wrap(self._draft)
        self._verify_pass = wrap(self._verify)
        self.compile_passes = compile_passes
        self._state: DecodeState | None = None

    def _check_drafter(self, drafter: nn.Module, gamma: int | None) -> int:
        cfg = drafter.config
        if list(cfg.target_layer_ids) != list(self.target.layer_ids):
            raise ValueError(
                f"The target captures layers {self.target.layer_ids} but the drafter reads target_layer_ids="
                f"{cfg.target_layer_ids}; build the FrozenTarget with the drafter's target_layer_ids."
            )
        limit = drafter.max_draft_tokens
        gamma = gamma or drafter.gamma
        if gamma < 1 or (limit is not None and gamma > limit):
            raise ValueError(f"gamma={gamma} must be in [1, {limit or 'inf'}] for this drafter "
                             f"({cfg.algorithm}, block_size={cfg.block_size}).")
        return gamma

    @property
    def device(self) -> torch.device:
        return self.target.device

    def fused_width(self, batch: int) -> int | None:
        """The verify width of fused rounds for ``batch`` requests (one pass, no host read-back), or None when rounds
        run split (the policy decides from each round's confidences, or ``time_phases``)."""
        if self.time_phases:
            return None
        if not self.gamma:
            return 1
        length = self.policy.fixed_length(batch, self.gamma)
        return None if length is None else 1 + length

    # ------------------------------------------------------------------ the passes (device only, no host read-back)
    def _calibrate(self, confidence: Tensor) -> Tensor:
        if self.sts is None:
            return confidence
        k = min(confidence.shape[1], self.sts.numel())
        temps = self.sts[:k].to(confidence.device)
        logits = torch.logit(confidence[:, :k].float().clamp(CONFIDENCE_EPS, 1 - CONFIDENCE_EPS))
        return torch.cat([torch.sigmoid(logits / temps), confidence[:, k:].float()], dim=1)

    def _draft(self, st: DecodeState) -> None:
        """Step 1: the round's drafts, their distributions and confidences, into ``st``."""
        if not self.gamma:
            return
        sampler = EngineSampler(st.sampling, st.rng, st.committed)
        prop = self.drafter.propose(st.dcache, st.anchor, sampler, self.gamma)
        st.drafts.copy_(prop.tokens[:, :self.gamma])
        if prop.probs is not None:
            st.draft_probs.copy_(prop.probs[:, :self.gamma])
        if prop.confidence is not None:
            st.confidence.copy_(prop.confidence[:, :self.gamma])
        elif prop.probs is not None:  # causal proxy: depends only on earlier drafts
            st.confidence.copy_(st.draft_probs.max(-1).values)
        else:  # greedy drafts: the proxy is the one-hot's maximum
            st.confidence.fill_(1.0)

    def _verify(self, st: DecodeState, width: int) -> None:
        """Steps 3-4 for verify width ``width`` (the anchor + ``width - 1`` drafts), on ``st`` in place."""
        k = width - 1
        positions = st.committed[:, None] + st.offsets[:width]  # [B, W]: slot = position
        st.cache.write_at(positions)
        ids = torch.cat([st.anchor[:, None], st.drafts[:, :k]], dim=1)
        out = self.target(ids, st.attention_mask(positions), past_key_values=st.cache, position_ids=positions,
                          use_cache=True, compute_logits=True)
        verify_len = st.verify_len.clamp(max=k)
        accepted, next_token = verify_chain(st.drafts[:, :k], st.draft_probs[:, :k] if k else None, out.logits,
                                            verify_len, st.sampling, st.rng, st.committed)
        st.commit(accepted, next_token, st.drafts[:, :k], verify_len)
        if self.drafter is not None:
            self.drafter.extend_context(st.dcache, out.hidden, st.tokens_after[:, :width], st.counts)

    def _round(self, st: DecodeState, width: int) -> None:
        """A fused round (a verify length known ahead): draft, verify, commit."""
        self._draft(st)
        self._verify(st, width)

    # ------------------------------------------------------------------ the loop
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int] | Tensor], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, stop_token_ids: Sequence[int] = (),
                 generator: torch.Generator | None = None, seed: int = 0) -> Generation:
        """Generate up to ``max_new_tokens`` per prompt.

        Args:
            prompts: token ids per request (at least one token each; lengths may differ).
            max_new_tokens: generation budget per request.
            temperature: sampling temperature (``0`` = greedy); ``top_p`` / ``top_k`` filter the tempered
                distribution (:class:`~.sampling.Sampling`), which the output then follows exactly.
            stop_token_ids: a request ends after generating one of these.
            generator: if given, the seed is drawn from it (so repeated calls draw fresh samples); else ``seed``.
            seed: seed of the counter-based randomness (:class:`~.sampling.CounterRNG`).

        Returns:
            The generated tokens and per-round records.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1.")
        rows = [torch.as_tensor(p, dtype=torch.long).flatten().tolist() for p in prompts]
        if not rows or any(len(p) == 0 for p in rows):
            raise ValueError("Every prompt needs at least one token.")
        sampling = Sampling(float(temperature), float(top_p), int(top_k))
        if generator is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        start_time = time.perf_counter()
        st = self._prepare(rows, max_new_tokens, sampling, [int(t) for t in stop_token_ids], seed)
        self._prefill(st, rows)
        self._sync()
        prefill_seconds = time.perf_counter() - start_time
        width = self.fused_width(len(rows))
        timing = self._run_split(st) if width is None else self._run_fused(st, width)
        self._sync()
        tokens, stopped, rounds = st.collect(len(rows), *timing)
        return Generation(tokens, rounds, prefill_seconds, time.perf_counter() - start_time, stopped)

    def _prepare(self, rows: list[list[int]], max_new_tokens: int, sampling: Sampling, stops: list[int],
                 seed: int) -> DecodeState:
        """The call's state: the kept buffers (and graphs) when the shapes and settings match, else new ones."""
        key = state_key(len(rows), max(len(p) for p in rows), max_new_tokens, self.gamma, sampling, stops,
                        self.device)
        if self._state is None or self._state.key != key:
            self._state = None  # free the old buffers first
            self._state = allocate_state(key, self.target, self.drafter)
        self._state.reset(rows, max_new_tokens, seed, stops)
        return self._state

    def _prefill(self, st: DecodeState, rows: list[list[int]]) -> None:
        """The prompts without their last token through the target; the draft context gets their features."""
        pre = st.prompt_ids.shape[1] - 1
        if pre == 0:
            return
        positions = st.offsets[:pre].expand(st.batch, pre)
        st.cache.write_at(positions)
        out = self.target(st.prompt_ids[:, :pre], st.attention_mask(positions), past_key_values=st.cache,
                          position_ids=positions, use_cache=True)
        if self.drafter is not None:
            self.drafter.extend_context(st.dcache, out.hidden, st.prompt_ids[:, 1:pre + 1], st.committed.clone())

    def _run_fused(self, st: DecodeState, width: int) -> tuple[list[float], list[float], list[float]]:
        """Fused rounds until no row runs; the host checks the previous round's flag after queuing the next."""
        st.verify_len.fill_(width - 1)
        fused = lambda s: self._fused_round(s, width)
        call = self._graph(st, f"round/{width}", fused) if self.cuda_graphs else fused
        timer = _RoundTimer(self.device)
        previous = None
        for _ in range(st.max_rounds):
            call(st)
            flag = st.any_alive()
            timer.mark()
            if previous is not None and not previous.item():
                break
            previous = flag
            if self.device.type != "cuda" and not flag.item():
                break
        seconds = timer.seconds()
        nan = [float("nan")] * len(seconds)
        return nan, nan, seconds

    def _run_split(self, st: DecodeState) -> tuple[list[float], list[float], list[float]]:
        """Split rounds: draft, policy on the host, verify at the width the policy asks for."""
        draft_times, verify_times = [], []
        draft = self._graph(st, "draft", self._draft_pass) if self.cuda_graphs else self._draft_pass
        for _ in range(st.max_rounds):
            live = st.alive.nonzero().squeeze(1)  # a read-back: the unfinished rows
            if live.numel() == 0:
                break
            self._sync(self.time_phases)
            t0 = time.perf_counter()
            draft(st)
            st.verify_len.zero_()
            if self.gamma:
                conf = self._calibrate(st.confidence)[live]
                st.verify_len[live] = self.policy(conf, self.gamma, live.numel()).clamp(0, self.gamma).to(self.device)
            width = self._verify_width(st)  # a read-back unless the policy is fixed
            self._sync(self.time_phases)
            t1 = time.perf_counter()
            if self.cuda_graphs:
                self._graph(st, f"verify/{width}", lambda s, w=width: self._verify_pass(s, w))(st)
            else:
                self._verify_pass(st, width)
            self._sync(self.time_phases)
            draft_times.append(t1 - t0)
            verify_times.append(time.perf_counter() - t1)
        return draft_times, verify_times, [a + b for a, b in zip(draft_times, verify_times)]

    def _verify_width(self, st: DecodeState) -> int:
        """Tokens a split round verifies per row: the anchor plus the longest verify length (known on the host for a
        fixed policy, else read back once per round, before the verify pass)."""
        if not self.gamma:
            return 1
        if isinstance(self.policy, FixedLength):
            return 1 + self.policy.verify_length(self.gamma)
        return 1 + int(st.verify_len.max())

    def _graph(self, st: DecodeState, name: str, fn: Any) -> Any:
        """``fn(st)`` as a CUDA graph on ``st``'s buffers, captured on first use. The capture's warm-up runs execute
        ``fn`` for real; the state's counters are put back after each (what the graph writes beyond them is
        overwritten by the replay)."""
        if name not in st.graphs:
            if st.pool is None and self.device.type == "cuda":
                st.pool = torch.cuda.graph_pool_handle()
            saved = st.snapshot()
            st.graphs[name] = CapturedStep(lambda: fn(st), self.device, reset=lambda: st.restore(saved), pool=st.pool)
        graph = st.graphs[name]
        return lambda _: graph()

    def _sync(self, wanted: bool = True) -> None:
        if wanted and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class _RoundTimer:
    """Per-round wall time without synchronising: CUDA events between rounds (host clock on the CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = [self._now()]

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def mark(self) -> None:
        self.marks.append(self._now())

    def seconds(self) -> list[float]:
        if not self.cuda:
            return [b - a for a, b in zip(self.marks, self.marks[1:])]
        self.marks[-1].synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
