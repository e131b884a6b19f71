"""Layer layouts: each layer type's input (reduction) dims, N:M along them, registration, clear errors."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from lit_prune import HParamsError, Pruning, is_nm_sparse, register_layer, strip_pruning_vars
from lit_prune.backends.cpu import kernels
from lit_prune.engine.layouts import weight_input_dims
from lit_prune.engine.nm import nm_mask
from lit_prune.engine.selection import candidate_weights


@pytest.mark.parametrize(
    ("module", "param", "dims"),
    [
        (nn.Linear(8, 4), "weight", (1,)),
        (nn.Bilinear(4, 8, 2), "weight", (1, 2)),
        (nn.Conv1d(4, 8, 3), "weight", (1, 2)),
        (nn.Conv2d(4, 8, 3), "weight", (1, 2, 3)),
        (nn.Conv3d(4, 8, 3), "weight", (1, 2, 3, 4)),
        (nn.ConvTranspose2d(4, 8, 3), "weight", (0,)),
        (nn.LSTM(4, 8, proj_size=2), "weight_ih_l0", (1,)),
        (nn.GRU(4, 8), "weight_hh_l0", (1,)),
        (nn.RNNCell(4, 8), "weight_ih", (1,)),
        (nn.MultiheadAttention(8, 2), "in_proj_weight", (1,)),
        (nn.MultiheadAttention(8, 2, kdim=4, vdim=4), "k_proj_weight", (1,)),
        (nn.Embedding(10, 4), "weight", ()),
        (nn.EmbeddingBag(10, 4), "weight", ()),
        (nn.LayerNorm(4), "weight", None),
        (nn.Linear(8, 4), "bias", None),
    ],
)
def test_input_dims_of_each_layer_type(module, param, dims):
    ndim = getattr(module, param).dim()
    assert weight_input_dims(module, param, ndim) == dims


def test_default_selection_is_unchanged_for_torch_layers():
    model = nn.ModuleDict(
        {
            "emb": nn.Embedding(10, 8),
            "lstm": nn.LSTM(8, 8),
            "mha": nn.MultiheadAttention(8, 2),
            "conv": nn.ConvTranspose1d(8, 4, 3),
            "norm": nn.LayerNorm(8),
        }
    )
    assert candidate_weights(model) == [
        "emb.weight",
        "lstm.weight_ih_l0",
        "lstm.weight_hh_l0",
        "mha.in_proj_weight",
        "mha.out_proj.weight",
        "conv.weight",
    ]


def test_groups_along_dim_0_equal_the_transposed_weights_groups():
    torch.manual_seed(0)
    scores = torch.rand(16, 6)  # [in, out]
    for pruned in (1, 2, 3):
        expected = nm_mask(scores.t().contiguous(), 4, pruned).t()
        assert torch.equal(nm_mask(scores, 4, pruned, input_dims=0), expected)
    deconv = torch.rand(8, 3, 2, 2)  # ConvTranspose2d [in, out, kh, kw]: groups along in only
    mask = nm_mask(deconv, 4, 2, input_dims=0)
    assert (mask.permute(1, 2, 3, 0).reshape(-1, 4).sum(1) == 2).all()


def test_conv_transpose_nm_runs_along_its_input_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(8, 4, 3), nn.Conv2d(4, 8, 1))
    pruning = Pruning(model, "nm_sparsity=2:4", sparsity=0.5)
    pruning.mask_update(1)
    pruning.check_nm()
    w = model[0].weight.detach()
    assert is_nm_sparse(w, 2, 4, input_dims=0)
    assert (w.permute(1, 2, 3, 0).reshape(-1, 4) != 0).sum(1).max() == 2


class KerasDense(nn.Module):
    """A user's layer storing its kernel [in, out], applied as x @ kernel."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(n_in, n_out))

    def forward(self, x):
        return x @ self.kernel


class Unregistered(KerasDense):
    pass


