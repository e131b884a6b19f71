"""The TensorBoard figures of the docs, from a real run's event file.

    python docs/scripts/tensorboard_figures.py                  # runs lit-prune (~20 s), then plots
    python docs/scripts/tensorboard_figures.py --from-json      # plots docs/data/digits_run_scalars.json again
    python docs/scripts/tensorboard_figures.py --logdir DIR     # plots an existing run's tensorboard/ folder

The run is ``lit-prune dense_baseline=false pruning.allocation=erk pruning.pruning_frequency=5
seed=0`` (the digits CNN to 90 %, 300 steps on the CPU) in a temporary folder. Its TensorBoard
event file is read with ``EventAccumulator``; the scalars that lit_prune wrote are saved to
``docs/data/digits_run_scalars.json`` (with the command) and drawn into
``docs/assets/tensorboard_scalars.png`` (what TensorBoard's *Scalars* tab shows) and
``docs/assets/layer_sparsity.png`` (each layer's final mask sparsity).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "docs" / "data" / "digits_run_scalars.json"
ASSETS = ROOT / "docs" / "assets"
OVERRIDES = ["dense_baseline=false", "pruning.allocation=erk", "pruning.pruning_frequency=5", "seed=0"]


def run_lit_prune(out: Path) -> Path:
    """Run ``lit-prune`` into ``out``; return its pruned run's TensorBoard folder."""
    cmd = [sys.executable, "-m", "lit_prune", *OVERRIDES, f"hydra.run.dir={out}", "~callbacks.model_checkpoint"]
    subprocess.run(cmd, check=True, cwd=out, stdout=subprocess.DEVNULL)
    return out / "tensorboard"


def read_scalars(logdir: Path) -> dict[str, list[list[float]]]:
    """``{tag: [[step, value], ...]}`` of every scalar in the event files under ``logdir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(logdir.rglob("events.out.tfevents.*"))
    if not files:
        raise SystemExit(f"no TensorBoard event file under {logdir}")
    scalars: dict[str, list[list[float]]] = {}
    for file in files:
        acc = EventAccumulator(str(file), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend([e.step, e.value] for e in acc.Scalars(tag))
    return scalars


def plot(scalars: dict[str, list[list[float]]]) -> list[Path]:
    """Draw the scalars and the per-layer sparsity; return the PNGs written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefix = next(t.split("/")[0] for t in scalars if t.endswith("_summaries/sparsity"))
    layers = sorted({t[len(prefix) + 1 : -len("/mask/sparsity")] for t in scalars if t.endswith("/mask/sparsity")})

    def xy(tag: str) -> tuple[list[float], list[float]]:
        points = sorted(scalars[tag])
        return [p[0] for p in points], [p[1] for p in points]

    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    panels = [
        (axes[0][0], [(f"{prefix}/sparsity", "sparsity (schedule)"), (f"{prefix}/model_sparsity", "model_sparsity")],
         "scheduled and achieved sparsity"),
        (axes[0][1], [(f"{prefix}/{w}/mask/sparsity", w) for w in layers], "<weight>/mask/sparsity"),
        (axes[1][0], [(f"{prefix}/{w}/threshold/threshold", w) for w in layers], "<weight>/threshold/threshold"),
        (axes[1][1], [(t, t) for t in sorted(scalars) if "loss" in t and not t.startswith(prefix)], "losses"),
    ]  # fmt: skip
    for ax, series, title in panels:
        for tag, label in series:
            if tag in scalars:
                x, y = xy(tag)
                ax.plot(x, y, marker="." if len(x) < 40 else None, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("global step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"TensorBoard scalars of a real run ({prefix}/...)", fontsize=11)
    fig.tight_layout()
    ASSETS.mkdir(parents=True, exist_ok=True)
    scalars_png = ASSETS / "tensorboard_scalars.png"
    fig.savefig(scalars_png, dpi=110)
    plt.close(fig)

    final = [xy(f"{prefix}/{w}/mask/sparsity")[1][-1] for w in layers]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    bars = ax.barh(layers, [100 * s for s in final], color="tab:blue")
    ax.bar_label(bars, labels=[f"{100 * s:.1f} %" for s in final], padding=3, fontsize=8)
    target_tags = {w: f"{prefix}/{w}/target_sparsity" for w in layers}
    targets = [(w, xy(tag)[1][-1]) for w, tag in target_tags.items() if tag in scalars]
    if targets:
        ax.scatter([100 * s for _, s in targets], [w for w, _ in targets], marker="|", s=300, color="black", zorder=3,
                   label="<weight>/target_sparsity")  # fmt: skip
    model = xy(f"{prefix}/model_sparsity")[1][-1]
    ax.axvline(100 * model, color="tab:red", linestyle="--", label=f"model_sparsity {100 * model:.1f} %")
    ax.set_xlim(0, 110)
    ax.invert_yaxis()
    ax.set_xlabel("final mask sparsity (%)")
    ax.set_title("Per-layer sparsity at the end of the run (allocation=erk, target 90 %)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    layers_png = ASSETS / "layer_sparsity.png"
    fig.savefig(layers_png, dpi=110)
    plt.close(fig)
    return [scalars_png, layers_png]


def main() -> None:
    """Run (or read) and plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--from-json", action="store_true", help=f"plot {DATA.relative_to(ROOT)} again")
    group.add_argument("--logdir", type=Path, help="an existing run's TensorBoard folder")
    args = parser.parse_args()
    if args.from_json:
        scalars = json.loads(DATA.read_text())["scalars"]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            logdir = args.logdir or run_lit_prune(Path(tmp))
            scalars = read_scalars(logdir)
        source = f"events of {args.logdir}" if args.logdir else "lit-prune " + " ".join(OVERRIDES)
        DATA.parent.mkdir(parents=True, exist_ok=True)
        DATA.write_text(json.dumps({"source": source, "scalars": scalars}, indent=1) + "\n")
    for path in plot(scalars):
        print(path.relative_to(ROOT))


if __name__ == "__main__":
    main()
