"""Which convolution kernels can be removed, and their removal, on Torch-Pruning's dependency graph.

A *group* is the set of coupled channels that must go together: a conv's output channels, the
BatchNorm channels after it, the input slices of the convs and linear layers that read them, and,
across a residual add or a depthwise conv, every other layer sharing those channels.  Torch-Pruning
(``torch_pruning.DependencyGraph``, DepGraph, CVPR 2023) traces one forward pass and finds them;
lit_prune uses it for the surgery rather than tracing the graph by hand.

Each group is named after its first conv (its *root*); its kernel count is its channel count, so
coupled residual channels are counted once.  The *gates* of a group are the tensors whose channel
``k`` carries the group's channel ``k`` into the rest of the network: the output of each BatchNorm
in the group, and of each conv in it that no BatchNorm follows.  Zeroing channel ``k`` of every gate
is exactly what removing the channel does to the network's output, which is what the scores measure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

__all__ = ["KernelGroup", "build_groups", "count_macs_and_params", "prune_groups"]

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class StructuredPruningError(ValueError):
    """A structured-pruning request that cannot be carried out; the message says why."""


@dataclass
class KernelGroup:
    """Coupled conv kernels that are removed together."""

    name: str  # the root conv's qualified name
    channels: int
    convs: list[str] = field(default_factory=list)  # convs whose output channels are in the group
    gates: list[str] = field(default_factory=list)  # modules whose outputs carry the group's channels


def build_groups(model: nn.Module, example_inputs: torch.Tensor) -> tuple[tp.DependencyGraph, list[KernelGroup]]:
    """Trace ``model`` once and list its prunable kernel groups.

    A conv whose output is a network output, and linear layers, are never roots (HALCON removes
    conv kernels only); a grouped convolution that is not depthwise is refused.

    Raises:
        StructuredPruningError: an unsupported layer, or no prunable conv at all.
    """
    names = {m: n for n, m in model.named_modules()}
    order = {m: i for i, m in enumerate(names)}
    for name, module in model.named_modules():
        is_conv = isinstance(module, nn.Conv2d | nn.Conv1d | nn.Conv3d)
        if is_conv and module.groups > 1 and not (module.groups == module.in_channels == module.out_channels):
            raise StructuredPruningError(
                f"`{name}` is a grouped convolution (groups={module.groups}, not depthwise): unsupported; "
                "only plain and depthwise convolutions can lose kernels"
            )
    was_training = model.training
    model.eval()
    try:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    finally:
        model.train(was_training)
    outputs = [m for m, node in graph.module2node.items() if isinstance(m, nn.Conv2d) and not node.outputs]
    ignored = [m for m in model.modules() if isinstance(m, nn.Linear)] + outputs
    groups = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        members = [(dep.target.module, dep.handler) for dep, _ in group]
        out_convs = [
            m
            for m, h in members
            if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d) and graph.is_out_channel_pruning_fn(h)
        ]
        if not out_convs or any(m in outputs for m in out_convs):
            continue
        norms = [m for m, h in members if isinstance(m, _NORMS)]
        gates = list(norms)
        for conv in out_convs:
            followers = [n.module for n in graph.module2node[conv].outputs]
            if not any(f in norms for f in followers):
                gates.append(conv)
        out_convs.sort(key=order.__getitem__)
        root = out_convs[0]  # the group is named after its first conv in model order
        groups.append(
            KernelGroup(
                name=names[root],
                channels=graph.get_out_channels(root),
                convs=[names[m] for m in out_convs],
                gates=[names[m] for m in sorted(gates, key=order.__getitem__)],
            )
        )
    if not groups:
        raise StructuredPruningError("the model has no prunable convolution kernels")
    groups.sort(key=lambda g: order[dict(model.named_modules())[g.name]])
    return graph, groups


def prune_groups(model: nn.Module, example_inputs: torch.Tensor, remove: dict[str, list[int]]) -> None:
    """Remove, in place, the channels ``remove[group name]`` of each group (a fresh trace of ``model``)."""
    was_training = model.training
    try:
        graph = tp.DependencyGraph().build_dependency(model.eval(), example_inputs=example_inputs)
        modules = dict(model.named_modules())
        for name, idxs in remove.items():
            if not idxs:
                continue
            group = graph.get_pruning_group(modules[name], tp.prune_conv_out_channels, idxs=sorted(idxs))
            if not graph.check_pruning_group(group):
                raise StructuredPruningError(f"removing {len(idxs)} kernels of `{name}` would empty a layer")
            group.prune()
    finally:
        model.train(was_training)  # tracing ran in eval mode; training goes on in the mode it had


def count_macs_and_params(model: nn.Module, example_inputs: torch.Tensor) -> tuple[int, int]:
    """``(MACs, parameters)`` of one forward pass on ``example_inputs`` (Torch-Pruning's counter)."""
    was_training = model.training
    model.eval()
    try:
        macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    finally:
        model.train(was_training)
    return int(macs), int(params)
