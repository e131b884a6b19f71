"""The peak memory one call adds, measured alike in every benchmark that reports it.

On CUDA: ``max_memory_allocated`` over the call, above what was allocated before it.

On the CPU (Linux, glibc): the rise of peak resident memory (``VmHWM``) over the call.  Resident
memory only counts a page the first time it is touched, and by default glibc keeps freed memory
for reuse and raises its ``mmap`` threshold as large blocks are freed, so a temporary that reuses
memory freed by an earlier call would not show.  Before the call, therefore, the ``mmap``
threshold is fixed at 64 KiB (each larger block is mapped fresh and unmapped when freed), the
heap's free pages are handed back (``malloc_trim``), and the peak is reset to the current size
(``clear_refs``).  Fixing the threshold slows later allocations: measure memory after timing.
Linux updates the resident counts in steps of 64 pages per thread, so figures are good to about
a quarter of a MiB.

    >>> from peak_memory import peak_rise_mib
    >>> import torch
    >>> make = lambda: torch.ones(2**20).sum()  # a 4 MiB temporary
    >>> _ = make()  # a first call also sets up what torch keeps (thread pools, kernels)
    >>> round(peak_rise_mib(make, torch.device("cpu")))
    4
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["peak_rise_mib"]

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_MMAP_THRESHOLD = 64 * 1024


def peak_rise_mib(call: Callable[[], object], device: torch.device) -> float:
    """MiB by which ``call()`` raises the process's peak memory on ``device`` (never below 0)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        return max(0.0, (torch.cuda.max_memory_allocated(device) - before) / 2**20)
    _fresh_pages_for_every_large_block()
    Path("/proc/self/clear_refs").write_text("5")  # the peak back to the current resident size
    before = _resident_peak_mib()
    call()
    return max(0.0, _resident_peak_mib() - before)


def _fresh_pages_for_every_large_block() -> None:
    """glibc: blocks over 64 KiB mapped fresh, and the heap's free pages handed back."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError as error:
        raise RuntimeError("peak memory on the CPU is measured with glibc (Linux); libc.so.6 was not found") from error
    libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    libc.malloc_trim(0)


def _resident_peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status: peak memory on the CPU is measured on Linux")
