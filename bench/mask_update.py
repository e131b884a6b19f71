"""Mask-update cost and mask memory: lit_prune vs torch.nn.utils.prune, side by side in one run.

    python bench/mask_update.py            # ResNet-18 (11.2 M pruned weights) and a 50 M Linear stack
    python bench/mask_update.py --quick    # smaller models, for a smoke run

Every timing is the minimum over ``--repeats`` runs, in one process, because this machine's
timings are noisy.  Each run of a method follows one of the floor (one read of every pruned
weight: a ``sum`` per weight), and the method's ratio to one read divides its minimum by the
floor's minimum over the runs beside it: as many samples each, taken side by side (the column
"one read beside it").  Each timed call, the floor's included, starts with cold caches
(twice the last-level cache that sysfs reports written just before; 64 MiB where it reports
none; ``--evict-mib`` to choose): inside training the forward and backward passes and the optimizer
step go through far more memory than the cache holds between two updates.  Weights are restored
from a copy before each lit_prune run (not timed), so every run prunes the same dense weights at
sparsity 0.5.  ``torch.nn.utils.prune`` is timed on its first call on a fresh copy of the model,
which is what Lightning's ``ModelPruning`` does at its first pruning epoch.  "A later update"
starts from masks at 0.45 and an optimizer step since (pruned weights moved off zero), applies
them and goes to 0.5, as each update of a gradual schedule does in the callback;
"eager path" is the update a machine without a C compiler runs (the fused kernels switched off).
"Two-pass floor" is one read of every weight and then one in-place read-and-write of every weight
(``sum``, then ``mul_(1.0)``): an exact update that zeroes pruned weights in place needs at least
that (its threshold depends on every weight, so a second pass must zero them), before any mask
bytes are written.
The 2:4 rows prune every weight whose input size divides by 4 N:M (ResNet-18's stem stays on
the histogram rule).
Prints a markdown table and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import mlp_stack, resnet18  # noqa: E402

from lit_prune import Pruning, PruningHParams  # noqa: E402
from lit_prune.backends.cpu import kernels as cpu_kernels  # noqa: E402


def pruned_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def prune_targets(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in pruned_layers(model)]


HISTOGRAM = "lit_prune histogram (TF r1.13), first update"
NM = "lit_prune 2:4 (N:M) where in*kh*kw divides by 4, the rest histogram"


def nm_spec(model: nn.Module) -> PruningHParams:
    """2:4 for every conv/linear weight whose input size divides by 4 (its target 0.5, as the rest's)."""
    names = [
        f"^{re.escape(name)}$"
        for name, p in model.named_parameters()
        if name.endswith("weight") and p.dim() > 1 and p[0].numel() % 4 == 0
    ]
    return PruningHParams(nm_sparsity_map=[f"{n}:2:4" for n in names])


LATER = "lit_prune histogram, a later update (0.45 -> 0.5, after an optimizer step)"
TWO_PASS = "two-pass floor: one read, then one read+write of every weight"


def without_kernels(fn: Callable[..., object], *args: object) -> object:
    """Run ``fn`` with the fused CPU kernels switched off (the eager path a machine without ``cc`` takes)."""
    available = cpu_kernels.available
    cpu_kernels.available = lambda: False
    try:
        return fn(*args)
    finally:
        cpu_kernels.available = available


def last_level_cache_bytes() -> int:
    """The largest CPU cache this machine reports (sysfs), or 32 MiB where it reports none."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=32 << 20)


_EVICTION = torch.empty(2 * last_level_cache_bytes() // 4)  # pages are touched at the first eviction


def set_eviction(mib: int) -> None:
    """Write ``mib`` MiB before each timed call instead of twice the last-level cache."""
    global _EVICTION
    _EVICTION = torch.empty((mib << 20) // 4)


def evict_caches() -> None:
    """Write twice the last-level cache so that the weights start cold, as inside training."""
    _EVICTION.fill_(1.0)


def timed(fn: Callable[[], object], setup: Callable[[], object] | None = None) -> float:
    if setup is not None:
        setup()
    evict_caches()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_model(label: str, make: Callable[[], nn.Module], repeats: int, slow_peers: bool) -> list[dict]:
    torch.manual_seed(0)
    model = make()
    weights = [m.weight for m in pruned_layers(model)]
    n_params = sum(p.numel() for p in weights)
    backup = [p.detach().clone() for p in weights]

    def restore() -> None:
        with torch.no_grad():
            for p, b in zip(weights, backup, strict=True):
                p.copy_(b)

    @torch.no_grad()
    def floor() -> None:
        for p in weights:
            p.sum()

    @torch.no_grad()
    def two_pass_floor() -> None:  # what an exact update that zeroes in place cannot go below
        for p in weights:
            p.sum()
        for p in weights:
            p.mul_(1.0)  # reads and writes every weight (exact: x * 1.0 == x, -0.0 and NaN kept)

    candidates: dict[str, tuple[Callable[[], object], Callable[[], object] | None]] = {}
    for tag, spec in {
        HISTOGRAM: PruningHParams(),
        "lit_prune histogram, eager path (no C compiler)": PruningHParams(),
        "lit_prune exact (TF r1.14+)": PruningHParams(threshold_method="exact"),
        "lit_prune block 4x4 AVG": PruningHParams(block_height=4, block_width=4),
        "lit_prune histogram, use_tpu path": PruningHParams(use_tpu=True),
        NM: nm_spec(model),
        NM + ", eager path": nm_spec(model),
    }.items():
        pruning = Pruning(model, spec, sparsity=0.5)
        dense = copy.deepcopy(pruning.state_dict())
        pruning.mask_update(0)  # warm-up (builds the kernels)

        def first(p: Pruning = pruning, state: dict = dense) -> None:  # dense weights and masks again
            restore()
            p.load_state_dict(state)

        if "eager" in tag:
            candidates[tag] = (lambda p=pruning: without_kernels(p.mask_update, 0), first)
        else:
            candidates[tag] = (lambda p=pruning: p.mask_update(0), first)
    noise = [torch.randn_like(p) * 1e-3 for p in weights]

    @torch.no_grad()
    def optimizer_step() -> None:  # moves every weight, pruned ones too, as an optimizer step does
        torch._foreach_add_(weights, noise)

    applier = Pruning(model, PruningHParams(), sparsity=0.5)  # masks at 0.5 for the whole run
    applier.mask_update(0)
    candidates["lit_prune apply_mask (every step, after an optimizer step)"] = (applier.apply_mask, optimizer_step)

    # A later update of a gradual schedule, as the callback runs it: 45 % pruned and zeroed by the
    # last update, an optimizer step since (pruned weights moved off zero), this one goes to 50 %
    # and applies the 45 % masks first.
    restore()
    later = Pruning(model, PruningHParams(), sparsity=lambda step: 0.45 if step == 0 else 0.5)
    later.mask_update(0)
    state_45 = copy.deepcopy(later.state_dict())
    pruned_45 = [p.detach().clone() for p in weights]

    def restore_45() -> None:
        later.load_state_dict(state_45)
        with torch.no_grad():
            for p, b in zip(weights, pruned_45, strict=True):
                p.copy_(b)
        optimizer_step()

    candidates[LATER] = (lambda: later.mask_update(1), restore_45)
    restore()

    # Every method gets `repeats` timings, each right after one of the floor's, so that each
    # ratio compares two minima over as many samples taken side by side (the minimum of many more
    # floor samples than candidate samples would be lower by luck alone).
    best = {name: float("inf") for name in [TWO_PASS, *candidates]}
    beside = dict.fromkeys(best, float("inf"))  # the floor's minimum over the samples beside each method
    for _ in range(repeats):
        for name, (fn, setup) in [(TWO_PASS, (two_pass_floor, None)), *candidates.items()]:
            beside[name] = min(beside[name], timed(floor))
            best[name] = min(best[name], timed(fn, setup))
    best["floor"] = min(beside.values())
    beside["floor"] = best["floor"]
    restore()

    peers: dict[str, float] = {}
    peer_runs = max(1, repeats // 3) if slow_peers else 1
    for _ in range(peer_runs):
        fresh = copy.deepcopy(model)
        restore_fresh = prune_targets(fresh)
        t = timed(lambda f=restore_fresh: prune.global_unstructured(f, prune.L1Unstructured, amount=0.5))
        peers["torch global_unstructured (first call)"] = min(
            peers.get("torch global_unstructured (first call)", 1e9), t
        )
        t = timed(lambda f=restore_fresh: prune.global_unstructured(f, prune.L1Unstructured, amount=0.5))
        peers["torch global_unstructured (second call)"] = min(
            peers.get("torch global_unstructured (second call)", 1e9), t
        )
        fresh = copy.deepcopy(model)
        t = timed(lambda f=fresh: [prune.l1_unstructured(m, n, amount=0.5) for m, n in prune_targets(f)])
        peers["torch l1_unstructured per layer"] = min(peers.get("torch l1_unstructured per layer", 1e9), t)
    best.update(peers)
    beside.update(dict.fromkeys(peers, best["floor"]))  # seconds each: the floor's noise is immaterial there

    # memory added per pruned parameter
    lit_state = Pruning(model, PruningHParams(), sparsity=0.5)
    lit_bytes = sum(m.numel() * m.element_size() for m in lit_state.get_masks().values())
    lit_bytes += sum(t.numel() * t.element_size() for t in lit_state.get_thresholds().values())
    fresh = copy.deepcopy(model)
    before = sum(t.numel() * t.element_size() for t in list(fresh.parameters()) + list(fresh.buffers()))
    prune.global_unstructured(prune_targets(fresh), prune.L1Unstructured, amount=0.5)
    after = sum(t.numel() * t.element_size() for t in list(fresh.parameters()) + list(fresh.buffers()))
    # the pruned `weight` itself is a plain attribute now (recomputed each forward): count it too
    after += sum(m.weight.numel() * m.weight.element_size() for m in pruned_layers(fresh))

    rows = []
    for name, seconds in best.items():
        rows.append(
            {
                "model": label,
                "pruned_params": n_params,
                "method": name,
                "ms": seconds * 1e3,
                "floor_ms": beside[name] * 1e3,
                "x_floor": seconds / beside[name],
                "x_two_pass": seconds / best[TWO_PASS],
            }
        )
    rows.append(
        {
            "model": label,
            "pruned_params": n_params,
            "method": "bytes/param lit_prune masks",
            "value": lit_bytes / n_params,
        }
    )
    rows.append(
        {
            "model": label,
            "pruned_params": n_params,
            "method": "bytes/param torch.nn.utils.prune",
            "value": (after - before) / n_params,
        }
    )
    return rows


def in_training_loop(steps: int) -> dict[str, float]:
    """Median ms of one read, ``apply_mask`` and the update (fused, eager), each right after a training step.

    ResNet-18 with SGD and momentum.  The weights are cold there (the backward pass and the
    optimizer step went through memory since they were last read), unlike in the repeated timings
    above; the four are alternated step by step.  As in the callback, a step that updates does not
    call ``apply_mask`` first (the update applies the current masks itself); every other step does.
    """
    torch.manual_seed(0)
    net = resnet18(10)
    pruning = Pruning(net, PruningHParams(), sparsity=lambda step: 0.3 + 0.001 * step)
    pruning.mask_update(0)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    weights = [w.detach() for w in pruning.get_weights().values()]
    times: dict[str, list[float]] = {
        "one read (floor)": [],
        "apply_mask (a step without an update)": [],
        "lit_prune histogram update (applies the masks first)": [],
        "eager path": [],
    }
    for step in range(1, steps + 1):
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
        kind = list(times)[step % len(times)]
        start = time.perf_counter()
        if kind == "one read (floor)":
            for w in weights:
                w.sum()
        elif kind.startswith("apply_mask"):
            pruning.apply_mask()
        elif kind == "eager path":
            without_kernels(pruning.mask_update, step)
        else:
            pruning.mask_update(step)
        times[kind].append(time.perf_counter() - start)
        if kind == "one read (floor)":
            pruning.apply_mask()
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def positive_int(text: str) -> int:
    """An ``argparse`` type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of MiB, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models, few repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--evict-mib", type=positive_int, help="MiB written before each timed call (default: twice the L3)"
    )
    parser.add_argument("--out", default="bench/results/mask_update.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.evict_mib is not None:
        set_eviction(args.evict_mib)
    repeats = args.repeats or (2 if args.quick else 9)
    if args.quick:
        models = {"ResNet-ish (small)": lambda: resnet18(10), "Linear stack 1 M": lambda: mlp_stack(256, 2)}
    else:
        models = {"ResNet-18": resnet18, "Linear stack 50 M": lambda: mlp_stack(1024, 6)}
    rows = []
    for label, make in models.items():
        rows += bench_model(label, make, repeats, slow_peers=not args.quick)

    cpu = platform.processor() or platform.machine()
    print(f"\nmask update, sparsity 0.5, torch {torch.__version__}, {args.threads} threads, {cpu}")
    print("\n| model | pruned params | method | ms | one read beside it (ms) | x one read | x two-pass floor |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "ms" in r:
            size = f"{r['pruned_params'] / 1e6:.1f} M"
            ratios = f"{r['floor_ms']:.2f} | {r['x_floor']:.2f} | {r['x_two_pass']:.2f}"
            print(f"| {r['model']} | {size} | {r['method']} | {r['ms']:.2f} | {ratios} |")
    print("\n| model | memory | bytes per pruned parameter |\n| --- | --- | ---: |")
    for r in rows:
        if "value" in r:
            print(f"| {r['model']} | {r['method'].removeprefix('bytes/param ')} | {r['value']:.2f} |")
    for label in models:
        mine = {r["method"]: r for r in rows if r["model"] == label and "ms" in r}
        peer = mine["torch global_unstructured (first call)"]["ms"]
        for name in (HISTOGRAM, LATER):
            lit, ratio = mine[name]["ms"], mine[name]["x_floor"]
            read_ok = "met" if ratio <= 3 else "MISSED"
            peer_ok = "met" if peer >= 10 * lit else "MISSED"
            print(f"\n{label}, {name.removeprefix('lit_prune ')}: {ratio:.2f}x one read ", end="")
            print(f"(target <= 3x: {read_ok}), {mine[name]['x_two_pass']:.2f}x the two-pass floor; ", end="")
            print(f"{peer / lit:.0f}x faster than global_unstructured (>= 10x: {peer_ok})")
    loop = in_training_loop(16 if args.quick else 80)
    print("\nin a training loop (ResNet-18, SGD momentum; each right after a step, alternated; median):")
    print("\n| method | ms | x one read |\n| --- | ---: | ---: |")
    for name, ms in loop.items():
        print(f"| {name} | {ms:.1f} | {ms / loop['one read (floor)']:.1f} |")
    rows += [{"model": "ResNet-18, in a training loop", "method": k, "ms": v} for k, v in loop.items()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "threads": args.threads, "rows": rows}, indent=2))
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()
