"""Export: fold the masks into the weights and drop everything pruning added (TF ``strip_pruning_vars``).

TF's tool replaced every ``masked_weight`` node of a frozen graph by a constant ``mask * w``.
Here the result is a plain ``nn.Module``: masked layers become their PyTorch base class
(``MaskedConv2d`` -> ``nn.Conv2d``, ...) without mask or threshold buffers, and weights pruned
through a :class:`~lit_prune.Pruning` object are multiplied by its masks, so the ``state_dict``
loads into the unpruned architecture.  Like TF's, the result is dense (zeros are stored).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lit_prune.layers import MaskedModule
from lit_prune.pruning import Pruning

__all__ = ["strip_pruning_vars"]

_MASKED_ATTRS = ("masked_weight_names", "_in_masked_forward")


def _plain_base(cls: type) -> type[nn.Module]:
    for base in cls.__mro__[1:]:
        if issubclass(base, nn.Module) and not issubclass(base, MaskedModule):
            return base
    raise TypeError(f"{cls.__name__} has no plain nn.Module base")  # pragma: no cover - every masked layer has one


@torch.no_grad()
def strip_pruning_vars(model: nn.Module, pruning: Pruning | None = None, *, inplace: bool = False) -> nn.Module:
    """A plain copy of ``model`` with masks folded into the weights and masked layers made plain.

    Args:
        model: The pruned model.
        pruning: The :class:`Pruning` whose masks cover weights of plain layers (masked layers
            carry their own).
        inplace: Modify ``model`` itself instead of a deep copy.

    Example::

        >>> from lit_prune import MaskedLinear
        >>> model = torch.nn.Sequential(MaskedLinear(4, 4))
        >>> model[0].mask[0] = False
        >>> plain = strip_pruning_vars(model)
        >>> type(plain[0]).__name__, sorted(plain.state_dict()), float(plain[0].weight[0].detach().abs().sum())
        ('Linear', ['0.bias', '0.weight'], 0.0)
    """
    masks = {}
    if pruning is not None:
        if pruning.model is not model:
            raise ValueError("`pruning` must have been built on `model`")
        masks = {name: mask.detach().clone() for name, mask in pruning.get_masks().items()}
    out = model if inplace else copy.deepcopy(model)
    params = dict(out.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask.to(params[name].device))
    for module in out.modules():
        if not isinstance(module, MaskedModule):
            continue
        for weight_name in module.masked_weight_names:
            mask_name, threshold_name = module.mask_buffer_names(weight_name)
            getattr(module, weight_name).mul_(getattr(module, mask_name))
            del module._buffers[mask_name]
            del module._buffers[threshold_name]
        for attr in _MASKED_ATTRS:
            module.__dict__.pop(attr, None)
        module.__class__ = _plain_base(type(module))
    return out
