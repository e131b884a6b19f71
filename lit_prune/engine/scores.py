"""The first steps of a mask update: the current masks applied, then the scores each weight is ranked by.

The update ranks the weights the model uses: a weight pruned before is zeroed first, so it ranks
last even if an optimizer step moved it since.  Scores are ``|w|`` (``prune_option="weight"``)
or a gradient saliency (:mod:`lit_prune.engine.saliency`), in float32; block pruning ranks the
scores pooled over blocks.
"""

from __future__ import annotations

import math

from torch import Tensor

from lit_prune.engine.blocks import block_grid, block_view_shape, resolve_block_dims
from lit_prune.engine.masks import zero_pruned
from lit_prune.engine.saliency import saliency_scores
from lit_prune.engine.scratch import Scratch
from lit_prune.engine.state import WeightState

__all__ = ["apply_current_masks", "block_dims_of", "ranked_numel", "scores_of"]


def apply_current_masks(states: list[WeightState]) -> None:
    """Zero what each current mask prunes (weights whose mask keeps everything are skipped)."""
    for state in states:
        if not state.dense:
            zero_pruned(state.local_param, state.local_mask)


def scores_of(state: WeightState, prune_option: str, scratch: Scratch) -> Tensor:
    """``state``'s float32 scores in ``scratch``: ``|w|`` or its saliency (the saliency state is not advanced)."""
    param = state.local_param
    return saliency_scores(param, state.saliency, prune_option, out=scratch.take(param.shape, param.device))


def block_dims_of(state: WeightState) -> tuple[int, int] | None:
    """The resolved block dims of a block-pruned weight's 2-D view (``None``: element-wise)."""
    view = block_view_shape(state.param.shape) if state.spec.block_dims != (1, 1) else None
    return None if view is None else resolve_block_dims(state.spec.block_dims, view)


def ranked_numel(state: WeightState) -> int:
    """How many scores ``state``'s whole weight is ranked by: its elements, or its blocks (all processes')."""
    dims = block_dims_of(state)
    if dims is None:
        return state.param.numel()
    return math.prod(block_grid(block_view_shape(state.param.shape), dims))  # type: ignore[arg-type]
