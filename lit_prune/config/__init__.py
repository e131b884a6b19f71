"""The pruning specification: one dataclass (:class:`PruningHParams`) and TF's ``name=value,...`` grammar.

Plain Python: no torch, Lightning or Hydra.
"""

from lit_prune.config.hparams import HParamsError, PruningHParams, get_pruning_hparams

__all__ = ["HParamsError", "PruningHParams", "get_pruning_hparams"]
