"""Which weights are pruned, and with which per-weight settings, chosen by parameter name.

Names are those of ``model.named_parameters()`` (a tied parameter appears once, under its first
name).  By default the weights of conv, linear, RNN, attention and embedding layers (and HF
``transformers``' ``Conv1D``: every layer type registered in :mod:`lit_prune.engine.layouts`)
are pruned, never biases or normalisation parameters; ``prune_patterns`` replaces that choice with regexes
and ``exclude_patterns`` removes names from it.  ``weight_sparsity_map`` and ``block_dims_map``
entries match pruned names with ``re.search``, as in TF r1.15 and lingvo.  A weight matched by
two entries of one map is an error (TF has no precedence), and so is any pattern that matches
nothing: a typo must not silently leave a layer dense.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TypeVar

from torch import nn

from lit_prune.config.hparams import HParamsError
from lit_prune.engine.layouts import layout_of

__all__ = ["DEFAULT_LAYER_TYPES", "candidate_weights", "match_map", "select_weights"]

#: The torch layers whose ``weight*`` parameters are pruned by default (the default selection itself
#: follows the registry of :mod:`lit_prune.engine.layouts`, which also holds HF's ``Conv1D`` and
#: the layer types registered with :func:`lit_prune.register_layer`).
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.RNNBase,
    nn.RNNCellBase,
    nn.Embedding,
    nn.EmbeddingBag,
    nn.MultiheadAttention,
)

V = TypeVar("V")
_SHOWN = 25


def candidate_weights(model: nn.Module) -> list[str]:
    """Default selection: trainable weights of the registered layer types (see ``layouts``), in model order.

    Frozen weights (``requires_grad=False``) are left out: they could not recover from pruning.
    Name them in ``prune_patterns`` to prune them anyway.

    Example::

        >>> model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 1))
        >>> candidate_weights(model)
        ['0.weight', '2.weight']
    """
    chosen: set[int] = set()
    for module in model.modules():
        layout = layout_of(module)
        if layout is not None and layout.prune_by_default:
            for pname, param in module.named_parameters(recurse=False):
                if layout.dims_of(pname)[0]:
                    chosen.add(id(param))
    return [
        name for name, p in model.named_parameters() if id(p) in chosen and p.is_floating_point() and p.requires_grad
    ]


def _describe(names: Iterable[str]) -> str:
    names = list(names)
    shown = ", ".join(names[:_SHOWN])
    return f"[{shown}{', ...' if len(names) > _SHOWN else ''}] ({len(names)} in all)"


def select_weights(model: nn.Module, prune_patterns: list[str], exclude_patterns: list[str]) -> list[str]:
    """Names of the parameters to prune, in ``named_parameters()`` order.

    Raises:
        HParamsError: a pattern matches no parameter, or nothing is left to prune.

    Example::

        >>> model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
        >>> select_weights(model, [], ["^1[.]"])
        ['0.weight']
    """
    all_names = [n for n, p in model.named_parameters() if p.is_floating_point()]
    if prune_patterns:
        selected = []
        for pattern in prune_patterns:
            hits = [n for n in all_names if re.search(pattern, n)]
            if not hits:
                raise HParamsError(
                    f"`prune_patterns` entry {pattern!r} matches no parameter; parameters: {_describe(all_names)}"
                )
            selected += [n for n in hits if n not in selected]
        selected = [n for n in all_names if n in selected]
    else:
        selected = candidate_weights(model)
    for pattern in exclude_patterns:
        hits = [n for n in selected if re.search(pattern, n)]
        if not hits:
            raise HParamsError(
                f"`exclude_patterns` entry {pattern!r} matches no pruned weight; candidates: {_describe(selected)}"
            )
        selected = [n for n in selected if n not in hits]
    if not selected:
        raise HParamsError(
            "no weight to prune: the model has no conv/linear/RNN/embedding weights left after `prune_patterns`/"
            f"`exclude_patterns`; parameters: {_describe(all_names)}"
        )
    return selected


def match_map(field_name: str, mapping: dict[str, V], names: list[str]) -> dict[str, V]:
    """``{weight name: value}`` for each pruned weight that one ``mapping`` regex ``re.search``-es.

    Raises:
        HParamsError: a weight is matched by two patterns, or a pattern matches no pruned weight
            (the message lists the candidates).

    Example::

        >>> match_map("weight_sparsity_map", {"fc": 0.9}, ["conv1.weight", "fc.weight"])
        {'fc.weight': 0.9}
    """
    out: dict[str, V] = {}
    owner: dict[str, str] = {}
    for pattern, value in mapping.items():
        hits = [n for n in names if re.search(pattern, n)]
        if not hits:
            raise HParamsError(
                f"`{field_name}` entry {pattern!r} matches no pruned weight; candidates: {_describe(names)}"
            )
        for name in hits:
            if name in owner:
                raise HParamsError(
                    f"multiple matches in `{field_name}` for weight {name!r}: {owner[name]!r} and {pattern!r}"
                )
            owner[name] = pattern
            out[name] = value
    return out
