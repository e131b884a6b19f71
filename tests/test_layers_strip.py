"""Masked layers (TF's masked_conv2d & friends) and strip_pruning_vars.

Run: pytest tests/test_layers_strip.py
"""

import pytest
import torch
from torch import nn

from lit_prune import (
    MaskedConv1d,
    MaskedConv2d,
    MaskedConv3d,
    MaskedLinear,
    MaskedLSTM,
    Pruning,
    PruningHParams,
    masked_conv2d,
    masked_fully_connected,
    strip_pruning_vars,
)
from lit_prune.engine.layers import Pad2dSame

LAYERS = [
    (lambda: MaskedLinear(6, 4), nn.Linear, (3, 6)),
    (lambda: MaskedConv1d(2, 4, 3), nn.Conv1d, (1, 2, 8)),
    (lambda: MaskedConv2d(2, 4, 3, stride=2, padding=1), nn.Conv2d, (1, 2, 8, 8)),
    (lambda: MaskedConv3d(2, 4, 3), nn.Conv3d, (1, 2, 5, 5, 5)),
]


@pytest.mark.parametrize(("make", "plain", "shape"), LAYERS)
def test_masked_layer_forward_uses_masked_weight_and_blocks_gradient(make, plain, shape):
    torch.manual_seed(0)
    layer = make()
    layer.mask.view(-1)[::2] = False
    x = torch.randn(shape)
    out = layer(x)
    assert not torch.allclose(out, plain.forward(layer, x))  # the plain forward would ignore the mask
    with torch.no_grad():
        w = layer.weight.detach().clone()
        layer.weight.mul_(layer.mask)
    assert torch.allclose(out, layer(x), atol=1e-6)  # masking in forward == zeroing the weight
    with torch.no_grad():
        layer.weight.copy_(w)
    layer(x).sum().backward()
    assert (layer.weight.grad[~layer.mask] == 0).all()
    assert layer.mask.dtype == torch.bool and layer.threshold.shape == ()


def test_masked_lstm_masks_every_weight_matrix():
    torch.manual_seed(0)
    lstm = MaskedLSTM(3, 5, num_layers=2, batch_first=True)
    x = torch.randn(2, 4, 3)
    for name in lstm.masked_weight_names:
        getattr(lstm, f"{name}_mask").zero_()
    out_masked, _ = lstm(x)
    plain = nn.LSTM(3, 5, num_layers=2, batch_first=True)
    plain.load_state_dict({k: v for k, v in lstm.state_dict().items() if "_mask" not in k and "_threshold" not in k})
    with torch.no_grad():
        for name in lstm.masked_weight_names:
            getattr(plain, name).zero_()
    out_plain, _ = plain(x)
    assert torch.allclose(out_masked, out_plain, atol=1e-6)
    assert sorted(Pruning(nn.Sequential(lstm)).weight_names) == sorted(f"0.{n}" for n in lstm.masked_weight_names)


def test_pruning_updates_masked_layer_buffers_in_place():
    model = nn.Sequential(MaskedLinear(10, 10), nn.ReLU(), MaskedLinear(10, 2))
    mask_before = model[0].mask
    pruning = Pruning(model, PruningHParams(threshold_method="exact"), sparsity=0.7)
    pruning.mask_update(0)
    assert model[0].mask is mask_before
    assert int(model[0].mask.sum()) == 30 and int(model[2].mask.sum()) == 6
    assert model[0].threshold.item() > 0


def test_masked_conv2d_builder_matches_tf_options():
    block = masked_conv2d(3, 8, 3, stride=2, normalizer_fn=nn.BatchNorm2d)
    assert list(block._modules) == ["pad", "conv", "norm", "act"]
    assert block.conv.bias is None  # no bias with a normalizer, as in TF
    assert block(torch.zeros(1, 3, 11, 11)).shape == (1, 8, 6, 6)  # SAME: ceil(11 / 2)
    valid = masked_conv2d(3, 8, 3, padding="VALID", activation_fn=None, rate=2)
    assert list(valid._modules) == ["conv"] and valid.conv.dilation == (2, 2)
    assert valid(torch.zeros(1, 3, 11, 11)).shape == (1, 8, 7, 7)
    with pytest.raises(ValueError, match="`padding` must be 'SAME', 'VALID' or an int"):
        masked_conv2d(3, 8, 3, padding="FULL")
    fc = masked_fully_connected(4, 2, activation_fn=None)
    assert isinstance(fc.fc, MaskedLinear) and fc(torch.zeros(1, 4)).shape == (1, 2)


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "rate"), [(11, 3, 2, 1), (10, 4, 3, 1), (9, 3, 1, 2), (8, 1, 2, 1)]
)
def test_same_padding_matches_tf_output_size(size, kernel, stride, rate):
    x = torch.zeros(1, 1, size, size)
    out = nn.functional.conv2d(
        Pad2dSame(kernel, stride, rate)(x), torch.zeros(1, 1, kernel, kernel), stride=stride, dilation=rate
    )
    assert out.shape[-1] == -(-size // stride)


def test_strip_round_trip_into_the_unpruned_architecture():
    torch.manual_seed(0)

    def arch(conv, lin):
        return nn.Sequential(conv(1, 4, 3), nn.ReLU(), nn.Flatten(), lin(4 * 6 * 6, 10))

    model = arch(MaskedConv2d, nn.Linear)  # one masked layer, one plain layer pruned through Pruning
    pruning = Pruning(model, PruningHParams(threshold_method="exact"), sparsity=0.6)
    pruning.mask_update(0)
    x = torch.randn(2, 1, 8, 8)
    expected = model(x)
    stripped = strip_pruning_vars(model, pruning)
    assert type(stripped[0]) is nn.Conv2d and not hasattr(stripped[0], "mask")
    assert sorted(stripped.state_dict()) == ["0.bias", "0.weight", "3.bias", "3.weight"]
    plain = arch(nn.Conv2d, nn.Linear)
    plain.load_state_dict(stripped.state_dict())
    assert torch.allclose(plain(x), expected, atol=1e-6)
    assert (plain[0].weight == 0).float().mean().item() == pytest.approx(0.6, abs=0.03)
    assert isinstance(model[0], MaskedConv2d)  # the original is untouched


def test_strip_masked_lstm():
    lstm = MaskedLSTM(3, 4)
    lstm.weight_ih_l0_mask.zero_()
    plain = strip_pruning_vars(lstm)
    assert type(plain) is nn.LSTM and (plain.weight_ih_l0 == 0).all()
    assert sorted(plain.state_dict()) == sorted(nn.LSTM(3, 4).state_dict())
    plain(torch.zeros(2, 1, 3))


def test_strip_rejects_a_foreign_pruning():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    with pytest.raises(ValueError, match="built on `model`"):
        strip_pruning_vars(a, Pruning(b))
