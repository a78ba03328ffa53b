"""Anchor sampling and block planning (DeepSpec ``deepspec/modeling/dspark/common.py``) against examples by hand."""

from __future__ import annotations

import pytest
import torch

from dspark_lightning.drafters.blocks import plan_blocks, sample_anchors

T, F = True, False


def candidates(loss_mask: torch.Tensor) -> list[list[int]]:
    """Positions a with loss_mask[a] and loss_mask[a+1], per row (written out, not vectorised)."""
    rows = []
    for row in loss_mask.tolist():
        rows.append([a for a in range(len(row) - 1) if row[a] and row[a + 1]])
    return rows


def random_loss_mask(seed: int, batch: int = 3, length: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, length, generator=g) < 0.7
    mask[:, :5] = False  # a prompt region
    mask[-1, 30:] = False  # a padded tail
    return mask


# -------------------------------------------------------------------------------------- sample_anchors
@pytest.mark.parametrize("num_anchors", [1, 4, 10, 64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sample_anchors_contract(seed, num_anchors):
    loss_mask = random_loss_mask(seed)
    anchors, valid = sample_anchors(loss_mask, num_anchors, torch.Generator().manual_seed(seed))
    assert anchors.shape == valid.shape == (3, num_anchors)
    assert anchors.dtype == torch.int64 and valid.dtype == torch.bool
    rows = zip(anchors.tolist(), valid.tolist(), candidates(loss_mask), strict=True)
    for row, (a_row, v_row, cand) in enumerate(rows):
        n_valid = sum(v_row)
        assert n_valid == min(num_anchors, len(cand)), row
        assert v_row == [True] * n_valid + [False] * (num_anchors - n_valid), "valid anchors come first"
        picked = a_row[:n_valid]
        assert all(loss_mask[row, a] and loss_mask[row, a + 1] for a in picked)
        assert picked == sorted(set(picked)), "sorted and distinct"
        assert a_row[n_valid:] == [0] * (num_anchors - n_valid), "padding is anchor 0"
        if num_anchors >= len(cand):
            assert picked == cand, "with room for all candidates, all are taken"


def test_sample_anchors_without_candidates():
    loss_mask = torch.tensor([[F, T, F, T, F, T], [F, F, F, F, F, F]])  # no two consecutive trained tokens
    anchors, valid = sample_anchors(loss_mask, 3)
    assert not valid.any()
    assert anchors.tolist() == [[0, 0, 0], [0, 0, 0]]


def test_sample_anchors_never_uses_the_last_position():
    loss_mask = torch.ones(1, 6, dtype=torch.bool)
    anchors, valid = sample_anchors(loss_mask, 8, torch.Generator().manual_seed(0))
    assert anchors[valid].tolist() == [0, 1, 2, 3, 4]  # a + 1 must exist
    assert valid.tolist() == [[T] * 5 + [F] * 3]


def test_sample_anchors_is_reproducible_with_a_generator():
    loss_mask = random_loss_mask(7)
    draws = [sample_anchors(loss_mask, 6, torch.Generator().manual_seed(s)) for s in (11, 11, 12, 13)]
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    assert not all(torch.equal(draws[0][0], d[0]) for d in draws[2:]), "different seeds, different anchors"


def test_sample_anchors_is_uniform_over_candidates():
    loss_mask = torch.tensor([[F, T, T, T, F, T, T, T, T, F]])  # candidates 1, 2, 5, 6, 7
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(10)
    draws = 600
    for _ in range(draws):
        anchors, valid = sample_anchors(loss_mask, 2, g)
        assert valid.all()
        counts.index_add_(0, anchors[0], torch.ones(2))
    freq = counts / draws  # each candidate is picked with probability 2/5
    assert freq[[0, 3, 4, 8, 9]].sum() == 0
    assert ((freq[[1, 2, 5, 6, 7]] - 0.4).abs() < 0.1).all(), freq


# ----------------------------------------------------------------------------------------- plan_blocks
# L = 8, ids 10..17, gamma = 3. Anchor 2: labels x3..x5, x5 untrained -> 2 supervised. Anchor 4: x5 untrained
# -> none (the supervised part is a contiguous prefix). Anchor 6: x7 then off the end -> 1. Anchor 0: padding.
IDS = torch.arange(10, 18)[None]
LOSS_MASK = torch.tensor([[F, F, T, T, T, F, T, T]])
ANCHORS = torch.tensor([[2, 4, 6, 0]])
VALID = torch.tensor([[T, T, T, F]])
X = -1  # slot past the end of the sequence: value unspecified, must only be a safe index
EXPECTED = dict(
    labels=[[13, 14, 15], [15, 16, 17], [17, X, X], [11, 12, 13]],
    prev_ids=[[12, 13, 14], [14, 15, 16], [16, 17, X], [10, 11, 12]],
    target_index=[[2, 3, 4], [4, 5, 6], [6, 7, X], [0, 1, 2]],
    supervise=[[T, T, F], [F, F, F], [T, F, F], [F, F, F]],
)


@pytest.mark.parametrize("layout", ["deepspec", "zlab"])
def test_plan_blocks_hand_example(layout):
    offset = 1 if layout == "zlab" else 0
    plan = plan_blocks(IDS, LOSS_MASK, ANCHORS, VALID, gamma=3, pred_offset=offset, mask_token_id=99)
    masks = [99] * (2 + offset)
    assert plan.block_ids[0].tolist() == [[12, *masks], [14, *masks], [16, *masks], [10, *masks]]
    span = list(range(3 + offset))
    assert plan.positions[0].tolist() == [[a + j for j in span] for a in (2, 4, 6, 0)]
    assert plan.supervise.dtype == torch.bool
    assert plan.supervise[0].tolist() == EXPECTED["supervise"]
    for name in ("labels", "prev_ids", "target_index"):
        got, want = getattr(plan, name)[0], torch.tensor(EXPECTED[name])
        assert got.shape == (4, 3), name
        known = want != X
        assert torch.equal(got[known], want[known]), name
    # Past the end: any in-range index (gathering with it must be safe), never supervised.
    assert ((plan.target_index >= 0) & (plan.target_index < 8)).all()
    assert ((plan.labels >= 10) & (plan.labels < 18)).all()
    assert ((plan.prev_ids >= 10) & (plan.prev_ids < 18)).all()

    # Attention: a query of block i sees context p < a_i and all of block i (itself included).
    s = 3 + offset
    assert plan.mask.shape == (1, 1, 4 * s, 8 + 4 * s) and plan.mask.dtype == torch.bool
    for q in range(4 * s):
        block = q // s
        want_row = [p < int(ANCHORS[0, block]) for p in range(8)] + [j // s == block for j in range(4 * s)]
        assert plan.mask[0, 0, q].tolist() == want_row, q


def test_plan_blocks_mask_literal():
    """L = 5, anchors 1 and 3, gamma = 2, written out cell by cell."""
    ids, lm = torch.arange(5)[None], torch.ones(1, 5, dtype=torch.bool)
    anchors, valid = torch.tensor([[1, 3]]), torch.tensor([[T, T]])
    deepspec = plan_blocks(ids, lm, anchors, valid, gamma=2, pred_offset=0, mask_token_id=9).mask[0, 0]
    assert deepspec.int().tolist() == [
        # ctx 0..4      block0  block1
        [1, 0, 0, 0, 0, 1, 1, 0, 0],
        [1, 0, 0, 0, 0, 1, 1, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 1, 1],
        [1, 1, 1, 0, 0, 0, 0, 1, 1],
    ]
    zlab = plan_blocks(ids, lm, anchors, valid, gamma=2, pred_offset=1, mask_token_id=9).mask[0, 0]
    assert zlab.int().tolist() == [
        [1, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
        [1, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
        [1, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1],
        [1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1],
        [1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1],
    ]


def test_plan_blocks_rows_are_independent():
    """Two rows planned together equal each row planned alone."""
    ids = torch.stack([torch.arange(10, 18), torch.arange(30, 38)])
    lm = torch.stack([LOSS_MASK[0], torch.ones(8, dtype=torch.bool)])
    anchors, valid = torch.tensor([[2, 4, 6, 0], [0, 3, 5, 6]]), torch.tensor([[T, T, T, F], [T, T, T, T]])
    both = plan_blocks(ids, lm, anchors, valid, gamma=3, pred_offset=0, mask_token_id=99)
    for b in range(2):
        one = plan_blocks(ids[b:b + 1], lm[b:b + 1], anchors[b:b + 1], valid[b:b + 1], gamma=3, pred_offset=0,
                          mask_token_id=99)
        for name in ("block_ids", "positions", "labels", "prev_ids", "target_index", "supervise", "mask"):
            assert torch.equal(getattr(both, name)[b], getattr(one, name)[0]), (b, name)
    assert both.supervise[1].tolist() == [[T, T, T], [T, T, T], [T, T, F], [T, F, F]]
