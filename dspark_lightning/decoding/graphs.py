"""CUDA graphs for the engine's draft and verify passes (``SpeculativeEngine(cuda_graphs=True)``).

A 135M target on the H200 spends about 95 % of a decode step launching kernels (``docs/results/performance.md``).
A CUDA graph records a pass's kernels once and replays them with one launch. It replays fixed shapes from fixed
addresses, which the engine's ``static_shapes`` mode provides: a preallocated slot KV cache, one of ``gamma + 1``
verify widths per round (a graph per width), finished rows kept in the batch, a draft context of fixed capacity,
and the round's state (slot validity, positions) in buffers updated in place. Inputs that change every round
(anchors, drafts, verify lengths) are copied into the graph's own input buffers before each replay; its outputs
are the same tensors every time, overwritten by each replay.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


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
        side = torch.cuda.Stream(device=self.inputs[0].device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(*self.inputs)
                if reset is not None:
                    reset()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn(*self.inputs)

    def __call__(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        for buffer, x in zip(self.inputs, inputs):
            buffer.copy_(x)
        self.graph.replay()
        return self.outputs
