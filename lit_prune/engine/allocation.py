"""Per-weight sparsity targets from one ``target_sparsity``: the ``allocation`` rules.

* ``uniform`` (TF, the default): every weight at ``target_sparsity``; a ``weight_sparsity_map``
  entry wins for its weight and the others stay at ``target_sparsity``, exactly as in TF (so with
  a map the average is TF's, not re-solved).
* ``global`` (``global_ranking=True`` is its alias): the weights without an entry are ranked
  jointly with one threshold, at the sparsity that makes the average exact.  A weight *too small
  to matter* is kept dense and out of the ranking: one holding under 1 % of the largest free
  weight's elements (smallest first, while such weights hold at most 2 % of the pruned elements
  together).  A joint threshold can otherwise prune a small first layer or classifier away
  entirely (layer collapse) for a saving of a fraction of a percent; the others make up for it.
* ``erk``: Erdős–Rényi-Kernel (Evci et al. 2020): density proportional to ``sum(shape) /
  prod(shape)``, scaled to the budget; a weight whose density would exceed 1 is kept dense and
  the rest solved again (RigL's loop).
* ``sensitivity``: from a scan (:func:`lit_prune.sensitivity`): each weight's predicted metric
  loss, piecewise linear between the scanned sparsities, and the map of least total predicted
  loss that reaches the budget (the lower convex hulls filled in order of loss per pruned
  parameter; the last segment partly, so the average is exact).

For every rule but ``uniform`` the targets average *exactly* to ``target_sparsity`` over all
pruned weights, counted by parameters: pinned weights (``weight_sparsity_map`` entries, N:M
weights' ``1 - N/M``) keep theirs and the others share the rest of the budget.  A budget the
free weights cannot reach (pinned weights already denser than the rest could make up, or already
so sparse that the rest would need fewer than zero pruned) is an :class:`HParamsError` naming
``weight_sparsity_map``.  Element counts are ``numel()`` and shapes ``.shape``: global for a
sharded ``DTensor``.  Plain Python and torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lit_prune.config.hparams import HParamsError

__all__ = ["Allocation", "allocate", "erk_targets", "global_targets", "load_scan_curves", "sensitivity_targets"]

#: ``global``: a weight under this fraction of the largest free weight's elements is kept dense ...
SMALL_WEIGHT_FRACTION = 0.01
#: ... while the weights kept dense that way hold at most this fraction of the pruned elements.
SMALL_WEIGHTS_BUDGET = 0.02
_EPS = 1e-12


@dataclass(frozen=True)
class Allocation:
    """The targets an allocation rule chose.

    Attributes:
        targets: ``{weight name: final sparsity}`` for every weight the rule placed (empty for
            ``uniform``: each weight then follows ``target_sparsity`` or its own map entry).
        joint: The weights ranked together with one threshold (``global``), all at one target.
        kept_dense: The weights kept dense by the rule (``global``'s small weights, ERK's
            weights whose density would exceed 1).
    """

    targets: dict[str, float]
    joint: frozenset[str] = frozenset()
    kept_dense: frozenset[str] = frozenset()


def allocate(
    rule: str,
    shapes: Mapping[str, tuple[int, ...]],
    target: float,
    pinned: Mapping[str, float],
    curves: Mapping[str, list[tuple[float, float]]] | None = None,
) -> Allocation:
    """Per-weight targets for ``rule`` (``uniform``, ``global``, ``erk`` or ``sensitivity``).

    Args:
        rule: The ``allocation`` hparam.
        shapes: ``{weight name: shape}`` of every pruned weight (global shapes for sharded ones).
        target: ``target_sparsity``.
        pinned: ``{weight name: own target}`` of the weights that keep theirs (map entries, N:M).
        curves: ``sensitivity`` only: ``{weight name: [(sparsity, predicted loss), ...]}``.

    Raises:
        HParamsError: an unknown rule, or targets that cannot average to ``target``.

    Example::

        >>> a = allocate("erk", {"conv": (8, 1, 3, 3), "fc": (10, 512)}, 0.9, {})
        >>> {k: round(v, 3) for k, v in a.targets.items()}
        {'conv': 0.799, 'fc': 0.901}
    """
    free = [n for n in shapes if n not in pinned]
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    budget = target * sum(sizes.values()) - sum(sizes[n] * s for n, s in pinned.items())  # elements to prune
    if rule == "uniform":
        return Allocation({})
    if not free:
        return Allocation(dict(pinned))
    _check_budget(budget, sum(sizes[n] for n in free), target, pinned)
    if rule == "global":
        return global_targets(sizes, free, budget, pinned)
    if rule == "erk":
        return erk_targets({n: shapes[n] for n in free}, budget, pinned)
    if rule == "sensitivity":
        if curves is None:
            raise HParamsError("`allocation`=sensitivity needs a scan: set `sensitivity_scan` to its JSON file")
        return sensitivity_targets({n: sizes[n] for n in free}, curves, budget, pinned)
    raise HParamsError(f"`allocation` must be one of ['uniform', 'global', 'erk', 'sensitivity'], got {rule!r}")


def _check_budget(budget: float, free_size: int, target: float, pinned: Mapping[str, float]) -> None:
    if budget < -_EPS * free_size or budget >= free_size:
        need = budget / free_size
        raise HParamsError(
            f"`weight_sparsity_map` (and N:M) pin {dict(pinned)}: the other weights would need sparsity {need:.4f} "
            f"to make the average `target_sparsity`={target}, outside [0, 1); loosen the pinned targets or the target"
        )


def global_targets(sizes: Mapping[str, int], free: list[str], budget: float, pinned: Mapping[str, float]) -> Allocation:
    """``global``: small weights dense, the rest ranked jointly at the one sparsity the budget leaves.

    Example::

        >>> a = global_targets({"a": 50, "b": 10000}, ["a", "b"], 0.9 * 10050, {})
        >>> a.targets["a"], round(a.targets["b"], 4), sorted(a.joint)
        (0.0, 0.9045, ['b'])
    """
    largest = max(sizes[n] for n in free)
    total = sum(sizes.values())
    dense, held = [], 0
    for name in sorted(free, key=lambda n: sizes[n]):
        if sizes[name] >= SMALL_WEIGHT_FRACTION * largest or held + sizes[name] > SMALL_WEIGHTS_BUDGET * total:
            break
        dense.append(name)
        held += sizes[name]
    joint = [n for n in free if n not in dense]
    if budget >= sum(sizes[n] for n in joint):  # keeping them dense leaves too little: rank them too
        dense, joint = [], list(free)
    share = max(0.0, budget / sum(sizes[n] for n in joint))
    targets = {**pinned, **dict.fromkeys(dense, 0.0), **dict.fromkeys(joint, share)}
    return Allocation(targets, frozenset(joint), frozenset(dense))


def erk_targets(shapes: Mapping[str, tuple[int, ...]], budget: float, pinned: Mapping[str, float]) -> Allocation:
    """``erk``: density ``eps * sum(shape) / prod(shape)``, weights above density 1 dense, the rest re-solved.

    Example::

        >>> a = erk_targets({"a": (4, 4), "b": (100, 100)}, 0.5 * 10016, {})
        >>> a.targets["a"], round(a.targets["b"], 4), sorted(a.kept_dense)
        (0.0, 0.5008, ['a'])
    """
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: sum(s) / sizes[n] for n, s in shapes.items()}
    dense: set[str] = set()
    keep = sum(sizes.values()) - budget  # elements the free weights keep
    while True:
        rest = [n for n in shapes if n not in dense]
        if not rest:  # every weight dense: a budget of (about) 0
            eps = 0.0
            break
        eps = (keep - sum(sizes[n] for n in dense)) / sum(raw[n] * sizes[n] for n in rest)
        over = {n for n in rest if eps * raw[n] > 1.0}
        if not over:
            break
        dense |= over
    targets = {**pinned, **{n: 0.0 if n in dense else 1.0 - eps * raw[n] for n in shapes}}
    return Allocation(targets, kept_dense=frozenset(dense))


def _lower_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The lower convex hull of ``(sparsity, loss)`` points sorted by sparsity (monotone chain)."""
    hull: list[tuple[float, float]] = []
    for p in points:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) > 0:
                break
            hull.pop()
        hull.append(p)
    return hull


