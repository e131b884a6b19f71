"""Export: fold the masks into the weights and drop everything pruning added (TF ``strip_pruning_vars``).

TF's tool replaced every ``masked_weight`` node of a frozen graph by a constant ``mask * w``.
Here the result is a plain ``nn.Module``: masked layers become their PyTorch base class
(``MaskedConv2d`` -> ``nn.Conv2d``, ...) without mask or threshold buffers, and weights pruned
through a :class:`~lit_prune.Pruning` object are multiplied by its masks, so the ``state_dict``
loads into the unpruned architecture.  Like TF's, the result is dense (zeros are stored).

:func:`to_semi_structured` goes further for 2:4 weights: it swaps ``nn.Linear`` weights for
``torch.sparse`` semi-structured tensors, which NVIDIA GPUs of compute capability 8.0+ multiply
with sparse tensor cores (fp16/bf16, inference).  An HF ``transformers`` ``Conv1D`` (weight
``[in, out]``, 2:4 along ``in``) becomes an ``nn.Linear`` holding the transposed weight
``[out, in]``, which is what the kernels take; conv, RNN and embedding weights cannot be
converted (the kernels multiply matrices) and stay dense-stored, with a warning.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.sparse import to_sparse_semi_structured

from lit_prune.engine.layers import MaskedModule
from lit_prune.engine.layouts import is_hf_conv1d
from lit_prune.engine.nm import is_nm_sparse
from lit_prune.engine.pruning import Pruning
from lit_prune.engine.sharding import is_sharded

__all__ = ["masked_layer_buffers", "semi_structured_problem", "strip_pruning_vars", "to_semi_structured"]

_MASKED_ATTRS = ("masked_weight_names", "_in_masked_forward")


def _plain_base(cls: type) -> type[nn.Module]:
    for base in cls.__mro__[1:]:
        if issubclass(base, nn.Module) and not issubclass(base, MaskedModule):
            return base
    raise TypeError(f"{cls.__name__} has no plain nn.Module base")  # pragma: no cover - every masked layer has one


def masked_layer_buffers(model: nn.Module) -> set[str]:
    """The ``state_dict`` names of the masked layers' ``mask``/``threshold`` buffers (what stripping drops).

    Example::

        >>> from lit_prune import MaskedLinear
        >>> sorted(masked_layer_buffers(torch.nn.Sequential(MaskedLinear(2, 2))))
        ['0.mask', '0.threshold']
    """
    return {
        f"{name}.{buffer}" if name else buffer
        for name, module in model.named_modules()
        if isinstance(module, MaskedModule)
        for weight in module.masked_weight_names
        for buffer in module.mask_buffer_names(weight)
    }


@torch.no_grad()
def strip_pruning_vars(
    model: nn.Module, pruning: Pruning | None = None, *, inplace: bool = False, semi_structured: bool = False
) -> nn.Module:
    """A plain copy of ``model`` with masks folded into the weights and masked layers made plain.

    Args:
        model: The pruned model.
        pruning: The :class:`Pruning` whose masks cover weights of plain layers (masked layers
            carry their own).
        inplace: Modify ``model`` itself instead of a deep copy.
        semi_structured: Also convert the ``nn.Linear`` (and HF ``Conv1D``) weights that
            ``pruning`` made 2:4 (N:M with M = 4, N <= 2) with :func:`to_semi_structured` (CUDA,
            compute capability 8.0+, fp16/bf16); other 2:4 weights (convs, ...) stay dense-stored,
            with a warning that names them.

    Raises:
        ValueError: sharded (``DTensor``) weights without ``inplace`` (FSDP2 modules cannot be
            copied); an N:M weight of ``pruning`` is not N:M sparse (the schedule has not reached
            it yet); with ``semi_structured``, no weight is eligible, or one cannot be converted
            (the message names it and why: device, GPU, dtype, pattern).

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
        pruning.check_nm()  # refuse to export an N:M weight that is not N:M
    sharded = [name for name, p in model.named_parameters() if is_sharded(p)]
    if sharded and not inplace:
        raise ValueError(
            f"strip_pruning_vars copies the model, and its weights {sharded[:3]}{'...' if len(sharded) > 3 else ''} "
            "are sharded (FSDP2 modules cannot be deep-copied): pass `inplace=True` to fold the masks into the "
            "sharded weights in place, or strip the distributed checkpoint in one process with `strip_checkpoint`"
        )
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
    if semi_structured:
        eligible = [] if pruning is None else [n for n, (k, m) in pruning.nm_weights().items() if m == 4 and k <= 2]
        reasons = {n: _not_a_matrix(n, out) for n in eligible}
        if any(reasons.values()):
            warnings.warn(
                "semi_structured: left dense-stored: " + "; ".join(r for r in reasons.values() if r), stacklevel=2
            )
        eligible = [n for n in eligible if reasons[n] is None]
        if not eligible:
            raise ValueError(
                "`semi_structured=True` found no nn.Linear weight pruned 2:4 by `pruning`, nor an HF Conv1D one (set "
                "`nm_sparsity` or `nm_sparsity_map` to 2:4 for Linear weights)"
            )
        to_semi_structured(out, eligible, inplace=True)
    return out


