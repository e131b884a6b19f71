"""FSDP2 for the Hydra app's models: under ``ModelParallelStrategy`` they shard themselves in ``configure_model``.

``lit-prune trainer=fsdp2_cpu`` (or ``fsdp2_gpu``) runs Lightning's ``ModelParallelStrategy``,
which hands each module a device mesh in ``configure_model``.  :class:`FullyShardsNet` answers it
the usual FSDP2 way: each unit of ``self.net`` is ``fully_shard``-ed on the data-parallel mesh,
then ``self.net`` itself.  The units are a ``transformers`` model's repeated blocks (its
``_no_split_modules``, e.g. ``GPT2Block``), otherwise every layer that holds weights of its own.
Without that strategy (``device_mesh`` is ``None``) nothing happens.

Example::

    >>> from torch import nn
    >>> attention = nn.MultiheadAttention(4, 2)  # weights of its own, and an out_proj Linear inside
    >>> [type(m).__name__ for m in shard_units(nn.Sequential(nn.Linear(2, 4), attention))]
    ['NonDynamicallyQuantizableLinear', 'MultiheadAttention', 'Linear']
"""

from __future__ import annotations

from torch import nn

__all__ = ["FullyShardsNet", "fully_shard_net", "shard_units"]


def shard_units(net: nn.Module) -> list[nn.Module]:
    """The modules of ``net`` to ``fully_shard`` one by one (each gathers its weights when it runs).

    A ``transformers`` model's ``_no_split_modules`` blocks where it names some, else every module
    with parameters of its own (``Linear``, ``Conv2d``, ``Embedding``, norms); inner ones first.
    """
    blocks = set(getattr(net, "_no_split_modules", None) or ())
    units = [m for m in net.modules() if type(m).__name__ in blocks]
    if not units:
        units = [m for m in net.modules() if m is not net and any(True for _ in m.parameters(recurse=False))]
    return units[::-1]  # inner modules first: FSDP2 shards bottom-up (a unit inside another one)


def fully_shard_net(net: nn.Module, device_mesh) -> None:  # noqa: ANN001 - a torch DeviceMesh
    """``fully_shard`` ``net``'s units, then ``net``, on ``device_mesh``'s data-parallel dimension.

    Raises:
        ValueError: the mesh has a tensor-parallel dimension larger than 1 (these models have no
            tensor-parallel plan: write ``configure_model`` for one).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(net, FSDPModule):  # Lightning calls configure_model again for each stage (fit, test)
        return
    names = device_mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and device_mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            "the lit-prune models shard with FSDP2 only: set trainer.strategy.tensor_parallel_size=1 "
            f"(got {device_mesh['tensor_parallel'].size()}), or write a LightningModule whose configure_model "
            "applies a tensor-parallel plan (see docs/guide/sharded.md)"
        )
    mesh = device_mesh["data_parallel"] if "data_parallel" in names else device_mesh
    for unit in shard_units(net):
        fully_shard(unit, mesh=mesh)
    fully_shard(net, mesh=mesh)


class FullyShardsNet:
    """Mixin for a ``LightningModule`` holding ``self.net``: FSDP2 under ``ModelParallelStrategy``."""

    net: nn.Module

    def configure_model(self) -> None:
        """Shard ``self.net`` when the strategy gives a device mesh (``ModelParallelStrategy``)."""
        mesh = getattr(self, "device_mesh", None)
        if mesh is not None:
            fully_shard_net(self.net, mesh)
