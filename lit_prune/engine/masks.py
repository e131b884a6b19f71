"""The mask math of TF magnitude pruning, as pure tensor functions.

Everything here takes tensors and returns tensors under ``torch.no_grad()``; nothing reads a
value back to the host, so each function runs on any device and under
``torch.compile(fullgraph=True)``.  Quantities that TF derives from the tensor's *size* and the
sparsity (the target count ``K``, the top-k ``k``) are computed on the host from Python numbers,
which needs no synchronisation.

Thresholds (per weight, on the scores ``a = |w|`` or a saliency):

* :func:`histogram_threshold` - TF r1.11-r1.13 ``_update_mask``: ``nbins`` equal-width bins over
  ``[0, max a]``, bin ``= clip(floor(nbins * (a / max)), 0, nbins - 1)`` in float32, ``j = #{i :
  cdf_i < s}``, threshold ``= (j / nbins) * max`` in float32; the mask is ``a > threshold``.
* :func:`exact_threshold` - TF r1.14+: the ``k = round(n * (1 - s))``-th largest score (round half
  to even), mask ``a >= threshold``.

Blocks (TF ``_maybe_update_block_mask``): :func:`block_pool` pools a 2-D score matrix in
``block_height x block_width`` blocks that start at row and column 0 (an edge block is pooled over
its real elements only), :func:`expand_blocks` maps the block mask back.
"""

from __future__ import annotations

import functools
import math
import struct

import torch
from torch import Tensor

from lit_prune.backends.cpu import kernels as cpu_kernels
from lit_prune.engine.schedule import _f32  # float32 rounding of a host float, as TF's float32 ops round

__all__ = [
    "block_pool",
    "block_update_",
    "joint_threshold",
    "block_view_shape",
    "compute_mask",
    "decay_pair",
    "exact_threshold",
    "expand_blocks",
    "histogram_threshold",
    "histogram_target_count",
    "kernel_targets",
    "magnitude_update_",
    "resolve_block_dims",
    "smooth_threshold",
    "topk_count",
]


# ---------------------------------------------------------------------- counts from size and sparsity
@functools.lru_cache(maxsize=4096)  # a pure function of two numbers, asked for every weight at every update
def histogram_target_count(numel: int, sparsity: float) -> int:
    """``K = min{c : float32(c) / float32(n) >= float32(s)}``: the cumulative count at which TF's CDF reaches s.

    TF's threshold bin is ``j = #{i : cdf_i < s}`` with ``cdf_i = C_i / n`` in float32 and ``C_i``
    the number of scores in bins ``0..i``; as ``C_i`` grows with ``i``, ``j = #{i : C_i < K}``.

    Example::

        >>> histogram_target_count(100, 0.5), histogram_target_count(10, 0.0)
        (50, 0)
    """
    s, n = _f32(sparsity), _f32(float(numel))

    def reaches(c: int) -> bool:  # monotone in c, true at c = n (cdf = 1 > s)
        return _f32(_f32(float(c)) / n) >= s

    count = min(numel, max(0, math.ceil(s * numel)))  # within a few counts of the answer
    while count > 0 and reaches(count - 1):
        count -= 1
    while not reaches(count):
        count += 1
    return count


@functools.lru_cache(maxsize=4096)
def topk_count(numel: int, sparsity: float) -> int:
    """TF r1.14+'s ``k = int32(round(float32(n) * (1 - s)))`` (float32 ops, round half to even).

    Example::

        >>> topk_count(4, 0.375), topk_count(4, 0.625), topk_count(10, 0.96)
        (2, 2, 0)
    """
    return round(_f32(_f32(float(numel)) * _f32(1.0 - _f32(sparsity))))


