"""StructuredPruningCallback: iterative kernel removal inside Trainer.fit, optimizer rebuilt, resume.

Run: pytest tests/test_structured_callback.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import UserDict
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lit_prune import PruningCallback, StructuredPruningCallback
from lit_prune.cli.demos import DigitsDataModule, ImageClassifier, load_digits_split
from lit_prune.cli.digits import digits_cnn, digits_resnet
from lit_prune.oracle import StructuredPruningError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def make_trainer(tmp_path, callbacks, **kwargs):
    defaults = {
        "default_root_dir": tmp_path,
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_train_batches": 8,
        "limit_val_batches": 2,
    }
    return Trainer(callbacks=callbacks, **{**defaults, **kwargs})


def widths(model):
    net = model.net
    return [net[0].out_channels, net[3].conv1.out_channels, net[4].out_channels, net[7].out_channels]


def test_removes_kernels_at_the_chosen_epochs_and_keeps_training(tmp_path):
    seed_everything(0)
    model = ImageClassifier(digits_resnet(width=16), lr=3e-3)
    cb = StructuredPruningCallback(percentage=25, prune_at_epochs=[0, 1])
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer = make_trainer(tmp_path, [cb], max_epochs=3, logger=logger)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    assert widths(model) == [9, 9, 18, 18]  # 16 -> 12 -> 9 and 32 -> 24 -> 18
    assert len(cb.history) == 2
    optimizer_params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimizer_params == {id(p) for p in model.parameters()}  # rebuilt on the new parameters
    assert torch.isfinite(trainer.callback_metrics["val_loss"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb" / "version_0")).Reload()
    assert "structured_pruning/params" in events.Tags()["scalars"]
    assert "structured_pruning/scores" in events.Tags()["histograms"]


def test_resume_replays_the_surgery_before_loading_weights(tmp_path):
    seed_everything(0)
    model = ImageClassifier(digits_resnet(width=16), lr=3e-3)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    cb = StructuredPruningCallback(percentage=25, prune_at_epochs=[0])
    make_trainer(tmp_path, [cb, ckpt], max_epochs=2).fit(model, datamodule=DigitsDataModule(batch_size=32))
    fresh = ImageClassifier(digits_resnet(width=16), lr=3e-3)
    cb2 = StructuredPruningCallback(percentage=25, prune_at_epochs=[0])
    trainer = make_trainer(tmp_path, [cb2], max_epochs=3)
    trainer.fit(fresh, datamodule=DigitsDataModule(batch_size=32), ckpt_path=tmp_path / "ckpt" / "epoch=1.ckpt")
    assert widths(fresh) == [12, 12, 24, 24]
    assert cb2.history == cb.history


def test_bad_arguments_fail_clearly():
    with pytest.raises(StructuredPruningError, match=r"`percentage` must be a number in \(0, 100\)"):
        StructuredPruningCallback(percentage=100)
    with pytest.raises(StructuredPruningError, match="`prune_at_epochs` must be a non-empty list"):
        StructuredPruningCallback(prune_at_epochs=[])
    with pytest.raises(StructuredPruningError, match="`score` must be one of"):
        StructuredPruningCallback(score="exact")
    with pytest.raises(StructuredPruningError, match="`ranking` must be one of"):
        StructuredPruningCallback(ranking="local")


DDP_SCRIPT = """
import sys, torch
from lightning.pytorch import Trainer, seed_everything
from lit_prune import StructuredPruningCallback
from lit_prune.cli.demos import DigitsDataModule, ImageClassifier
from lit_prune.cli.digits import digits_resnet

seed_everything(0)
model = ImageClassifier(digits_resnet(width=16), lr=3e-3)
cb = StructuredPruningCallback(percentage=25, prune_at_epochs=[0], ranking="global")
trainer = Trainer(accelerator="cpu", strategy="ddp", devices=2, max_epochs=2, limit_train_batches=8,
                  limit_val_batches=2, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                  callbacks=[cb])
trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
net = model.net
widths = [net[0].out_channels, net[3].conv1.out_channels, net[4].out_channels, net[7].out_channels]
torch.save({"widths": widths, "weights": model.state_dict()}, f"{sys.argv[1]}/rank{trainer.global_rank}.pt")
"""


@pytest.mark.slow
def test_ddp_ranks_remove_the_same_kernels(tmp_path):
    import subprocess
    import sys

    (tmp_path / "run_ddp.py").write_text(DDP_SCRIPT)
    result = subprocess.run(
        [sys.executable, "run_ddp.py", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["widths"] == ranks[1]["widths"] and ranks[0]["widths"] != [16, 16, 32, 32]
    for key, value in ranks[0]["weights"].items():  # global ranking: widths and weights agree across ranks
        assert torch.equal(ranks[1]["weights"][key], value), key


# ---------------------------------------------------------------------------------------------- 1. no monkeypatch
class RecordingClassifier(ImageClassifier):
    """A module with its own `on_load_checkpoint`: it must run, unchanged, and stay the class's method."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loaded = []

    def on_load_checkpoint(self, checkpoint):
        self.loaded.append(checkpoint["epoch"])


