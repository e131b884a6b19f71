"""The Pruning object over real modules: TF's end-to-end sequences, regex maps, state, saliency.

Run: pytest tests/test_pruning.py
"""

import io

import pytest
import torch
from torch import nn

from lit_prune import HParamsError, MaskedLinear, Pruning, PruningHParams
from lit_prune.backends.cpu import kernels as cpu_kernels


class Vector(nn.Module):
    """One weight holding given values (TF's test fixtures are single variables)."""

    def __init__(self, values):
        super().__init__()
        self.weight = nn.Parameter(torch.as_tensor(values, dtype=torch.float32).clone())


class Named(nn.Module):
    def __init__(self, **params):
        super().__init__()
        for module_name, (param_name, values) in params.items():
            sub = nn.Module()
            sub.register_parameter(param_name, nn.Parameter(torch.as_tensor(values, dtype=torch.float32).clone()))
            self.add_module(module_name, sub)


def run_steps(pruning, steps):
    kept = []
    for t in steps:
        pruning.conditional_mask_update(t)
        kept.append(int(next(iter(pruning.get_masks().values())).sum()))
    return kept


@pytest.mark.parametrize(
    ("method", "kept", "thresholds"),
    [
        (
            "exact",
            [756, 561, 409, 294, 213, 158, 124, 107, 101, 100],
            [245, 440, 592, 707, 788, 843, 877, 894, 900, 901],
        ),
        ("histogram", [758, 563, 411, 297, 215, 161, 125, 110, 102, 102], None),
    ],
)
def test_end_to_end_tf_sequence(method, kept, thresholds):
    model = Vector(torch.linspace(1, 1000, 1000))
    hp = PruningHParams(
        end_pruning_step=100,
        sparsity_function_end_step=100,
        target_sparsity=0.9,
        threshold_method=method,
        prune_patterns=["weight"],
    )
    pruning = Pruning(model, hp)
    seen_kept, seen_thr = [], []
    for t in range(0, 111):
        if pruning.conditional_mask_update(t):
            seen_kept.append(int(pruning.get_masks()["weight"].sum()))
            seen_thr.append(pruning.get_thresholds()["weight"].item())
    assert seen_kept == kept
    if thresholds:
        assert seen_thr == pytest.approx(thresholds)
    assert pruning.last_update_step == 100
    # pruned weights are exactly zero, kept ones untouched
    w, m = model.weight.detach(), pruning.get_masks()["weight"]
    assert (w[~m] == 0).all() and torch.equal(w[m], torch.linspace(1, 1000, 1000)[m])


def test_external_sparsity_with_tf_gating():
    # upstream pruning_test: freq 2, begin 1, end 6, sparsity linspace(0, 0.9, 10)[t]
    model = Vector(torch.linspace(1, 100, 100))
    schedule = torch.linspace(0, 0.9, 10).tolist()
    hp = PruningHParams(begin_pruning_step=1, end_pruning_step=6, pruning_frequency=2, prune_patterns=["weight"])
    pruning = Pruning(model, hp.replace(threshold_method="exact"), sparsity=lambda t: schedule[t])
    assert run_steps(pruning, range(10)) == [100, 100, 80, 80, 60, 60, 40, 40, 40, 40]


def test_constant_external_sparsity():
    pruning = Pruning(
        Vector(torch.linspace(1, 100, 100)), "prune_patterns=[weight],threshold_method=exact", sparsity=0.3
    )
    pruning.mask_update(0)
    assert int(pruning.get_masks()["weight"].sum()) == 70


def _three_layers():
    lin = torch.linspace(1, 100, 100)
    return Named(layer1=("weights", lin), layer2=("weights", lin), layer3=("kernel", lin))


def _sparsities_after_tf_map_run(**spec):
    """TF's per-weight-sparsity test: begin 1, frequency 1, end 100, 110 steps on fixed weights."""
    hp = PruningHParams(
        begin_pruning_step=1, pruning_frequency=1, end_pruning_step=100, threshold_method="exact", **spec
    )
    pruning = Pruning(_three_layers(), hp)
    for t in range(110):
        pruning.conditional_mask_update(t)
    return {k: round(float(v), 4) for k, v in pruning.get_weight_sparsity().items()}


