"""The reduce step of a mask update: where statistics computed on parts of the weights are combined.

Every threshold rule of the reference pipeline is computed from statistics that add up: a
maximum (combined by MAX) and counts (combined by SUM).  In one process, or under DDP (where
every process holds the whole weights and computes the same statistics), there is nothing to
combine: :class:`LocalReducer` returns its input.  Sharded training plugs in here: a reducer
whose ``max_``/``sum_`` all-reduce over the process group that holds the shards.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

__all__ = ["LocalReducer", "Reducer"]


class Reducer(Protocol):
    """Combines per-process statistics, in place; each call is one collective for the whole model."""

    #: Whether the statistics are already whole (no collective): fused backends need this.
    local: bool

    def max_(self, values: Tensor) -> Tensor:
        """Element-wise maximum of ``values`` over the processes (in place); returns ``values``."""
        ...

    def sum_(self, values: Tensor) -> Tensor:
        """Element-wise sum of ``values`` over the processes (in place); returns ``values``."""
        ...


class LocalReducer:
    """The reduce step in one process (or under DDP, where weights are whole): nothing to combine.

    Example::

        >>> import torch
        >>> LocalReducer().sum_(torch.tensor([1, 2])).tolist()
        [1, 2]
    """

    local = True

    def max_(self, values: Tensor) -> Tensor:  # noqa: D102
        return values

    def sum_(self, values: Tensor) -> Tensor:  # noqa: D102
        return values
