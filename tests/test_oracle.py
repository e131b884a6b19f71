"""HALCON-style structured pruning: exact oracle, Taylor scores, exact surgery, bad requests.

Run: pytest tests/test_oracle.py
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lit_prune.engine.layers import MaskedConv2d, MaskedLinear
from lit_prune.oracle import (
    OraclePruning,
    StructuredPruningError,
    add_dl_pruning_batch,
    create_dl_pruning,
    gen_dl_pruned_model,
    get_dl_pruning_param,
    set_dl_pruning_param,
)
from lit_prune.oracle.scores import _gate_hooks, exact_oracle, spearman
from lit_prune.oracle.surgery import (
    ModelInputs,
    build_groups,
    count_macs_and_params,
    prune_groups,
    resize_to_state_dict,
)


class ResNetLike(nn.Module):
    """conv-BN-ReLU stem, a residual block, a depthwise conv, a strided conv, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.dw, self.bdw = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        x = torch.relu(x + y)
        x = torch.relu(self.bdw(self.dw(x)))
        x = torch.relu(self.b3(self.c3(x)))
        return self.fc(x.mean((2, 3)))


def data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].sum((1, 2)) > 0).long() + 2 * (x[:, 0, 4:].sum((1, 2)) > 0).long()
    return x, y


def trained(seed=0, steps=60):
    torch.manual_seed(seed)
    model = ResNetLike()
    x, y = data(256, seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def masked_output(model, handle, x):
    """The original model's output with every removed channel zeroed in all tensors that carry it."""
    gates = {}
    for group in handle.groups:
        mask = torch.ones(group.channels)
        mask[handle.removed[group.name]] = 0
        gates.update(dict.fromkeys(group.gates, mask))
    hooks = _gate_hooks(model, gates)
    try:
        return model(x)
    finally:
        for h in hooks:
            h.remove()


def test_groups_follow_the_residual_and_depthwise_coupling():
    _, groups = build_groups(ResNetLike(), torch.randn(1, 1, 8, 8))
    by_name = {g.name: g for g in groups}
    assert sorted(by_name) == ["c1", "c3", "stem"]
    assert set(by_name["stem"].convs) == {"stem", "c2", "dw"}  # residual add + depthwise share channels
    assert set(by_name["stem"].gates) == {"bn", "b2", "bdw"}
    assert by_name["c3"].channels == 12


def test_surgery_keeps_the_training_mode():
    model = ResNetLike().train()
    prune_groups(model, torch.randn(1, 1, 8, 8), {"c1": [0, 1]})
    assert model.training and all(m.training for m in model.modules())
    assert model.c1.out_channels == 6


def test_exact_oracle_equals_the_loss_change_of_physical_removal():
    model = trained()
    x, y = data(64, seed=1)
    _, groups = build_groups(model, x[:1])
    deltas = exact_oracle(model, groups, (x, y), nn.functional.cross_entropy)
    with torch.no_grad():
        base = nn.functional.cross_entropy(model(x), y)
    for group in groups:
        for k in (0, group.channels - 1):
            smaller = copy.deepcopy(model)
            prune_groups(smaller, x[:1], {group.name: [k]})
            with torch.no_grad():
                removed = nn.functional.cross_entropy(smaller(x), y)
            assert deltas[group.name][k].item() == pytest.approx((removed - base).item() * len(x), abs=1e-4)


def test_taylor_scores_rank_correlate_with_the_oracle():
    """Over several trained nets Taylor ranks kernels like the oracle, far better than chance.

    One tiny net is too noisy to judge by (per net the mean Spearman ran from -0.08 to 0.70 on one
    machine, and trained weights differ between CPUs), so the test averages six.
    """
    taylor_corr, random_corr = [], []
    for seed in range(6):
        model = trained(seed)
        x, y = data(256, seed=100 + seed)
        taylor = OraclePruning(model, "oracle", {"normalize": False})
        oracle = OraclePruning(model, "oracle", {"score": "exact", "normalize": False})
        for batch in zip(x.split(64), y.split(64), strict=True):
            taylor.add_batch(batch)
            oracle.add_batch(batch)
        t, o = taylor.scores(), oracle.scores()
        rand = OraclePruning(model, "oracle", {"score": "random", "normalize": False}, example_inputs=x[:1]).scores()
        taylor_corr += [spearman(t[name], o[name]) for name in t]
        random_corr += [spearman(rand[name], o[name]) for name in t]
    taylor_mean = sum(taylor_corr) / len(taylor_corr)
    random_mean = sum(random_corr) / len(random_corr)
    assert taylor_mean > 0.25, taylor_corr
    assert taylor_mean > random_mean + 0.2, (taylor_corr, random_corr)


def test_surgery_is_exact_and_the_pruned_model_is_plain():
    model = trained()
    x, y = data(32, seed=3)
    handle = create_dl_pruning(model, "oracle", {"percentage": 40})
    add_dl_pruning_batch(model, handle, (x, y))
    pruned = gen_dl_pruned_model(model, handle)
    assert get_dl_pruning_param(handle, "pruned_kernel_num") == round(0.4 * 28)
    assert get_dl_pruning_param(handle, "pruned_percentage") == pytest.approx(100 * 11 / 28)
    # the masked original (removed channels' gates zeroed) gives the pruned model's outputs
    with torch.no_grad():
        assert torch.allclose(pruned(x), masked_output(model, handle, x), atol=1e-5)
    # consistent shapes through the residual add and the depthwise conv
    assert pruned.stem.out_channels == pruned.c2.out_channels == pruned.dw.out_channels == pruned.dw.groups
    assert pruned.c1.in_channels == pruned.stem.out_channels and pruned.bn.num_features == pruned.stem.out_channels
    assert get_dl_pruning_param(handle, "num_params_pruned") < get_dl_pruning_param(handle, "num_params")
    assert get_dl_pruning_param(handle, "macs_pruned") < get_dl_pruning_param(handle, "macs")
    assert type(pruned) is ResNetLike and isinstance(pruned.c1, nn.Conv2d)
    assert sum(p.numel() for p in model.parameters()) > sum(p.numel() for p in pruned.parameters())  # original intact


def test_handle_parameters():
    model = trained(steps=1)
    handle = create_dl_pruning(model, "oracle", {"percentage": 20, "score": "l1"})
    set_dl_pruning_param(handle, "percentage", 30)
    assert get_dl_pruning_param(handle, "percentage") == 30.0
    assert get_dl_pruning_param(handle, "mode") == "oracle"
    with pytest.raises(StructuredPruningError, match="add a batch"):
        handle.get_param("prunable_kernel_num")
    handle.add_batch({"image": data(8)[0], "label": data(8)[1]})
    assert handle.get_param("prunable_conv_num") == 3
    assert handle.get_param("prunable_conv_layer_name") == ["stem", "c1", "c3"]
    assert handle.get_param("prunable_kernel_num") == 28
    assert handle.get_param("scored_samples") == 8
    with pytest.raises(StructuredPruningError, match="known after gen_pruned_model"):
        handle.get_param("pruned_kernel_num")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: create_dl_pruning(m, "taylor"), r"`mode` must be one of \['oracle'\], got 'taylor'"),
        (lambda m: create_dl_pruning(m, "oracle", {"percentage": 0}), r"`percentage` must be a number in \(0, 100\)"),
        (lambda m: create_dl_pruning(m, "oracle", {"percentage": 100}), r"`percentage` must be a number in \(0, 100\)"),
        (lambda m: create_dl_pruning(m, "oracle", {"percentage": "10"}), r"`percentage` must be a number"),
        (lambda m: create_dl_pruning(m, "oracle", {"percent": 10}), r"unknown pruning parameter 'percent'"),
        (lambda m: create_dl_pruning(m, "oracle", {"score": "apoz"}), r"`score` must be one of"),
        (lambda m: create_dl_pruning(m, "oracle", {"pruned_kernel_num": 3}), r"`pruned_kernel_num` is read-only"),
    ],
)
def test_bad_requests_fail_clearly(call, message):
    with pytest.raises(StructuredPruningError, match=message):
        call(ResNetLike())


