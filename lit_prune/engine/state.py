"""The one home of each pruned weight's pruning state: its mask, threshold and saliency state.

A :class:`WeightState` knows where its parameter lives (the owning module and the attribute
name) and holds the tensors that prune it.  A masked layer (:class:`~lit_prune.MaskedLinear`,
...) keeps its mask and threshold as buffers, which its ``forward`` reads: the state then *is*
those buffers, looked up again by :meth:`WeightState.follow`.  Nothing moves as a side effect of
being read: :meth:`WeightState.follow` is the one step that brings the state to its weight's
device after ``model.to()`` (or after a model bound on ``meta`` is materialised), and the engine
calls it at the start of each update, each ``apply_mask`` and each getter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lit_prune.engine.layers import MaskedModule
from lit_prune.engine.saliency import init_saliency_state
from lit_prune.engine.sharding import is_sharded, local, local_region, shard_like

__all__ = ["WeightSpec", "WeightState", "check_saved_state", "load_states", "save_states"]


@dataclass(frozen=True)
class WeightSpec:
    """What binding decided for one weight: its name and its own settings."""

    name: str
    target: float | None  # its weight_sparsity_map (or N:M) target, if any
    block_dims: tuple[int, int]
    nm: tuple[int, int] | None = None  # N:M semi-structured, if any
    joint: bool = False  # ranked with the other joint weights under one threshold (allocation=global)
    input_dims: tuple[int, ...] | None = None  # N:M: the dims its groups run along (its layer's input dims)


@dataclass
class WeightState:
    """One pruned weight: where its parameter lives, and its mask, threshold and saliency state.

    Example::

        >>> layer = nn.Linear(4, 2)
        >>> state = WeightState.bind(WeightSpec("weight", None, (1, 1)), layer, "weight", "weight")
        >>> state.mask.shape, state.mask.dtype, float(state.threshold)
        (torch.Size([2, 4]), torch.bool, 0.0)
    """

    spec: WeightSpec
    module: nn.Module
    param_name: str
    mask: Tensor
    threshold: Tensor
    saliency: dict[str, Tensor] = field(default_factory=dict)
    buffer_names: tuple[str, str] | None = None  # a masked layer's (mask, threshold) buffers
    dense: bool = True  # the mask keeps everything (as known since the last update or load)

    @classmethod
    def bind(cls, spec: WeightSpec, module: nn.Module, param_name: str, prune_option: str) -> WeightState:
        """The state of ``module.<param_name>``: the masked layer's buffers, or a new all-kept mask."""
        param = getattr(module, param_name)
        saliency = init_saliency_state(local(param).detach(), prune_option)
        if isinstance(module, MaskedModule) and param_name in module.masked_weight_names:
            if is_sharded(param):
                layer = type(module).__name__.removeprefix("FSDP")  # FSDP2 renames the class it wraps
                raise ValueError(
                    f"pruned weight {spec.name!r} is sharded (a DTensor) but its {layer} keeps a whole "
                    "mask as a buffer, which FSDP2 and tensor parallelism do not shard: shard plain layers instead "
                    "(nn.Linear, nn.Conv2d, ...; lit_prune keeps their masks sharded like the weights), e.g. "
                    "digits_cnn(masked=False)"
                )
            names = module.mask_buffer_names(param_name)
            mask, threshold = module._buffers[names[0]], module._buffers[names[1]]
            return cls(spec, module, param_name, mask, threshold, saliency, names, dense=False)  # type: ignore[arg-type]
        mask = torch.ones_like(local(param), dtype=torch.bool)
        if is_sharded(param):  # the mask is sharded as its weight is
            mask = shard_like(mask, param)
        threshold = torch.zeros((), dtype=torch.float32, device=local(param).device)
        return cls(spec, module, param_name, mask, threshold, saliency)

    @property
    def name(self) -> str:
        """The parameter's name, as ``model.named_parameters()`` gives it."""
        return self.spec.name

    @property
    def param(self) -> nn.Parameter:
        """The pruned parameter (looked up on its module: ``param.data = ...`` is seen)."""
        found = self.module._parameters.get(self.param_name)
        return found if found is not None else getattr(self.module, self.param_name)

    @property
    def local_param(self) -> Tensor:
        """This process's part of the parameter (the whole of it unless it is sharded), detached."""
        return local(self.param).detach()

    @property
    def local_mask(self) -> Tensor:
        """This process's part of the mask."""
        return local(self.mask)

    def follow(self) -> None:
        """Bring the state to where the weight is: a masked layer's current buffers, the weight's device.

        A state made on ``meta`` (a model bound before it was materialised) held no data: it
        starts again all kept, with zero threshold and saliency state.
        """
        if self.buffer_names is not None:
            self.mask = self.module._buffers[self.buffer_names[0]]  # type: ignore[assignment]
            self.threshold = self.module._buffers[self.buffer_names[1]]  # type: ignore[assignment]
        device = local(self.param).device
        if is_sharded(self.mask):
            return  # moved with its weight's mesh, or not at all
        if self.mask.device != device:
            if self.mask.is_meta:
                self.mask = torch.ones(self.mask.shape, dtype=torch.bool, device=device)
                self.threshold = torch.zeros((), dtype=torch.float32, device=device)
            else:
                self.mask, self.threshold = self.mask.to(device), self.threshold.to(device)
        for key, value in self.saliency.items():
            if value.device != device:
                self.saliency[key] = torch.zeros_like(value, device=device) if value.is_meta else value.to(device)


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def check_saved_state(states: dict[str, WeightState], saved: Mapping[str, Any], version: int, saliency: tuple) -> None:
    """Raise ``ValueError`` unless ``saved`` (a ``Pruning.state_dict()``) fits ``states``; nothing is changed."""
    if not isinstance(saved, Mapping):
        raise ValueError(f"pruning state must be a mapping, got {type(saved).__name__} (corrupted checkpoint?)")
    if saved.get("version") != version:
        raise ValueError(
            f"pruning state version {saved.get('version')!r} is not supported (this lit_prune reads {version}); "
            "it was written by another lit_prune version: strip it with that version, or re-run pruning"
        )
    missing_keys = sorted({"last_update_step", "masks", "thresholds"} - set(saved))
    if missing_keys:
        raise ValueError(f"pruning state lacks {missing_keys} (corrupted checkpoint?)")
    masks, thresholds = saved["masks"], saved["thresholds"]
    if not isinstance(masks, Mapping) or not isinstance(thresholds, Mapping):
        raise ValueError("pruning state: `masks` and `thresholds` must map weight names to tensors")
    if set(masks) != set(states) or set(thresholds) != set(states):
        missing, extra = sorted(set(states) - set(masks)), sorted(set(masks) - set(states))
        raise ValueError(f"pruning state does not match the pruned weights: missing {missing}, unexpected {extra}")
    for name, s in states.items():
        mask, threshold = masks[name], thresholds[name]
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise ValueError(f"pruning state: mask of {name!r} must be a bool tensor, got {_describe(mask)}")
        if tuple(mask.shape) != tuple(s.param.shape):
            raise ValueError(
                f"pruning state: mask of {name!r} has shape {tuple(mask.shape)}, the weight has {tuple(s.param.shape)}"
            )
        if not isinstance(threshold, Tensor) or threshold.numel() != 1 or not threshold.is_floating_point():
            raise ValueError(
                f"pruning state: threshold of {name!r} must be a one-element float tensor, got {_describe(threshold)}"
            )
        if saliency and set(saved.get("saliency", {}).get(name, {})) != set(saliency):
            raise ValueError(f"pruning state: saliency of {name!r} must hold {sorted(saliency)}")


