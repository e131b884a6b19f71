"""How N:M should meet the schedule: 2:4 accuracy on digits, gradual vs one-shot (CPU).

    python bench/nm_accuracy.py            # MLP and CNN, 3 seeds, 15 epochs (about 4 min on 2 CPU cores)
    python bench/nm_accuracy.py --quick    # MLP only, 1 seed, 6 epochs

Every run trains the same model with Adam (lr 2e-3) on scikit-learn's digits; the 2:4 weights are
every conv/linear weight whose input size (in * kh * kw) divides by 4 (the others stay dense):

* dense - no pruning;
* gradual - ``nm_sparsity_map`` with TF's cubic schedule from the end of epoch 1 to two thirds of
  training: each group of 4 goes 4:4 -> 3:4 -> 2:4 as the weight's own schedule (to 1 - N/M)
  crosses 1/4 and 1/2, then fine-tuning at 2:4 (lit_prune's default, google-research's
  ``intra_block_sparsity``);
* one-shot at begin - 2:4 at the first update (end of epoch 1), then training at 2:4 (what TF
  Model Optimization's ``sparsity_m_by_n`` does: it applies the pattern at the first step);
* one-shot at end - the dense model made 2:4 by magnitude after training, no fine-tuning.

Prints a markdown table (mean ± spread over seeds) and writes JSON.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch
from lightning.pytorch import seed_everything
from torch import nn

from lit_prune import Pruning, PruningCallback, PruningHParams, is_nm_sparse
from lit_prune.cli.demos import ImageClassifier
from lit_prune.cli.digits import digits_cnn, mlp
from lit_prune.engine.nm import nm_group_view

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import digits_trainer, parse_bench_args  # noqa: E402

MODELS = {"MLP": lambda: mlp(), "CNN": lambda: digits_cnn(masked=False)}
METHODS = ("gradual", "one-shot at begin", "one-shot at end")
STEPS_PER_EPOCH = 20  # 1257 training digits, batch 64


def nm_names(model: nn.Module) -> list[str]:
    return [
        n
        for n, p in model.named_parameters()
        if n.endswith("weight") and p.dim() > 1 and nm_group_view(tuple(p.shape), 4) is not None
    ]


def spec(model: nn.Module, begin: int, end: int) -> PruningHParams:
    names = nm_names(model)
    return PruningHParams(
        prune_patterns=[f"^{n}$".replace(".", r"\.") for n in names],
        nm_sparsity="2:4",
        target_sparsity=0.5,
        begin_pruning_step=begin,
        end_pruning_step=end,
        pruning_frequency=10,
        sparsity_function_begin_step=begin,
        sparsity_function_end_step=end,
    )


def run(method: str, make_net, epochs: int, seed: int) -> tuple[float, float]:
    seed_everything(seed, verbose=False)
    model = ImageClassifier(make_net(), lr=2e-3)
    begin, end = STEPS_PER_EPOCH, int(2 / 3 * epochs) * STEPS_PER_EPOCH
    callbacks = []
    if method == "gradual":
        callbacks.append(PruningCallback(spec(model, begin, end), log_histograms=False))
    elif method == "one-shot at begin":
        callbacks.append(PruningCallback(spec(model, begin, end), sparsity=0.5, log_histograms=False))
    trainer, data = digits_trainer(epochs, callbacks)
    trainer.fit(model, datamodule=data)
    if method == "one-shot at end":
        Pruning(model, spec(model, begin, end), sparsity=0.5).mask_update(0)
    params = dict(model.named_parameters())
    names = nm_names(model)
    if method != "dense":
        assert all(is_nm_sparse(params[n], 2, 4) for n in names), method
    zeros = sum(int((params[n] == 0).sum()) for n in names) / sum(params[n].numel() for n in names)
    acc = trainer.test(model, datamodule=data, verbose=False)[0]["test_acc"]
    return float(acc), zeros


def main() -> None:
    args = parse_bench_args(__doc__)
    seeds = args.seeds or (1 if args.quick else 3)
    epochs = args.epochs or (6 if args.quick else 15)
    models = {"MLP": MODELS["MLP"]} if args.quick else MODELS
    results = []
    for model_name, make_net in models.items():
        for method in ("dense", *METHODS):
            runs = [run(method, make_net, epochs, seed) for seed in range(seeds)]
            results.append(
                {"model": model_name, "method": method, "acc": [r[0] for r in runs], "zeros": [r[1] for r in runs]}
            )

    def fmt(values: list[float]) -> str:
        mean = 100 * statistics.mean(values)
        return f"{mean:.2f}" + (f" ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else "")

    print(f"\n2:4 on digits: test accuracy (%), {epochs} epochs, {seeds} seed(s), torch {torch.__version__}")
    print("\n| model | 2:4 weights | dense | " + " | ".join(METHODS) + " |")
    print("| --- | --- | ---: | " + " | ".join("---:" for _ in METHODS) + " |")
    for model_name, make_net in models.items():
        rows = {r["method"]: r for r in results if r["model"] == model_name}
        names = ", ".join(nm_names(make_net()))
        cells = " | ".join(fmt(rows[m]["acc"]) for m in METHODS)
        print(f"| {model_name} | {names} | {fmt(rows['dense']['acc'])} | {cells} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "nm_accuracy.json").write_text(json.dumps(results, indent=2))
    print(f"\nJSON: {out}/nm_accuracy.json")


if __name__ == "__main__":
    main()
