"""Which convolution kernels can be removed, and their removal, on Torch-Pruning's dependency graph.

A *group* is the set of coupled channels that must go together: a conv's output channels, the
BatchNorm channels after it, the input slices of the convs and linear layers that read them, and,
across a residual add or a depthwise conv, every other layer sharing those channels.  Torch-Pruning
(``torch_pruning.DependencyGraph``, DepGraph, CVPR 2023) traces one forward pass and finds them;
lit_prune uses it for the surgery rather than tracing the graph by hand.

The model is traced with one forward call on example inputs: a tensor (``model(x)``), a tuple of
positional arguments, a dict of keyword arguments, or a :class:`ModelInputs` with both.
:func:`resize_to_state_dict` rebuilds a pruned structure from a ``state_dict``'s shapes alone (no
tracing), so that a fresh model can load a pruned model's weights.

Each group is named after its first conv (its *root*); its kernel count is its channel count, so
coupled residual channels are counted once.  The *gates* of a group are the tensors whose channel
``k`` carries the group's channel ``k`` into the rest of the network: the output of each BatchNorm
in the group, and of each conv in it that no BatchNorm follows.  Zeroing channel ``k`` of every gate
is exactly what removing the channel does to the network's output, which is what the scores measure.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

__all__ = [
    "KernelGroup",
    "ModelInputs",
    "build_groups",
    "count_macs_and_params",
    "prune_groups",
    "resize_to_state_dict",
]

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


def _map_tensors(value: Any, fn: Callable[[Tensor], Any]) -> Any:
    """``value`` with ``fn`` applied to every tensor in it (through tuples, lists and mappings)."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(_map_tensors(v, fn) for v in value))
    if isinstance(value, tuple | list):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, Mapping):
        mapped = {k: _map_tensors(v, fn) for k, v in value.items()}
        try:
            return type(value)(mapped)  # a dict subclass or an HF-style mapping keeps its type
        except Exception:  # a mapping type that cannot be built from a dict
            return mapped
    return value


@dataclass
class ModelInputs:
    """The positional and keyword arguments of one forward call, ``model(*args, **kwargs)``: what is traced.

    Example::

        >>> inputs = ModelInputs((torch.zeros(4, 3),), {"mask": torch.ones(4, 3)})
        >>> inputs(lambda x, mask: (x + mask).shape)
        torch.Size([4, 3])
        >>> inputs.first_sample().args[0].shape, ModelInputs.of(torch.zeros(2)).args[0].shape
        (torch.Size([1, 3]), torch.Size([2]))
    """

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, example_inputs: Any) -> ModelInputs:
        """Torch-Pruning's convention: a dict holds keyword arguments, a tuple or list positional ones."""
        if isinstance(example_inputs, ModelInputs):
            return example_inputs
        if isinstance(example_inputs, Mapping):
            return cls((), dict(example_inputs))
        if isinstance(example_inputs, tuple | list):
            return cls(tuple(example_inputs), {})
        return cls((example_inputs,), {})

    def __call__(self, model: Callable[..., Any]) -> Any:
        """``model(*args, **kwargs)``."""
        return model(*self.args, **self.kwargs)

    def map(self, fn: Callable[[Tensor], Any]) -> ModelInputs:
        """The same call with ``fn`` applied to every tensor."""
        return ModelInputs(_map_tensors(self.args, fn), _map_tensors(self.kwargs, fn))

    def first_sample(self) -> ModelInputs:
        """One example: every tensor whose first dimension is the batch size (that of the first tensor) sliced to 1."""
        sizes: list[int] = []
        self.map(lambda t: sizes.append(t.shape[0]) if t.dim() else None)
        if not sizes:
            return self
        batch = sizes[0]
        return self.map(lambda t: t[:1] if t.dim() and t.shape[0] == batch else t)


