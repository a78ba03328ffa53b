"""SPS(B): target forward steps per second as a function of the tokens verified in one step.

The hardware-aware prefix scheduler (``policies.PrefixScheduler``, DSpark paper Algorithm 1) trades expected
accepted tokens against the cost of verifying them; that cost comes from this table, measured on the device
that serves. ``profile-sps`` measures it for the engine's own verify forward (``engine.SpeculativeEngine``):
``requests`` rows, each with a KV cache of ``context_length`` tokens, verifying ``ceil(B / requests)`` tokens.
With ``cuda_graphs`` the forward is replayed from a CUDA graph over a preallocated slot cache, as the engine's
``cuda_graphs`` mode runs it; a table for that mode must be measured that way (launching kernels one by one
costs the same at every B on a small target, so the eager table is flat where the graphed one is not).

JSON written (``format``) and read (any of them):

- ``dspark_lightning`` (default): ``{"num_tokens": [B...], "steps_per_second": [SPS...], "requests": R,
  "context_length": L, "cuda_graphs": bool, "device": "...", "dtype": "...", "target": {...}}``;
- ``sglang``: the same measurements as SGLang 0.5.23's ``SpsCostTable`` holds them, the file
  ``--speculative-dspark-sps-table-path`` reads (``srt/speculative/dspark_components/dspark_sps.py``):
  ``{"sample_batch_tokens": [B...], "sample_steps_per_sec": [SPS...], "max_batch_tokens": max B}`` plus the same
  metadata keys, which SGLang's decoder ignores. Both count B as the tokens verified in one step over the whole
  batch (SGLang: requests + scheduled draft tokens); SGLang reads the table as a step function (the largest probe
  at or below B), this module interpolates step time;
- a plain ``{"B": SPS}`` mapping (read only).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ..targets import FrozenTarget, TargetConfig
from .graphs import GraphedCall
from .slot_cache import SlotKVCache

SPS_FORMATS = ("dspark_lightning", "sglang")


def isotonic_fit(values: Sequence[float]) -> list[float]:
    """The non-decreasing sequence closest to ``values`` in squared error (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, n1), (m2, n2) = blocks[-2], blocks.pop()
            blocks[-1] = [(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2]
    return [m for m, n in blocks for _ in range(int(n))]


@dataclass
class SpsTable:
    """Measured steps/s at some token counts; other counts interpolate linearly in *step time*.

    Step time is made non-decreasing in the token count by its least-squares isotonic fit (pool adjacent
    violators): verifying more tokens never makes a step faster, and a noisy bump in a profile would otherwise
    stop the scheduler's greedy scan early. The fit averages a bump with its neighbours instead of carrying it
    forward, as a running max would: on the H200 a profile taken beside other jobs read 38 ms at B = 2 between
    25 ms at B = 1 and B = 3, and a running max made every B >= 2 cost 53 % more than B = 1. Below the first
    entry the first step time is used; beyond the last, step time grows along the last segment.

    Args:
        num_tokens: strictly increasing token counts.
        steps_per_second: measured steps/s at each count (> 0).
    """

    num_tokens: list[int]
    steps_per_second: list[float]

    def __post_init__(self) -> None:
        if not self.num_tokens or len(self.num_tokens) != len(self.steps_per_second):
            raise ValueError(
                f"An SPS table needs as many num_tokens as steps_per_second (>= 1); got {len(self.num_tokens)} "
                f"and {len(self.steps_per_second)}."
            )
        if any(b <= a for a, b in zip(self.num_tokens, self.num_tokens[1:])) or self.num_tokens[0] < 1:
            raise ValueError(f"num_tokens={self.num_tokens} must be positive and strictly increasing.")
        if any(not s > 0 for s in self.steps_per_second):
            raise ValueError(f"steps_per_second={self.steps_per_second} must all be > 0.")
        times = torch.tensor(isotonic_fit([1.0 / s for s in self.steps_per_second]), dtype=torch.float64)
        self._tokens = torch.tensor(self.num_tokens, dtype=torch.float64)
        self._times = times
        self._ranges: dict[tuple[int, int, str], Tensor] = {}

    @classmethod
    def flat(cls, steps_per_second: float = 1.0) -> SpsTable:
        """A table where a step costs the same whatever it verifies (the scheduler then verifies everything)."""
        return cls([1], [steps_per_second])

    @classmethod
    def load(cls, path: str | Path) -> SpsTable:
        """Read a ``profile-sps`` JSON file of either format, or a ``{"B": SPS}`` mapping (module docstring)."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpsTable:
        """The table of a parsed SPS JSON object: our format, SGLang's ``SpsCostTable``, or ``{"B": SPS}``."""
        if "num_tokens" in data:
            tokens, sps = data["num_tokens"], data["steps_per_second"]
        elif "sample_batch_tokens" in data:
            tokens, sps = data["sample_batch_tokens"], data["sample_steps_per_sec"]
        elif "bias_seconds" in data:
            raise ValueError("This is SGLang's additive SPS cost model (bias_seconds, alpha/theta probes), not a "
                             "steps-per-second table; give a table of measured steps/s (profile-sps).")
        else:
            items = sorted((int(b), float(s)) for b, s in data.items())
            tokens, sps = [b for b, _ in items], [s for _, s in items]
        return cls([int(b) for b in tokens], [float(s) for s in sps])

    def step_time(self, tokens: Tensor) -> Tensor:
        """Seconds per step for ``tokens`` (any shape) verified in one step; float64."""
        x = tokens.to(torch.float64)
        xs, ts = self._tokens.to(x.device), self._times.to(x.device)
        if xs.numel() == 1:
            return ts[0].expand_as(x).clone()
        i = torch.searchsorted(xs, x.contiguous()).clamp(1, xs.numel() - 1)
        x0, x1, t0, t1 = xs[i - 1], xs[i], ts[i - 1], ts[i]
        t = t0 + (x - x0) * (t1 - t0) / (x1 - x0)
        return torch.where(x <= xs[0], ts[0], t)

    def __call__(self, tokens: Tensor) -> Tensor:
        """Steps per second for ``tokens`` verified in one step; float64."""
        return 1.0 / self.step_time(tokens)

    def arange(self, start: int, stop: int, device: torch.device | str = "cpu") -> Tensor:
        """Steps per second for every token count in ``[start, stop)`` (cached: the scheduler asks each step)."""
        key = (start, stop, str(device))
        if key not in self._ranges:
            if len(self._ranges) > 64:
                self._ranges.clear()
            self._ranges[key] = self(torch.arange(start, stop, dtype=torch.float64, device=device))
        return self._ranges[key]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_sps(
    target: TargetConfig,
    output: str,
    num_tokens: list[int] | None = None,
    requests: int = 32,
    context_length: int = 512,
    warmup: int = 2,
    iters: int = 10,
    device: str | None = None,
    cuda_graphs: bool = False,
    format: Literal["dspark_lightning", "sglang"] = "dspark_lightning",
    model: FrozenTarget | None = None,
) -> dict[str, Any]:
    """Profile SPS(B), the target's verify steps per second, on this device and write it as JSON.

    Each measurement is one forward of the frozen target exactly as the speculative engine runs it: ``R =
    min(requests, B)`` rows with ``context_length`` tokens already in the KV cache, ``ceil(B / R)`` new tokens
    per row, a custom attention mask, logits for every new token.

    Args:
        target: the target to profile (``--target.path``, ``--target.gguf_file``, ``--target.dtype``...).
        output: JSON file to write (read by ``PrefixScheduler`` / ``--sps_table``).
        num_tokens: verify-token counts B to measure; default ``requests * [1, 2, ..., 8]`` (gamma = 7 plus the
            anchor for every request).
        requests: concurrent requests the table is for.
        context_length: tokens already cached per request.
        warmup: untimed forwards per count.
        iters: timed forwards per count (the median is kept).
        device: ``cuda``, ``cpu``...; default CUDA when available.
        cuda_graphs: time the forward replayed from a CUDA graph (the engine's ``cuda_graphs`` mode); CUDA only.
        format: ``dspark_lightning`` (``num_tokens`` / ``steps_per_second``) or ``sglang`` (SGLang's
            ``SpsCostTable`` fields, for ``--speculative-dspark-sps-table-path``); :meth:`SpsTable.load` reads both.
        model: the target already loaded on ``device`` (saves loading it again), else loaded from ``target``.

    Returns:
        The written table as a dict.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    counts = sorted(set(num_tokens or [requests * q for q in range(1, 9)]))
    if not counts or counts[0] < 1:
        raise ValueError(f"num_tokens={num_tokens} must be positive integers.")
    if format not in SPS_FORMATS:
        raise ValueError(f"format={format!r} is unknown; choose one of {SPS_FORMATS}.")
    if cuda_graphs and dev.type != "cuda":
        raise ValueError(f"cuda_graphs=True profiles CUDA graphs; the device is {dev}. Use a CUDA device or "
                         "cuda_graphs=False.")
    model = model if model is not None else FrozenTarget.from_config(target, [0], device=dev)
    vocab = model.vocab_size
    g = torch.Generator().manual_seed(0)
    sps: list[float] = []
    for count in counts:
        rows = min(requests, count)
        per_row = math.ceil(count / rows)
        context = torch.randint(0, vocab, (rows, context_length), generator=g).to(dev)
        new = torch.randint(0, vocab, (rows, per_row), generator=g).to(dev)
        step = (_graphed_verify if cuda_graphs else _eager_verify)(model, context, new)
        times = []
        for it in range(warmup + iters):
            _synchronize(dev)
            start = time.perf_counter()
            step()
            _synchronize(dev)
            if it >= warmup:
                times.append(time.perf_counter() - start)
        times.sort()
        sps.append(1.0 / times[len(times) // 2])
        print(f"B={count:5d} ({rows} x {per_row}): {sps[-1]:9.2f} steps/s", flush=True)
    table = {
        **table_fields(counts, sps, format),
        "requests": requests,
        "context_length": context_length,
        "cuda_graphs": cuda_graphs,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev),
        "dtype": target.dtype,
        "target": target.identity(),
    }
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=2))
    print(f"SPS table written to {path}")
    return table


def table_fields(num_tokens: list[int], steps_per_second: list[float], format: str) -> dict[str, Any]:
    """The measurement keys of an SPS JSON file in ``format`` (module docstring)."""
    if format == "sglang":
        return {"sample_batch_tokens": num_tokens, "sample_steps_per_sec": steps_per_second,
                "max_batch_tokens": max(num_tokens)}
    return {"num_tokens": num_tokens, "steps_per_second": steps_per_second}


def _verify_mask(rows: int, context_length: int, per_row: int, device: torch.device) -> Tensor:
    """``[rows, 1, per_row, context_length + per_row]``: the whole context, causal among the new tokens."""
    mask = torch.ones(rows, 1, per_row, context_length + per_row, dtype=torch.bool, device=device)
    mask[..., context_length:] = torch.ones(per_row, per_row, dtype=torch.bool, device=device).tril()
    return mask


def _eager_verify(model: FrozenTarget, context: Tensor, new: Tensor) -> Callable[[], Any]:
    """One verify forward of ``new`` after ``context`` in HF's dynamic cache (cropped back after every call)."""
    (rows, ctx), per_row = context.shape, new.shape[1]
    cache = model(context, use_cache=True).past_key_values
    mask = _verify_mask(rows, ctx, per_row, new.device)
    positions = (ctx + torch.arange(per_row, device=new.device)).expand(rows, per_row)

    def step() -> None:
        model(new, mask, past_key_values=cache, position_ids=positions, use_cache=True, compute_logits=True)
        cache.crop(-per_row)

    return step


def _graphed_verify(model: FrozenTarget, context: Tensor, new: Tensor) -> Callable[[], Any]:
    """The same forward over a slot cache of ``context + new`` slots, captured once and replayed."""
    (rows, ctx), per_row = context.shape, new.shape[1]
    dev = new.device
    cache = SlotKVCache(ctx + per_row)
    cache.write_at(torch.arange(ctx, device=dev), 0)
    prefill = _verify_mask(rows, 0, ctx, dev)  # causal over the context ...
    prefill = torch.cat([prefill, prefill.new_zeros(rows, 1, ctx, per_row)], dim=-1)  # ... blind to the new slots
    model(context, prefill, past_key_values=cache, position_ids=torch.arange(ctx, device=dev).expand(rows, ctx),
          use_cache=True)
    cache.write_at(ctx + torch.arange(per_row, device=dev), ctx)
    mask = _verify_mask(rows, ctx, per_row, dev)
    positions = (ctx + torch.arange(per_row, device=dev)).expand(rows, per_row)

    def verify(ids: Tensor, mask: Tensor, positions: Tensor) -> tuple[Tensor]:
        out = model(ids, mask, past_key_values=cache, position_ids=positions, use_cache=True, compute_logits=True)
        return (out.logits,)

    graph = GraphedCall(verify, new, mask, positions)
    return lambda: graph(new, mask, positions)


def as_sps_table(value: SpsTable | str | Path | dict | Sequence | None) -> SpsTable | None:
    """Accept a table, a JSON path, or an in-memory mapping."""
    if value is None or isinstance(value, SpsTable):
        return value
    if isinstance(value, (str, Path)):
        return SpsTable.load(value)
    if isinstance(value, dict):
        return SpsTable.from_dict(value)
    raise TypeError(f"Cannot read an SPS table from {type(value).__name__}; give a JSON path or a dict.")