def _not_a_matrix(name: str, model: nn.Module) -> str | None:
    """Why weight ``name`` of ``model`` is no matrix the 2:4 kernels multiply (``None``: Linear or HF Conv1D weight)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr == "weight" and (isinstance(module, nn.Linear) or is_hf_conv1d(module)):
        return None
    if attr != "weight" or not isinstance(module, (nn.modules.conv._ConvNd, nn.RNNBase, nn.Embedding)):
        return f"{name} is not an nn.Linear weight (nor an HF Conv1D one): only those can be converted"
    return (
        f"{name} is a {type(module).__name__} weight: torch's 2:4 kernels multiply matrices (nn.Linear, HF Conv1D), "
        "not convolutions, recurrences or lookups"
    )


def semi_structured_problem(name: str, weight: Tensor) -> str | None:
    """Why ``weight`` cannot become a semi-structured sparse tensor, or ``None`` if it can.

    Checks, in order: a CUDA device, compute capability 8.0 or higher, fp16/bf16, and the 2:4
    pattern (``torch.sparse`` accepts a tensor that is not 2:4 without complaint).

    Example::

        >>> semi_structured_problem("fc.weight", torch.zeros(64, 64))
        'fc.weight is on cpu: 2:4 sparse kernels need a CUDA GPU (compute capability 8.0+)'
    """
    if weight.device.type != "cuda":
        return f"{name} is on {weight.device.type}: 2:4 sparse kernels need a CUDA GPU (compute capability 8.0+)"
    major, minor = torch.cuda.get_device_capability(weight.device)
    if major < 8:
        return f"{name} is on a GPU of compute capability {major}.{minor}: semi-structured sparsity needs 8.0+"
    if weight.dtype not in (torch.float16, torch.bfloat16):
        return f"{name} is {weight.dtype}: semi-structured sparsity needs float16 or bfloat16 (call .half() first)"
    if not is_nm_sparse(weight, 2, 4):
        return f"{name} is not 2:4 sparse: prune it with nm_sparsity=2:4 to the end of its schedule first"
    return None


@torch.no_grad()
def to_semi_structured(model: nn.Module, names: Iterable[str] | None = None, *, inplace: bool = False) -> nn.Module:
    """Swap 2:4-sparse ``nn.Linear`` weights for ``torch.sparse.to_sparse_semi_structured`` tensors (inference).

    An HF ``transformers`` ``Conv1D`` weight (``[in, out]``, applied as ``x @ W``, 2:4 along
    ``in``) is transposed: its module becomes an ``nn.Linear`` holding the sparse ``[out, in]``
    weight and the same bias.

    Args:
        model: A model whose named Linear (or HF Conv1D) weights are 2:4 sparse along their input
            features, fp16/bf16, on a CUDA GPU of compute capability 8.0+.
        names: Parameter names (``"<module>.weight"``) to convert; default every ``nn.Linear`` (and
            HF ``Conv1D``) weight.
        inplace: Modify ``model`` itself instead of a deep copy.

    Raises:
        ValueError: a named weight is not a Linear weight, or cannot be converted (the message
            names it and why); nothing is converted then.

    Example::

        >>> to_semi_structured(torch.nn.Sequential(torch.nn.Linear(64, 64)))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: cannot convert to semi-structured sparsity: 0.weight is on cpu: 2:4 sparse kernels need a CUDA...
    """
    if names is None:
        matrices = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_hf_conv1d(m)]
        names = [f"{n}.weight" if n else "weight" for n in matrices]
    names = list(names)
    problems = []
    for name in names:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        problem = _not_a_matrix(name, model)
        if problem is None:
            weight = getattr(module, attr).detach()
            problem = semi_structured_problem(name, weight.t() if is_hf_conv1d(module) else weight)
        if problem is not None:
            problems.append(problem)
    if problems:
        raise ValueError("cannot convert to semi-structured sparsity: " + "; ".join(problems))
    out = model if inplace else copy.deepcopy(model)
    for name in names:
        module_name = name.rpartition(".")[0]
        module = out.get_submodule(module_name)
        dense = module.weight.detach()
        if is_hf_conv1d(module):  # [in, out] -> an nn.Linear of [out, in]: the 2:4 groups along its last dim
            dense = dense.t().contiguous()
            module = _linear_for_conv1d(out, module_name, module, dense)
        try:
            sparse = to_sparse_semi_structured(dense)
        except (RuntimeError, ValueError) as error:  # shape constraints of the sparse kernels
            raise ValueError(f"{name} of shape {tuple(dense.shape)}: {error}") from error
        module.weight = nn.Parameter(sparse, requires_grad=False)
    return out


def _linear_for_conv1d(model: nn.Module, module_name: str, conv1d: nn.Module, weight: Tensor) -> nn.Linear:
    """Put an ``nn.Linear`` with ``conv1d``'s bias (and room for the ``[out, in]`` ``weight``) in its place."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=conv1d.bias is not None, device="meta")
    linear.bias = conv1d.bias
    parent_name, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, linear)
    return linear
