"""Fused CPU kernels for TF's magnitude mask update, built from ``kernels.c`` at first use.

A mask update in eager PyTorch chains a dozen passes over each weight (``abs``, compares into bool
tensors, counts, the mask, the zeroing).  :func:`magnitude_update` does the same work for every
weight of a model in one call, split across ``torch.get_num_threads()`` threads, in two passes
over the weights.  Both rules hang on one order statistic of ``|w|`` (TF's histogram bin is the
bin of the K-th smallest score), and a sample of each weight first predicts a narrow band of
``|w|`` around it.  The first pass writes nothing: it reads each weight as its current mask leaves it, takes
its maximum (and finds Inf and NaN, before anything is written), counts the scores below the band
and copies those inside it (a few per cent).  TF r1.11-r1.13's threshold bin, or TF r1.14+'s exact
threshold, then comes from that copy, exactly; where the band missed (checked exactly), a counting
pass at the float32 bin edges takes over.  The second pass writes the masks and zeroes the pruned
weights (those the current mask prunes too).  :func:`block_pool` and
:func:`expand_blocks_and_zero` do the same for block pruning, :func:`nm_update` for N:M.

The C source is compiled with the system's C compiler (``cc``, or ``$CC``) into a per-user cache
(``$LIT_PRUNE_CACHE``, else ``$XDG_CACHE_HOME/lit_prune`` or ``~/.cache/lit_prune``; only a
directory of the user's own is trusted) and loaded with :mod:`ctypes` when first asked for (by
:func:`available` or a kernel), not at import: see :mod:`lit_prune.backends.cpu.build`.  It needs
no Python headers; the first build takes about two seconds.  Without a compiler, or with
``LIT_PRUNE_NATIVE=0``, :func:`available` is ``False`` and the engine keeps its eager PyTorch path,
which gives the same masks (tested bit for bit).

Example::

    >>> w, mask = torch.linspace(-1, 1, 1 << 17), torch.ones(1 << 17, dtype=torch.bool)
    >>> if available():  # TF's histogram rule at 50 %: K = 2**16, threshold bin 127 of 256
    ...     threshold = torch.zeros(())  # the last update's threshold, replaced by the new one
    ...     found = magnitude_update([w], [mask], [1 << 16], [threshold], exact=False, nbins=256, decay=None)
    ...     assert found.thresholds == [127 / 256] == [threshold.item()] and found.kept == [int((w != 0).sum())]
"""

from __future__ import annotations

import ctypes
import math
from functools import cache
from typing import NamedTuple

import torch
from torch import Tensor

from lit_prune.backends.cpu import build
from lit_prune.backends.cpu.build import native_enabled
from lit_prune.engine.blocks import block_grid

__all__ = [
    "BlockBatch",
    "FusedUpdate",
    "MagnitudeBatch",
    "MaskBatch",
    "NonFiniteWeights",
    "available",
    "block_grid",
    "block_pool",
    "eligible",
    "fits",
    "expand_blocks_and_zero",
    "magnitude_update",
    "native_enabled",
    "nm_update",
    "release_scratch",
    "threshold_fits",
]

_I64P = ctypes.POINTER(ctypes.c_int64)
_I32P = ctypes.POINTER(ctypes.c_int32)
_F32P = ctypes.POINTER(ctypes.c_float)


class FusedUpdate(NamedTuple):
    """What :func:`magnitude_update` found: per weight, the new threshold, the kept count, the counting passes."""

    thresholds: list[float]
    kept: list[int]
    passes: list[int]


