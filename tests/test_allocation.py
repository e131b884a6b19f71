"""``allocation``: uniform (TF), global, ERK and sensitivity targets; exact averages; composition with the map.

Run: pytest tests/test_allocation.py
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lit_prune import HParamsError, Pruning, PruningHParams
from lit_prune.cli.digits import digits_cnn, mlp
from lit_prune.engine.allocation import allocate, erk_targets, global_targets, sensitivity_targets


def _average(targets: dict[str, float], shapes: dict[str, tuple[int, ...]]) -> float:
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    return sum(sizes[n] * targets[n] for n in shapes) / sum(sizes.values())


shape_st = st.lists(
    st.tuples(st.integers(1, 64), st.integers(1, 300)).map(
        lambda t: t if t[0] % 3 else (t[0], max(1, t[1] // 9), 3, 3)
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(shapes=shape_st, target=st.floats(0.0, 0.99), rule=st.sampled_from(["global", "erk"]), pin=st.data())
def test_erk_and_global_targets_average_exactly_to_the_target(shapes, target, rule, pin):
    named = {f"w{i}": s for i, s in enumerate(shapes)}
    pinned = {}
    if len(named) > 1 and pin.draw(st.booleans()):
        pinned = {"w0": pin.draw(st.floats(0.0, 0.99))}
    try:
        chosen = allocate(rule, named, target, pinned)
    except HParamsError as err:  # only when the pinned weight makes the average impossible
        assert pinned and "weight_sparsity_map" in str(err)
        free = sum(math.prod(s) for n, s in named.items() if n not in pinned)
        need = (target * sum(math.prod(s) for s in named.values()) - math.prod(named["w0"]) * pinned["w0"]) / free
        assert not 0.0 <= need < 1.0
        return
    assert _average(chosen.targets, named) == pytest.approx(target, abs=1e-9)
    assert all(0.0 <= t < 1.0 for t in chosen.targets.values())
    assert all(chosen.targets[n] == v for n, v in pinned.items())


def test_erk_on_the_digits_cnn_keeps_the_small_layers_dense_and_prunes_the_big_one_hardest():
    shapes = {n: tuple(p.shape) for n, p in digits_cnn().named_parameters() if n.endswith("weight")}
    chosen = erk_targets(shapes, 0.9 * sum(math.prod(s) for s in shapes.values()), {})
    t = chosen.targets
    assert t["0.weight"] == 0.0 and t["8.weight"] == 0.0  # density > 1: kept dense, the rest solved again
    assert sorted(chosen.kept_dense) == ["0.weight", "8.weight"]
    assert t["6.weight"] == pytest.approx(0.9051, abs=1e-4) and t["2.weight"] == pytest.approx(0.9403, abs=1e-4)
    assert _average(t, shapes) == pytest.approx(0.9, abs=1e-12)


def test_global_keeps_weights_too_small_to_matter_dense_and_ranks_the_rest_jointly():
    model = digits_cnn(masked=False)
    pruning = Pruning(
        model, "allocation=global,target_sparsity=0.9,threshold_method=exact,sparsity_function_end_step=10"
    )
    targets = pruning.weight_targets()
    assert targets["0.weight"] == 0.0 and targets["8.weight"] == 0.0  # 288 and 1280 elements: < 1 % of 131072
    assert targets["2.weight"] == targets["6.weight"] == pytest.approx(0.9 * 151072 / (18432 + 131072))
    pruning.mask_update(10)
    s = {k: float(v) for k, v in pruning.get_weight_sparsity().items()}
    assert s["0.weight"] == 0.0 and s["8.weight"] == 0.0
    assert s["2.weight"] != pytest.approx(s["6.weight"], abs=1e-3)  # one threshold, not one sparsity
    assert float(pruning.model_sparsity()) == pytest.approx(0.9, abs=1e-5)
    th = pruning.get_thresholds()
    assert th["2.weight"].item() == th["6.weight"].item()


def test_global_ranking_is_an_alias_of_allocation_global():
    a = Pruning(mlp(), "global_ranking=true,target_sparsity=0.8").weight_targets()
    b = Pruning(mlp(), "allocation=global,target_sparsity=0.8").weight_targets()
    assert a == b
    with pytest.raises(HParamsError, match="`global_ranking`=True is `allocation`=global"):
        PruningHParams(global_ranking=True, allocation="erk")


@pytest.mark.parametrize("rule", ["global", "erk"])
def test_map_entries_win_and_the_rest_is_solved_again(rule):
    torch.manual_seed(0)
    model = mlp()  # 64x256, 256x256, 256x10
    hp = PruningHParams(
        allocation=rule,
        target_sparsity=0.9,
        weight_sparsity_map=["^1\\.:0.5"],
        threshold_method="exact",
        sparsity_function_end_step=10,
    )
    pruning = Pruning(model, hp)
    targets = pruning.weight_targets()
    assert targets["1.weight"] == 0.5
    sizes = {n: p.numel() for n, p in pruning.get_weights().items()}
    assert sum(sizes[n] * targets[n] for n in sizes) / sum(sizes.values()) == pytest.approx(0.9, abs=1e-12)
    pruning.mask_update(10)
    assert float(pruning.get_weight_sparsity()["1.weight"]) == pytest.approx(0.5, abs=1e-4)
    assert float(pruning.model_sparsity()) == pytest.approx(0.9, abs=1e-4)


def test_uniform_is_tf_every_weight_at_the_target_and_the_map_as_tf():
    pruning = Pruning(mlp(), "target_sparsity=0.9,weight_sparsity_map=[^1\\.:0.5]")
    assert pruning.weight_targets() == {"1.weight": 0.9, "3.weight": 0.9, "5.weight": 0.9} | {"1.weight": 0.5}


def test_a_map_that_makes_the_average_impossible_fails_naming_the_field():
    # 3.weight holds 65536 of 84480 weights: pinned at 0.1, the others would need sparsity > 1 for 0.9
    with pytest.raises(HParamsError, match="weight_sparsity_map"):
        Pruning(mlp(), "allocation=erk,target_sparsity=0.9,weight_sparsity_map=[^3\\.:0.1]")
    with pytest.raises(HParamsError, match="weight_sparsity_map"):  # pinned far sparser: the rest below 0
        Pruning(mlp(), "allocation=global,target_sparsity=0.1,weight_sparsity_map=[^3\\.:0.9]")


def test_bad_allocation_values_fail_naming_the_field():
    with pytest.raises(HParamsError, match="`allocation` must be one of"):
        PruningHParams(allocation="layerwise")
    with pytest.raises(HParamsError, match="`allocation` must be one of"):
        PruningHParams().parse("allocation=ERK-ish")
    with pytest.raises(HParamsError, match="sensitivity_scan"):
        PruningHParams(allocation="sensitivity")
    with pytest.raises(HParamsError, match="sensitivity_scan"):
        Pruning(mlp(), "allocation=sensitivity,sensitivity_scan=/nonexistent/scan.json")


def test_the_tf_string_and_the_mapping_carry_allocation():
    hp = PruningHParams().parse("allocation=erk,target_sparsity=0.9")
    assert hp.allocation == "erk" and PruningHParams().parse(hp.to_string()) == hp
    assert PruningHParams.coerce({"allocation": "global"}).allocation_rule() == "global"


def _brute_force(sizes, curves, budget, grid):
    best = None
    names = list(sizes)
    for combo in itertools.product(grid, repeat=len(names)):
        if abs(sum(sizes[n] * s for n, s in zip(names, combo, strict=True)) - budget) > 1e-9:
            continue
        loss = sum(dict([(0.0, 0.0), *curves[n]])[s] for n, s in zip(names, combo, strict=True))
        best = loss if best is None else min(best, loss)
    return best


def test_sensitivity_targets_are_exact_and_no_worse_than_any_grid_choice():
    sizes = {"a": 100, "b": 100, "c": 200}
    curves = {
        "a": [(0.5, 0.01), (0.75, 0.02), (0.9, 0.3)],
        "b": [(0.5, 0.2), (0.75, 0.5), (0.9, 0.9)],
        "c": [(0.5, 0.0), (0.75, 0.05), (0.9, 0.1)],
    }
    budget = 0.75 * 400
    t = sensitivity_targets(sizes, curves, budget, {}).targets
    assert sum(sizes[n] * t[n] for n in sizes) == pytest.approx(budget, abs=1e-9)

    def predicted(name, s):  # piecewise linear between the scanned points
        pts = [(0.0, 0.0), *curves[name]]
        for (x1, y1), (x2, y2) in zip(pts, pts[1:], strict=False):
            if x1 <= s <= x2:
                return y1 + (y2 - y1) * (s - x1) / (x2 - x1)
        raise AssertionError(s)

    ours = sum(predicted(n, t[n]) for n in sizes)
    assert ours <= _brute_force(sizes, curves, budget, [0.0, 0.5, 0.75, 0.9]) + 1e-12
    assert t["b"] < t["a"] < t["c"]  # the most sensitive weight keeps most
    with pytest.raises(HParamsError, match="scan higher sparsities"):
        sensitivity_targets(sizes, curves, 0.95 * 400, {})
    with pytest.raises(HParamsError, match="does not cover"):
        sensitivity_targets({**sizes, "d": 10}, curves, budget, {})


def test_global_targets_rank_every_weight_when_keeping_the_small_ones_dense_is_impossible():
    # 99.9 % of 10050 elements is 10039.95 pruned: more than the 10000 of the big weight alone
    chosen = global_targets({"a": 50, "b": 10000}, ["a", "b"], 0.999 * 10050, {})
    assert chosen.joint == frozenset({"a", "b"}) and chosen.targets["a"] == pytest.approx(0.999)


def test_nothing_changes_for_a_sharded_style_model_without_allocation():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    assert Pruning(model, "target_sparsity=0.6").weight_targets() == {"0.weight": 0.6, "1.weight": 0.6}


curve_st = st.lists(st.floats(0.0, 5.0), min_size=1, max_size=5)


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=5),
    losses=st.data(),
    target=st.floats(0.0, 0.9),
)
def test_sensitivity_targets_average_exactly_and_stay_within_the_scan(sizes, losses, target):
    grid = [0.3, 0.6, 0.9, 0.95]
    named = {f"w{i}": n for i, n in enumerate(sizes)}
    curves = {n: [(s, losses.draw(st.floats(-1.0, 5.0))) for s in grid] for n in named}
    t = sensitivity_targets(named, curves, target * sum(sizes), {}).targets
    assert sum(named[n] * t[n] for n in named) == pytest.approx(target * sum(sizes), rel=1e-9, abs=1e-6)
    assert all(0.0 <= v <= 0.95 for v in t.values())


def test_lightning_and_the_callback_take_allocation_as_a_keyword():
    from lit_prune import PruningCallback

    callback = PruningCallback(allocation="erk", target_sparsity=0.9)
    assert callback.hparams.allocation == "erk"
    with pytest.raises(HParamsError, match="`allocation` must be one of"):
        PruningCallback(allocation="random")