# ---------------------------------------------------------------------- thresholds
def _histogram_bins(scores: Tensor, max_value: Tensor, nbins: int) -> Tensor:
    # TF pruning_utils._histogram: floor(float32(nbins) * (values / max)), clipped to [0, nbins - 1].
    # Scores are >= 0, so only the top needs clipping; fmin also maps NaN (a NaN weight, which the
    # caller reports) to a valid bin instead of an out-of-range index.
    bins = torch.div(scores, max_value).mul_(float(nbins)).floor_()
    return torch.fmin(bins, torch.tensor(float(nbins - 1), device=bins.device), out=bins)


@torch.no_grad()
def histogram_threshold(
    scores: Tensor, sparsity: float, nbins: int = 256, *, max_value: Tensor | None = None, sort_count: bool = False
) -> Tensor:
    """TF r1.11-r1.13's histogram/CDF threshold of non-negative float32 ``scores`` (a 0-d tensor).

    On the CPU a sample predicts the bin and a few exact counts confirm it.  Elsewhere (on
    accelerators, under ``torch.compile``, with ``sort_count=True`` as TF's ``use_tpu`` asks, for
    small or non-float32 scores) no histogram is built: TF's bin ``j`` is the bin of the ``K``-th
    smallest score (the cumulative counts first reach ``K`` there), taken with static shapes and
    no host read (``kthvalue`` on the CPU, a sort elsewhere).  No path uses ``torch.histc`` or
    atomics, so all are deterministic; all give the same threshold.  An all-zero ``scores`` gives
    threshold 0 (TF produced NaN there).

    Example::

        >>> w = torch.linspace(1, 100, 100)
        >>> histogram_threshold(w, 0.5, nbins=256).item(), histogram_threshold(w, 0.5, nbins=255).item()
        (50.0, 49.80392074584961)
    """
    flat = scores.reshape(-1)
    k = histogram_target_count(flat.numel(), sparsity)
    if max_value is None:
        max_value = flat.max()
    if k == 0:
        return torch.zeros((), dtype=torch.float32, device=flat.device)
    j = None
    if (
        not sort_count
        and flat.dtype == torch.float32
        and flat.numel() >= _SEARCH_MIN_NUMEL
        and _host_values_are_free(flat)
    ):
        j = _search_threshold_bin(flat, max_value, k, nbins)
    if j is None:
        j = _count_threshold_bin(flat, max_value, k, nbins)
    threshold = torch.div(j, float(nbins)).mul_(max_value)
    return torch.where(max_value > 0, threshold, torch.zeros_like(threshold))


#: Below this size the full histogram is cheaper than the search.
_SEARCH_MIN_NUMEL = 1 << 16
#: Elements in the sample that predicts the threshold bin.
_SAMPLE_SIZE = 1 << 15
#: Count passes the search may spend before it falls back to the full histogram.
_SEARCH_MAX_PASSES = 4


def _host_values_are_free(t: Tensor) -> bool:
    # Reading a CPU tensor's value costs no device synchronisation; under torch.compile it would
    # break the graph, so the compiled (and every non-CPU) path takes the sync-free histogram.
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _count_threshold_bin(flat: Tensor, max_value: Tensor, k: int, nbins: int) -> Tensor:
    """``j = #{i : C_i < K}`` without a histogram: the bin of the ``K``-th smallest score (sync-free).

    The cumulative counts ``C_i`` first reach ``K`` at the bin of the ``K``-th smallest score,
    because TF's float32 binning never decreases with the score; so ``j`` is that score's bin,
    computed with the same float32 operations.
    """
    # An all-zero tensor (max 0) would give NaN bins; divide by 1 there (the caller returns 0).
    safe = torch.where(max_value > 0, max_value, torch.ones_like(max_value))
    return _histogram_bins(_kth_smallest(flat, k), safe, nbins)


def _kth_smallest(flat: Tensor, rank: int) -> Tensor:
    """The ``rank``-th smallest (1-based) of ``flat`` as a 0-d tensor: static shapes, no host read.

    ``kthvalue`` on the CPU; a sort elsewhere (CUDA's radix sort is fast and deterministic where
    its ``kthvalue`` is slow, and a sort is what XLA compiles best).
    """
    if flat.device.type == "cpu":
        return torch.kthvalue(flat, rank).values
    return torch.sort(flat).values[rank - 1]


