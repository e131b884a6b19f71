"""Hardening: bad tensors, crashes and resumes, models as users write them (issue 6).

Each test tries to break one thing.  The bad-configuration catalogue lives in
``test_bad_input_catalogue.py``; the SIGKILL test runs real subprocesses and is marked slow.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_prune import MaskedLinear, MaskedLSTM, Pruning, PruningCallback, strip_checkpoint

EXACT = "threshold_method=exact"


# ---------------------------------------------------------------------------- bad tensors
@pytest.mark.parametrize("method", ["histogram", "exact"])
def test_all_zero_weight_keeps_its_mask_and_a_finite_threshold(method):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with torch.no_grad():
        model[0].weight.zero_()
    pruning = Pruning(model, f"threshold_method={method}", sparsity=0.5)
    pruning.mask_update(10)
    assert pruning.get_masks()["0.weight"].all()  # nothing to rank: TF computed NaN here
    assert float(pruning.get_thresholds()["0.weight"]) == 0.0
    assert float(pruning.get_weight_sparsity()["1.weight"]) == pytest.approx(0.5, abs=0.1)  # histogram: bins


def test_one_element_weight_follows_each_rule():
    # histogram: the only element is max |w|, in the last bin; j = nbins - 1 for any s < 1, so
    # thr = (nbins - 1) / nbins * max < |w| and it is kept.  exact: k = round(1 * (1 - s)) is 0
    # for s >= 0.5 (half to even), so it is pruned.
    model = nn.Sequential(nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(-0.75)
    hist = Pruning(model, sparsity=0.9)
    hist.mask_update(1)
    assert hist.get_masks()["0.weight"].item() is True
    assert float(hist.get_thresholds()["0.weight"]) == pytest.approx(255 / 256 * 0.75)
    exact = Pruning(model, EXACT, sparsity=0.5)
    exact.mask_update(1)
    assert exact.get_masks()["0.weight"].item() is False
    assert model[0].weight.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["histogram", "exact"])
@pytest.mark.parametrize("block", ["1x1", "2x4"])
def test_half_and_bfloat16_weights_give_the_masks_of_their_float32_values(dtype, method, block):
    torch.manual_seed(0)
    low = nn.Sequential(nn.Linear(40, 24), nn.Linear(24, 8)).to(dtype)
    high = nn.Sequential(nn.Linear(40, 24), nn.Linear(24, 8))
    high.load_state_dict({k: v.float() for k, v in low.state_dict().items()})  # the same values, exactly
    h, w = block.split("x")
    spec = f"threshold_method={method},block_height={h},block_width={w}"
    for model in (low, high):
        Pruning(model, spec, sparsity=0.7).mask_update(1)
    for (name, a), b in zip(low.named_parameters(), high.parameters(), strict=True):
        assert a.dtype == dtype, name
        assert torch.equal(a.float(), b), name
    assert (low[0].weight == 0).float().mean().item() == pytest.approx(0.7, abs=0.05)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_or_inf_weight_is_an_error_naming_it_and_nothing_changes(bad, dtype):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).to(dtype)
    pruning = Pruning(model, sparsity=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight[1, 2] = bad
    with pytest.raises(FloatingPointError, match=r"NaN or Inf in pruned weight\(s\) \['0.weight'\] at step 7"):
        pruning.mask_update(7)
    assert all(m.all() for m in pruning.get_masks().values())
    assert torch.equal(model[1].weight, before["1.weight"])


def test_weights_on_meta_at_setup_are_bound_and_masks_follow_materialisation():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(16, 16), MaskedLinear(16, 4))
    pruning = Pruning(model, EXACT, sparsity=0.5)
    assert pruning.weight_names == ["0.weight", "1.weight"]
    model.to_empty(device="cpu")
    for layer in model:
        layer.reset_parameters()  # MaskedLinear resets its mask buffers too
    assert all(m.device.type == "cpu" and m.all() for m in pruning.get_masks().values())
    pruning.mask_update(1)
    for name, mask in pruning.get_masks().items():
        assert mask.float().mean().item() == 0.5, name
        assert (dict(model.named_parameters())[name][~mask] == 0).all(), name


def test_parameters_added_after_setup_are_named_in_a_warning_once():
    model = nn.Sequential(nn.Linear(4, 4))
    pruning = Pruning(model, sparsity=0.5)
    model.append(nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"\['1.weight'\] became candidates .* \(added to the model, or unfrozen\)"):
        pruning.mask_update(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruning.mask_update(2)  # said once
    assert pruning.weight_names == ["0.weight"]
    assert (model[1].weight != 0).all()


def test_a_weight_that_changed_shape_or_was_replaced_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    pruning = Pruning(model, sparsity=0.5)
    pruning.mask_update(1)
    model[1].weight = nn.Parameter(torch.randn(3, 4))  # e.g. structured pruning removed a unit in place
    with pytest.raises(ValueError, match=r"'1.weight' has shape \(3, 4\) but its mask \(2, 4\)"):
        pruning.apply_mask()
    with pytest.raises(ValueError, match=r"'1.weight' has shape \(3, 4\)"):
        pruning.mask_update(2)
    model[0] = nn.Linear(4, 4)  # a replaced layer: the engine still holds the old one
    with pytest.raises(ValueError, match=r"'0.weight' was removed or replaced"):
        pruning.mask_update(3)


def test_weights_on_several_devices_are_refused_naming_them():
    # A model split over devices (by hand, or HF device_map="auto"): one update combines a group's
    # statistics on one device. CPU and meta stand in for two GPUs here.
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2, device="meta"))
    pruning = Pruning(model, sparsity=0.5)
    with pytest.raises(NotImplementedError, match=r"several devices \(cpu: \['0.weight'\]; meta: \['1.weight'\]\)"):
        pruning.mask_update(1)
    with pytest.raises(NotImplementedError, match="device_map='auto'"):
        pruning.apply_mask()


def test_weight_frozen_after_setup_stays_pruned_and_follows_the_schedule():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    spec = f"{EXACT},target_sparsity=0.75,sparsity_function_end_step=10,pruning_frequency=5"
    pruning = Pruning(model, spec)
    pruning.conditional_mask_update(5)
    model[0].weight.requires_grad_(False)  # frozen mid-schedule: it was chosen at setup, it is pruned on
    pruning.conditional_mask_update(10)
    assert pruning.get_weight_sparsity()["0.weight"].item() == 0.75
    assert (model[0].weight == 0).float().mean().item() == 0.75


# ---------------------------------------------------------------------------- models as users write them
class Shared(nn.Module):
    """One Linear registered under two names and applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(8, 8)
        self.again = self.block
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.again(self.block(x).relu()).relu())