def test_pruning_every_kernel_of_a_layer_fails_clearly():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32, 2))
    handle = create_dl_pruning(
        model, "oracle", {"percentage": 99, "score": "l1"}, example_inputs=torch.randn(1, 1, 8, 8)
    )
    with pytest.raises(StructuredPruningError, match="every convolution must keep at least one kernel"):
        handle.gen_pruned_model()


def test_unsupported_layers_fail_clearly():
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Flatten(), nn.Linear(8 * 36, 2))
    with pytest.raises(StructuredPruningError, match=r"`0` is a grouped convolution \(groups=2, not depthwise\)"):
        create_dl_pruning(grouped, "oracle", example_inputs=torch.randn(1, 4, 8, 8))
    no_conv = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    with pytest.raises(StructuredPruningError, match="no prunable convolution kernels"):
        create_dl_pruning(no_conv, "oracle", example_inputs=torch.randn(1, 1, 8, 8))
    with pytest.raises(StructuredPruningError, match="must be the model the pruning handle was created for"):
        add_dl_pruning_batch(nn.Linear(2, 2), create_dl_pruning(ResNetLike()), data(4))


def test_pruned_model_saves_and_loads_without_lit_prune(tmp_path):
    model = trained(steps=5)
    handle = OraclePruning(model, "oracle", {"percentage": 50})
    handle.add_batch(data(16))
    pruned = handle.gen_pruned_model()
    program = torch.export.export(pruned.eval(), (torch.randn(4, 1, 8, 8),))
    torch.export.save(program, tmp_path / "pruned.pt2")
    loaded = torch.export.load(tmp_path / "pruned.pt2").module()
    x = torch.randn(4, 1, 8, 8)
    assert torch.allclose(loaded(x), pruned(x), atol=1e-6)