def sensitivity_targets(
    sizes: Mapping[str, int],
    curves: Mapping[str, list[tuple[float, float]]],
    budget: float,
    pinned: Mapping[str, float],
) -> Allocation:
    """``sensitivity``: least total predicted loss reaching ``budget`` pruned elements (exactly).

    Each weight's curve (loss against sparsity, with ``(0, 0)`` added) is replaced by its lower
    convex hull; hull segments are taken in order of loss per pruned element, the last in part.

    Raises:
        HParamsError: a weight the scan does not cover, or a budget beyond the scanned sparsities.

    Example::

        >>> curves = {"a": [(0.5, 0.0), (0.9, 1.0)], "b": [(0.5, 0.1), (0.9, 0.2)]}
        >>> t = sensitivity_targets({"a": 100, "b": 100}, curves, 140.0, {})
        >>> {k: round(v, 3) for k, v in t.targets.items()}
        {'a': 0.5, 'b': 0.9}
    """
    missing = [n for n in sizes if n not in curves]
    if missing:
        raise HParamsError(f"`sensitivity_scan` does not cover the pruned weights {missing}: scan them too")
    segments = []
    for name, n in sizes.items():
        hull = _lower_hull(sorted({0.0: 0.0, **dict(curves[name])}.items()))
        for (x1, y1), (x2, y2) in zip(hull, hull[1:], strict=False):
            segments.append((max(0.0, (y2 - y1) / ((x2 - x1) * n)), name, x1, x2))
    targets = dict.fromkeys(sizes, 0.0)
    left = budget
    for _, name, x1, x2 in sorted(segments, key=lambda s: (s[0], s[2])):
        if left <= 0:
            break
        step = min(left, (x2 - x1) * sizes[name])
        targets[name] = min(x2, x1 + step / sizes[name])
        left -= step
    if left > _EPS * budget + 1e-9:
        reach = max(max(x for x, _ in curves[n]) for n in sizes)
        raise HParamsError(
            f"`sensitivity_scan` reaches sparsity {reach} per weight at most, too little for `target_sparsity`: "
            "scan higher sparsities"
        )
    return Allocation({**pinned, **targets})


def load_scan_curves(path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """``{weight: [(sparsity, predicted loss), ...]}`` from a scan's JSON (``SensitivityScan.save``).

    Raises:
        HParamsError: no such file, or not a scan (names ``sensitivity_scan``).
    """
    try:
        data: dict[str, Any] = json.loads(Path(path).read_text())
        return {name: [(float(s), float(d)) for s, d in pairs] for name, pairs in data["loss"].items()}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise HParamsError(f"`sensitivity_scan`={str(path)!r} is not a readable scan JSON ({err})") from None
