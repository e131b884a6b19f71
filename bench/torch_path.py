"""The torch reference path (accelerators, sharded weights, no C compiler): memory, time and ops per update.

    python bench/torch_path.py            # 8 x 2048^2 and 48 x 128^2 weights, one thread, a few minutes
    python bench/torch_path.py --quick    # smaller, for the smoke test

Two tables, each row in a fresh process (``LIT_PRUNE_NATIVE=0``: the torch backend on the CPU):

- **large weights**: the median update time, after a first update allocated what the engine
  keeps, and then what one more update adds to the peak of tensor memory
  (``bench/peak_memory.py``: the torch profiler's record of allocations); a temporary the size
  of a weight shows here.
- **many small weights**: the median update time, which is host work (dispatch, Python) rather
  than arithmetic, and the top-level aten ops of one update (the torch profiler): on an
  accelerator each is at least one kernel launch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SPECS = {
    "histogram": "threshold_method=histogram",
    "exact": "threshold_method=exact",
    "4x4 blocks": "block_height=4,block_width=4",
    "3x3 blocks": "block_height=3,block_width=3",
    "2:4": "nm_sparsity=2:4",
}


def measure(spec: str, layers: int, size: int, updates: int, count_ops: bool) -> dict:
    """One row, in this process: median time of ``updates`` updates, then the peak rise of one (and its ops)."""
    import torch
    from peak_memory import peak_rise_mib

    from lit_prune import Pruning

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(size, size, bias=False) for _ in range(layers)])
    pruning = Pruning(model, spec, sparsity=0.5)
    pruning.mask_update(1)  # allocates what the engine keeps (scratch buffers)
    times = []
    for step in range(2, 2 + updates):
        start = time.perf_counter()
        pruning.mask_update(step)
        times.append(time.perf_counter() - start)
    rise = peak_rise_mib(lambda: pruning.mask_update(2 + updates), torch.device("cpu"))  # after the timing
    ops = None
    if count_ops:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            pruning.mask_update(3 + updates)
        ops = sum(1 for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::"))
    return {"peak_mib": rise, "ms": 1e3 * statistics.median(times), "ops": ops}


def _row(spec: str, layers: int, size: int, updates: int, count_ops: bool) -> dict:
    """:func:`measure` in a fresh process (memory and caches of its own)."""
    env = {**os.environ, "LIT_PRUNE_NATIVE": "0", "KINETO_LOG_LEVEL": "5"}  # no profiler chatter on stdout
    args = [sys.executable, __file__, "--row", json.dumps([spec, layers, size, updates, count_ops])]
    done = subprocess.run(args, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        print(json.dumps(measure(*json.loads(args.row))))
        return
    large, small, updates = ((2, 512), (8, 64), 3) if args.quick else ((8, 2048), (48, 128), 9)
    print(f"## large weights: {large[0]} x Linear({large[1]}, {large[1]}), torch path, one thread\n")
    print("| spec | peak rise over an update (MiB) | update (ms) |\n| --- | ---: | ---: |")
    for name, spec in SPECS.items():
        row = _row(spec, *large, updates, False)
        print(f"| {name} | {row['peak_mib']:.1f} | {row['ms']:.1f} |")
    print(f"\n## many small weights: {small[0]} x Linear({small[1]}, {small[1]}), torch path, one thread\n")
    print("| spec | update (ms) | top-level aten ops per update |\n| --- | ---: | ---: |")
    for name, spec in SPECS.items():
        row = _row(spec, *small, updates, True)
        print(f"| {name} | {row['ms']:.2f} | {row['ops']} |")


if __name__ == "__main__":
    main()
