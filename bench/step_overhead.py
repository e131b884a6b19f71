"""Training-step overhead in Trainer.fit: PruningCallback vs Lightning's ModelPruning vs no pruning.

    python bench/step_overhead.py            # ResNet-18 (11.2 M pruned weights), CPU, 5 rounds
    python bench/step_overhead.py --quick    # a smaller net, 1 round
    python bench/step_overhead.py --stem cifar   # the 3x3-stem ResNet-18 usual for 32x32 images

Each run trains two epochs on random 3x32x32 images (``--image-size`` for larger ones).  Both
pruners prune half of every conv and linear weight at the end of the first epoch (lit_prune: one
update at step 1 with an external sparsity of 0.5; ModelPruning: ``l1_unstructured``,
``amount=0.5`` at its epoch end), and the second epoch, with pruned masks and no further update,
is the steady state that is timed: the median step time, best of the rounds, with the three
configurations interleaved in each round.  Also reports the extra bytes per pruned parameter
each keeps, the size of a mid-training checkpoint (optimizer state included), and the time
PruningCallback's own hook takes per step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelPruning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import resnet18  # noqa: E402

from lit_prune import PruningCallback, PruningHParams  # noqa: E402


class Classifier(LightningModule):
    def __init__(self, net: nn.Module, steps: int, batch: int, size: int) -> None:
        super().__init__()
        self.net = net
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(steps * batch, 3, size, size, generator=g)
        self.y = torch.randint(0, 10, (steps * batch,), generator=g)
        self.batch = batch

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch)


class StepTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0
        self.extra_bytes = 0
        self.checkpoint_mb = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # registered last, so this includes the other callbacks' on_train_batch_end work
        if trainer.current_epoch == 1:
            self.times.append(time.perf_counter() - self._start)
            if batch_idx == 0:
                self.extra_bytes = extra_bytes(trainer, pl_module)
                with tempfile.TemporaryDirectory() as tmp:  # a mid-training checkpoint, pruning state included
                    path = Path(tmp) / "mid.ckpt"
                    trainer.save_checkpoint(path)
                    self.checkpoint_mb = path.stat().st_size / 2**20


def extra_bytes(trainer, pl_module) -> int:
    """What pruning keeps beside the model, measured mid-training (ModelPruning strips its state at the end)."""
    total = 0
    for cb in trainer.callbacks:
        if isinstance(cb, PruningCallback):
            total += sum(m.numel() * m.element_size() for m in cb.get_masks().values())
    for module in pl_module.modules():
        for name, t in [*module.named_buffers(recurse=False), *module.named_parameters(recurse=False)]:
            if name.endswith("_mask") or name.endswith("_orig"):
                total += t.numel() * t.element_size()
    return total


def run(kind: str, make_net, steps: int, batch: int, size: int) -> tuple[float, float, float, float]:
    torch.manual_seed(0)
    model = Classifier(make_net(), steps, batch, size)
    callbacks: list[Callback] = []
    if kind == "lit_prune PruningCallback":
        spec = PruningHParams(begin_pruning_step=1, end_pruning_step=2, pruning_frequency=1)
        callbacks.append(PruningCallback(spec, sparsity=0.5, log_histograms=False))
    elif kind == "Lightning ModelPruning":
        params = [(m, "weight") for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
        callbacks.append(ModelPruning("l1_unstructured", amount=0.5, parameters_to_prune=params, verbose=0))
    timer = StepTimer()
    hook_times: list[float] = []
    if kind == "lit_prune PruningCallback":  # time the callback's own per-step work, too
        cb, inner = callbacks[0], callbacks[0].on_train_batch_end

        def timed_hook(trainer, *args, **kwargs):
            start = time.perf_counter()
            inner(trainer, *args, **kwargs)
            if trainer.current_epoch == 1:
                hook_times.append(time.perf_counter() - start)

        cb.on_train_batch_end = timed_hook
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, timer],
    )
    trainer.fit(model)
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear))
    hook = statistics.median(hook_times) if hook_times else 0.0
    return statistics.median(timer.times), timer.extra_bytes / n, hook, timer.checkpoint_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=32, help="input images are 3 x size x size")
    parser.add_argument(
        "--stem", choices=["imagenet", "cifar"], default="imagenet", help="ResNet-18 stem (cifar: 3x3, no pool)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (1 if args.quick else 5)
    make_net = (
        (lambda: nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 30 * 30, 10)))
        if args.quick
        else (lambda: resnet18(10, stem=args.stem))
    )
    steps, batch = (6, 8) if args.quick else (16, 16)
    kinds = ["no pruning", "lit_prune PruningCallback", "Lightning ModelPruning"]
    best = {k: float("inf") for k in kinds}
    memory, checkpoint, hook = {}, {}, float("inf")
    for _ in range(rounds):
        for kind in kinds:
            t, extra, h, ckpt = run(kind, make_net, steps, batch, args.image_size)
            checkpoint[kind] = ckpt
            best[kind] = min(best[kind], t)
            memory[kind] = extra
            if kind == "lit_prune PruningCallback":
                hook = min(hook, h)
    size = f"3x{args.image_size}x{args.image_size}"
    label = "small conv net" if args.quick else f"ResNet-18 ({args.stem} stem), batch {batch}, {size}"
    print(f"\nsteady-state training step, {label}, torch {torch.__version__}, {args.threads} threads")
    print("\n| configuration | median step (ms) | overhead vs no pruning | extra bytes / pruned param |", end="")
    print(" mid-training checkpoint (MiB) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for kind in kinds:
        overhead = best[kind] / best["no pruning"] - 1
        row = f"| {kind} | {best[kind] * 1e3:.1f} | {overhead * 100:+.1f} % | {memory[kind]:.2f} |"
        print(f"{row} {checkpoint[kind]:.1f} |")
    share = hook / best["no pruning"] * 100
    print(f"\nPruningCallback's own work per step (median of its on_train_batch_end): {hook * 1e3:.2f} ms", end="")
    print(f" = {share:.1f} % of a step without pruning")


if __name__ == "__main__":
    main()