class ConcatNet(nn.Module):
    """Two branches concatenated, then a 1x1 conv: channels map through the concat offsets."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1)
        self.mix = nn.Conv2d(10, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
        return self.fc(torch.relu(self.mix(y)).mean((2, 3)))


def test_concatenation_prunes_consistently():
    torch.manual_seed(0)
    model = ConcatNet().eval()
    x = torch.randn(8, 1, 8, 8)
    y = torch.randint(0, 3, (8,))
    handle = OraclePruning(model, "oracle", {"percentage": 50, "score": "l1"})
    handle.add_batch((x, y))
    pruned = handle.gen_pruned_model()
    removed = handle.removed
    assert pruned.a.out_channels == 6 - len(removed["a"]) and pruned.b.out_channels == 4 - len(removed["b"])
    assert pruned.mix.in_channels == pruned.a.out_channels + pruned.b.out_channels
    with torch.no_grad():
        assert torch.allclose(pruned(x), masked_output(model, handle, x), atol=1e-5)


def test_resize_to_state_dict_rebuilds_a_pruned_structure_from_its_shapes():
    model = trained(steps=5)
    handle = OraclePruning(model, "oracle", {"percentage": 50, "score": "l1"})
    handle.add_batch(data(16))
    pruned = handle.gen_pruned_model()
    fresh = ResNetLike()
    resized = resize_to_state_dict(fresh, pruned.state_dict())
    assert set(resized) == {"stem", "bn", "c1", "b1", "c2", "b2", "dw", "bdw", "c3", "b3", "fc"}
    fresh.load_state_dict(pruned.state_dict())  # strict: every shape matches now
    for name, module in pruned.named_modules():
        other = fresh.get_submodule(name)
        for attr in ("in_channels", "out_channels", "groups", "num_features", "in_features", "out_features"):
            assert getattr(other, attr, None) == getattr(module, attr, None), (name, attr)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), pruned.eval()(x))
    assert resize_to_state_dict(fresh, pruned.state_dict()) == []  # already that shape: nothing to do


def test_resize_to_state_dict_refuses_layers_it_cannot_resize():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(8))

    model = nn.Sequential(nn.Conv2d(1, 8, 3), Scale())
    with pytest.raises(StructuredPruningError, match=r"`1` \(Scale\) cannot be resized: gain \(8,\) -> \(6,\)"):
        state = {"0.weight": torch.zeros(6, 1, 3, 3), "0.bias": torch.zeros(6), "1.gain": torch.zeros(6)}
        resize_to_state_dict(model, state)


def test_surgery_resizes_the_masks_of_masked_layers():
    model = nn.Sequential(
        MaskedConv2d(1, 8, 3, padding=1), nn.ReLU(), MaskedConv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Flatten(), MaskedLinear(8 * 64, 3),
    )  # fmt: skip
    x = torch.randn(2, 1, 8, 8)
    prune_groups(model, x[:1], {"0": [1, 2], "2": [0]})
    assert model[0].mask.shape == model[0].weight.shape == (6, 1, 3, 3)
    assert model[2].mask.shape == model[2].weight.shape == (7, 6, 3, 3)
    assert model[5].mask.shape == model[5].weight.shape == (3, 7 * 64)
    assert all(bool(m.mask.all()) for m in (model[0], model[2], model[5]))
    assert model(x).shape == (2, 3)
    model[5].mask[0, 0] = False  # a magnitude mask that already prunes: its layer cannot lose inputs
    with pytest.raises(StructuredPruningError, match=r"`5` holds a mask `mask` that already prunes 1 weight"):
        prune_groups(model, x[:1], {"2": [0]})
    assert model[2].out_channels == 7  # refused before any change


class KeywordNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 6, 3, padding=1), nn.Linear(6, 3)

    def forward(self, pixels, *, scale=1.0, labels=None):
        logits = self.fc(torch.relu(self.conv(pixels * scale)).mean((2, 3)))
        return {"logits": logits, "loss": None if labels is None else nn.functional.cross_entropy(logits, labels)}


def test_tracing_takes_positional_and_keyword_inputs():
    model = KeywordNet()
    inputs = ModelInputs((torch.randn(1, 1, 8, 8),), {"scale": 2.0, "labels": torch.tensor([1])})
    _, groups = build_groups(model, inputs)
    assert [g.name for g in groups] == ["conv"]
    macs, params = count_macs_and_params(model, inputs)
    prune_groups(model, inputs, {"conv": [0, 5]})
    assert model.conv.out_channels == 4 and model.fc.in_features == 4
    assert count_macs_and_params(model, inputs)[1] < params
    assert ModelInputs.of({"pixels": torch.zeros(1, 1, 8, 8)}).kwargs.keys() == {"pixels"}
    assert len(ModelInputs.of((torch.zeros(1), torch.zeros(1))).args) == 2