def test_shared_module_is_pruned_once_and_both_uses_see_zeros():
    torch.manual_seed(0)
    model = Shared()
    pruning = Pruning(model, EXACT, sparsity=0.5)
    assert pruning.weight_names == ["block.weight", "head.weight"]
    pruning.mask_update(1)
    assert (model.again.weight == 0).float().mean().item() == 0.5
    x = torch.randn(3, 8)
    w = model.block.weight
    ref = nn.functional.linear(
        nn.functional.linear(nn.functional.linear(x, w, model.block.bias).relu(), w, model.block.bias).relu(),
        model.head.weight,
        model.head.bias,
    )
    assert torch.allclose(model(x), ref, atol=1e-6)


def test_parameter_list_and_module_dict():
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.experts = nn.ModuleDict({"a": nn.Linear(6, 6), "b": nn.Linear(6, 6)})
            self.raw = nn.ParameterList([nn.Parameter(torch.randn(6, 6)), nn.Parameter(torch.randn(6))])

    torch.manual_seed(0)
    model = Holder()
    assert Pruning(model, sparsity=0.5).weight_names == ["experts.a.weight", "experts.b.weight"]  # default choice
    pruning = Pruning(model, {"threshold_method": "exact", "prune_patterns": ["weight$", r"^raw\.0$"]}, sparsity=0.5)
    assert pruning.weight_names == ["experts.a.weight", "experts.b.weight", "raw.0"]
    pruning.mask_update(1)
    assert set(pruning.get_masks()) <= {n for n, _ in model.named_parameters()}
    assert (model.raw[0] == 0).float().mean().item() == 0.5
    assert (model.raw[1] != 0).all()


