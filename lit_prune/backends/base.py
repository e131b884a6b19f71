"""The interface every backend implements: begin and finish a group's mask update, apply its masks.

An update runs in two halves so that nothing is written before every weight is known finite:
:meth:`Backend.begin` applies the current masks and takes the local statistics (and may find a
non-finite weight); :meth:`Backend.finish` reduces them, finds the thresholds, writes the masks
and zeroes the pruned weights.  A *fused* backend does the statistics, threshold and masks in
one native call inside ``finish``; it is only given groups whose reduce step is local.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from lit_prune.engine.plan import Group, GroupResult, UpdateRequest

__all__ = ["Backend", "Begun"]


@dataclass
class Begun:
    """What :meth:`Backend.begin` found: per-weight finiteness flags to check (``None``: it checks itself)."""

    finite: Tensor | None
    data: Any = None


class Backend(ABC):
    """Where a group's arithmetic runs."""

    #: The name in debug logs and plans.
    name: ClassVar[str]
    #: Runs statistics, threshold and masks in one call (so it needs a local reduce step).
    fused: ClassVar[bool] = False

    @abstractmethod
    def begin(self, group: Group, request: UpdateRequest) -> Begun:
        """Apply the current masks and take the local statistics; write no mask."""

    @abstractmethod
    def finish(self, group: Group, begun: Begun, request: UpdateRequest) -> GroupResult:
        """Reduce, find the thresholds, write masks and thresholds, zero the pruned weights."""

    @abstractmethod
    def apply(self, group: Group) -> None:
        """Zero the pruned weights of ``group`` (those whose mask prunes something)."""
