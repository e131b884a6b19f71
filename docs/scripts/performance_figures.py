"""The Performance page's figures, from measured data (nothing is timed here).

    python docs/scripts/performance_figures.py          # reads docs/data/*.csv, writes docs/assets/*.png (seconds)
    python docs/scripts/performance_figures.py --accuracy-json bench/results/accuracy.json   # a newer accuracy run

Each CSV says in its header the command that measured it, when and where:

* ``docs/data/mask_update.csv``: ``python bench/mask_update.py`` -> ``mask_update_vs_peers.png``;
* ``docs/data/scaling.csv``: ``python bench/scaling.py`` -> ``scaling.png``;
* ``docs/data/accuracy_bench.json``: the ``accuracy.json`` of ``python bench/accuracy.py`` (3 seeds,
  the allocations and the peers) -> ``accuracy_vs_sparsity.png`` (another run's with
  ``--accuracy-json``; ``docs/data/accuracy.csv`` holds the older 2-seed table).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "docs" / "data"
ASSETS = ROOT / "docs" / "assets"


def read_csv(name: str) -> list[dict[str, str]]:
    """The rows of ``docs/data/<name>``, skipping its ``#`` header lines."""
    lines = [ln for ln in (DATA / name).read_text(encoding="utf-8").splitlines() if not ln.startswith("#")]
    return list(csv.DictReader(lines))


def mask_update(plt) -> Path:
    """Horizontal bars, log scale: one mask update of each method, per model."""
    rows = read_csv("mask_update.csv")
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(12, 4.6), sharey=True)
    for ax, model in zip(axes, models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        labels = [r["method"] for r in mine]
        ms = [float(r["ms"]) for r in mine]
        colors = [
            "grey" if "one read" in m else "tab:red" if m.startswith("torch") else
            "tab:orange" if "eager" in m else "tab:blue" for m in labels
        ]  # fmt: skip
        bars = ax.barh(labels, ms, color=colors)
        ax.bar_label(bars, labels=[f"{v:g} ms ({r['x_one_read']}x)" for v, r in zip(ms, mine, strict=True)],
                     padding=3, fontsize=7)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlim(1, max(ms) * 40)
        ax.set_title(model, fontsize=10)
        ax.set_xlabel("one mask update, ms (log scale); (x one read)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].invert_yaxis()
    fig.suptitle("Mask update at sparsity 0.5, cold caches, 2 CPU threads (python bench/mask_update.py)", fontsize=10)
    fig.tight_layout()
    return save(fig, plt, "mask_update_vs_peers.png")


def scaling(plt) -> Path:
    """Update time and one read against the number of pruned weights, log-log."""
    rows = read_csv("scaling.csv")
    n = [float(r["pruned_weights_m"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.loglog(n, [float(r["update_ms"]) for r in rows], "o-", label="lit_prune first update (histogram)")
    ax.loglog(n, [float(r["one_read_ms"]) for r in rows], "s--", color="grey", label="one read (floor)")
    for x, r in zip(n, rows, strict=True):
        ax.annotate(f"{r['x_one_read']}x", (x, float(r["update_ms"])), textcoords="offset points", xytext=(4, 6),
                    fontsize=7)  # fmt: skip
    ax.set_xlim(0.8, 200)
    ax.set_xlabel("pruned weights (millions)")
    ax.set_ylabel("ms")
    ax.set_title("Linear in the weights (python bench/scaling.py)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, plt, "scaling.png")


def accuracy_rows(json_path: Path | None) -> list[dict]:
    """``[{model, target (%), method, mean, spread}]`` from the CSV, or from ``bench/accuracy.py``'s JSON."""
    if json_path is None:
        return [{**r, "target": float(r["target"]), "mean": float(r["mean"]), "spread": float(r["spread"])}
                for r in read_csv("accuracy.csv")]  # fmt: skip
    runs = json.loads(json_path.read_text())
    groups: dict[tuple[str, float, str], list[float]] = {}
    for r in runs:
        groups.setdefault((r["model"], 100 * r["target"], r["method"]), []).append(100 * r["acc"])
    return [
        {"model": m, "target": t, "method": k, "mean": statistics.mean(v),
         "spread": statistics.stdev(v) if len(v) > 1 else 0.0}
        for (m, t, k), v in groups.items()
    ]  # fmt: skip


def accuracy(plt, json_path: Path | None) -> Path:
    """Test accuracy against target sparsity, one panel per model, dense as a line."""
    rows = accuracy_rows(json_path)
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        dense = [r["mean"] for r in mine if r["method"] == "dense"][0]
        ax.axhline(dense, color="grey", linestyle=":", label="dense")
        off_scale = []  # methods far below dense (one-shot) would squash the others: listed in a note instead
        for method in dict.fromkeys(r["method"] for r in mine if r["method"] != "dense"):
            pts = sorted((r["target"], r["mean"], r["spread"]) for r in mine if r["method"] == method)
            if min(p[1] for p in pts) < dense - 10:
                off_scale.append(f"{method}: " + ", ".join(f"{p[1]:.1f}" for p in pts))
                continue
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                        label=method)  # fmt: skip
        if off_scale:
            ax.text(0.02, 0.03, "off scale (%):\n" + "\n".join(off_scale), transform=ax.transAxes, fontsize=7,
                    va="bottom", bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "lightgrey"})  # fmt: skip
        ax.set_title(f"digits {model}", fontsize=10)
        ax.set_xlabel("target sparsity (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Accuracy against sparsity (python bench/accuracy.py)", fontsize=10)
    fig.tight_layout()
    return save(fig, plt, "accuracy_vs_sparsity.png")


def save(fig, plt, name: str) -> Path:
    """Write ``docs/assets/<name>`` and close the figure."""
    ASSETS.mkdir(parents=True, exist_ok=True)
    path = ASSETS / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    """Draw every figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--accuracy-json",
        type=Path,
        default=DATA / "accuracy_bench.json",
        help="bench/accuracy.py's accuracy.json (default: the 3-seed run kept in docs/data)",
    )
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for path in (mask_update(plt), scaling(plt), accuracy(plt, args.accuracy_json)):
        print(path.relative_to(ROOT))


if __name__ == "__main__":
    main()
