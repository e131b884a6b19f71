"""lit_prune: TF/lingvo magnitude-based gradual pruning for PyTorch (and Lightning).

``config`` (the spec) and ``engine`` (the pruning) are plain torch and import neither Lightning
nor Hydra; ``backends`` run the mask arithmetic (torch everywhere, native kernels on the CPU);
``lightning`` holds the callbacks, ``cli`` the Hydra app, ``oracle`` structured pruning.
"""

from lit_prune.config.hparams import HParamsError, PruningHParams, get_pruning_hparams
from lit_prune.engine.layers import (
    MaskedConv1d,
    MaskedConv2d,
    MaskedConv3d,
    MaskedLinear,
    MaskedLSTM,
    masked_conv2d,
    masked_fully_connected,
)
from lit_prune.engine.layouts import register_layer
from lit_prune.engine.nm import check_nm_sparse, is_nm_sparse
from lit_prune.engine.pruning import Pruning
from lit_prune.engine.schedule import gradual_sparsity
from lit_prune.engine.sensitivity import SensitivityScan, sensitivity
from lit_prune.engine.strip import strip_pruning_vars, to_semi_structured
from lit_prune.export import CompressedFileError, load_compressed, save_compressed

__version__ = "0.1.0"

_LIGHTNING = {
    "PruningCallback": "lit_prune.lightning.pruning_callback",
    "strip_checkpoint": "lit_prune.lightning.pruning_callback",
    "StructuredPruningCallback": "lit_prune.lightning.structured_callback",
    "LRRewind": "lit_prune.lightning.lr_rewind",
}


def __getattr__(name: str) -> object:
    # The Lightning glue is imported on first use, so `import lit_prune` stays plain torch.
    if name in _LIGHTNING:
        import importlib

        return getattr(importlib.import_module(_LIGHTNING[name]), name)
    raise AttributeError(f"module 'lit_prune' has no attribute {name!r}")


__all__ = [
    "CompressedFileError",
    "HParamsError",
    "LRRewind",
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
    "load_compressed",
    "PruningHParams",
    "SensitivityScan",
    "get_pruning_hparams",
    "gradual_sparsity",
    "masked_conv2d",
    "masked_fully_connected",
    "sensitivity",
    "save_compressed",
    "register_layer",
    "strip_checkpoint",
    "strip_pruning_vars",
    "to_semi_structured",
]
