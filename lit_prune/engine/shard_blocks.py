"""Block pruning of sharded weights: every block pooled whole, and counted by one process.

A process pools the blocks its shard touches.  A shard boundary may cut a block: 33 rows over
two processes are 17 + 16, so with 2-row blocks rows 16 and 17 form one block that both hold.
Each block row (or block column) of the weight that a boundary cuts is a *strip*.  Every process
writes its part of every strip of a group's weights into one buffer, and one sum over the
processes gives each of them the whole strips: one collective for the whole group, on update
steps only, carrying one block row (or column) per cut.  Every process that holds a part of a cut
block pools the whole block the same way, so they all mask their parts of it alike; the one that
holds the block's first element counts it, so the statistics add up to one process's.

Shards whose boundaries fall on block boundaries (a dim divisible by the number of processes
times the block, the usual case) have no strips: each is pooled as it is, with no exchange.  A
whole weight is one shard of itself.

Example::

    >>> layout = shard_blocks_of(torch.zeros(6, 4), (4, 2))  # a whole weight: one piece per dim, no strips
    >>> layout.strips, pool_blocks({"w": layout}, lambda name: torch.ones(6, 4), {"w": True}, None, "AVG")["w"]
    ((), tensor([[1., 1.],
            [1., 1.]]))
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lit_prune.engine.blocks import block_pool, block_view_shape, expand_blocks_into
from lit_prune.engine.sharding import block_view_rects, local_region, matrix_region

__all__ = [
    "Piece",
    "ShardBlocks",
    "Strip",
    "counted_blocks",
    "pool_blocks",
    "shard_blocks_of",
    "shard_layout",
    "write_shard_mask",
]

Rect = tuple[tuple[int, int], tuple[int, int]]


@dataclass(frozen=True)
class Strip:
    """A block row (``dim`` 0) or block column (``dim`` 1) cut by a shard boundary: ``[start, stop)`` along ``dim``."""

    dim: int
    start: int
    stop: int


@dataclass(frozen=True)
class Piece:
    """A run of whole blocks along one dim of the view: this process's own elements, or one cut strip."""

    start: int
    stop: int
    strip: Strip | None = None


@dataclass(frozen=True)
class ShardBlocks:
    """Where a process's shard lies in its weight's block grid, and every strip the shards cut."""

    view: tuple[int, int]  # the whole weight's block view: rows, columns
    dims: tuple[int, int]  # block height and width
    region: Rect  # this process's rectangle of the view
    pieces: tuple[tuple[Piece, ...], tuple[Piece, ...]]  # the block rows, then the block columns, it pools
    strips: tuple[Strip, ...]  # every cut strip of the whole weight: the same on every process
    skipped: tuple[int, int]  # leading block rows and columns it pools but another process counts

    def strip_shape(self, strip: Strip) -> tuple[int, int]:
        """A strip's whole shape: a block row is as wide as the view, a block column as tall."""
        width = strip.stop - strip.start
        return (width, self.view[1]) if strip.dim == 0 else (self.view[0], width)

    @property
    def strip_numel(self) -> int:
        """The elements of all the weight's strips: what one update exchanges for it."""
        return sum(math.prod(self.strip_shape(s)) for s in self.strips)


def _block(k: int, step: int, size: int, dim: int) -> Strip:
    """Block ``k`` along ``dim`` as a strip (the last is cut short by the shape)."""
    return Strip(dim, k * step, min(k * step + step, size))


