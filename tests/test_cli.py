"""The Hydra app: configs compose and validate, overrides reach the callback, the command and recipes run.

Run: pytest tests/test_cli.py   (subprocess runs of `lit-prune` are marked slow)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.utils import instantiate

import lit_prune.cli.app  # noqa: F401 - registers the pruning schema
from lit_prune import HParamsError, PruningCallback, is_nm_sparse
from lit_prune.cli.app import resolve_pruning

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
# A short schedule for the short test runs (20 steps per epoch on digits).
SHORT = [
    "trainer.max_epochs=2",
    "pruning.begin_pruning_step=2",
    "pruning.end_pruning_step=16",
    "pruning.pruning_frequency=2",
    "pruning.sparsity_function_begin_step=2",
    "pruning.sparsity_function_end_step=16",
]


def compose_main(overrides=()):
    with initialize_config_module(version_base="1.3", config_module="lit_prune.conf"):
        return compose("config", overrides=list(overrides))


def pruning_callback(cfg, tmp_path):
    resolve_pruning(cfg)
    node = cfg.callbacks.pruning.copy()
    node.export_path = str(tmp_path / "x.pt")
    return instantiate(node, _convert_="all")


def test_overrides_reach_the_callback(tmp_path):
    cfg = compose_main(
        [
            "pruning.target_sparsity=0.95",
            "pruning.pruning_frequency=50",
            "pruning.weight_sparsity_map={conv1: 0.7, fc.*: 0.95}",
            "pruning.block_dims_map=[net.6:4x4]",
        ]
    )
    cb = pruning_callback(cfg, tmp_path)
    assert isinstance(cb, PruningCallback)
    assert cb.hparams.target_sparsity == 0.95 and cb.hparams.pruning_frequency == 50
    assert cb.hparams.weight_sparsity_map == ["conv1:0.7", "fc.*:0.95"]
    assert cb.hparams.block_dims_map == ["net.6:4x4"]
    assert type(cb.hparams.weight_sparsity_map) is list  # no ListConfig leaks into callback state


def test_tf_string_and_list_form(tmp_path):
    cfg = compose_main(['pruning_hparams="target_sparsity=0.8,weight_sparsity_map=[net.0:0.5]"'])
    cb = pruning_callback(cfg, tmp_path)
    assert cb.hparams.target_sparsity == 0.8 and cb.hparams.weight_sparsity_map == ["net.0:0.5"]
    cfg = compose_main(["pruning.weight_sparsity_map=['layer[0-9]+\\.conv:0.8','a{1,2} b:0.5']"])
    assert resolve_pruning(cfg).weight_sparsity_map == [r"layer[0-9]+\.conv:0.8", "a{1,2} b:0.5"]


def test_tf_string_keeps_regex_brackets_and_does_not_touch_the_composed_spec():
    cfg = compose_main(['pruning_hparams="prune_patterns=[net.{0,2}[0-9].weight],weight_sparsity_map=[net.[0-9]:0.5]"'])
    spec = resolve_pruning(cfg)
    assert spec.prune_patterns == ["net.{0,2}[0-9].weight"] and spec.weight_sparsity_map == ["net.[0-9]:0.5"]
    assert list(cfg.pruning.prune_patterns) == ["net.{0,2}[0-9].weight"]  # written back into the config
    with pytest.raises(HParamsError, match=r"`prune_patterns`: unterminated '\['"):
        resolve_pruning(compose_main(['pruning_hparams="prune_patterns=[net[0-9]"']))


def test_nm_overrides_in_list_mapping_and_string_forms(tmp_path):
    for override in (
        "pruning.nm_sparsity_map=[net.*weight:2:4]",
        'pruning.nm_sparsity_map={net.*weight: "2:4"}',
        'pruning_hparams="nm_sparsity_map=[net.*weight:2:4]"',
    ):
        assert resolve_pruning(compose_main([override])).nm_sparsity_map == ["net.*weight:2:4"], override
    assert resolve_pruning(compose_main(["pruning.nm_sparsity=1:4"])).nm_sparsity == "1:4"


def test_plus_tilde_and_null_overrides(tmp_path):
    cfg = compose_main(["+pruning.weight_sparsity_map.fc=0.7", "~callbacks.model_checkpoint", "~logger"])
    assert resolve_pruning(cfg).weight_sparsity_map == ["fc:0.7"]
    assert list(cfg.callbacks) == ["pruning"] and cfg.get("logger") is None
    cfg = compose_main(
        ["pruning=per_layer", "pruning.weight_sparsity_map=null", "pruning.weight_sparsity_map={fc: 0.5}"]
    )
    assert resolve_pruning(cfg).weight_sparsity_map == ["fc:0.5"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pruning.target_sparsty=0.5", "Could not override 'pruning.target_sparsty'"),
        ("pruning.target_sparsity=abc", "Error merging override pruning.target_sparsity=abc"),
        ("pruning.nbins=1.5", "Error merging override pruning.nbins=1.5"),
    ],
)
def test_schema_rejects_bad_keys_and_types(override, message):
    with pytest.raises(Exception, match=message):
        compose_main([override])


def test_malformed_map_fails_before_training():
    cfg = compose_main(["pruning.weight_sparsity_map=[conv1]"])
    with pytest.raises(HParamsError, match="`weight_sparsity_map` entry 'conv1' is malformed"):
        resolve_pruning(cfg)
    cfg = compose_main(["pruning.target_sparsity=1.5"])
    with pytest.raises(HParamsError, match=r"`target_sparsity` must be a float in \[0, 1\)"):
        resolve_pruning(cfg)


@pytest.mark.parametrize("pruning", ["gradual", "tf_default", "block_4x4", "block_1x16", "per_layer", "nm_2of4"])
def test_every_pruning_spec_is_valid(pruning):
    resolve_pruning(compose_main([f"pruning={pruning}"]))


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES.glob("*.yaml")))
def test_every_recipe_composes(name):
    with initialize_config_dir(version_base="1.3", config_dir=str(RECIPES)):
        cfg = compose(name)
    resolve_pruning(cfg)
    assert cfg.model._target_ and cfg.data._target_ and cfg.trainer._target_


def run_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "lit_prune", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_console_script_default_run_produces_the_promised_files(tmp_path):
    result = subprocess.run(
        ["lit-prune", *SHORT, "hydra.run.dir=run"], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["dense_test_acc"] > 0.5 and summary["pruned_test_acc"] > 0.5
    assert summary["model_sparsity"] == pytest.approx(0.9, abs=0.02)
    assert set(summary["weight_sparsity"]) == {"net.0.weight", "net.2.weight", "net.6.weight", "net.8.weight"}
    assert (run / "summary.md").read_text().startswith("# lit_prune run")
    assert (run / "model_stripped.pt").exists() and (run / "checkpoints" / "last.ckpt").exists()
    assert list((run / "tensorboard" / "pruned").glob("events.out.tfevents.*"))
    assert list((run / "tensorboard" / "dense").glob("events.out.tfevents.*"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pruning.target_sparsty=0.5", "Could not override 'pruning.target_sparsty'"),
        ("pruning.nbins=abc", "Error merging override pruning.nbins=abc"),
        ("pruning.weight_sparsity_map=[conv1]", "`weight_sparsity_map` entry 'conv1' is malformed"),
        ("pruning.weight_sparsity_map=[conv9:0.5]", "'conv9' matches no pruned weight; candidates"),
    ],
)
def test_bad_command_lines_exit_non_zero_with_a_clear_message(tmp_path, override, message):
    result = run_cli(override, "dense_baseline=false", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gradual_90", "block_4x4", "per_layer", "nm_2of4"])
def test_recipes_run_briefly(tmp_path, name):
    result = run_cli("--config-dir", str(RECIPES), "--config-name", name, *SHORT, "dense_baseline=false",
                     "hydra.run.dir=run", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["hparams"]["name"] in {"gradual_90", "digits_block_4x4", "digits_per_layer", "digits_nm_2of4"}
    if name == "per_layer":
        assert summary["weight_sparsity"]["net.0.weight"] == pytest.approx(0.5, abs=0.02)
    if name == "nm_2of4":
        assert summary["nm_weights"] == dict.fromkeys(["net.1.weight", "net.3.weight", "net.5.weight"], "2:4")
        exported = torch.load(tmp_path / "run" / "model_stripped.pt", weights_only=True)
        assert all(is_nm_sparse(exported[name], 2, 4) for name in summary["nm_weights"])


@pytest.mark.parametrize(("model", "block"), [("tiny_gpt2", "GPT2Block"), ("tiny_llama", "LlamaDecoderLayer")])
def test_transformer_model_configs_build_and_name_their_fsdp2_units(model, block):
    pytest.importorskip("transformers")
    from lit_prune.cli.fully_shard import shard_units

    module = instantiate(compose_main([f"model={model}", "data=tokens"]).model, _convert_="all")
    ids = torch.randint(0, 64, (2, 16))
    assert module(ids).shape == (2, 16, 64)
    assert {type(u).__name__ for u in shard_units(module.net)} == {block}  # HF's _no_split_modules


@pytest.mark.slow
def test_ddp_trainer_summary_holds_the_pruning_state(tmp_path):
    # two processes, each running the whole job: rank zero's callback writes the sparsities
    result = run_cli("trainer=ddp_cpu", *SHORT, "dense_baseline=false", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["model_sparsity"] == pytest.approx(0.9, abs=0.02) and summary["last_mask_update_step"] == 16
    assert set(summary["weight_sparsity"]) == {"net.0.weight", "net.2.weight", "net.6.weight", "net.8.weight"}


@pytest.mark.slow
def test_fsdp2_recipe_shards_a_gpt2_over_two_processes_and_exports_it_whole(tmp_path):
    pytest.importorskip("transformers")
    short = ["trainer.max_epochs=4", "pruning.begin_pruning_step=8", "pruning.end_pruning_step=24",
             "pruning.sparsity_function_begin_step=8", "pruning.sparsity_function_end_step=24",
             "pruning.pruning_frequency=4"]  # fmt: skip
    result = run_cli("--config-dir", str(RECIPES), "--config-name", "fsdp2_gpt2", *short, "dense_baseline=false",
                     "export.compressed=model.safetensors", "hydra.run.dir=run", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())  # written once, by rank zero
    assert summary["model_sparsity"] == pytest.approx(0.5, abs=0.01) and summary["last_mask_update_step"] == 24
    assert (run / "checkpoints" / "last.ckpt").is_dir()  # a distributed checkpoint: each process its part
    net = instantiate(compose_main(["model=tiny_gpt2", "data=tokens"]).model.net, _convert_="all")  # unsharded
    exported = torch.load(run / "model_stripped.pt", weights_only=True)  # gathered to rank zero, whole
    net.load_state_dict({k.removeprefix("net."): v for k, v in exported.items()})
    for name, value in summary["weight_sparsity"].items():
        weight = exported[name]
        assert float((weight == 0).float().mean()) == pytest.approx(value, abs=1e-3), name
    from lit_prune import strip_checkpoint

    stripped = strip_checkpoint(run / "checkpoints" / "last.ckpt")  # the shards read in this one process
    assert sorted(stripped) == sorted(exported) and all(torch.equal(stripped[k], exported[k]) for k in exported)
    from lit_prune import load_compressed

    compressed = load_compressed(run / "model.safetensors")  # every process took part in the gather
    assert all(torch.equal(compressed[k], exported[k]) for k in exported), sorted(compressed)


@pytest.mark.slow
def test_a_scan_under_a_sharding_trainer_is_refused_before_training(tmp_path):
    result = run_cli("mode=scan", "trainer=fsdp2_cpu", "model=mlp", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode != 0
    assert "mode=scan prunes each weight whole" in result.stderr and "trainer=cpu or trainer=gpu" in result.stderr
    assert "Epoch" not in result.stdout + result.stderr  # nothing trained


@pytest.mark.slow
def test_structured_pruning_under_a_sharding_trainer_is_refused_before_the_dense_baseline(tmp_path):
    result = run_cli("trainer=fsdp2_cpu", "callbacks=structured", "model.net.masked=false", "hydra.run.dir=run",
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode != 0
    assert "StructuredPruningCallback does not support `ModelParallelStrategy`" in result.stderr
    assert "Epoch" not in result.stdout + result.stderr  # the dense baseline did not run


def test_fully_shard_net_refuses_a_tensor_parallel_mesh_it_has_no_plan_for():
    from lit_prune.cli.fully_shard import fully_shard_net

    class Mesh:  # the shape of a DeviceMesh with a tensor-parallel dimension of 2
        mesh_dim_names = ("data_parallel", "tensor_parallel")

        def __getitem__(self, name):
            return type("Sub", (), {"size": lambda self: 2})()

    with pytest.raises(ValueError, match="tensor_parallel_size=1 \\(got 2\\)"):
        fully_shard_net(torch.nn.Sequential(torch.nn.Linear(2, 2)), Mesh())


@pytest.mark.slow
def test_sweep_recipe_two_points_writes_runs_and_plot(tmp_path):
    result = run_cli(
        "--config-dir", str(RECIPES), "--config-name", "sparsity_sweep", *SHORT, "dense_baseline=false",
        "hydra.sweeper.params={pruning.target_sparsity: '0.5,0.9'}", "hydra.sweep.dir=sweep", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweep"
    summaries = sorted(json.loads(p.read_text())["target_sparsity"] for p in sweep.glob("*/summary.json"))
    assert summaries == [0.5, 0.9]
    assert (sweep / "accuracy_vs_sparsity.png").stat().st_size > 1000
    assert "| model sparsity |" in (sweep / "sweep.md").read_text()


@pytest.mark.slow
def test_plain_multirun_two_points(tmp_path):
    result = run_cli("-m", "pruning.target_sparsity=0.5,0.75", *SHORT, "dense_baseline=false", "~logger",
                     "hydra.sweep.dir=multi", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "multi").iterdir() if p.is_dir()) == ["0", "1"]


USER_MODULE = """
import torch
from lightning.pytorch import LightningModule
from torch import nn


