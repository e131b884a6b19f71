"""N:M semi-structured sparsity: masks worked out by hand, the checker, the schedule, export, CUDA = CPU."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_prune import (
    HParamsError,
    Pruning,
    PruningCallback,
    check_nm_sparse,
    is_nm_sparse,
    strip_pruning_vars,
    to_semi_structured,
)
from lit_prune.engine import nm
from lit_prune.engine.nm import nm_mask, nm_pruned_per_group

CUDA = torch.cuda.is_available()


# ---------------------------------------------------------------------------- masks by hand
def test_two_of_four_by_hand_with_ties():
    scores = torch.tensor(
        [
            [0.1, 0.4, 0.3, 0.2, 5.0, 5.0, 5.0, 1.0],  # plain; three-way tie: the earlier two are kept
            [0.0, 0.0, 0.0, 0.0, 2.0, 1.0, 2.0, 1.0],  # all tied; two pairs tied
        ]
    )
    expected = torch.tensor([[0, 1, 1, 0, 1, 1, 0, 0], [1, 1, 0, 0, 1, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(nm_mask(scores, 4, 2), expected)
    # 1 of 4 pruned (3:4): the lowest of each group goes; ties prune the later one
    assert torch.equal(
        nm_mask(scores, 4, 1), torch.tensor([[0, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 1, 1, 1, 0]], dtype=torch.bool)
    )
    assert nm_mask(scores, 4, 0).all()


def test_conv_kernel_groups_run_over_the_flattened_in_kh_kw_view():
    # [out=1, in=2, kh=1, kw=2]: the view is [1, 4], one group holding in0(k0, k1), in1(k0, k1)
    scores = torch.tensor([3.0, 1.0, 4.0, 2.0]).reshape(1, 2, 1, 2)
    assert torch.equal(nm_mask(scores, 4, 2).flatten(), torch.tensor([True, False, True, False]))
    scores = torch.arange(16.0).reshape(2, 2, 2, 2)  # rising in every group: the last two kept
    assert torch.equal(nm_mask(scores, 4, 2).reshape(-1, 4), torch.tensor([[False, False, True, True]] * 4))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 6),
    st.sampled_from([(1, 4), (2, 4), (2, 8), (4, 8), (1, 2)]),
    st.integers(1, 3),
    st.data(),
)
def test_nm_mask_keeps_the_highest_of_each_group(rows, nm, groups_per_row, data):
    n, m = nm
    values = data.draw(
        st.lists(
            st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0]),
            min_size=rows * m * groups_per_row,
            max_size=rows * m * groups_per_row,
        )
    )  # few values: many ties
    scores = torch.tensor(values).reshape(rows, m * groups_per_row)
    pruned = data.draw(st.integers(0, m - n))
    mask = nm_mask(scores, m, pruned)
    groups, kept = scores.reshape(-1, m), mask.reshape(-1, m)
    assert (kept.sum(1) == m - pruned).all()
    for g, k in zip(groups, kept, strict=True):
        if pruned and m - pruned:
            assert g[k].min() >= g[~k].max()
    assert is_nm_sparse(scores * mask, m - pruned, m)


def _kept_by_definition(groups: torch.Tensor, kept: int) -> torch.Tensor:
    """``[G, M]``: element i keeps if fewer than ``kept`` elements beat it (higher, or equal and earlier)."""
    me, other = groups[:, :, None], groups[:, None, :]  # [g, i, j]
    earlier = torch.arange(groups.shape[1])[None, :] < torch.arange(groups.shape[1])[:, None]  # j < i
    return ((other > me) | ((other == me) & earlier)).sum(2) < kept


@settings(max_examples=80, deadline=None)
@given(
    st.sampled_from([2, 4, 8]),
    st.sampled_from(["last", "first", "middle"]),
    st.integers(1, 3),
    st.integers(1, 5),
    st.integers(1, 64),
    st.data(),
)
def test_nm_mask_ranks_by_its_definition_wherever_the_input_dim_lies(m, where, groups, other, chunk, data):
    # Chunks of a few groups, the input dim first (HF Conv1D), last or in the middle: read in place,
    # ranked chunk by chunk; NaN beats nothing and is beaten by nothing (kept), as the compares give.
    shape, dim = {"last": ((other, m * groups), 1), "first": ((m * groups, other), 0)}.get(
        where, ((2, m * groups, other), 1)
    )
    pool = torch.tensor([0.0, 1.0, 2.0, 3.0] + ([float("nan")] if data.draw(st.booleans()) else []))  # many ties
    picks = data.draw(st.lists(st.integers(0, len(pool) - 1), min_size=math.prod(shape), max_size=math.prod(shape)))
    scores = pool[torch.tensor(picks)].reshape(shape)
    pruned = data.draw(st.integers(0, m))
    with mock.patch.object(nm, "_chunk_elements", lambda device: chunk):
        mask = nm_mask(scores, m, pruned, input_dims=dim)
    groups_view = scores.movedim(dim, -1).reshape(-1, m)
    assert torch.equal(mask.movedim(dim, -1).reshape(-1, m), _kept_by_definition(groups_view, m - pruned))


def test_pruned_per_group_follows_floor_m_s_up_to_the_target():
    assert [nm_pruned_per_group(4, s, 2) for s in (0.0, 0.24, 0.25, 0.49, 0.4999999, 0.5, 0.75)] == [
        0,
        0,
        1,
        1,
        2,
        2,
        2,
    ]
    assert [nm_pruned_per_group(8, s, 1) for s in (0.125, 0.5, 0.875, 0.99)] == [1, 4, 7, 7]


# ---------------------------------------------------------------------------- the checker
def test_checker_accepts_n_m_and_names_the_first_bad_group():
    ok = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    assert is_nm_sparse(ok, 2, 4)
    check_nm_sparse(ok, 2, 4, "fc.weight")
    bad = torch.tensor([[1.0, 0.0, 2.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    assert not is_nm_sparse(bad, 2, 4)
    with pytest.raises(ValueError, match=r"fc.weight is not 2:4 sparse: group 1 \(row 1, input elements 0..3\)"):
        check_nm_sparse(bad, 2, 4, "fc.weight")
    assert not is_nm_sparse(torch.zeros(2, 6), 2, 4)  # 6 does not divide by 4
    with pytest.raises(ValueError, match=r"conv.weight of shape \(2, 6\) cannot be 2:4"):
        check_nm_sparse(torch.zeros(2, 6), 2, 4, "conv.weight")


# ---------------------------------------------------------------------------- in the engine
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def test_schedule_takes_each_group_from_4_of_4_through_3_of_4_to_2_of_4():
    model = _mlp()
    spec = {
        "target_sparsity": 0.8,
        "sparsity_function_end_step": 100,
        "pruning_frequency": 10,
        "threshold_method": "exact",
        "nm_sparsity_map": ["^2[.]:2:4"],
    }
    pruning = Pruning(model, spec)
    seen = {}
    for step in range(0, 101, 10):
        before = model[2].weight.detach().abs().clone()
        if pruning.conditional_mask_update(step):
            s = pruning.weight_sparsities(step)["2.weight"]  # 0.8 * (1 - (1 - t/100)^3) * 0.5 / 0.8
            kept = pruning.get_masks()["2.weight"].reshape(-1, 4).sum(1)
            assert (kept == 4 - nm_pruned_per_group(4, s, 2)).all(), step
            seen[step] = int(kept[0])
    # s_w(t) = 0.5 * (1 - (1 - t/100)^3): 0.244 at t=20 (floor(4 * s) = 0), 0.329 at 30 (1), 0.5 only at 100
    assert [seen[t] for t in (10, 20, 30, 90, 100)] == [4, 4, 3, 3, 2]
    pruning.check_nm()
    assert is_nm_sparse(model[2].weight, 2, 4)
    assert pruning.get_weight_sparsity()["0.weight"].item() == pytest.approx(0.8, abs=0.01)  # unmapped: global
    recorded = pruning.get_thresholds()["2.weight"]  # the largest |w| pruned at the last update
    assert float(recorded) == float(before[~pruning.get_masks()["2.weight"]].max()) > 0


def test_weight_whose_input_does_not_divide_by_m_is_named():
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 4))
    with pytest.raises(HParamsError, match=r"weight '0.weight' of shape \(8, 6\) cannot be 2:4: .*in\*kh\*kw = 6"):
        Pruning(model, "nm_sparsity=2:4")
    pruning = Pruning(model, {"nm_sparsity_map": ["^1:1:4"], "threshold_method": "exact"}, sparsity=0.75)
    assert pruning.nm_weights() == {"1.weight": (1, 4)}
    pruning.mask_update(1)
    assert is_nm_sparse(model[1].weight, 1, 4) and pruning.get_masks()["1.weight"].sum() == 8


def test_nm_weights_stay_out_of_global_ranking_and_use_tpu_reads_nothing_back():
    model = _mlp()
    pruning = Pruning(model, {"nm_sparsity_map": ["^2:2:4"], "global_ranking": True}, sparsity=0.5)
    pruning.mask_update(1)
    assert is_nm_sparse(model[2].weight, 2, 4)
    meta = _mlp().to("meta")
    Pruning(meta, {"nm_sparsity_map": ["^2:2:4"], "use_tpu": True}, sparsity=0.5).mask_update(1)


# ---------------------------------------------------------------------------- in a fit, and export
class Net(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(256, 16, generator=g)
        self.y = (self.x[:, :4].argmax(1)) % 4

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=16)


def _fit(max_steps, tmp_path):
    seed_everything(0)
    model = Net()
    cb = PruningCallback(
        nm_sparsity_map=["net.[02].weight:2:4"],
        target_sparsity=0.8,
        begin_pruning_step=5,
        pruning_frequency=5,
        sparsity_function_begin_step=5,
        sparsity_function_end_step=40,
    )
    Trainer(
        max_steps=max_steps,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    ).fit(model)
    return model, cb


def test_fit_reaches_2_of_4_and_exports_only_then(tmp_path):
    model, cb = _fit(48, tmp_path)
    for name in ("net.0.weight", "net.2.weight"):
        assert is_nm_sparse(dict(model.named_parameters())[name], 2, 4), name
    assert cb.get_weight_sparsity()["net.4.weight"].item() == pytest.approx(0.8, abs=0.02)
    state = cb.stripped_state_dict(model)
    assert is_nm_sparse(state["net.2.weight"], 2, 4)

    early, early_cb = _fit(12, tmp_path / "early")  # mid-schedule: 3:4 at best
    with pytest.raises(ValueError, match=r"net.0.weight is not 2:4 sparse"):
        early_cb.stripped_state_dict(early)


def test_semi_structured_export_errors_are_clear_off_gpu():
    model = _mlp()
    pruning = Pruning(model, {"nm_sparsity_map": ["^2:2:4"]}, sparsity=0.5)
    pruning.mask_update(1)
    if not CUDA:
        with pytest.raises(ValueError, match=r"2.weight is on cpu: 2:4 sparse kernels need a CUDA GPU"):
            strip_pruning_vars(model, pruning, semi_structured=True)
    with pytest.raises(ValueError, match="found no nn.Linear weight pruned 2:4"):
        strip_pruning_vars(model, None, semi_structured=True)
    with pytest.raises(ValueError, match=r"0.weight is (on cpu|torch.float32).*4.weight"):
        to_semi_structured(model)  # every Linear by default; all problems listed
    with pytest.raises(ValueError, match=r"0.bias is not an nn.Linear weight"):
        to_semi_structured(model, ["0.bias"])


# ---------------------------------------------------------------------------- CUDA = CPU
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "spec",
    [
        "threshold_method=histogram",
        "threshold_method=exact",
        "threshold_method=histogram,block_height=2,block_width=4",
        "threshold_method=exact,block_height=4,block_width=1,block_pooling_function=MAX",
        "threshold_method=histogram,use_tpu=true",
        "nm_sparsity=2:4",
    ],
)
def test_cuda_masks_equal_cpu_masks_bit_for_bit(spec):
    torch.manual_seed(0)
    cpu = nn.Sequential(nn.Linear(512, 1024), nn.Linear(1024, 256), nn.Linear(256, 64))
    gpu = nn.Sequential(nn.Linear(512, 1024), nn.Linear(1024, 256), nn.Linear(256, 64)).cuda()
    gpu.load_state_dict(cpu.state_dict())
    p_cpu, p_gpu = Pruning(cpu, spec, sparsity=0.7), Pruning(gpu, spec, sparsity=0.7)
    torch.use_deterministic_algorithms(True)
    try:
        p_cpu.mask_update(1)
        p_gpu.mask_update(1)
    finally:
        torch.use_deterministic_algorithms(False)
    for name, mask in p_cpu.get_masks().items():
        assert torch.equal(p_gpu.get_masks()[name].cpu(), mask), name
        assert torch.equal(p_gpu.get_thresholds()[name].cpu(), p_cpu.get_thresholds()[name]), name


@pytest.mark.skipif(
    not CUDA or torch.cuda.get_device_capability() < (8, 0), reason="needs a CUDA GPU of compute capability 8.0+"
)
def test_semi_structured_export_matches_the_masked_dense_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).cuda().half()
    pruning = Pruning(model, "nm_sparsity=2:4", sparsity=0.5)
    pruning.mask_update(1)
    sparse = strip_pruning_vars(model, pruning, semi_structured=True)
    x = torch.randn(128, 256, device="cuda", dtype=torch.half)
    with torch.inference_mode():
        assert torch.allclose(sparse(x), model(x), atol=2e-2, rtol=2e-2)