def _cut_ends(part: tuple[int, int], size: int, step: int, dim: int) -> tuple[Strip | None, Strip | None]:
    """The first and the last block along ``dim`` that ``[start, stop)`` shares with another shard (``None``: whole)."""
    start, stop = part
    if start == stop:
        return None, None
    first = _block(start // step, step, size, dim) if start % step else None
    last = _block(stop // step, step, size, dim) if stop % step and stop != size else None
    return first, last


def _pieces(part: tuple[int, int], size: int, step: int, dim: int) -> tuple[Piece, ...]:
    """The block runs ``[start, stop)`` touches along ``dim``: a cut first block, its own blocks, a cut last block."""
    first, last = _cut_ends(part, size, step, dim)
    own = Piece(-(-part[0] // step) * step, part[1] if last is None else last.start)
    pieces = [Piece(first.start, first.stop, first)] if first else []
    pieces += [own] if own.start < own.stop else []
    pieces += [Piece(last.start, last.stop, last)] if last and last != first else []  # equal: inside one block
    return tuple(pieces)


def shard_blocks_of(weight: Tensor, dims: tuple[int, int]) -> ShardBlocks:
    """The block layout of this process's part of ``weight`` (a ``DTensor``, or a whole tensor) for ``dims`` blocks.

    Every process's shard must be a rectangle of the block view (checked at binding by
    :func:`~lit_prune.engine.sharding.check_supported`).
    """
    view, rects = block_view_shape(weight.shape), block_view_rects(weight)
    region = matrix_region(weight, local_region(weight))
    if view is None or region is None or rects is None:
        raise ValueError(f"a shard of shape {tuple(weight.shape)} is not a rectangle of its block view")
    return shard_layout(view, dims, region, rects)  # type: ignore[arg-type]


def shard_layout(view: tuple[int, int], dims: tuple[int, int], region: Rect, rects: list[Rect]) -> ShardBlocks:
    """The block layout of the shard ``region`` of a ``view`` matrix whose shards are ``rects`` (all processes').

    Example::

        >>> layout = shard_layout((33, 4), (2, 4), ((17, 33), (0, 4)), [((0, 17), (0, 4)), ((17, 33), (0, 4))])
        >>> layout.strips, layout.skipped  # rows 16-17 are one block on both processes: the first counts it
        ((Strip(dim=0, start=16, stop=18),), (1, 0))
    """
    cut = {s for rect in rects for d in (0, 1) for s in _cut_ends(rect[d], view[d], dims[d], d) if s is not None}
    empty = any(a == b for a, b in region)
    pieces = ((), ()) if empty else tuple(_pieces(region[d], view[d], dims[d], d) for d in (0, 1))
    skipped = tuple(int(not empty and region[d][0] % dims[d] != 0) for d in (0, 1))
    return ShardBlocks(view, dims, region, pieces, tuple(sorted(cut, key=lambda s: (s.dim, s.start))), skipped)  # type: ignore[arg-type]


def _split_strips(layout: ShardBlocks, flat: Tensor) -> dict[Strip, Tensor]:
    """Each strip's 2-D view into ``flat``, the weight's part of the exchange buffer."""
    out, offset = {}, 0
    for strip in layout.strips:
        shape = layout.strip_shape(strip)
        out[strip] = flat[offset : offset + math.prod(shape)].view(shape)
        offset += math.prod(shape)
    return out


def _write_strips(scores: Tensor, layout: ShardBlocks, strips: dict[Strip, Tensor]) -> None:
    """This process's elements of every strip (``scores``: its part of the view) into the strips."""
    (r0, r1), (c0, c1) = layout.region
    for strip, out in strips.items():
        if strip.dim == 0:
            lo, hi = max(strip.start, r0), min(strip.stop, r1)
            if lo < hi:
                out[lo - strip.start : hi - strip.start, c0:c1] = scores[lo - r0 : hi - r0]
        else:
            lo, hi = max(strip.start, c0), min(strip.stop, c1)
            if lo < hi:
                out[r0:r1, lo - strip.start : hi - strip.start] = scores[:, lo - c0 : hi - c0]


def _source(row: Piece, col: Piece, layout: ShardBlocks, scores: Tensor | None, strips: dict[Strip, Tensor]) -> Tensor:
    """The elements of the blocks ``row`` x ``col``: from this process's scores, or from a whole strip."""
    (r0, _), (c0, _) = layout.region
    if row.strip is not None:  # a cut block row holds every column
        return strips[row.strip][:, col.start : col.stop]
    if col.strip is not None:  # a cut block column holds every row
        return strips[col.strip][row.start : row.stop, :]
    return scores[row.start - r0 : row.stop - r0, col.start - c0 : col.stop - c0]  # type: ignore[index]


def _pool_pieces(
    layout: ShardBlocks, pooling: str, scores: Tensor | None, strips: dict[Strip, Tensor], out: Tensor
) -> None:
    """Pool into ``out`` the pieces whose elements are at hand: this process's own (``scores``), else the cut ones."""
    rows, cols = _piece_slices(layout)
    for row, row_slice in zip(layout.pieces[0], rows, strict=True):
        for col, col_slice in zip(layout.pieces[1], cols, strict=True):
            own = row.strip is None and col.strip is None
            if own == (scores is not None):
                source = _source(row, col, layout, scores, strips)
                block_pool(source, layout.dims, pooling, out=out[row_slice, col_slice])


def _piece_slices(layout: ShardBlocks) -> tuple[list[slice], list[slice]]:
    """Where each block row piece and block column piece lands among the blocks this process touches."""
    found = []
    for pieces, step in zip(layout.pieces, layout.dims, strict=True):
        ends = list(itertools.accumulate(-(-(p.stop - p.start) // step) for p in pieces))
        found.append([slice(a, b) for a, b in zip([0, *ends], ends, strict=False)])
    return found[0], found[1]


def _touched_grid(layout: ShardBlocks) -> tuple[int, int]:
    """How many block rows and block columns this process touches (its own and the cut ones)."""
    rows, cols = _piece_slices(layout)
    return (rows[-1].stop if rows else 0), (cols[-1].stop if cols else 0)


def pool_blocks(
    layouts: dict[str, ShardBlocks],
    scores_of: Callable[[str], Tensor],
    counted: dict[str, bool],
    reduce_sum: Callable[[Tensor], Tensor] | None,
    pooling: str,
) -> dict[str, Tensor]:
    """Each weight's pooled scores over the blocks its shard touches (cut blocks completed: one sum for all).

    ``scores_of(name)``: this process's scores of weight ``name``, called once per weight (the
    result may live in a buffer that the next call reuses).  ``counted``: whether this process's
    copy of a shard is the counted one (a shard's replicas write its strips once).
    ``reduce_sum``: the sum over the processes, called only when some shard cuts a block.
    Every piece is pooled straight into its place in the weight's result: nothing is assembled.
    """
    bounds = list(itertools.accumulate((layout.strip_numel for layout in layouts.values()), initial=0))
    exchange: Tensor | None = None
    pooled, strips = {}, {}
    for (name, layout), start, stop in zip(layouts.items(), bounds, bounds[1:], strict=False):
        scores = scores_of(name)
        if exchange is None:  # zeros: each element of a strip is written by the one process that counts it
            exchange = torch.zeros(bounds[-1], dtype=torch.float32, device=scores.device)
        (r0, r1), (c0, c1) = layout.region
        scores = scores.reshape(r1 - r0, c1 - c0)
        strips[name] = _split_strips(layout, exchange[start:stop])
        if counted[name]:
            _write_strips(scores, layout, strips[name])
        pooled[name] = torch.empty(_touched_grid(layout), dtype=torch.float32, device=scores.device)
        _pool_pieces(layout, pooling, scores, {}, pooled[name])
    if exchange is not None and exchange.numel():
        reduce_sum(exchange)  # type: ignore[misc]
    for name, layout in layouts.items():
        _pool_pieces(layout, pooling, None, strips[name], pooled[name])
    return pooled


def counted_blocks(pooled: Tensor, layout: ShardBlocks) -> Tensor:
    """The pooled scores this process counts: without the first block row or column another process starts."""
    return pooled[layout.skipped[0] :, layout.skipped[1] :]


def write_shard_mask(keep: Tensor, layout: ShardBlocks, out: Tensor) -> Tensor:
    """Each block's keep flag (``keep``: one per pooled block) on this process's elements of it, into ``out``.

    Example::

        >>> layout = shard_blocks_of(torch.zeros(3, 2), (2, 2))
        >>> write_shard_mask(torch.tensor([[True], [False]]), layout, torch.empty(3, 2, dtype=torch.bool)).int()
        tensor([[1, 1],
                [1, 1],
                [0, 0]], dtype=torch.int32)
    """
    if out.numel() == 0:
        return out
    (r0, r1), (c0, c1) = layout.region
    top, left = layout.pieces[0][0].start, layout.pieces[1][0].start  # the first block's first row and column
    expand_blocks_into(keep, layout.dims, out.view(r1 - r0, c1 - c0), offset=(r0 - top, c0 - left))
    return out
