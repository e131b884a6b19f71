"""Accuracy at sparsity on digits: lit_prune's allocations vs Lightning's ModelPruning vs torch's global_unstructured.

    python bench/accuracy.py                # CNN and MLP, 80/90/95 %, 3 seeds
    python bench/accuracy.py --jobs 6       # the same, one process per (model, seed)
    python bench/accuracy.py --quick        # CNN only, 90 %, 1 seed, short

Every run trains the same model with the same optimizer (Adam, lr 2e-3) for ``--epochs`` epochs
of scikit-learn's digits in ``Trainer.fit``, on the split of its seed (``lit-prune seed=N``'s),
and reports the test accuracy.  The schedule is the embedded default's (``conf/pruning/gradual``):
a dense warm-up of two epochs, TF's cubic schedule to the end of epoch 8 (of 15), masks every 5
steps, then fine-tuning at the target.

* dense - no pruning (the reference);
* uniform, global, ERK, sensitivity - ``PruningCallback`` with ``allocation=...``; sensitivity
  reads a scan (:func:`lit_prune.sensitivity`) of the same seed's dense model on the
  *validation* split (loss), never the test split;
* ModelPruning - Lightning's callback with its natural per-epoch schedule: ``l1_unstructured`` at
  the end of the same epochs, a constant share of the remaining weights each time so that the
  last pruning epoch reaches the target (``1 - (1 - s)^(1/n)``), its default global ranking,
  permanent pruning at the end, no lottery-ticket rewind;
* global_unstructured - ``torch.nn.utils.prune.global_unstructured`` (L1) at lit_prune's update
  steps, to the same cubic schedule's sparsity, made permanent at the end.

Prints a markdown table (mean ± standard deviation over seeds), writes ``accuracy.json``,
``accuracy_vs_sparsity.png`` (all models) and one ``accuracy_vs_sparsity_<model>.png`` per model.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelPruning
from torch import nn

from lit_prune import PruningCallback, PruningHParams, gradual_sparsity, sensitivity
from lit_prune.cli.demos import DigitsDataModule, ImageClassifier
from lit_prune.cli.digits import digits_cnn, mlp

MODELS = {"CNN": lambda: digits_cnn(masked=False), "MLP": lambda: mlp()}
STEPS_PER_EPOCH = 20  # 1257 training digits, batch 64
ALLOCATIONS = ("uniform", "global", "erk", "sensitivity")
METHODS = (*ALLOCATIONS, "ModelPruning", "global_unstructured")
SCAN_SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)


def layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def sparsity(model: nn.Module) -> float:
    ws = [m.weight.detach() for m in layers(model)]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def parse_bench_args(doc: str) -> argparse.Namespace:
    """The digits benchmarks' command line; sets the thread count and quiets Lightning."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=1, help="processes, one per (model, seed)")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    return args


def digits_trainer(epochs: int, callbacks: list, seed: int = 0) -> tuple[Trainer, DigitsDataModule]:
    """A quiet CPU ``Trainer`` for ``epochs`` epochs of digits (batch 64, no validation), and the seed's split."""
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    return trainer, DigitsDataModule(batch_size=64, seed=seed)


def schedule(epochs: int, target: float) -> PruningHParams:
    """The embedded default's schedule (``conf/pruning/gradual``) scaled to ``epochs``: steps 40-160 of 300, every 5."""
    begin = max(1, round(2 * epochs / 15)) * STEPS_PER_EPOCH
    end = max(begin // STEPS_PER_EPOCH + 1, round(8 * epochs / 15)) * STEPS_PER_EPOCH
    return PruningHParams(
        begin_pruning_step=begin,
        end_pruning_step=end,
        pruning_frequency=5,
        target_sparsity=target,
        sparsity_function_begin_step=begin,
        sparsity_function_end_step=end,
    )


class GlobalUnstructured(Callback):
    """``torch.nn.utils.prune.global_unstructured`` (L1) at lit_prune's update steps, to the same schedule."""

    def __init__(self, spec: PruningHParams) -> None:
        self.spec, self.last = spec, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        from torch.nn.utils import prune

        step, hp = trainer.global_step, self.spec
        if not (hp.begin_pruning_step <= step <= hp.end_pruning_step and step - self.last >= hp.pruning_frequency):
            return
        self.last = step
        params = [(m, "weight") for m in layers(pl_module)]
        total = sum(m.weight.numel() for m, _ in params)
        pruned = sum(int((m.weight == 0).sum()) for m, _ in params)
        amount = max(0, round(total * gradual_sparsity(step, hp)) - pruned)
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: D102
        from torch.nn.utils import prune

        for m in layers(pl_module):
            if prune.is_pruned(m):
                prune.remove(m, "weight")


def scan_dense(model: ImageClassifier, seed: int, directory: Path) -> Path:
    """Scan the trained dense ``model`` on the validation split (cross-entropy); return the scan's JSON."""
    data = DigitsDataModule(batch_size=64, seed=seed)
    data.setup("fit")
    x, y = data.splits["val"]

    def val_loss(module: nn.Module) -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(module(x), y))

    model.eval()
    scan = sensitivity(model, val_loss, SCAN_SPARSITIES, progress=False)
    model.train()
    return scan.save(directory)["json"]


