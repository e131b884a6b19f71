"""Sensitivity scan (``lit_prune.sensitivity``, ``lit-prune mode=scan``), ``allocation=sensitivity`` and ``LRRewind``.

Run: pytest tests/test_sensitivity.py
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from lit_prune import HParamsError, Pruning, SensitivityScan, sensitivity


def _net_and_data(seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    x = torch.randn(256, 16)
    y = net(x).argmax(1)  # the unpruned net is exactly right: accuracy 1.0

    def evaluate(model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            logits = model(x)
        return {
            "loss": float(nn.functional.cross_entropy(logits, y)),
            "acc": float((logits.argmax(1) == y).float().mean()),
        }

    return net, evaluate


def test_the_scan_prunes_each_weight_alone_and_restores_it():
    net, evaluate = _net_and_data()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    seen = []

    def spy(model):
        zeros = {n: int((p == 0).sum()) for n, p in model.named_parameters() if n.endswith("weight")}
        seen.append(zeros)
        return evaluate(model)

    scan = sensitivity(net, spy, sparsities=(0.5, 0.9), metric="loss", progress=False)
    assert all(torch.equal(before[n], p) for n, p in net.named_parameters())  # restored exactly
    assert scan.baseline["acc"] == 1.0 and list(scan.shapes) == ["0.weight", "2.weight", "4.weight"]
    # the first call is the baseline; then each weight alone at 50 % and 90 % (round(n * s) zeros)
    assert seen[0] == {"0.weight": 0, "2.weight": 0, "4.weight": 0}
    assert seen[1] == {"0.weight": 512, "2.weight": 0, "4.weight": 0}
    assert seen[2] == {"0.weight": 922, "2.weight": 0, "4.weight": 0}
    assert seen[6] == {"0.weight": 0, "2.weight": 0, "4.weight": 230}
    losses = dict(scan.loss("4.weight"))
    assert losses[0.9] > losses[0.5] > 0  # pruning the head hurts, more at 90 %


def test_the_proposal_averages_exactly_and_spares_the_sensitive_weight(tmp_path):
    net, evaluate = _net_and_data()
    scan = sensitivity(net, evaluate, sparsities=(0.3, 0.5, 0.7, 0.8, 0.9, 0.95), metric="loss", progress=False)
    proposal = scan.propose(0.8)
    sizes = {n: math.prod(s) for n, s in scan.shapes.items()}
    assert sum(sizes[n] * proposal[n] for n in sizes) / sum(sizes.values()) == pytest.approx(0.8, abs=1e-12)
    # the 256-element head costs the most per pruned weight: it keeps more than the big middle layer
    assert proposal["4.weight"] < proposal["2.weight"]
    paths = scan.save(tmp_path, target=0.8)
    data = json.loads(paths["json"].read_text())
    assert data["proposal"]["weight_sparsity_map"] == scan.weight_sparsity_map(0.8)
    rows = list(csv.reader(paths["csv"].open()))
    assert rows[0] == ["weight", "numel", "sparsity", "acc", "loss"] and len(rows) == 2 + 3 * 6
    assert paths["png"].stat().st_size > 1000
    assert SensitivityScan.load(paths["json"]).propose(0.8) == proposal
    # fed back: allocation=sensitivity solves the same targets from the file, and the map reaches them
    pruning = Pruning(net, f"allocation=sensitivity,sensitivity_scan={paths['json']},target_sparsity=0.8")
    assert pruning.weight_targets() == pytest.approx(proposal)
    mapped = Pruning(
        nn.Sequential(*[type(m)(*m.weight.shape[::-1]) if isinstance(m, nn.Linear) else m for m in net]),
        {"weight_sparsity_map": scan.weight_sparsity_map(0.8), "target_sparsity": 0.8},
    )
    assert mapped.weight_targets() == pytest.approx(proposal)


def test_a_map_entry_wins_over_the_scan_and_the_rest_is_solved_again(tmp_path):
    net, evaluate = _net_and_data()
    scan = sensitivity(net, evaluate, sparsities=(0.5, 0.8, 0.9, 0.95), metric="loss", progress=False)
    path = scan.save(tmp_path)["json"]
    pruning = Pruning(
        net, f"allocation=sensitivity,sensitivity_scan={path},target_sparsity=0.8,weight_sparsity_map=[^4:0.0]"
    )
    t = pruning.weight_targets()
    assert t["4.weight"] == 0.0
    assert (1024 * t["0.weight"] + 4096 * t["2.weight"]) / 5376 == pytest.approx(0.8, abs=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"weights": []}, "`weights`"),
        ({"evaluate": None}, "`evaluate`"),
        ({"sparsities": (0.5, 1.0)}, "`sparsities`"),
        ({"sparsities": (-0.1,)}, "`sparsities`"),
        ({"sparsities": ()}, "`sparsities`"),
        ({"metric": "f1"}, "`metric`"),
        ({"metric": None}, "`metric`"),  # two metrics and none chosen
        ({"mode": "up"}, "`mode`"),
    ],
)
def test_bad_scans_fail_before_pruning_anything_naming_the_argument(kwargs, field):
    net, evaluate = _net_and_data()
    before = [p.detach().clone() for p in net.parameters()]
    args = {"evaluate": evaluate, "metric": "loss", "progress": False, **kwargs}
    with pytest.raises(HParamsError, match=field):
        sensitivity(net, **args)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_a_target_beyond_the_scanned_sparsities_is_refused():
    net, evaluate = _net_and_data()
    scan = sensitivity(net, evaluate, sparsities=(0.5,), metric="loss", progress=False)
    with pytest.raises(HParamsError, match="scan higher sparsities"):
        scan.propose(0.9)
    with pytest.raises(HParamsError, match="target_sparsity"):
        scan.propose(1.0)


def test_lr_rewind_sawtooth_and_fine_tuning_decay(tmp_path):
    from lightning.pytorch import LightningModule, Trainer
    from torch.utils.data import DataLoader, TensorDataset

    from lit_prune import LRRewind, PruningCallback

    class Net(LightningModule):
        def __init__(self, scheduler: bool) -> None:
            super().__init__()
            self.net, self.scheduler, self.lrs = nn.Linear(8, 2), scheduler, []

        def training_step(self, batch, idx):
            self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=1.0)
            if not self.scheduler:
                return opt
            sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    data = DataLoader(TensorDataset(torch.randn(40, 8), torch.randint(0, 2, (40,))), batch_size=1)
    spec = "begin_pruning_step=4,end_pruning_step=12,pruning_frequency=4,sparsity_function_begin_step=4,"
    spec += "sparsity_function_end_step=12,target_sparsity=0.5"

    def fit(scheduler: bool, **kw) -> list[float]:
        model = Net(scheduler)
        cbs = [PruningCallback(spec, log_histograms=False), LRRewind(**kw)]
        Trainer(
            max_steps=20,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=cbs,
            default_root_dir=tmp_path,
        ).fit(model, data)
        return model.lrs

    # rewinding a StepLR: back to 1.0 at the mask updates (global steps 4, 8, 12), halving in between
    assert fit(True) == [1.0, 0.5, 0.25, 0.125] * 4 + [0.0625, 0.03125, 0.015625, 0.0078125]
    # cosine sawtooth over each 4-step interval after the initial rate, then a linear decay over the fine-tuning
    lrs = fit(False, sawtooth="cosine", fine_tune="linear")
    saw = [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]
    assert lrs[:13] == pytest.approx([1.0] * 4 + saw + saw + [1.0])
    assert lrs[13:] == pytest.approx([1 - k / 8 for k in range(1, 8)])
    with pytest.raises(ValueError, match="`sawtooth`"):
        LRRewind(sawtooth="saw")


SHORT = {
    "begin_pruning_step": 2,
    "end_pruning_step": 16,
    "pruning_frequency": 2,
    "sparsity_function_begin_step": 2,
    "sparsity_function_end_step": 16,
}


def _cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lit_prune", "~logger", "trainer.max_epochs=1", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_cli_scan_writes_the_table_plot_and_map_and_feeds_back(tmp_path):
    result = _cli("mode=scan", "scan.sparsities=[0.5,0.9,0.95]", "hydra.run.dir=scan", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "scan" / "scan.json").read_text())
    assert data["metric"] == "val_loss" and set(data["baseline"]) == {"val_loss", "val_acc"}
    assert set(data["shapes"]) == {"net.0.weight", "net.2.weight", "net.6.weight", "net.8.weight"}
    assert (tmp_path / "scan" / "scan.png").stat().st_size > 1000 and (tmp_path / "scan" / "scan.csv").exists()
    assert len(data["proposal"]["weight_sparsity_map"]) == 4
    result = _cli(
        "pruning.allocation=sensitivity",
        f"pruning.sensitivity_scan={tmp_path / 'scan' / 'scan.json'}",
        "dense_baseline=false",
        "hydra.run.dir=run",
        *(f"pruning.{k}={v}" for k, v in SHORT.items()),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["model_sparsity"] == pytest.approx(0.9, abs=0.01)
    assert summary["weight_targets"] == pytest.approx(
        SensitivityScan.load(tmp_path / "scan" / "scan.json").propose(0.9)
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["mode=scan", "scan.metric=val_f1"], "`scan.metric`='val_f1' is not a validation metric"),
        (["mode=scan", "scan.sparsities=[0.5,1.0]"], "`scan.sparsities` must be"),
        (["mode=scan", "pruning.prune_patterns=[nothing_here]"], "prune_patterns"),
        (["pruning.allocation=sideways"], "`allocation` must be one of"),
        (["pruning.allocation=erk", "pruning.weight_sparsity_map=[net.6.weight:0.1]"], "`weight_sparsity_map`"),
    ],
)
def test_cli_bad_scan_and_allocation_fail_before_training(tmp_path, args, message):
    result = _cli(*args, "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert "Epoch 0" not in result.stderr + result.stdout  # nothing trained
