"""The plan of a binding: the pruned weights grouped by (granularity, rule, backend), built once.

A mask update loops over the plan's groups; no ``if`` ladder runs per weight.  The plan is kept
while the tensors it was made for stay (same storage, device, dtype and shape of every weight,
mask and threshold) and rebuilt when one changes (``model.to()``, ``param.data = ...``, a loaded
mask).  Each group's backend keeps what it prepared for the group (pointer arrays, buffers) in
``Group.work``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor

from lit_prune.engine.blocks import block_view_shape
from lit_prune.engine.reduce import LocalReducer
from lit_prune.engine.scores import block_dims_of
from lit_prune.engine.shard_blocks import ShardBlocks, shard_blocks_of
from lit_prune.engine.sharding import counted_here, is_sharded, local

if TYPE_CHECKING:
    from lit_prune.backends.base import Backend
    from lit_prune.config.hparams import PruningHParams
    from lit_prune.engine.reduce import Reducer
    from lit_prune.engine.scratch import Scratch
    from lit_prune.engine.state import WeightState

__all__ = [
    "Group",
    "GroupResult",
    "Plan",
    "UpdateRequest",
    "build_plan",
    "check_one_device",
    "granularity",
    "tensors_key",
]


@dataclass
class Group:
    """Weights updated together: one granularity, one rule, one backend."""

    granularity: str
    rule: str  # "histogram", "exact" or "nm"
    backend: Backend
    weights: list[WeightState]
    reducer: Reducer  # combines the statistics of sharded weights; local for whole ones
    work: Any = None  # what the backend prepared for these tensors (made at first use)
    counted: dict[str, bool] = field(default_factory=dict)  # per weight: this process counts its part (sharding)
    blocks: dict[str, ShardBlocks] = field(default_factory=dict)  # block-pruned weights: where this shard's blocks lie

    @property
    def names(self) -> list[str]:
        """The group's weight names, in model order."""
        return [w.name for w in self.weights]


@dataclass
class Plan:
    """The groups of one binding, for the tensors described by ``key``."""

    key: tuple
    groups: list[Group]
    apply_groups: list[Group] = field(default_factory=list)  # who applies which masks in apply_mask


@dataclass
class UpdateRequest:
    """What one mask update asks of the backends."""

    step: int
    sparsities: dict[str, float]  # each weight's scheduled sparsity
    hparams: PruningHParams
    deferred: bool  # NaN/Inf read back later (accelerators): new masks are committed only where finite
    scores: Scratch  # float32 scores of one weight at a time
    staging: Scratch  # deferred: new masks land here before the commit
    counting: tuple[Scratch, Scratch]  # float32 and int32 chunks of the histogram counts


@dataclass
class GroupResult:
    """What a group's update left: each weight's kept count (``None``: not read back)."""

    kept: Tensor | list[int] | None


def granularity(state: WeightState, joint: bool) -> str:
    """How ``state`` is ranked: ``"global"`` (with others), ``"nm"``, ``"block"`` or ``"elementwise"``."""
    if joint:
        return "global"
    if state.spec.nm is not None:
        return "nm"
    blocked = state.spec.block_dims != (1, 1) and block_view_shape(state.param.shape) is not None
    return "block" if blocked else "elementwise"


def tensors_key(states: list[WeightState]) -> tuple:
    """What the plan depends on in the tensors: storage, device, dtype, shape and layout of each."""
    out = []
    for s in states:
        for t in (local(s.param), local(s.mask), s.threshold):
            out.append((t.data_ptr() if not t.is_meta else 0, t.device, t.dtype, t.shape, t.is_contiguous()))
    return tuple(out)


def check_one_device(states: list[WeightState]) -> None:
    """Raise ``NotImplementedError`` naming the devices if this process's pruned weights lie on several.

    Each update combines the statistics of a group's weights in one tensor, on one device.
    """
    devices: dict[str, list[str]] = {}
    for s in states:
        devices.setdefault(str(local(s.param).device), []).append(s.name)
    if len(devices) > 1:
        where = "; ".join(f"{device}: {names[:3]}{' ...' * (len(names) > 3)}" for device, names in devices.items())
        raise NotImplementedError(
            f"the pruned weights lie on several devices ({where}): lit_prune prunes a model that each process "
            "holds on one device (one device, DDP, or FSDP2 / tensor parallelism, whose shards each process keeps "
            "on its own device); a model split over devices by hand or by `device_map='auto'` is not supported: "
            "move it to one device, or shard it with FSDP2"
        )


def build_plan(
    states: list[WeightState],
    hparams: PruningHParams,
    reducer: Reducer,
    joint: set[str],
    choose: Callable[[WeightState, str, PruningHParams, Reducer, bool], Backend],
    choose_apply: Callable[[WeightState], Backend],
    deferred: bool,
) -> Plan:
    """Group ``states`` by (granularity, rule, backend); fused backends' groups first.

    Fused groups run first in ``finish``: they check their weights before writing anything, so
    a non-finite weight they find leaves every mask unchanged.
    """
    check_one_device(states)
    groups: dict[tuple[str, str, str, bool], Group] = {}
    joint_sharded = any(is_sharded(s.param) for s in states if s.name in joint)
    for state in states:
        kind = granularity(state, state.name in joint)
        rule = "nm" if kind == "nm" else hparams.threshold_method
        # a whole weight is the same on every process: reduced only when ranked with sharded ones
        reduced = is_sharded(state.param) or (kind == "global" and joint_sharded)
        own = reducer if reduced else LocalReducer()
        backend = choose(state, kind, hparams, own, deferred)
        group = groups.setdefault((kind, rule, backend.name, reduced), Group(kind, rule, backend, [], own))
        group.weights.append(state)
        group.counted[state.name] = own.local or counted_here(state.param)
        if kind == "block":
            group.blocks[state.name] = shard_blocks_of(state.param, block_dims_of(state))  # type: ignore[arg-type]
    appliers: dict[str, Group] = {}
    for state in states:
        backend = choose_apply(state)
        appliers.setdefault(backend.name, Group("apply", "apply", backend, [], reducer)).weights.append(state)
    ordered = sorted(groups.values(), key=lambda g: not g.backend.fused)
    return Plan((deferred, tensors_key(states)), ordered, list(appliers.values()))
