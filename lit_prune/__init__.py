"""lit_prune: TF/lingvo magnitude-based gradual pruning for PyTorch (and Lightning).

The engine (``hparams``, ``schedule``, ``masks``, ``saliency``, ``selection``, ``pruning``,
``layers``, ``strip``) is plain torch and imports neither Lightning nor Hydra.
"""

from lit_prune.hparams import HParamsError, PruningHParams, get_pruning_hparams
from lit_prune.layers import (
    MaskedConv1d,
    MaskedConv2d,
    MaskedConv3d,
    MaskedLinear,
    MaskedLSTM,
    masked_conv2d,
    masked_fully_connected,
)
from lit_prune.pruning import Pruning
from lit_prune.schedule import gradual_sparsity
from lit_prune.strip import strip_pruning_vars

__version__ = "0.1.0"

__all__ = [
    "HParamsError",
    "MaskedConv1d",
    "MaskedConv2d",
    "MaskedConv3d",
    "MaskedLSTM",
    "MaskedLinear",
    "Pruning",
    "PruningHParams",
    "get_pruning_hparams",
    "gradual_sparsity",
    "masked_conv2d",
    "masked_fully_connected",
    "strip_pruning_vars",
]
