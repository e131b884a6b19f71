"""LightningCLI (jsonargparse) configures PruningCallback and StructuredPruningCallback: flags, YAML, print_config."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("jsonargparse")

from jsonargparse import ArgumentParser  # noqa: E402

from lit_prune import PruningCallback, PruningHParams, StructuredPruningCallback  # noqa: E402
from lit_prune.cli.lightning_cli import lightning_cli  # noqa: E402
from lit_prune.config import keywords  # noqa: E402
from lit_prune.config.hparams import FieldSpec, HParamsError, field_specs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "lightning_cli" / "digits.yaml"

# A tiny model and data (CPU, a few steps): the digits CNN at width 4 on random 8x8 images.
MODEL_FLAGS = [
    "--model=lit_prune.cli.demos.ImageClassifier",
    "--model.net=lit_prune.cli.lightning_cli.DigitsCNN",
    "--model.net.width=4",
    "--model.net.hidden=16",
    "--data=lit_prune.cli.demos.SyntheticDataModule",
    "--data.num_samples=320",
    "--data.batch_size=16",
]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lit-prune-lightning"])  # LightningCLI warns when `args` and argv both hold some


def trainer_flags(tmp_path: Path, max_steps: int = 12) -> list[str]:
    return [
        "--seed_everything=0",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.max_steps={max_steps}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.limit_val_batches=0",
    ]


# The schedule reaches its targets at step 10 (updates every 2 steps, exact top-k thresholds).
SCHEDULE = {"sparsity_function_end_step": 10, "pruning_frequency": 2, "threshold_method": "exact"}


def assert_sparsities(callback: PruningCallback, default: float, per_weight: dict[str, float]) -> None:
    sparsity = {k: float(v) for k, v in callback.get_weight_sparsity().items()}
    assert set(sparsity) == {"net.0.weight", "net.2.weight", "net.6.weight", "net.8.weight"}
    for name, value in sparsity.items():
        assert value == pytest.approx(per_weight.get(name, default), abs=0.02), (name, sparsity)
    model = callback.pruning.model
    for name, mask in callback.get_masks().items():  # the weights themselves are zero where masked
        assert not torch.any(model.get_parameter(name)[~mask]), name


def pruning_callbacks(cli) -> list[PruningCallback]:
    return [c for c in cli.trainer.callbacks if isinstance(c, PruningCallback)]


def error_of(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        lightning_cli(args, run=False)
    assert exit_info.value.code != 0
    return capsys.readouterr().err


# ---------------------------------------------------------------------- one source: the dataclass
def test_the_signature_and_docstring_are_the_dataclass_fields():
    params = inspect.signature(PruningCallback).parameters
    fields = [p for p in params.values() if p.name in PruningHParams.field_names()]
    assert [p.name for p in fields] == [f.name for f in dataclasses.fields(PruningHParams)]
    for param, spec in zip(fields, field_specs(), strict=True):
        assert param.kind is inspect.Parameter.KEYWORD_ONLY
        assert param.default == spec.default, spec.name
        assert param.annotation == keywords.field_type(spec), spec.name
        first_words = spec.doc.replace("`", "")[:30]
        assert f"{spec.name}: " in PruningCallback.__doc__
        assert first_words in PruningCallback.__doc__.replace("``", ""), spec.name
    assert list(params)[:1] == ["hparams"]
    assert {"sparsity", "export_path", "log_histograms"} <= set(params)
    assert "**overrides" not in PruningCallback.__doc__


def test_jsonargparse_sees_every_field_with_its_type_and_default():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(PruningCallback, "cb")
    defaults = parser.get_defaults().cb
    for spec in field_specs():
        assert defaults[spec.name] == spec.default, spec.name
    with pytest.raises(Exception, match="pruning_frequency"):
        parser.parse_args(["--cb.pruning_frequency=often"])
    assert parser.parse_args(["--cb.weight_sparsity_map", '{"fc.*": 0.95}']).cb.weight_sparsity_map == {"fc.*": 0.95}
    assert parser.parse_args(["--cb.weight_sparsity_map", '["fc.*:0.95"]']).cb.weight_sparsity_map == ["fc.*:0.95"]


def test_a_new_field_appears_with_no_other_edit(monkeypatch):
    extra = FieldSpec("allocation_rule_x", "str", str, "uniform", "A field added later")
    monkeypatch.setattr(keywords, "field_specs", lambda: (*field_specs(), extra))

    @keywords.hparams_keywords()
    class Spec:
        """A class.

        Args:
            **overrides: The fields.
        """

        def __init__(self, **overrides: object) -> None:
            self.overrides = overrides

    param = inspect.signature(Spec).parameters["allocation_rule_x"]
    assert (param.default, param.annotation) == ("uniform", str)
    assert "allocation_rule_x: A field added later." in Spec.__doc__


def test_help_lists_every_field_with_its_doc_type_and_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        lightning_cli(["fit", "--trainer.callbacks.help", "lit_prune.PruningCallback"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    for spec in field_specs():
        assert f"--trainer.callbacks.{spec.name} " in out, spec.name
        assert " ".join(spec.doc.replace("`", "").split()[:3]) in out.replace("`", ""), spec.name
    assert "(type: float, default: 0.5)" in out  # target_sparsity
    assert "(type: dict[str, float] | list[str], default: [])" in out  # weight_sparsity_map
    assert "{histogram,exact}" in out


def test_python_construction_is_unchanged_and_hparams_forms_merge():
    assert PruningCallback(target_sparsity=0.9).hparams == PruningHParams(target_sparsity=0.9)
    cb = PruningCallback(weight_sparsity_map={"fc.*": 0.95})
    assert cb.hparams.weight_sparsity_map == ["fc.*:0.95"]
    with pytest.raises(HParamsError, match="unknown pruning hparam"):
        PruningCallback(target_sparsty=0.5)
    # LightningCLI passes every keyword: one at its default leaves `hparams`'s value
    every = {spec.name: spec.default for spec in field_specs()}
    merged = PruningCallback("target_sparsity=0.9,nbins=64", **{**every, "nbins": 32}).hparams
    assert (merged.target_sparsity, merged.nbins) == (0.9, 32)
    assert PruningCallback({"weight_sparsity_map": {"fc": 0.5}}, **every).hparams.weight_sparsity_map == ["fc:0.5"]


# ---------------------------------------------------------------------- a real LightningCLI fit
def test_fit_from_command_line_flags(tmp_path):
    flags = [
        "--trainer.callbacks+=lit_prune.PruningCallback",
        "--trainer.callbacks.target_sparsity=0.7",
        "--trainer.callbacks.weight_sparsity_map",
        '{"net\\\\.8\\\\.": 0.5}',
        *[f"--trainer.callbacks.{k}={v}" for k, v in SCHEDULE.items()],
    ]
    cli = lightning_cli(["fit", *MODEL_FLAGS, *trainer_flags(tmp_path), *flags])
    (callback,) = pruning_callbacks(cli)
    assert cli.trainer.global_step == 12
    assert callback.hparams.weight_sparsity_map == ["net\\.8\\.:0.5"]
    assert_sparsities(callback, 0.7, {"net.8.weight": 0.5})


MAP_FORMS = {
    "mapping": {"weight_sparsity_map": {"net\\.8\\.": 0.5}, "block_dims_map": {"net\\.6\\.": "1x2"}},
    "list": {"weight_sparsity_map": ["net\\.8\\.:0.5"], "block_dims_map": ["net\\.6\\.:1x2"]},
}


def write_config(tmp_path: Path, init_args: dict, class_path: str = "lit_prune.PruningCallback") -> Path:
    config = {"trainer": {"callbacks": [{"class_path": class_path, "init_args": init_args}]}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("form", sorted(MAP_FORMS))
def test_fit_from_a_yaml_file_with_maps_as_mappings_or_lists(tmp_path, form):
    config = write_config(tmp_path, {"target_sparsity": 0.7, **SCHEDULE, **MAP_FORMS[form]})
    cli = lightning_cli(["fit", "--config", str(config), *MODEL_FLAGS, *trainer_flags(tmp_path)])
    (callback,) = pruning_callbacks(cli)
    assert callback.hparams.block_dims_map == ["net\\.6\\.:1x2"]
    assert_sparsities(callback, 0.7, {"net.8.weight": 0.5})


def test_print_config_round_trips(tmp_path, capsys):
    config = write_config(tmp_path, {"target_sparsity": 0.7, "hparams": "nbins=64", **MAP_FORMS["mapping"]})
    with pytest.raises(SystemExit) as exit_info:
        lightning_cli(["fit", "--config", str(config), *MODEL_FLAGS, *trainer_flags(tmp_path), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "target_sparsity: 0.7" in printed and "PruningCallback" in printed
    (tmp_path / "printed.yaml").write_text(printed)
    with pytest.raises(SystemExit):
        lightning_cli(["fit", "--config", str(tmp_path / "printed.yaml"), "--print_config"])
    assert capsys.readouterr().out == printed
    parsed = yaml.safe_load(printed)["trainer"]["callbacks"][0]["init_args"]
    assert parsed["weight_sparsity_map"] == {"net\\.8\\.": 0.5} and parsed["hparams"] == "nbins=64"


def test_print_config_feeds_back_to_the_same_callback(tmp_path, capsys):
    config = write_config(tmp_path, {"target_sparsity": 0.7, "hparams": "nbins=64", **MAP_FORMS["list"]})
    with pytest.raises(SystemExit):
        lightning_cli(["--config", str(config), *MODEL_FLAGS, *trainer_flags(tmp_path), "--print_config"], run=False)
    (tmp_path / "printed.yaml").write_text(capsys.readouterr().out)
    first = pruning_callbacks(lightning_cli(["--config", str(config), *MODEL_FLAGS], run=False))[0]
    again = pruning_callbacks(lightning_cli(["--config", str(tmp_path / "printed.yaml")], run=False))[0]
    assert first.hparams == again.hparams
    assert (again.hparams.nbins, again.hparams.target_sparsity) == (64, 0.7)


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("where", ["flag", "yaml"])
def test_a_misspelt_option_fails_naming_it(tmp_path, capsys, where):
    if where == "flag":
        args = ["--trainer.callbacks+=lit_prune.PruningCallback", "--trainer.callbacks.target_sparsty=0.7"]
    else:
        args = ["--config", str(write_config(tmp_path, {"target_sparsty": 0.7}))]
    err = error_of(capsys, [*args, *MODEL_FLAGS])
    assert "target_sparsty" in err


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("target_sparsity", "a lot", "float"),
        ("pruning_frequency", "1.5", "int"),
        ("threshold_method", "median", "histogram"),
        ("weight_sparsity_map", '{"fc": "dense"}', "float"),
    ],
)
def test_a_value_of_the_wrong_type_gets_jsonargparses_error_naming_the_option(capsys, option, value, expected):
    args = ["--trainer.callbacks+=lit_prune.PruningCallback", f"--trainer.callbacks.{option}", value]
    err = error_of(capsys, [*args, *MODEL_FLAGS])
    assert option in err and expected in err, err


def test_a_value_out_of_range_fails_naming_the_field_and_the_accepted_values():
    args = ["--trainer.callbacks+=lit_prune.PruningCallback", "--trainer.callbacks.target_sparsity=1.5"]
    # jsonargparse re-raises PruningHParams's error (an HParamsError, a ValueError) inside its own ValueError
    with pytest.raises(ValueError, match=r"`target_sparsity` must be a float in \[0, 1\), got 1.5"):
        lightning_cli([*args, *MODEL_FLAGS], run=False)


# ---------------------------------------------------------------------- StructuredPruningCallback
def test_structured_callback_help_lists_its_typed_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        lightning_cli(["--trainer.callbacks.help", "lit_prune.StructuredPruningCallback"], run=False)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("percentage", "prune_at_epochs", "ranking", "log_histograms", "example_inputs"):
        assert f"--trainer.callbacks.{option}" in out
    assert "{taylor,l1,random}" in out and "{global,per_layer}" in out


def test_structured_callback_from_yaml(tmp_path, capsys):
    init_args = {"percentage": 30, "prune_at_epochs": [1, 2], "score": "l1", "ranking": "global"}
    config = write_config(tmp_path, init_args, "lit_prune.StructuredPruningCallback")
    (callback,) = lightning_cli(["--config", str(config), *MODEL_FLAGS], run=False).trainer.callbacks[:1]
    assert isinstance(callback, StructuredPruningCallback)
    assert (callback.percentage, callback.prune_at_epochs, callback.score, callback.ranking) == (
        30.0,
        [1, 2],
        "l1",
        "global",
    )
    config = write_config(tmp_path, {**init_args, "score": "l2"}, "lit_prune.StructuredPruningCallback")
    assert "score" in error_of(capsys, ["--config", str(config), *MODEL_FLAGS])


# ---------------------------------------------------------------------- the recipe
def test_the_recipe_runs_as_a_module(tmp_path):
    export = tmp_path / "stripped.pt"
    command = [
        sys.executable,
        "-m",
        "lit_prune.cli.lightning_cli",
        "fit",
        "--config",
        str(RECIPE),
        *trainer_flags(tmp_path, max_steps=31),
        f"--trainer.callbacks.export_path={export}",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(export, weights_only=True)
    # the schedule begins at step 20 (sparsity 0 there); the update at step 30 prunes
    assert 0 < float((state["net.6.weight"] == 0).float().mean()) < 0.9
    assert "PruningCallback `digits_90`: pruning 4 weights" in result.stderr + result.stdout


def test_the_gpt2_recipe_prunes_2_of_4_along_the_conv1d_inputs(tmp_path):
    pytest.importorskip("transformers")
    from lit_prune import is_nm_sparse

    schedule = ["--trainer.callbacks.sparsity_function_end_step=6", "--trainer.callbacks.pruning_frequency=2"]
    recipe = ROOT / "recipes" / "lightning_cli" / "gpt2.yaml"
    cli = lightning_cli(["fit", "--config", str(recipe), *trainer_flags(tmp_path, max_steps=8), *schedule])
    (callback,) = pruning_callbacks(cli)
    net = cli.model.net
    assert net.lm_head.weight is net.transformer.wte.weight  # still tied
    c_fc = net.transformer.h[0].mlp.c_fc.weight  # Conv1D: [in, out]
    assert is_nm_sparse(c_fc, 2, 4, input_dims=0) and not is_nm_sparse(c_fc, 2, 4)
    assert "net.transformer.wpe.weight" not in callback.get_masks()
    assert all(float(s) == 0.5 for s in callback.get_weight_sparsity().values())


@pytest.mark.slow
def test_the_gpt2_recipe_under_fsdp2_from_flags(tmp_path):
    # ModelParallelStrategy launches the second process by running the command again: a subprocess
    pytest.importorskip("transformers")
    from lit_prune import is_nm_sparse

    export = tmp_path / "stripped.pt"
    command = [
        sys.executable, "-m", "lit_prune.cli.lightning_cli", "fit",
        "--config", str(ROOT / "recipes" / "lightning_cli" / "gpt2.yaml"),
        "--trainer.devices=2",
        "--trainer.strategy.class_path=lightning.pytorch.strategies.ModelParallelStrategy",
        "--trainer.strategy.init_args.data_parallel_size=2",
        "--trainer.strategy.init_args.tensor_parallel_size=1",
        "--trainer.max_steps=12", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks.init_args.sparsity_function_end_step=8",
        "--trainer.callbacks.init_args.pruning_frequency=4",
        f"--trainer.callbacks.init_args.export_path={export}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(export, weights_only=True)  # the FSDP2 shards gathered to rank zero, whole
    c_fc = state["net.transformer.h.0.mlp.c_fc.weight"]
    assert c_fc.shape == (64, 256) and is_nm_sparse(c_fc, 2, 4, input_dims=0)
