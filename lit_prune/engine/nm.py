"""N:M semi-structured masks: at most N non-zeros in every group of M consecutive input elements.

This is the pattern NVIDIA's sparse tensor cores run (2:4), and google-research's
``intra_block_sparsity`` (m-of-n).  Pure tensor functions, no host reads: they run on any device
and give the same masks on each, bit for bit (no sort, no ``topk``, no atomics).

Groups run along the weight's input (reduction) dims, as its layer's layout gives them
(:mod:`~lit_prune.engine.layouts`).  By default (``input_dims=None``) those are dims 1 and up,
the last dim of the ``[out, in * kh * kw]`` view (PyTorch's memory order: for a ``Linear`` the
input features, for a conv kernel its flattened ``in x kh x kw`` entries).  A weight stored with
its input dim first (HF ``Conv1D`` ``[in, out]``, ``ConvTranspose``) is grouped along that dim:
its scores are viewed with the input dims moved last (a transposed copy).  Within a group the
``p`` lowest scores are pruned; among equal scores the later element is pruned first (the
earlier one kept), so ties are deterministic.

Gradual, as google-research did it: at scheduled sparsity ``s`` each group prunes
``p = floor(M * s)`` elements, so a 2:4 weight goes 4:4 -> 3:4 -> 2:4 as its schedule, scaled to
its own target ``1 - N/M``, crosses 1/4 and 1/2.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "check_nm_sparse",
    "in_memory_order",
    "is_nm_sparse",
    "nm_group_view",
    "nm_groups",
    "nm_mask",
    "nm_pruned_per_group",
]

#: A weight's input dims: ``None`` for dims 1 and up (``[out, in, ...]``), an int, or consecutive ints.
Dims = int | tuple[int, ...] | None


def _dims(ndim: int, input_dims: Dims) -> tuple[int, ...]:
    if input_dims is None:
        return tuple(range(1, ndim))
    if isinstance(input_dims, int):
        return (input_dims % ndim,) if ndim else ()
    return tuple(d % ndim for d in input_dims)


def in_memory_order(ndim: int, input_dims: Dims) -> bool:
    """Whether the input dims are the trailing dims (groups of M are consecutive in memory).

    Example::

        >>> in_memory_order(2, None), in_memory_order(4, (1, 2, 3)), in_memory_order(2, 0)
        (True, True, False)
    """
    dims = _dims(ndim, input_dims)
    return bool(dims) and dims == tuple(range(ndim - len(dims), ndim))


def nm_group_view(shape: torch.Size | tuple[int, ...], m: int, input_dims: Dims = None) -> tuple[int, int] | None:
    """``(groups, M)``: the shape a weight is viewed in for N:M, or ``None`` if it cannot be.

    The weight must be at least 2-D (``[out, ...]``) and its input part (``in * kh * kw`` by
    default; the product over ``input_dims`` if given) divisible by M.

    Example::

        >>> nm_group_view((8, 16), 4), nm_group_view((8, 3, 3, 3), 4), nm_group_view((8,), 4)
        ((32, 4), None, None)
        >>> nm_group_view((16, 6), 4, input_dims=0)  # HF Conv1D [in, out]: groups along in
        (24, 4)
    """
    if len(shape) < 2:
        return None
    dims = _dims(len(shape), input_dims)
    inner = math.prod(shape[d] for d in dims)
    if not dims or inner % m:
        return None
    return math.prod(shape) // m, m


def nm_groups(t: Tensor, m: int, input_dims: Dims = None) -> Tensor:
    """``t`` as ``[groups, M]``, the groups running along its input dims (a view when they are trailing).

    Example::

        >>> nm_groups(torch.arange(8).reshape(4, 2), 4, input_dims=0).tolist()  # [in=4, out=2]
        [[0, 2, 4, 6], [1, 3, 5, 7]]
    """
    view = nm_group_view(t.shape, m, input_dims)
    if view is None:
        raise ValueError(
            f"N:M needs a weight of 2 or more dims whose input size divides by M={m}; got {tuple(t.shape)}"
        )
    if in_memory_order(t.dim(), input_dims):
        return t.reshape(view)
    dims = _dims(t.dim(), input_dims)
    return t.permute([d for d in range(t.dim()) if d not in dims] + list(dims)).reshape(view)


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
def nm_mask(scores: Tensor, m: int, pruned: int, out: Tensor | None = None, input_dims: Dims = None) -> Tensor:
    """Keep the ``M - pruned`` highest scores in every group of ``M`` consecutive input elements.

    ``scores`` has the weight's shape; groups follow :func:`nm_group_view` along ``input_dims``
    (default: dims 1 and up).  Each element's rank in its group counts the elements that beat it
    (a higher score, or an equal one earlier in the group): elementwise compares, no sort,
    identical on every device.  Groups are ranked a chunk at a time, so the temporaries stay
    small whatever the weight's size; a weight whose input dims are consecutive (every layout
    lit_prune knows) is read in place, whether they come first or last.

    Example::

        >>> nm_mask(torch.tensor([[0.1, 0.4, 0.3, 0.2, 5.0, 5.0, 5.0, 1.0]]), 4, 2).int()
        tensor([[0, 1, 1, 0, 1, 1, 0, 0]], dtype=torch.int32)
        >>> nm_mask(torch.tensor([[0.1, 5.0], [0.4, 5.0], [0.3, 5.0], [0.2, 1.0]]), 4, 2, input_dims=0).int()
        tensor([[0, 1],
                [1, 1],
                [1, 0],
                [0, 0]], dtype=torch.int32)
    """
    if nm_group_view(scores.shape, m, input_dims) is None:
        raise ValueError(
            f"N:M needs a weight of 2 or more dims whose in*kh*kw divides by M={m}; got {tuple(scores.shape)}"
        )
    if out is None:
        out = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    if pruned == 0:
        return out.fill_(True)
    dims = _dims(scores.dim(), input_dims)
    if dims != tuple(range(dims[0], dims[0] + len(dims))):  # input dims apart: ranked on a copy, moved
        order = [d for d in range(scores.dim()) if d not in dims] + list(dims)
        moved = nm_mask(scores.permute(order).contiguous(), m, pruned, input_dims=tuple(range(-len(dims), 0)))
        return out.copy_(moved.permute([order.index(d) for d in range(scores.dim())]))
    shape = _positions_view(scores.shape, dims, m)
    keep = out.view(shape) if out.is_contiguous() else torch.empty(shape, dtype=torch.bool, device=out.device)
    groups = scores.reshape(shape)
    rows = max(1, _chunk_elements(scores.device) // (m * shape[2]))
    for start in range(0, shape[0], rows):
        _keep_highest(groups[start : start + rows], m - pruned, keep[start : start + rows])
    return out if keep.data_ptr() == out.data_ptr() else out.copy_(keep.view(out.shape))


def _positions_view(shape: torch.Size, dims: tuple[int, ...], m: int) -> tuple[int, int, int]:
    """``(outer, M, inner)``: a tensor of ``shape`` with its groups along the middle dim (``dims`` consecutive)."""
    before = math.prod(shape[: dims[0]]) * math.prod(shape[d] for d in dims)
    return before // m, m, math.prod(shape[dims[-1] + 1 :])


def _chunk_elements(device: torch.device) -> int:
    """Scores ranked at a time: a MiB of them on the CPU (in cache), 64 MiB on an accelerator (few launches)."""
    return 1 << 18 if device.type == "cpu" else 1 << 24


def _keep_highest(groups: Tensor, kept: int, out: Tensor) -> None:
    """``out[g, i, c]``: whether ``groups[g, i, c]`` ranks among the ``kept`` highest of ``groups[g, :, c]``.

    Element ``i`` is beaten by a higher element, or by an equal one before it (``j < i``).
    """
    m = groups.shape[1]
    rank = torch.zeros(groups.shape, dtype=torch.uint8, device=groups.device)
    for j in range(m):
        other = groups[:, j : j + 1]
        if j:
            rank[:, :j] += torch.gt(other, groups[:, :j])
        if j + 1 < m:
            rank[:, j + 1 :] += torch.ge(other, groups[:, j + 1 :])
    torch.lt(rank, kept, out=out)


def _nonzeros_per_group(t: Tensor, m: int, input_dims: Dims = None) -> Tensor | None:
    """Non-zeros in each group of ``M`` (``None`` if ``t`` cannot be viewed in groups of ``M``)."""
    if nm_group_view(t.shape, m, input_dims) is None:
        return None
    return (nm_groups(t, m, input_dims) != 0).sum(dim=1)


def is_nm_sparse(t: Tensor, n: int, m: int, input_dims: Dims = None) -> bool:
    """Whether every group of ``M`` consecutive input elements of ``t`` holds at most ``N`` non-zeros.

    ``input_dims``: where ``t`` keeps its input dims (default dims 1 and up, ``[out, in, ...]``;
    ``0`` for an HF ``Conv1D`` weight ``[in, out]``).  A tensor whose input size does not divide
    by M is not N:M.  Reads one bool back.

    Example::

        >>> is_nm_sparse(torch.tensor([[1.0, 0.0, 2.0, 0.0]]), 2, 4), is_nm_sparse(torch.ones(1, 4), 2, 4)
        (True, False)
        >>> is_nm_sparse(torch.tensor([[1.0, 0.0, 2.0, 0.0]]).T, 2, 4, input_dims=0)
        True
    """
    counts = _nonzeros_per_group(t, m, input_dims)
    return counts is not None and bool((counts <= n).all())


def check_nm_sparse(t: Tensor, n: int, m: int, name: str = "tensor", input_dims: Dims = None) -> None:
    """Raise ``ValueError`` naming ``name`` and its first offending group unless ``t`` is N:M.

    ``input_dims`` as for :func:`is_nm_sparse`; a group's row is its output row (the other dims).

    Example::

        >>> check_nm_sparse(torch.ones(2, 4), 2, 4, "fc.weight")
        Traceback (most recent call last):
        ...
        ValueError: fc.weight is not 2:4 sparse: group 0 (row 0, input elements 0..3) holds 4 non-zeros
    """
    counts = _nonzeros_per_group(t, m, input_dims)
    if counts is None:
        raise ValueError(
            f"{name} of shape {tuple(t.shape)} cannot be {n}:{m} sparse: it needs 2+ dims and an input size "
            f"({'in*kh*kw' if input_dims is None or in_memory_order(t.dim(), input_dims) else f'dims {input_dims}'}) "
            f"divisible by {m}"
        )
    bad = torch.nonzero(counts > n)
    if bad.numel():
        g = int(bad[0, 0])
        inner = math.prod(t.shape[d] for d in _dims(t.dim(), input_dims))
        row, first = divmod(g, inner // m)
        raise ValueError(
            f"{name} is not {n}:{m} sparse: group {g} (row {row}, input elements {first * m}..{first * m + m - 1}) "
            f"holds {int(counts[g])} non-zeros"
        )
