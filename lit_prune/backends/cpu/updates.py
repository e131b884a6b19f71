"""The fused CPU update of several weights as one call with the reference's arguments (thresholds, sparsities).

:func:`magnitude_update_` gives :func:`lit_prune.engine.masks.compute_mask`'s thresholds and masks
on ``|w|`` (then zeroes the pruned weights), bit for bit; :func:`block_update_` does the same
for block pruning from pooled scores.  The native backend uses them where a threshold cannot be
written in place by the kernel; the tests hold them against the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_prune.backends.cpu import kernels as cpu_kernels
from lit_prune.engine.thresholds import decay_pair, kernel_targets

__all__ = ["block_update_", "magnitude_update_"]


@torch.no_grad()
def magnitude_update_(
    weights: list[Tensor],
    thresholds: list[Tensor],
    sparsities: list[float],
    masks: list[Tensor],
    *,
    method: str = "histogram",
    nbins: int = 256,
    threshold_decay: float = 0.0,
    apply_current: list[bool] | None = None,
) -> tuple[Tensor, list[int]]:
    """The magnitude mask update of several weights in one fused call: thresholds, masks, pruned weights zeroed.

    The same thresholds and masks as :func:`compute_mask` on ``|w|`` (element-wise; ``method``
    ``"histogram"``, TF r1.11-r1.13, or ``"exact"``, TF r1.14+) followed by zeroing the pruned
    weights, bit for bit, from :func:`lit_prune.backends.cpu.kernels.magnitude_update`: one pass that
    reads every ``max |w|`` and copies the scores in a predicted band around each threshold,
    which decides it (a counting pass where the band missed), then the mask-and-zero pass.
    Every weight must :func:`lit_prune.backends.cpu.kernels.fits` and each mask be a contiguous
    ``torch.bool`` tensor of its shape.  Where ``apply_current[i]`` is true, weight ``i`` is
    taken as multiplied by its current mask first (as :meth:`lit_prune.Pruning.apply_mask`
    would); the mask pass zeroes what that mask prunes as well.  ``thresholds`` (0-d tensors)
    hold the last update's thresholds and receive the new (smoothed) ones, in place, as the masks
    do.  Returns ``(thresholds, kept counts)``: the new thresholds as one float32 vector, and the
    number of weights each mask keeps.

    Raises:
        lit_prune.backends.cpu.kernels.NonFiniteWeights: a weight holds Inf or NaN (its ``indices`` say
            which); no mask was changed (the current masks may have been applied).

    Example::

        >>> w, mask = torch.tensor([-4.0, 3.0, -2.0, 1.0]), torch.ones(4, dtype=torch.bool)
        >>> threshold = torch.tensor(0.0)
        >>> if cpu_kernels.eligible(w):
        ...     thresholds, kept = magnitude_update_([w], [threshold], [0.5], [mask])
        ...     assert kept == [2] and mask.tolist() == [True, True, False, False] and w.tolist() == [-4.0, 3.0, 0, 0]
        ...     assert threshold == thresholds[0]  # updated in place
    """
    # The kernel reads and writes float32 CPU thresholds in place; others go through a float32 copy.
    stored = [t if cpu_kernels.threshold_fits(t) else t.detach().to("cpu", torch.float32) for t in thresholds]
    found = cpu_kernels.magnitude_update(
        weights,
        masks,
        kernel_targets([w.numel() for w in weights], sparsities, method),
        stored,
        exact=method == "exact",
        nbins=nbins,
        decay=decay_pair(threshold_decay),
        apply=apply_current,
    )
    for threshold, copy in zip(thresholds, stored, strict=True):
        if copy is not threshold:
            threshold.copy_(copy)
    return torch.tensor(found.thresholds, dtype=torch.float32), found.kept


@torch.no_grad()
def block_update_(
    weights: list[Tensor],
    pooled: list[Tensor],
    thresholds: list[Tensor],
    sparsities: list[float],
    masks: list[Tensor],
    *,
    block_dims: list[tuple[int, int]],
    method: str = "histogram",
    nbins: int = 256,
    threshold_decay: float = 0.0,
    apply_current: list[bool] | None = None,
    block_masks: list[Tensor] | None = None,
) -> tuple[Tensor, list[int]]:
    """TF's block mask update of several 2-D weights on the fused CPU kernels, from their pooled scores.

    ``pooled`` comes from :func:`lit_prune.backends.cpu.kernels.block_pool` (or :func:`block_pool`) over
    ``block_dims`` (resolved: no -1) and is used as scratch.  The thresholds are those of
    :func:`compute_mask` with the same blocks (they live in pooled space, as in TF), found by
    :func:`magnitude_update_` on the pooled scores; each block mask is then expanded over its
    block and the pruned weights are zeroed in one pass.  ``weights`` and ``masks`` are the 2-D
    views; ``thresholds`` receive the new ones in place.  Where ``apply_current[i]`` is true, the
    weights that the current mask prunes are zeroed too (pool with ``masks=`` to rank them as
    zero).  ``block_masks`` (``torch.bool`` tensors of the block grids) are scratch, new if not
    given.  Returns ``(thresholds, kept counts)``.

    Example::

        >>> w = torch.tensor([[1.0, 1.0, 4.0, 4.0], [1.0, 1.0, 4.0, 4.0]])
        >>> mask = torch.ones(2, 4, dtype=torch.bool)
        >>> if cpu_kernels.available():
        ...     pooled = cpu_kernels.block_pool([w], [(2, 2)], "AVG")
        ...     _, kept = block_update_([w], pooled, [torch.tensor(0.0)], [0.5], [mask], block_dims=[(2, 2)])
        ...     assert kept == [4] and w.tolist() == [[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 4.0, 4.0]]
    """
    if block_masks is None:
        block_masks = [torch.empty(p.shape, dtype=torch.bool) for p in pooled]
    found, _ = magnitude_update_(
        pooled,
        thresholds,
        sparsities,
        block_masks,
        method=method,
        nbins=nbins,
        threshold_decay=threshold_decay,
    )
    return found, cpu_kernels.expand_blocks_and_zero(weights, block_dims, block_masks, masks, apply=apply_current)
