"""A 2-process ``ModelParallelStrategy`` fit on the CPU with FSDP2 and ``PruningCallback``; run by ``test_sharded.py``.

    python tests/sharded_fit.py OUT.json
    python tests/sharded_fit.py OUT2.json --resume-on-one-process   # then: its checkpoint read by one process

Lightning launches the second process by running this script again.  Rank 0 writes what the test
checks: each mask's sparsity, whether it is a DTensor, its local and global shapes, whether every
pruned weight is zero, and the masks one process computes from the gathered weights; then whether a
run stopped at step 8 and resumed from its distributed checkpoint ends with the masks, thresholds,
saliency state and weights of an uninterrupted run; that the same checkpoint read by tensor
parallelism (the second layer split by columns, not rows) starts from the same masks, thresholds
and saliency state; and the checkpoint directory stripped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_prune import Pruning, PruningCallback, strip_checkpoint
from lit_prune.engine.sharding import local

SPEC = "threshold_method=exact,begin_pruning_step=2,sparsity_function_end_step=8,pruning_frequency=2"
#: Gradient saliency too: its state (a DTensor per weight) must survive the resume as the masks do.
RESUME_SPEC = "prune_option=first_order_gradient,begin_pruning_step=2,sparsity_function_end_step=12,pruning_frequency=3"


class Sharded(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 33), nn.ReLU(), nn.Linear(33, 8))

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class ShardedAsTensorParallel(Sharded):
    """The same layers laid out anew: ``net.0`` whole on each process, ``net.2`` split by its 33 columns (17 + 16).

    Under FSDP2 both were split by rows.  (``net.0`` stays whole: torch's column-wise layer cannot
    hand 33 uneven features on to the next one.)
    """

    def configure_model(self) -> None:
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

        plan = {"2": RowwiseParallel(input_layouts=Replicate())}
        parallelize_module(self.net, self.device_mesh["tensor_parallel"], plan)


class StateAtStart(Callback):
    """The pruning state and weights a run starts from (after a resume: what it read), gathered."""

    def __init__(self, pruning: PruningCallback) -> None:
        self.pruning, self.found, self.placements = pruning, {}, {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.found = _state(self.pruning, pl_module)
        masks = self.pruning.get_masks().items()
        self.placements = {n: str(m.placements) if hasattr(m, "placements") else "whole" for n, m in masks}


def trainer_for(
    callbacks: list[Callback],
    max_steps: int,
    root: str,
    every_epoch: bool = False,
    tensor_parallel: bool = False,
    devices: int = 2,
) -> Trainer:
    """CPU processes (two), FSDP2 (or tensor parallelism) through ``ModelParallelStrategy``; a distributed checkpoint.

    The checkpoint is written at the end, or with ``every_epoch`` at each epoch: the run then ends
    after ``max_steps // 4`` epochs of 4 steps (not at ``max_steps``: Lightning 2.6 resumes an
    epoch-end checkpoint of a ``max_steps`` run one batch off).
    """
    saving = [ModelCheckpoint(dirpath=f"{root}/epochs", save_top_k=-1, every_n_epochs=1)] if every_epoch else []
    dp, tp = (1, devices) if tensor_parallel else (devices, 1)
    return Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=ModelParallelStrategy(data_parallel_size=dp, tensor_parallel_size=tp),
        max_steps=-1 if every_epoch else max_steps,
        max_epochs=max_steps // 4 if every_epoch else None,
        callbacks=[*callbacks, *saving],
        logger=False,
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def main(out: str) -> None:
    seed_everything(0)
    data = TensorDataset(torch.randn(256, 16), torch.randint(0, 8, (256,)))
    root = str(Path(out).parent)
    export = Path(root, "exported.pt")
    callback = PruningCallback(SPEC, log_histograms=False, export_path=export)
    trainer = trainer_for([callback], 10, root)
    model = Sharded()
    trainer.fit(model, DataLoader(data, batch_size=16))
    masks, sparsity = callback.get_masks(), callback.get_weight_sparsity()
    params = dict(model.named_parameters())
    whole = {name: p.full_tensor().detach() for name, p in params.items()}  # gathered, for the check only
    exported = torch.load(export, weights_only=True) if trainer.global_rank == 0 else {}
    reference = Pruning(_whole_net(whole), SPEC)
    reference.mask_update(callback.pruning.last_update_step)
    result = {
        name: {
            "sparsity": float(sparsity[name]),
            "dtensor": type(mask).__name__ == "DTensor",
            "local_rows": local(mask).shape[0],
            "rows": mask.shape[0],
            "pruned_are_zero": bool((whole[name][~mask.full_tensor()] == 0).all()),
            "equals_one_process": bool(
                torch.equal(mask.full_tensor(), reference.get_masks()[name.removeprefix("net.")])
            ),
        }
        for name, mask in masks.items()
    }
    resume = _resume_equals_uninterrupted(data, root)
    tensor_parallel = _tensor_parallel_fit(data, root)
    if trainer.global_rank == 0:
        with open(out, "w") as file:
            found = {"rank0": result, "last_update_step": callback.pruning.last_update_step, **resume}
            found["export_equals_weights"] = sorted(exported) == sorted(whole) and all(
                torch.equal(exported[name], whole[name]) for name in whole
            )  # the pruned zeros are in the sharded weights: gathered to rank zero as they are
            _whole_net(exported)  # loads into the unsharded model
            json.dump({**found, "tensor_parallel": tensor_parallel}, file)


class TensorParallel(LightningModule):
    """Column-wise then row-wise parallel linear layers (weights ``Shard(0)`` and ``Shard(1)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))

    def configure_model(self) -> None:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
        parallelize_module(self.net, self.device_mesh["tensor_parallel"], plan)

    training_step = Sharded.training_step
    configure_optimizers = Sharded.configure_optimizers