def _saved(t: Tensor, param: Tensor) -> Tensor:
    """A CPU copy of ``t`` (a mask or saliency tensor of ``param``); a copy laid out as ``param`` if it is sharded."""
    if is_sharded(param):
        return shard_like(local(t).detach().clone(), param)
    return t.detach().cpu().clone()


def save_states(states: dict[str, WeightState]) -> dict[str, Any]:
    """Masks, thresholds and saliency state as CPU tensors (loadable with ``weights_only=True``).

    The masks and saliency state of sharded weights are ``DTensor``s laid out as their weights, on
    their devices (each process holds its part): save them with ``torch.distributed.checkpoint``,
    or gather them (``full_tensor()``).
    """
    return {
        "masks": {n: _saved(s.mask, s.param) for n, s in states.items()},
        "thresholds": {n: s.threshold.detach().cpu().clone() for n, s in states.items()},
        "saliency": {
            n: {k: _saved(v, s.param) for k, v in s.saliency.items()} for n, s in states.items() if s.saliency
        },
    }


def _load_into(target: Tensor, value: Tensor, param: Tensor) -> None:
    """Copy a saved tensor into ``target`` (this process's part): from a ``DTensor``'s part, or a whole tensor's."""
    if is_sharded(value):
        target.copy_(local(value))
    elif is_sharded(param):  # a whole (gathered) tensor: this process's region of it
        target.copy_(value[tuple(slice(a, b) for a, b in local_region(param))])
    else:
        target.copy_(value)


@torch.no_grad()
def load_states(states: dict[str, WeightState], saved: Mapping[str, Any]) -> None:
    """Copy what :func:`save_states` saved into ``states`` (checked by :func:`check_saved_state` first).

    A sharded weight's mask and saliency state load from ``DTensor``s laid out as the weight, or
    from whole tensors (each process takes its region).
    """
    for name, s in states.items():
        _load_into(s.local_mask, saved["masks"][name].to(torch.bool), s.param)
        s.threshold.copy_(saved["thresholds"][name])
        for key, value in saved.get("saliency", {}).get(name, {}).items():
            _load_into(s.saliency[key], value, s.param)
        s.dense = bool(s.local_mask.all())