class NonFiniteWeights(FloatingPointError):
    """Weights holding Inf or NaN, found by :func:`magnitude_update` before it changed anything."""

    def __init__(self, indices: list[int]) -> None:
        super().__init__(f"NaN or Inf in weight(s) {indices}")
        self.indices = indices


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Give the library's functions their C signatures."""
    lib.lp_magnitude_update.restype = ctypes.c_int
    lib.lp_magnitude_update.argtypes = [
        ctypes.c_int64, _I64P, _I64P, _I64P, ctypes.c_char_p, _I64P, _I64P, ctypes.c_int, ctypes.c_float,
        ctypes.c_float, ctypes.c_int, ctypes.c_int64, ctypes.c_int, _F32P, _F32P, _I64P, _I64P,
    ]  # fmt: skip
    lib.lp_nm_update.restype = ctypes.c_int
    lib.lp_nm_update.argtypes = [
        ctypes.c_int64, _I64P, _I64P, _I64P, ctypes.c_char_p, _I64P, _I64P, _I64P, ctypes.c_int, ctypes.c_int, _F32P,
        _F32P, _I64P,
    ]  # fmt: skip
    lib.lp_apply_masks.restype = ctypes.c_int
    lib.lp_apply_masks.argtypes = [ctypes.c_int64, _I64P, _I64P, _I64P, ctypes.c_char_p, ctypes.c_int]
    lib.lp_release_scratch.restype = None
    lib.lp_release_scratch.argtypes = []
    lib.lp_block_pool.restype = ctypes.c_int
    lib.lp_block_pool.argtypes = [
        ctypes.c_int64, _I64P, _I64P, _I64P, _I64P, _I64P, ctypes.c_int, _I64P, _I64P, ctypes.c_int, ctypes.c_char_p
    ]  # fmt: skip
    lib.lp_block_expand_zero.restype = ctypes.c_int
    lib.lp_block_expand_zero.argtypes = [
        ctypes.c_int64, _I64P, _I64P, _I64P, _I64P, _I64P, _I64P, _I64P, ctypes.c_char_p, ctypes.c_int, _I64P
    ]  # fmt: skip
    return lib


@cache
def _library() -> ctypes.CDLL | None:
    """The loaded library with its signatures declared (built at the first call); ``None`` where it cannot be."""
    lib = build.load()
    return None if lib is None else _declare(lib)


def available() -> bool:
    """Whether the kernels are built and loaded (``False`` without a C compiler or with ``LIT_PRUNE_NATIVE=0``)."""
    return _library() is not None


def fits(t: Tensor) -> bool:
    """Whether the kernels can work on ``t`` in place: a contiguous float32 CPU tensor (see also :func:`eligible`)."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


def eligible(t: Tensor) -> bool:
    """Whether the kernels can work on ``t`` now: it :func:`fits`, they are built, and not inside ``torch.compile``."""
    return fits(t) and not torch.compiler.is_compiling() and available()


def _loaded() -> ctypes.CDLL:
    """The library, where it can run (built, and not inside ``torch.compile``); else a ``RuntimeError``."""
    lib = _library()
    if lib is None:
        raise RuntimeError("lit_prune CPU kernels are not available (no C compiler, or LIT_PRUNE_NATIVE=0)")
    if torch.compiler.is_compiling():
        raise RuntimeError("lit_prune CPU kernels cannot run inside torch.compile")
    return lib


def _check_weight(i: int, w: Tensor) -> None:
    if not fits(w):
        raise ValueError(f"weight {i} must be a contiguous float32 CPU tensor, got {w.dtype} on {w.device}")


def _check_mask(i: int, m: Tensor, numel: int) -> None:
    if m.dtype != torch.bool or m.device.type != "cpu" or not m.is_contiguous() or m.numel() != numel:
        raise ValueError(f"mask {i} must be a contiguous CPU torch.bool tensor of {numel} elements")


def threshold_fits(t: Tensor) -> bool:
    """Whether :func:`magnitude_update` can read and write threshold ``t`` in place: one float32 on the CPU."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.numel() == 1


def _check_lengths(n: int, **fields: list | None) -> None:
    """Each list given (``None``: not given) has one entry per weight."""
    for field, values in fields.items():
        if values is not None and len(values) != n:
            raise ValueError(f"`{field}` must have one entry per weight ({n}), got {len(values)}")


def _threshold_pointers(thresholds: list[Tensor]) -> ctypes.Array:
    """Where the kernels read and write each threshold, once each :func:`threshold_fits`."""
    for i, t in enumerate(thresholds):
        if not threshold_fits(t):
            got = f"{t.dtype} of shape {tuple(t.shape)} on {t.device}"
            raise ValueError(f"`thresholds[{i}]` must be one float32 element on the CPU, got {got}")
    return _array(ctypes.c_int64, [t.data_ptr() for t in thresholds])


def _checked_library(weights: list[Tensor], masks: list[Tensor]) -> ctypes.CDLL:
    """The library, once every weight :func:`fits` and every mask is a bool tensor of its size (raw pointers follow)."""
    lib = _loaded()
    for i, (w, m) in enumerate(zip(weights, masks, strict=True)):
        _check_weight(i, w)
        _check_mask(i, m, w.numel())
    return lib


