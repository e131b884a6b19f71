"""Weights sharded across processes (``DTensor``, as FSDP2's ``fully_shard`` and tensor parallelism make them).

The engine works on each process's local shard; the statistics that decide a threshold are
combined by a :class:`ProcessGroupReducer`, so every process finds the threshold one process
would find on the whole weight.  A mask is a ``DTensor`` with its weight's mesh and placements:
no process ever holds a whole weight or a whole mask.

Each shard is counted once.  A mesh dimension a weight is *replicated* on (tensor parallelism's
data-parallel copies, HSDP's replicas, a weight sharded on a sub-mesh of a 2-D mesh) holds the
same shard on several processes; only one of them counts it (:func:`counted_here`), so the
statistics can be summed over all processes in one collective, whatever the meshes.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.distributed as dist
from torch import Tensor

from lit_prune.engine.blocks import block_view_shape
from lit_prune.engine.reduce import Reducer

__all__ = [
    "ProcessGroupReducer",
    "block_view_rects",
    "check_supported",
    "counted_here",
    "every_region",
    "is_sharded",
    "kept_counts",
    "local",
    "local_region",
    "matrix_region",
    "shard_like",
]

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - older torch: nothing is sharded
    DTensor = None  # type: ignore[assignment,misc]

try:  # where a mesh coordinate's shard lies: torch's own rule (uneven, empty and strided shards)
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset as _torch_shard_of
except ImportError:  # pragma: no cover - a torch that moved it: sharded weights are refused, never mis-sliced
    _torch_shard_of = None


def _shard_region(
    shape: tuple[int, ...], mesh_shape: tuple[int, ...], coordinate: list[int], placements: tuple
) -> tuple[tuple[int, int], ...]:
    """The ``[start, stop)`` along each dim of the shard at mesh ``coordinate``."""
    if _torch_shard_of is None:  # pragma: no cover - depends on the torch version
        raise NotImplementedError(
            "this torch has no torch.distributed.tensor._utils._compute_local_shape_and_global_offset, which "
            "lit_prune uses to place each shard of a DTensor; prune sharded weights with torch 2.4 to 2.13"
        )
    size, offset = _torch_shard_of(shape, mesh_shape, list(coordinate), placements)
    return tuple((o, o + n) for o, n in zip(offset, size, strict=True))


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (a tensor whose data is split over processes)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """This process's part of ``t``: its local shard for a ``DTensor``, else ``t`` itself."""
    return t.to_local() if is_sharded(t) else t


def shard_like(local_part: Tensor, weight: Tensor) -> Tensor:
    """``local_part`` as a ``DTensor`` laid out as ``weight`` is (same mesh, placements, global shape)."""
    return DTensor.from_local(
        local_part, weight.device_mesh, weight.placements, run_check=False, shape=weight.shape, stride=weight.stride()
    )


def local_region(t: Tensor) -> tuple[tuple[int, int], ...]:
    """The ``[start, stop)`` of this process's part of ``t`` along each dim (the whole of a plain tensor).

    Example::

        >>> local_region(torch.zeros(3, 4))
        ((0, 3), (0, 4))
    """
    if not is_sharded(t):
        return tuple((0, n) for n in t.shape)
    mesh = t.device_mesh
    return _shard_region(tuple(t.shape), tuple(mesh.shape), mesh.get_coordinate(), tuple(t.placements))


def every_region(t: Tensor) -> list[tuple[tuple[int, int], ...]]:
    """The distinct regions of ``t`` the processes hold (:func:`local_region` of each mesh coordinate).

    Known on every process without a collective, from the mesh's shape and the placements; a
    replicated mesh dimension repeats a region, which is listed once.  Weights of one shape and
    layout share the answer (a transformer's layers are worked out once).

    Example::

        >>> every_region(torch.zeros(3, 4))
        [((0, 3), (0, 4))]
    """
    if not is_sharded(t):
        return [local_region(t)]
    return list(_regions(tuple(t.shape), tuple(t.device_mesh.shape), tuple(t.placements)))


