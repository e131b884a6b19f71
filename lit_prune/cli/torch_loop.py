"""The engine in a plain PyTorch loop (no Lightning, no Hydra): gradual pruning on scikit-learn's digits.

``python -m lit_prune.cli.torch_loop`` trains the digits CNN with TF's gradual schedule to 90 % sparsity,
after a dense baseline, writes TensorBoard summaries under ``runs/demo/``, saves the stripped
model and prints dense-vs-pruned accuracy and per-layer sparsity (about 30 s on two CPU cores).
Any hparam can be overridden with a TF-style string::

    python -m lit_prune.cli.torch_loop --pruning_hparams "target_sparsity=0.95,threshold_method=exact"

The main job is ``lit-prune`` (the Hydra app around the Lightning callback); this script shows
what the callback does, step by step, for users of other training loops.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter

from lit_prune import Pruning, PruningHParams, strip_pruning_vars
from lit_prune.cli.digits import digits_cnn, load_digits_split

DEFAULT_HPARAMS = (
    "name=digits_pruning,begin_pruning_step=100,end_pruning_step=600,pruning_frequency=20,"
    "target_sparsity=0.9,sparsity_function_begin_step=100,sparsity_function_end_step=500"
)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def train(
    hparams: PruningHParams | None, epochs: int, seed: int, writer: SummaryWriter | None
) -> tuple[nn.Module, Pruning | None]:
    """Train ``digits_cnn`` with Adam; prune with ``hparams`` (``None`` = dense)."""
    torch.manual_seed(seed)
    splits = load_digits_split(seed)
    (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
    model = digits_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    pruning = Pruning(model, hparams) if hparams is not None else None
    step = 0
    for epoch in range(epochs):
        for batch in torch.randperm(len(y_train)).split(64):
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1  # the global step counts optimizer steps, as TF's did
            if pruning is not None:
                pruning.apply_mask()  # pruned weights stay exactly zero after the optimizer moved them
                if pruning.conditional_mask_update(step) and writer is not None:
                    for tag, value in pruning.summaries(step).items():
                        writer.add_scalar(tag, float(value), step)
                    writer.add_scalar("model_sparsity", float(pruning.model_sparsity()), step)
            if writer is not None and step % 10 == 0:
                writer.add_scalar("train/loss", loss.item(), step)
        if writer is not None:
            writer.add_scalar("test/accuracy", accuracy(model, x_test, y_test), step)
            if pruning is not None:
                for name, w in pruning.get_weights().items():
                    writer.add_histogram(f"weights/{name}", w.detach(), epoch)
    return model, pruning


def main(argv: list[str] | None = None) -> None:
    """Train dense and pruned digit classifiers, log to TensorBoard, print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pruning_hparams", default="", help="TF-style overrides, e.g. 'target_sparsity=0.95'")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logdir", default="runs/demo")
    args = parser.parse_args(argv)

    hparams = PruningHParams().parse(DEFAULT_HPARAMS)
    if args.pruning_hparams:
        hparams = hparams.parse(args.pruning_hparams)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    logdir = Path(args.logdir)
    start = time.perf_counter()
    x_test, y_test = load_digits_split(args.seed)["test"]
    dense, _ = train(None, args.epochs, args.seed, SummaryWriter(str(logdir / "dense")))
    writer = SummaryWriter(str(logdir / "pruned"))
    pruned, pruning = train(hparams, args.epochs, args.seed, writer)
    writer.close()
    assert pruning is not None
    stripped = strip_pruning_vars(pruned, pruning)
    torch.save(stripped.state_dict(), logdir / "pruned_stripped.pt")

    print(f"digits CNN, {args.epochs} epochs, seed {args.seed}, spec: {hparams.name}")
    print(f"  dense accuracy : {accuracy(dense, x_test, y_test):.4f}")
    print(f"  pruned accuracy: {accuracy(stripped, x_test, y_test):.4f}")
    sparsity, last = float(pruning.model_sparsity()), pruning.last_update_step
    print(f"  model sparsity : {sparsity:.4f} (last mask update at step {last})")
    for name, value in pruning.get_weight_sparsity().items():
        print(f"    {name:<12} sparsity {float(value):.4f}")
    print(f"TensorBoard logs and stripped model in {logdir}/ ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