def _array(ctype: type, values: list) -> ctypes.Array:
    return (ctype * len(values))(*values)


class MaskBatch:
    """Weights and masks checked once for the kernels, their pointer arrays kept; :meth:`apply` zeroes pruned weights.

    A model's update or mask application spends much of its time outside the kernel when each
    call checks every tensor and builds its pointer arrays anew (about half a millisecond with
    ResNet-18's 21 weights and cold caches).  A batch does that once.  It works on the storage
    its tensors had when it was built (it keeps that storage alive): build a new batch when a
    tensor is replaced (``param.data = ...``, ``module.to(...)``, a new mask); :meth:`matches`
    tells whether tensors are still the ones it holds.

    Example::

        >>> w, mask = torch.tensor([-1.0, 2.0, -3.0, 4.0]), torch.tensor([True, False, True, False])
        >>> if available():
        ...     MaskBatch([w], [mask]).apply()
        ...     assert w.tolist() == [-1.0, 0.0, -3.0, 0.0]
    """

    def __init__(self, weights: list[Tensor], masks: list[Tensor], *others: list[Tensor]) -> None:
        _checked_library(weights, masks)
        n = len(weights)
        self.sizes = [w.numel() for w in weights]
        # Aliases of the storages the pointers below point into: they stay alive with the batch.
        self._held = [t.detach() for t in [*weights, *masks, *(t for ts in others for t in ts)]]
        self._pointers = [t.data_ptr() for t in self._held]
        self._weights = _array(ctypes.c_int64, self._pointers[:n])
        self._sizes = _array(ctypes.c_int64, self.sizes)
        self._masks = _array(ctypes.c_int64, self._pointers[n : 2 * n])

    def __len__(self) -> int:
        return len(self.sizes)

    def matches(self, weights: list[Tensor], masks: list[Tensor], *others: list[Tensor]) -> bool:
        """Whether these tensors are (still) the storage this batch works on, in the same order.

        Equal pointers and sizes: each is a contiguous view of one and the same storage (weights
        are contiguous float32 CPU tensors when the batch is built, and stay so at that address).
        """
        now = [t.data_ptr() for t in [*weights, *masks, *(t for ts in others for t in ts)]]
        return now == self._pointers and [w.numel() for w in weights] == self.sizes

    def apply(self, which: list[bool] | None = None) -> None:
        """Zero the weights each mask prunes, in place (``which``: only those weights; ``None``: all).

        One read of the weights and masks; a block of 64 weights is written back only where it
        holds a non-zero weight to zero.  Pruned weights become ``+0.0``.
        """
        status = _loaded().lp_apply_masks(
            len(self.sizes), self._weights, self._sizes, self._masks, _flags(which, len(self), "which"),
            torch.get_num_threads(),
        )  # fmt: skip
        if status < 0:
            raise MemoryError("lit_prune CPU kernels: out of memory")


class MagnitudeBatch(MaskBatch):
    """A :class:`MaskBatch` with each weight's threshold: :meth:`update` runs :func:`magnitude_update` on it.

    Example::

        >>> w, mask = torch.linspace(-1, 1, 1 << 17), torch.ones(1 << 17, dtype=torch.bool)
        >>> if available():
        ...     threshold = torch.zeros(())
        ...     batch = MagnitudeBatch([w], [mask], [threshold])
        ...     found = batch.update([1 << 16], exact=False, nbins=256, decay=None)
        ...     assert found.thresholds == [127 / 256] == [threshold.item()] and batch.matches([w], [mask], [threshold])
    """

    def __init__(self, weights: list[Tensor], masks: list[Tensor], thresholds: list[Tensor]) -> None:
        _checked_library(weights, masks)
        n = len(weights)
        _check_lengths(n, thresholds=thresholds)
        self._stored = _threshold_pointers(thresholds)  # read, then overwritten, by each update
        super().__init__(weights, masks, thresholds)
        self._found = (ctypes.c_float * n)(), (ctypes.c_float * n)(), (ctypes.c_int64 * n)(), (ctypes.c_int64 * n)()

    def update(
        self,
        targets: list[int],
        *,
        exact: bool,
        nbins: int,
        decay: tuple[float, float] | None,
        apply: list[bool] | None = None,
    ) -> FusedUpdate:
        """The whole magnitude mask update of the batch's weights: see :func:`magnitude_update`."""
        lib = _loaded()
        n = len(self.sizes)
        _check_lengths(n, targets=targets, apply=apply)
        for i, (size, k) in enumerate(zip(self.sizes, targets, strict=True)):
            if not 0 <= k <= size:
                raise ValueError(f"`targets[{i}]` must be a count in [0, {size}], got {k}")
        maxima, found, kept, passes = self._found
        keep_weight, decay_weight = decay if decay is not None else (1.0, 0.0)
        status = lib.lp_magnitude_update(
            n,
            self._weights,
            self._sizes,
            self._masks,
            _flags(apply, n, "apply"),
            _array(ctypes.c_int64, targets),
            self._stored,  # read, then overwritten
            int(decay is not None),
            keep_weight,
            decay_weight,
            int(exact),
            256 if exact else nbins,
            torch.get_num_threads(),
            maxima,
            found,
            kept,
            passes,
        )
        if status < 0:
            raise MemoryError("lit_prune CPU kernels: out of memory")
        if status == 1:
            raise NonFiniteWeights([i for i, m in enumerate(maxima) if not math.isfinite(m)])
        return FusedUpdate(list(found), list(kept), list(passes))


