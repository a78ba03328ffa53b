"""The preallocated slot cache: what the target computes through it, in place, and its errors."""

from __future__ import annotations

import pytest
import torch

from dspark_lightning.decoding.slot_cache import SlotKVCache


def causal_slots(first: int, q: int, capacity: int) -> torch.Tensor:
    """[1, 1, q, capacity]: query i sees slots 0 .. first + i."""
    return (torch.arange(capacity)[None, :] <= first + torch.arange(q)[:, None])[None, None]


def test_chunked_forward_through_slots_equals_the_full_forward(target64):
    ids = torch.tensor([[5, 17, 33, 2, 9, 41, 7, 12, 60]])
    full = target64(ids, compute_logits=True)
    cache, outs, first = SlotKVCache(16), [], 0
    for chunk in (5, 3, 1):
        cache.write_at(torch.arange(first, first + chunk), first)
        out = target64(ids[:, first:first + chunk], causal_slots(first, chunk, 16), past_key_values=cache,
                       position_ids=torch.arange(first, first + chunk)[None], use_cache=True, compute_logits=True)
        assert out.past_key_values is cache and cache.get_seq_length() == first
        if first == 0:
            addresses = [t.data_ptr() for t in cache.keys + cache.values]
        outs.append(out)
        first += chunk
    assert [t.data_ptr() for t in cache.keys + cache.values] == addresses  # written in place
    assert cache.keys[0].shape[2] == 16 and not cache.keys[0][:, :, first:].any()
    torch.testing.assert_close(torch.cat([o.logits for o in outs], 1), full.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([o.hidden for o in outs], 1), full.hidden, rtol=1e-5, atol=1e-5)


def test_errors_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match="capacity=0 must be >= 1"):
        SlotKVCache(0)
    cache = SlotKVCache(8)
    with pytest.raises(RuntimeError, match="write_at must name the slots"):
        cache.update(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), 0)
    with pytest.raises(ValueError, match=r"Writing 4 tokens from slot 6 overflows capacity=8.*one round verifies"):
        cache.write_at(torch.arange(6, 10), 6)


def test_static_draft_context_holds_what_the_growing_one_holds():
    """The draft context of the fixed-shape mode (static: full-capacity views, appends without a host sync that
    write all T entries and count counts[b] of them) holds, row by row, what the default one holds."""
    from dspark_lightning.drafters.dflash import ContextKVCache

    g = torch.Generator().manual_seed(0)
    growing = ContextKVCache(2, 3, 2, 4, device="cpu", dtype=torch.float32, capacity=4)
    static = ContextKVCache(2, 3, 2, 4, device="cpu", dtype=torch.float32, capacity=16)
    static.static = True
    lengths_address = static.lengths.data_ptr()
    for t, counts in ((3, [3, 1, 2]), (4, [1, 4, 0]), (2, [2, 2, 1])):
        layer_kv = [(torch.randn(3, 2, t, 4, generator=g), torch.randn(3, 2, t, 4, generator=g)) for _ in range(2)]
        for cache in (growing, static):
            cache.append(layer_kv, torch.tensor(counts))
    assert torch.equal(static.lengths, growing.lengths) and static.lengths.data_ptr() == lengths_address
    width = growing.key_mask().shape[1]
    assert static.view(0)[0].shape[2] == 16 and torch.equal(static.key_mask()[:, :width], growing.key_mask())
    assert not static.key_mask()[:, width:].any()
    for layer in range(2):
        for row, n in enumerate(growing.lengths.tolist()):
            for a, b in zip(static.view(layer), growing.view(layer)):
                assert torch.equal(a[row, :, :n], b[row, :, :n])
