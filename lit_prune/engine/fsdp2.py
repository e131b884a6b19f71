"""FSDP2's parameter swap: the engine always works on the sharded parameters.

``fully_shard`` registers each module's parameters as sharded ``DTensor``s and, around its
forward, swaps in the unsharded (all-gathered) plain tensors.  A backward swaps the sharded ones
back, but a forward without one (a validation loop, a ``no_grad`` forward) can leave them
unsharded: the root module's stay so by default.  A pruned weight found unsharded would be taken
for a different, whole weight, beside its sharded mask.  :func:`reshard` puts the sharded
parameters back first (no communication: the unsharded copies are just freed).

Example::

    >>> from torch import nn
    >>> fsdp2_modules(nn.Sequential(nn.Linear(2, 2)))  # nothing fully_shard-ed
    []
"""

from __future__ import annotations

from torch import nn

__all__ = ["fsdp2_modules", "reshard"]

try:  # torch >= 2.6
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover - older torch: no FSDP2
    FSDPModule = None  # type: ignore[assignment,misc]


def fsdp2_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that ``fully_shard`` made FSDP2 modules (each manages its own parameters)."""
    if FSDPModule is None:  # pragma: no cover - depends on the torch version
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard(modules: list[nn.Module]) -> None:
    """Register each FSDP2 module's sharded parameters again where a forward left them unsharded."""
    for module in modules:
        module.reshard()  # type: ignore[operator]  # a no-op when already sharded
