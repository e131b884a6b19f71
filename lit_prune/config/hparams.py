"""Pruning hyperparameters: TF's ``get_pruning_hparams()`` as a dataclass.

Every field of TensorFlow's ``tf.contrib.model_pruning`` (final version, r1.15, which the lingvo
fork copied) keeps its name, default and meaning; lingvo/google-research additions that make sense
in PyTorch are added after them, and lit_prune's own few fields come last.  The README's fidelity
table lists each field as ported, different or declined.

The regex maps are stored in TF's own list form (``["conv1:0.8", "fc.*:0.95"]``): that is what
``tf.HParams.parse`` accepted, what a Hydra command line can replace and clear, and what every
other input form (a mapping, a comma string) is normalised to, here and nowhere else.

This module is plain Python: it imports neither torch, Lightning nor Hydra.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BLOCK_POOLING_FUNCTIONS",
    "HParamsError",
    "PRUNE_OPTIONS",
    "THRESHOLD_METHODS",
    "PruningHParams",
    "get_pruning_hparams",
    "parse_block_dims_map",
    "parse_nm",
    "parse_nm_sparsity_map",
    "parse_weight_sparsity_map",
]

#: Accepted ``block_pooling_function`` values (TF raises on anything else at graph build).
BLOCK_POOLING_FUNCTIONS = ("AVG", "MAX")
#: Accepted ``threshold_method`` values: TF r1.11-r1.13's histogram/CDF rule, or r1.14+'s exact top-k.
THRESHOLD_METHODS = ("histogram", "exact")
#: Accepted ``prune_option`` values (google-research model_pruning; ``compression`` is out of scope).
PRUNE_OPTIONS = ("weight", "first_order_gradient", "second_order_gradient")


class HParamsError(ValueError):
    """A pruning hyperparameter is malformed; the message names the field and what is accepted."""


def _fail(field_name: str, accepted: str, got: Any) -> HParamsError:
    return HParamsError(f"`{field_name}` must be {accepted}, got {got!r}")


@dataclass
class PruningHParams:
    """The pruning specification (TF ``get_pruning_hparams()`` fields, names and r1.15 defaults).

    Args:
        name: Name of the specification; prefixes the summaries (``<name>_summaries/...``).
        begin_pruning_step: First global step at which a mask update may run (inclusive, >= 0).
        end_pruning_step: Last global step at which a mask update may run (inclusive); -1 = forever.
        weight_sparsity_map: ``["regex:sparsity", ...]`` per-weight final sparsity (``re.search``
            over ``model.named_parameters()`` names); also accepts a ``{regex: sparsity}`` mapping.
        block_dims_map: ``["regex:HxW", ...]`` per-weight block shape; also ``{regex: "HxW"}``.
        threshold_decay: EMA factor d: ``thr <- (1 - d) * thr_now + d * thr_prev``; in [0, 1).
        pruning_frequency: Minimum number of steps between two mask updates (> 0).
        nbins: Histogram bins of the CDF threshold (``threshold_method="histogram"``, > 0).
        block_height: Rows of a pruning block; -1 = the whole dimension.
        block_width: Columns of a pruning block; -1 = the whole dimension.
        block_pooling_function: ``"AVG"`` or ``"MAX"`` pooling of ``|w|`` inside a block.
        initial_sparsity: Sparsity at ``sparsity_function_begin_step``; in [0, 1).
        target_sparsity: Sparsity at ``sparsity_function_end_step``; in [0, 1).
        sparsity_function_begin_step: Step where the polynomial schedule starts (>= 0).
        sparsity_function_end_step: Step where it reaches ``target_sparsity`` (> begin step).
        sparsity_function_exponent: Exponent of the polynomial schedule (3 = Zhu & Gupta).
        use_tpu: TF's switch to its TPU-friendly implementations: here the threshold comes from
            one order statistic (static shapes, no scatter/atomics, no host reads), same masks.
        prune_option: Saliency (google-research): ``weight`` (``|w|``), ``first_order_gradient``
            or ``second_order_gradient``.
        gradient_decay_rate: EMA decay of the gradient saliency (google-research); in [0, 1).
        threshold_method: ``"histogram"`` (TF r1.11-r1.13, ``mask = |w| > thr``) or ``"exact"``
            (TF r1.14+, keep the ``round(n * (1 - s))`` largest, ``mask = |w| >= thr``).
        prune_patterns: Regexes selecting the weights to prune by parameter name; empty = the
            weights of conv, linear, RNN and embedding layers (never biases or norms).
        exclude_patterns: Regexes removing weights from that selection.
        global_ranking: Rank the weights that have no ``weight_sparsity_map`` entry jointly, with
            one threshold (google-research's group pruning with a single group; what
            ``torch.nn.utils.prune.global_unstructured`` does): layers end at different sparsities
            whose weighted mean follows the schedule.  Needs element-wise (1x1) blocks for them.
        nm_sparsity: ``"N:M"`` (e.g. ``"2:4"``) makes every pruned weight N:M semi-structured:
            at most N non-zeros in each group of M consecutive input elements; ``""`` = off.
            Gradual: each weight's schedule runs to its own target ``1 - N/M`` and each group
            prunes ``floor(M * s)`` elements (google-research's ``intra_block_sparsity``).
        nm_sparsity_map: ``["regex:N:M", ...]`` N:M for the weights a regex matches (over
            ``nm_sparsity``); also ``{regex: "N:M"}``.

    Example::

        >>> hp = PruningHParams(target_sparsity=0.9, weight_sparsity_map={"fc.*": 0.95})
        >>> hp.weight_sparsity_map
        ['fc.*:0.95']
        >>> hp.parse("pruning_frequency=50,block_dims_map=[conv1:4x4]").block_dims_map
        ['conv1:4x4']
    """

    name: str = "model_pruning"
    begin_pruning_step: int = 0
    end_pruning_step: int = -1
    weight_sparsity_map: list[str] = field(default_factory=list)
    block_dims_map: list[str] = field(default_factory=list)
    threshold_decay: float = 0.0
    pruning_frequency: int = 10
    nbins: int = 256
    block_height: int = 1
    block_width: int = 1
    block_pooling_function: str = "AVG"
    initial_sparsity: float = 0.0
    target_sparsity: float = 0.5
    sparsity_function_begin_step: int = 0
    sparsity_function_end_step: int = 100
    sparsity_function_exponent: float = 3.0
    use_tpu: bool = False
    # google-research / lingvo additions
    prune_option: str = "weight"
    gradient_decay_rate: float = 0.99
    # lit_prune's own
    threshold_method: str = "histogram"
    prune_patterns: list[str] = field(default_factory=list)
    exclude_patterns: list[str] = field(default_factory=list)
    global_ranking: bool = False
    nm_sparsity: str = ""
    nm_sparsity_map: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._coerce_types()
        self._validate()

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None = None, **overrides: Any) -> PruningHParams:
        """Build from a plain mapping (what Hydra's ``instantiate`` hands over) plus overrides.

        Unknown keys are an error naming them and listing the accepted ones.

        Example::

            >>> PruningHParams.from_dict({"target_sparsity": 0.9}).target_sparsity
            0.9
        """
        merged = {**dict(values or {}), **overrides}
        unknown = sorted(set(merged) - set(cls.field_names()))
        if unknown:
            raise HParamsError(f"unknown pruning hparam(s) {unknown}; accepted: {list(cls.field_names())}")
        return cls(**merged)

    @staticmethod
    def field_names() -> tuple[str, ...]:
        """The names of all hyperparameters, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(PruningHParams))

    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` of every field (maps as TF-style lists): the inverse of :meth:`from_dict`."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), list) else v for f in dataclasses.fields(self)
        }

    def replace(self, **overrides: Any) -> PruningHParams:
        """A validated copy with some fields replaced."""
        return PruningHParams.from_dict(self.to_dict(), **overrides)

    def parse(self, values: str) -> PruningHParams:
        """Override fields from a ``tf.HParams.parse`` string; updates ``self`` and returns it.

        The grammar is TF's: ``name=value`` pairs separated by commas, lists in brackets
        (``weight_sparsity_map=[conv1:0.8,fc.*:0.95]``).  Unknown names, a name given twice and
        malformed values raise :class:`HParamsError`; on error ``self`` is left unchanged.

        Example::

            >>> hp = get_pruning_hparams().parse("target_sparsity=0.9,weight_sparsity_map=[conv1:0.8,fc.*:0.95]")
            >>> hp.target_sparsity, hp.weight_sparsity_map
            (0.9, ['conv1:0.8', 'fc.*:0.95'])
        """
        updates = _parse_hparams_string(values)
        new = self.replace(**updates)
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(new, f.name))
        return self

    # ------------------------------------------------------------------ validation
    def _coerce_types(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = _FIELD_KINDS[f.name]
            setattr(self, f.name, _coerce(f.name, kind, value))

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
        _check_choice("block_pooling_function", self.block_pooling_function, BLOCK_POOLING_FUNCTIONS)
        _check_choice("threshold_method", self.threshold_method, THRESHOLD_METHODS)
        _check_choice("prune_option", self.prune_option, PRUNE_OPTIONS)
        if not self.name or not isinstance(self.name, str):
            raise _fail("name", "a non-empty string", self.name)
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
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        return [item.strip() for item in text.split(",") if item.strip()]
    if isinstance(value, list | tuple):
        if not all(isinstance(v, str) for v in value):
            raise _fail(field_name, "a list of 'regex:value' strings", value)
        return [v.strip() for v in value]
    raise _fail(field_name, "a list of 'regex:value' strings or a {regex: value} mapping", value)


# ---------------------------------------------------------------------- types
_FIELD_KINDS: dict[str, str] = {
    "name": "str",
    "begin_pruning_step": "int",
    "end_pruning_step": "int",
    "weight_sparsity_map": "map",
    "block_dims_map": "map",
    "threshold_decay": "float",
    "pruning_frequency": "int",
    "nbins": "int",
    "block_height": "int",
    "block_width": "int",
    "block_pooling_function": "str",
    "initial_sparsity": "float",
    "target_sparsity": "float",
    "sparsity_function_begin_step": "int",
    "sparsity_function_end_step": "int",
    "sparsity_function_exponent": "float",
    "use_tpu": "bool",
    "prune_option": "str",
    "gradient_decay_rate": "float",
    "threshold_method": "str",
    "prune_patterns": "list",
    "exclude_patterns": "list",
    "global_ranking": "bool",
    "nm_sparsity": "str",
    "nm_sparsity_map": "map",
}


def _coerce(name: str, kind: str, value: Any) -> Any:
    if kind == "map":
        return _map_to_list(name, value)
    if kind == "list":
        if value is None:
            return []
        if isinstance(value, str):
            return _map_to_list(name, value)
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
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


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise _fail(name, f"one of {list(choices)}", value)


# ---------------------------------------------------------------------- tf.HParams.parse
_PAIR = re.compile(r"\s*(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*=\s*")


def _parse_hparams_string(values: str) -> dict[str, Any]:
    """Split ``"a=1,b=[x:1,y:2],c=s"`` into ``{name: raw string or list of strings}``."""
    if not isinstance(values, str):
        raise HParamsError(f"parse() takes a string like 'target_sparsity=0.9,...', got {values!r}")
    out: dict[str, Any] = {}
    pos, text = 0, values.strip()
    while pos < len(text):
        match = _PAIR.match(text, pos)
        if not match:
            raise HParamsError(f"malformed hparams string at {text[pos:]!r}; expected 'name=value,...'")
        name, pos = match.group("name"), match.end()
        if name not in _FIELD_KINDS:
            raise HParamsError(f"unknown pruning hparam {name!r}; accepted: {list(_FIELD_KINDS)}")
        if name in out:
            raise HParamsError(f"pruning hparam {name!r} is given twice in {values!r}")
        if text.startswith("[", pos):
            end = text.find("]", pos)
            if end < 0:
                raise HParamsError(f"`{name}`: unterminated '[' in {values!r}")
            raw: Any = [item.strip() for item in text[pos + 1 : end].split(",") if item.strip()]
            pos = end + 1
        else:
            end = text.find(",", pos)
            end = len(text) if end < 0 else end
            raw = text[pos:end].strip()
            pos = end
        if _FIELD_KINDS[name] in ("map", "list") and isinstance(raw, str):
            raw = _map_to_list(name, raw)
        out[name] = raw
        if pos < len(text):
            if text[pos] != ",":
                raise HParamsError(f"malformed hparams string at {text[pos:]!r}; expected ',' between pairs")
            pos += 1
    return out
