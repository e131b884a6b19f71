"""The catalogue of malformed inputs: each fails before training with a message naming the field.

Run: pytest tests/test_bad_input_catalogue.py -s   (prints the table: input, error)

Covers `PruningHParams`, TF-style `parse` strings, model-dependent checks (`Pruning` on a real
module), Hydra overrides and the structured-pruning parameters.  The README links here as the list
of checked inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from torch import nn

import lit_prune.cli.app  # noqa: F401 - registers the schema
from lit_prune import HParamsError, Pruning, PruningHParams
from lit_prune.cli.app import resolve_pruning
from lit_prune.oracle import StructuredPruningError, create_dl_pruning


def _model():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))


class _Unknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(4, 4))


def _hydra(*overrides):
    with initialize_config_module(version_base="1.3", config_module="lit_prune.conf"):
        cfg = compose("config", overrides=list(overrides))
    resolve_pruning(cfg)


# (input shown in the table, callable, the field the message must name)
CASES = [
    ("target_sparsity=1.0", lambda: PruningHParams(target_sparsity=1.0), "target_sparsity"),
    ("target_sparsity=-0.1", lambda: PruningHParams(target_sparsity=-0.1), "target_sparsity"),
    ("target_sparsity=nan", lambda: PruningHParams(target_sparsity=math.nan), "target_sparsity"),
    ("target_sparsity='high'", lambda: PruningHParams(target_sparsity="high"), "target_sparsity"),
    ("initial_sparsity=1.5", lambda: PruningHParams(initial_sparsity=1.5), "initial_sparsity"),
    ("threshold_decay=1.0", lambda: PruningHParams(threshold_decay=1.0), "threshold_decay"),
    ("gradient_decay_rate=2", lambda: PruningHParams(gradient_decay_rate=2), "gradient_decay_rate"),
    ("begin_pruning_step=-1", lambda: PruningHParams(begin_pruning_step=-1), "begin_pruning_step"),
    ("begin 10 > end 5", lambda: PruningHParams(begin_pruning_step=10, end_pruning_step=5), "end_pruning_step"),
    ("end_pruning_step=-5", lambda: PruningHParams(end_pruning_step=-5), "end_pruning_step"),
    (
        "sparsity_function_begin_step=-3",
        lambda: PruningHParams(sparsity_function_begin_step=-3),
        "sparsity_function_begin_step",
    ),
    (
        "function begin 100 = end 100",
        lambda: PruningHParams(sparsity_function_begin_step=100),
        "sparsity_function_end_step",
    ),
    (
        "sparsity_function_exponent=0",
        lambda: PruningHParams(sparsity_function_exponent=0),
        "sparsity_function_exponent",
    ),
    (
        "sparsity_function_exponent=inf",
        lambda: PruningHParams(sparsity_function_exponent=math.inf),
        "sparsity_function_exponent",
    ),
    ("pruning_frequency=0", lambda: PruningHParams(pruning_frequency=0), "pruning_frequency"),
    ("pruning_frequency=2.5", lambda: PruningHParams(pruning_frequency=2.5), "pruning_frequency"),
    ("nbins=0", lambda: PruningHParams(nbins=0), "nbins"),
    ("nbins=True", lambda: PruningHParams(nbins=True), "nbins"),
    ("block_height=0", lambda: PruningHParams(block_height=0), "block_height"),
    ("block_width=-2", lambda: PruningHParams(block_width=-2), "block_width"),
    ("block_pooling_function='mean'", lambda: PruningHParams(block_pooling_function="mean"), "block_pooling_function"),
    ("threshold_method='topk'", lambda: PruningHParams(threshold_method="topk"), "threshold_method"),
    ("prune_option='compression'", lambda: PruningHParams(prune_option="compression"), "prune_option"),
    ("use_tpu='yes'", lambda: PruningHParams(use_tpu="yes"), "use_tpu"),
    ("global_ranking=1", lambda: PruningHParams(global_ranking=1), "global_ranking"),
    ("name=''", lambda: PruningHParams(name=""), "name"),
    ("weight_sparsity_map=['conv1']", lambda: PruningHParams(weight_sparsity_map=["conv1"]), "weight_sparsity_map"),
    ("weight_sparsity_map=['conv1:']", lambda: PruningHParams(weight_sparsity_map=["conv1:"]), "weight_sparsity_map"),
    ("weight_sparsity_map=[':0.5']", lambda: PruningHParams(weight_sparsity_map=[":0.5"]), "weight_sparsity_map"),
    ("weight_sparsity_map=['fc:1.0']", lambda: PruningHParams(weight_sparsity_map=["fc:1.0"]), "weight_sparsity_map"),
    ("weight_sparsity_map=['fc:nan']", lambda: PruningHParams(weight_sparsity_map=["fc:nan"]), "weight_sparsity_map"),
    ("weight_sparsity_map=['fc[:0.5']", lambda: PruningHParams(weight_sparsity_map=["fc[:0.5"]), "weight_sparsity_map"),
    (
        "weight_sparsity_map=['a:0.5','a:0.6']",
        lambda: PruningHParams(weight_sparsity_map=["a:0.5", "a:0.6"]),
        "weight_sparsity_map",
    ),
    ("weight_sparsity_map=0.5", lambda: PruningHParams(weight_sparsity_map=0.5), "weight_sparsity_map"),
    ("block_dims_map=['fc:4']", lambda: PruningHParams(block_dims_map=["fc:4"]), "block_dims_map"),
    ("block_dims_map=['fc:0x4']", lambda: PruningHParams(block_dims_map=["fc:0x4"]), "block_dims_map"),
    ("block_dims_map=['fc:4X4']", lambda: PruningHParams(block_dims_map=["fc:4X4"]), "block_dims_map"),
    ("nm_sparsity='4:2'", lambda: PruningHParams(nm_sparsity="4:2"), "nm_sparsity"),
    ("nm_sparsity='2-4'", lambda: PruningHParams(nm_sparsity="2-4"), "nm_sparsity"),
    ("nm_sparsity_map=['fc:2']", lambda: PruningHParams(nm_sparsity_map=["fc:2"]), "nm_sparsity_map"),
    ("nm_sparsity_map=['fc:0:4']", lambda: PruningHParams(nm_sparsity_map=["fc:0:4"]), "nm_sparsity_map"),
    ("N:M on a conv of in*kh*kw = 9", lambda: Pruning(_model(), {"nm_sparsity_map": ["^0:2:4"]}), "'0.weight'"),
    (
        "N:M and block dims on one weight",
        lambda: Pruning(_model(), {"nm_sparsity_map": ["^3:2:4"], "block_dims_map": ["^3:2x2"]}),
        "'3.weight'",
    ),
    (
        "N:M and a weight_sparsity_map target on one weight",
        lambda: Pruning(_model(), {"nm_sparsity_map": ["^3:2:4"], "weight_sparsity_map": ["^3:0.9"]}),
        "'3.weight'",
    ),
    (
        "N:M on an embedding (no reduction dim)",
        lambda: Pruning(nn.Sequential(nn.Embedding(8, 4)), "nm_sparsity=2:4"),
        "'0.weight'",
    ),
    (
        "N:M on a layer of unknown layout",
        lambda: Pruning(_Unknown(), {"prune_patterns": ["w"], "nm_sparsity": "2:4"}),
        "register_layer(_Unknown, {'w'",
    ),
    ("prune_patterns=['(']", lambda: PruningHParams(prune_patterns=["("]), "prune_patterns"),
    ("exclude_patterns=[3]", lambda: PruningHParams(exclude_patterns=[3]), "exclude_patterns"),
    ("parse('target_sparsty=0.9')", lambda: PruningHParams().parse("target_sparsty=0.9"), "target_sparsty"),
    ("parse('nbins=1,nbins=2')", lambda: PruningHParams().parse("nbins=1,nbins=2"), "nbins"),
    (
        "parse('weight_sparsity_map=[a:0.5')",
        lambda: PruningHParams().parse("weight_sparsity_map=[a:0.5"),
        "weight_sparsity_map",
    ),
    ("parse('target_sparsity')", lambda: PruningHParams().parse("target_sparsity"), "name=value"),
    (
        "parse('prune_patterns=[conv[0-9]')",
        lambda: PruningHParams().parse("prune_patterns=[conv[0-9]"),
        "prune_patterns",
    ),
    (
        "parse('exclude_patterns=[a(b]')",
        lambda: PruningHParams().parse("exclude_patterns=[a(b]"),
        "exclude_patterns",
    ),
    ("coerce(0.5)", lambda: PruningHParams.coerce(0.5), "hparams"),
    ("from_dict({'foo': 1})", lambda: PruningHParams.from_dict({"foo": 1}), "foo"),
    (
        "map regex 'conv9' matches nothing",
        lambda: Pruning(_model(), {"weight_sparsity_map": ["conv9:0.5"]}),
        "weight_sparsity_map",
    ),
    (
        "a weight matched twice",
        lambda: Pruning(_model(), {"weight_sparsity_map": ["0:0.5", r"0\.w:0.6"]}),
        "weight_sparsity_map",
    ),
    ("block map regex matches nothing", lambda: Pruning(_model(), {"block_dims_map": ["fc:2x2"]}), "block_dims_map"),
    ("prune_patterns match nothing", lambda: Pruning(_model(), {"prune_patterns": ["nope"]}), "prune_patterns"),
    ("exclude everything", lambda: Pruning(_model(), {"exclude_patterns": ["weight"]}), "exclude_patterns"),
    (
        "global_ranking with blocks",
        lambda: Pruning(_model(), {"global_ranking": True, "block_height": 2}),
        "global_ranking",
    ),
    ("allocation='layerwise'", lambda: PruningHParams(allocation="layerwise"), "allocation"),
    ("parse('allocation=ERK')", lambda: PruningHParams().parse("allocation=ERK"), "allocation"),
    ("allocation=sensitivity without a scan", lambda: PruningHParams(allocation="sensitivity"), "sensitivity_scan"),
    (
        "global_ranking=True with allocation=erk",
        lambda: PruningHParams(global_ranking=True, allocation="erk"),
        "global_ranking",
    ),
    (
        "allocation=erk, a pinned weight makes the average impossible",
        lambda: Pruning(_model(), {"allocation": "erk", "target_sparsity": 0.1, "weight_sparsity_map": ["^3:0.9"]}),
        "weight_sparsity_map",
    ),
    (
        "allocation=sensitivity, an unreadable scan",
        lambda: Pruning(_model(), {"allocation": "sensitivity", "sensitivity_scan": "/nonexistent.json"}),
        "sensitivity_scan",
    ),
    ("hydra: pruning.allocation=sideways", lambda: _hydra("pruning.allocation=sideways"), "allocation"),
    ("Pruning(sparsity=1.5)", lambda: Pruning(_model(), sparsity=1.5), "sparsity"),
    (
        "N:M, external sparsity, target_sparsity=0",
        lambda: Pruning(nn.Linear(8, 8), "nm_sparsity=2:4,target_sparsity=0", sparsity=0.3).mask_update(1),
        "target_sparsity",
    ),
    ("hydra: pruning.target_sparsty=0.5", lambda: _hydra("pruning.target_sparsty=0.5"), "target_sparsty"),
    ("hydra: pruning.nbins=abc", lambda: _hydra("pruning.nbins=abc"), "nbins"),
    (
        "hydra: pruning.weight_sparsity_map=[conv1]",
        lambda: _hydra("pruning.weight_sparsity_map=[conv1]"),
        "weight_sparsity_map",
    ),
    (
        "hydra: pruning_hparams='target_sparsity=2'",
        lambda: _hydra("pruning_hparams='target_sparsity=2'"),
        "target_sparsity",
    ),
    ("oracle: mode='taylor'", lambda: create_dl_pruning(_model(), "taylor"), "mode"),
    ("oracle: percentage=0", lambda: create_dl_pruning(_model(), "oracle", {"percentage": 0}), "percentage"),
    ("oracle: percentage=100", lambda: create_dl_pruning(_model(), "oracle", {"percentage": 100}), "percentage"),
    ("oracle: unknown 'percent'", lambda: create_dl_pruning(_model(), "oracle", {"percent": 10}), "percent"),
    (
        "oracle: set read-only 'pruned_kernel_num'",
        lambda: create_dl_pruning(_model(), "oracle", {"pruned_kernel_num": 1}),
        "pruned_kernel_num",
    ),
    ("oracle: score='apoz'", lambda: create_dl_pruning(_model(), "oracle", {"score": "apoz"}), "score"),
]


@pytest.mark.parametrize(("shown", "call", "field"), CASES, ids=[c[0] for c in CASES])
def test_each_bad_input_fails_clearly(shown, call, field):
    with pytest.raises((HParamsError, StructuredPruningError, ConfigCompositionException)) as info:
        call()
    message = str(info.value)
    assert field in message, message


def test_catalogue_table(capsys):
    """At least 40 inputs; print them with their messages (pytest -s shows the table)."""
    assert len(CASES) >= 40
    rows = ["| input | error |", "| --- | --- |"]
    for shown, call, _ in CASES:
        try:
            call()
        except Exception as err:  # noqa: BLE001 - the table shows whatever each input raises
            first = str(err).strip().splitlines()[0]
            rows.append(f"| `{shown}` | {type(err).__name__}: {first} |")
        else:  # pragma: no cover - test_each_bad_input_fails_clearly catches this
            pytest.fail(f"{shown} did not fail")
    with capsys.disabled():
        print("\n" + "\n".join(rows))
    torch.manual_seed(0)  # keep the global RNG as other tests expect it