def _tensor_parallel_fit(data: TensorDataset, root: str) -> dict:
    """Tensor parallelism (2 processes): masks laid out as the weights, equal to one process; summaries logged once."""
    from lightning.pytorch.loggers import TensorBoardLogger

    seed_everything(0)
    spec = "begin_pruning_step=2,sparsity_function_end_step=6,pruning_frequency=2,target_sparsity=0.75"
    spec += ",threshold_method=exact"
    callback, model = PruningCallback(spec), TensorParallel()  # histograms logged too (rank zero)
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2),
        max_steps=6,
        callbacks=[callback],
        logger=TensorBoardLogger(f"{root}/tp", name="", version=""),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(data, batch_size=16))
    masks = callback.get_masks()
    whole = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    net.load_state_dict({k.removeprefix("net."): v for k, v in whole.items()})
    reference = Pruning(net, spec)
    reference.mask_update(callback.pruning.last_update_step)
    trainer.strategy.barrier()
    events = sorted(Path(f"{root}/tp").glob("events.out.tfevents.*"))
    return {
        "placements": {n: str(m.placements) for n, m in masks.items()},
        "equal": all(
            torch.equal(m.full_tensor(), reference.get_masks()[n.removeprefix("net.")]) for n, m in masks.items()
        ),
        "sparsity": {n: float(v) for n, v in callback.get_weight_sparsity().items()},
        "event_files": len(events),
        "logged": _logged_tags(events[0]) if events else [],
    }