def _search_threshold_bin(flat: Tensor, max_value: Tensor, k: int, nbins: int) -> Tensor | None:
    """The same ``j`` from a sample and two or three exact counts (CPU; ``None`` = use the histogram).

    ``j`` is the bin of the ``K``-th smallest score.  A strided sample predicts it; the bins
    below ``i`` hold ``C_{i-1} = #{a < e_i}`` scores, where the edge ``e_i`` is the smallest float32
    whose TF bin is ``i`` (found exactly with TF's own float32 binning), so
    ``C_{j-1} < K <= C_j`` confirms the prediction with exact counts, moving to a neighbouring
    bin when the sample was off.
    """
    m = float(max_value)
    if not m > 0 or not math.isfinite(m):
        return None
    n = flat.numel()
    sample = flat[:: max(1, n // _SAMPLE_SIZE)]
    rank = min(sample.numel(), max(1, round(k * sample.numel() / n)))
    sample_counts = torch.bincount(_histogram_bins(sample, max_value, nbins).long(), minlength=nbins)
    j = int((sample_counts.cumsum(0) < rank).sum())  # the sample's own threshold bin
    below = torch.empty_like(flat, dtype=torch.bool)
    bits = flat.view(torch.int32)  # scores are >= 0 (from abs: no -0.0), so float32 bits order like int32

    def count_below_bin(i: int) -> int:  # C_{i-1}: scores whose bin is < i
        if i <= 0:
            return 0
        if i >= nbins:
            return n
        return int(torch.count_nonzero(torch.lt(bits, _f32_bits(_bin_edge(m, i, nbins)), out=below)))

    lower, upper = count_below_bin(j), count_below_bin(j + 1)
    for _ in range(_SEARCH_MAX_PASSES):
        if lower >= k:  # the K-th score lies in a lower bin
            j, upper, lower = j - 1, lower, count_below_bin(j - 1)
        elif upper < k:  # ... in a higher bin
            j, lower, upper = j + 1, upper, count_below_bin(j + 2)
        else:
            return torch.tensor(float(j), dtype=torch.float32)
    return None


# Float32 arithmetic on the host, exact: a float32 division or product computed in float64 and
# rounded to float32 equals the float32 operation (float64 has more than 2 * 24 + 2 bits).
def _f32_bits(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", x))[0]


def _f32_from_bits(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def _tf_bin(x: float, max_value: float, nbins: int) -> int:
    """TF's bin of one float32 score: ``min(floor(float32(nbins) * float32(x / max)), nbins - 1)``."""
    return min(math.floor(_f32(float(nbins) * _f32(x / max_value))), nbins - 1)


def _bin_edge(max_value: float, i: int, nbins: int) -> float:
    """The smallest float32 ``x >= 0`` whose TF bin is ``>= i`` (``0 < i < nbins``)."""
    edge = _f32(_f32(i / nbins) * max_value)  # within a few ulps of the edge; walk to it
    while edge > 0 and _tf_bin(edge, max_value, nbins) >= i:
        edge = _f32_from_bits(_f32_bits(edge) - 1)
    while _tf_bin(edge, max_value, nbins) < i:
        edge = _f32_from_bits(_f32_bits(edge) + 1)
    return edge


@torch.no_grad()
def exact_threshold(scores: Tensor, sparsity: float, *, static: bool = False) -> Tensor:
    """TF r1.14+'s threshold: the ``k``-th largest score, ``k = round(n * (1 - s))`` (a 0-d tensor).

    TF crashed for ``k = 0`` (``gather(-1)``); here ``k = 0`` gives the float just above the
    largest score, so every element is pruned, as the requested sparsity rounds.  ``static=True``
    keeps to ``kthvalue`` (static shapes) instead of the faster CPU band search.

    Example::

        >>> exact_threshold(torch.linspace(1, 100, 100), 0.5).item()
        51.0
    """
    flat = scores.reshape(-1).to(torch.float32)
    k = topk_count(flat.numel(), sparsity)
    if k == 0:
        return torch.nextafter(flat.max(), torch.tensor(math.inf, device=flat.device))
    if k == flat.numel():
        return flat.min()
    rank = flat.numel() - k + 1  # the threshold is the rank-th smallest score
    if not static and flat.device.type != "cuda" and flat.numel() >= _SEARCH_MIN_NUMEL and _host_values_are_free(flat):
        found = _search_kth_smallest(flat, rank)
        if found is not None:
            return found
    return _kth_smallest(flat, rank)


def _search_kth_smallest(flat: Tensor, rank: int) -> Tensor | None:
    """The ``rank``-th smallest value from a sample-predicted band (CPU; ``None`` = use ``kthvalue``).

    Two sample quantiles bracket it; exact counts confirm ``#{x < lo} < rank <= #{x < hi}``, and
    the value is then the ``(rank - #{x < lo})``-th smallest of the few scores in ``[lo, hi)``.
    """
    n = flat.numel()
    sample = flat[:: max(1, n // _SAMPLE_SIZE)]
    m = sample.numel()
    center = rank * m / n
    margin = 4.0 * math.sqrt(max(center * (1 - center / m), 1.0)) + 2.0  # ~4 sigma of the sample quantile
    below = torch.empty_like(flat, dtype=torch.bool)
    ordered = torch.sort(sample).values
    lo_i, hi_i = math.floor(center - margin) - 1, math.ceil(center + margin)
    lo = ordered[lo_i] if lo_i >= 0 else None
    hi = ordered[hi_i] if hi_i < m else None
    count_lo = 0 if lo is None else int(torch.count_nonzero(torch.lt(flat, lo, out=below)))
    count_hi = n if hi is None else int(torch.count_nonzero(torch.lt(flat, hi, out=below)))
    if not count_lo < rank <= count_hi:
        return None
    in_band = torch.ge(flat, lo, out=below) if lo is not None else torch.ones_like(below)
    if hi is not None:
        in_band.logical_and_(flat < hi)
    return torch.kthvalue(flat[in_band], rank - count_lo).values


@torch.no_grad()
def joint_threshold(scores: list[Tensor], sparsity: float, method: str = "histogram", nbins: int = 256) -> Tensor:
    """One threshold for several weights ranked together, by the same rule as one weight's.

    The histogram rule bins every score over ``[0, max of all]`` and sums the counts (no
    concatenation); the exact rule takes the ``k``-th largest of all scores (a concatenated copy).

    Example::

        >>> joint_threshold([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0, 5.0, 6.0])], 0.5, "exact").item()
        4.0
    """
    flat = [s.reshape(-1).to(torch.float32) for s in scores]
    if method == "exact":
        return exact_threshold(torch.cat(flat), sparsity, static=True)
    numel = sum(f.numel() for f in flat)
    k = histogram_target_count(numel, sparsity)
    max_value = torch.stack([f.max() for f in flat]).max()
    if k == 0:
        return torch.zeros((), dtype=torch.float32, device=max_value.device)
    j = _count_threshold_bin(torch.cat(flat), max_value, k, nbins)
    threshold = torch.div(j, float(nbins)).mul_(max_value)
    return torch.where(max_value > 0, threshold, torch.zeros_like(threshold))


def smooth_threshold(current: Tensor, previous: Tensor, decay: float) -> Tensor:
    """TF's threshold EMA ``(1 - d) * current + d * previous`` in float32 (``d = 0`` returns ``current``).

    Example::

        >>> smooth_threshold(torch.tensor(51.0), torch.tensor(0.0), 0.9).item()
        5.099999904632568
    """
    if decay == 0.0:
        return current
    return current * _f32(1.0 - decay) + previous * _f32(decay)


def kernel_targets(sizes: list[int], sparsities: list[float], method: str) -> list[int]:
    """What the fused kernels rank for: TF's ``K`` per weight (``"histogram"``), or the kept count (``"exact"``).

    Example::

        >>> kernel_targets([10, 10], [0.5, 0.25], "histogram"), kernel_targets([10], [0.25], "exact")
        ([5, 3], [8])
    """
    if method not in ("histogram", "exact"):
        raise ValueError(f"method must be 'histogram' or 'exact', got {method!r}")
    count = histogram_target_count if method == "histogram" else topk_count
    return [count(n, float(s)) for n, s in zip(sizes, sparsities, strict=True)]


def decay_pair(threshold_decay: float) -> tuple[float, float] | None:
    """The float32 weights ``(1 - d, d)`` of TF's threshold moving average, ``None`` for ``d = 0`` (none).

    Example::

        >>> decay_pair(0.0), decay_pair(0.5)
        (None, (0.5, 0.5))
    """
    return None if threshold_decay == 0.0 else (_f32(1.0 - threshold_decay), _f32(threshold_decay))


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


def _smoothed_threshold_and_cut(
    current: Tensor, max_score: Tensor, previous: Tensor, decay: float
) -> tuple[Tensor, Tensor]:
    """TF's EMA of the threshold, and the value the scores are compared with (elementwise over weights).

    An all-zero weight (``max_score`` 0) gets threshold 0 (smoothed) and cut -1, so it keeps its
    whole mask.
    """
    current = torch.where(max_score > 0, current, torch.zeros_like(current))
    threshold = smooth_threshold(current, previous.to(torch.float32), decay)
    return threshold, torch.where(max_score > 0, threshold, torch.full_like(threshold, -1.0))


# ---------------------------------------------------------------------- blocks
def block_view_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int] | None:
    """The 2-D matrix a weight of ``shape`` is block-pruned over, or ``None`` for element-wise.

    TF squeezes size-1 dimensions and block-prunes only what is then 2-D.  lit_prune does the
    same, and prunes a tensor with more than two non-unit dimensions (a conv kernel
    ``[out, in, kh, kw]``) over its ``[out, in * kh * kw]`` view; TF always fell back to
    element-wise for those.

    Example::

        >>> block_view_shape((8, 3, 3, 3)), block_view_shape((8, 4, 1, 1)), block_view_shape((8, 1))
        ((8, 27), (8, 4), None)
    """
    dims = [d for d in shape if d != 1]
    if len(dims) < 2:
        return None
    return dims[0], math.prod(dims[1:])


def resolve_block_dims(block_dims: tuple[int, int], matrix_shape: tuple[int, int]) -> tuple[int, int]:
    """Replace -1 by the matrix's own dimension (per weight: TF resolved it once, for all weights).

    Example::

        >>> resolve_block_dims((-1, 2), (6, 4))
        (6, 2)
    """
    return tuple(m if b == -1 else b for b, m in zip(block_dims, matrix_shape, strict=True))  # type: ignore[return-value]


@torch.no_grad()
def block_pool(scores: Tensor, block_dims: tuple[int, int], pooling: str = "AVG") -> Tensor:
    """Pool a 2-D score matrix over ``block_dims`` blocks that start at row and column 0.

    ``AVG`` divides each block's sum by the number of real elements it holds, so an edge block
    that the shape cuts short is the average of what is there (summed in float64 on CPU and CUDA,
    rounded to float32 once); ``MAX`` takes the largest score.
    The output has ``ceil(H / bh) x ceil(W / bw)`` entries.

    Example::

        >>> block_pool(torch.tensor([[2.0, 2.0], [2.0, 2.0], [3.0, 3.0]]), (2, 2))
        tensor([[2.],
                [3.]])
    """
    rows, cols = scores.shape
    bh, bw = block_dims
    hb, wb = cpu_kernels.block_grid(scores.shape, block_dims)
    padded = scores
    if hb * bh != rows or wb * bw != cols:
        padded = torch.nn.functional.pad(scores, (0, wb * bw - cols, 0, hb * bh - rows))
    blocks = padded.reshape(hb, bh, wb, bw)
    if pooling == "MAX":
        return blocks.amax(dim=(1, 3))
    if pooling != "AVG":
        raise ValueError(f"`block_pooling_function` must be one of ['AVG', 'MAX'], got {pooling!r}")
    # float64 sums where the device has them: the mean is then correctly rounded to float32 whatever
    # the summation order, so the fused CPU kernel (lit_prune.backends.cpu.kernels.block_pool) gives the same.
    wide = torch.float64 if scores.device.type in ("cpu", "cuda") else torch.float32
    sums = blocks.sum(dim=(1, 3), dtype=wide)
    if hb * bh == rows and wb * bw == cols:
        return (sums / float(bh * bw)).to(torch.float32)
    row_n = torch.full((hb,), float(bh), dtype=wide, device=scores.device)
    col_n = torch.full((wb,), float(bw), dtype=wide, device=scores.device)
    row_n[-1] = rows - (hb - 1) * bh
    col_n[-1] = cols - (wb - 1) * bw
    return (sums / torch.outer(row_n, col_n)).to(torch.float32)


def expand_blocks(block_mask: Tensor, block_dims: tuple[int, int], shape: tuple[int, ...]) -> Tensor:
    """Map a block mask back to the weight: each block's value on its ``bh x bw`` cells, cropped.

    Example::

        >>> expand_blocks(torch.tensor([[True], [False]]), (2, 2), (3, 2)).int()
        tensor([[1, 1],
                [1, 1],
                [0, 0]], dtype=torch.int32)
    """
    hb, wb = block_mask.shape
    bh, bw = block_dims
    rows, cols = block_view_shape(shape) or (math.prod(shape), 1)
    full = block_mask[:, None, :, None].expand(hb, bh, wb, bw).reshape(hb * bh, wb * bw)
    return full[:rows, :cols].reshape(shape)


# ---------------------------------------------------------------------- the per-weight update
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
    blocks of :func:`block_view_shape` first (element-wise if the weight is not 2-D after
    squeezing); the threshold then lives in pooled space, as in TF.  The mask is a
    ``torch.bool`` tensor of ``scores.shape`` (written into ``out`` if given).  ``sort_count``
    (TF's ``use_tpu``) keeps both thresholds to static shapes and no host reads.  ``max_score``, the
    largest ranked score, may be passed in when the caller already has it (element-wise only).
    An all-zero weight has nothing to rank and keeps its whole mask (TF's threshold was NaN).

    Example::

        >>> t, m, _ = compute_mask(torch.tensor([-4.0, 3.0, -2.0, 1.0]).abs(), torch.tensor(0.0), 0.5)
        >>> m
        tensor([ True,  True, False, False])
    """
    scores32 = scores if scores.dtype == torch.float32 else scores.to(torch.float32)
    view = block_view_shape(scores.shape) if block_dims != (1, 1) else None
    if view is not None:
        dims = resolve_block_dims(block_dims, view)
        ranked = block_pool(scores32.reshape(view), dims, pooling)
        max_score = None
    else:
        ranked = scores32
    if max_score is None:
        max_score = ranked.max()
    if method == "histogram":
        current = histogram_threshold(ranked, sparsity, nbins, max_value=max_score, sort_count=sort_count)
    elif method == "exact":
        current = exact_threshold(ranked, sparsity, static=sort_count)
    else:
        raise ValueError(f"`threshold_method` must be one of ['histogram', 'exact'], got {method!r}")
    threshold, cut = _smoothed_threshold_and_cut(current, max_score, previous_threshold, threshold_decay)
    compare = torch.gt if method == "histogram" else torch.ge
    if view is None:
        keep = compare(ranked, cut, out=out) if out is not None else compare(ranked, cut)
    else:
        keep = expand_blocks(compare(ranked, cut), dims, tuple(scores.shape))
        if out is not None:
            keep = out.copy_(keep)
    return threshold, keep, max_score
