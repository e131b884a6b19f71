"""The local-statistics step: what each process knows of its weights before the reduce step.

The maximum score of each ranked unit (combined by MAX) and whether each weight is finite; the
per-bin counts of the histogram rule come after the maxima are agreed
(:func:`lit_prune.engine.thresholds.bin_counts`, combined by SUM).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["abs_maxima"]


def _aminmax(t: Tensor) -> torch.return_types.aminmax:
    """``aminmax``, with (0, 0) for an empty tensor (a process's empty shard of a weight)."""
    if t.numel() == 0:
        zero = torch.zeros((), dtype=t.dtype, device=t.device)
        return torch.return_types.aminmax((zero, zero))
    return torch.aminmax(t)


def abs_maxima(tensors: list[Tensor]) -> list[Tensor]:
    """``max |t|`` of each tensor, one ``aminmax`` pass each and no ``|t|`` temporary (NaN where ``t`` holds NaN).

    Example::

        >>> [m.item() for m in abs_maxima([torch.tensor([-3.0, 2.0]), torch.tensor([1.0])])]
        [3.0, 1.0]
    """
    extremes = [_aminmax(t.detach()) for t in tensors]
    if len({(e.min.device, e.min.dtype) for e in extremes}) != 1:  # mixed devices or dtypes: one at a time
        return [torch.maximum(e.max, e.min.neg()) for e in extremes]
    lows, highs = torch.stack([e.min for e in extremes]), torch.stack([e.max for e in extremes])
    return list(torch.maximum(highs, lows.neg()).unbind())
