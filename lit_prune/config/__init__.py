"""The pruning specification: one dataclass (:class:`PruningHParams`) and TF's ``name=value,...`` grammar.

``hparams`` holds the dataclass (the single source of field names, types, defaults and docs),
``grammar`` TF's string grammar, ``schema`` the views derived from the dataclass (the Hydra
schema, the README table).  Plain Python: no torch, Lightning, Hydra or OmegaConf.
"""

from lit_prune.config.errors import HParamsError
from lit_prune.config.grammar import format_hparams_string, parse_hparams_string, split_list
from lit_prune.config.hparams import FieldSpec, PruningHParams, field_specs, get_pruning_hparams
from lit_prune.config.schema import markdown_table, structured_schema

__all__ = [
    "FieldSpec",
    "HParamsError",
    "PruningHParams",
    "field_specs",
    "format_hparams_string",
    "get_pruning_hparams",
    "markdown_table",
    "parse_hparams_string",
    "split_list",
    "structured_schema",
]
