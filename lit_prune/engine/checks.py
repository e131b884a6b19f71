"""The check step of a mask update: a weight holding NaN or Inf keeps its mask, and the user is told.

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
from typing import Any

import torch
from torch import Tensor

__all__ = ["DeferredCheck", "raise_nonfinite"]


def raise_nonfinite(names: list[str], step: int) -> None:
    """Raise the ``FloatingPointError`` naming the non-finite pruned weights (masks left unchanged)."""
    raise FloatingPointError(f"NaN or Inf in pruned weight(s) {names} at step {step}; masks left unchanged")


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
