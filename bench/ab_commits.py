"""Mask-update cost of two commits of lit_prune, side by side: each timed in its own process, alternately.

    python bench/ab_commits.py ac64533 HEAD            # 3 rounds, ResNet-18, cold caches
    python bench/ab_commits.py ac64533 HEAD --rounds 5

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
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.repeats)))
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
                env = {**os.environ, "PYTHONPATH": str(tree)}
                run = subprocess.run(
                    [sys.executable, __file__, args.old, args.new, "--child", "--repeats", str(args.repeats)],
                    env=env, check=True, capture_output=True, text=True,
                )  # fmt: skip
                results[rev].append(json.loads(run.stdout.strip().splitlines()[-1]))
    metrics = list(results[args.old][0])
    print(f"\nResNet-18 conv/linear weights, sparsity 0.5, cold caches, ms (min of {args.repeats}), per round\n")
    print("| metric | " + " | ".join(f"{rev}" for rev in trees) + " |")
    print("| --- | " + " | ".join("---:" for _ in trees) + " |")
    for metric in metrics:
        cells = [", ".join(f"{r[metric]:.1f}" for r in results[rev]) for rev in trees]
        print(f"| {metric} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