class _Call(nn.Module):
    """``model`` called on fixed inputs (so that Torch-Pruning's counter can run any call)."""

    def __init__(self, model: nn.Module, inputs: ModelInputs) -> None:
        super().__init__()
        self.model = model
        self.inputs = inputs

    def forward(self, *batch: Any) -> Any:  # `batch`: a dummy, which Torch-Pruning's counter sizes the batch by
        return self.inputs(self.model)


def _tensors(value: Any) -> list[Tensor]:
    """Every tensor in an output (tuples, lists, dicts, HF-style output mappings; ``None`` entries skipped)."""
    found: list[Tensor] = []
    _map_tensors(value, found.append)
    return found


def _trace(model: nn.Module, example_inputs: Any) -> tp.DependencyGraph:
    inputs = ModelInputs.of(example_inputs)
    return tp.DependencyGraph().build_dependency(
        model, example_inputs=inputs, forward_fn=lambda m, i: i(m), output_transform=_tensors, verbose=False
    )


def build_groups(model: nn.Module, example_inputs: Any) -> tuple[tp.DependencyGraph, list[KernelGroup]]:
    """Trace ``model`` once and list its prunable kernel groups.

    ``example_inputs``: a tensor, a tuple of positional arguments, a dict of keyword arguments or a
    :class:`ModelInputs`.

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
        graph = _trace(model, example_inputs)
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


def _masks_of(module: nn.Module) -> list[tuple[str, str]]:
    """``(mask buffer, parameter)`` pairs of a layer: bool buffers shaped like one of its parameters (masked layers)."""
    params = [(n, p.shape) for n, p in module.named_parameters(recurse=False)]
    pairs = []
    for name, buffer in module.named_buffers(recurse=False):
        if buffer is not None and buffer.dtype == torch.bool:
            match = next((n for n, shape in params if shape == buffer.shape), None)
            if match is not None:
                pairs.append((name, match))
    return pairs


def prune_groups(model: nn.Module, example_inputs: Any, remove: dict[str, list[int]]) -> None:
    """Remove, in place, the channels ``remove[group name]`` of each group (a fresh trace of ``model``).

    A masked layer's bool mask buffers (shaped like a weight) follow their weight's new shape; they
    must keep everything (a magnitude mask that already prunes would lose its meaning).

    Raises:
        StructuredPruningError: a removal that would empty a layer, or a layer it changes whose
            magnitude mask already prunes (nothing is changed then).
    """
    was_training = model.training
    try:
        graph = _trace(model.eval(), example_inputs)
        modules = dict(model.named_modules())
        names = {m: n for n, m in modules.items()}
        todo = [(name, sorted(idxs)) for name, idxs in remove.items() if idxs]
        masked: dict[nn.Module, list[tuple[str, str]]] = {}
        for name, idxs in todo:  # check every group first: refuse before changing anything
            group = graph.get_pruning_group(modules[name], tp.prune_conv_out_channels, idxs=idxs)
            if not graph.check_pruning_group(group):
                raise StructuredPruningError(f"removing {len(idxs)} kernels of `{name}` would empty a layer")
            for dep, _ in group:
                module = dep.target.module
                for buffer, param in _masks_of(module) if module not in masked else ():
                    pruned = int((~getattr(module, buffer)).sum())
                    if pruned:
                        raise StructuredPruningError(
                            f"`{names[module]}` holds a mask `{buffer}` that already prunes {pruned} weight(s) of "
                            f"`{param}`: structured pruning changes that layer's shape and needs its masks dense "
                            "(run structured pruning before magnitude pruning begins)"
                        )
                masked.setdefault(module, _masks_of(module))
        for name, idxs in todo:
            graph.get_pruning_group(modules[name], tp.prune_conv_out_channels, idxs=idxs).prune()
        for module, pairs in masked.items():
            for buffer, param in pairs:
                weight = getattr(module, param)
                if getattr(module, buffer).shape != weight.shape:  # kept everything: keeps everything
                    setattr(module, buffer, torch.ones_like(weight, dtype=torch.bool))
    finally:
        model.train(was_training)  # tracing ran in eval mode; training goes on in the mode it had


def count_macs_and_params(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """``(MACs, parameters)`` of one forward pass on ``example_inputs`` (Torch-Pruning's counter)."""
    was_training = model.training
    model.eval()
    try:
        macs, params = tp.utils.count_ops_and_params(_Call(model, ModelInputs.of(example_inputs)), (torch.zeros(1),))
    finally:
        model.train(was_training)
    return int(macs), int(params)


def _shape_attributes(module: nn.Module) -> None:
    """Set a resized layer's size attributes (``out_channels``, ``num_features``, ...) from its new tensors."""
    if isinstance(module, nn.modules.conv._ConvNd):
        shape = module.weight.shape
        if module.groups > 1:  # depthwise (checked before): channels in = out = groups
            module.in_channels = module.out_channels = module.groups = shape[0]
        elif module.transposed:
            module.in_channels, module.out_channels = shape[0], shape[1]
        else:
            module.out_channels, module.in_channels = shape[0], shape[1]
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.batchnorm._NormBase):  # BatchNorm, InstanceNorm
        tensor = module.weight if module.weight is not None else module.running_mean
        assert tensor is not None
        module.num_features = tensor.shape[0]
    elif isinstance(module, nn.GroupNorm):
        module.num_channels = module.weight.shape[0]
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = tuple(module.weight.shape)
    elif isinstance(module, nn.PReLU):
        module.num_parameters = module.weight.numel()
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = module.weight.shape