@functools.lru_cache(maxsize=256)
def _regions(shape: tuple[int, ...], mesh_shape: tuple[int, ...], placements: tuple) -> tuple:
    """:func:`every_region` of a tensor of ``shape`` laid out by ``placements`` on a mesh of ``mesh_shape``."""
    spans = [range(1) if p.is_replicate() else range(n) for n, p in zip(mesh_shape, placements, strict=True)]
    regions: dict[tuple, None] = {}
    for coordinate in itertools.product(*spans):
        regions[_shard_region(shape, mesh_shape, list(coordinate), placements)] = None
    return tuple(regions)


def counted_here(t: Tensor) -> bool:
    """Whether this process's part of ``t`` is counted in statistics summed over all processes.

    Each shard counts on exactly one process: on the copy of ``t``'s mesh that holds global rank
    0, at coordinate 0 of every mesh dimension ``t`` is replicated on.  A plain tensor (the same
    on every process) counts on rank 0.
    """
    if not dist.is_initialized():
        return True
    if not is_sharded(t):
        return dist.get_rank() == 0
    mesh = t.device_mesh
    if not bool((mesh.mesh == 0).any()):
        return False  # another copy of this mesh (another tensor-parallel rank, say) counts these shards
    coordinate = mesh.get_coordinate() or ()
    # FSDP2 over tensor parallelism shards with ``_StridedShard``, which is not ``is_shard()``: test for copies
    return all(c == 0 for c, p in zip(coordinate, t.placements, strict=True) if p.is_replicate())


class ProcessGroupReducer:
    """The reduce step over every process that holds a part of the weights: one all-reduce per call.

    Statistics are summed (or maxed) over the whole process group (by default, all processes),
    each shard counted on one process only (:func:`counted_here`): a weight sharded on a 2-D
    mesh, one sharded on a sub-mesh and replicated on the other dimension, and whole weights
    ranked together with sharded ones all come out as one process would count them, in one
    collective for all of them.
    """

    local = False

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group

    @classmethod
    def for_weight(cls, weight: Tensor) -> ProcessGroupReducer:
        """The reducer for ``weight``'s statistics: over all processes (the mesh must span them)."""
        mesh = weight.device_mesh
        root = mesh._get_root_mesh() if hasattr(mesh, "_get_root_mesh") else mesh
        if root.size() != dist.get_world_size():
            raise NotImplementedError(
                f"the weights' device mesh spans {root.size()} of {dist.get_world_size()} processes (pipeline "
                "parallelism?): pruning needs every process to hold a part of the pruned weights"
            )
        return cls(None)

    def max_(self, values: Tensor) -> Tensor:  # noqa: D102
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group)
        return values

    def sum_(self, values: Tensor) -> Tensor:  # noqa: D102
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=self.group)
        return values


def kept_counts(masks: list[Tensor], reducer: Reducer) -> list[Tensor]:
    """How many elements each whole mask keeps (0-d int64 tensors): one all-reduce for all sharded masks."""
    sharded = [i for i, m in enumerate(masks) if is_sharded(m)]
    counts = [torch.count_nonzero(local(m)) for m in masks]
    if sharded:
        mine = [counts[i] * counted_here(masks[i]) for i in sharded]
        for i, total in zip(sharded, reducer.sum_(torch.stack(mine)).unbind(), strict=True):
            counts[i] = total
    return counts


def _flat_run(dims: list[tuple[int, tuple[int, int]]]) -> tuple[int, int] | None:
    """The ``[start, stop)`` a region covers in dims flattened together (``None``: not one run).

    ``dims`` holds each dim's size and this process's ``[start, stop)`` along it, outermost first.
    """
    partial = [i for i, (n, part) in enumerate(dims) if part != (0, n)]
    if not partial:
        return 0, math.prod(n for n, _ in dims)
    p = partial[0]
    if len(partial) > 1 or any(n != 1 for n, _ in dims[:p]):
        return None  # e.g. a slice of an inner dim under a whole outer one: strided, not one run
    inner = math.prod(n for n, _ in dims[p + 1 :])
    return dims[p][1][0] * inner, dims[p][1][1] * inner


