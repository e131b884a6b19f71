"""Pruning FSDP2-sharded weights: per-process peak memory and time of a mask update, side by side.

    python bench/sharded.py                      # 2 CPU processes over gloo, 8 x Linear(2048, 2048)
    python bench/sharded.py --device cuda --backend nccl --world 1
    python bench/sharded.py --device cuda --backend gloo --world 2   # 2 processes on one GPU (no gather row:
                                                                     # gloo cannot all-gather CUDA tensors)
    python bench/sharded.py --blocks 3x3         # 3-row blocks: shards of 1024 rows cut one block row each

Each row runs in fresh processes:

- ``one process``: lit_prune on the whole model (what each process would hold without sharding);
- ``lit_prune, sharded``: lit_prune on the ``fully_shard``-ed model (each process its shard,
  thresholds from reduced statistics);
- ``gather, then prune``: what a user would write without it: each weight gathered
  (``full_tensor()``), its threshold from the whole weight (``kthvalue``; of its block averages
  with ``--blocks``), the local part masked.

The last column is what one update all-reduces, in bytes, summed over its collectives.

Each process gets its share of the CPU cores for its intra-op threads.  Time is the median of
the timed updates, after a warm-up update that allocates the buffers the pruner keeps and runs the
process group's first collective.  Peak memory is what one more update, after the timed ones,
adds to the process's peak tensor memory (``bench/peak_memory.py``: the torch profiler's record
of tensor allocations on the CPU, ``max_memory_allocated`` on CUDA), the largest over the
processes.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peak_memory import peak_rise_mib
from torch import nn

from lit_prune import Pruning
from lit_prune.engine.sharding import ProcessGroupReducer, local, local_region

METHODS = ("one process", "lit_prune, sharded", "gather, then prune")


class Counting(ProcessGroupReducer):
    """Counts the collectives of the reduce step and the bytes they all-reduce."""

    calls = 0
    bytes = 0

    @classmethod
    def count(cls, values: torch.Tensor) -> None:  # noqa: D102
        cls.calls += 1
        cls.bytes += values.numel() * values.element_size()

    def max_(self, values):  # noqa: D102
        self.count(values)
        return super().max_(values)

    def sum_(self, values):  # noqa: D102
        self.count(values)
        return super().sum_(values)


def _gather_then_prune(model: nn.Module, sparsity: float, blocks: tuple[int, int] | None) -> None:
    """The naive sharded update: the whole weight on every process, its k-th |w| (or block average), the part masked."""
    for layer in model:
        weight = layer.weight
        whole = weight.full_tensor().abs()
        if blocks is not None:
            (bh, bw), (rows, cols) = blocks, whole.shape
            pooled = nn.functional.avg_pool2d(whole[None], blocks, ceil_mode=True)[0]
            threshold = pooled.reshape(-1).kthvalue(max(1, int(sparsity * pooled.numel()))).values
            whole = (pooled > threshold).repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:rows, :cols]
        else:
            whole = whole > whole.reshape(-1).kthvalue(max(1, int(sparsity * whole.numel()))).values
        part = local(weight).detach()
        part.mul_(whole[tuple(slice(a, b) for a, b in local_region(weight))])


def _update(model: nn.Module, pruning: Pruning | None, step: int, blocks: tuple[int, int] | None) -> None:
    if pruning is None:
        _gather_then_prune(model, 0.5, blocks)
    else:
        pruning.mask_update(step)


def _model(args, device: torch.device, mesh) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(args.size, args.size, bias=False) for _ in range(args.layers)]).to(device)
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def _worker(rank: int, world: int, port: int, args, method: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend, rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the cores shared, not oversubscribed
    from torch.distributed.device_mesh import init_device_mesh

    sharded = method != "one process"
    mesh = init_device_mesh(device.type, (world,)) if sharded else None
    model = _model(args, device, mesh)
    spec = f"threshold_method={args.rule}"
    blocks = args.blocks
    if blocks is not None:
        spec += f",block_height={blocks[0]},block_width={blocks[1]}"
    reducer = Counting.for_weight(model[0].weight) if sharded else None
    pruning = None if method == "gather, then prune" else Pruning(model, spec, sparsity=0.5, reducer=reducer)
    _update(model, pruning, 1, blocks)  # warm-up: scratch buffers, the process group's first collective
    times = []
    for step in range(2, args.updates + 2):
        Counting.calls = Counting.bytes = 0
        dist.barrier()
        start = time.perf_counter()
        _update(model, pruning, step, blocks)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    dist.barrier()
    Counting.calls = Counting.bytes = 0
    peak = peak_rise_mib(lambda: _update(model, pruning, args.updates + 2, blocks), device)  # after the timing
    found = {
        "peak_mib": peak,
        "ms": 1e3 * statistics.median(times),
        "calls": Counting.calls,
        "bytes": Counting.bytes,
    }
    gathered = [None] * world
    dist.all_gather_object(gathered, found)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()


def _blocks(text: str) -> tuple[int, int]:
    """``--blocks``: ``"3x3"`` as ``(3, 3)``, or an error that says what is accepted."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"--blocks must be HxW with positive integers (e.g. 3x3), got {text!r}")
    return int(parts[0]), int(parts[1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args) -> list[dict]:
    """One row per method: the largest per-process peak, the median update time, the collectives per update."""
    rows = []
    gloo_on_cuda = args.device == "cuda" and args.backend == "gloo"  # gloo cannot all-gather CUDA tensors
    for method in [m for m in METHODS if not (gloo_on_cuda and m == "gather, then prune")]:
        world = 1 if method == "one process" else args.world
        with tempfile.TemporaryDirectory() as scratch:
            out = os.path.join(scratch, "out.json")
            try:
                mp.spawn(_worker, args=(world, _free_port(), args, method, out), nprocs=world, join=True)
            except mp.ProcessExitedException as error:
                # gloo sometimes aborts a process while the process group is torn down ("terminate
                # called without an active exception"), after the results are written: only that passes.
                if error.signal_name != "SIGABRT" or not Path(out).exists():
                    raise
            per_process = json.loads(Path(out).read_text())
        rows.append(
            {
                "method": method,
                "processes": world,
                "peak_mib": max(p["peak_mib"] for p in per_process),
                "ms": max(p["ms"] for p in per_process),
                "collectives": per_process[0]["calls"] if method == "lit_prune, sharded" else "-",
                "bytes": per_process[0]["bytes"] if method == "lit_prune, sharded" else "-",
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--updates", type=int, default=5)
    parser.add_argument("--rule", default="histogram", choices=["histogram", "exact"])
    parser.add_argument(
        "--blocks", type=_blocks, default=None, help="block pruning, HxW (e.g. 3x3: blocks cut by the shards)"
    )
    args = parser.parse_args()
    weights_mib = args.layers * args.size**2 * 4 / 2**20
    granularity = f"{args.blocks[0]}x{args.blocks[1]} blocks" if args.blocks else "element-wise"
    print(
        f"{args.layers} x Linear({args.size}, {args.size}): {weights_mib:.0f} MiB of float32 weights, "
        f"{args.rule} rule, {granularity}, {args.device} ({args.backend}), {args.world} processes sharded"
    )
    header = ["method", "processes", "peak memory per process (MiB)", "update (ms)", "collectives per update"]
    print("| " + " | ".join([*header, "bytes all-reduced"]) + " |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in run(args):
        cells = [row["method"], row["processes"], f"{row['peak_mib']:.1f}", f"{row['ms']:.1f}", row["collectives"]]
        print("| " + " | ".join(str(c) for c in [*cells, row["bytes"]]) + " |")


if __name__ == "__main__":
    main()
