"""StructuredPruningCallback: iterative kernel removal inside Trainer.fit, optimizer rebuilt, resume.

Run: pytest tests/test_structured_callback.py
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lit_prune import StructuredPruningCallback
from lit_prune.cli.demos import DigitsDataModule, ImageClassifier
from lit_prune.cli.digits import digits_resnet
from lit_prune.oracle import StructuredPruningError


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


def test_spawning_strategies_are_refused(tmp_path):
    cb = StructuredPruningCallback(percentage=25, prune_at_epochs=[0])
    trainer = make_trainer(tmp_path, [cb], max_epochs=1, strategy="ddp_spawn", devices=2)
    with pytest.raises(Exception, match="use `strategy='ddp'`"):
        trainer.fit(ImageClassifier(digits_resnet(width=16)), datamodule=DigitsDataModule(batch_size=32))
