"""Pruning hyperparameters: TF's ``get_pruning_hparams()`` as a dataclass, the one schema.

Every field of TensorFlow's ``tf.contrib.model_pruning`` (final version, r1.15, which the lingvo
fork copied) keeps its name, default and meaning; lingvo/google-research additions that make sense
in PyTorch are added after them, and lit_prune's own few fields come last.  The README's fidelity
table lists each field as ported, different or declined.

:class:`PruningHParams` is the single source of the fields' names, types, defaults and docs: its
annotations give each field's kind (:func:`field_specs`), which drives the coercion here, the
Hydra schema (:func:`lit_prune.config.schema.structured_schema`) and the README's hparams table
(:func:`lit_prune.config.schema.markdown_table`); each field's doc is its ``metadata["doc"]``
(Markdown), from which the class docstring's ``Args`` section is written at import.

The regex maps are stored in TF's own list form (``["conv1:0.8", "fc.*:0.95"]``): that is what
``tf.HParams.parse`` accepted, what a Hydra command line can replace and clear, and what every
other input form (a mapping, a comma string) is normalised to, here and nowhere else.  TF's
``name=value,...`` string grammar lives in :mod:`lit_prune.config.grammar`.

This module is plain Python: it imports neither torch, Lightning, Hydra nor OmegaConf.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

from lit_prune.config.errors import HParamsError
from lit_prune.config.grammar import format_hparams_string, parse_hparams_string, split_list

__all__ = [
    "ALLOCATIONS",
    "BLOCK_POOLING_FUNCTIONS",
    "HParamsError",
    "PRUNE_OPTIONS",
    "THRESHOLD_METHODS",
    "FieldSpec",
    "PruningHParams",
    "RegexMap",
    "field_specs",
    "get_pruning_hparams",
    "parse_block_dims_map",
    "parse_nm",
    "parse_nm_sparsity_map",
    "parse_weight_sparsity_map",
]


@dataclass(frozen=True)
class _Kind:
    """An ``Annotated`` marker naming a field's kind where the plain type does not tell it."""

    kind: str
    #: A map's value type as a ``{regex: value}`` mapping gives it (the keyword signature's type); None = any.
    values: Any = None


#: The type of a regex map: TF's list form ``["regex:value", ...]``, also accepted as ``{regex: value}``.
RegexMap = Annotated[list[str], _Kind("map")]
SparsityMap = Annotated[list[str], _Kind("map", float)]
BlockDimsMap = Annotated[list[str], _Kind("map", str | list[int])]
NMMap = Annotated[list[str], _Kind("map", str)]
BlockPoolingFunction = Literal["AVG", "MAX"]
ThresholdMethod = Literal["histogram", "exact"]
PruneOption = Literal["weight", "first_order_gradient", "second_order_gradient"]
AllocationRule = Literal["uniform", "global", "erk", "sensitivity"]

#: Accepted ``block_pooling_function`` values (TF raises on anything else at graph build).
BLOCK_POOLING_FUNCTIONS: tuple[str, ...] = get_args(BlockPoolingFunction)
#: Accepted ``threshold_method`` values: TF r1.11-r1.13's histogram/CDF rule, or r1.14+'s exact top-k.
THRESHOLD_METHODS: tuple[str, ...] = get_args(ThresholdMethod)
#: Accepted ``prune_option`` values (google-research model_pruning; ``compression`` is out of scope).
PRUNE_OPTIONS: tuple[str, ...] = get_args(PruneOption)
#: Accepted ``allocation`` values: how ``target_sparsity`` is shared among the weights.
ALLOCATIONS: tuple[str, ...] = get_args(AllocationRule)


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


def _fail(field_name: str, accepted: str, got: Any) -> HParamsError:
    return HParamsError(f"`{field_name}` must be {accepted}, got {got!r}")