def magnitude_update(
    weights: list[Tensor],
    masks: list[Tensor],
    targets: list[int],
    thresholds: list[Tensor],
    *,
    exact: bool,
    nbins: int,
    decay: tuple[float, float] | None,
    apply: list[bool] | None = None,
) -> FusedUpdate:
    """The whole magnitude mask update of every weight, in one call: thresholds, masks, zeroing.

    ``weights`` must :func:`fits` and ``masks`` be contiguous ``torch.bool`` tensors of the
    same sizes.  ``targets`` are TF's ``K`` (:func:`lit_prune.engine.masks.histogram_target_count`) for
    the histogram rule, or the kept counts ``k`` (:func:`lit_prune.engine.masks.topk_count`) when
    ``exact``.  ``thresholds`` hold the last update's thresholds, one float32 CPU element each
    (:func:`threshold_fits`); they are overwritten with the new ones (not on error), as the masks
    are.  ``decay`` is the float32 pair
    ``(1 - threshold_decay, threshold_decay)`` (``None``: no moving average).  Where ``apply[i]``
    is true, weight ``i`` is ranked as multiplied by its current mask, and the weights that mask
    prunes are zeroed too (in the mask pass), so the update ranks the weights the model uses.
    Returns the thresholds, the kept counts and the counting passes each weight needed (0 where
    the band of its first pass decided the threshold, see ``cpu_kernels.c``).  Updating the same
    tensors again and again, a :class:`MagnitudeBatch` saves the checks and pointer arrays.

    Raises:
        NonFiniteWeights: a weight holds Inf or NaN (found before anything is written).
    """
    _check_lengths(len(weights), targets=targets, thresholds=thresholds, apply=apply)
    return MagnitudeBatch(weights, masks, thresholds).update(
        targets, exact=exact, nbins=nbins, decay=decay, apply=apply
    )


#: The largest M the N:M kernel takes (it ranks each group of M in registers).
NM_MAX_M = 64


