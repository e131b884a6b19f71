"""Thresholds from scores: TF's two rules, computed from statistics that add up across tensors.

* Histogram (TF r1.11-r1.13): ``nbins`` equal-width bins over ``[0, max]``, a score's bin
  ``min(floor(float32(nbins) * float32(a / max)), nbins - 1)``; with ``C_i`` the scores in bins
  ``0..i`` and ``K`` = :func:`histogram_target_count`, the bin is ``j = #{i : C_i < K}`` and the
  threshold ``float32(j / nbins) * max``; the mask keeps ``a > threshold``.
* Exact (TF r1.14+): the ``k``-th largest score, ``k`` = :func:`topk_count`; the mask keeps
  ``a >= threshold``.

Both hang on statistics that add up over tensors (and, later, over processes): the maximum, and
counts.  So several weights ranked together (``global_ranking``) need no concatenation: their
counts are summed.  The histogram rule counts scores per bin.  The exact rule takes the ``k``-th
score: on the CPU from the few scores of the bin those counts point to; on accelerators from a
sort of one weight's scores, or, for several weights ranked together, from counts per byte of
the float32 pattern (no concatenation, no host read).  ``use_tpu`` keeps to static
shapes and sorts, as TF's TPU path did.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from lit_prune.engine.float32 import f32, f32_bits, f32_from_bits
from lit_prune.engine.scratch import Scratch

#: A float32 and an int32 buffer for :func:`bin_counts`.
Scratches = tuple[Scratch, Scratch]

__all__ = [
    "add_counts",
    "bin_counts",
    "count_values",
    "decay_pair",
    "exact_threshold",
    "exact_threshold_of",
    "histogram_target_count",
    "histogram_threshold",
    "joint_threshold",
    "kernel_targets",
    "kth_smallest",
    "kth_smallest_by_counts",
    "kth_smallest_by_counts_of",
    "kth_smallest_in_bands_of",
    "smooth_threshold",
    "threshold_bin",
    "threshold_bins",
    "topk_count",
]

#: Elements binned at a time: bounds the temporaries of :func:`bin_counts` (8 bytes per element).
_CHUNK = 1 << 20


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
    s, n = f32(sparsity), f32(float(numel))

    def reaches(c: int) -> bool:  # monotone in c, true at c = n (cdf = 1 > s)
        return f32(f32(float(c)) / n) >= s

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
    return round(f32(f32(float(numel)) * f32(1.0 - f32(sparsity))))


def kernel_targets(sizes: list[int], sparsities: list[float], method: str) -> list[int]:
    """What a rule ranks for: TF's ``K`` per weight (``"histogram"``), or the kept count ``k`` (``"exact"``).

    Example::

        >>> kernel_targets([10, 10], [0.5, 0.25], "histogram"), kernel_targets([10], [0.25], "exact")
        ([5, 3], [8])
    """
    if method not in ("histogram", "exact"):
        raise ValueError(f"method must be 'histogram' or 'exact', got {method!r}")
    count = histogram_target_count if method == "histogram" else topk_count
    return [count(n, float(s)) for n, s in zip(sizes, sparsities, strict=True)]


# ---------------------------------------------------------------------- the statistics
def histogram_bins(
    scores: Tensor,
    max_value: Tensor,
    nbins: int,
    *,
    absolute: bool = False,
    ratios: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """TF's bin of each score (int32): ``min(floor(float32(nbins) * float32(a / max)), nbins - 1)``.

    The float32 ``nbins * (a / max)`` is truncated to int32, which is the floor for ``a >= 0``, then
    clipped; a NaN (a weight reported elsewhere) lands in a valid bin.  ``absolute``: the scores
    are signed values ranked by magnitude (``|x| / max`` is ``|x / max|``: no ``|x|`` copy).
    ``ratios`` (float32) and ``out`` (int32) are buffers of the scores' size to reuse.

    Example::

        >>> histogram_bins(torch.tensor([0.0, 0.5, -1.0]), torch.tensor(1.0), 4, absolute=True)
        tensor([0, 2, 3], dtype=torch.int32)
    """
    ratio = torch.div(scores, max_value, out=ratios)
    if absolute:
        ratio.abs_()
    if out is None:
        out = torch.empty(ratio.shape, dtype=torch.int32, device=ratio.device)
    return out.copy_(ratio.mul_(float(nbins))).clamp_(0, nbins - 1)  # float -> int32 truncates


def count_values(values: Tensor, n: int) -> Tensor:
    """``#{values == v}`` for each ``v`` in ``[0, n)``, int64, for integer ``values`` in that range; no host read.

    ``bincount`` on the CPU.  Elsewhere ``bincount`` reads its input's maximum back to the host,
    so: ``histc`` over unit-wide bins (float counts, exact below 2**24 per call; the bin index
    ``v * n / n`` is exact while ``v * n < 2**24``), or, for more bins or under
    ``torch.use_deterministic_algorithms``, a scatter-add.  Integer counts: the same whatever the
    order of the adds.

    Example::

        >>> count_values(torch.tensor([0, 2, 2], dtype=torch.int32), 3).tolist()
        [1, 0, 2]
    """
    if values.device.type == "cpu":
        return torch.bincount(values, minlength=n)
    if n * n < 1 << 24 and values.numel() <= 1 << 24 and not torch.are_deterministic_algorithms_enabled():
        return torch.histc(values.to(torch.float32), bins=n, min=0, max=n).to(torch.int64)
    ones = torch.ones((), dtype=torch.int64, device=values.device).expand(values.numel())
    counts = torch.zeros(n, dtype=torch.int64, device=values.device)
    return counts.scatter_add_(0, values.reshape(-1).to(torch.int64), ones)


def add_counts(counts: Tensor, values: Tensor) -> Tensor:
    """``counts[v] += #{values == v}`` for integer ``values`` in ``[0, len(counts))``, in place (:func:`count_values`).

    Example::

        >>> add_counts(torch.zeros(3, dtype=torch.int64), torch.tensor([0, 2, 2], dtype=torch.int32)).tolist()
        [1, 0, 2]
    """
    return counts.add_(count_values(values, counts.numel()))


def _chunk(device: torch.device) -> int:
    """Elements worked on at a time: cache-sized on the CPU, large enough to keep an accelerator busy."""
    return _CHUNK if device.type == "cpu" else 1 << 24


def bin_counts(
    scores: Tensor, max_value: Tensor, nbins: int, *, absolute: bool = False, scratch: Scratches | None = None
) -> Tensor:
    """How many scores fall in each of TF's ``nbins`` bins over ``[0, max_value]`` (int64, summable).

    ``absolute``: ``scores`` are signed values ranked by magnitude (``|x| / max`` is ``|x / max|``,
    so no ``|x|`` copy is made).  ``scratch``: a float32 and an int32 buffer to reuse.  An
    all-zero ``scores`` (``max_value`` 0) puts every score in bin 0.  Works in chunks, so the
    temporaries stay small; no host read.  The bin is TF's: the float32 ``nbins * (a / max)``
    truncated (which is the floor, for ``a >= 0``) and clipped.

    Example::

        >>> bin_counts(torch.tensor([0.0, 0.1, 0.6, 1.0]), torch.tensor(1.0), 2).tolist()
        [2, 2]
        >>> bin_counts(torch.tensor([0.0, -0.1, -0.6, 1.0]), torch.tensor(1.0), 2, absolute=True).tolist()
        [2, 2]
    """
    flat = scores.reshape(-1)
    safe = torch.where(max_value > 0, max_value, torch.ones_like(max_value)).to(torch.float32)
    chunk = _chunk(flat.device)
    size = torch.Size([min(flat.numel(), chunk)])
    floats, bins = scratch or (Scratch(torch.float32), Scratch(torch.int32))
    ratios, bins = floats.take(size, flat.device), bins.take(size, flat.device)
    counts = None
    for start in range(0, max(1, flat.numel()), chunk):  # an empty shard counts nothing
        part = flat[start : start + chunk]
        n = part.numel()
        binned = histogram_bins(part, safe, nbins, absolute=absolute, ratios=ratios[:n], out=bins[:n])
        found = count_values(binned, nbins)
        counts = found if counts is None else counts.add_(found)
    return counts


def threshold_bins(counts: Tensor, targets: Tensor) -> Tensor:
    """:func:`threshold_bin` of each row of ``counts`` (``units x nbins``) for its ``targets`` entry, at once.

    Example::

        >>> threshold_bins(torch.tensor([[2, 2, 0, 1], [1, 1, 1, 1]]), torch.tensor([3, 1])).tolist()
        [1.0, 0.0]
    """
    return (counts.cumsum(1) < targets[:, None]).sum(1).to(torch.float32)


def threshold_bin(counts: Tensor, target: int) -> Tensor:
    """TF's threshold bin ``j = #{i : C_i < K}`` from per-bin counts (a float32 0-d tensor; no host read).

    Example::

        >>> threshold_bin(torch.tensor([2, 2, 0, 1]), 3).item()
        1.0
    """
    return (counts.cumsum(0) < target).sum().to(torch.float32)


# ---------------------------------------------------------------------- the rules
@torch.no_grad()
def histogram_threshold(
    scores: Tensor | list[Tensor],
    sparsity: float,
    nbins: int = 256,
    *,
    max_value: Tensor | None = None,
    sort_count: bool = False,
) -> Tensor:
    """TF r1.11-r1.13's histogram/CDF threshold of non-negative scores (a float32 0-d tensor).

    ``scores`` is one tensor, or several ranked together (their counts are summed).  The counts
    come from one binning pass (no sort, no host read); ``sort_count`` (TF's ``use_tpu``) takes
    TF's bin from the ``K``-th smallest score instead, with static shapes.  An all-zero
    ``scores`` gives threshold 0 (TF produced NaN there).

    Example::

        >>> w = torch.linspace(1, 100, 100)
        >>> histogram_threshold(w, 0.5, nbins=256).item(), histogram_threshold(w, 0.5, nbins=255).item()
        (50.0, 49.80392074584961)
    """
    parts = [s.reshape(-1).to(torch.float32) for s in (scores if isinstance(scores, list) else [scores])]
    numel = sum(p.numel() for p in parts)
    if max_value is None:
        max_value = torch.stack([p.max() for p in parts]).max()
    max_value = max_value.to(torch.float32)
    k = histogram_target_count(numel, sparsity)
    if k == 0:
        return torch.zeros((), dtype=torch.float32, device=max_value.device)
    if sort_count:
        safe = torch.where(max_value > 0, max_value, torch.ones_like(max_value))
        j = histogram_bins(kth_smallest(torch.cat(parts), k, static=True), safe, nbins).to(torch.float32)
    else:
        j = threshold_bin(sum(bin_counts(p, max_value, nbins) for p in parts), k)  # type: ignore[arg-type]
    threshold = torch.div(j, float(nbins)).mul_(max_value)
    return torch.where(max_value > 0, threshold, torch.zeros_like(threshold))


@torch.no_grad()
def exact_threshold(scores: Tensor | list[Tensor], sparsity: float, *, static: bool = False) -> Tensor:
    """TF r1.14+'s threshold: the ``k``-th largest score, ``k = round(n * (1 - s))`` (a 0-d tensor).

    ``scores`` is one tensor, or several ranked together.  TF crashed for ``k = 0``
    (``gather(-1)``); here ``k = 0`` gives the float just above the largest score, so every
    element is pruned, as the requested sparsity rounds.  ``static=True`` keeps to static shapes.

    Example::

        >>> exact_threshold(torch.linspace(1, 100, 100), 0.5).item()
        51.0
    """
    parts = [s.reshape(-1).to(torch.float32) for s in (scores if isinstance(scores, list) else [scores])]
    max_value = torch.stack([p.max() for p in parts]).max()
    return exact_threshold_of(lambda: iter(parts), sum(p.numel() for p in parts), max_value, sparsity, static=static)


def exact_threshold_of(
    parts: Callable[[], Iterator[Tensor]],
    numel: int,
    max_value: Tensor,
    sparsity: float,
    *,
    static: bool = False,
    whole: bool = False,
    scratch: Scratches | None = None,
) -> Tensor:
    """:func:`exact_threshold` of scores given as a stream: ``parts()`` yields them anew each time it is called.

    Each yielded tensor (flat, float32, ``>= 0``) need only live until the next is asked for, so
    the scores of several weights can be made one at a time in one scratch buffer.  ``whole``:
    ``parts()`` yields one tensor holding every score (one weight, in one process), which an
    accelerator sorts: on an H200 a sort took 16 ms for 176 M scores in 48 weights, the counts
    88 ms.  Otherwise (weights ranked together, or parts of a weight) the counts serve.
    """
    k = topk_count(numel, sparsity)
    if k == 0:
        return torch.nextafter(max_value, torch.full((), math.inf, device=max_value.device))
    rank = numel - k + 1  # the threshold is the rank-th smallest score
    if static or torch.compiler.is_compiling():  # a sort is what compilers handle best
        return kth_smallest(torch.cat([p.clone() for p in parts()]), rank, static=True)
    if _host_values_are_free(max_value):
        return _kth_smallest_in_band(parts, rank, max_value, scratch)
    if whole:
        return kth_smallest(next(parts()), rank, static=True)
    return kth_smallest_by_counts(parts, rank)


def kth_smallest(flat: Tensor, rank: int, *, static: bool = False) -> Tensor:
    """The ``rank``-th smallest (1-based) of ``flat`` as a 0-d tensor: static shapes, no host read.

    ``kthvalue`` on the CPU; a sort elsewhere (CUDA's radix sort is fast and deterministic where
    its ``kthvalue`` is slow, and a sort is what XLA compiles best).

    Example::

        >>> kth_smallest(torch.tensor([3.0, 1.0, 2.0]), 2).item()
        2.0
    """
    if flat.device.type == "cpu" and not static:
        return torch.kthvalue(flat, rank).values
    return torch.sort(flat).values[rank - 1]


#: Bits of the float32 pattern selected per round of :func:`kth_smallest_by_counts`.
_RADIX_BITS = 8


def kth_smallest_by_counts(parts: Callable[[], Iterator[Tensor]] | list[Tensor], rank: int) -> Tensor:
    """The ``rank``-th smallest of all non-negative float32 ``parts``: counts only, no sort, no host read.

    Non-negative float32 values order as their bit patterns do, so the value is found a byte of
    its pattern at a time, highest first: each round counts, per byte value, the scores that
    share the bytes found so far (summable over tensors and processes) and picks the byte at
    which the cumulative count reaches the rank.  Four rounds, static shapes.

    Example::

        >>> kth_smallest_by_counts([torch.tensor([5.0, 1.0]), torch.tensor([3.0, 0.0])], 3).item()
        3.0
    """
    if isinstance(parts, list):
        parts = (lambda listed: lambda: iter(listed))(parts)
    return kth_smallest_by_counts_of([parts], [rank], lambda counts: counts, next(parts()).device)[0]


#: Scores per chunk in :func:`kth_smallest_by_counts_of` on the CPU (a MiB of int32 digits: in cache).
_RADIX_CHUNK = 1 << 18


def kth_smallest_by_counts_of(
    units: list[Callable[[], Iterator[Tensor]]],
    ranks: list[int],
    reduce_sum: Callable[[Tensor], Tensor],
    device: torch.device,
) -> Tensor:
    """:func:`kth_smallest_by_counts` of several units at once; ``reduce_sum`` combines each round's counts.

    One ``reduce_sum`` per round for all units (four in all), so a sharded update makes a
    constant number of collectives.  A unit's ``rank`` counts over all processes' parts.
    """
    size = 1 << _RADIX_BITS
    found = torch.zeros(len(units), dtype=torch.int32, device=device)  # each pattern's bytes so far
    remaining = torch.stack([torch.full((), r, dtype=torch.int64, device=device) for r in ranks])  # fills
    for shift in range(32 - _RADIX_BITS, -1, -_RADIX_BITS):
        counts = torch.zeros(len(units), size + 1, dtype=torch.int64, device=device)
        for u, parts in enumerate(units):
            for part in parts():
                chunks = part.reshape(-1).split(_RADIX_CHUNK if part.device.type == "cpu" else 1 << 24)
                for chunk in chunks:  # bounded temporaries, whatever the part (fewer launches on accelerators)
                    digit = torch.bitwise_right_shift(chunk.view(torch.int32), shift)
                    outside = torch.bitwise_right_shift(digit, _RADIX_BITS) != found[u]  # another prefix
                    add_counts(counts[u], digit.bitwise_and_(size - 1).masked_fill_(outside, size))
        cumulative = reduce_sum(counts)[:, :size].cumsum(1)
        below = cumulative < remaining[:, None]
        remaining = remaining - torch.where(below, cumulative, 0).amax(1)  # counts before the chosen byte
        found = torch.bitwise_left_shift(found, _RADIX_BITS).bitwise_or_(below.sum(1).to(torch.int32))
    return found.view(torch.float32)


#: Value bins of :func:`kth_smallest_in_bands_of`'s first round (bin 0 holds the exact zeros).
_BAND_BINS = 256


def _band_index(scores: Tensor, max_value: Tensor) -> Tensor:
    """Each score's value bin: 0 for exact zeros, else ``1 + floor(score * 256 / max)`` (capped): monotonic."""
    scale = torch.where(max_value > 0, _BAND_BINS / max_value, torch.zeros_like(max_value))
    index = torch.mul(scores, scale).floor_().clamp_(max=_BAND_BINS - 1).add_(scores > 0)  # 0 stays in bin 0
    return index.to(torch.int64)


def _in_band(part: Tensor, max_value: Tensor, band: int) -> Tensor:
    """The scores of ``part`` in value bin ``band`` (a copy, made chunk by chunk)."""
    chunks = part.reshape(-1).split(_RADIX_CHUNK)
    return torch.cat([c[_band_index(c, max_value) == band] for c in chunks])


def kth_smallest_in_bands_of(
    units: list[Callable[[], Iterator[Tensor]]],
    ranks: list[int],
    maxima: Tensor,
    reduce_sum: Callable[[Tensor], Tensor],
) -> Tensor:
    """:func:`kth_smallest_by_counts_of` in two passes over the scores (CPU: boolean indexing reads back).

    A first round counts the scores in 257 value bins (exact zeros, then 256 bins up to the
    unit's maximum); the bin holding each unit's ``rank``-th score is then copied out once, and
    the byte rounds run over those copies only.  Five ``reduce_sum`` calls in all; the bins are
    monotonic in the value, so the answer is the same.

    Example::

        >>> scores = torch.tensor([0.0, 0.0, 3.0, 1.0, 2.0, 5.0])
        >>> kth_smallest_in_bands_of([lambda: iter([scores])], [4], torch.tensor([5.0]), lambda t: t).tolist()
        [2.0]
    """
    counts = torch.zeros(len(units), _BAND_BINS + 1, dtype=torch.int64)
    for u, parts in enumerate(units):
        for part in parts():
            for chunk in part.reshape(-1).split(_RADIX_CHUNK):
                add_counts(counts[u], _band_index(chunk, maxima[u]))
    cumulative = reduce_sum(counts).cumsum(1)
    bands = [int((cumulative[u] < rank).sum()) for u, rank in enumerate(ranks)]  # the bin of each rank
    inside = [
        rank - (int(cumulative[u, b - 1]) if b else 0) for u, (rank, b) in enumerate(zip(ranks, bands, strict=True))
    ]
    copies = [
        [_in_band(p, maxima[u], b) for p in parts()] if b else []
        for u, (parts, b) in enumerate(zip(units, bands, strict=True))
    ]
    streams = [lambda copy=copy: iter(copy) for copy in copies]
    found = kth_smallest_by_counts_of(streams, inside, reduce_sum, maxima.device)
    return torch.where(torch.tensor([b == 0 for b in bands]), 0.0, found)  # a rank among the zeros: 0


def _host_values_are_free(t: Tensor) -> bool:
    # Reading a CPU tensor's value costs no device synchronisation; under torch.compile it would
    # break the graph, so the compiled (and every non-CPU) path keeps to static shapes.
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _kth_smallest_in_band(
    parts: Callable[[], Iterator[Tensor]], rank: int, max_value: Tensor, scratch: Scratches | None = None
) -> Tensor:
    """The ``rank``-th smallest of all ``parts()`` from the bin its counts point to (CPU).

    256 bins over ``[0, max]`` locate the score; only the scores of that bin are copied and
    ranked.  Zeros (the pruned weights, often most of the bin of 0) are counted, not copied.
    """
    m = float(max_value)
    if not m > 0:
        return torch.zeros((), dtype=torch.float32)
    nbins = 256
    counts = sum(bin_counts(p, max_value, nbins, scratch=scratch) for p in parts())
    cumulative = counts.cumsum(0)  # type: ignore[union-attr]
    b = int((cumulative < rank).sum())
    below = int(cumulative[b - 1]) if b else 0
    low = bin_edge(m, b, nbins) if b else 0.0
    high = bin_edge(m, b + 1, nbins) if b + 1 < nbins else math.inf
    chunks = lambda: (c for p in parts() for c in p.reshape(-1).split(_RADIX_CHUNK))  # noqa: E731 - small temporaries
    if b == 0:  # exact zeros first: they are the pruned weights
        zeros = sum(int(torch.count_nonzero(c == 0)) for c in chunks())
        if rank <= zeros:
            return torch.zeros((), dtype=torch.float32)
        below, low = zeros, f32_from_bits(1)  # the smallest positive float32
    band = torch.cat([c[(c >= low) & (c < high)] for c in chunks()])
    return torch.kthvalue(band, rank - below).values


@torch.no_grad()
def joint_threshold(scores: list[Tensor], sparsity: float, method: str = "histogram", nbins: int = 256) -> Tensor:
    """One threshold for several weights ranked together, by the same rule as one weight's (no concatenation).

    Example::

        >>> joint_threshold([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0, 5.0, 6.0])], 0.5, "exact").item()
        4.0
    """
    if method == "exact":
        return exact_threshold(scores, sparsity)
    return histogram_threshold(scores, sparsity, nbins)


# ---------------------------------------------------------------------- smoothing
def smooth_threshold(current: Tensor, previous: Tensor, decay: float) -> Tensor:
    """TF's threshold EMA ``(1 - d) * current + d * previous`` in float32 (``d = 0`` returns ``current``).

    Example::

        >>> smooth_threshold(torch.tensor(51.0), torch.tensor(0.0), 0.9).item()
        5.099999904632568
    """
    if decay == 0.0:
        return current
    return current * f32(1.0 - decay) + previous * f32(decay)


def decay_pair(threshold_decay: float) -> tuple[float, float] | None:
    """The float32 weights ``(1 - d, d)`` of TF's threshold moving average, ``None`` for ``d = 0`` (none).

    Example::

        >>> decay_pair(0.0), decay_pair(0.5)
        (None, (0.5, 0.5))
    """
    return None if threshold_decay == 0.0 else (f32(1.0 - threshold_decay), f32(threshold_decay))


# ---------------------------------------------------------------------- TF's bin edges on the host
def _tf_bin(x: float, max_value: float, nbins: int) -> int:
    """TF's bin of one float32 score: ``min(floor(float32(nbins) * float32(x / max)), nbins - 1)``."""
    return min(math.floor(f32(float(nbins) * f32(x / max_value))), nbins - 1)


def bin_edge(max_value: float, i: int, nbins: int) -> float:
    """The smallest float32 ``x >= 0`` whose TF bin is ``>= i`` (``0 < i < nbins``).

    Example::

        >>> bin_edge(1.0, 2, 4)
        0.5
    """
    edge = f32(f32(i / nbins) * max_value)  # within a few ulps of the edge; walk to it
    while edge > 0 and _tf_bin(edge, max_value, nbins) >= i:
        edge = f32_from_bits(f32_bits(edge) - 1)
    while _tf_bin(edge, max_value, nbins) < i:
        edge = f32_from_bits(f32_bits(edge) + 1)
    return edge
