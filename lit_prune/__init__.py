"""lit_prune: TF/lingvo magnitude-based gradual pruning for PyTorch (and Lightning).

The engine (``hparams``, ``schedule``, ``masks``, ``saliency``, ``selection``, ``pruning``,
``layers``, ``strip``) is plain torch and imports neither Lightning nor Hydra; ``callback`` is
the Lightning glue on top.
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
from lit_prune.nm import check_nm_sparse, is_nm_sparse
from lit_prune.pruning import Pruning
from lit_prune.schedule import gradual_sparsity
from lit_prune.strip import strip_pruning_vars, to_semi_structured

__version__ = "0.1.0"

_LIGHTNING = {
    "PruningCallback": "lit_prune.callback",
    "strip_checkpoint": "lit_prune.callback",
    "StructuredPruningCallback": "lit_prune.oracle.callback",
}


def __getattr__(name: str) -> object:
    # The Lightning glue is imported on first use, so `import lit_prune` stays plain torch.
    if name in _LIGHTNING:
        import importlib

        return getattr(importlib.import_module(_LIGHTNING[name]), name)
    raise AttributeError(f"module 'lit_prune' has no attribute {name!r}")


__all__ = [
    "HParamsError",
    "MaskedConv1d",
    "MaskedConv2d",
    "MaskedConv3d",
    "MaskedLSTM",
    "MaskedLinear",
    "Pruning",
    "PruningCallback",
    "StructuredPruningCallback",
    "check_nm_sparse",
    "is_nm_sparse",
    "PruningHParams",
    "get_pruning_hparams",
    "gradual_sparsity",
    "masked_conv2d",
    "masked_fully_connected",
    "strip_checkpoint",
    "strip_pruning_vars",
    "to_semi_structured",
]