_RESIZABLE = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.PReLU,
    nn.Embedding,
)


def resize_to_state_dict(model: nn.Module, state_dict: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Resize ``model``'s layers in place to the shapes of ``state_dict``, so that it loads it.

    This rebuilds a structurally pruned model from its weights alone: every parameter or buffer
    whose shape differs from its entry in ``state_dict`` is replaced by zeros of that shape (the
    load fills them), and the layer's size attributes (``out_channels``, ``num_features``, ...)
    follow.  ``prefix`` is the model's key prefix in ``state_dict``.  Returns the names of the
    resized layers.

    Raises:
        StructuredPruningError: a tensor of another shape in a layer that is not a convolution,
            linear, normalisation, PReLU or embedding layer (nothing is changed then).

    Example::

        >>> model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 36, 2))
        >>> smaller = nn.Sequential(nn.Conv2d(1, 5, 3), nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(5 * 36, 2))
        >>> resize_to_state_dict(model, smaller.state_dict())
        ['0', '1', '3']
        >>> model.load_state_dict(smaller.state_dict()); model[0].out_channels, model[3].in_features
        <All keys matched successfully>
        (5, 180)
    """
    plan = []
    for name, module in model.named_modules():
        base = prefix + (f"{name}." if name else "")
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        changes = {}
        for key, tensor in tensors:
            target = state_dict.get(base + key)
            if tensor is not None and isinstance(target, Tensor) and target.shape != tensor.shape:
                changes[key] = tuple(target.shape)
        if not changes:
            continue
        grouped = isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1
        if grouped and not module.groups == module.in_channels == module.out_channels:
            raise StructuredPruningError(f"`{name}` is a grouped convolution (groups={module.groups}): cannot resize")
        if not isinstance(module, _RESIZABLE):
            listed = ", ".join(f"{k} {tuple(getattr(module, k).shape)} -> {v}" for k, v in changes.items())
            raise StructuredPruningError(
                f"`{name}` ({type(module).__name__}) cannot be resized: {listed}; lit_prune resizes convolutions, "
                "linear, normalisation, PReLU and embedding layers"
            )
        plan.append((name, module, changes))
    for _, module, changes in plan:
        for key, shape in changes.items():
            tensor = getattr(module, key)
            new = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
            if isinstance(tensor, nn.Parameter):
                setattr(module, key, nn.Parameter(new, requires_grad=tensor.requires_grad))
            else:
                setattr(module, key, new)
        _shape_attributes(module)
    return [name for name, _, _ in plan]
