"""TF's ``tf.HParams.parse`` string grammar: ``name=value,...`` with lists in brackets.

``"target_sparsity=0.9,weight_sparsity_map=[conv1:0.8,fc.*:0.95]"``: pairs separated by commas,
a value either a bracketed list or a scalar.  The list entries are regexes, which hold their own
brackets and commas (``fc{1,2}``, ``layer[0-9]``, ``(a,b|c)``), so a comma splits entries (and
ends a scalar) only at nesting depth zero: ``()``, ``[]`` and ``{}`` are tracked inside each
entry, and a backslash escapes the character after it (kept verbatim, as the regex needs it).
An entry whose brackets do not balance cannot be split safely: it raises
:class:`~lit_prune.config.hparams.HParamsError` naming the field and how to write it.

TF's own parser split list items on every comma and stopped a list at its first ``]``; this
grammar reads every string TF read correctly the same way.

This module knows the grammar only: which names exist and how values are typed and validated is
:class:`~lit_prune.config.hparams.PruningHParams`'s business.  Plain Python.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lit_prune.config.errors import HParamsError

__all__ = ["format_hparams_string", "format_list", "parse_hparams_string", "split_list"]

_OPEN = {"(": ")", "[": "]", "{": "}"}
_CLOSE = {")": "(", "]": "[", "}": "{"}
_PAIR = re.compile(r"\s*(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*=\s*")
_HOW = (
    "inside an entry, brackets '[]', braces '{}' and parentheses '()' must balance (the commas inside them "
    "do not split entries): escape a literal one with a backslash (e.g. 'conv\\[' or 'a\\{'), or give the "
    "value as a Python or YAML list instead of a string"
)


def _unbalanced(field_name: str, what: str, source: str) -> HParamsError:
    return HParamsError(f"`{field_name}`: {what} in {source!r}; {_HOW}")


def _scan(
    text: str, pos: int, field_name: str, source: str, *, close: str | None, split: bool
) -> tuple[list[str], int]:
    """Read entries from ``text[pos:]``, tracking ``()[]{}`` nesting and backslash escapes.

    With ``close`` (``"]"``), read up to the unmatched ``close`` (consumed) and split on the commas
    at depth zero.  Without it, read to the end, splitting on the commas at depth zero if
    ``split``, else stopping at the first one (left unconsumed).  Returns the raw entries and the
    position after them.
    """
    stack: list[str] = []
    items: list[str] = []
    start = i = pos
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch in _OPEN:
            stack.append(ch)
        elif ch in _CLOSE:
            if not stack:
                if ch == close:
                    items.append(text[start:i])
                    return items, i + 1
                raise _unbalanced(field_name, f"unbalanced {ch!r} (nothing open to close)", source)
            if stack[-1] != _CLOSE[ch]:
                raise _unbalanced(field_name, f"{ch!r} closes {stack[-1]!r}", source)
            stack.pop()
        elif ch == "," and not stack:
            items.append(text[start:i])
            if not split:
                return items, i
            start = i + 1
        i += 1
    if close is not None:
        raise _unbalanced(field_name, f"unterminated '[' (a list needs its closing {close!r})", source)
    if stack:
        raise _unbalanced(field_name, f"unbalanced {stack[-1]!r} (never closed)", source)
    items.append(text[start:])
    return items, len(text)


def _entries(raw: Iterable[str]) -> list[str]:
    # Surrounding spaces go, and so do empty entries (TF's default list was ['']).
    return [item.strip() for item in raw if item.strip()]


def split_list(field_name: str, text: str) -> list[str]:
    """Split a list given as one string, ``"[a,b]"`` or ``"a,b"``, on the commas at depth zero.

    The outer brackets are optional (dropped only when the first ``[`` closes at the very end);
    empty entries are dropped.

    Raises:
        HParamsError: the brackets of an entry do not balance (the message names ``field_name``).

    Example::

        >>> split_list("prune_patterns", "[fc{1,2},layer[0-9]]")
        ['fc{1,2}', 'layer[0-9]']
        >>> split_list("weight_sparsity_map", "(a,b|c):0.5, d:0.7")
        ['(a,b|c):0.5', 'd:0.7']
    """
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            items, end = _scan(stripped, 1, field_name, text, close="]", split=True)
        except HParamsError:
            end = -1  # not one bracketed list: read it as bare entries below (which reports the problem)
        if end == len(stripped):
            return _entries(items)
    return _entries(_scan(stripped, 0, field_name, text, close=None, split=True)[0])


def parse_hparams_string(values: str, names: Sequence[str]) -> dict[str, str | list[str]]:
    """Split ``"a=1,b=[x:1,y:2],c=s"`` into ``{name: raw string, or list of raw strings}``.

    Only the grammar is checked here: the names (each one of ``names``, at most once), the
    ``=``/``,`` structure and the brackets.  The values stay strings, for the caller to type.

    Raises:
        HParamsError: an unknown or repeated name, a malformed pair, unbalanced brackets.

    Example::

        >>> parse_hparams_string("nbins=64,prune_patterns=[fc{1,2},conv]", ["nbins", "prune_patterns"])
        {'nbins': '64', 'prune_patterns': ['fc{1,2}', 'conv']}
    """
    if not isinstance(values, str):
        raise HParamsError(f"parse() takes a string like 'target_sparsity=0.9,...', got {values!r}")
    out: dict[str, str | list[str]] = {}
    pos, text = 0, values.strip()
    while pos < len(text):
        match = _PAIR.match(text, pos)
        if not match:
            raise HParamsError(f"malformed hparams string at {text[pos:]!r}; expected 'name=value,...'")
        name, pos = match.group("name"), match.end()
        if name not in names:
            raise HParamsError(f"unknown pruning hparam {name!r}; accepted: {list(names)}")
        if name in out:
            raise HParamsError(f"pruning hparam {name!r} is given twice in {values!r}")
        if text.startswith("[", pos):
            items, pos = _scan(text, pos + 1, name, values, close="]", split=True)
            out[name] = _entries(items)
        else:
            items, pos = _scan(text, pos, name, values, close=None, split=False)
            out[name] = items[0].strip()
        if pos < len(text):
            if text[pos] != ",":
                raise HParamsError(f"malformed hparams string at {text[pos:]!r}; expected ',' between pairs")
            pos += 1
    return out


def _check_entry(field_name: str, entry: str, *, scalar: bool) -> str:
    """``entry`` if it reads back as itself (a list entry, or a ``scalar`` value), else an :class:`HParamsError`."""
    items = _scan(entry, 0, field_name, entry, close=None, split=True)[0]
    if len(items) != 1 or entry != entry.strip() or (scalar and entry.startswith("[")):
        raise HParamsError(
            f"`{field_name}`: {entry!r} cannot be written in a 'name=value,...' string (a comma outside brackets, "
            "surrounding spaces, or a scalar value starting with '['); escape the comma or bracket with a backslash"
        )
    return entry


def format_list(field_name: str, entries: Iterable[str]) -> str:
    """``["a", "b"]`` -> ``"[a,b]"``, the inverse of the bracketed list :func:`parse_hparams_string` reads.

    Raises:
        HParamsError: an entry would not read back as itself (an empty one, a comma outside
            brackets, unbalanced brackets, surrounding spaces).

    Example::

        >>> format_list("prune_patterns", ["fc{1,2}", "layer[0-9]"])
        '[fc{1,2},layer[0-9]]'
    """
    out = []
    for entry in entries:
        if not entry:
            raise HParamsError(f"`{field_name}`: an empty entry cannot be written in a 'name=value,...' string")
        out.append(_check_entry(field_name, entry, scalar=False))
    return "[" + ",".join(out) + "]"


def format_hparams_string(values: Mapping[str, Any]) -> str:
    """``{name: value}`` -> ``"name=value,..."``, which :func:`parse_hparams_string` reads back.

    Lists become ``[a,b]``, bools ``true``/``false``, numbers their ``repr``; strings are written
    as they are (and must read back as themselves).

    Raises:
        HParamsError: a value that the grammar cannot carry (see :func:`format_list`).

    Example::

        >>> format_hparams_string({"target_sparsity": 0.9, "use_tpu": False, "prune_patterns": ["fc{1,2}"]})
        'target_sparsity=0.9,use_tpu=false,prune_patterns=[fc{1,2}]'
    """
    pairs = []
    for name, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        elif isinstance(value, str):
            text = _check_entry(name, value, scalar=True) if value else ""
        elif isinstance(value, list | tuple):
            text = format_list(name, value)
        else:
            raise HParamsError(f"`{name}`: {value!r} cannot be written in a 'name=value,...' string")
        pairs.append(f"{name}={text}")
    return ",".join(pairs)
