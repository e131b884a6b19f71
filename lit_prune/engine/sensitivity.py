"""Sensitivity scan: prune each weight alone, one-shot, at several sparsities, and measure a metric.

:func:`sensitivity` returns a :class:`SensitivityScan`: the metric of every (weight, sparsity),
which it writes as JSON, CSV and a PNG of one curve per weight, and from which it proposes the
per-weight targets of least total predicted loss for a ``target_sparsity``
(:meth:`SensitivityScan.propose`, :meth:`SensitivityScan.weight_sparsity_map`).  The JSON is
what ``allocation=sensitivity`` reads (``sensitivity_scan=<file>``), so a target chosen later is
solved from the same scan.  Plain torch; ``rich`` (progress) and ``matplotlib`` (plot) are
imported when used.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_prune.config.errors import HParamsError
from lit_prune.engine.allocation import allocate
from lit_prune.engine.selection import select_weights
from lit_prune.engine.sharding import is_sharded

__all__ = ["SensitivityScan", "sensitivity"]

Evaluate = Callable[[nn.Module], "float | Mapping[str, float]"]


@dataclass
class SensitivityScan:
    """The result of :func:`sensitivity`.

    Attributes:
        shapes: ``{weight name: shape}`` of the scanned weights, in model order.
        sparsities: The scanned sparsities, ascending.
        metric: The name of the metric the proposal minimises the loss of.
        mode: ``"min"`` (lower is better, e.g. a loss) or ``"max"`` (e.g. an accuracy).
        baseline: Every metric of the unpruned model.
        results: ``{weight name: [every metric at each sparsity]}``.
    """

    shapes: dict[str, tuple[int, ...]]
    sparsities: list[float]
    metric: str
    mode: str
    baseline: dict[str, float]
    results: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    def loss(self, name: str) -> list[tuple[float, float]]:
        """``[(sparsity, metric loss)]`` of one weight: how much worse than the baseline it made the metric."""
        sign = 1.0 if self.mode == "min" else -1.0
        base = self.baseline[self.metric]
        return [(s, sign * (r[self.metric] - base)) for s, r in zip(self.sparsities, self.results[name], strict=True)]

    def propose(self, target: float, pinned: Mapping[str, float] | None = None) -> dict[str, float]:
        """Per-weight sparsities averaging exactly ``target`` (by parameters) with the least predicted loss.

        ``pinned`` weights keep their value and count towards the average.  The loss is
        interpolated linearly between the scanned sparsities (and 0 at sparsity 0); no weight is
        proposed beyond the largest scanned sparsity.

        Raises:
            HParamsError: ``target`` outside [0, 1), or one the scan's sparsities cannot reach.
        """
        _check_sparsity("target_sparsity", target)
        curves = {name: self.loss(name) for name in self.shapes}
        return allocate("sensitivity", self.shapes, target, dict(pinned or {}), curves).targets

    def weight_sparsity_map(self, target: float, pinned: Mapping[str, float] | None = None) -> list[str]:
        """:meth:`propose` as ``weight_sparsity_map`` entries (``^name$:sparsity``), TF's list form."""
        return [f"^{re.escape(n)}$:{s!r}" for n, s in self.propose(target, pinned).items()]

    def to_dict(self) -> dict[str, Any]:
        """Plain types: what :meth:`save` writes as JSON (``loss`` is what ``allocation=sensitivity`` reads)."""
        return {
            "metric": self.metric,
            "mode": self.mode,
            "sparsities": self.sparsities,
            "baseline": self.baseline,
            "shapes": {n: list(s) for n, s in self.shapes.items()},
            "results": self.results,
            "loss": {n: [list(p) for p in self.loss(n)] for n in self.shapes},
        }

    @classmethod
    def load(cls, path: str | Path) -> SensitivityScan:
        """Read a scan back from the JSON :meth:`save` wrote."""
        d = json.loads(Path(path).read_text())
        shapes = {n: tuple(s) for n, s in d["shapes"].items()}
        return cls(shapes, d["sparsities"], d["metric"], d["mode"], d["baseline"], d["results"])

    def save(self, directory: str | Path, target: float | None = None) -> dict[str, Path]:
        """Write ``scan.json``, ``scan.csv`` and ``scan.png`` (and the proposal for ``target``) into ``directory``.

        Returns:
            ``{"json": ..., "csv": ..., "png": ...}``, the paths written.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        if target is not None:
            data["proposal"] = {"target_sparsity": target, "weight_sparsity_map": self.weight_sparsity_map(target)}
        paths = {"json": out / "scan.json", "csv": out / "scan.csv", "png": out / "scan.png"}
        paths["json"].write_text(json.dumps(data, indent=2))
        keys = sorted(self.baseline)
        with paths["csv"].open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["weight", "numel", "sparsity", *keys])
            writer.writerow(["(none)", 0, 0.0, *(self.baseline[k] for k in keys)])
            for name, rows in self.results.items():
                for s, r in zip(self.sparsities, rows, strict=True):
                    writer.writerow([name, math.prod(self.shapes[name]), s, *(r[k] for k in keys)])
        self.plot(paths["png"])
        return paths

    def plot(self, path: str | Path) -> None:
        """A PNG of the metric against sparsity, one curve per weight, the baseline dashed."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, rows in self.results.items():
            label = f"{name} ({math.prod(self.shapes[name])})"
            ax.plot([100 * s for s in self.sparsities], [r[self.metric] for r in rows], "o-", label=label)
        ax.axhline(self.baseline[self.metric], color="grey", linestyle="--", label="unpruned")
        ax.set_xlabel("sparsity of the one weight pruned (%)")
        ax.set_ylabel(self.metric)
        ax.set_title("sensitivity: each weight pruned alone, one-shot")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _check_sparsity(name: str, value: float) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise HParamsError(f"`{name}` must hold floats in [0, 1), got {value!r}")


