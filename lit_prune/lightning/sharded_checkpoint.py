"""Masks of sharded weights in Lightning checkpoints: each process saves and loads its own part.

``Pruning.state_dict()`` holds the masks and saliency state of sharded weights as ``DTensor``s.
Lightning pickles a callback's state from rank 0 alone, which would keep rank 0's shards only, so
:class:`~lit_prune.PruningCallback` moves them out of its state when a checkpoint is written:

- with a distributed checkpoint (``ModelParallelStrategy``'s default), into the checkpoint's
  ``state_dict`` under ``lit_prune/<callback state key>/<path>`` keys, which
  ``torch.distributed.checkpoint`` writes sharded, each process its part; the callback's state
  lists them, and they are read back (each process its part) when the callback binds;
- with a single-file checkpoint (``save_distributed_checkpoint=False``), gathered into whole
  tensors, as the weights are.

:func:`strip_distributed_checkpoint` turns such a checkpoint directory into a plain ``state_dict``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lit_prune.engine.sharding import is_sharded

__all__ = ["PREFIX", "dcp_key", "load_sharded", "put_back", "read_distributed_checkpoint", "take_sharded"]

#: The first part of the keys under which sharded pruning state lies in a checkpoint's ``state_dict``.
PREFIX = "lit_prune"


def dcp_key(state_key: str, path: str) -> str:
    """The checkpoint ``state_dict`` key of one sharded tensor of the callback whose state key is ``state_key``."""
    return f"{PREFIX}/{state_key}/{path}"


def take_sharded(pruning_state: dict[str, Any]) -> dict[str, Tensor]:
    """Remove the ``DTensor``s from a ``Pruning.state_dict()``, in place, and return them by path.

    The paths are ``"masks/<weight>"`` and ``"saliency/<weight>/<key>"``.
    """
    found = {f"masks/{n}": t for n, t in pruning_state.get("masks", {}).items() if is_sharded(t)}
    for name, tensors in pruning_state.get("saliency", {}).items():
        found.update({f"saliency/{name}/{k}": t for k, t in tensors.items() if is_sharded(t)})
    for path in found:
        put_back(pruning_state, {path: None})
    return found


def put_back(pruning_state: dict[str, Any], tensors: dict[str, Tensor | None]) -> None:
    """Set (or, for ``None``, remove) the tensors that :func:`take_sharded` names, in place."""
    for path, tensor in tensors.items():
        kind, _, rest = path.partition("/")
        where = pruning_state[kind]
        if kind == "saliency":
            name, _, rest = rest.rpartition("/")
            where = where.setdefault(name, {})
        if tensor is None:
            where.pop(rest, None)
        else:
            where[rest] = tensor


def load_sharded(checkpoint_dir: str | Path, state_key: str, templates: dict[str, Tensor]) -> dict[str, Tensor]:
    """Read the sharded tensors ``templates`` names from a distributed checkpoint, each process its part.

    ``templates`` maps each path to a ``DTensor`` laid out as the tensor to read (its values are
    overwritten).

    Raises:
        ValueError: the checkpoint lacks one of them (names the path).
    """
    import torch.distributed.checkpoint as dcp

    state = {"state_dict": {dcp_key(state_key, path): t for path, t in templates.items()}}
    try:
        dcp.load(state, checkpoint_id=str(checkpoint_dir))
    except Exception as error:  # DCP raises a CheckpointException that wraps each rank's error
        raise ValueError(
            f"{checkpoint_dir}: could not read the sharded pruning state of `{state_key}` "
            f"({sorted(templates)[:3]}...): {str(error)[:300]}"
        ) from error
    return {path: state["state_dict"][dcp_key(state_key, path)] for path in templates}


def read_distributed_checkpoint(checkpoint_dir: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The whole model ``state_dict`` and the metadata (callbacks' state, ...) of a Lightning distributed checkpoint.

    Runs in one process, without a process group: every shard is read and put together.
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    directory = Path(checkpoint_dir)
    metadata = directory / "meta.pt"
    if not metadata.is_file():
        raise ValueError(f"{directory} is not a Lightning distributed checkpoint (no meta.pt in it)")
    with tempfile.TemporaryDirectory(dir=directory.parent) as scratch:
        whole = os.path.join(scratch, "whole.pt")
        dcp_to_torch_save(str(directory), whole)
        model_state = torch.load(whole, map_location="cpu", weights_only=True)["state_dict"]
    return model_state, torch.load(metadata, map_location="cpu", weights_only=True)