def _matrix_region(
    shape: tuple[int, ...], region: tuple[tuple[int, int], ...]
) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """The rows and columns a region covers in a weight's block view (``None``: not a rectangle)."""
    dims = [(n, r) for n, r in zip(shape, region, strict=True) if n != 1]  # unit dims squeezed, as for blocks
    cols = _flat_run(dims[1:])
    return None if cols is None else (dims[0][1], cols)


def _aligned(part: tuple[int, int], step: int) -> bool:
    """Whether ``[start, stop)`` starts and stops on multiples of ``step`` (or is empty)."""
    start, stop = part
    return start == stop or (start % step == 0 and stop % step == 0)


def _tiles(rects: list[tuple[tuple[int, int], tuple[int, int]]], view: tuple[int, int]) -> bool:
    """Whether ``rects`` are the grid of a partition of ``view``'s rows and one of its columns.

    Torch gives a shard's first offset; shards whose first rows (and columns) partition the
    view, as runs, each hold exactly their run, so each shard then is the rectangle it is taken for.
    Linear in the number of shards.
    """
    full = {r for r in rects if all(a < b for a, b in r)}
    for d in (0, 1):
        end = 0
        for start, stop in sorted({r[d] for r in full}):
            if start != end:
                return False  # a gap or an overlap
            end = stop
        if end != view[d]:
            return False
    return len(full) == len({r[0] for r in full}) * len({r[1] for r in full})


def matrix_region(t: Tensor, region: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """The rows and columns ``region`` of ``t`` covers in ``t``'s block view (``None``: not a rectangle).

    Example::

        >>> matrix_region(torch.zeros(6, 2, 3), ((2, 4), (0, 2), (0, 3)))
        ((2, 4), (0, 6))
    """
    return _matrix_region(tuple(t.shape), region)


def block_view_rects(t: Tensor) -> list[tuple[tuple[int, int], tuple[int, int]]] | None:
    """Every process's rectangle of ``t``'s block view (:func:`every_region`); ``None`` if one is not a rectangle.

    Example::

        >>> block_view_rects(torch.zeros(6, 2, 3))
        [((0, 6), (0, 6))]
    """
    rects = [_matrix_region(tuple(t.shape), r) for r in every_region(t)]
    return None if any(r is None for r in rects) else rects  # type: ignore[return-value]


def check_supported(
    name: str,
    weight: Tensor,
    block_dims: tuple[int, int] | None,
    nm_m: int | None,
    input_dims: tuple[int, ...] = (),
) -> None:
    """Refuse, before training, a sharded weight whose shards split an N:M group or are not blocks' rectangles.

    Every process checks every process's shard, so all of them refuse together.  Blocks may be
    cut by shard boundaries (:mod:`lit_prune.engine.shard_blocks` completes them); each shard must
    be a rectangle of the weight's block view.  ``input_dims``: the dims an N:M weight's groups run
    along (flattened in this order).
    """
    if not is_sharded(weight) or (block_dims is None and nm_m is None):
        return
    shape, regions = tuple(weight.shape), every_region(weight)
    if block_dims is not None:
        rects, view = block_view_rects(weight), block_view_shape(shape)
        if rects is not None and _tiles(rects, view):  # type: ignore[arg-type]
            return
        bad = next((r for r in regions if _matrix_region(shape, r) is None), regions[0])
        what = (
            f"{block_dims[0]}x{block_dims[1]} blocks: its shards must be rectangles of the weight's "
            f"{view[0]}x{view[1]} block view (a run of rows or of columns)"  # type: ignore[index]
        )
        fix = "shard the weight along its first dim or its input dims only, or prune it element-wise"
    else:
        runs = [_flat_run([(shape[d], r[d]) for d in input_dims]) for r in regions]
        bad = next((r for r, run in zip(regions, runs, strict=True) if run is None or not _aligned(run, nm_m)), None)
        if bad is None:
            return
        what = f"N:M groups of {nm_m} input elements: each group must lie on one process"
        fix = (
            "choose an M that divides every shard's input elements, or shard the weight so that each shard holds "
            "whole groups (input dims divisible by the number of processes times M)"
        )
    raise NotImplementedError(
        f"weight {name!r} of shape {shape} is sharded (placements {list(weight.placements)}) so that a process "
        f"holds {[list(r) for r in bad]}, which cuts {what}; {fix}"
    )
