"""N:M semi-structured masks: at most N non-zeros in every group of M consecutive input elements.

This is the pattern NVIDIA's sparse tensor cores run (2:4), and google-research's
``intra_block_sparsity`` (m-of-n).  Pure tensor functions, no host reads: they run on any device
and give the same masks on each, bit for bit (no sort, no ``topk``, no atomics).

Groups run along the last dimension of the weight's ``[out, in * kh * kw]`` view (PyTorch's
memory order: for a ``Linear`` the input features, for a conv kernel its flattened
``in x kh x kw`` entries).  Within a group the ``p`` lowest scores are pruned; among equal scores
the later element is pruned first (the earlier one kept), so ties are deterministic.

Gradual, as google-research did it: at scheduled sparsity ``s`` each group prunes
``p = floor(M * s)`` elements, so a 2:4 weight goes 4:4 -> 3:4 -> 2:4 as its schedule, scaled to
its own target ``1 - N/M``, crosses 1/4 and 1/2.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["check_nm_sparse", "is_nm_sparse", "nm_group_view", "nm_mask", "nm_pruned_per_group"]


def nm_group_view(shape: torch.Size | tuple[int, ...], m: int) -> tuple[int, int] | None:
    """``(groups, M)``: the shape a weight is viewed in for N:M, or ``None`` if it cannot be.

    The weight must be at least 2-D (``[out, ...]``) and its ``in * kh * kw`` part divisible by M.

    Example::

        >>> nm_group_view((8, 16), 4), nm_group_view((8, 3, 3, 3), 4), nm_group_view((8,), 4)
        ((32, 4), None, None)
    """
    if len(shape) < 2:
        return None
    inner = math.prod(shape[1:])
    if inner % m:
        return None
    return shape[0] * inner // m, m


def nm_pruned_per_group(m: int, sparsity: float, n: int) -> int:
    """Elements pruned per group at ``sparsity``: ``floor(M * s)``, at most ``M - N``.

    A float32 schedule that lands a hair under ``1 - N/M`` at its end still gives ``M - N``
    (``floor`` is taken with a 1e-6 margin).

    Example::

        >>> [nm_pruned_per_group(4, s, 2) for s in (0.0, 0.2, 0.25, 0.4999999, 0.5, 0.9)]
        [0, 0, 1, 2, 2, 2]
    """
    return min(m - n, max(0, math.floor(m * sparsity + 1e-6)))


@torch.no_grad()
def nm_mask(scores: Tensor, m: int, pruned: int, out: Tensor | None = None) -> Tensor:
    """Keep the ``M - pruned`` highest scores in every group of ``M`` consecutive elements.

    ``scores`` has the weight's shape; groups follow :func:`nm_group_view`.  Each element's rank
    in its group counts the elements that beat it (a higher score, or an equal one earlier in
    the group): ``M`` elementwise passes, no sort, identical on every device.

    Example::

        >>> nm_mask(torch.tensor([[0.1, 0.4, 0.3, 0.2, 5.0, 5.0, 5.0, 1.0]]), 4, 2).int()
        tensor([[0, 1, 1, 0, 1, 1, 0, 0]], dtype=torch.int32)
    """
    view = nm_group_view(scores.shape, m)
    if view is None:
        raise ValueError(
            f"N:M needs a weight of 2 or more dims whose in*kh*kw divides by M={m}; got {tuple(scores.shape)}"
        )
    if out is None:
        out = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    if pruned == 0:
        return out.fill_(True)
    groups = scores.reshape(view)
    rank = torch.zeros(view, dtype=torch.uint8, device=scores.device)
    position = torch.arange(m, device=scores.device)
    for j in range(m):
        other = groups[:, j : j + 1]
        beats = torch.gt(other, groups)
        beats |= torch.eq(other, groups) & (position > j)  # ties: the earlier element ranks higher
        rank += beats
    torch.lt(rank, m - pruned, out=out.view(view))
    return out


def _nonzeros_per_group(t: Tensor, m: int) -> Tensor | None:
    """Non-zeros in each group of ``M`` (``None`` if ``t`` cannot be viewed in groups of ``M``)."""
    view = nm_group_view(t.shape, m)
    return None if view is None else (t.reshape(view) != 0).sum(dim=1)


def is_nm_sparse(t: Tensor, n: int, m: int) -> bool:
    """Whether every group of ``M`` consecutive input elements of ``t`` holds at most ``N`` non-zeros.

    A tensor whose input dimension does not divide by M is not N:M.  Reads one bool back.

    Example::

        >>> is_nm_sparse(torch.tensor([[1.0, 0.0, 2.0, 0.0]]), 2, 4), is_nm_sparse(torch.ones(1, 4), 2, 4)
        (True, False)
    """
    counts = _nonzeros_per_group(t, m)
    return counts is not None and bool((counts <= n).all())


def check_nm_sparse(t: Tensor, n: int, m: int, name: str = "tensor") -> None:
    """Raise ``ValueError`` naming ``name`` and its first offending group unless ``t`` is N:M.

    Example::

        >>> check_nm_sparse(torch.ones(2, 4), 2, 4, "fc.weight")
        Traceback (most recent call last):
        ...
        ValueError: fc.weight is not 2:4 sparse: group 0 (row 0, input elements 0..3) holds 4 non-zeros
    """
    counts = _nonzeros_per_group(t, m)
    if counts is None:
        raise ValueError(
            f"{name} of shape {tuple(t.shape)} cannot be {n}:{m} sparse: it needs 2+ dims and an input size "
            f"(in*kh*kw) divisible by {m}"
        )
    bad = torch.nonzero(counts > n)
    if bad.numel():
        g = int(bad[0, 0])
        row, first = divmod(g, counts.numel() // t.shape[0])
        raise ValueError(
            f"{name} is not {n}:{m} sparse: group {g} (row {row}, input elements {first * m}..{first * m + m - 1}) "
            f"holds {int(counts[g])} non-zeros"
        )
