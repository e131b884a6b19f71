"""Blocks cut by shard boundaries, with every process simulated in one: pooled and masked as one process does.

The real multi-process runs are in ``test_sharded.py``; here any grid of shards (uneven, empty,
smaller than a block, cut along rows and columns at once) is tried against the whole weight.
"""

from __future__ import annotations

import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_prune.engine.blocks import block_pool, expand_blocks
from lit_prune.engine.shard_blocks import counted_blocks, pool_blocks, shard_layout, write_shard_mask


def _pool_everywhere(scores: torch.Tensor, dims, rects, pooling: str):
    """Each simulated process's layout and pooled scores; the exchange sums every process's strips."""
    layouts = [shard_layout(tuple(scores.shape), dims, r, rects) for r in rects]

    def part(rect):
        (r0, r1), (c0, c1) = rect
        return lambda name: scores[r0:r1, c0:c1].contiguous()

    written: list[torch.Tensor] = []
    for layout, rect in zip(layouts, rects, strict=True):  # what each process writes
        pool_blocks({"w": layout}, part(rect), {"w": True}, lambda t: written.append(t.clone()) or t, pooling)
    total = torch.stack(written).sum(0) if written else None
    pooled = [
        pool_blocks({"w": layout}, part(rect), {"w": True}, lambda t: t.copy_(total), pooling)["w"]
        for layout, rect in zip(layouts, rects, strict=True)
    ]
    return layouts, pooled, len(written)


def _splits(size: int):
    """Sorted cut points of ``[0, size)`` into up to 4 shards (repeats: empty shards)."""
    return st.lists(st.integers(0, size), max_size=3).map(lambda cuts: [0, *sorted(cuts), size])


@st.composite
def _cases(draw):
    rows, cols = draw(st.integers(2, 13)), draw(st.integers(2, 13))  # a block view has no unit dim
    dims = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    row_cuts, col_cuts = draw(_splits(rows)), draw(_splits(cols))
    rects = list(itertools.product(itertools.pairwise(row_cuts), itertools.pairwise(col_cuts)))
    values = draw(st.lists(st.integers(0, 6), min_size=rows * cols, max_size=rows * cols))  # ties across blocks
    scores = torch.tensor(values, dtype=torch.float32).reshape(rows, cols) / 7
    return scores, dims, rects, draw(st.sampled_from(["AVG", "MAX"]))


@settings(max_examples=300, deadline=None)
@given(_cases())
def test_shards_pool_count_and_mask_the_blocks_of_one_process(case):
    scores, dims, rects, pooling = case
    whole = block_pool(scores, dims, pooling)
    layouts, pooled, exchanges = _pool_everywhere(scores, dims, rects, pooling)
    assert exchanges == (len(rects) if layouts[0].strips else 0)  # no exchange unless a block is cut
    times_counted = torch.zeros(whole.shape, dtype=torch.int64)
    cut = whole.median()
    for layout, mine, ((r0, r1), (c0, c1)) in zip(layouts, pooled, rects, strict=True):
        if r0 == r1 or c0 == c1:
            assert mine.numel() == 0 and counted_blocks(mine, layout).numel() == 0
            continue
        touched = (slice(r0 // dims[0], -(-r1 // dims[0])), slice(c0 // dims[1], -(-c1 // dims[1])))
        assert torch.equal(mine, whole[touched])  # bit for bit, cut blocks included
        first = (slice(-(-r0 // dims[0]), touched[0].stop), slice(-(-c0 // dims[1]), touched[1].stop))
        assert torch.equal(counted_blocks(mine, layout), whole[first])
        times_counted[first] += 1
        mask = write_shard_mask(mine > cut, layout, torch.empty(r1 - r0, c1 - c0, dtype=torch.bool))
        assert torch.equal(mask, expand_blocks(whole > cut, dims, tuple(scores.shape))[r0:r1, c0:c1])
    assert bool((times_counted == 1).all())  # every block counted by exactly one process


def test_a_whole_weight_is_pooled_without_an_exchange():
    scores = torch.arange(12.0).reshape(3, 4)
    layout = shard_layout((3, 4), (2, 2), ((0, 3), (0, 4)), [((0, 3), (0, 4))])
    called = []
    pooled = pool_blocks({"w": layout}, lambda name: scores, {"w": True}, called.append, "MAX")["w"]
    assert called == [] and torch.equal(pooled, block_pool(scores, (2, 2), "MAX"))


def test_the_exchange_carries_one_block_row_per_cut():
    # 33 rows over 2 processes (17 + 16) with 4x8 blocks: rows 16-19 are one block row on both
    rects = [((0, 17), (0, 8)), ((17, 33), (0, 8))]
    layout = shard_layout((33, 8), (4, 8), rects[1], rects)
    assert [(s.dim, s.start, s.stop) for s in layout.strips] == [(0, 16, 20)]
    assert layout.strip_numel == 4 * 8 and layout.skipped == (1, 0)