def nm_update(
    weights: list[Tensor],
    masks: list[Tensor],
    nm: list[tuple[int, int]],
    pruned: list[int],
    thresholds: list[Tensor],
    *,
    apply: list[bool] | None = None,
    check: bool = True,
) -> list[int]:
    """The N:M mask update of every weight, in one call, as :func:`lit_prune.engine.nm.nm_mask` gives it.

    Each group of ``M`` consecutive elements (``nm[i] = (N, M)``, ``M`` dividing the size, at most
    :data:`NM_MAX_M`) keeps its ``M - pruned[i]`` highest ``|w|`` (an equal score earlier in the
    group ranks higher); the masks are written, the pruned weights zeroed, and ``thresholds``
    (one float32 CPU element each) receive the largest pruned score (0 if none).  Where
    ``apply[i]`` is true, weight ``i`` is ranked as multiplied by its current mask first and what
    that mask prunes is zeroed too.  Two passes: Inf or NaN anywhere is found by the first, before
    anything changes (``check=False`` skips it, for a caller that has checked).  Returns the kept
    counts.

    Raises:
        NonFiniteWeights: a weight holds Inf or NaN (nothing was written).

    Example::

        >>> w, mask = torch.tensor([[0.1, -0.4, 0.3, 0.2, 5.0, 5.0, -5.0, 1.0]]), torch.ones(1, 8, dtype=torch.bool)
        >>> if available():
        ...     assert nm_update([w], [mask], [(2, 4)], [2], [torch.zeros(())]) == [4]
        ...     assert mask.int().tolist() == [[0, 1, 1, 0, 1, 1, 0, 0]] and w[0, 0] == 0 and w[0, 6] == 0
    """
    lib = _checked_library(weights, masks)
    n = len(weights)
    _check_lengths(n, nm=nm, pruned=pruned, thresholds=thresholds, apply=apply)
    for i, (w, (keep, m), p) in enumerate(zip(weights, nm, pruned, strict=True)):
        if not (1 <= keep <= m <= NM_MAX_M and w.numel() % m == 0):
            raise ValueError(f"`nm[{i}]` must be (N, M) with 1 <= N <= M <= {NM_MAX_M}, M dividing {w.numel()}")
        if not 0 <= p <= m - keep:
            raise ValueError(f"`pruned[{i}]` must be in [0, {m - keep}], got {p}")
    stored = _threshold_pointers(thresholds)
    maxima, found, kept = (ctypes.c_float * n)(), (ctypes.c_float * n)(), (ctypes.c_int64 * n)()
    status = lib.lp_nm_update(
        n,
        _array(ctypes.c_int64, [w.data_ptr() for w in weights]),
        _array(ctypes.c_int64, [w.numel() for w in weights]),
        _array(ctypes.c_int64, [m.data_ptr() for m in masks]),
        _flags(apply, n, "apply"),
        _array(ctypes.c_int64, [m for _, m in nm]),
        _array(ctypes.c_int64, pruned),
        stored,
        int(check),
        torch.get_num_threads(),
        maxima,
        found,
        kept,
    )
    if status < 0:
        raise MemoryError("lit_prune CPU kernels: out of memory")
    if status == 1:
        raise NonFiniteWeights([i for i, m in enumerate(maxima) if not math.isfinite(m)])
    return list(kept)


def release_scratch() -> None:
    """Free the calling thread's scratch buffer (the band copies :func:`magnitude_update` keeps between updates).

    The buffer holds a few per cent of the weights' size and is kept so that each update does not
    page-fault on fresh memory; the next update allocates it again.

    Example::

        >>> release_scratch()  # after training, before a long pause, to give the memory back
    """
    lib = _library()
    if lib is not None:
        lib.lp_release_scratch()


def _matrices(weights: list[Tensor], block_dims: list[tuple[int, int]]) -> tuple[ctypes.Array, ...]:
    """Pointers, rows, columns and block dims of 2-D weights, as C arrays (after the checks raw pointers need)."""
    for i, (w, (bh, bw)) in enumerate(zip(weights, block_dims, strict=True)):
        _check_weight(i, w)
        if w.dim() != 2:
            raise ValueError(f"weight {i} must be 2-D (a block view), got shape {tuple(w.shape)}")
        if bh < 1 or bw < 1:
            raise ValueError(f"block dims of weight {i} must be positive (resolve -1 first), got {(bh, bw)}")
    return (
        _array(ctypes.c_int64, [w.data_ptr() for w in weights]),
        _array(ctypes.c_int64, [w.shape[0] for w in weights]),
        _array(ctypes.c_int64, [w.shape[1] for w in weights]),
        _array(ctypes.c_int64, [d[0] for d in block_dims]),
        _array(ctypes.c_int64, [d[1] for d in block_dims]),
    )


def _flags(values: list[bool] | None, n: int, field: str) -> bytes | None:
    if values is None:
        return None
    _check_lengths(n, **{field: values})
    return bytes(bytearray(int(bool(v)) for v in values))


def _check_block_buffers(
    weights: list[Tensor], block_dims: list[tuple[int, int]], out: list[Tensor] | None, block_masks: list[Tensor] | None
) -> None:
    """Pooled-score buffers (contiguous float32 CPU) and block masks (contiguous bool) of each weight's block grid."""
    for i, (w, d) in enumerate(zip(weights, block_dims, strict=True)):
        grid = block_grid(w.shape, d)
        if out is not None and not (fits(out[i]) and tuple(out[i].shape) == grid):
            raise ValueError(f"out {i} must be a contiguous float32 CPU tensor of shape {grid}")
        b = block_masks[i] if block_masks is not None else None
        if b is not None and (b.dtype != torch.bool or not b.is_contiguous() or tuple(b.shape) != grid):
            raise ValueError(f"block mask {i} must be a contiguous torch.bool tensor of shape {grid}")