def _metrics(name: str, value: float | Mapping[str, float]) -> dict[str, float]:
    if isinstance(value, Mapping):
        return {str(k): float(v) for k, v in value.items()}
    if isinstance(value, int | float | torch.Tensor):
        return {name: float(value)}
    raise HParamsError(f"`evaluate` must return a float or a mapping of metrics, got {value!r}")


def _resolve_weights(model: nn.Module, weights: Iterable[str] | None) -> list[str]:
    params = dict(model.named_parameters())
    if weights is None:
        return select_weights(model, [], [])
    chosen = list(weights)
    if not chosen:
        raise HParamsError("`weights` is empty: name the weights to scan (names or regexes), or None for the default")
    if all(w in params for w in chosen):
        return chosen
    return select_weights(model, chosen, [])


@torch.no_grad()
def _prune_alone(weight: torch.Tensor, saved: torch.Tensor, sparsity: float) -> None:
    """Zero the ``round(n * sparsity)`` smallest-magnitude elements of ``weight`` (from the ``saved`` values)."""
    weight.copy_(saved)
    k = round(saved.numel() * sparsity)
    if k:
        order = saved.abs().flatten().argsort(stable=True)[:k]
        weight.view(-1)[order] = 0


def sensitivity(
    model: nn.Module,
    evaluate: Evaluate,
    sparsities: Sequence[float] = (0.5, 0.7, 0.8, 0.9, 0.95),
    weights: Iterable[str] | None = None,
    *,
    metric: str | None = None,
    mode: str = "min",
    progress: bool = True,
) -> SensitivityScan:
    """Prune each weight alone, one-shot by magnitude, at each sparsity, and evaluate; restore it after.

    Args:
        model: The (trained) model; its weights are restored exactly after each evaluation.
        evaluate: ``evaluate(model)`` returns a float or a mapping of metrics (e.g. validation
            loss and accuracy); put the model in eval mode inside it if it needs that.
        sparsities: The sparsities to scan, each in [0, 1).
        weights: Parameter names or regexes (``re.search``); ``None`` = the weights lit_prune
            prunes by default.
        metric: The metric to rank by when ``evaluate`` returns a mapping (may be omitted when it
            holds one metric).
        mode: ``"min"`` (lower is better: a loss) or ``"max"`` (an accuracy).
        progress: Show a ``rich`` progress bar (when ``rich`` is installed).

    Raises:
        HParamsError: no weights, ``evaluate`` not callable or its result without ``metric``,
            sparsities outside [0, 1), an unknown ``mode``; raised before any weight is pruned.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> x = torch.randn(64, 4)
        >>> y = net(x).argmax(1)
        >>> acc = lambda m: float((m(x).argmax(1) == y).float().mean())
        >>> scan = sensitivity(net, acc, sparsities=(0.5, 0.9), mode="max", progress=False)
        >>> scan.baseline, sorted(scan.propose(0.5))
        ({'metric': 1.0}, ['0.weight', '2.weight'])
    """
    if not callable(evaluate):
        raise HParamsError(f"`evaluate` must be a callable of the model returning the metric, got {evaluate!r}")
    if mode not in ("min", "max"):
        raise HParamsError(f"`mode` must be 'min' or 'max', got {mode!r}")
    grid = sorted({float(s) for s in sparsities}) if not isinstance(sparsities, str) else []
    if not grid:
        raise HParamsError(f"`sparsities` must be a non-empty list of floats in [0, 1), got {sparsities!r}")
    for s in grid:
        _check_sparsity("sparsities", s)
    names = _resolve_weights(model, weights)
    params = dict(model.named_parameters())
    sharded = [n for n in names if is_sharded(params[n])]
    if sharded:
        raise NotImplementedError(
            f"the scan prunes each weight whole, in one process; {sharded[:3]} are sharded (DTensors): scan the "
            "model on one device (its proposed map then feeds a sharded run as it is)"
        )
    baseline = _metrics(metric or "metric", evaluate(model))
    metric = metric or (next(iter(baseline)) if len(baseline) == 1 else None)
    if metric is None or metric not in baseline:
        raise HParamsError(f"`metric`={metric!r} is not among the metrics `evaluate` returns: {sorted(baseline)}")
    scan = SensitivityScan({n: tuple(params[n].shape) for n in names}, grid, metric, mode, baseline)
    with _progress(progress, len(names) * len(grid)) as advance:
        for name in names:
            weight = params[name].data
            saved = weight.detach().clone()
            rows = []
            try:
                for s in grid:
                    _prune_alone(weight, saved, s)
                    rows.append(_metrics(metric, evaluate(model)))
                    advance(f"{name} @ {s:.2f}")
            finally:
                weight.copy_(saved)
            scan.results[name] = rows
    return scan


class _progress:
    """A ``rich`` progress bar as a context giving ``advance(description)``; silent without rich or when off."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.bar: Any = None
        if enabled:
            try:
                from rich.progress import Progress
            except ImportError:  # pragma: no cover - rich comes with Lightning's extras
                return
            self.bar = Progress(transient=False)
            self.task = self.bar.add_task("sensitivity scan", total=total)

    def __enter__(self) -> Callable[[str], None]:
        if self.bar is not None:
            self.bar.start()
        return self.advance

    def advance(self, description: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=f"scan {description}")

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