def test_weight_sparsity_map_regex():
    sparsity = _sparsities_after_tf_map_run(
        prune_patterns=["weights", "kernel"],
        weight_sparsity_map=["layer1:0.6", r"layer2\.weights:0.75", ".*kernel:0.6"],
    )
    assert sparsity == {"layer1.weights": 0.6, "layer2.weights": 0.75, "layer3.kernel": 0.6}


def test_unmapped_weights_follow_the_global_target():
    sparsity = _sparsities_after_tf_map_run(prune_patterns=["layer[12]"], weight_sparsity_map=[r"layer2\.weights:0.75"])
    assert list(sparsity.values()) == [0.5, 0.75]


def test_weight_matched_twice_is_an_error():
    hp = PruningHParams(prune_patterns=["weights"], weight_sparsity_map=["layer:0.6", "layer1.w:0.7"])
    with pytest.raises(HParamsError, match=r"multiple matches in `weight_sparsity_map` for weight 'layer1.weights'"):
        Pruning(_three_layers(), hp)


def test_map_entry_matching_nothing_lists_candidates():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2))
    with pytest.raises(HParamsError, match=r"'conv9' matches no pruned weight; candidates: \[0.weight, 2.weight\]"):
        Pruning(model, PruningHParams(weight_sparsity_map=["conv9:0.5"]))
    with pytest.raises(HParamsError, match=r"`block_dims_map` entry 'bias' matches no pruned weight"):
        Pruning(model, PruningHParams(block_dims_map=["bias:2x2"]))
    with pytest.raises(HParamsError, match=r"`prune_patterns` entry 'nope' matches no parameter"):
        Pruning(model, PruningHParams(prune_patterns=["nope"]))
    with pytest.raises(HParamsError, match=r"`exclude_patterns` entry 'nope' matches no pruned weight"):
        Pruning(model, PruningHParams(exclude_patterns=["nope"]))
    with pytest.raises(HParamsError, match=r"no weight to prune"):
        Pruning(model, PruningHParams(exclude_patterns=["weight"]))


def test_default_selection_skips_biases_and_norms():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.LazyLinear(3) if False else nn.Linear(4, 3),
        nn.LayerNorm(3),
        nn.Embedding(5, 3),
        nn.LSTM(3, 3, num_layers=2),
    )
    names = Pruning(model).weight_names
    assert names == [
        "0.weight",
        "3.weight",
        "5.weight",
        "6.weight_ih_l0",
        "6.weight_hh_l0",
        "6.weight_ih_l1",
        "6.weight_hh_l1",
    ]


def test_block_dims_map_per_weight():
    model = Named(
        layer1=("weights", [[-0.1, 0.1], [-0.2, 0.2]]), layer2=("weights", [[0.1, 0.1, 0.3, 0.3], [0.2, 0.2, 0.4, 0.4]])
    )
    hp = PruningHParams(
        prune_patterns=["weights"],
        block_dims_map=["layer1:1x1", "layer2:1x2"],
        threshold_method="exact",
        block_height=2,
        block_width=2,
    )
    pruning = Pruning(model, hp, sparsity=0.5)
    pruning.mask_update(0)
    masks = pruning.get_masks()
    assert masks["layer1.weights"].int().tolist() == [[0, 0], [1, 1]]
    assert masks["layer2.weights"].int().tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]


def test_apply_mask_zeroes_exactly_and_only_pruned():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pruning = Pruning(model, PruningHParams(), sparsity=0.8)
    pruning.mask_update(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # an optimizer step moves everything
    pruning.apply_mask()
    for name, mask in pruning.get_masks().items():
        w = dict(model.named_parameters())[name].detach()
        assert (w[~mask] == 0).all()
        assert torch.equal(w[mask], before[name][mask] + 1.0)
    assert torch.equal(model[0].bias.detach(), before["0.bias"] + 1.0)  # biases untouched


def test_getters_are_keyed_by_parameter_name():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), MaskedLinear(4, 2))
    pruning = Pruning(model, PruningHParams(threshold_method="exact"), sparsity=0.5)
    pruning.mask_update(0)
    names = ["0.weight", "2.weight"]
    for getter in ("get_masks", "get_thresholds", "get_weights", "get_masked_weights", "get_weight_sparsity"):
        assert list(getattr(pruning, getter)()) == names
    assert pruning.get_masks()["2.weight"] is model[2].mask  # masked layers' own buffers are used
    assert pruning.get_thresholds()["2.weight"] is model[2].threshold
    assert pruning.get_masks()["0.weight"].dtype == torch.bool
    assert float(pruning.model_sparsity()) == pytest.approx(0.5)