def _pool(
    n: int, arrays: tuple[ctypes.Array, ...], pooling: str, outs: ctypes.Array, masks: ctypes.Array, check_finite: bool
) -> None:
    """Run the pooling kernel; with ``check_finite``, raise :class:`NonFiniteWeights` for pooled Inf or NaN."""
    if pooling not in ("AVG", "MAX"):
        raise ValueError(f"pooling must be 'AVG' or 'MAX', got {pooling!r}")
    nonfinite = ctypes.create_string_buffer(max(1, n))
    status = _loaded().lp_block_pool(
        n, *arrays, int(pooling == "MAX"), outs, masks, torch.get_num_threads(), nonfinite
    )  # fmt: skip
    if status < 0:
        raise MemoryError("lit_prune CPU kernels: out of memory")
    if check_finite and any(nonfinite.raw[:n]):
        raise NonFiniteWeights([i for i, bad in enumerate(nonfinite.raw[:n]) if bad])


def _expand(
    n: int, arrays: tuple[ctypes.Array, ...], blocks: ctypes.Array, masks: ctypes.Array, apply: list[bool] | None
) -> list[int]:
    """Run the expand-and-zero kernel; returns the kept counts."""
    kept = (ctypes.c_int64 * n)()
    status = _loaded().lp_block_expand_zero(
        n, *arrays, blocks, masks, _flags(apply, n, "apply"), torch.get_num_threads(), kept
    )  # fmt: skip
    if status < 0:
        raise MemoryError("lit_prune CPU kernels: out of memory")
    return list(kept)


def block_pool(
    weights: list[Tensor],
    block_dims: list[tuple[int, int]],
    pooling: str,
    *,
    masks: list[Tensor | None] | None = None,
    out: list[Tensor] | None = None,
    check_finite: bool = False,
) -> list[Tensor]:
    """``AVG`` or ``MAX`` of ``|w|`` over the blocks of each 2-D weight, as :func:`lit_prune.engine.masks.block_pool`.

    Blocks start at row and column 0; an edge block the shape cuts short is pooled over its real
    elements.  ``AVG`` accumulates in float64 and rounds the mean to float32 once.  Inf and NaN
    propagate.  One pass over the weights, which must be contiguous 2-D float32 CPU tensors.
    Where ``masks[i]`` is given (a contiguous ``torch.bool`` tensor of weight ``i``'s shape),
    ``|w|`` is taken as multiplied by it, as :meth:`lit_prune.Pruning.apply_mask` would leave it
    (a masked Inf or NaN gives NaN).  ``out`` receives the pooled scores (contiguous float32
    tensors of each block grid's shape; new ones if not given) and is returned.  Pooling the same
    weights again and again, a :class:`BlockBatch` saves the checks and pointer arrays.

    Raises:
        NonFiniteWeights: with ``check_finite``, a pooled score is Inf or NaN (found in the same
            pass; ``out`` holds the pooled scores all the same).

    Example::

        >>> w = torch.tensor([[1.0, -3.0], [5.0, 7.0]])
        >>> keep = torch.tensor([[True, True], [False, True]])
        >>> if available():
        ...     assert block_pool([w], [(2, 2)], "AVG")[0].item() == 4.0
        ...     assert block_pool([w], [(2, 2)], "AVG", masks=[keep])[0].item() == 2.75
    """
    _loaded()
    arrays = _matrices(weights, block_dims)
    if out is None:
        out = [
            torch.empty(block_grid(w.shape, d), dtype=torch.float32) for w, d in zip(weights, block_dims, strict=True)
        ]
    _check_block_buffers(weights, block_dims, out, None)
    pointers = [0] * len(weights)
    if masks is not None:
        _check_lengths(len(weights), masks=masks)
        for i, (w, m) in enumerate(zip(weights, masks, strict=True)):
            if m is not None:
                _check_mask(i, m, w.numel())
                pointers[i] = m.data_ptr()
    _pool(
        len(weights), arrays, pooling, _array(ctypes.c_int64, [o.data_ptr() for o in out]),
        _array(ctypes.c_int64, pointers), check_finite,
    )  # fmt: skip
    return out