def test_the_modules_own_on_load_checkpoint_is_left_alone_and_runs(tmp_path):
    seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    cb = StructuredPruningCallback(percentage=25, prune_at_epochs=[0])
    model = RecordingClassifier(digits_resnet(width=16), lr=3e-3)
    make_trainer(tmp_path, [cb, ckpt], max_epochs=2).fit(model, datamodule=DigitsDataModule(batch_size=32))
    assert "on_load_checkpoint" not in vars(model)  # not replaced on the instance
    fresh = RecordingClassifier(digits_resnet(width=16), lr=3e-3)
    cb2 = StructuredPruningCallback(percentage=25, prune_at_epochs=[0])
    trainer = make_trainer(tmp_path, [cb2], max_epochs=3)
    trainer.fit(fresh, datamodule=DigitsDataModule(batch_size=32), ckpt_path=tmp_path / "ckpt" / "epoch=1.ckpt")
    assert "on_load_checkpoint" not in vars(fresh)
    assert fresh.loaded == [1]  # the module's hook ran once, on the checkpoint
    assert widths(fresh) == [12, 12, 24, 24] and cb2.history == cb.history


def test_a_checkpoint_of_a_pruning_epoch_holds_the_pruned_model(tmp_path):
    # With validation on, Lightning checkpoints at the end of validation, before `on_train_epoch_end`:
    # the kernels go with the epoch's last batch, so the epoch's checkpoint has the smaller model.
    seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    cb = StructuredPruningCallback(percentage=25, prune_at_epochs=[0])
    model = ImageClassifier(digits_resnet(width=16), lr=3e-3)
    first = make_trainer(tmp_path, [cb, ckpt], max_epochs=1)
    first.fit(model, datamodule=DigitsDataModule(batch_size=32))
    fresh = ImageClassifier(digits_resnet(width=16), lr=3e-3)
    cb2 = StructuredPruningCallback(percentage=25, prune_at_epochs=[0])
    trainer = make_trainer(tmp_path, [cb2], max_epochs=2)
    trainer.fit(fresh, datamodule=DigitsDataModule(batch_size=32), ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt")
    assert widths(fresh) == [12, 12, 24, 24] and cb2.history == cb.history
    other = ImageClassifier(digits_resnet(width=16))  # evaluation of a pruned checkpoint on a fresh module
    results = make_trainer(tmp_path, [StructuredPruningCallback()]).validate(
        other, datamodule=DigitsDataModule(batch_size=32), ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt"
    )
    assert widths(other) == [12, 12, 24, 24]
    assert results[0]["val_acc"] == pytest.approx(float(first.callback_metrics["val_acc"]))  # validated after removal


# ---------------------------------------------------------------------------------------------- 2. any batch
class DigitsDicts(Dataset):
    def __init__(self, kind):
        self.x, self.y = load_digits_split()["train"]
        self.kind = kind

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


@dataclass
class DigitsBatch:
    images: torch.Tensor
    labels: torch.Tensor


class Encoding(UserDict):
    """An HF-style batch: a mapping that is not a dict."""


def collate(kind):
    def fn(items):
        x = torch.stack([i["pixel_values"] for i in items])
        y = torch.stack([i["labels"] for i in items])
        if kind == "object":
            return DigitsBatch(x, y)
        if kind == "mapping":
            return Encoding(pixel_values=x, labels=y)
        return {"pixel_values": x, "labels": y}

    return fn


class AnyBatchClassifier(LightningModule):
    """`dict`: `self(batch["pixel_values"])`; `mapping`: HF-style `self(**batch).loss`; `object`: a dataclass;
    `submodule`: calls `self.net` directly, never `self(...)`."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.net = digits_resnet(width=16)

    def forward(self, pixel_values, labels=None):
        logits = self.net(pixel_values)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"logits": logits, "loss": loss}

    def training_step(self, batch, batch_idx):
        if self.kind == "mapping":
            return self(**batch)["loss"]
        if self.kind == "object":
            return nn.functional.cross_entropy(self(batch.images)["logits"], batch.labels)
        if self.kind == "submodule":
            return nn.functional.cross_entropy(self.net(batch["pixel_values"]), batch["labels"])
        return nn.functional.cross_entropy(self(batch["pixel_values"])["logits"], batch["labels"])

    def train_dataloader(self):
        kind = "dict" if self.kind == "submodule" else self.kind
        return DataLoader(DigitsDicts(kind), batch_size=32, shuffle=False, collate_fn=collate(kind))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


@pytest.mark.parametrize("kind", ["dict", "mapping", "object"])
def test_any_batch_the_training_step_accepts(tmp_path, kind):
    seed_everything(0)
    model = AnyBatchClassifier(kind)
    cb = StructuredPruningCallback(percentage=25, prune_at_epochs=[0])
    make_trainer(tmp_path, [cb], max_epochs=2, limit_train_batches=4, limit_val_batches=0).fit(model)
    assert widths(model) == [12, 12, 24, 24]
    assert len(cb.history) == 1 and any(cb.history[0].values())


def test_a_module_whose_forward_never_runs_needs_example_inputs(tmp_path):
    seed_everything(0)
    cb = StructuredPruningCallback(percentage=25, prune_at_epochs=[0])
    trainer = make_trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=4, limit_val_batches=0)
    with pytest.raises(StructuredPruningError, match="pass `example_inputs`"):
        trainer.fit(AnyBatchClassifier("submodule"))
    model = AnyBatchClassifier("submodule")
    cb = StructuredPruningCallback(percentage=25, prune_at_epochs=[0], example_inputs=torch.zeros(1, 1, 8, 8))
    make_trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=4, limit_val_batches=0).fit(model)
    assert widths(model) == [12, 12, 24, 24]
    model = AnyBatchClassifier("submodule")
    model.example_input_array = {"pixel_values": torch.zeros(2, 1, 8, 8)}  # Lightning's own convention
    cb = StructuredPruningCallback(percentage=25, prune_at_epochs=[0])
    make_trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=4, limit_val_batches=0).fit(model)
    assert widths(model) == [12, 12, 24, 24]


# ---------------------------------------------------------------------------------------------- 3. ddp_spawn
class SaveStructure(Callback):
    """Each rank writes its widths and weights at the end of training."""

    def __init__(self, directory):
        self.directory = Path(directory)

    def on_train_end(self, trainer, pl_module):
        weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"widths": widths(pl_module), "weights": weights}, self.directory / f"rank{trainer.global_rank}.pt")


def test_ddp_spawn_ranks_and_the_main_process_end_with_the_same_smaller_model(tmp_path):
    seed_everything(0)
    model = ImageClassifier(digits_resnet(width=16), lr=3e-3)
    cb = StructuredPruningCallback(percentage=25, prune_at_epochs=[0])  # per-layer ranking
    cb.attach(model)  # the main process takes the workers' smaller weights
    trainer = make_trainer(
        tmp_path, [cb, SaveStructure(tmp_path)], strategy="ddp_spawn", devices=2, max_epochs=2,
        limit_train_batches=4, limit_val_batches=0, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=16))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["widths"] == ranks[1]["widths"] == widths(model) == [12, 12, 24, 24]
    for key, value in ranks[0]["weights"].items():
        if "running_" not in key:  # BatchNorm statistics: each rank's own last batch (DDP syncs them per forward)
            assert torch.equal(ranks[1]["weights"][key], value), key
        assert torch.equal(model.state_dict()[key], value), key  # the main process has rank 0's trained model


def test_ddp_spawn_without_attach_fails_before_training(tmp_path):
    cb = StructuredPruningCallback(percentage=25, prune_at_epochs=[0])
    trainer = make_trainer(tmp_path, [cb], max_epochs=1, strategy="ddp_spawn", devices=2, limit_val_batches=0)
    with pytest.raises(Exception, match=r"attach\(model\)"):
        trainer.fit(ImageClassifier(digits_resnet(width=16)), datamodule=DigitsDataModule(batch_size=32))


# ---------------------------------------------------------------------------------------------- 4. with PruningCallback
def magnitude(**overrides):
    spec = {
        "target_sparsity": 0.5, "begin_pruning_step": 10, "end_pruning_step": 20, "pruning_frequency": 2,
        "sparsity_function_begin_step": 10, "sparsity_function_end_step": 20, "threshold_method": "exact",
    }  # fmt: skip
    return PruningCallback(**{**spec, **overrides})


@pytest.mark.parametrize("net", ["resnet", "masked_cnn"])
def test_structured_then_magnitude_pruning_in_one_trainer(tmp_path, net):
    seed_everything(0)
    model = ImageClassifier(digits_resnet(width=16) if net == "resnet" else digits_cnn(width=8, hidden=32), lr=3e-3)
    dense = sum(p.numel() for p in model.parameters())
    structured = StructuredPruningCallback(percentage=25, prune_at_epochs=[0])
    gradual = magnitude()
    trainer = make_trainer(tmp_path, [structured, gradual], max_epochs=3)  # 8 steps per epoch: pruning at 10-20
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    if net == "resnet":
        assert widths(model) == [12, 12, 24, 24]
    else:
        assert model.net[0].out_channels == 6 and model.net[2].out_channels == 12
    assert sum(p.numel() for p in model.parameters()) < 0.8 * dense  # physically smaller
    assert gradual.pruning.model is model
    params = dict(model.named_parameters())
    for name, sparsity in gradual.get_weight_sparsity().items():
        assert float(sparsity) == pytest.approx(0.5, abs=0.02), name
        mask = gradual.get_masks()[name]
        assert mask.shape == params[name].shape and bool((params[name][~mask] == 0).all()), name
    assert torch.isfinite(trainer.callback_metrics["val_loss"])


def test_magnitude_pruning_that_began_before_the_kernels_go_fails_clearly(tmp_path):
    seed_everything(0)
    model = ImageClassifier(digits_resnet(width=16), lr=3e-3)
    structured = StructuredPruningCallback(percentage=25, prune_at_epochs=[1])
    gradual = magnitude(begin_pruning_step=2, sparsity_function_begin_step=2)
    trainer = make_trainer(tmp_path, [structured, gradual], max_epochs=3)
    with pytest.raises(StructuredPruningError, match="Order the schedules"):
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    assert widths(model) == [16, 16, 32, 32]  # refused before any change


def test_resume_with_both_callbacks_restores_the_structure_and_the_masks(tmp_path):
    seed_everything(0)
    model = ImageClassifier(digits_resnet(width=16), lr=3e-3)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    gradual = magnitude()
    make_trainer(tmp_path, [StructuredPruningCallback(percentage=25, prune_at_epochs=[0]), gradual, ckpt],
                 max_epochs=2).fit(model, datamodule=DigitsDataModule(batch_size=32))  # fmt: skip
    saved = {k: v.clone() for k, v in gradual.get_masks().items()}
    fresh = ImageClassifier(digits_resnet(width=16), lr=3e-3)
    gradual2 = magnitude()
    trainer = make_trainer(tmp_path, [StructuredPruningCallback(percentage=25, prune_at_epochs=[0]), gradual2],
                           max_epochs=2)  # fmt: skip
    trainer.fit(fresh, datamodule=DigitsDataModule(batch_size=32), ckpt_path=tmp_path / "ckpt" / "epoch=1.ckpt")
    assert widths(fresh) == [12, 12, 24, 24] and gradual2.pruning.model is fresh
    for name, mask in saved.items():
        assert torch.equal(gradual2.get_masks()[name], mask), name


# ---------------------------------------------------------------------------------------------- 5. the recipe
@pytest.mark.slow
def test_structured_then_gradual_recipe_runs_briefly(tmp_path):
    schedule = {"begin_pruning_step": 24, "end_pruning_step": 50, "pruning_frequency": 2}
    schedule.update(sparsity_function_begin_step=24, sparsity_function_end_step=50)
    overrides = ["trainer.max_epochs=3", "callbacks.structured_pruning.prune_at_epochs=[0]", "dense_baseline=false"]
    overrides += [f"pruning.{k}={v}" for k, v in schedule.items()] + ["hydra.run.dir=run"]
    result = subprocess.run(
        [sys.executable, "-m", "lit_prune", "--config-dir", str(RECIPES), "--config-name", "structured_then_gradual",
         *overrides], cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["num_params"] < 75114
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    masks = next(v for k, v in state["callbacks"].items() if k.startswith("PruningCallback"))["pruning"]["masks"]
    kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert 1 - kept == pytest.approx(0.7, abs=0.03)


@pytest.mark.parametrize("name", ["ModelParallelStrategy", "FSDPStrategy", "DeepSpeedStrategy"])
def test_sharding_strategies_are_refused_before_training(name):
    fake = type(name, (), {})  # stands in for Lightning's; the callback checks the class name

    class FakeTrainer:
        strategy = fake()

    with pytest.raises(StructuredPruningError, match=f"does not support `{name}`.*then shard the smaller model"):
        StructuredPruningCallback(percentage=50).setup(FakeTrainer(), None, "fit")
