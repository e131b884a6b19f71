"""Structured kernel pruning on digits: speed, size and accuracy of 'oracle' mode vs baselines, one run.

    python bench/oracle.py            # 3 seeds, all criteria (about 4 min on 2 CPU cores)
    python bench/oracle.py --quick    # 1 seed, short training

For each seed: train the digits residual CNN (``lit_prune.cli.digits.digits_resnet``, 75 k parameters)
for 30 epochs; then for each criterion (HALCON 'oracle' mode with the Taylor score, the exact
oracle, smallest L1 norm, random) score the kernels on the training set, remove 50 % of the
prunable kernels, fine-tune 10 epochs, and measure test accuracy.  CPU latency at batch 64
(``model.eval()``, ``inference_mode``, ``--threads`` threads) is timed for the dense and every
pruned model interleaved in the same process: median of ``--rounds`` rounds of 50 calls.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from lit_prune.cli.digits import digits_resnet, load_digits_split
from lit_prune.oracle import OraclePruning

CRITERIA = {
    "oracle (Taylor), global": ("taylor", "global"),
    "oracle (Taylor), per layer": ("taylor", "per_layer"),
    "exact oracle, global": ("exact", "global"),
    "smallest L1, global": ("l1", "global"),
    "smallest L1, per layer": ("l1", "per_layer"),
    "random, per layer": ("random", "per_layer"),
}


def fit(model: nn.Module, x, y, epochs: int, lr: float, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * ((len(y) + 63) // 64))
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.inference_mode()
def accuracy(model: nn.Module, x, y) -> float:
    return (model.eval()(x).argmax(1) == y).float().mean().item()


def latency(models: dict[str, nn.Module], rounds: int, calls: int = 50) -> dict[str, float]:
    x = torch.randn(64, 1, 8, 8)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for m in models.values():
            for _ in range(30):
                m.eval()(x)
        for _ in range(rounds):
            for name, m in models.items():
                start = time.perf_counter()
                for _ in range(calls):
                    m(x)
                times[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--percentage", type=float, default=50.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = args.seeds or (1 if args.quick else 3)
    epochs, finetune = (8, 3) if args.quick else (30, 10)
    splits = load_digits_split(0)
    (xt, yt), (xs, ys) = splits["train"], splits["test"]
    rows: dict[str, list[tuple[float, float, int, float]]] = {"dense": [], **{k: [] for k in CRITERIA}}
    for seed in range(seeds):
        torch.manual_seed(seed)
        dense = fit(digits_resnet(), xt, yt, epochs, 3e-3, seed)
        dense_ft = fit(copy.deepcopy(dense), xt, yt, finetune, 1e-3, seed)  # same extra training, no pruning
        models = {"dense": dense_ft}
        for label, (score, ranking) in CRITERIA.items():
            gen_param = {"percentage": args.percentage, "score": score, "ranking": ranking, "seed": seed}
            handle = OraclePruning(dense, "oracle", gen_param)
            for batch in zip(xt.split(128), yt.split(128), strict=True):
                handle.add_batch(batch)
            pruned = handle.gen_pruned_model()
            before = accuracy(pruned, xs, ys)
            models[label] = fit(pruned, xt, yt, finetune, 1e-3, seed)
            rows[label].append((before, 0.0, sum(p.numel() for p in pruned.parameters()), 0.0))
        times = latency(models, args.rounds)
        for label, model in models.items():
            params = sum(p.numel() for p in model.parameters())
            before = rows[label][-1][0] if label != "dense" else accuracy(dense, xs, ys)
            if label == "dense":
                rows[label].append((before, accuracy(model, xs, ys), params, times[label]))
            else:
                rows[label][-1] = (before, accuracy(model, xs, ys), params, times[label])

    def stat(values: list[float]) -> str:
        mean = statistics.mean(values)
        return f"{100 * mean:.2f}" + (f" ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else "")

    dense_ms = statistics.mean(r[3] for r in rows["dense"])
    dense_params = rows["dense"][0][2]
    dense_acc = statistics.mean(r[1] for r in rows["dense"])
    print(f"\nstructured pruning of {args.percentage:.0f} % of the prunable kernels, digits_resnet, {seeds} seed(s), "
          f"torch {torch.__version__}, {args.threads} threads, batch 64")  # fmt: skip
    print("\n| criterion | test acc before fine-tune (%) | test acc after (%) | params | latency (ms) | speed-up | "
          "params x fewer | acc vs dense (pts) |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, rs in rows.items():
        ms = statistics.mean(r[3] for r in rs)
        acc = statistics.mean(r[1] for r in rs)
        params = rs[0][2]
        print(
            f"| {label} | {stat([r[0] for r in rs])} | {stat([r[1] for r in rs])} | {params} | {1e3 * ms:.2f} | "
            f"{dense_ms / ms:.2f}x | {dense_params / params:.2f}x | {100 * (acc - dense_acc):+.2f} |"
        )
    best = rows["oracle (Taylor), per layer"]
    speed = dense_ms / statistics.mean(r[3] for r in best)
    fewer = dense_params / best[0][2]
    drop = 100 * (dense_acc - statistics.mean(r[1] for r in best))
    verdict = {True: "met", False: "MISSED"}
    print(f"\noracle mode (Taylor, per layer): {speed:.2f}x faster (target >= 1.6x: {verdict[speed >= 1.6]}), ", end="")
    print(f"{fewer:.2f}x fewer parameters (target >= 2x: {verdict[fewer >= 2]}), ", end="")
    print(f"{drop:.2f} points below dense (target <= 1.5: {verdict[drop <= 1.5]})")


if __name__ == "__main__":
    main()
