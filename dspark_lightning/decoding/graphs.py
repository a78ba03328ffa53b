"""CUDA graphs for the engine's passes (``SpeculativeEngine(cuda_graphs=True)``) and the SPS profile.

A 135M target on the H200 spends about 95 % of a decode step launching kernels (``docs/results/performance.md``).
A CUDA graph records a pass's kernels once and replays them with one launch. It replays fixed shapes from fixed
addresses, which the engine's state provides (``state.py``): preallocated KV caches, finished rows kept in the batch,
and every input and output of a pass in buffers updated in place, so a pass is a function of nothing
(:class:`CapturedStep`). :class:`GraphedCall` captures a function of tensor arguments instead, copying them into its
own input buffers before each replay.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def _warm_up(fn: Callable[[], object], device: torch.device, warmup: int, reset: Callable[[], None] | None) -> None:
    """Run ``fn`` ``warmup`` times on a side stream (lazy allocations, autotuning, cuBLAS workspaces happen outside
    the graph), calling ``reset`` after each run."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
            if reset is not None:
                reset()
    torch.cuda.current_stream(device).wait_stream(side)


class CapturedStep:
    """``fn()``, a pass that reads and writes only buffers that outlive it, captured once into a CUDA graph and
    replayed by calling the object. ``reset`` undoes what the warm-up runs must not leave behind (counters advanced in
    place); ``pool`` is a memory pool shared with the other graphs of one state (they never run concurrently, and
    nothing one leaves in its pool is read by another)."""

    def __init__(self, fn: Callable[[], object], device: torch.device, *, warmup: int = 2,
                 reset: Callable[[], None] | None = None, pool: object = None) -> None:
        if torch.device(device).type != "cuda":
            raise ValueError(f"CapturedStep captures CUDA work; got device {device}.")
        _warm_up(fn, torch.device(device), warmup, reset)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            fn()

    def __call__(self) -> None:
        self.graph.replay()


class GraphedCall:
    """``fn(*inputs) -> tuple of tensors``, captured once into a CUDA graph.

    Capture runs ``fn`` ``warmup`` times on a side stream first (lazy allocations, autotuning, cuBLAS workspaces
    happen outside the graph), then records one call on inputs cloned into static buffers. A call copies its
    arguments into those buffers, replays, and returns the recorded outputs (the same tensors every call: read or
    copy them before the next replay). ``fn`` must not synchronise with the host, and whatever it writes besides
    its outputs (a KV cache) must keep its address between calls. The warm-up runs really execute ``fn``: ``reset``,
    if given, runs after each of them to undo what must not happen twice (a position advanced in place); the
    capture itself only records.
    """

    def __init__(self, fn: Callable[..., tuple[Tensor, ...]], *example_inputs: Tensor, warmup: int = 2,
                 reset: Callable[[], None] | None = None) -> None:
        if not example_inputs or example_inputs[0].device.type != "cuda":
            raise ValueError("GraphedCall captures CUDA work: give it example inputs on a CUDA device.")
        self.inputs = tuple(x.clone() for x in example_inputs)
        _warm_up(lambda: fn(*self.inputs), self.inputs[0].device, warmup, reset)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn(*self.inputs)

    def __call__(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        for buffer, x in zip(self.inputs, inputs):
            buffer.copy_(x)
        self.graph.replay()
        return self.outputs
