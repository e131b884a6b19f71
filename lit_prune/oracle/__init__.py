"""HALCON-style structured ("oracle") pruning: remove whole convolution kernels, get a smaller model.

``create_dl_pruning`` / ``set_dl_pruning_param`` / ``get_dl_pruning_param`` /
``add_dl_pruning_batch`` / ``gen_dl_pruned_model`` mirror HALCON's operators;
:class:`OraclePruning` is the same handle as an object; :func:`resize_to_state_dict` lets a fresh
model load a pruned model's weights.  Plain torch + Torch-Pruning.
"""

from lit_prune.oracle.handle import (
    OraclePruning,
    add_dl_pruning_batch,
    create_dl_pruning,
    gen_dl_pruned_model,
    get_dl_pruning_param,
    set_dl_pruning_param,
)
from lit_prune.oracle.surgery import ModelInputs, StructuredPruningError, resize_to_state_dict

__all__ = [
    "ModelInputs",
    "OraclePruning",
    "StructuredPruningError",
    "add_dl_pruning_batch",
    "create_dl_pruning",
    "gen_dl_pruned_model",
    "get_dl_pruning_param",
    "resize_to_state_dict",
    "set_dl_pruning_param",
]