def test_summaries_use_tf_tags():
    model = nn.Sequential(nn.Linear(4, 4))
    pruning = Pruning(model, PruningHParams(name="cifar10_pruning"))
    pruning.conditional_mask_update(10)
    tags = pruning.summaries()
    assert set(tags) == {
        "cifar10_pruning_summaries/sparsity",
        "cifar10_pruning_summaries/last_mask_update_step",
        "cifar10_pruning_summaries/0.weight/mask/sparsity",
        "cifar10_pruning_summaries/0.weight/threshold/threshold",
        "cifar10_pruning_summaries/0.weight/target_sparsity",
    }
    assert tags["cifar10_pruning_summaries/last_mask_update_step"] == 10
    assert tags["cifar10_pruning_summaries/sparsity"] == pytest.approx(0.1355, abs=1e-6)


def test_state_dict_round_trip_through_torch_save():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    hp = PruningHParams(threshold_decay=0.5, prune_option="second_order_gradient")
    pruning = Pruning(model, hp)
    pruning.conditional_mask_update(10)
    pruning.conditional_mask_update(20)
    buffer = io.BytesIO()
    torch.save(pruning.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = Pruning(model, hp)
    fresh.load_state_dict(state)
    assert fresh.last_update_step == 20
    for name in pruning.weight_names:
        assert torch.equal(fresh.get_masks()[name], pruning.get_masks()[name])
        assert torch.equal(fresh.get_thresholds()[name], pruning.get_thresholds()[name])
    # the same next update from both
    pruning.conditional_mask_update(30)
    fresh.conditional_mask_update(30)
    for name in pruning.weight_names:
        assert torch.equal(fresh.get_masks()[name], pruning.get_masks()[name])


def test_load_state_dict_rejects_mismatches():
    model = nn.Sequential(nn.Linear(4, 4))
    state = Pruning(model).state_dict()
    other = Pruning(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    with pytest.raises(ValueError, match=r"missing \['1.weight'\]"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        Pruning(model).load_state_dict({**state, "version": 0})
    bad = {**state, "masks": {"0.weight": torch.ones(2, 2, dtype=torch.bool)}}
    with pytest.raises(ValueError, match=r"mask of '0.weight' has shape \(2, 2\)"):
        Pruning(model).load_state_dict(bad)


def test_nan_weight_is_named_and_masks_untouched():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    pruning = Pruning(model, sparsity=0.5)
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"\['1.weight'\]"):
        pruning.mask_update(0)
    assert all(m.all() for m in pruning.get_masks().values())
    assert pruning.last_update_step == 0


def test_first_order_gradient_saliency_upstream_values():
    model = Vector(torch.linspace(1, 10, 10))
    pruning = Pruning(
        model,
        PruningHParams(prune_option="first_order_gradient", gradient_decay_rate=0.5, prune_patterns=["weight"]),
        sparsity=0.0,
    )
    pruning.mask_update(0)
    state = pruning.state_dict()["saliency"]["weight"]
    w = torch.linspace(1, 10, 10)
    assert torch.allclose(state["gradient"], 0.5 * w / w.norm())
    assert torch.equal(state["old_weight"], w)


def test_second_order_gradient_saliency_formula():
    model = Vector(torch.linspace(1, 10, 10))
    hp = PruningHParams(prune_option="second_order_gradient", gradient_decay_rate=0.5, prune_patterns=["weight"])
    pruning = Pruning(model, hp, sparsity=0.0)
    pruning.mask_update(0)  # g = 0.5 * n(w); old = w; oldold = 0
    with torch.no_grad():
        model.weight.mul_(2)
    pruning.mask_update(1)  # delta = |2w + 0 - 2w| = 0 -> g = 0.25 * n(w); oldold = w; old = 2w
    w = torch.linspace(1, 10, 10)
    state = pruning.state_dict()["saliency"]["weight"]
    assert torch.allclose(state["gradient"], 0.25 * w / w.norm())
    assert torch.equal(state["old_old_weight"], w) and torch.equal(state["old_weight"], 2 * w)


def test_gradient_saliency_prunes_by_weight_times_gradient():
    model = Vector([4.0, 3.0, 2.0, 1.0])
    hp = PruningHParams(
        prune_option="first_order_gradient",
        gradient_decay_rate=0.0,
        prune_patterns=["weight"],
        threshold_method="exact",
    )
    pruning = Pruning(model, hp, sparsity=0.5)
    pruning.mask_update(0)  # score = |w| * n(|w|) -> same ranking as |w|
    assert pruning.get_masks()["weight"].tolist() == [True, True, False, False]


def test_masks_follow_the_model_device():
    model = nn.Sequential(nn.Linear(4, 4))
    pruning = Pruning(model, sparsity=0.5)
    model.to(torch.float64)  # parameters replaced in dtype; masks stay bool and keep applying
    pruning.mask_update(0)
    pruning.apply_mask()
    assert pruning.get_masks()["0.weight"].dtype == torch.bool
    assert model[0].weight.dtype == torch.float64


def test_bad_external_sparsity():
    with pytest.raises(HParamsError, match=r"`sparsity` must be a float in \[0, 1\)"):
        Pruning(nn.Linear(2, 2), sparsity=1.5)
    pruning = Pruning(nn.Linear(2, 2), sparsity=lambda step: 2.0)
    with pytest.raises(HParamsError, match="external `sparsity` at step 0"):
        pruning.mask_update(0)


@pytest.mark.parametrize("method", ["histogram", "exact"])
@pytest.mark.parametrize("block", [(1, 1), (2, 2)])
def test_use_tpu_update_reads_nothing_back(method, block):
    # On the meta device any host read (.item(), .cpu(), bool()) raises: the update must not need one.
    model = nn.Sequential(nn.Linear(300, 300), nn.Linear(300, 10)).to("meta")
    hp = PruningHParams(use_tpu=True, threshold_method=method, block_height=block[0], block_width=block[1])
    pruning = Pruning(model, hp, sparsity=0.5)
    pruning.mask_update(0)
    pruning.apply_mask()
    with pytest.raises(Exception):  # noqa: B017 - the default path does read back (NaN check)
        Pruning(model, hp.replace(use_tpu=False), sparsity=0.5).mask_update(0)


@pytest.mark.parametrize("method", ["histogram", "exact"])
def test_per_weight_update_compiles_fullgraph(method):
    from lit_prune.engine.masks import compute_mask

    torch.manual_seed(0)
    w = torch.randn(300, 300).abs()  # above the CPU search threshold: compiled code must take the sync-free path
    compiled = torch.compile(compute_mask, fullgraph=True)
    threshold, mask, _ = compiled(w, torch.tensor(0.0), 0.5, method=method)
    eager_threshold, eager_mask, _ = compute_mask(w, torch.tensor(0.0), 0.5, method=method)
    assert torch.equal(mask, eager_mask) and threshold.item() == eager_threshold.item()


def test_global_ranking_matches_torch_global_unstructured():
    from torch.nn.utils import prune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 50), nn.ReLU(), nn.Linear(50, 30))
    with torch.no_grad():
        model[2].weight.mul_(5)  # layers of different scales end at different sparsities
    reference = nn.Sequential(nn.Linear(20, 50), nn.ReLU(), nn.Linear(50, 30))
    reference.load_state_dict(model.state_dict())
    prune.global_unstructured([(reference[0], "weight"), (reference[2], "weight")], prune.L1Unstructured, amount=0.6)
    pruning = Pruning(model, PruningHParams(global_ranking=True, threshold_method="exact"), sparsity=0.6)
    pruning.mask_update(0)
    assert torch.equal(pruning.get_masks()["0.weight"], reference[0].weight_mask.bool())
    assert torch.equal(pruning.get_masks()["2.weight"], reference[2].weight_mask.bool())
    assert float(pruning.model_sparsity()) == pytest.approx(0.6)
    s = pruning.get_weight_sparsity()
    assert s["0.weight"] > 0.9 and s["2.weight"] < 0.5
    thresholds = pruning.get_thresholds()
    assert thresholds["0.weight"].item() == thresholds["2.weight"].item()