def test_registered_layer_is_selected_and_grouped_along_its_input_dim():
    torch.manual_seed(0)
    register_layer(KerasDense, {"kernel": 0})
    model = nn.Sequential(KerasDense(16, 6), nn.Linear(6, 4))
    pruning = Pruning(model, {"nm_sparsity_map": [r"^0\.:2:4"]}, sparsity=0.5)
    assert pruning.weight_names == ["0.kernel", "1.weight"]
    pruning.mask_update(1)
    assert (model[0].kernel.t().reshape(-1, 4) != 0).sum(1).max() == 2
    plain = strip_pruning_vars(model, pruning)
    assert torch.equal(plain[0].kernel, model[0].kernel)


def test_register_by_name_without_importing():
    register_layer(f"{__name__}.Unregistered", {"kernel": 0}, prune_by_default=False)
    assert weight_input_dims(Unregistered(8, 4), "kernel", 2) == (0,)
    assert candidate_weights(nn.Sequential(Unregistered(8, 4))) == []


def test_nm_on_an_unknown_layout_names_the_weight_and_how_to_register():
    class Mine(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8))

    with pytest.raises(HParamsError, match=r"N:M on weight '0\.w' .*layout of its layer .*Mine is not known.*"
                       r"lit_prune\.register_layer\(Mine, \{'w': <input dim>\}\)"):  # fmt: skip
        Pruning(nn.Sequential(Mine()), {"prune_patterns": [r"\.w$"], "nm_sparsity": "2:4"})
    Pruning(nn.Sequential(Mine()), {"prune_patterns": [r"\.w$"]})  # element-wise needs no layout


def test_nm_on_an_embedding_is_refused_but_a_tied_head_gives_its_dims():
    emb = nn.Embedding(16, 8)
    with pytest.raises(HParamsError, match=r"N:M on weight '0\.weight' of 0 \(Embedding\): an embedding table has no"):
        Pruning(nn.Sequential(emb, nn.Linear(8, 4)), "nm_sparsity=2:4")
    head = nn.Linear(8, 16, bias=False)
    head.weight = emb.weight  # tied, as GPT-2's wte and lm_head
    model = nn.Sequential(emb, head)
    pruning = Pruning(model, "nm_sparsity=2:4", sparsity=0.5)
    assert pruning.nm_weights() == {"0.weight": (2, 4)}
    pruning.mask_update(1)
    assert model[1].weight is model[0].weight and is_nm_sparse(model[1].weight, 2, 4)


@pytest.mark.parametrize(
    ("layer_type", "dims", "error", "message"),
    [
        ("Conv1D", 0, ValueError, r"give a class, or its full name as 'package.module.ClassName'"),
        (nn.Linear(2, 2), 0, TypeError, r"layer type must be an nn.Module subclass"),
        (KerasDense, {"kernel": (0, 2)}, ValueError, r"parameter 'kernel': input dims must be an int, a tuple of"),
        (KerasDense, {"kernel": "0"}, ValueError, r"got '0'"),
        (KerasDense, {"kernel": slice(0, 2)}, ValueError, r"must be slice\(d, None\)"),
        (KerasDense, {}, ValueError, r"is empty"),
    ],
)
def test_bad_registrations_say_what_is_accepted(layer_type, dims, error, message):
    with pytest.raises(error, match=message):
        register_layer(layer_type, dims)


def test_the_cpu_kernels_take_trailing_input_dims_and_leave_dim_0_to_torch(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose1d(8, 4, 1), nn.Linear(8, 8))
    with caplog.at_level(logging.DEBUG, logger="lit_prune.backends.choose"):
        pruning = Pruning(model, {"nm_sparsity": "2:4"}, sparsity=0.5)
        pruning.mask_update(1)
    assert "0.weight (nm): torch backend, N:M groups along an input dim that is not the last" in caplog.text
    assert "1.weight (nm): " + ("cpu backend" if kernels.available() else "torch") in caplog.text
    pruning.check_nm()
    assert is_nm_sparse(model[0].weight, 2, 4, input_dims=0) and is_nm_sparse(model[1].weight, 2, 4)