class MyNet(LightningModule):
    def __init__(self, hidden: int):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.body(batch[0]), batch[1])

    def test_step(self, batch, batch_idx):
        self.log("test_acc", (self.body(batch[0]).argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)
"""


@pytest.mark.slow
def test_users_plug_in_their_own_module_by_target(tmp_path):
    (tmp_path / "my_project.py").write_text(USER_MODULE)
    (tmp_path / "my_conf" / "model").mkdir(parents=True)
    (tmp_path / "my_conf" / "model" / "mine.yaml").write_text("_target_: my_project.MyNet\nhidden: 32\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run(
        ["lit-prune", "--config-dir", "my_conf", "model=mine", *SHORT, "dense_baseline=false",
         "pruning.allocation=uniform", "pruning.weight_sparsity_map=[body.1:0.5]", "hydra.run.dir=run"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["weight_sparsity"]) == {"body.1.weight", "body.3.weight"}
    assert summary["weight_sparsity"]["body.1.weight"] == pytest.approx(0.5, abs=0.02)


@pytest.mark.slow
def test_structured_recipe_runs_briefly_and_shrinks_the_model(tmp_path):
    result = run_cli("--config-dir", str(RECIPES), "--config-name", "structured_oracle", "trainer.max_epochs=2",
                     "callbacks.structured_pruning.prune_at_epochs=[0]", "dense_baseline=false", "hydra.run.dir=run",
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["kernels_removed"] == [58]  # 30 % of 192 prunable kernels (the residual pair counts once)
    assert summary["conv_kernels"]["net.4"] == 45 and summary["num_params"] < 75114
    assert (tmp_path / "run" / "summary.md").read_text().startswith("# lit_prune run: structured pruning")
