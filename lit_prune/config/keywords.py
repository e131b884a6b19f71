""":class:`~lit_prune.PruningHParams`'s fields as typed keyword parameters of a constructor.

A class whose ``__init__`` takes ``**overrides`` (hyperparameters by keyword) is given, by
:func:`hparams_keywords`, a ``__signature__`` in which ``**overrides`` is replaced by one
keyword-only parameter per field (its type, its default), and an ``Args`` docstring entry per
field (its ``metadata["doc"]``).  Introspection sees the fields, so LightningCLI/jsonargparse
lists them in ``--help``, checks their types and takes them from ``class_path``/``init_args``
YAML; the function that runs is unchanged.  Everything comes from
:func:`~lit_prune.config.hparams.field_specs`: a field added to ``PruningHParams`` appears here
with no other edit.

A regex map's keyword type is ``dict[str, V] | list[str]`` (a YAML mapping or TF's list form),
``V`` the value type the field's annotation names (``float`` for ``weight_sparsity_map``);
a ``Literal`` field keeps its ``Literal``.

Plain Python: no torch, Lightning, Hydra or OmegaConf.
"""

from __future__ import annotations

import inspect
import re
import textwrap
from collections.abc import Callable, Mapping
from typing import Annotated, Any, TypeVar, get_args, get_origin, get_type_hints

from lit_prune.config.hparams import FieldSpec, PruningHParams, _Kind, field_specs

__all__ = ["field_parameters", "field_type", "hparams_keywords", "merge_keywords"]

_T = TypeVar("_T", bound=type)
_PLAIN: dict[str, Any] = {"int": int, "float": float, "bool": bool, "str": str, "list": list[str]}
#: The value type of a map whose annotation does not name one.
_ANY_MAP_VALUE = float | str | list[int]


def field_type(spec: FieldSpec) -> Any:
    """The type a keyword takes for one field: what jsonargparse checks and ``--help`` prints.

    Example::

        >>> from lit_prune.config.hparams import field_specs
        >>> specs = {s.name: s for s in field_specs()}
        >>> field_type(specs["weight_sparsity_map"])
        dict[str, float] | list[str]
        >>> field_type(specs["block_pooling_function"])
        typing.Literal['AVG', 'MAX']
    """
    if spec.kind == "map":
        values = None
        if get_origin(spec.annotation) is Annotated:
            marks = [m for m in get_args(spec.annotation)[1:] if isinstance(m, _Kind)]
            values = marks[0].values if marks else None
        return dict[str, values if values is not None else _ANY_MAP_VALUE] | list[str]
    if spec.choices:
        return spec.annotation
    return _PLAIN[spec.kind]


def field_parameters() -> list[inspect.Parameter]:
    """One keyword-only parameter per field of :class:`~lit_prune.PruningHParams`, in declaration order.

    Example::

        >>> [str(p) for p in field_parameters()[:2]]
        ["name: str = 'model_pruning'", 'begin_pruning_step: int = 0']
    """
    return [
        inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=spec.default, annotation=field_type(spec))
        for spec in field_specs()
    ]


def _doc_entries(indent: int) -> list[str]:
    lines = []
    for spec in field_specs():
        text = re.sub(r"`([^`]+)`", r"``\1``", spec.doc)  # Markdown code to reST literals
        lines += textwrap.wrap(
            f"{spec.name}: {text}.",
            width=100,
            initial_indent=" " * indent,
            subsequent_indent=" " * (indent + 4),
            break_on_hyphens=False,
        )
    return lines


def _replace_doc_entry(doc: str, var_keyword: str) -> str:
    """``doc`` with its ``**<var_keyword>:`` Args entry (and its continuation lines) replaced by the fields'."""
    lines = doc.splitlines()
    starts = [n for n, line in enumerate(lines) if line.lstrip().startswith(f"**{var_keyword}:")]
    if len(starts) != 1:
        raise TypeError(f"the docstring has no single `**{var_keyword}:` Args entry to replace")
    start = starts[0]
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = start + 1
    while end < len(lines) and len(lines[end]) - len(lines[end].lstrip()) > indent and lines[end].strip():
        end += 1
    return "\n".join(lines[:start] + _doc_entries(indent) + lines[end:]) + ("\n" if doc.endswith("\n") else "")