@dataclass
class PruningHParams:
    """The pruning specification (TF ``get_pruning_hparams()`` fields, names and r1.15 defaults).

    Build it with :meth:`coerce` from whatever a caller holds (``None``, an instance, a mapping, a
    ``"name=value,..."`` string), or directly; every value is coerced and validated on
    construction.

    Example::

        >>> hp = PruningHParams(target_sparsity=0.9, weight_sparsity_map={"fc.*": 0.95})
        >>> hp.weight_sparsity_map
        ['fc.*:0.95']
        >>> hp.parse("pruning_frequency=50,block_dims_map=[conv1:4x4]").block_dims_map
        ['conv1:4x4']
    """

    name: str = field(
        default="model_pruning",
        metadata=_doc("Name of the specification; prefixes the summaries: `<name>_summaries/...`"),
    )
    begin_pruning_step: int = field(
        default=0, metadata=_doc("First global step at which a mask update may run (inclusive, >= 0)")
    )
    end_pruning_step: int = field(
        default=-1, metadata=_doc("Last global step at which a mask update may run (inclusive); -1 = never stop")
    )
    weight_sparsity_map: SparsityMap = field(
        default_factory=list,
        metadata=_doc(
            '`["regex:sparsity", ...]` (or `{regex: sparsity}`): per-weight final sparsity, the regex searched '
            "(`re.search`) in the `model.named_parameters()` names"
        ),
    )
    block_dims_map: BlockDimsMap = field(
        default_factory=list,
        metadata=_doc('`["regex:HxW", ...]` (or `{regex: "HxW"}`): per-weight block shape'),
    )
    threshold_decay: float = field(
        default=0.0,
        metadata=_doc("EMA factor `d` of the threshold: `thr = (1 - d) * thr_now + d * thr_prev`; in [0, 1)"),
    )
    pruning_frequency: int = field(default=10, metadata=_doc("Minimum number of steps between two mask updates (> 0)"))
    nbins: int = field(
        default=256, metadata=_doc('Histogram bins of the CDF threshold (`threshold_method="histogram"`; > 0)')
    )
    block_height: int = field(default=1, metadata=_doc("Rows of a pruning block; -1 = the whole dimension"))
    block_width: int = field(default=1, metadata=_doc("Columns of a pruning block; -1 = the whole dimension"))
    block_pooling_function: BlockPoolingFunction = field(
        default="AVG", metadata=_doc("`AVG` or `MAX` pooling of `|w|` inside a block")
    )
    initial_sparsity: float = field(
        default=0.0, metadata=_doc("Sparsity at `sparsity_function_begin_step` (start of the schedule); in [0, 1)")
    )
    target_sparsity: float = field(
        default=0.5,
        metadata=_doc(
            "Sparsity at `sparsity_function_end_step` (end of the schedule); in [0, 1). An external `sparsity` "
            "(`Pruning(..., sparsity=...)`) is scaled for a weight with its own target (a `weight_sparsity_map` "
            "entry, or N:M's `1 - N/M`) by own target / `target_sparsity`, as in TF, so it then needs "
            "`target_sparsity` > 0"
        ),
    )
    sparsity_function_begin_step: int = field(
        default=0, metadata=_doc("Step where the polynomial schedule starts (>= 0)")
    )
    sparsity_function_end_step: int = field(
        default=100,
        metadata=_doc("Step where the schedule reaches `target_sparsity` (> `sparsity_function_begin_step`)"),
    )
    sparsity_function_exponent: float = field(
        default=3.0, metadata=_doc("Exponent of the polynomial schedule (3 = Zhu & Gupta); finite, > 0")
    )
    use_tpu: bool = field(
        default=False,
        metadata=_doc(
            "TF's switch to its TPU-friendly algorithms; here thresholds from a sort of the scores (static shapes, "
            "no scatter, no host reads, so no NaN check), same masks"
        ),
    )
    # google-research / lingvo additions
    prune_option: PruneOption = field(
        default="weight",
        metadata=_doc(
            "Saliency (google-research): `weight` (`|w|`), `first_order_gradient` or `second_order_gradient`"
        ),
    )
    gradient_decay_rate: float = field(
        default=0.99, metadata=_doc("EMA decay of the gradient saliency (google-research); in [0, 1)")
    )
    # lit_prune's own
    threshold_method: ThresholdMethod = field(
        default="histogram",
        metadata=_doc(
            "`histogram` (TF r1.11-r1.13, `mask = |w| > thr`) or `exact` (TF r1.14+: keep the "
            "`round(n * (1 - s))` largest, `mask = |w| >= thr`)"
        ),
    )
    prune_patterns: list[str] = field(
        default_factory=list,
        metadata=_doc(
            "Regexes over parameter names choosing the weights to prune; empty = the weights of conv, linear, "
            "RNN, attention and embedding layers (never biases or norms)"
        ),
    )
    exclude_patterns: list[str] = field(
        default_factory=list, metadata=_doc("Regexes removing weights from that choice")
    )
    global_ranking: bool = field(
        default=False,
        metadata=_doc(
            "Rank the weights without a `weight_sparsity_map` entry jointly, with one threshold (google-research's "
            "group pruning with a single group; what `global_unstructured` and Lightning's `ModelPruning` do by "
            "default): layers end at different sparsities whose weighted mean follows the schedule. Needs "
            "element-wise (1x1) blocks for them. Alias of `allocation=global`"
        ),
    )
    allocation: AllocationRule = field(
        default="uniform",
        metadata=_doc(
            "How `target_sparsity` is shared among the pruned weights: `uniform` (TF: every weight at the target, "
            "a `weight_sparsity_map` entry wins for its weight), `global` (one joint threshold; weights under 1 % of "
            "the largest one's size kept dense), `erk` (Erdős–Rényi-Kernel: density ∝ sum(shape) / prod(shape)) or "
            "`sensitivity` (least predicted loss from `sensitivity_scan`). For all but `uniform` the per-weight "
            "targets average exactly to `target_sparsity`, counted by parameters: map entries (and N:M) win and "
            "the others are solved again; the schedule scales each weight's target as a map entry's"
        ),
    )
    sensitivity_scan: str = field(
        default="",
        metadata=_doc(
            "Path of a sensitivity scan's JSON (`lit_prune.sensitivity(...).save(dir)`, `lit-prune mode=scan`) "
            "that `allocation=sensitivity` reads"
        ),
    )
    nm_sparsity: str = field(
        default="",
        metadata=_doc(
            '`"N:M"` (e.g. `"2:4"`) for every pruned weight: at most N non-zeros in each group of M consecutive '
            'input elements; `""` = off. Gradual: each weight\'s schedule runs to its own target `1 - N/M` and '
            "each group prunes `floor(M * s)` elements (google-research's `intra_block_sparsity`)"
        ),
    )
    nm_sparsity_map: NMMap = field(
        default_factory=list,
        metadata=_doc(
            '`["regex:N:M", ...]` (or `{regex: "N:M"}`): N:M for the weights a regex matches (over `nm_sparsity`)'
        ),
    )

    def __post_init__(self) -> None:
        self._coerce_types()
        self._validate()

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def coerce(
        cls, hparams: PruningHParams | Mapping[str, Any] | str | None = None, /, **overrides: Any
    ) -> PruningHParams:
        """The one way in: a spec from ``None`` (TF defaults), an instance, a mapping or a TF string.

        A mapping may be an OmegaConf ``DictConfig`` (values ``ListConfig``/``DictConfig``): any
        ``Mapping``/``Sequence`` is read as a plain ``dict``/``list``, without importing OmegaConf.
        A string is TF's ``"name=value,..."`` (:meth:`parse`).  An instance is returned as it is
        when there are no ``overrides``; ``overrides`` (field values, also OmegaConf's) make a
        validated copy.

        Raises:
            HParamsError: any other type, an unknown field, a malformed value.

        Example::

            >>> PruningHParams.coerce(None) == PruningHParams()
            True
            >>> PruningHParams.coerce("target_sparsity=0.9").target_sparsity
            0.9
            >>> PruningHParams.coerce({"weight_sparsity_map": {"fc": 0.5}}, nbins=64).weight_sparsity_map
            ['fc:0.5']
        """
        if hparams is None:
            spec = cls()
        elif isinstance(hparams, PruningHParams):
            spec = hparams
        elif isinstance(hparams, str):
            spec = cls().parse(hparams)
        elif isinstance(hparams, Mapping):
            spec = cls.from_dict(_plain(hparams))
        else:
            raise HParamsError(
                f"`hparams` must be a PruningHParams, a mapping or a 'name=value,...' string, got {hparams!r}"
            )
        return spec.replace(**_plain(overrides)) if overrides else spec

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None = None, **overrides: Any) -> PruningHParams:
        """Build from a plain mapping (what Hydra's ``instantiate`` hands over) plus overrides.

        Unknown keys are an error naming them and listing the accepted ones.

        Example::

            >>> PruningHParams.from_dict({"target_sparsity": 0.9}).target_sparsity
            0.9
        """
        merged = {**dict(values or {}), **overrides}
        unknown = sorted(set(merged) - set(cls.field_names()), key=str)
        if unknown:
            raise HParamsError(f"unknown pruning hparam(s) {unknown}; accepted: {list(cls.field_names())}")
        return cls(**merged)

    @staticmethod
    def field_names() -> tuple[str, ...]:
        """The names of all hyperparameters, in declaration order.

        Example::

            >>> PruningHParams.field_names()[:3]
            ('name', 'begin_pruning_step', 'end_pruning_step')
        """
        return tuple(spec.name for spec in field_specs())

    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` of every field (maps as TF-style lists): the inverse of :meth:`from_dict`.

        Example::

            >>> PruningHParams(weight_sparsity_map={"fc": 0.5}).to_dict()["weight_sparsity_map"]
            ['fc:0.5']
        """
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), list) else v for f in dataclasses.fields(self)
        }

    def to_string(self) -> str:
        """Every field as a TF ``"name=value,..."`` string, which :meth:`parse` reads back.

        Raises:
            HParamsError: a value the string grammar cannot carry (e.g. a regex with a comma outside
                brackets); the mapping and list forms carry any value.

        Example::

            >>> hp = PruningHParams(prune_patterns=["fc{1,2}"], nbins=64)
            >>> PruningHParams().parse(hp.to_string()) == hp
            True
        """
        return format_hparams_string(self.to_dict())

    def allocation_rule(self) -> str:
        """The allocation in effect: ``allocation``, or ``global`` when ``global_ranking`` is set (its alias).

        Example::

            >>> PruningHParams(global_ranking=True).allocation_rule()
            'global'
        """
        return "global" if self.global_ranking else self.allocation

    def replace(self, **overrides: Any) -> PruningHParams:
        """A validated copy with some fields replaced; ``self`` is unchanged.

        Example::

            >>> PruningHParams().replace(nbins=64).nbins
            64
        """
        return PruningHParams.from_dict(self.to_dict(), **overrides)

    def parse(self, values: str) -> PruningHParams:
        """A copy with fields overridden from a ``tf.HParams.parse`` string; ``self`` is unchanged.

        The grammar is TF's (:mod:`lit_prune.config.grammar`): ``name=value`` pairs separated by
        commas, lists in brackets (``weight_sparsity_map=[conv1:0.8,fc.*:0.95]``); a comma inside
        ``()``, ``[]`` or ``{}`` stays in its entry (``prune_patterns=[fc{1,2},layer[0-9]]``).
        Unknown names, a name given twice, unbalanced brackets and malformed values raise
        :class:`HParamsError`.  Unlike ``tf.HParams.parse``, it returns a new object: an engine
        or callback already holding ``self`` never sees it change.

        Example::

            >>> hp = get_pruning_hparams()
            >>> new = hp.parse("target_sparsity=0.9,weight_sparsity_map=[conv1:0.8,fc.*:0.95]")
            >>> new.target_sparsity, new.weight_sparsity_map, hp.target_sparsity
            (0.9, ['conv1:0.8', 'fc.*:0.95'], 0.5)
        """
        return self.replace(**parse_hparams_string(values, self.field_names()))

    # ------------------------------------------------------------------ validation
    def _coerce_types(self) -> None:
        for spec in field_specs():
            setattr(self, spec.name, _coerce(spec, getattr(self, spec.name)))

    def _validate(self) -> None:
        if self.begin_pruning_step < 0:
            raise _fail("begin_pruning_step", "an int >= 0", self.begin_pruning_step)
        if self.end_pruning_step != -1 and self.end_pruning_step <= self.begin_pruning_step:
            raise HParamsError(
                f"pruning must begin before it can end: `begin_pruning_step`={self.begin_pruning_step} must be "
                f"< `end_pruning_step`={self.end_pruning_step} (or set `end_pruning_step`=-1 to prune until "
                "training stops)"
            )
        if self.sparsity_function_begin_step < 0:
            raise _fail("sparsity_function_begin_step", "an int >= 0", self.sparsity_function_begin_step)
        if self.sparsity_function_end_step <= self.sparsity_function_begin_step:
            raise HParamsError(
                f"`sparsity_function_begin_step`={self.sparsity_function_begin_step} must be < "
                f"`sparsity_function_end_step`={self.sparsity_function_end_step}"
            )
        for name in ("threshold_decay", "initial_sparsity", "target_sparsity", "gradient_decay_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise _fail(name, "a float in [0, 1)", value)
        if not math.isfinite(self.sparsity_function_exponent) or self.sparsity_function_exponent <= 0:
            raise _fail("sparsity_function_exponent", "a finite float > 0", self.sparsity_function_exponent)
        if self.pruning_frequency <= 0:
            raise _fail("pruning_frequency", "an int > 0", self.pruning_frequency)
        if self.nbins <= 0:
            raise _fail("nbins", "an int > 0", self.nbins)
        for name in ("block_height", "block_width"):
            value = getattr(self, name)
            if value == 0 or value < -1:
                raise _fail(name, "an int >= 1, or -1 for the whole dimension", value)
        for spec in field_specs():
            if spec.choices and getattr(self, spec.name) not in spec.choices:
                raise _fail(spec.name, f"one of {list(spec.choices)}", getattr(self, spec.name))
        if not self.name or not isinstance(self.name, str):
            raise _fail("name", "a non-empty string", self.name)
        if self.global_ranking and self.allocation not in ("uniform", "global"):
            raise HParamsError(
                f"`global_ranking`=True is `allocation`=global, but `allocation`={self.allocation!r}: set only one"
            )
        if self.allocation == "sensitivity" and not self.sensitivity_scan:
            raise HParamsError("`allocation`=sensitivity needs `sensitivity_scan`: the JSON file a scan wrote")
        # The maps and patterns are parsed here so that malformed entries fail before training.
        parse_weight_sparsity_map(self.weight_sparsity_map)
        parse_block_dims_map(self.block_dims_map)
        parse_nm_sparsity_map(self.nm_sparsity_map)
        if self.nm_sparsity:
            parse_nm("nm_sparsity", self.nm_sparsity)
        for name in ("prune_patterns", "exclude_patterns"):
            for pattern in getattr(self, name):
                _compile(name, pattern)


def get_pruning_hparams() -> PruningHParams:
    """TF's ``get_pruning_hparams()``: the default specification (TF r1.15 defaults).

    Example::

        >>> hp = get_pruning_hparams()
        >>> hp.threshold_decay, hp.nbins, hp.target_sparsity, hp.sparsity_function_exponent
        (0.0, 256, 0.5, 3.0)
    """
    return PruningHParams()


# ---------------------------------------------------------------------- maps
def parse_weight_sparsity_map(entries: list[str]) -> dict[str, float]:
    """``["regex:sparsity", ...]`` -> ``{regex: sparsity}``; each regex compiled, each value in [0, 1).

    The split is on the last ``:`` so a regex may contain ``:`` (TF split on every ``:``).

    Example::

        >>> parse_weight_sparsity_map(["conv1:0.8", "fc.*:0.95"])
        {'conv1': 0.8, 'fc.*': 0.95}
    """
    out: dict[str, float] = {}
    for pattern, raw in _split_entries("weight_sparsity_map", entries, "'regex:sparsity', e.g. 'fc.*:0.9'"):
        try:
            value = float(raw)
        except ValueError:
            raise HParamsError(
                f"`weight_sparsity_map` entry {pattern + ':' + raw!r}: sparsity must be a float in [0, 1), got {raw!r}"
            ) from None
        if not 0.0 <= value < 1.0:  # also rejects NaN
            raise HParamsError(
                f"`weight_sparsity_map` entry {pattern + ':' + raw!r}: sparsity must be a float in [0, 1), got {value}"
            )
        out[pattern] = value
    return out


def parse_block_dims_map(entries: list[str]) -> dict[str, tuple[int, int]]:
    """``["regex:HxW", ...]`` -> ``{regex: (H, W)}``; H and W are ints >= 1 or -1 (whole dimension).

    Example::

        >>> parse_block_dims_map(["fc1:4x4", "fc2:1x-1"])
        {'fc1': (4, 4), 'fc2': (1, -1)}
    """
    out: dict[str, tuple[int, int]] = {}
    for pattern, raw in _split_entries("block_dims_map", entries, "'regex:HxW', e.g. 'fc.*:4x4'"):
        parts = raw.split("x")
        try:
            dims = tuple(int(p) for p in parts)
        except ValueError:
            dims = ()
        if len(dims) != 2 or any(d == 0 or d < -1 for d in dims):
            raise HParamsError(
                f"`block_dims_map` entry {pattern + ':' + raw!r}: block dims must be 'HxW' with H and W ints >= 1 "
                f"or -1 (whole dimension), got {raw!r}"
            )
        out[pattern] = (dims[0], dims[1])
    return out


def parse_nm_sparsity_map(entries: list[str]) -> dict[str, tuple[int, int]]:
    """``["regex:N:M", ...]`` -> ``{regex: (N, M)}`` with ints ``1 <= N < M``.

    Example::

        >>> parse_nm_sparsity_map(["fc.*:2:4", "head:1:8"])
        {'fc.*': (2, 4), 'head': (1, 8)}
    """
    out: dict[str, tuple[int, int]] = {}
    for entry in entries:
        if not entry:
            continue
        pattern, sep, n = entry.rpartition(":")
        pattern, sep2, m = pattern.rpartition(":")
        if not sep or not sep2 or not pattern:
            raise HParamsError(f"`nm_sparsity_map` entry {entry!r} is malformed; expected 'regex:N:M', e.g. 'fc.*:2:4'")
        _compile("nm_sparsity_map", pattern)
        if pattern.strip() in out:
            raise HParamsError(f"`nm_sparsity_map` names the regex {pattern!r} twice")
        out[pattern.strip()] = parse_nm("nm_sparsity_map", f"{m}:{n}", entry)
    return out


def parse_nm(field_name: str, text: str, entry: str | None = None) -> tuple[int, int]:
    """``"N:M"`` -> ``(N, M)`` with ints ``1 <= N < M``; the error names ``field_name`` (and the map ``entry``).

    Example::

        >>> parse_nm("nm_sparsity", "2:4")
        (2, 4)
    """
    try:
        n, m = (int(p) for p in text.strip().split(":"))
    except ValueError:
        n = m = 0
    if not 1 <= n < m:
        where = f"`{field_name}` entry {entry!r}" if entry is not None else f"`{field_name}`"
        raise HParamsError(f"{where}: N:M must be ints with 1 <= N < M (e.g. '2:4'), got {text!r}")
    return n, m


def _split_entries(field_name: str, entries: list[str], form: str) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for entry in entries:
        if not entry:  # TF drops empty strings (its default is [''])
            continue
        pattern, sep, raw = entry.rpartition(":")
        if not sep or not pattern or not raw:
            raise HParamsError(f"`{field_name}` entry {entry!r} is malformed; expected {form}")
        _compile(field_name, pattern)
        if pattern in seen:
            raise HParamsError(f"`{field_name}` names the regex {pattern!r} twice")
        seen.add(pattern)
        pairs.append((pattern.strip(), raw.strip()))
    return pairs


def _compile(field_name: str, pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise HParamsError(f"`{field_name}`: {pattern!r} is not a valid regular expression ({err})") from None


# ---------------------------------------------------------------------- the schema, from the dataclass
@dataclass(frozen=True)
class FieldSpec:
    """One field of :class:`PruningHParams`, as its annotation, default and metadata give it.

    Attributes:
        name: The field name.
        kind: ``"int"``, ``"float"``, ``"bool"``, ``"str"``, ``"list"`` (a list of regexes) or
            ``"map"`` (a regex map: ``["regex:value", ...]``, also ``{regex: value}``).
        annotation: The resolved annotation (``int``, ``Literal["AVG", "MAX"]``, ``RegexMap``, ...).
        default: The default value (a fresh one for the lists).
        doc: The field's documentation (Markdown), its ``metadata["doc"]``.
        choices: The accepted values of a ``Literal`` field, else ``()``.

    Example::

        >>> spec = field_specs()[10]
        >>> spec.name, spec.kind, spec.default, spec.choices
        ('block_pooling_function', 'str', 'AVG', ('AVG', 'MAX'))
    """

    name: str
    kind: str
    annotation: Any
    default: Any
    doc: str
    choices: tuple[str, ...] = ()


_PLAIN_KINDS: dict[Any, str] = {int: "int", float: "float", bool: "bool", str: "str"}


def _kind_of(name: str, annotation: Any) -> tuple[str, tuple[str, ...]]:
    if get_origin(annotation) is Annotated:
        base, *extras = get_args(annotation)
        marks = [m.kind for m in extras if isinstance(m, _Kind)]
        if marks:
            return marks[0], ()
        annotation = base
    if get_origin(annotation) is Literal:
        choices = get_args(annotation)
        if all(isinstance(c, str) for c in choices):
            return "str", choices
    if annotation in _PLAIN_KINDS:
        return _PLAIN_KINDS[annotation], ()
    if get_origin(annotation) is list and get_args(annotation) == (str,):
        return "list", ()
    raise TypeError(f"PruningHParams.{name}: no coercion for the annotation {annotation!r}")


@functools.cache
def field_specs() -> tuple[FieldSpec, ...]:
    """Every field of :class:`PruningHParams`, in declaration order, from its annotation and metadata.

    Raises:
        TypeError: a field whose annotation has no coercion, or which has no ``metadata["doc"]``
            (a mistake in this module, caught at import).

    Example::

        >>> [(s.name, s.kind) for s in field_specs() if s.name.endswith("_map")]
        [('weight_sparsity_map', 'map'), ('block_dims_map', 'map'), ('nm_sparsity_map', 'map')]
    """
    hints = get_type_hints(PruningHParams, include_extras=True)
    out = []
    for f in dataclasses.fields(PruningHParams):
        kind, choices = _kind_of(f.name, hints[f.name])
        doc = f.metadata.get("doc")
        if not doc:
            raise TypeError(f"PruningHParams.{f.name} has no metadata['doc']")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out.append(FieldSpec(f.name, kind, hints[f.name], default, doc, choices))
    return tuple(out)


def _args_section() -> str:
    """The ``Args`` section of :class:`PruningHParams`'s docstring, from the fields' docs."""
    lines = ["    Args:"]
    for spec in field_specs():
        text = re.sub(r"`([^`]+)`", r"``\1``", spec.doc)  # Markdown code to reST literals
        lines += textwrap.wrap(
            f"{spec.name}: {text}.",
            width=100,
            initial_indent=" " * 8,
            subsequent_indent=" " * 12,
            break_on_hyphens=False,
        )
    return "\n".join(lines) + "\n\n"


PruningHParams.__doc__ = (PruningHParams.__doc__ or "").replace("    Example::", _args_section() + "    Example::", 1)


# ---------------------------------------------------------------------- coercion
def _plain(value: Any) -> Any:
    """Mappings and sequences (OmegaConf's ``DictConfig``/``ListConfig`` too) as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {key: _plain(val) for key, val in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [_plain(v) for v in value]
    return value


def _map_to_list(field_name: str, value: Any) -> list[str]:
    if value is None:  # a cleared map (Hydra's `null`)
        return []
    if isinstance(value, Mapping):
        out = []
        for key, val in value.items():
            if not isinstance(key, str):
                raise _fail(field_name, "a mapping with regex string keys", value)
            if isinstance(val, list | tuple):  # {"fc": [4, 4]} for block dims
                val = "x".join(str(v) for v in val)
            out.append(f"{key}:{val}")
        return out
    if isinstance(value, str):  # "a:0.1,b:0.2" or "[a:0.1,b:0.2]"
        return split_list(field_name, value)
    if isinstance(value, list | tuple):
        if not all(isinstance(v, str) for v in value):
            raise _fail(field_name, "a list of 'regex:value' strings", value)
        return [v.strip() for v in value]
    raise _fail(field_name, "a list of 'regex:value' strings or a {regex: value} mapping", value)


def _coerce(spec: FieldSpec, value: Any) -> Any:
    name, kind = spec.name, spec.kind
    if kind in ("map", "list"):
        value = _plain(value)
    if kind == "map":
        return _map_to_list(name, value)
    if kind == "list":
        if value is None:
            return []
        if isinstance(value, str):
            return split_list(name, value)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _fail(name, "a list of regex strings", value)
        return list(value)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise _fail(name, "a bool (true/false)", value)
    if kind == "int":
        if isinstance(value, bool):
            raise _fail(name, "an int", value)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise _fail(name, "an int", value)
    if kind == "float":  # ints are accepted for float fields, as tf.HParams does
        if isinstance(value, bool):
            raise _fail(name, "a float", value)
        if isinstance(value, int | float):
            value = float(value)
        elif isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise _fail(name, "a float", value) from None
        else:
            raise _fail(name, "a float", value)
        if math.isnan(value):
            raise _fail(name, "a float (not NaN)", value)
        return value
    if not isinstance(value, str):
        raise _fail(name, "a string", value)
    return value


field_specs()  # a field without a coercion or a doc fails at import, not at first use
