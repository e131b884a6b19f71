"""Accuracy at sparsity on digits: lit_prune's gradual pruning vs Lightning's ModelPruning vs one-shot.

    python bench/accuracy.py            # CNN and MLP, 50/75/90/95 %, 2 seeds (about 6 min on 2 CPU cores)
    python bench/accuracy.py --quick    # CNN only, 75/90 %, 1 seed, short

Every run trains the same model with the same optimizer (Adam, lr 2e-3) for ``--epochs`` epochs of
scikit-learn's digits in ``Trainer.fit`` and reports the test accuracy and the achieved sparsity of
the conv/linear weights:

* dense - no pruning (the reference);
* lit_prune - ``PruningCallback``, TF's cubic schedule from the end of epoch 1 to two thirds of
  training, masks every 10 steps, then fine-tuning at the target; every layer at the target (TF);
* lit_prune global - the same with ``global_ranking=True``: one threshold over all layers, as
  ModelPruning's default global ranking;
* ModelPruning - Lightning's callback with its natural per-epoch schedule: ``l1_unstructured`` at
  the end of the same epochs, a constant share of the remaining weights each time so that the last
  pruning epoch reaches the target (``1 - (1 - s)^(1/n)``), its default global ranking and
  permanent pruning at the end; the lottery-ticket rewind (its default) is turned off, as a user
  pruning gradually would;
* one-shot - the dense model's weights pruned once at the end by magnitude (per layer), no
  fine-tuning.

Prints a markdown table (mean and spread over seeds), writes JSON and ``accuracy_vs_sparsity.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelPruning
from torch import nn

from lit_prune import Pruning, PruningCallback, PruningHParams
from lit_prune.cli.demos import DigitsDataModule, ImageClassifier
from lit_prune.cli.digits import digits_cnn, mlp

MODELS = {"CNN": lambda: digits_cnn(masked=False), "MLP": lambda: mlp()}
STEPS_PER_EPOCH = 20  # 1257 training digits, batch 64


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
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    return args


def digits_trainer(epochs: int, callbacks: list) -> tuple[Trainer, DigitsDataModule]:
    """A quiet CPU ``Trainer`` for ``epochs`` epochs of digits (batch 64, no validation), and the data."""
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
    return trainer, DigitsDataModule(batch_size=64, seed=0)


def run(method: str, make_net, target: float, epochs: int, seed: int) -> tuple[float, float]:
    seed_everything(seed, verbose=False)
    model = ImageClassifier(make_net(), lr=2e-3)
    begin, end = STEPS_PER_EPOCH, int(2 / 3 * epochs) * STEPS_PER_EPOCH  # pruning window, in steps
    callbacks = []
    if method in ("lit_prune", "lit_prune global"):
        spec = PruningHParams(
            global_ranking=method == "lit_prune global",
            begin_pruning_step=begin,
            end_pruning_step=end,
            pruning_frequency=10,
            target_sparsity=target,
            sparsity_function_begin_step=begin,
            sparsity_function_end_step=end,
        )
        callbacks.append(PruningCallback(spec, log_histograms=False))
    elif method == "ModelPruning":
        first, last = begin // STEPS_PER_EPOCH, end // STEPS_PER_EPOCH - 1  # epochs at whose end it prunes
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
    trainer, data = digits_trainer(epochs, callbacks)
    trainer.fit(model, datamodule=data)
    if method == "one-shot":
        pruning = Pruning(model, PruningHParams(threshold_method="exact"), sparsity=target)
        pruning.mask_update(0)
    acc = trainer.test(model, datamodule=data, verbose=False)[0]["test_acc"]
    return float(acc), sparsity(model)


def main() -> None:
    args = parse_bench_args(__doc__)
    seeds = args.seeds or (1 if args.quick else 2)
    epochs = args.epochs or (6 if args.quick else 15)
    targets = [0.75, 0.9] if args.quick else [0.5, 0.75, 0.9, 0.95]
    models = {"CNN": MODELS["CNN"]} if args.quick else MODELS
    results: list[dict] = []
    for model_name, make_net in models.items():
        dense = [run("dense", make_net, 0.0, epochs, seed)[0] for seed in range(seeds)]
        results.append({"model": model_name, "method": "dense", "target": 0.0, "acc": dense, "sparsity": [0.0]})
        for target in targets:
            for method in ("lit_prune", "lit_prune global", "ModelPruning", "one-shot"):
                runs = [run(method, make_net, target, epochs, seed) for seed in range(seeds)]
                results.append(
                    {
                        "model": model_name,
                        "method": method,
                        "target": target,
                        "acc": [r[0] for r in runs],
                        "sparsity": [r[1] for r in runs],
                    }
                )

    def fmt(values: list[float]) -> str:
        mean = 100 * statistics.mean(values)
        return f"{mean:.2f}" + (f" ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else "")

    print(f"\ndigits test accuracy (%), {epochs} epochs, {seeds} seed(s), torch {torch.__version__}")
    print("\n| model | target sparsity | dense | lit_prune gradual | lit_prune global | ModelPruning |", end="")
    print(" one-shot at end | achieved (lit / MP) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for model_name in models:
        rows = {(r["method"], r["target"]): r for r in results if r["model"] == model_name}
        dense = rows[("dense", 0.0)]["acc"]
        for target in targets:
            lit, glob, mp, one = (
                rows[(m, target)] for m in ("lit_prune", "lit_prune global", "ModelPruning", "one-shot")
            )
            achieved = f"{100 * statistics.mean(lit['sparsity']):.1f} / {100 * statistics.mean(mp['sparsity']):.1f}"
            print(
                f"| {model_name} | {100 * target:.0f} % | {fmt(dense)} | {fmt(lit['acc'])} | {fmt(glob['acc'])} | "
                f"{fmt(mp['acc'])} | "
                f"{fmt(one['acc'])} | {achieved} |"
            )
        for method in ("lit_prune", "lit_prune global"):
            at90 = rows.get((method, 0.9))
            if at90 is None:
                continue
            gap = 100 * (statistics.mean(dense) - statistics.mean(at90["acc"]))
            versus = 100 * (statistics.mean(at90["acc"]) - statistics.mean(rows[("ModelPruning", 0.9)]["acc"]))
            print(
                f"\n{model_name} at 90 %, {method}: {gap:.2f} points below dense (target <= 1: "
                f"{'met' if gap <= 1 else 'MISSED'}), {versus:+.2f} points vs ModelPruning (target >= 0: "
                f"{'met' if versus >= 0 else 'MISSED'})"
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(results, indent=2))
    plot(results, models, targets, out / "accuracy_vs_sparsity.png")
    print(f"\nJSON and plot: {out}/accuracy.json, {out}/accuracy_vs_sparsity.png")


def plot(results: list[dict], models, targets: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, model_name in zip(axes[0], models, strict=True):
        rows = {(r["method"], r["target"]): r for r in results if r["model"] == model_name}
        dense = statistics.mean(rows[("dense", 0.0)]["acc"])
        ax.axhline(100 * dense, color="grey", linestyle="--", label="dense")
        for method, style in (
            ("lit_prune", "o-"),
            ("lit_prune global", "D-"),
            ("ModelPruning", "s-"),
            ("one-shot", "^:"),
        ):
            means = [100 * statistics.mean(rows[(method, t)]["acc"]) for t in targets]
            ax.plot([100 * t for t in targets], means, style, label=method)
        ax.set_title(f"digits {model_name}")
        ax.set_xlabel("target sparsity (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
