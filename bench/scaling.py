"""Mask-update cost as the model grows: lit_prune's histogram update vs one read, 1 M to 100 M weights.

    python bench/scaling.py            # 1, 3, 10, 30, 100 M weights in Linear stacks
    python bench/scaling.py --quick    # 1, 3, 10 M

Each model is a stack of 1024-wide Linear layers (4 M weights each, fewer for the smallest). Prints
a markdown table, writes JSON and ``mask_update_scaling.png`` (log-log): the cost should grow
linearly, at a constant multiple of one read.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from lit_prune import Pruning, PruningHParams

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mask_update import evict_caches  # noqa: E402


def stack(n_params: int) -> nn.Module:
    width = 1024 if n_params >= 4 * 1024 * 1024 else 512
    per_layer = width * 4 * width
    depth = max(1, round(n_params / per_layer))
    return nn.Sequential(*[nn.Linear(width, 4 * width, bias=False) for _ in range(depth)])


def best_of(fn, repeats: int, setup=None) -> float:
    best = float("inf")
    for _ in range(repeats):
        if setup is not None:
            setup()
        evict_caches()  # cold, as inside training (and as bench/mask_update.py times)
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(millions: int) -> dict[str, float]:
    """Best-of timings of one histogram mask update and of one read, on a stack of ``millions`` M weights."""
    torch.manual_seed(0)
    model = stack(millions * 1_000_000)
    weights = [m.weight for m in model]
    backup = [w.detach().clone() for w in weights]
    n = sum(w.numel() for w in weights)
    pruning = Pruning(model, PruningHParams(), sparsity=0.5)
    dense = copy.deepcopy(pruning.state_dict())

    def restore() -> None:  # dense weights and masks: every timed update is a first one
        with torch.no_grad():
            for w, b in zip(weights, backup, strict=True):
                w.copy_(b)
        pruning.load_state_dict(dense)

    @torch.no_grad()
    def floor() -> None:
        for w in weights:
            w.sum()

    repeats = 5 if millions <= 10 else 3
    update = best_of(lambda: pruning.mask_update(0), repeats, restore)
    read = best_of(floor, repeats)
    return {"params": n, "update_ms": update * 1e3, "read_ms": read * 1e3, "x_read": update / read}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [1, 3, 10] if args.quick else [1, 3, 10, 30, 100]
    rows = [measure(millions) for millions in sizes]
    print(f"\nmask update (histogram, sparsity 0.5) vs size, torch {torch.__version__}, {args.threads} threads")
    print("\n| pruned weights | update (ms) | one read (ms) | x one read | ns per weight |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['params'] / 1e6:.1f} M | {r['update_ms']:.1f} | {r['read_ms']:.2f} | {r['x_read']:.1f} | "
            f"{r['update_ms'] * 1e6 / r['params']:.2f} |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(rows, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.loglog([r["params"] for r in rows], [r["update_ms"] for r in rows], "o-", label="lit_prune mask update")
    ax.loglog([r["params"] for r in rows], [r["read_ms"] for r in rows], "s--", label="one read (floor)")
    ax.set_xlabel("pruned weights")
    ax.set_ylabel("ms")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "mask_update_scaling.png", dpi=120)
    plt.close(fig)
    print(f"\nJSON and plot: {out}/scaling.json, {out}/mask_update_scaling.png")


if __name__ == "__main__":
    main()
