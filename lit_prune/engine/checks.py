"""The check and commit steps of a mask update: a weight holding NaN or Inf keeps its mask, and the user is told.

On the CPU the finiteness flags of the whole model are read back once, before any mask changes,
and the error names every bad weight.  On an accelerator reading them back would stall the
device: the flags are copied to the host asynchronously, the new masks are committed only where
finite (``torch.where``), and the error is raised by the first later call that finds the copy
complete.  "Complete" is known from an event recorded after the copy on the device's stream
(CUDA, and any device with ``torch.Event``); where no event exists the copy is made blocking, so
the host never reads a buffer the device is still writing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lit_prune.engine.statistics import abs_maxima

if TYPE_CHECKING:
    from lit_prune.backends.base import Begun
    from lit_prune.engine.plan import Group, GroupResult, UpdateRequest
    from lit_prune.engine.state import WeightState

__all__ = ["DeferredCheck", "check_finite", "nonfinite_error", "record_kept"]


def check_finite(groups: list[Group], begun: list[Begun], request: UpdateRequest, deferred: DeferredCheck) -> None:
    """The check step: every weight finite before any mask changes (on accelerators: read back later).

    Raises:
        FloatingPointError: on the CPU, a weight holds NaN or Inf.
    """
    flagged = [(g, b.finite) for g, b in zip(groups, begun, strict=True) if b.finite is not None]
    if not flagged or request.hparams.use_tpu:  # use_tpu: no data-dependent host reads (TF's TPU path had none)
        return
    finite = torch.cat([flags for _, flags in flagged])
    if request.deferred:
        deferred.queue(finite, request.step, [n for g, _ in flagged for n in g.names])
    elif not bool(finite.all()):
        raise FloatingPointError("non-finite weights")


def nonfinite_error(states: list[WeightState], step: int) -> FloatingPointError:
    """The ``FloatingPointError`` naming every non-finite pruned weight (masks left unchanged)."""
    flags = torch.stack([torch.isfinite(m) for m in abs_maxima([s.local_param for s in states])]).tolist()
    names = [s.name for s, ok in zip(states, flags, strict=True) if not ok]
    return FloatingPointError(f"NaN or Inf in pruned weight(s) {names} at step {step}; masks left unchanged")


def record_kept(groups: list[Group], results: list[GroupResult], known: bool) -> None:
    """The commit step: which masks keep everything, from the kept counts (one host read for the whole model).

    ``known=False`` (accelerators, ``use_tpu``: nothing is read back): every mask is taken to prune something.
    """
    counted = [r.kept for r in results if isinstance(r.kept, Tensor)] if known else []
    read = iter(torch.cat(counted).tolist()) if counted else iter(())
    for group, result in zip(groups, results, strict=True):
        if not known:
            kept = [-1] * len(group.weights)
        else:
            kept = result.kept if isinstance(result.kept, list) else [next(read) for _ in group.weights]
        for s, k in zip(group.weights, kept, strict=True):
            s.dense = k == s.mask.numel()


def _event_for(device: torch.device) -> Any | None:
    """An event to record on ``device``'s current stream, or ``None`` where the device has none (the CPU)."""
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        return torch.cuda.Event()
    event_type = getattr(torch, "Event", None)
    if event_type is None:
        return None
    try:
        return event_type(device=device)
    except (RuntimeError, TypeError, ValueError):  # a device type without events (XLA, ...)
        return None


@dataclass
class _Pending:
    host: Tensor
    event: Any | None
    step: int
    names: list[str]


class DeferredCheck:
    """The finiteness flags of one accelerator update, read back when they have arrived.

    Example::

        >>> check = DeferredCheck()
        >>> check.queue(torch.tensor([True, False]), step=3, names=["a", "b"])
        >>> check.raise_if_failed()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FloatingPointError: NaN or Inf in pruned weight(s) ['b'] at the mask update of step 3; their masks ...
    """

    def __init__(self) -> None:
        self._pending: _Pending | None = None

    def queue(self, finite: Tensor, step: int, names: list[str]) -> None:
        """Start copying ``finite`` (one flag per name) to the host, without waiting for it."""
        device = finite.device
        host = torch.empty(finite.shape, dtype=torch.bool, pin_memory=device.type == "cuda")
        event = _event_for(device)
        host.copy_(finite, non_blocking=event is not None)
        if event is not None:
            event.record()
        self._pending = _Pending(host, event, step, names)

    def raise_if_failed(self, wait: bool = True) -> None:
        """Raise for a NaN/Inf found by the queued check (``wait=False``: only if it has already arrived)."""
        pending = self._pending
        if pending is None:
            return
        if pending.event is not None:
            if not wait and not pending.event.query():
                return
            pending.event.synchronize()
        self._pending = None
        if not bool(pending.host.all()):
            bad = [n for n, ok in zip(pending.names, pending.host.tolist(), strict=True) if not ok]
            raise FloatingPointError(
                f"NaN or Inf in pruned weight(s) {bad} at the mask update of step {pending.step}; their masks were "
                "left unchanged"
            )
