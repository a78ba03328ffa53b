"""The target KV cache the engine decodes in: preallocated, written in place (fixed shapes for CUDA graphs).

HF's ``DynamicCache`` concatenates every forward's new keys and values, so each step allocates and the attention
width grows. Here every layer's keys and values live in one buffer of ``capacity`` slots, allocated at the first
write, and a forward writes its new tokens at the slots the engine names (:meth:`SlotKVCache.write_at`), in place:
the same slots for every row, or each row its own (the engine writes a row's tokens at their positions, so slot =
position, and a round's rejected drafts are simply overwritten by the next round's tokens). Attention always spans
all ``capacity`` slots; the engine's 4-D mask hides the slots that hold nothing committed. The buffers, the slot
index and so the shapes of a verify forward never change, which is what a captured CUDA graph needs.

HF attention layers call ``update(key, value, layer_idx, ...)`` on whatever cache object they are given, and the
model asks ``get_seq_length()`` only when it is not given positions; this duck-typed cache answers both, whatever
the transformers version's name for the cache argument.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


class SlotKVCache:
    """Per-layer ``[B, kv_heads, capacity, head_dim]`` buffers written at explicit slots.

    Args:
        capacity: slots per row (the engine sizes it for a whole generation).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity={capacity} must be >= 1.")
        self.capacity = capacity
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self.slots: Tensor | None = None  # where the next forward's tokens go: [T] or [B, T] int64
        self.start = 0  # first slot of the next forward (what get_seq_length reports)

    def write_at(self, slots: Tensor, start: int = 0) -> None:
        """The next forward writes its ``T`` tokens at ``slots``: ``[T]`` for every row, or ``[B, T]`` per row (in
        place, so a graph replays the same index tensor once its values are updated). ``start`` is the first slot of
        a ``[T]`` write, for ``get_seq_length`` and the capacity check (the caller checks per-row slots)."""
        if slots.dim() == 1 and int(start) + slots.numel() > self.capacity:
            raise ValueError(f"Writing {slots.numel()} tokens from slot {start} overflows capacity={self.capacity}; "
                             "size the cache for prompt + generated tokens + the tokens one round verifies.")
        self.slots, self.start = slots, int(start)

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[Tensor, Tensor]:
        if self.slots is None:
            raise RuntimeError("SlotKVCache.write_at must name the slots before a forward writes to the cache.")
        if layer_idx == len(self.keys):  # first write: allocate this layer's buffers
            b, h, _, d = key_states.shape
            self.keys.append(key_states.new_zeros(b, h, self.capacity, d))
            self.values.append(value_states.new_zeros(b, h, self.capacity, value_states.shape[-1]))
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.slots.dim() == 1:
            keys.index_copy_(2, self.slots, key_states.to(keys.dtype))
            values.index_copy_(2, self.slots, value_states.to(values.dtype))
        else:  # per row: [B, T] -> the [B, heads, T, head_dim] index scatter_ takes
            b, h, t, d = key_states.shape
            index = self.slots[:, None, :, None].expand(b, h, t, d)
            keys.scatter_(2, index, key_states.to(keys.dtype))
            values.scatter_(2, index.expand(b, h, t, value_states.shape[-1]), value_states.to(values.dtype))
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start
