"""Fused CPU kernels for TF's magnitude mask update, built from ``cpu_kernels.c`` at first use.

A mask update in eager PyTorch chains a dozen passes over each weight (``abs``, compares into bool
tensors, counts, the mask, the zeroing).  Two hand-written passes do the same work for every weight
of a model at once, split across ``torch.get_num_threads()`` threads:

* :func:`histogram_bins` - TF r1.11-r1.13's threshold bin ``j`` of each weight, exactly: a sample
  predicts it, one counting pass at the float32 bin edges around it confirms it.
* :func:`mask_and_zero` - ``mask = |w| > cut`` (or ``>=``) and the pruned weights set to ``0``, in
  one pass.
* :func:`bin_scores` - the scores of one bin per weight, from which TF r1.14+'s exact threshold
  (a ``kthvalue``) is picked.

The C source is compiled with the system's C compiler (``cc``, or ``$CC``) into a per-user cache
(``$LIT_PRUNE_CACHE``, else ``$XDG_CACHE_HOME/lit_prune`` or ``~/.cache/lit_prune``) and loaded with
:mod:`ctypes`; it needs no Python headers and builds in well under a second.  Without a compiler,
or with ``LIT_PRUNE_NATIVE=0``, :func:`available` is ``False`` and the engine keeps its eager
PyTorch path, which gives the same masks (tested bit for bit).

Example::

    >>> w = torch.linspace(-1, 1, 1 << 17)
    >>> if available():
    ...     j = histogram_bins([w], [w.abs().max().item()], [1 << 16], nbins=256)[0]
    ...     assert j == 127.0
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["available", "bin_scores", "eligible", "histogram_bins", "mask_and_zero", "native_enabled"]

_log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("cpu_kernels.c")
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared", "-fopenmp"]
_I64P = ctypes.POINTER(ctypes.c_int64)
_I32P = ctypes.POINTER(ctypes.c_int32)
_F32P = ctypes.POINTER(ctypes.c_float)


def _cache_dir() -> Path:
    if "LIT_PRUNE_CACHE" in os.environ:
        return Path(os.environ["LIT_PRUNE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lit_prune"


def _cpu_id() -> str:
    # -march=native: a library built on one CPU may not run on another that shares the cache.
    try:
        text = Path("/proc/cpuinfo").read_text()
        return next(
            (line for line in text.splitlines() if line.startswith(("flags", "Features"))), platform.processor()
        )
    except OSError:
        return platform.processor()


def _build(compiler: str, flags: list[str]) -> Path:
    """Compile the kernels with ``flags`` into the cache (once per source, flags, compiler and CPU)."""
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), compiler.encode(), _cpu_id().encode()]))
    target = _cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename: concurrent processes (DDP ranks) never load half a file.
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            subprocess.run(
                [compiler, *flags, "-o", str(built), str(_SOURCE)], check=True, capture_output=True, timeout=120
            )
            os.replace(built, target)
    return target


def native_enabled() -> bool:
    """The ``LIT_PRUNE_NATIVE`` switch: ``'1'`` (default) or ``'0'``; anything else is a ``ValueError``.

    Checked when a :class:`~lit_prune.Pruning` is built, so a misspelt value fails before training.
    """
    switch = os.environ.get("LIT_PRUNE_NATIVE", "1")
    if switch not in ("0", "1"):
        raise ValueError(f"environment variable LIT_PRUNE_NATIVE must be '0' (off) or '1' (on), got {switch!r}")
    return switch == "1"


@cache
def _library() -> ctypes.CDLL | None:
    if not native_enabled():
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None or platform.system() != "Linux":
        _log.warning("lit_prune: no C compiler (or not Linux); CPU mask updates use the eager PyTorch path")
        return None
    errors = []
    # With OpenMP (the runtime torch has loaded) first; a compiler without it builds a one-thread library.
    for flags in (_FLAGS, [f for f in _FLAGS if f != "-fopenmp"]):
        try:
            lib = ctypes.CDLL(str(_build(compiler, flags)))
            break
        except (OSError, subprocess.SubprocessError) as error:
            detail = (getattr(error, "stderr", b"") or b"")[-500:]
            errors.append(f"{error} {detail.decode(errors='replace')}".strip())
    else:
        _log.warning("lit_prune: building the CPU kernels failed (%s); using the eager path", " | ".join(errors))
        return None
    lib.lp_histogram_bins.restype = ctypes.c_int64
    lib.lp_histogram_bins.argtypes = [
        ctypes.c_int64, _I64P, _I64P, _F32P, _I64P, ctypes.c_int64, ctypes.c_int, _F32P, _I64P
    ]  # fmt: skip
    lib.lp_gather_range.restype = ctypes.c_int
    lib.lp_gather_range.argtypes = [ctypes.c_int64, _I64P, _I64P, _I32P, _I32P, _I64P, _I64P, ctypes.c_int, _I64P]
    lib.lp_bin_range.restype = None
    lib.lp_bin_range.argtypes = [ctypes.c_float, ctypes.c_int64, ctypes.c_int64, _I32P, _I32P]
    lib.lp_mask_zero.restype = ctypes.c_int
    lib.lp_mask_zero.argtypes = [ctypes.c_int64, _I64P, _I64P, _I32P, _I64P, ctypes.c_int, ctypes.c_int, _I64P]
    return lib


def available() -> bool:
    """Whether the kernels are built and loaded (``False`` without a C compiler or with ``LIT_PRUNE_NATIVE=0``)."""
    return _library() is not None


def eligible(t: Tensor) -> bool:
    """Whether the kernels can work on ``t`` in place: a contiguous float32 CPU tensor, outside ``torch.compile``."""
    return (
        t.device.type == "cpu"
        and t.dtype == torch.float32
        and t.is_contiguous()
        and not torch.compiler.is_compiling()
        and available()
    )


def _checked_library(weights: list[Tensor]) -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError("lit_prune CPU kernels are not available (no C compiler, or LIT_PRUNE_NATIVE=0)")
    for i, w in enumerate(weights):
        if not eligible(w):
            raise ValueError(f"weight {i} must be a contiguous float32 CPU tensor, got {w.dtype} on {w.device}")
    return lib


def _check_masks(masks: list[Tensor], weights: list[Tensor]) -> None:
    for i, (m, w) in enumerate(zip(masks, weights, strict=True)):
        if m.dtype != torch.bool or not m.is_contiguous() or m.device.type != "cpu" or m.numel() != w.numel():
            raise ValueError(f"mask {i} must be a contiguous CPU torch.bool tensor of {w.numel()} elements")


def _array(ctype: type, values: list) -> ctypes.Array:
    return (ctype * len(values))(*values)


def histogram_bins(
    weights: list[Tensor], maxima: list[float], targets: list[int], nbins: int, *, bounds: bool = False
) -> list[float] | tuple[list[float], list[tuple[int, int]]]:
    """TF's threshold bin ``j = #{i : C_i < K}`` of each weight's ``|w|`` over ``[0, max]`` in ``nbins`` bins.

    ``weights`` must be :func:`eligible`, ``maxima`` their ``max |w|`` (finite, > 0), ``targets``
    the counts ``K`` (``1 <= K <= numel``, see :func:`lit_prune.masks.histogram_target_count`).
    With ``bounds=True`` also returns ``(C_{j-1}, C_j)`` per weight: the scores below bin ``j``, and
    up to it.
    """
    lib = _checked_library(weights)
    n = len(weights)
    out = (ctypes.c_float * n)()
    counts = (ctypes.c_int64 * (2 * n))()
    passes = lib.lp_histogram_bins(
        n,
        _array(ctypes.c_int64, [w.data_ptr() for w in weights]),
        _array(ctypes.c_int64, [w.numel() for w in weights]),
        _array(ctypes.c_float, maxima),
        _array(ctypes.c_int64, targets),
        nbins,
        torch.get_num_threads(),
        out,
        counts,
    )
    if passes < 0:
        raise MemoryError("lit_prune CPU kernels: out of memory")
    if bounds:
        return list(out), [(counts[2 * i], counts[2 * i + 1]) for i in range(n)]
    return list(out)


def bin_scores(
    weights: list[Tensor], maxima: list[float], bins: list[int], nbins: int, sizes: list[int]
) -> list[Tensor]:
    """The ``|w|`` that TF's binning over ``[0, max]`` puts in bin ``bins[i]`` of weight ``i`` (``sizes[i]`` of them).

    In index order (float32 CPU tensors); the exact threshold's last step.
    """
    lib = _checked_library(weights)
    lo, hi = [], []
    for m, j in zip(maxima, bins, strict=True):
        low, high = ctypes.c_int32(), ctypes.c_int32()
        lib.lp_bin_range(m, j, nbins, ctypes.byref(low), ctypes.byref(high))
        lo.append(low.value)
        hi.append(high.value)
    out = [torch.empty(size, dtype=torch.float32) for size in sizes]
    found = (ctypes.c_int64 * len(weights))()
    status = lib.lp_gather_range(
        len(weights),
        _array(ctypes.c_int64, [w.data_ptr() for w in weights]),
        _array(ctypes.c_int64, [w.numel() for w in weights]),
        _array(ctypes.c_int32, lo),
        _array(ctypes.c_int32, hi),
        _array(ctypes.c_int64, [o.data_ptr() for o in out]),
        _array(ctypes.c_int64, sizes),
        torch.get_num_threads(),
        found,
    )
    if status < 0:
        raise MemoryError("lit_prune CPU kernels: out of memory")
    if list(found) != list(sizes):
        raise RuntimeError(f"lit_prune CPU kernels: bin sizes {list(found)} differ from the counts {sizes}")
    return out


def mask_and_zero(
    weights: list[Tensor],
    cuts: Tensor | list[Tensor],
    masks: list[Tensor],
    zero: bool = True,
    *,
    inclusive: bool = False,
) -> list[int]:
    """``mask = |w| > cut`` (``>=`` if ``inclusive``; ``cut < 0`` keeps all) per weight, pruned weights set to 0.

    ``weights`` must be :func:`eligible`, ``masks`` contiguous ``torch.bool`` tensors of the same
    sizes, ``cuts`` 0-d CPU tensors or one vector of them.  Returns the kept counts.
    """
    lib = _checked_library(weights)
    _check_masks(masks, weights)
    n = len(weights)
    values = cuts.to(torch.float32) if isinstance(cuts, Tensor) else torch.stack([c.reshape(()) for c in cuts]).float()
    # |w| bits > cut bits is |w| > cut for cut >= 0 (+ 0.0 turns -0.0 into +0.0); a negative cut keeps all.
    cut_bits = torch.where(values < 0, -1, (values + 0.0).view(torch.int32))
    if inclusive:  # |w| >= cut is |w| bits > cut bits - 1 (cut = 0 keeps everything, as it should)
        cut_bits = torch.where(values < 0, -1, cut_bits - 1)
    kept = (ctypes.c_int64 * n)()
    status = lib.lp_mask_zero(
        n,
        _array(ctypes.c_int64, [w.data_ptr() for w in weights]),
        _array(ctypes.c_int64, [w.numel() for w in weights]),
        _array(ctypes.c_int32, cut_bits.tolist()),
        _array(ctypes.c_int64, [m.data_ptr() for m in masks]),
        int(zero),
        torch.get_num_threads(),
        kept,
    )
    if status < 0:
        raise MemoryError("lit_prune CPU kernels: out of memory")
    return list(kept)
