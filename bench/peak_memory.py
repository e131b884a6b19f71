"""The peak memory one call adds, measured alike in every benchmark that reports it: tensor memory.

On CUDA: ``max_memory_allocated`` over the call, above what was allocated before it.

On the CPU: the same quantity, from the torch profiler's record of every tensor allocation and
free during the call (``profile_memory``): the highest the running total gets above its start.
It counts what torch's allocator hands out, as CUDA's figure does; memory that C code allocates
for itself (lit_prune's native kernels' small per-call tables, gloo's transport buffers) is not
in it.  The process's peak resident memory (``VmHWM``) was tried first and dropped: glibc
reuses freed heap pages, so the same update read from 16 to 71 MiB from run to run.

    >>> from peak_memory import peak_rise_mib
    >>> import torch
    >>> round(peak_rise_mib(lambda: torch.ones(2**20).sum(), torch.device("cpu")))  # a 4 MiB temporary
    4
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

__all__ = ["peak_rise_mib"]

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler prints no "profiler_start" lines to stdout


def peak_rise_mib(call: Callable[[], object], device: torch.device) -> float:
    """MiB by which ``call()`` raises the tensor memory allocated on ``device`` at its peak (never below 0)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        return max(0.0, (torch.cuda.max_memory_allocated(device) - before) / 2**20)
    return _profiled_peak_bytes(call) / 2**20


def _profiled_peak_bytes(call: Callable[[], object]) -> int:
    """The highest running total of CPU tensor bytes allocated minus freed while ``call()`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError as error:  # a private record: say so if a torch release moves it
        raise RuntimeError("this torch's profiler keeps no kineto_results: CPU peak memory cannot be read") from error
    changes = sorted(
        (e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type().name == "CPU"
    )
    running = peak = 0
    for _, nbytes in changes:
        running += nbytes
        peak = max(peak, running)
    return peak