def test_multi_layer_bidirectional_lstm_plain_and_masked():
    torch.manual_seed(0)
    plain = nn.LSTM(5, 6, num_layers=3, bidirectional=True, batch_first=True)
    pruning = Pruning(plain, EXACT, sparsity=0.5)
    assert len(pruning.weight_names) == 12  # ih and hh, 3 layers, 2 directions; no biases
    pruning.mask_update(1)
    x = torch.randn(2, 7, 5)
    reference = {k: v.clone() for k, v in plain.state_dict().items()}
    for name, mask in pruning.get_masks().items():
        assert mask.float().mean().item() == 0.5, name
        assert torch.equal(reference[name], reference[name] * mask), name
    fresh = nn.LSTM(5, 6, num_layers=3, bidirectional=True, batch_first=True)
    fresh.load_state_dict(reference)
    assert torch.equal(plain(x)[0], fresh(x)[0])  # the flattened weights see the in-place zeros

    masked = MaskedLSTM(5, 6, num_layers=2, bidirectional=True, batch_first=True)
    mp = Pruning(masked, EXACT, sparsity=0.25)
    mp.mask_update(1)
    assert all(m.float().mean().item() == 0.75 for m in mp.get_masks().values())
    assert all(
        getattr(masked, f"{n}_mask").float().mean().item() == 0.75 for n in masked.masked_weight_names
    )  # the masks live in the layer's buffers


@pytest.mark.slow
def test_torch_compiled_module_sees_in_place_masks():
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    compiled = torch.compile(eager)
    x = torch.randn(8, 16)
    compiled(x)  # compile before pruning: the graph must not have baked the weights in
    pruning = Pruning(compiled, EXACT, sparsity=0.5)
    assert pruning.weight_names == ["_orig_mod.0.weight", "_orig_mod.2.weight"]  # as named_parameters gives them
    pruning.mask_update(1)
    assert (eager[0].weight == 0).float().mean().item() == 0.5
    assert torch.allclose(compiled(x), eager(x), atol=1e-6)
    opt = torch.optim.SGD(compiled.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        compiled(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        pruning.apply_mask()
    for name, mask in pruning.get_masks().items():
        assert (dict(compiled.named_parameters())[name][~mask] == 0).all(), name
    assert torch.allclose(compiled(x), eager(x), atol=1e-6)


# ---------------------------------------------------------------------------- checkpoints
class TinyNet(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(80, 8, generator=g)
        self.y = (self.x[:, 0] > 0).long()
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=8)


SPEC = {"begin_pruning_step": 2, "pruning_frequency": 2, "target_sparsity": 0.8, "sparsity_function_end_step": 30}


def _fit(tmp_path: Path, callbacks, ckpt_path=None, max_epochs=2):
    seed_everything(0)
    model = TinyNet()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_epochs=max_epochs,
        callbacks=[*callbacks, ckpt],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return model


def test_checkpoint_without_pruning_state_loads_with_a_warning_and_prunes_on(tmp_path):
    _fit(tmp_path / "dense", [])  # no PruningCallback: no pruning state in the checkpoint
    cb = PruningCallback(SPEC)
    with pytest.warns(UserWarning, match=r"holds no pruning state under `PruningCallback\{'name': 'model_pruning'\}`"):
        _fit(tmp_path / "dense", [cb], ckpt_path=tmp_path / "dense" / "last.ckpt", max_epochs=4)
    assert cb.pruning.last_update_step == 39  # last_update_step restarts at 0: updates at 21, 23, ..., 39
    assert float(cb.pruning.model_sparsity()) == pytest.approx(0.8, abs=0.01)


def test_checkpoint_of_another_spec_name_says_so(tmp_path):
    _fit(tmp_path, [PruningCallback(SPEC, name="encoder")])
    with pytest.warns(UserWarning, match=r"It holds \[\"PruningCallback\{'name': 'encoder'\}\"\]: the spec's `name`"):
        _fit(tmp_path, [PruningCallback(SPEC)], ckpt_path=tmp_path / "last.ckpt", max_epochs=3)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda s: s.update(version=0), r"version 0 is not supported \(this lit_prune reads 1\)"),
        (lambda s: s.pop("version"), r"version None is not supported"),
        (lambda s: s.pop("masks"), r"lacks \['masks'\]"),
        (lambda s: s["masks"].update({"net.0.weight": torch.ones(32, 8)}), r"mask of 'net.0.weight' must be a bool"),
        (lambda s: s["thresholds"].update({"net.0.weight": torch.ones(3)}), r"threshold of 'net.0.weight' must be"),
        (lambda s: s["masks"].pop("net.2.weight"), r"missing \['net.2.weight'\]"),
    ],
    ids=["older-version", "no-version", "no-masks", "float-mask", "vector-threshold", "missing-weight"],
)
def test_older_or_corrupted_pruning_state_fails_clearly_before_training(tmp_path, corrupt, message):
    _fit(tmp_path, [PruningCallback(SPEC)], max_epochs=1)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    corrupt(checkpoint["callbacks"]["PruningCallback{'name': 'model_pruning'}"]["pruning"])
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    model = TinyNet()
    trainer = Trainer(max_epochs=3, callbacks=[PruningCallback(SPEC)], logger=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match=message):
        trainer.fit(model, ckpt_path=tmp_path / "bad.ckpt")
    assert model.steps == 0


