"""TF's pruning summaries (``add_pruning_summaries``): the values, under TF's tag names."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from lit_prune.engine.pruning import Pruning

__all__ = ["tf_summaries"]


def tf_summaries(pruning: Pruning, step: int | None = None) -> dict[str, Tensor | float | int]:
    """``<name>_summaries/sparsity``, ``.../last_mask_update_step`` and per weight its mask sparsity and threshold.

    ``<name>_summaries/sparsity`` is the scheduled global sparsity at ``step`` (default: the last
    update); per weight, ``<name>_summaries/<weight>/mask/sparsity`` and
    ``<name>_summaries/<weight>/threshold/threshold`` (0-d tensors, so building the dict does not
    synchronise), and lit_prune's ``<name>_summaries/<weight>/target_sparsity``: the weight's final
    target (its map entry, its ``allocation`` share, N:M's ``1 - N/M``, or ``target_sparsity``).

    Example::

        >>> import torch
        >>> from lit_prune import Pruning
        >>> sorted(tf_summaries(Pruning(torch.nn.Linear(4, 4)), step=0))[:2]
        ['model_pruning_summaries/last_mask_update_step', 'model_pruning_summaries/sparsity']
    """
    prefix = f"{pruning.hparams.name}_summaries"
    step = pruning.last_update_step if step is None else step
    out: dict[str, Tensor | float | int] = {
        f"{prefix}/sparsity": pruning.sparsity(step),
        f"{prefix}/last_mask_update_step": pruning.last_update_step,
    }
    thresholds, targets = pruning.get_thresholds(), pruning.weight_targets()
    for name, value in pruning.get_weight_sparsity().items():
        out[f"{prefix}/{name}/mask/sparsity"] = value
        out[f"{prefix}/{name}/target_sparsity"] = targets[name]
        out[f"{prefix}/{name}/threshold/threshold"] = thresholds[name]
    return out