def hparams_keywords(var_keyword: str = "overrides") -> Callable[[_T], _T]:
    """Class decorator: ``__init__``'s ``**<var_keyword>`` shown as one typed keyword per hparams field.

    Sets ``cls.__init__.__signature__`` (``**<var_keyword>`` replaced by :func:`field_parameters`,
    the other annotations resolved) and replaces the ``**<var_keyword>:`` entry of the class
    docstring's ``Args`` with one entry per field.  ``__init__`` itself is untouched: it still
    receives the keywords in ``**<var_keyword>``.

    Raises:
        TypeError: ``__init__`` has no ``**<var_keyword>``, a field name clashes with one of its
            parameters, or the docstring has no ``**<var_keyword>:`` entry.

    Example::

        >>> @hparams_keywords()
        ... class Spec:
        ...     '''A spec.
        ...
        ...     Args:
        ...         **overrides: The fields.
        ...     '''
        ...     def __init__(self, **overrides: Any) -> None:
        ...         self.hparams = PruningHParams(**overrides)
        >>> inspect.signature(Spec).parameters["target_sparsity"]
        <Parameter "target_sparsity: float = 0.5">
        >>> "target_sparsity: Sparsity at" in Spec.__doc__
        True
    """

    def decorate(cls: _T) -> _T:
        init = cls.__init__
        hints = get_type_hints(init)
        params = list(inspect.signature(init).parameters.values())
        if not params or params[-1].kind is not inspect.Parameter.VAR_KEYWORD or params[-1].name != var_keyword:
            raise TypeError(f"{cls.__name__}.__init__ must end with `**{var_keyword}`")
        own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in params[:-1]]
        fields = field_parameters()
        clash = {p.name for p in own} & {p.name for p in fields}
        if clash:
            raise TypeError(f"{cls.__name__}.__init__ parameters {sorted(clash)} clash with PruningHParams fields")
        positional = [p for p in own if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        keyword = [p for p in own if p.kind is inspect.Parameter.KEYWORD_ONLY]
        init.__signature__ = inspect.Signature(positional + fields + keyword, return_annotation=None)
        cls.__doc__ = _replace_doc_entry(cls.__doc__ or "", var_keyword)
        return cls

    return decorate


def _is_default(spec: FieldSpec, value: Any) -> bool:
    if spec.kind in ("map", "list"):
        return value is None or (isinstance(value, Mapping | list | tuple | str) and len(value) == 0)
    return type(value) is type(spec.default) and value == spec.default


def merge_keywords(hparams: Any, keywords: Mapping[str, Any]) -> PruningHParams:
    """``hparams`` (:meth:`PruningHParams.coerce`'s forms) with the fields given by keyword over it.

    A keyword whose value is its field's default does not override ``hparams``: LightningCLI
    passes every keyword, so a default there means "not given".  Without ``hparams`` every
    keyword applies (the same result).

    Raises:
        HParamsError: an unknown keyword (named, with the accepted ones), a malformed value.

    Example::

        >>> merge_keywords("target_sparsity=0.9,nbins=64", {"target_sparsity": 0.5, "nbins": 32}).target_sparsity
        0.9
        >>> merge_keywords("target_sparsity=0.9,nbins=64", {"target_sparsity": 0.5, "nbins": 32}).nbins
        32
    """
    if hparams is None:
        return PruningHParams.coerce(None, **keywords)
    specs = {spec.name: spec for spec in field_specs()}
    given = {k: v for k, v in keywords.items() if k not in specs or not _is_default(specs[k], v)}
    return PruningHParams.coerce(hparams, **given)
