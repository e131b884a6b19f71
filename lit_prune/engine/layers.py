"""Masked layers: TF's ``masked_conv2d``/``MaskedConv2D``/``MaskedFullyConnected``/``MaskedLSTMCell`` in PyTorch.

Each layer carries a ``torch.bool`` mask buffer and a float32 threshold buffer per pruned weight
and multiplies its weight by the mask in ``forward`` (TF's ``masked_weight``), so it is correct
even if nothing ever zeroes its weights, and gradients to pruned weights are exactly zero.
:class:`lit_prune.Pruning` picks the buffers up and updates them in place; existing models are
pruned without swapping layers too (their masks then live in the ``Pruning`` object).

The single-weight layers name their buffers ``mask`` and ``threshold`` as TF did; the LSTM, which
has several weight matrices, names them ``<weight>_mask`` and ``<weight>_threshold``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MaskedConv1d",
    "MaskedConv2d",
    "MaskedConv3d",
    "MaskedLSTM",
    "MaskedLinear",
    "MaskedModule",
    "Pad2dSame",
    "masked_conv2d",
    "masked_fully_connected",
]


class MaskedModule:
    """Mixin of the masked layers: registers and finds the mask/threshold buffers of each weight."""

    masked_weight_names: tuple[str, ...] = ("weight",)

    def _register_masks(self) -> None:
        for name in self.masked_weight_names:
            weight = getattr(self, name)
            mask_name, threshold_name = self.mask_buffer_names(name)
            self.register_buffer(mask_name, torch.ones_like(weight, dtype=torch.bool))  # type: ignore[attr-defined]
            self.register_buffer(threshold_name, torch.zeros((), dtype=torch.float32, device=weight.device))  # type: ignore[attr-defined]

    def mask_buffer_names(self, weight_name: str) -> tuple[str, str]:
        """Names of the ``(mask, threshold)`` buffers of ``weight_name`` in this layer."""
        if weight_name not in self.masked_weight_names:
            raise KeyError(f"{type(self).__name__} masks {list(self.masked_weight_names)}, not {weight_name!r}")
        if self.masked_weight_names == ("weight",):
            return "mask", "threshold"
        return f"{weight_name}_mask", f"{weight_name}_threshold"

    def reset_parameters(self) -> None:
        """Re-initialise the weights (as the plain layer does) and reset every mask to keep all.

        This is what a model materialised from ``meta`` with ``to_empty()`` needs: its mask
        buffers hold uninitialised memory until reset (or until a ``state_dict`` is loaded).
        """
        super().reset_parameters()  # type: ignore[misc]
        for name in self.masked_weight_names:
            mask_name, threshold_name = self.mask_buffer_names(name)
            mask = getattr(self, mask_name, None)
            if mask is not None:  # absent while the plain layer's __init__ runs
                with torch.no_grad():
                    mask.fill_(True)
                    getattr(self, threshold_name).zero_()

    def masked(self, weight_name: str = "weight") -> Tensor:
        """The weight multiplied by its mask (TF's ``masked_weight``)."""
        mask_name, _ = self.mask_buffer_names(weight_name)
        return getattr(self, weight_name) * getattr(self, mask_name)


class MaskedLinear(MaskedModule, nn.Linear):
    """``nn.Linear`` with a pruning mask (TF ``MaskedFullyConnected``).

    Example::

        >>> layer = MaskedLinear(4, 2)
        >>> layer.mask.dtype, layer.mask.shape, float(layer.threshold)
        (torch.bool, torch.Size([2, 4]), 0.0)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._register_masks()

    def forward(self, input: Tensor) -> Tensor:  # noqa: D102
        return F.linear(input, self.masked(), self.bias)


class MaskedConv1d(MaskedModule, nn.Conv1d):
    """``nn.Conv1d`` with a pruning mask.

    Example::

        >>> MaskedConv1d(3, 8, 5)(torch.zeros(1, 3, 16)).shape
        torch.Size([1, 8, 12])
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._register_masks()

    def forward(self, input: Tensor) -> Tensor:  # noqa: D102
        return self._conv_forward(input, self.masked(), self.bias)


class MaskedConv2d(MaskedModule, nn.Conv2d):
    """``nn.Conv2d`` with a pruning mask (TF ``MaskedConv2D``).

    Example::

        >>> MaskedConv2d(3, 8, 3, padding=1)(torch.zeros(1, 3, 8, 8)).shape
        torch.Size([1, 8, 8, 8])
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._register_masks()

    def forward(self, input: Tensor) -> Tensor:  # noqa: D102
        return self._conv_forward(input, self.masked(), self.bias)


class MaskedConv3d(MaskedModule, nn.Conv3d):
    """``nn.Conv3d`` with a pruning mask.

    Example::

        >>> MaskedConv3d(1, 2, 3)(torch.zeros(1, 1, 4, 4, 4)).shape
        torch.Size([1, 2, 2, 2, 2])
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._register_masks()

    def forward(self, input: Tensor) -> Tensor:  # noqa: D102
        return self._conv_forward(input, self.masked(), self.bias)


class MaskedLSTM(MaskedModule, nn.LSTM):
    """``nn.LSTM`` with a mask on every weight matrix (TF ``MaskedLSTMCell``/``MaskedBasicLSTMCell``).

    TF's cell kept one kernel ``[input + hidden, 4 * hidden]`` with one mask and one threshold;
    PyTorch keeps ``weight_ih_l<k>`` and ``weight_hh_l<k>`` apart, and so do the masks here (each
    has its own threshold).  With ``proj_size`` the projections ``weight_hr_l<k>`` are masked too
    (TF never masked the projection, and its ``num_proj`` case crashed on a shape mismatch).

    Example::

        >>> lstm = MaskedLSTM(3, 4, num_layers=2, batch_first=True)
        >>> sorted(n for n, _ in lstm.named_buffers())[:2]
        ['weight_hh_l0_mask', 'weight_hh_l0_threshold']
        >>> lstm(torch.zeros(2, 5, 3))[0].shape
        torch.Size([2, 5, 4])
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.masked_weight_names = tuple(n for n in self._flat_weights_names if n.startswith("weight"))
        self._register_masks()
        self._in_masked_forward = False

    def forward(self, input: Any, hx: Any = None) -> Any:  # noqa: D102
        if self._in_masked_forward:
            return super().forward(input, hx)
        masked = {name: self.masked(name) for name in self.masked_weight_names}
        self._in_masked_forward = True
        try:
            return torch.func.functional_call(self, masked, (input, hx))
        finally:
            self._in_masked_forward = False


class Pad2dSame(nn.Module):
    """TF's ``'SAME'`` padding for a strided/dilated 2-D conv: ``ceil(in / stride)`` outputs, extra pad after.

    Example::

        >>> Pad2dSame(3, stride=2)(torch.zeros(1, 1, 5, 6)).shape
        torch.Size([1, 1, 7, 7])
    """

    def __init__(self, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] = 1, rate: int = 1) -> None:
        super().__init__()
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        pads: list[int] = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride), strict=True):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * self.rate + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def masked_conv2d(
    in_channels: int,
    num_outputs: int,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: str | int = "SAME",
    rate: int = 1,
    activation_fn: Callable[[], nn.Module] | None = nn.ReLU,
    normalizer_fn: Callable[[int], nn.Module] | None = None,
    use_bias: bool = True,
) -> nn.Sequential:
    """TF's ``masked_conv2d`` (``contrib.layers``): a masked conv, optional normaliser, activation.

    ``padding`` is ``"SAME"`` (TF's rule, also for strides > 1), ``"VALID"`` or an int;
    ``rate`` is the dilation; as in TF the conv has no bias when a ``normalizer_fn`` (e.g.
    ``nn.BatchNorm2d``) is given, and the activation defaults to ReLU.  Inputs are NCHW
    (PyTorch's layout; TF's ``data_format`` is not needed).  The result is an ``nn.Sequential``
    whose ``conv`` is a :class:`MaskedConv2d`.

    Example::

        >>> block = masked_conv2d(3, 16, 3, stride=2, normalizer_fn=torch.nn.BatchNorm2d)
        >>> list(block._modules), block(torch.zeros(1, 3, 9, 9)).shape
        (['pad', 'conv', 'norm', 'act'], torch.Size([1, 16, 5, 5]))
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    kernel = _pair(kernel_size)
    strides = _pair(stride)
    if isinstance(padding, str):
        mode = padding.upper()
        if mode not in ("SAME", "VALID"):
            raise ValueError(f"`padding` must be 'SAME', 'VALID' or an int, got {padding!r}")
        if mode == "SAME":
            layers["pad"] = Pad2dSame(kernel, strides, rate)
        conv_padding: int = 0
    else:
        conv_padding = int(padding)
    layers["conv"] = MaskedConv2d(
        in_channels,
        num_outputs,
        kernel,
        stride=strides,
        padding=conv_padding,
        dilation=rate,
        bias=use_bias and normalizer_fn is None,
    )
    if normalizer_fn is not None:
        layers["norm"] = normalizer_fn(num_outputs)
    if activation_fn is not None:
        layers["act"] = activation_fn()
    return nn.Sequential(layers)


def masked_fully_connected(
    in_features: int,
    num_outputs: int,
    activation_fn: Callable[[], nn.Module] | None = nn.ReLU,
    normalizer_fn: Callable[[int], nn.Module] | None = None,
    use_bias: bool = True,
) -> nn.Sequential:
    """TF's ``masked_fully_connected``: a :class:`MaskedLinear`, optional normaliser, activation.

    Example::

        >>> masked_fully_connected(8, 4)(torch.zeros(2, 8)).shape
        torch.Size([2, 4])
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    layers["fc"] = MaskedLinear(in_features, num_outputs, bias=use_bias and normalizer_fn is None)
    if normalizer_fn is not None:
        layers["norm"] = normalizer_fn(num_outputs)
    if activation_fn is not None:
        layers["act"] = activation_fn()
    return nn.Sequential(layers)
