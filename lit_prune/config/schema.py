"""Views of the one schema, :class:`~lit_prune.config.hparams.PruningHParams`: Hydra's and the README's.

Both are derived from :func:`~lit_prune.config.hparams.field_specs` (the dataclass's fields,
annotations, defaults and ``metadata["doc"]``); nothing here lists a field by hand.

Plain Python: the Hydra schema is a plain dataclass, which ``lit_prune.cli.app`` registers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from lit_prune.config.hparams import FieldSpec, field_specs

__all__ = ["markdown_table", "structured_schema"]

_SCHEMA_TYPES: dict[str, Any] = {"int": int, "float": float, "str": str, "bool": bool, "map": Any, "list": Any}


@functools.cache
def structured_schema() -> type:
    """The Hydra/OmegaConf schema of a pruning spec: ``PruningHParams``'s fields, types and defaults.

    The regex maps and pattern lists are typed ``Any`` with a ``null`` default, so that a command
    line may set them in TF's list form or as a ``{regex: value}`` mapping (and clear them with
    ``null``); a ``Literal`` field is a ``str``.  ``PruningHParams`` validates entries, choices and
    ranges when a run starts.  The same class is returned on every call.

    Example::

        >>> import dataclasses
        >>> schema = structured_schema()
        >>> [(f.name, f.type, f.default) for f in dataclasses.fields(schema)][2:4]
        [('end_pruning_step', <class 'int'>, -1), ('weight_sparsity_map', typing.Any, None)]
    """
    fields = []
    for spec in field_specs():
        default = None if spec.kind in ("map", "list") else spec.default
        fields.append((spec.name, _SCHEMA_TYPES[spec.kind], dataclasses.field(default=default)))
    return dataclasses.make_dataclass("PruningSchema", fields)


def _type_text(spec: FieldSpec) -> str:
    if spec.choices:
        quoted = [f'`"{c}"`' for c in spec.choices]
        return ", ".join(quoted[:-1]) + " or " + quoted[-1]
    if spec.kind == "map":
        return "`list[str]` or mapping"
    if spec.kind == "list":
        return "`list[str]`"
    return f"`{spec.kind}`"


def _default_text(value: Any) -> str:
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    if isinstance(value, list):
        return "`[]`" if not value else f"`{value}`"
    return str(value)


def _cell(text: str) -> str:
    # GitHub's tables split cells on every unescaped `|`, inside code spans too.
    return text.replace("|", "\\|")


def markdown_table() -> str:
    """The README's hparams table: one row per field (name, type, default, doc), in declaration order.

    Every ``|`` inside a cell is escaped, so each row has the header's four cells.  The README
    holds this between ``<!-- hparams-table:start -->`` and ``<!-- hparams-table:end -->``;
    ``python scripts/update_readme_hparams.py`` rewrites it there.

    Example::

        >>> print(markdown_table().splitlines()[2])
        | `name` | `str` | `model_pruning` | Name of the specification; prefixes the summaries: `<name>_summaries/...` |
    """
    rows = ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
    for spec in field_specs():
        cells = [f"`{spec.name}`", _type_text(spec), _default_text(spec.default), spec.doc]
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(rows) + "\n"
