"""Mask-update cost of two commits of lit_prune, side by side: each timed in its own process, alternately.

    python bench/ab_commits.py ac64533 HEAD            # 3 rounds, ResNet-18, cold caches
    python bench/ab_commits.py ac64533 HEAD --rounds 5

Besides the native kernels' figures, each commit is measured with ``LIT_PRUNE_NATIVE=0`` (the
torch reference path every accelerator and every machine without a compiler runs), and the peak
resident memory one ``global_ranking`` update adds is read in a fresh process per rule.  The
ratios divide by the one read of the same process.

Each commit's ``lit_prune/`` is extracted with ``git archive`` into a temporary directory and
imported from there (``PYTHONPATH``), so two versions of the package never share a process; the
rounds alternate them because this machine's speed drifts.  Every timing is the minimum of
``--repeats`` calls, each starting with cold caches (twice the last-level cache written just
before, as in ``bench/mask_update.py``), on the conv/linear weights of ResNet-18 at sparsity
0.5: one read (the floor), a first update of dense weights (histogram rule), the exact rule, 4x4
AVG blocks, and a later update as the callback runs it (masks at 0.45, an optimizer step since,
to 0.5: ``apply_mask`` then ``mask_update`` where the commit's update does not apply the current
masks itself).  Prints a markdown table of each round.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(repeats: int) -> dict[str, float]:
    """Run inside a process whose ``lit_prune`` is the commit under test."""
    import inspect

    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from mask_update import evict_caches
    from models import resnet18

    from lit_prune import Pruning, PruningHParams

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = resnet18()
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    backup = [w.detach().clone() for w in weights]
    noise = [torch.randn_like(w) * 1e-3 for w in weights]

    def restore() -> None:
        with torch.no_grad():
            for w, b in zip(weights, backup, strict=True):
                w.copy_(b)

    def best(fn, setup) -> float:
        times = []
        for _ in range(repeats):
            setup()
            evict_caches()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times) * 1e3

    def floor() -> None:
        for w in weights:
            w.sum()

    out = {"one read": best(floor, lambda: None)}
    for label, spec in {
        "first update": PruningHParams(),
        "exact rule": PruningHParams(threshold_method="exact"),
        "block 4x4 AVG": PruningHParams(block_height=4, block_width=4),
    }.items():
        pruning = Pruning(model, spec, sparsity=0.5)
        dense = copy.deepcopy(pruning.state_dict())
        pruning.mask_update(0)  # warm-up

        def first(p=pruning, state=dense) -> None:  # dense weights and masks again
            restore()
            p.load_state_dict(state)

        out[label] = best(lambda p=pruning: p.mask_update(0), first)
    restore()
    later = Pruning(model, PruningHParams(), sparsity=lambda step: 0.45 if step == 0 else 0.5)
    later.mask_update(0)
    state, pruned = copy.deepcopy(later.state_dict()), [w.detach().clone() for w in weights]
    applies_itself = "current masks are applied first" in (inspect.getdoc(Pruning.mask_update) or "")

    def after_a_step() -> None:
        later.load_state_dict(state)
        with torch.no_grad():
            for w, b, n in zip(weights, pruned, noise, strict=True):
                w.copy_(b).add_(n)

    def update_step() -> None:
        if not applies_itself:
            later.apply_mask()
        later.mask_update(1)

    out["later update (+ apply)"] = best(update_step, after_a_step)

    def moved() -> None:  # an optimizer step moved every weight, pruned ones too
        later.load_state_dict(state)
        later.mask_update(1)
        with torch.no_grad():
            for w, n in zip(weights, noise, strict=True):
                w.add_(n)

    out["apply_mask"] = best(later.apply_mask, moved)
    return out


def memory_child(method: str) -> dict[str, float]:
    """Peak resident memory added by one ``global_ranking`` update of ResNet-18 (MiB), in a fresh process."""
    import resource

    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from models import resnet18

    from lit_prune import Pruning, PruningHParams

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = resnet18()
    pruning = Pruning(model, PruningHParams(global_ranking=True, threshold_method=method), sparsity=0.5)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pruning.mask_update(0)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {f"global_ranking {method}: peak memory added (MiB)": (after - before) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.repeats)))
        return
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        for rev in (args.old, args.new):
            tree = Path(tmp) / rev.replace("/", "_")
            tree.mkdir()
            archive = subprocess.run(["git", "archive", rev, "lit_prune"], cwd=ROOT, check=True, capture_output=True)
            subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
            trees[rev] = tree
        results: dict[str, list[dict[str, float]]] = {rev: [] for rev in trees}
        for _ in range(args.rounds):
            for rev, tree in trees.items():
                round_: dict[str, float] = {}
                for native, suffix in (("1", ""), ("0", ", torch reference")):
                    env = {**os.environ, "PYTHONPATH": str(tree), "LIT_PRUNE_NATIVE": native}
                    found = run_child(env, ["--child", "--repeats", str(args.repeats)], args)
                    round_.update({k + suffix: v for k, v in found.items() if not (suffix and k == "apply_mask")})
                for method in ("histogram", "exact"):
                    env = {**os.environ, "PYTHONPATH": str(tree)}
                    round_.update(run_child(env, ["--memory-child", method], args))
                results[rev].append(round_)
    metrics = list(results[args.old][0])
    print(f"\nResNet-18 conv/linear weights, sparsity 0.5, cold caches, ms (min of {args.repeats}), per round\n")
    print(
        "| metric | "
        + " | ".join(f"{rev}" for rev in trees)
        + " | "
        + " | ".join(f"{rev}, x one read" for rev in trees)
        + " |"
    )
    print("| --- | " + " | ".join(["---:"] * (2 * len(trees))) + " |")
    for metric in metrics:
        cells = [", ".join(f"{r[metric]:.1f}" for r in results[rev]) for rev in trees]
        floor = "one read, torch reference" if metric.endswith("torch reference") else "one read"
        ratios = [
            ", ".join(f"{r[metric] / r[floor]:.2f}" for r in results[rev]) if "memory" not in metric else ""
            for rev in trees
        ]
        print(f"| {metric} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")


def run_child(env: dict[str, str], extra: list[str], args: argparse.Namespace) -> dict[str, float]:
    """One measuring process, with the commit's ``lit_prune`` on its path."""
    run = subprocess.run(
        [sys.executable, __file__, args.old, args.new, *extra], env=env, check=True, capture_output=True, text=True
    )
    return json.loads(run.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
