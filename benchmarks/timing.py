"""Wall-clock timing shared by the benchmark scripts (imported as a sibling module: ``python benchmarks/x.py``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_seconds(runs: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                   warmup: int = 2) -> dict[str, float]:
    """Median wall time of one call of each run, synchronised on CUDA (the result exists when the clock stops).
    The runs take turns, so load drifts hit all of them alike, and the turn's order rotates, so no run always follows
    the same one (what a run leaves behind, allocator or cache state, is shared out)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for i in range(warmup + repeats):
        shift = i % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            fn = runs[name]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