def _logged_tags(event_file: Path) -> list[str]:
    """The scalar and histogram tags of a TensorBoard event file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(event_file))
    accumulator.Reload()
    return sorted(accumulator.Tags()["scalars"] + accumulator.Tags()["histograms"])


def _state(callback: PruningCallback, model: Sharded) -> dict[str, torch.Tensor]:
    """Every mask, threshold, saliency tensor and weight, gathered (for the comparison only)."""
    state = callback.pruning.state_dict()
    found = {f"mask/{n}": _whole(m) for n, m in state["masks"].items()}
    found.update({f"threshold/{n}": t for n, t in state["thresholds"].items()})
    for name, tensors in state["saliency"].items():
        found.update({f"saliency/{name}/{k}": _whole(t) for k, t in tensors.items()})
    found.update({f"weight/{n}": _whole(p).detach() for n, p in model.named_parameters()})
    return found


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _resume_equals_uninterrupted(data: TensorDataset, root: str) -> dict:
    """16 steps in one go, and a resume from its step-8 distributed checkpoint to step 16: the same state.

    The run is as if killed after step 8: its checkpoint there is read back into a new model and
    callback.
    """
    loader = DataLoader(TensorDataset(*data[:128]), batch_size=16)  # 4 steps an epoch in each process
    seed_everything(0)
    straight, model = PruningCallback(RESUME_SPEC, log_histograms=False), Sharded()
    trainer = trainer_for([straight], 16, f"{root}/straight", every_epoch=True)
    trainer.fit(model, loader)
    expected = _state(straight, model)
    checkpoint = f"{root}/straight/epochs/epoch=1-step=8.ckpt"
    resumed, model = PruningCallback(RESUME_SPEC, log_histograms=False), Sharded()
    start = StateAtStart(resumed)
    trainer_for([resumed, start], 16, f"{root}/resumed", every_epoch=True).fit(model, loader, ckpt_path=checkpoint)
    found = _state(resumed, model)
    different = sorted(k for k in expected if not torch.equal(expected[k], found[k]))
    # the same checkpoint read by tensor parallelism: each mask and saliency tensor resharded to its new layout
    as_tp = PruningCallback(RESUME_SPEC, log_histograms=False)
    tp_start = StateAtStart(as_tp)
    tp_trainer = trainer_for([as_tp, tp_start], 12, f"{root}/as_tp", every_epoch=True, tensor_parallel=True)
    tp_trainer.fit(ShardedAsTensorParallel(), loader, ckpt_path=checkpoint)
    pruning_state = [k for k in start.found if not k.startswith("weight/")]  # the weights are Lightning's to load
    resharded_differs = sorted(k for k in pruning_state if not torch.equal(start.found[k], tp_start.found[k]))
    if trainer.global_rank == 0:  # for the run on one process (resume_on_one_process) to compare with
        torch.save({k: start.found[k] for k in pruning_state}, f"{root}/state_at_step_8.pt")
    stripped = strip_checkpoint(checkpoint) if trainer.global_rank == 0 else {}
    net = _whole_net(dict(stripped)) if stripped else None
    return {
        "checkpoint_is_directory": Path(checkpoint).is_dir(),
        "resumed_update_step": resumed.pruning.last_update_step,
        "straight_update_step": straight.pruning.last_update_step,
        "resume_differs": different,
        "compared": len(expected),
        "resharded_differs": resharded_differs,
        "resharded_compared": len(pruning_state),
        "placements_before": start.placements,
        "placements_resharded": tp_start.placements,
        "stripped_loads": net is not None,
        "stripped_sparsity": [float((p == 0).float().mean()) for n, p in net.named_parameters() if "weight" in n]
        if net is not None
        else [],
    }


def _whole_net(state: dict[str, torch.Tensor]) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(16, 33), nn.ReLU(), nn.Linear(33, 8))
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items()})
    return net


def resume_on_one_process(out: str) -> None:
    """The 2-process run's step-8 checkpoint resumed by one process: each mask and saliency tensor read whole."""
    root = str(Path(out).parent)
    data = TensorDataset(torch.randn(128, 16), torch.randint(0, 8, (128,)))
    callback = PruningCallback(RESUME_SPEC, log_histograms=False)
    start = StateAtStart(callback)
    trainer = trainer_for([callback, start], 12, f"{root}/one", every_epoch=True, devices=1)
    trainer.fit(Sharded(), DataLoader(data, batch_size=16), ckpt_path=f"{root}/straight/epochs/epoch=1-step=8.ckpt")
    expected = torch.load(f"{root}/state_at_step_8.pt", weights_only=True)
    different = sorted(k for k in expected if not torch.equal(expected[k], start.found[k]))
    with open(out, "w") as file:
        json.dump({"compared": len(expected), "differs": different, "placements": start.placements}, file)


if __name__ == "__main__":
    if sys.argv[2:] == ["--resume-on-one-process"]:
        resume_on_one_process(sys.argv[1])
        sys.exit(0)
    main(sys.argv[1])
    # Lightning leaves the process group up; torn down by the interpreter's exit, gloo's threads can
    # abort ("terminate called without an active exception") while the other process still talks.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