def test_global_ranking_histogram_is_tf_rule_over_all_weights():
    import numpy as np
    from test_masks import _tf_histogram_reference  # tests/ is on sys.path under pytest

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(30, 40), nn.Linear(40, 20))
    pruning = Pruning(model, PruningHParams(global_ranking=True), sparsity=0.7)
    pruning.mask_update(0)
    scores = np.concatenate(
        [model[0].weight.detach().abs().numpy().ravel(), model[1].weight.detach().abs().numpy().ravel()]
    )
    assert pruning.get_thresholds()["0.weight"].item() == _tf_histogram_reference(scores, 0.7, 256)


def test_global_ranking_leaves_mapped_weights_their_own_target_and_refuses_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 50), nn.Linear(50, 30), nn.Linear(30, 10))
    hp = PruningHParams(
        global_ranking=True, threshold_method="exact", weight_sparsity_map=["^2:0.5"], target_sparsity=0.8
    )
    pruning = Pruning(model, hp)
    pruning.mask_update(100)  # the end of the schedule: every weight at its target
    assert float(pruning.get_weight_sparsity()["2.weight"]) == pytest.approx(0.5)
    joint = pruning.get_masks()["0.weight"].numel() + pruning.get_masks()["1.weight"].numel()
    kept = int(pruning.get_masks()["0.weight"].sum() + pruning.get_masks()["1.weight"].sum())
    # the joint share is solved again so that the average over all 2800 weights is 0.8: (2240 - 150) / 2500
    assert kept == round(joint * (1 - (0.8 * 2800 - 0.5 * 300) / 2500))
    assert float(pruning.model_sparsity()) == pytest.approx(0.8, abs=1e-3)
    with pytest.raises(HParamsError, match="`global_ranking` ranks weights element-wise"):
        Pruning(model, PruningHParams(global_ranking=True, block_height=2, block_width=2))


