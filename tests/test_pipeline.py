"""The engine as a pipeline: plan, backends, reduce hook, state that follows its weights, deferred checks."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lit_prune import Pruning
from lit_prune.backends.cpu import kernels
from lit_prune.engine import checks
from lit_prune.engine.checks import DeferredCheck
from lit_prune.engine.thresholds import exact_threshold, histogram_threshold, joint_threshold

PACKAGE = Path(__file__).resolve().parents[1] / "lit_prune"


def _lengths() -> list[tuple[int, str, str, bool]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                size = node.end_lineno - node.lineno + 1
                out.append((size, str(path.relative_to(PACKAGE)), node.name, isinstance(node, ast.ClassDef)))
    return out


def test_no_function_is_longer_than_80_lines():
    long = [(n, f, name) for n, f, name, is_class in _lengths() if not is_class and n > 80]
    assert not long, long


def test_mask_update_fits_on_one_screen_and_pruning_stays_small():
    sizes = {name: n for n, f, name, _ in _lengths() if f == "engine/pruning.py"}
    assert sizes["mask_update"] <= 60
    assert sizes["Pruning"] <= 310


def test_the_engine_and_config_import_neither_lightning_nor_hydra():
    for folder in ("engine", "config", "backends"):
        for path in (PACKAGE / folder).rglob("*.py"):
            text = path.read_text()
            for banned in ("import lightning", "from lightning", "import hydra", "from hydra", "omegaconf"):
                assert banned not in text, (path, banned)


# ---------------------------------------------------------------------- the reduce hook
class CountingReducer:
    """A reducer that combines nothing but counts its collectives, as a sharded one would make them."""

    local = False

    def __init__(self) -> None:
        self.calls: list[str] = []

    def max_(self, values):
        self.calls.append("max")
        return values

    def sum_(self, values):
        self.calls.append("sum")
        return values


def test_whole_weights_are_never_reduced_across_processes():
    # A whole weight is the same on every process (one process, DDP): summing its counts over the
    # processes would count it once per process.  Only sharded weights go through the reducer.
    torch.manual_seed(0)
    reducer = CountingReducer()
    pruning = Pruning(nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 8)), sparsity=0.6, reducer=reducer)
    pruning.mask_update(1)
    pruning.apply_mask()
    assert reducer.calls == []
    assert all(g.reducer.local for g in pruning._plan.groups)


def test_the_backend_choice_is_logged_with_its_reason(caplog):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8).double())
    with caplog.at_level(logging.DEBUG, logger="lit_prune.backends.choose"):
        Pruning(model, sparsity=0.5).mask_update(1)
    text = caplog.text
    assert "1.weight (elementwise): torch backend, not a contiguous float32 CPU weight" in text
    assert "0.weight (elementwise): " + ("cpu backend, native kernels fit" if kernels.available() else "torch") in text


def test_the_kernels_are_not_built_when_no_weight_could_use_them(monkeypatch):
    def refuse() -> bool:
        raise AssertionError("the kernels were asked for")

    monkeypatch.setattr(kernels, "available", refuse)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)).to(torch.float64)  # as a model on an accelerator
    pruning = Pruning(model, "threshold_method=exact", sparsity=0.5)
    pruning.mask_update(1)
    pruning.apply_mask()
    assert pruning.get_weight_sparsity()["0.weight"] == 0.5


# ---------------------------------------------------------------------- joint ranking without concatenation
@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=4),
    sparsity=st.floats(0.0, 0.99),
    nbins=st.sampled_from([4, 255, 256, 1000]),
    seed=st.integers(0, 1000),
    zeros=st.floats(0.0, 0.9),
)
def test_joint_thresholds_equal_those_of_the_concatenated_scores(sizes, sparsity, nbins, seed, zeros):
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(n, generator=g).abs() * (torch.rand(n, generator=g) >= zeros) for n in sizes]
    whole = torch.cat(parts)
    assert torch.equal(
        joint_threshold(parts, sparsity, "histogram", nbins), histogram_threshold(whole, sparsity, nbins)
    )
    assert torch.equal(
        joint_threshold(parts, sparsity, "histogram", nbins),
        histogram_threshold(whole, sparsity, nbins, sort_count=True),
    )
    assert torch.equal(joint_threshold(parts, sparsity, "exact"), exact_threshold(whole, sparsity, static=True))


# ---------------------------------------------------------------------- state follows its weight
@pytest.mark.parametrize("option", ["first_order_gradient", "second_order_gradient"])
def test_the_saliency_state_follows_its_weight_to_another_device(option):
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    pruning = Pruning(model, {"prune_option": option, "threshold_method": "exact"}, sparsity=0.5)
    model.to_empty(device="cpu")  # as Lightning moves a model set up elsewhere to its device
    for layer in model:
        layer.reset_parameters()
    pruning.mask_update(1)
    pruning.mask_update(2)
    for name, mask in pruning.get_masks().items():
        assert mask.float().mean().item() == 0.5, name
    state = pruning.state_dict()["saliency"]["0.weight"]
    assert all(t.device.type == "cpu" for t in state.values()) and state["old_weight"].abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("option", ["weight", "first_order_gradient"])
def test_state_bound_on_the_cpu_follows_the_model_to_cuda(option):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    reference = Pruning(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8)), {"prune_option": option}, sparsity=0.5)
    reference.model.load_state_dict(model.state_dict())
    pruning = Pruning(model, {"prune_option": option}, sparsity=0.5)
    model.cuda()
    pruning.mask_update(1)
    reference.mask_update(1)
    pruning.apply_mask()
    for name, mask in pruning.get_masks().items():
        assert mask.device.type == "cuda"
        assert torch.equal(mask.cpu(), reference.get_masks()[name]), name
        assert torch.equal(pruning.get_thresholds()[name].cpu(), reference.get_thresholds()[name]), name


# ---------------------------------------------------------------------- deferred NaN checks
class FakeEvent:
    """An event whose copy 'arrives' only when synchronised, as on a busy device."""

    def __init__(self) -> None:
        self.recorded = self.synchronized = False

    def record(self) -> None:
        self.recorded = True

    def query(self) -> bool:
        return self.synchronized

    def synchronize(self) -> None:
        self.synchronized = True


def test_the_deferred_check_reads_the_flags_only_after_its_event(monkeypatch):
    event = FakeEvent()
    monkeypatch.setattr(checks, "_event_for", lambda device: event)
    check = DeferredCheck()
    check.queue(torch.tensor([True, False]), step=4, names=["a", "b"])
    assert event.recorded
    check.raise_if_failed(wait=False)  # not arrived: nothing read, nothing raised
    assert not event.synchronized
    with pytest.raises(FloatingPointError, match=r"\['b'\] at the mask update of step 4"):
        check.raise_if_failed(wait=True)
    assert event.synchronized
    check.raise_if_failed()  # reported once


def test_a_device_without_events_copies_the_flags_blocking(monkeypatch):
    monkeypatch.setattr(checks, "_event_for", lambda device: None)
    copies = []
    real = torch.Tensor.copy_
    monkeypatch.setattr(
        torch.Tensor,
        "copy_",
        lambda self, src, non_blocking=False: copies.append(non_blocking) or real(self, src, non_blocking),
    )
    check = DeferredCheck()
    check.queue(torch.tensor([True]), step=1, names=["a"])
    assert copies == [False]
    check.raise_if_failed(wait=False)


def test_events_exist_for_cuda_and_the_generic_event_api():
    assert checks._event_for(torch.device("cpu")) is None
    if torch.cuda.is_available():
        assert checks._event_for(torch.device("cuda")) is not None


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 2000), min_size=1, max_size=3),
    seed=st.integers(0, 1000),
    zeros=st.floats(0.0, 0.9),
    where=st.floats(0.0, 1.0),
)
def test_the_kth_score_by_counts_equals_kthvalue(sizes, seed, zeros, where):
    from lit_prune.engine.thresholds import kth_smallest_by_counts

    g = torch.Generator().manual_seed(seed)
    parts = [(torch.randn(n, generator=g) * 100).abs() * (torch.rand(n, generator=g) >= zeros) for n in sizes]
    whole = torch.cat(parts)
    rank = max(1, round(where * whole.numel()))
    assert torch.equal(kth_smallest_by_counts(parts, rank), torch.kthvalue(whole, rank).values)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.97])
def test_the_accelerator_exact_rule_equals_the_cpu_one(monkeypatch, sparsity):
    from lit_prune.engine import thresholds

    g = torch.Generator().manual_seed(1)
    parts = [torch.randn(n, generator=g).abs() for n in (70_000, 3, 500)]
    on_cpu = thresholds.exact_threshold(parts, sparsity)
    monkeypatch.setattr(thresholds, "_host_values_are_free", lambda t: False)  # as on an accelerator
    assert torch.equal(thresholds.exact_threshold(parts, sparsity), on_cpu)
    assert torch.equal(thresholds.exact_threshold(torch.cat(parts), sparsity, static=True), on_cpu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "spec",
    ["threshold_method=histogram", "threshold_method=exact", "nm_sparsity=2:4", "global_ranking=true"],
)
def test_a_cuda_update_makes_no_host_synchronisation(spec):
    model = nn.Sequential(nn.Linear(512, 1024), nn.Linear(1024, 256)).cuda()
    pruning = Pruning(model, spec, sparsity=0.5)
    pruning.mask_update(1)  # the first builds the plan
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pruning.mask_update(2)
        pruning.apply_mask()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
