"""Binding a spec to a model: which weights are pruned, with which settings, and whether the model changed since.

Weights are chosen by parameter name (:mod:`lit_prune.engine.selection`); each gets a
:class:`~lit_prune.engine.state.WeightSpec` (its map target, block dims, N:M) and a
:class:`~lit_prune.engine.state.WeightState`.  Every conflict is an error here, before training.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

from torch import nn

from lit_prune.config.hparams import (
    HParamsError,
    PruningHParams,
    parse_block_dims_map,
    parse_nm,
    parse_nm_sparsity_map,
    parse_weight_sparsity_map,
)
from lit_prune.engine.allocation import allocate, load_scan_curves
from lit_prune.engine.blocks import block_view_shape, resolve_block_dims
from lit_prune.engine.layouts import nm_input_dims, parameter_owners
from lit_prune.engine.nm import in_memory_order, nm_group_view
from lit_prune.engine.reduce import LocalReducer, Reducer
from lit_prune.engine.selection import match_map, select_weights
from lit_prune.engine.sharding import ProcessGroupReducer, check_supported, is_sharded
from lit_prune.engine.state import WeightSpec, WeightState

__all__ = ["ModelWatch", "bind_weights", "default_reducer", "joint_names"]


def bind_weights(model: nn.Module, hp: PruningHParams) -> dict[str, WeightState]:
    """``{name: state}`` of every weight ``hp`` prunes in ``model``, in model order.

    Example::

        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> list(bind_weights(model, PruningHParams(weight_sparsity_map=["^2:0.5"])))
        ['0.weight', '2.weight']
    """
    names = select_weights(model, hp.prune_patterns, hp.exclude_patterns)
    targets = match_map("weight_sparsity_map", parse_weight_sparsity_map(hp.weight_sparsity_map), names)
    blocks = match_map("block_dims_map", parse_block_dims_map(hp.block_dims_map), names)
    nm_map = match_map("nm_sparsity_map", parse_nm_sparsity_map(hp.nm_sparsity_map), names)
    nm_default = parse_nm("nm_sparsity", hp.nm_sparsity) if hp.nm_sparsity else None
    states = {}
    owners = parameter_owners(model) if nm_map or nm_default else {}
    for name in names:
        module_name, _, param_name = name.rpartition(".")
        module = model.get_submodule(module_name)
        weight = getattr(module, param_name)
        spec = WeightSpec(name, targets.get(name), blocks.get(name, (hp.block_height, hp.block_width)))
        nm = nm_map.get(name, nm_default)
        if nm is not None:
            shape = tuple(weight.shape)
            dims = nm_input_dims(name, shape, owners[id(weight)])
            spec = WeightSpec(name, _nm_target(spec, nm, shape, dims), spec.block_dims, nm, input_dims=dims)
        nm_m = None if spec.nm is None else spec.nm[1]
        check_supported(name, weight, _block_dims(spec, weight.shape), nm_m, spec.input_dims or ())
        states[name] = WeightState.bind(spec, module, param_name, hp.prune_option)
    _allocate(states, hp)
    blocked = [n for n in joint_names(states, hp) if states[n].spec.block_dims != (1, 1)]
    if blocked:
        raise HParamsError(
            f"`global_ranking` ranks weights element-wise, but {blocked} have block dims: give them a "
            "`weight_sparsity_map` entry (their own threshold) or 1x1 blocks"
        )
    return states


def default_reducer(states: dict[str, WeightState]) -> Reducer:
    """The reduce step for these weights: over all processes if some are sharded, else nothing to combine.

    Example::

        >>> default_reducer(bind_weights(nn.Linear(4, 4), PruningHParams())).local
        True
    """
    sharded = [s for s in states.values() if is_sharded(s.param)]
    return ProcessGroupReducer.for_weight(sharded[0].param) if sharded else LocalReducer()


def joint_names(states: dict[str, WeightState], hp: PruningHParams) -> set[str]:
    """The weights ranked together under ``allocation=global`` (``global_ranking``): those the allocation joined."""
    return {n for n, s in states.items() if s.spec.joint}


def _allocate(states: dict[str, WeightState], hp: PruningHParams) -> None:
    """Give each weight without its own target the one ``allocation`` chooses (:mod:`~lit_prune.engine.allocation`)."""
    rule = hp.allocation_rule()
    if rule == "uniform":
        return
    pinned = {n: s.spec.target for n, s in states.items() if s.spec.target is not None}
    shapes = {n: tuple(s.param.shape) for n, s in states.items()}  # global shapes for DTensors
    curves = load_scan_curves(hp.sensitivity_scan) if rule == "sensitivity" else None
    chosen = allocate(rule, shapes, hp.target_sparsity, pinned, curves)
    for name, s in states.items():
        if name not in pinned:  # a joint weight at the target itself follows the schedule as TF's global would
            target = chosen.targets[name]
            keep_global = name in chosen.joint and target == hp.target_sparsity
            s.spec = dataclasses.replace(s.spec, target=None if keep_global else target, joint=name in chosen.joint)


def _block_dims(spec: WeightSpec, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """The resolved block dims of a block-pruned weight (``None``: element-wise or not a matrix)."""
    view = block_view_shape(shape) if spec.block_dims != (1, 1) else None
    return None if view is None else resolve_block_dims(spec.block_dims, view)


def _nm_target(spec: WeightSpec, nm: tuple[int, int], shape: tuple[int, ...], dims: tuple[int, ...]) -> float:
    """Validate an N:M weight at binding; return its own target ``1 - N/M``."""
    n, m = nm
    if nm_group_view(shape, m, dims) is None:
        inner = math.prod(shape[d] for d in dims) if len(shape) > 1 else None
        what = "in*kh*kw" if in_memory_order(len(shape), dims) else f"dim {dims[0]} as stored"
        raise HParamsError(
            f"weight {spec.name!r} of shape {shape} cannot be {n}:{m}: N:M needs 2+ dims and an input size "
            f"({what} = {inner}) divisible by {m}; give N:M only to the weights that fit, with `nm_sparsity_map`"
        )
    if spec.target is not None:
        raise HParamsError(
            f"weight {spec.name!r} has both a `weight_sparsity_map` target ({spec.target}) and N:M {n}:{m}, whose "
            f"target is 1 - N/M = {1 - n / m}: give it one of the two"
        )
    if spec.block_dims != (1, 1):
        raise HParamsError(
            f"weight {spec.name!r} has block dims {spec.block_dims[0]}x{spec.block_dims[1]} and N:M {n}:{m}; both "
            "cannot hold (N:M keeps N of every M elements, blocks prune whole blocks): give it one of the two"
        )
    return 1.0 - n / m


def _structure(model: nn.Module) -> tuple:
    """The module tree and its parameters (module and parameter ids, shapes, trainability), cheaply."""
    out: list = []
    stack = [model]
    while stack:
        module = stack.pop()
        out.append(id(module))
        for name, p in module._parameters.items():
            if p is not None:
                out.append((name, id(p), p.requires_grad, p.shape))
        for name, child in module._modules.items():
            if child is not None:
                out.append(name)
                stack.append(child)
    return tuple(out)


class ModelWatch:
    """Notices a model that changed after binding: a pruned weight replaced is an error, one added a warning."""

    def __init__(self, model: nn.Module, hp: PruningHParams) -> None:
        self.model, self.hp = model, hp
        self._signature: tuple | None = None
        self._warned: set[str] = set()

    def check(self, states: dict[str, WeightState]) -> None:
        """Raise ``ValueError`` if a pruned weight was replaced or changed shape; warn once about new ones."""
        signature = _structure(self.model)
        if signature == self._signature:
            return  # same modules, parameter objects, shapes and trainability as at the last check
        params = dict(self.model.named_parameters())
        for s in states.values():
            if params.get(s.name) is not s.param:
                raise ValueError(
                    f"pruned weight {s.name!r} was removed or replaced in the model after pruning was set up; "
                    "build a new Pruning/PruningCallback for the new model"
                )
            if s.param.shape != s.mask.shape:
                raise ValueError(
                    f"pruned weight {s.name!r} has shape {tuple(s.param.shape)} but its mask {tuple(s.mask.shape)}: "
                    "the model changed after pruning was set up (structured pruning, a replaced layer); build a new "
                    "Pruning/PruningCallback for the new model"
                )
        try:
            now = select_weights(self.model, self.hp.prune_patterns, self.hp.exclude_patterns)
        except HParamsError:  # a pattern that matched at binding no longer does: nothing new to report
            return
        self._signature = signature
        new = [n for n in now if n not in states and n not in self._warned]
        if new:
            self._warned.update(new)
            warnings.warn(
                f"weights {new} became candidates for pruning after it was set up (added to the model, or "
                "unfrozen) and are not pruned; build a new Pruning/PruningCallback to prune them",
                stacklevel=4,
            )