def test_tied_weight_is_pruned_once_under_its_first_name():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    model[2].weight = model[0].weight  # one parameter, two layers
    pruning = Pruning(model, PruningHParams(threshold_method="exact"), sparsity=0.5)
    assert pruning.weight_names == ["0.weight"]
    pruning.mask_update(0)
    assert model[2].weight is model[0].weight and int((model[2].weight == 0).sum()) == 32


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "eager"])
@pytest.mark.parametrize("blocks", [False, True], ids=["elementwise", "blocks"])
def test_an_update_applies_the_current_masks_before_it_ranks(monkeypatch, kernels, blocks):
    # An optimizer step moved pruned weights (here: far above every kept one); an update without a
    # preceding apply_mask still ranks them as the zeros the model uses, so they do not regrow.
    if not kernels:
        monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8))
    spec = PruningHParams(block_height=2 if blocks else 1, block_width=2 if blocks else 1)
    pruning = Pruning(model, spec, sparsity=0.5)
    pruning.mask_update(1)
    before = {k: m.clone() for k, m in pruning.get_masks().items()}
    with torch.no_grad():
        for name, w in pruning.get_weights().items():
            w[~before[name]] = 100.0
    pruning.mask_update(2)
    for name, w in pruning.get_weights().items():
        assert torch.equal(pruning.get_masks()[name], before[name]), name
        assert (w[~before[name]] == 0).all(), name


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "eager"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("blocks", [1, 4], ids=["elementwise", "blocks"])
def test_a_non_finite_pruned_weight_is_an_error_too(monkeypatch, kernels, bad, blocks):
    # Multiplying by the mask would keep it (Inf * 0 is NaN): the run has diverged either way.
    if not kernels:
        monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8))
    pruning = Pruning(model, PruningHParams(block_height=blocks, block_width=blocks), sparsity=0.5)
    pruning.mask_update(1)
    mask = pruning.get_masks()["0.weight"]
    with torch.no_grad():
        model[0].weight[~mask] = bad  # an optimizer step blew up the pruned weights only
    before = {k: v.clone() for k, v in pruning.get_masks().items()}
    with pytest.raises(FloatingPointError, match=r"\['0.weight'\] at step 2"):
        pruning.mask_update(2)
    assert all(torch.equal(before[k], v) for k, v in pruning.get_masks().items())
