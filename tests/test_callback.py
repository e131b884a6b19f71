"""PruningCallback inside Trainer.fit: schedule, zeros, maps, summaries, resume, DDP, lifecycle.

Run: pytest tests/test_callback.py   (the 2-process DDP test is marked slow)
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lit_prune import HParamsError, MaskedLinear, PruningCallback, PruningHParams, strip_checkpoint

N_BATCHES = 10


class Net(LightningModule):
    """A small MLP on fixed synthetic data; validation checks that pruned weights are zero."""

    def __init__(self, masked: bool = False, batch_size: int = 16, lr: float = 0.05) -> None:
        super().__init__()
        linear = MaskedLinear if masked else nn.Linear
        self.net = nn.Sequential(linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
        self.batch_size, self.lr = batch_size, lr
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N_BATCHES * 32, 16, generator=g)
        self.y = (self.x[:, :4].argmax(1) + (self.x[:, 4] > 1).long()) % 4
        self.val_checked = 0
        self.training_steps = 0

    def training_step(self, batch, batch_idx):
        self.training_steps += 1
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        cb = next(c for c in self.trainer.callbacks if isinstance(c, PruningCallback))
        for name, mask in cb.get_masks().items():
            assert (dict(self.named_parameters())[name][~mask] == 0).all(), name
        self.val_checked += 1
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

    def test_step(self, batch, batch_idx):
        return self.validation_step(batch, batch_idx)

    def predict_step(self, batch, batch_idx):
        return self.net(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def _loader(self, n: int | None = None):
        data = TensorDataset(self.x[: n or len(self.x)], self.y[: n or len(self.y)])
        return DataLoader(data, batch_size=self.batch_size, shuffle=False)

    def train_dataloader(self):
        n = N_BATCHES * 16  # the same samples whatever the batch size (DDP test)
        if self.trainer.world_size == 1:
            return self._loader(n)
        sampler = DistributedSampler(
            TensorDataset(self.x[:n]), self.trainer.world_size, self.trainer.global_rank, shuffle=False
        )  # rank r takes samples r, r + 2, ...: per step the ranks see the single process's batch
        return DataLoader(TensorDataset(self.x[:n], self.y[:n]), batch_size=self.batch_size, sampler=sampler)

    def val_dataloader(self):
        return self._loader(64)

    def test_dataloader(self):
        return self._loader(64)

    def predict_dataloader(self):
        return self._loader(64)


def trainer(tmp_path, callbacks, **kwargs):
    defaults = {
        "default_root_dir": tmp_path,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 2,
        "deterministic": True,
    }
    defaults.update(kwargs)
    return Trainer(callbacks=callbacks, **defaults)


SPEC = {
    "begin_pruning_step": 5,
    "end_pruning_step": 40,
    "pruning_frequency": 5,
    "target_sparsity": 0.8,
    "sparsity_function_begin_step": 5,
    "sparsity_function_end_step": 40,
}


def test_fit_reaches_targets_with_exact_zeros(tmp_path):
    seed_everything(0)
    model = Net()
    cb = PruningCallback(PruningHParams(**SPEC), weight_sparsity_map=[r"net\.4:0.5"])
    trainer(tmp_path, [cb], max_steps=50).fit(model)
    sparsity = {k: float(v) for k, v in cb.get_weight_sparsity().items()}
    assert sparsity["net.0.weight"] == pytest.approx(0.8, abs=0.01)  # histogram resolution
    assert sparsity["net.2.weight"] == pytest.approx(0.8, abs=0.01)
    assert sparsity["net.4.weight"] == pytest.approx(0.5, abs=0.02)
    assert cb.pruning.last_update_step == 40
    params = dict(model.named_parameters())
    for name, mask in cb.get_masks().items():
        assert (params[name][~mask] == 0).all()
    assert model.val_checked > 0  # validation asserted zeros too
    assert set(cb.get_thresholds()) == set(sparsity)


def test_schedule_is_keyed_on_optimizer_steps_with_accumulation(tmp_path):
    seed_everything(0)
    model = Net()
    cb = PruningCallback(PruningHParams(**SPEC))
    trainer(tmp_path, [cb], max_steps=20, accumulate_grad_batches=2, limit_val_batches=0).fit(model)
    assert model.training_steps == 40  # 2 batches per optimizer step
    assert cb.pruning.last_update_step == 20


def test_block_dims_map_takes_effect(tmp_path):
    seed_everything(0)
    model = Net()
    cb = PruningCallback(PruningHParams(**SPEC, threshold_method="exact"), block_dims_map=[r"net\.2:4x4"])
    trainer(tmp_path, [cb], max_steps=45, limit_val_batches=0).fit(model)
    mask = cb.get_masks()["net.2.weight"].reshape(16, 4, 16, 4)
    block_values = mask.permute(0, 2, 1, 3).reshape(16, 16, 16)
    assert (block_values.all(-1) | ~block_values.any(-1)).all()  # each 4x4 block all kept or all pruned
    assert float(cb.get_weight_sparsity()["net.2.weight"]) == pytest.approx(0.8, abs=1 / 256)


def test_masked_layers_and_momentum_cannot_regrow(tmp_path):
    seed_everything(0)
    model = Net(masked=True)
    cb = PruningCallback(PruningHParams(**SPEC, threshold_method="exact"))
    trainer(tmp_path, [cb], max_steps=60, limit_val_batches=0).fit(model)
    assert cb.get_masks()["net.0.weight"] is model.net[0].mask
    # masks are monotone after the schedule ends: updates stop at step 40, twenty more SGD+momentum steps
    assert (model.net[0].weight[~model.net[0].mask] == 0).all()


def test_summaries_in_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    seed_everything(0)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    cb = PruningCallback(PruningHParams(**SPEC, name="cifar10_pruning"))
    trainer(tmp_path, [cb], max_steps=20, logger=logger, limit_val_batches=0).fit(Net())
    logger.experiment.flush()
    events = EventAccumulator(str(tmp_path / "tb" / "version_0")).Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in (
        "cifar10_pruning_summaries/sparsity",
        "cifar10_pruning_summaries/last_mask_update_step",
        "cifar10_pruning_summaries/model_sparsity",
        "cifar10_pruning_summaries/net.0.weight/mask/sparsity",
        "cifar10_pruning_summaries/net.0.weight/threshold/threshold",
    ):
        assert tag in scalars, tag
    steps = [e.step for e in events.Scalars("cifar10_pruning_summaries/last_mask_update_step")]
    assert steps == [5, 10, 15, 20]
    histograms = set(events.Tags()["histograms"])
    assert "cifar10_pruning_summaries/layer_sparsity" in histograms
    assert "cifar10_pruning_summaries/net.0.weight/kept_weights" in histograms


def test_any_lightning_logger_and_progress_bar(tmp_path):
    seed_everything(0)
    logger = CSVLogger(tmp_path, name="csv", version=0)
    cb = PruningCallback(PruningHParams(**SPEC))
    t = trainer(tmp_path, [cb], max_steps=20, logger=logger, limit_val_batches=0)
    t.fit(Net())
    text = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "model_pruning_summaries/net.2.weight/mask/sparsity" in text.splitlines()[0]
    assert t.progress_bar_metrics["sparsity"] == pytest.approx(float(cb.pruning.model_sparsity()))


def _fit(tmp_path, max_epochs, ckpt_path=None):
    seed_everything(0)
    model = Net()
    cb = PruningCallback(PruningHParams(**SPEC, threshold_decay=0.3))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    t = trainer(tmp_path, [cb, ckpt], max_epochs=max_epochs, enable_checkpointing=True, limit_val_batches=0)
    t.fit(model, ckpt_path=ckpt_path)
    return model, cb


def test_resume_mid_schedule_equals_uninterrupted_run(tmp_path):
    full_model, full_cb = _fit(tmp_path / "full", max_epochs=5)
    _fit(tmp_path / "part", max_epochs=2)  # stops at step 20, mid-schedule (ends at 40)
    checkpoint = tmp_path / "part" / "ckpt" / "epoch=1.ckpt"
    state = torch.load(checkpoint, weights_only=True)
    saved = state["callbacks"]["PruningCallback{'name': 'model_pruning'}"]
    assert saved["pruning"]["last_update_step"] == 20
    resumed_model, resumed_cb = _fit(tmp_path / "part", max_epochs=5, ckpt_path=checkpoint)
    for name, mask in full_cb.get_masks().items():
        assert torch.equal(resumed_cb.get_masks()[name], mask), name
        assert torch.equal(resumed_cb.get_thresholds()[name], full_cb.get_thresholds()[name])
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_bad_configuration_fails_in_setup_before_any_step(tmp_path):
    model = Net()
    cb = PruningCallback(weight_sparsity_map=["conv9:0.5"])
    with pytest.raises(HParamsError, match=r"'conv9' matches no pruned weight; candidates: \[net.0.weight"):
        trainer(tmp_path, [cb], max_steps=5).fit(model)
    assert model.training_steps == 0
    with pytest.raises(HParamsError, match="target_sparsity"):
        PruningCallback(target_sparsity=1.5)  # range errors fail at construction
    with pytest.raises(HParamsError, match="unknown pruning hparam"):
        PruningCallback(target_sparsty=0.5)


def test_construction_forms():
    from omegaconf import OmegaConf

    spec = {"target_sparsity": 0.9, "weight_sparsity_map": ["fc.*:0.95"]}
    a = PruningCallback(spec)
    b = PruningCallback(OmegaConf.create(spec))
    c = PruningCallback(PruningHParams(**spec))
    d = PruningCallback.from_string("target_sparsity=0.9,weight_sparsity_map=[fc.*:0.95]")
    e = PruningCallback(target_sparsity=0.9, weight_sparsity_map={"fc.*": 0.95})
    assert a.hparams == b.hparams == c.hparams == d.hparams == e.hparams
    assert type(b.hparams.weight_sparsity_map) is list
    assert a.state_key == "PruningCallback{'name': 'model_pruning'}"
    with pytest.raises(RuntimeError, match="binds in `setup`"):
        a.get_masks()


def test_validate_test_predict_see_masked_weights_after_restore(tmp_path):
    model, cb = _fit(tmp_path, max_epochs=5)
    checkpoint = tmp_path / "ckpt" / "epoch=4.ckpt"
    fresh = Net()
    fresh_cb = PruningCallback(PruningHParams(**SPEC, threshold_decay=0.3))
    t = trainer(tmp_path, [fresh_cb])
    t.validate(fresh, ckpt_path=checkpoint)
    assert fresh.val_checked > 0
    t.test(fresh, ckpt_path=checkpoint)
    predictions = t.predict(fresh, ckpt_path=checkpoint)
    assert torch.allclose(torch.cat(predictions), model.net(model.x[:64]), atol=1e-6)
    for name, mask in cb.get_masks().items():
        assert torch.equal(fresh_cb.get_masks()[name], mask)


def test_export_and_strip_checkpoint(tmp_path):
    seed_everything(0)
    model = Net(masked=True)
    export = tmp_path / "stripped.pt"
    cb = PruningCallback(PruningHParams(**SPEC), export_path=export)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    trainer(tmp_path, [cb, ckpt], max_steps=45, enable_checkpointing=True, limit_val_batches=0).fit(model)
    exported = torch.load(export, weights_only=True)
    plain = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    plain.load_state_dict({k.removeprefix("net."): v for k, v in exported.items()})
    assert torch.allclose(plain(model.x[:8]), model.net(model.x[:8]), atol=1e-6)
    from_ckpt = strip_checkpoint(tmp_path / "last.ckpt", tmp_path / "from_ckpt.pt")
    assert sorted(from_ckpt) == sorted(exported)
    for key, value in exported.items():
        assert torch.equal(from_ckpt[key], value), key
    with pytest.raises(ValueError, match="holds no PruningCallback state"):
        torch.save({"state_dict": {}, "callbacks": {}}, tmp_path / "plain.ckpt")
        strip_checkpoint(tmp_path / "plain.ckpt")


def test_checkpoint_without_pruning_state_is_a_clear_error():
    cb = PruningCallback()
    with pytest.raises(ValueError, match="holds no pruning state"):
        cb.load_state_dict({"something": 1})


def test_bf16_mixed_precision(tmp_path):
    seed_everything(0)
    model = Net()
    cb = PruningCallback(PruningHParams(**SPEC))
    trainer(tmp_path, [cb], max_steps=45, precision="bf16-mixed", limit_val_batches=0).fit(model)
    assert float(cb.get_weight_sparsity()["net.0.weight"]) == pytest.approx(0.8, abs=0.01)


def test_frozen_weights_are_left_alone(tmp_path):
    seed_everything(0)
    model = Net()
    model.net[0].weight.requires_grad_(False)
    cb = PruningCallback(PruningHParams(**SPEC))
    trainer(tmp_path, [cb], max_steps=10, limit_val_batches=0).fit(model)
    assert cb.pruning.weight_names == ["net.2.weight", "net.4.weight"]


@pytest.mark.parametrize("name", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_unsupported_strategy_is_named_with_the_fsdp2_recipe(name):
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    fake = type(name, (), {})  # stands in for Lightning's; the callback checks the class name

    class FakeTrainer:
        strategy = fake()

    with pytest.raises(MisconfigurationException, match=f"does not support `{name}`") as error:
        PruningCallback().setup(FakeTrainer(), Net(), "fit")
    recipe = str(error.value).splitlines()[1:]
    assert "ModelParallelStrategy()" in recipe[0] and "fully_shard(layer)" in recipe[2], recipe
    assert recipe[3].strip() == "fully_shard(self)"


class SaveMasks(Callback):
    def __init__(self, directory):
        self.directory = directory

    def on_train_end(self, trainer, pl_module):
        cb = next(c for c in trainer.callbacks if isinstance(c, PruningCallback))
        masks = {k: v.cpu() for k, v in cb.get_masks().items()}
        weights = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
        torch.save({"masks": masks, "weights": weights}, self.directory / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_two_processes_identical_masks_equal_to_single_process(tmp_path):
    spec = PruningHParams(**SPEC, threshold_method="exact")
    seed_everything(0)
    single = tmp_path / "single"
    single.mkdir()
    trainer(single, [PruningCallback(spec), SaveMasks(single)], max_steps=45, limit_val_batches=0).fit(
        Net(batch_size=16)
    )
    multi = tmp_path / "ddp"
    multi.mkdir()
    seed_everything(0)
    t = trainer(
        multi,
        [PruningCallback(spec), SaveMasks(multi)],
        max_steps=45,
        limit_val_batches=0,
        strategy="ddp_spawn",
        devices=2,
        use_distributed_sampler=False,
    )
    t.fit(Net(batch_size=8))  # 2 x 8 per step = the single process's 16
    ranks = [torch.load(multi / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    reference = torch.load(single / "rank0.pt", weights_only=True)
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(ranks[1]["masks"][name], mask), name
        assert torch.equal(reference["masks"][name], mask), name  # and equal to the single-process run


class TwoOptimizers(Net):
    """Manual optimization with two optimizers: global_step advances twice per batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        self.training_steps += 1
        first, second = self.optimizers()
        x, y = batch
        for opt in (first, second):
            loss = nn.functional.cross_entropy(self.net(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    def configure_optimizers(self):
        return (
            torch.optim.SGD(self.net[0].parameters(), lr=0.05),
            torch.optim.SGD([*self.net[2].parameters(), *self.net[4].parameters()], lr=0.05),
        )


def test_two_optimizers_manual_optimization(tmp_path):
    seed_everything(0)
    model = TwoOptimizers()
    cb = PruningCallback(PruningHParams(**SPEC))
    trainer(tmp_path, [cb], max_steps=44, limit_val_batches=0).fit(model)
    assert model.training_steps == 22  # two optimizer steps per batch
    # checked at global steps 2, 4, ...: TF's drifting grid updates at 6, 12, ..., 36 (42 is past the end, 40)
    assert cb.pruning.last_update_step == 36
    params = dict(model.named_parameters())
    for name, mask in cb.get_masks().items():
        assert (params[name][~mask] == 0).all()


def test_end_pruning_step_minus_one_keeps_updating(tmp_path):
    seed_everything(0)
    spec = {**SPEC, "end_pruning_step": -1}
    cb = PruningCallback(PruningHParams(**spec))
    trainer(tmp_path, [cb], max_epochs=6, limit_val_batches=0).fit(Net())
    assert cb.pruning.last_update_step == 60  # never stops: every 5 steps until training ends
    assert float(cb.get_weight_sparsity()["net.0.weight"]) == pytest.approx(0.8, abs=0.01)
