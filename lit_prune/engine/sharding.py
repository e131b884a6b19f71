"""Weights sharded across processes (``DTensor``, as FSDP2's ``fully_shard`` and tensor parallelism make them).

The engine works on each process's local shard; the statistics that decide a threshold are
combined by a :class:`ProcessGroupReducer` over the weights' device mesh, so every process finds
the threshold one process would find on the whole weight.  A mask is a ``DTensor`` with its
weight's mesh and placements: no process ever holds a whole weight or a whole mask.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from lit_prune.engine.reduce import Reducer

__all__ = ["ProcessGroupReducer", "check_supported", "is_sharded", "kept_counts", "local", "shard_like"]

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - older torch: nothing is sharded
    DTensor = None  # type: ignore[assignment,misc]


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


class ProcessGroupReducer:
    """The reduce step over the processes that hold shards of the weights: one all-reduce per call.

    Only sharded weights' statistics go through it (a whole weight, the same on every process,
    must not be counted once per process).  Every dimension of the weights' mesh is reduced over:
    a weight sharded on one and replicated on another is counted once per replica, which is
    refused at binding until tensor parallelism is supported.
    """

    local = False

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group

    @classmethod
    def for_weight(cls, weight: Tensor) -> ProcessGroupReducer:
        """The reducer over ``weight``'s mesh (a 1-D mesh: FSDP2's data-parallel shards)."""
        mesh = weight.device_mesh
        if mesh.ndim != 1:
            raise NotImplementedError(
                f"pruning a weight on a {mesh.ndim}-D device mesh (tensor parallelism) is not supported yet; "
                "FSDP2 (fully_shard on a 1-D mesh) is"
            )
        return cls(mesh.get_group())

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
        reduced = reducer.sum_(torch.stack([counts[i] for i in sharded]))
        for i, total in zip(sharded, reduced.unbind(), strict=True):
            counts[i] = total
    return counts


def check_supported(name: str, weight: Tensor, blocked: bool, nm: bool, prune_option: str) -> None:
    """Refuse, before training, what sharded weights cannot do yet (named, with what can)."""
    if not is_sharded(weight):
        return
    what = [w for w, bad in (("block dims", blocked), ("N:M", nm), (prune_option, prune_option != "weight")) if bad]
    if what:
        raise NotImplementedError(
            f"weight {name!r} is sharded (a DTensor): {', '.join(what)} on sharded weights is not supported yet; "
            "element-wise magnitude pruning (histogram or exact rule, threshold_decay, global_ranking, "
            "weight_sparsity_map) is"
        )
    if any(not p.is_shard() for p in weight.placements):
        raise NotImplementedError(f"weight {name!r} is replicated on part of its mesh: not supported yet")
