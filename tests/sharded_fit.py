"""A 2-process ``ModelParallelStrategy`` fit on the CPU with FSDP2 and ``PruningCallback``; run by ``test_sharded.py``.

    python tests/sharded_fit.py OUT.json

Lightning launches the second process by running this script again.  Rank 0 writes what the test
checks: each mask's sparsity, whether it is a DTensor, its local and global shapes, whether every
pruned weight is zero, the masks one process computes from the gathered weights, and the
sparsities after resuming from the run's distributed checkpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_prune import Pruning, PruningCallback
from lit_prune.engine.sharding import local

SPEC = "threshold_method=exact,begin_pruning_step=2,sparsity_function_end_step=8,pruning_frequency=2"


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


def trainer_for(callback: PruningCallback, max_steps: int, root: str) -> Trainer:
    """Two CPU processes, FSDP2 through ``ModelParallelStrategy``, a distributed checkpoint at the end."""
    return Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=max_steps,
        callbacks=[callback],
        logger=False,
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def main(out: str) -> None:
    seed_everything(0)
    data = TensorDataset(torch.randn(256, 16), torch.randint(0, 8, (256,)))
    root = str(Path(out).parent)
    callback = PruningCallback(SPEC, log_histograms=False)
    trainer = trainer_for(callback, 10, root)
    model = Sharded()
    trainer.fit(model, DataLoader(data, batch_size=16))
    masks, sparsity = callback.get_masks(), callback.get_weight_sparsity()
    params = dict(model.named_parameters())
    whole = {name: p.full_tensor().detach() for name, p in params.items()}  # gathered, for the check only
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
    # Resumed: the masks of sharded weights are not in the checkpoint yet; they are rebuilt from the
    # loaded weights (pruned ones are zero) at the next update, not taken from rank 0's shard.
    resumed = PruningCallback(SPEC, log_histograms=False)
    again = trainer_for(resumed, 14, root)
    again.fit(Sharded(), DataLoader(data, batch_size=16), ckpt_path=trainer.checkpoint_callback.best_model_path)
    after = {name: float(value) for name, value in resumed.get_weight_sparsity().items()}
    if trainer.global_rank == 0:
        with open(out, "w") as file:
            found = {"rank0": result, "last_update_step": callback.pruning.last_update_step, "resumed": after}
            json.dump({**found, "resumed_update_step": resumed.pruning.last_update_step}, file)


def _whole_net(state: dict[str, torch.Tensor]) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(16, 33), nn.ReLU(), nn.Linear(33, 8))
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items()})
    return net


if __name__ == "__main__":
    main(sys.argv[1])
    # Lightning leaves the process group up; torn down by the interpreter's exit, gloo's threads can
    # abort ("terminate called without an active exception") while the other process still talks.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