def run(method: str, make_net, target: float, epochs: int, seed: int, scan: Path | None = None):
    """Train one model with ``method``; return (test accuracy, achieved sparsity, the trained module)."""
    seed_everything(seed, verbose=False)
    model = ImageClassifier(make_net(), lr=2e-3)
    spec = schedule(epochs, target)
    callbacks: list = []
    if method in ALLOCATIONS:
        extra = {"sensitivity_scan": str(scan)} if method == "sensitivity" else {}
        spec = spec.replace(allocation=method, **extra)
        callbacks.append(PruningCallback(spec, log_histograms=False))
    elif method == "ModelPruning":
        first, last = spec.begin_pruning_step // STEPS_PER_EPOCH, spec.end_pruning_step // STEPS_PER_EPOCH - 1
        share = 1 - (1 - target) ** (1 / (last - first + 1))
        callbacks.append(
            ModelPruning(
                "l1_unstructured",
                amount=lambda epoch: share if first <= epoch <= last else 0.0,
                parameters_to_prune=[(m, "weight") for m in layers(model)],
                use_lottery_ticket_hypothesis=False,
                verbose=0,
            )
        )
    elif method == "global_unstructured":
        callbacks.append(GlobalUnstructured(spec))
    trainer, data = digits_trainer(epochs, callbacks, seed)
    trainer.fit(model, datamodule=data)
    acc = trainer.test(model, datamodule=data, verbose=False)[0]["test_acc"]
    return float(acc), sparsity(model), model


def one_seed(job: tuple[str, int, int, list[float], int]) -> list[dict]:
    """Every method and target for one (model, seed): the dense run, its scan, then the pruned runs."""
    model_name, seed, epochs, targets, threads = job
    torch.set_num_threads(threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    make_net = MODELS[model_name]
    acc, _, dense = run("dense", make_net, 0.0, epochs, seed)
    out = [{"model": model_name, "method": "dense", "target": 0.0, "seed": seed, "acc": acc, "sparsity": 0.0}]
    with tempfile.TemporaryDirectory() as tmp:
        scan = scan_dense(dense, seed, Path(tmp))
        for target in targets:
            for method in METHODS:
                acc, achieved, _ = run(method, make_net, target, epochs, seed, scan)
                out.append(
                    {"model": model_name, "method": method, "target": target, "seed": seed, "acc": acc,
                     "sparsity": achieved}
                )  # fmt: skip
    return out


def fmt(values: list[float]) -> str:
    mean = 100 * statistics.mean(values)
    return f"{mean:.2f}" + (f" ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else "")


def table(results: list[dict], models: list[str], targets: list[float]) -> list[str]:
    """The markdown table: one row per (model, target), dense and each method's mean ± std over seeds."""
    lines = [
        "| model | target | dense | " + " | ".join(METHODS) + " |",
        "| --- | ---: |" + " ---: |" * (1 + len(METHODS)),
    ]
    for model_name in models:
        acc = {
            (m, t): [r["acc"] for r in results if r["model"] == model_name and (r["method"], r["target"]) == (m, t)]
            for m in ("dense", *METHODS)
            for t in (0.0, *targets)
        }
        for target in targets:
            cells = [fmt(acc[("dense", 0.0)]), *(fmt(acc[(m, target)]) for m in METHODS)]
            lines.append(f"| {model_name} | {100 * target:.0f} % | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    args = parse_bench_args(__doc__)
    seeds = args.seeds or (1 if args.quick else 3)
    epochs = args.epochs or (6 if args.quick else 15)
    targets = [0.9] if args.quick else [0.8, 0.9, 0.95]
    models = ["CNN"] if args.quick else list(MODELS)
    jobs = [(m, s, epochs, targets, args.threads) for m in models for s in range(seeds)]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            results = [r for part in pool.map(one_seed, jobs) for r in part]
    else:
        results = [r for job in jobs for r in one_seed(job)]
    print(f"\ndigits test accuracy (%), {epochs} epochs, {seeds} seed(s), torch {torch.__version__}\n")
    print("\n".join(table(results, models, targets)))
    for model_name in models:
        gaps = []
        dense = statistics.mean(r["acc"] for r in results if r["model"] == model_name and r["method"] == "dense")
        for method in METHODS:
            at90 = [r["acc"] for r in results if (r["model"], r["method"], r["target"]) == (model_name, method, 0.9)]
            if at90:
                gaps.append(f"{method} {100 * (statistics.mean(at90) - dense):+.2f}")
        print(f"\n{model_name} at 90 %, points against dense: " + ", ".join(gaps))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(results, indent=2))
    plot(results, models, targets, out / "accuracy_vs_sparsity.png")
    for model_name in models:
        plot(results, [model_name], targets, out / f"accuracy_vs_sparsity_{model_name}.png")
    print(f"\nJSON and plots: {out}/accuracy.json, {out}/accuracy_vs_sparsity*.png")


def plot(results: list[dict], models: list[str], targets: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    styles = dict(zip(METHODS, ("o-", "D-", "v-", "*-", "s--", "^--"), strict=True))
    for ax, model_name in zip(axes[0], models, strict=True):
        rows = [r for r in results if r["model"] == model_name]
        dense = statistics.mean(r["acc"] for r in rows if r["method"] == "dense")
        ax.axhline(100 * dense, color="grey", linestyle=":", label="dense")
        for method in METHODS:
            means = [
                100 * statistics.mean(r["acc"] for r in rows if (r["method"], r["target"]) == (method, t))
                for t in targets
            ]
            ax.plot([100 * t for t in targets], means, styles[method], label=method)
        ax.set_title(f"digits {model_name}: test accuracy, mean over seeds")
        ax.set_xlabel("target sparsity (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