def test_truncated_checkpoint_fails_clearly_before_training(tmp_path):
    _fit(tmp_path, [PruningCallback(SPEC)], max_epochs=1)
    data = (tmp_path / "last.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint" * 64)
    model = TinyNet()
    trainer = Trainer(max_epochs=3, callbacks=[PruningCallback(SPEC)], logger=False, enable_checkpointing=False)
    for name in ("cut.ckpt", "junk.ckpt"):
        with pytest.raises(Exception) as failure:  # noqa: PT011 - torch/fsspec raise OSError or UnpicklingError
            trainer.fit(model, ckpt_path=tmp_path / name)
        assert f"{name} is truncated or corrupted" in "".join(failure.value.__notes__)
    assert model.steps == 0
    for name in ("cut.ckpt", "junk.ckpt"):
        with pytest.raises(ValueError, match=rf"{name} is not a readable checkpoint \(truncated or corrupted\?\)"):
            strip_checkpoint(tmp_path / name)


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import torch
    from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from lit_prune import PruningCallback

    out, mode = sys.argv[1], sys.argv[2]

    class Net(LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
            g = torch.Generator().manual_seed(0)
            self.x = torch.randn(160, 16, generator=g)
            self.y = (self.x[:, :4].argmax(1) + (self.x[:, 4] > 1).long()) % 4

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.01)

        def train_dataloader(self):
            return DataLoader(TensorDataset(self.x, self.y), batch_size=16)

    class Beacon(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            print(f"step {trainer.global_step}", flush=True)
            if mode == "killable":
                time.sleep(0.2)

    seed_everything(0)
    model = Net()
    spec = dict(begin_pruning_step=5, end_pruning_step=50, pruning_frequency=5, target_sparsity=0.85,
                sparsity_function_begin_step=5, sparsity_function_end_step=50, threshold_decay=0.3)
    cb = PruningCallback(spec)
    ckpt = ModelCheckpoint(dirpath=out, save_last=True, every_n_epochs=1)
    trainer = Trainer(max_epochs=6, callbacks=[cb, ckpt, Beacon()], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", deterministic=True)
    trainer.fit(model, ckpt_path=out + "/last.ckpt" if mode == "resume" else None)
    torch.save({"model": model.state_dict(), "masks": cb.get_masks(), "thresholds": cb.get_thresholds()},
               out + "/final.pt")
    """
)


def _run(script: Path, out: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(script), str(out), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


@pytest.mark.slow
def test_sigkill_mid_schedule_then_resume_equals_uninterrupted_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(KILL_SCRIPT)
    (tmp_path / "full").mkdir()
    (tmp_path / "killed").mkdir()
    full = _run(script, tmp_path / "full", "full")

    victim = _run(script, tmp_path / "killed", "killable")
    seen = []
    for line in victim.stdout:  # 10 steps per epoch: step 34 runs in epoch 3, after epoch 2's checkpoint
        seen.append(line)
        if line.strip() == "step 34":
            os.kill(victim.pid, signal.SIGKILL)
            break
    assert victim.wait(timeout=60) == -signal.SIGKILL, "".join(seen)
    assert not (tmp_path / "killed" / "final.pt").exists()
    saved = torch.load(tmp_path / "killed" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 30  # mid-schedule (it ends at step 50)
    assert saved["callbacks"]["PruningCallback{'name': 'model_pruning'}"]["pruning"]["last_update_step"] == 30

    resumed = _run(script, tmp_path / "killed", "resume")
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
    assert full.wait(timeout=300) == 0, full.stdout.read()
    a = torch.load(tmp_path / "full" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "final.pt", weights_only=True)
    for kind in ("model", "masks", "thresholds"):
        assert a[kind].keys() == b[kind].keys()
        for name in a[kind]:
            assert torch.equal(a[kind][name], b[kind][name]), (kind, name)
    assert a["masks"]["net.0.weight"].float().mean().item() == pytest.approx(0.15, abs=0.01)


# ---------------------------------------------------------------------------- accelerator path, forced on CPU
@pytest.mark.parametrize(
    "spec",
    [
        "threshold_method=histogram",
        "threshold_method=exact",
        "block_height=2,block_width=4",
        "nm_sparsity=2:4",
        "global_ranking=true,threshold_method=exact",
    ],
)
def test_deferred_check_path_gives_the_same_masks(monkeypatch, spec):
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 8))
    b = nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 8))
    b.load_state_dict(a.state_dict())
    pa = Pruning(a, spec, sparsity=0.6)
    pa.mask_update(1)
    monkeypatch.setattr(Pruning, "_defer_checks", staticmethod(lambda param: True))
    pb = Pruning(b, spec, sparsity=0.6)
    pb.mask_update(1)
    for name, mask in pa.get_masks().items():
        assert torch.equal(pb.get_masks()[name], mask), name
        assert torch.equal(pb.get_thresholds()[name], pa.get_thresholds()[name]), name
    assert torch.equal(a[0].weight, b[0].weight)


@pytest.mark.parametrize("spec", ["threshold_method=histogram", "nm_sparsity=2:4", "global_ranking=true"])
def test_deferred_nan_check_keeps_the_masks_and_raises_at_the_next_call(monkeypatch, spec):
    monkeypatch.setattr(Pruning, "_defer_checks", staticmethod(lambda param: True))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8))
    pruning = Pruning(model, spec, sparsity=0.5)
    pruning.mask_update(1)
    before = {k: v.clone() for k, v in pruning.get_masks().items()}
    thresholds = {k: v.clone() for k, v in pruning.get_thresholds().items()}
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"\['1.weight'\] at the mask update of step 2"):
        pruning.mask_update(2)  # no host read during it: the apply_mask that ends it finds the copy done
        pruning.apply_mask()  # (on a GPU it may be this one, or a later one)
    assert torch.equal(pruning.get_masks()["1.weight"], before["1.weight"])
    assert torch.equal(pruning.get_thresholds()["1.weight"], thresholds["1.weight"])
    pruning.apply_mask()  # reported once
