"""Block pruning's geometry: the 2-D view a weight is pruned over, pooling its scores, expanding a block mask.

TF's ``_maybe_update_block_mask``: blocks of ``block_height x block_width`` start at row and
column 0; an edge block that the shape cuts short is pooled over its real elements only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "block_grid",
    "block_pool",
    "block_view_shape",
    "expand_blocks",
    "expand_blocks_into",
    "resolve_block_dims",
]


def block_view_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int] | None:
    """The 2-D matrix a weight of ``shape`` is block-pruned over, or ``None`` for element-wise.

    TF squeezes size-1 dimensions and block-prunes only what is then 2-D.  lit_prune does the
    same, and prunes a tensor with more than two non-unit dimensions (a conv kernel
    ``[out, in, kh, kw]``) over its ``[out, in * kh * kw]`` view; TF always fell back to
    element-wise for those.

    Example::

        >>> block_view_shape((8, 3, 3, 3)), block_view_shape((8, 4, 1, 1)), block_view_shape((8, 1))
        ((8, 27), (8, 4), None)
    """
    dims = [d for d in shape if d != 1]
    if len(dims) < 2:
        return None
    return dims[0], math.prod(dims[1:])


def resolve_block_dims(block_dims: tuple[int, int], matrix_shape: tuple[int, int]) -> tuple[int, int]:
    """Replace -1 by the matrix's own dimension (per weight: TF resolved it once, for all weights).

    Example::

        >>> resolve_block_dims((-1, 2), (6, 4))
        (6, 2)
    """
    return tuple(m if b == -1 else b for b, m in zip(block_dims, matrix_shape, strict=True))  # type: ignore[return-value]


def block_grid(shape: tuple[int, ...] | torch.Size, dims: tuple[int, int]) -> tuple[int, int]:
    """The block grid of a 2-D ``shape`` in ``dims`` blocks from row and column 0 (edge blocks cut short).

    Example::

        >>> block_grid((10, 6), (4, 3))
        (3, 2)
    """
    return -(-shape[0] // dims[0]), -(-shape[1] // dims[1])


@torch.no_grad()
def block_pool(scores: Tensor, block_dims: tuple[int, int], pooling: str = "AVG", out: Tensor | None = None) -> Tensor:
    """Pool a 2-D score matrix over ``block_dims`` blocks that start at row and column 0.

    ``AVG`` divides each block's sum by the number of real elements it holds, so an edge block
    that the shape cuts short is the average of what is there (summed in float64 on CPU and CUDA,
    rounded to float32 once); ``MAX`` takes the largest score.
    The output has ``ceil(H / bh) x ceil(W / bw)`` entries.  The scores are read in place (views,
    no padded copy) and pooled straight into the output (``out`` if given, a float32 tensor of the
    grid's shape, which may be a view): whole blocks, then the edge blocks the shape cuts short.

    Example::

        >>> block_pool(torch.tensor([[2.0, 2.0], [2.0, 2.0], [3.0, 3.0]]), (2, 2))
        tensor([[2.],
                [3.]])
    """
    if pooling not in ("AVG", "MAX"):
        raise ValueError(f"`block_pooling_function` must be one of ['AVG', 'MAX'], got {pooling!r}")
    (rows, cols), (bh, bw) = scores.shape, block_dims
    grid = block_grid((rows, cols), block_dims)
    pooled = torch.empty(grid, dtype=torch.float32, device=scores.device) if out is None else out
    for r0, r1, _, h in _runs(rows, bh, 0):  # whole block rows, then the one the shape cuts short
        for c0, c1, _, w in _runs(cols, bw, 0):
            _pool_even(scores[r0:r1, c0:c1], (h, w), pooling, pooled[r0 // bh : -(-r1 // bh), c0 // bw : -(-c1 // bw)])
    return pooled


#: Elements summed in float64 at a time (CPU, accelerators): ``sum(dtype=float64)`` of a contiguous
#: float32 tensor first makes a float64 copy of it.  Cache-sized on the CPU; larger on accelerators,
#: where each band is a kernel launch.
_WIDE_CHUNK = {"cpu": 1 << 16, "other": 1 << 22}


def _pool_even(scores: Tensor, block_dims: tuple[int, int], pooling: str, out: Tensor) -> None:
    """Pool a matrix that ``block_dims`` blocks tile exactly into ``out`` (read through a view, nothing kept)."""
    (rows, cols), (bh, bw) = scores.shape, block_dims
    blocks = scores.reshape(rows // bh, bh, cols // bw, bw)
    if pooling == "MAX":
        torch.amax(blocks, dim=(1, 3), out=out)
        return
    # float64 sums where the device has them: the mean is then correctly rounded to float32 whatever
    # the summation order, so the fused CPU kernel (lit_prune.backends.cpu.kernels.block_pool) gives the same.
    # A band of block rows at a time, as the float64 copy is made of what is summed.
    wide = torch.float64 if scores.device.type in ("cpu", "cuda") else torch.float32
    chunk = _WIDE_CHUNK["cpu" if scores.device.type == "cpu" else "other"]
    band = max(1, chunk // max(1, bh * cols))
    for i in range(0, len(blocks), band):  # each mean rounded to float32 once, as it is written
        torch.div(blocks[i : i + band].sum(dim=(1, 3), dtype=wide), float(bh * bw), out=out[i : i + band])


def expand_blocks(block_mask: Tensor, block_dims: tuple[int, int], shape: tuple[int, ...]) -> Tensor:
    """Map a block mask back to the weight: each block's value on its ``bh x bw`` cells, cropped.

    Example::

        >>> expand_blocks(torch.tensor([[True], [False]]), (2, 2), (3, 2)).int()
        tensor([[1, 1],
                [1, 1],
                [0, 0]], dtype=torch.int32)
    """
    out = torch.empty(shape, dtype=block_mask.dtype, device=block_mask.device)
    rows, cols = block_view_shape(shape) or (math.prod(shape), 1)
    expand_blocks_into(block_mask, block_dims, out.view(rows, cols))
    return out


def expand_blocks_into(
    block_mask: Tensor, block_dims: tuple[int, int], out: Tensor, offset: tuple[int, int] = (0, 0)
) -> Tensor:
    """Write each block's value over its cells of the 2-D ``out``, in place: nothing the size of ``out`` is made.

    ``out[0, 0]`` lies ``offset`` rows and columns into block ``block_mask[0, 0]`` (a shard that
    starts inside a block); blocks that ``out``'s edges cut are written in part.  At most nine
    broadcast copies: the cut first, whole and cut last blocks of each dim.

    Example::

        >>> out = torch.zeros(3, 3, dtype=torch.int64)
        >>> expand_blocks_into(torch.tensor([[1, 2], [3, 4]]), (2, 2), out, offset=(1, 0))
        tensor([[1, 1, 2],
                [3, 3, 4],
                [3, 3, 4]])
    """
    row_runs = _runs(out.shape[0], block_dims[0], offset[0])
    col_runs = _runs(out.shape[1], block_dims[1], offset[1])
    for r0, r1, first_row, h in row_runs:
        for c0, c1, first_col, w in col_runs:
            nr, nc = (r1 - r0) // h, (c1 - c0) // w
            values = block_mask[first_row : first_row + nr, first_col : first_col + nc].view(nr, 1, nc, 1)
            out[r0:r1, c0:c1].view(nr, h, nc, w).copy_(values.expand(nr, h, nc, w))
    return out


def _runs(size: int, step: int, offset: int) -> list[tuple[int, int, int, int]]:
    """``(start, stop, first block, height)`` runs of ``size`` cells that start ``offset`` into a block.

    A cut first block, the whole blocks, a cut last block; runs that would be empty are left out.
    """
    runs, start, block = [], 0, 0
    if offset:
        height = min(step - offset, size)
        runs.append((0, height, 0, height))
        start, block = height, 1
    whole = (size - start) // step
    if whole:
        runs.append((start, start + whole * step, block, step))
        start, block = start + whole * step, block + whole
    if start < size:
        runs.append((start, size, block, size - start))
    return runs
