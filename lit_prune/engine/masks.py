"""The masks-and-zeros step: from a threshold to a mask, and the pruned weights set to zero.

A threshold is smoothed with TF's ``threshold_decay`` first; an all-zero weight (nothing to
rank) keeps its whole mask, where TF's threshold was NaN.  The histogram rule keeps scores
``> threshold``, the exact rule scores ``>= threshold``; a block mask is expanded over its blocks.
:func:`compute_mask` runs the steps from scores to mask for one weight: the reference every
backend is tested against.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lit_prune.engine.blocks import (
    block_pool,
    block_view_shape,
    expand_blocks,
    expand_blocks_into,
    resolve_block_dims,
)
from lit_prune.engine.thresholds import exact_threshold, histogram_threshold, smooth_threshold

__all__ = ["compare_for", "compute_mask", "smoothed_threshold_and_cut", "write_mask", "zero_pruned"]


def smoothed_threshold_and_cut(
    current: Tensor, max_score: Tensor, previous: Tensor, decay: float
) -> tuple[Tensor, Tensor]:
    """TF's EMA of the threshold, and the value the scores are compared with.

    An all-zero weight (``max_score`` 0) gets threshold 0 (smoothed) and cut -1, so it keeps its
    whole mask.

    Example::

        >>> smoothed_threshold_and_cut(torch.tensor(2.0), torch.tensor(0.0), torch.tensor(0.0), 0.0)
        (tensor(0.), tensor(-1.))
    """
    current = torch.where(max_score > 0, current, torch.zeros_like(current))
    threshold = smooth_threshold(current, previous.to(torch.float32), decay)
    return threshold, torch.where(max_score > 0, threshold, torch.full_like(threshold, -1.0))


def compare_for(rule: str):  # noqa: ANN201 - a torch comparison
    """``torch.gt`` for the histogram rule (TF r1.11-r1.13), ``torch.ge`` for the exact rule (TF r1.14+)."""
    if rule not in ("histogram", "exact"):
        raise ValueError(f"`threshold_method` must be one of ['histogram', 'exact'], got {rule!r}")
    return torch.gt if rule == "histogram" else torch.ge


def write_mask(
    ranked: Tensor, cut: Tensor, rule: str, shape: torch.Size, block_dims: tuple[int, int] | None, out: Tensor
) -> Tensor:
    """The mask of ``ranked`` against ``cut`` into ``out`` (of ``shape``); with ``block_dims``, ``ranked`` is pooled."""
    compare = compare_for(rule)
    if block_dims is None:
        return compare(ranked, cut, out=out.view(ranked.shape)).view(shape)
    if not out.is_contiguous():
        return out.copy_(expand_blocks(compare(ranked, cut), block_dims, tuple(shape)))
    rows, cols = block_view_shape(shape) or (math.prod(shape), 1)
    expand_blocks_into(compare(ranked, cut), block_dims, out.view(rows, cols))
    return out


#: Elements zeroed at a time on the CPU, where ``w *= uint8 mask`` first casts the mask to ``w``'s
#: dtype: a temporary the size of the chunk (1 MiB for float32), not of the weight.
_ZERO_CHUNK = 1 << 18


def zero_pruned(weight: Tensor, mask: Tensor) -> None:
    """Zero, in place, the elements of ``weight`` that ``mask`` prunes (one multiply by the 1-byte mask).

    Example::

        >>> w = torch.tensor([1.0, 2.0, 3.0])
        >>> zero_pruned(w, torch.tensor([True, False, True]))
        >>> w
        tensor([1., 0., 3.])
    """
    keep = mask.view(torch.uint8)
    if weight.device.type != "cpu" or weight.numel() <= _ZERO_CHUNK or not weight.is_contiguous():
        weight.mul_(keep)  # accelerators cast inside the kernel: no temporary
        return
    flat, keep = weight.view(-1), keep.reshape(-1)
    for start in range(0, flat.numel(), _ZERO_CHUNK):
        flat[start : start + _ZERO_CHUNK].mul_(keep[start : start + _ZERO_CHUNK])


@torch.no_grad()
def compute_mask(
    scores: Tensor,
    previous_threshold: Tensor,
    sparsity: float,
    *,
    method: str = "histogram",
    nbins: int = 256,
    threshold_decay: float = 0.0,
    block_dims: tuple[int, int] = (1, 1),
    pooling: str = "AVG",
    sort_count: bool = False,
    max_score: Tensor | None = None,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One weight's new ``(threshold, mask, max_score)`` from its non-negative ``scores``.

    ``scores`` is ``|w|`` or a saliency.  Block dims other than ``(1, 1)`` pool the scores over
    blocks of :func:`~lit_prune.engine.blocks.block_view_shape` first (element-wise if the weight
    is not 2-D after squeezing); the threshold then lives in pooled space, as in TF.  The mask is
    a ``torch.bool`` tensor of ``scores.shape`` (written into ``out`` if given).  ``sort_count``
    (TF's ``use_tpu``) keeps both thresholds to static shapes.  ``max_score``, the largest ranked
    score, may be passed in when the caller already has it (element-wise only).

    Example::

        >>> t, m, _ = compute_mask(torch.tensor([-4.0, 3.0, -2.0, 1.0]).abs(), torch.tensor(0.0), 0.5)
        >>> m
        tensor([ True,  True, False, False])
    """
    compare_for(method)
    scores32 = scores if scores.dtype == torch.float32 else scores.to(torch.float32)
    view = block_view_shape(scores.shape) if block_dims != (1, 1) else None
    dims = resolve_block_dims(block_dims, view) if view is not None else None
    ranked = block_pool(scores32.reshape(view), dims, pooling) if dims is not None else scores32
    if max_score is None or dims is not None:
        max_score = ranked.max()
    if method == "histogram":
        current = histogram_threshold(ranked, sparsity, nbins, max_value=max_score, sort_count=sort_count)
    else:
        current = exact_threshold(ranked, sparsity, static=sort_count)
    threshold, cut = smoothed_threshold_and_cut(current, max_score, previous_threshold, threshold_decay)
    if out is None:
        out = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    return threshold, write_mask(ranked, cut, method, scores.shape, dims, out), max_score