def expand_blocks_and_zero(
    weights: list[Tensor],
    block_dims: list[tuple[int, int]],
    block_masks: list[Tensor],
    masks: list[Tensor],
    *,
    apply: list[bool] | None = None,
) -> list[int]:
    """Write each weight's mask from its block mask (each block's value on its cells, cropped) and zero the pruned.

    ``block_masks`` are ``torch.bool`` tensors of the block grid, ``masks`` contiguous ``torch.bool``
    tensors of each weight's size.  Where ``apply[i]`` is true, the weights that the current mask
    (``masks[i]`` before it is overwritten) prunes are zeroed too.  Returns the kept counts.
    """
    _check_lengths(len(weights), block_masks=block_masks, masks=masks)
    _checked_library(weights, masks)
    arrays = _matrices(weights, block_dims)
    _check_block_buffers(weights, block_dims, None, block_masks)
    return _expand(
        len(weights), arrays, _array(ctypes.c_int64, [b.data_ptr() for b in block_masks]),
        _array(ctypes.c_int64, [m.data_ptr() for m in masks]), apply,
    )  # fmt: skip


class BlockBatch:
    """Block-pruned weights, their masks and their update's buffers, checked once for the block kernels.

    ``weights`` are the 2-D views of the weights (contiguous float32 CPU), ``block_dims`` their
    block dims (resolved: no -1), ``masks`` their masks (contiguous ``torch.bool``, each weight's
    size), ``pooled`` (float32) and ``block_masks`` (``torch.bool``) contiguous buffers of each
    block grid's shape.  :meth:`pool` is :func:`block_pool` into ``pooled``, :meth:`expand` is
    :func:`expand_blocks_and_zero` from ``block_masks``; the checks and pointer arrays, which cost
    about as much as a tenth of ResNet-18's block update with cold caches, are done here once.
    Like :class:`MaskBatch`, it works on the storage its tensors had when it was built and keeps
    that storage alive.

    Example::

        >>> w, mask = torch.tensor([[1.0, 1.0, 4.0, 4.0], [1.0, 1.0, 4.0, 4.0]]), torch.ones(2, 4, dtype=torch.bool)
        >>> pooled, blocks = torch.empty(1, 2), torch.empty(1, 2, dtype=torch.bool)
        >>> if available():
        ...     batch = BlockBatch([w], [(2, 2)], [mask], [pooled], [blocks])
        ...     batch.pool("AVG")
        ...     assert pooled.tolist() == [[1.0, 4.0]]
        ...     _ = blocks.copy_(torch.tensor([[False, True]]))
        ...     assert batch.expand() == [4] and w.tolist() == [[0.0, 0.0, 4.0, 4.0]] * 2
    """

    def __init__(
        self,
        weights: list[Tensor],
        block_dims: list[tuple[int, int]],
        masks: list[Tensor],
        pooled: list[Tensor],
        block_masks: list[Tensor],
    ) -> None:
        self._n = len(weights)
        _check_lengths(self._n, masks=masks, pooled=pooled, block_masks=block_masks)
        _checked_library(weights, masks)
        self._arrays = _matrices(weights, block_dims)
        _check_block_buffers(weights, block_dims, pooled, block_masks)
        self._held = [t.detach() for t in [*weights, *masks, *pooled, *block_masks]]  # kept alive with the batch
        self._masks = _array(ctypes.c_int64, [m.data_ptr() for m in masks])
        self._pooled = _array(ctypes.c_int64, [p.data_ptr() for p in pooled])
        self._blocks = _array(ctypes.c_int64, [b.data_ptr() for b in block_masks])

    def __len__(self) -> int:
        return self._n

    def pool(self, pooling: str, apply: list[bool] | None = None) -> None:
        """Pool ``|w|`` into the ``pooled`` buffers, as the current mask leaves it where ``apply[i]`` (``None``: all).

        Raises:
            NonFiniteWeights: a pooled score is Inf or NaN (the buffers hold the scores all the same).
        """
        masks = self._masks
        if apply is not None:
            _check_lengths(self._n, apply=apply)
            masks = _array(ctypes.c_int64, [m if a else 0 for m, a in zip(self._masks, apply, strict=True)])
        _pool(self._n, self._arrays, pooling, self._pooled, masks, check_finite=True)

    def expand(self, apply: list[bool] | None = None) -> list[int]:
        """Write the masks from the ``block_masks`` buffers and zero the pruned weights; returns the kept counts.

        Where ``apply[i]`` is true, the weights that the current mask prunes are zeroed too.
        """
        return _expand(self._n, self._arrays, self._blocks, self._masks, apply)
