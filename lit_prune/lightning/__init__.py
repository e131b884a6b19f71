"""The Lightning glue: :class:`PruningCallback` (gradual magnitude pruning) and :class:`StructuredPruningCallback`."""

from lit_prune.lightning.pruning_callback import PruningCallback, strip_checkpoint
from lit_prune.lightning.structured_callback import StructuredPruningCallback

__all__ = ["PruningCallback", "StructuredPruningCallback", "strip_checkpoint"]
