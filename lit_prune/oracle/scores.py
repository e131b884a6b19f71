"""Kernel importance scores of Molchanov et al. (ICLR 2017), accumulated batch by batch.

* :class:`TaylorScores` - the paper's Taylor criterion (Eq. 8): per example, the first-order loss
  change ``sum over positions of activation * gradient`` of a feature map, summed over the group's
  gates (a residual channel lives in several tensors) *before* the absolute value, then the mean of
  the absolute values over examples.  Tensor hooks compute it during the backward pass; no
  activation outlives its batch.
* :func:`exact_oracle` - the paper's oracle: the loss change when one channel is removed (its gates
  zeroed), for every channel, in ``channels`` forward passes per batch (small models only).
* :func:`l1_scores`, :func:`random_scores` - the baselines (smallest-L1-norm filters, random).
* :func:`l2_normalize_per_group` and :func:`select_removals` - the paper's per-layer L2
  normalisation and the global ranking that keeps at least one kernel per group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from lit_prune.oracle.surgery import KernelGroup, StructuredPruningError

__all__ = [
    "TaylorScores",
    "exact_oracle",
    "l1_scores",
    "l2_normalize_per_group",
    "random_scores",
    "select_removals",
    "spearman",
]

LossFn = Callable[[Tensor, Tensor], Tensor]


def _channel_sums(x: Tensor) -> Tensor:
    """``[B, C, ...] -> [B, C]``: sum over all positions."""
    return x.flatten(2).sum(-1) if x.dim() > 2 else x


class TaylorScores:
    """Accumulates the Taylor criterion of each group channel over the batches it sees.

    Use as a context manager around forward + backward; :meth:`end_batch` after each backward.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lit_prune.oracle.surgery import KernelGroup
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
        >>> scores = TaylorScores(model, [KernelGroup("0", 4, ["0"], ["0"])])
        >>> with scores:
        ...     loss = model(torch.randn(8, 1, 8, 8)).logsumexp(1).mean()
        ...     loss.backward()
        >>> scores.end_batch()
        >>> scores.scores()["0"].shape, scores.samples
        (torch.Size([4]), 8)
    """

    def __init__(self, model: nn.Module, groups: list[KernelGroup]) -> None:
        self.model = model
        self.groups = groups
        self.totals: dict[str, Tensor] = {}
        self.samples = 0
        self._pending: dict[str, Tensor] = {}  # this batch's per-example signed sums, per group
        self._batch = 0
        self._handles: list = []

    def __enter__(self) -> TaylorScores:
        modules = dict(self.model.named_modules())
        for group in self.groups:
            for gate in group.gates:
                self._handles.append(modules[gate].register_forward_hook(self._forward_hook(group.name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _forward_hook(self, group: str) -> Callable:
        def hook(module: nn.Module, args: object, output: Tensor) -> None:
            if not output.requires_grad:
                return
            self._batch = output.shape[0]

            def on_grad(grad: Tensor) -> None:
                # The first-order change of the (batch-mean) loss, scaled to a per-example change.
                term = _channel_sums(output.detach() * grad.detach()).float() * output.shape[0]
                self._pending[group] = self._pending.get(group, 0) + term

            output.register_hook(on_grad)

        return hook

    def end_batch(self) -> None:
        """Fold the batch's per-example terms into the totals: ``sum over examples of |term|``."""
        for group, term in self._pending.items():
            total = term.abs().sum(0).cpu()
            self.totals[group] = self.totals.get(group, torch.zeros_like(total)) + total
        if self._pending:
            self.samples += self._batch
        self._pending.clear()

    def scores(self) -> dict[str, Tensor]:
        """``{group: mean over examples of |first-order loss change|}`` per channel (Eq. 8, up to 1/M)."""
        n = max(self.samples, 1)
        return {g.name: self.totals.get(g.name, torch.zeros(g.channels)) / n for g in self.groups}


def _gate_hooks(model: nn.Module, gates: dict[str, Tensor]) -> list:
    modules = dict(model.named_modules())

    def make(mask: Tensor) -> Callable:
        def hook(module: nn.Module, args: object, output: Tensor) -> Tensor:
            shape = (1, -1) + (1,) * (output.dim() - 2)
            return output * mask.to(output.dtype).view(shape)

        return hook

    return [modules[name].register_forward_hook(make(mask)) for name, mask in gates.items()]


@torch.no_grad()
def exact_oracle(
    model: nn.Module, groups: list[KernelGroup], batch: tuple[Tensor, Tensor], loss_fn: LossFn
) -> dict[str, Tensor]:
    """Per group channel, the summed loss change over ``batch`` when that channel is removed (signed).

    Removal is simulated by zeroing the channel in every gate of its group, which is exactly what
    physical removal does to the network's output.  Sum these over a dataset and take ``|.|`` for
    the paper's *oracle-abs*.
    """
    x, y = batch
    base = loss_fn(model(x), y)
    out: dict[str, Tensor] = {}
    for group in groups:
        deltas = torch.zeros(group.channels)
        for k in range(group.channels):
            mask = torch.ones(group.channels, device=x.device)
            mask[k] = 0
            handles = _gate_hooks(model, dict.fromkeys(group.gates, mask))
            try:
                deltas[k] = (loss_fn(model(x), y) - base).float().cpu() * x.shape[0]
            finally:
                for handle in handles:
                    handle.remove()
        out[group.name] = deltas
    return out


def l1_scores(model: nn.Module, groups: list[KernelGroup]) -> dict[str, Tensor]:
    """Per group channel, the L1 norm of its conv kernels (summed over the group's convs)."""
    modules = dict(model.named_modules())
    out = {}
    for group in groups:
        total = torch.zeros(group.channels)
        for conv in group.convs:
            total += modules[conv].weight.detach().abs().flatten(1).sum(1).float().cpu()
        out[group.name] = total
    return out


def random_scores(groups: list[KernelGroup], seed: int = 0) -> dict[str, Tensor]:
    """Uniform random scores (the baseline every criterion must beat)."""
    g = torch.Generator().manual_seed(seed)
    return {group.name: torch.rand(group.channels, generator=g) for group in groups}


def l2_normalize_per_group(scores: dict[str, Tensor]) -> dict[str, Tensor]:
    """The paper's layer-wise normalisation ``s / sqrt(sum s^2)``, so one ranking spans all layers."""
    return {name: s / s.norm().clamp_min(1e-30) for name, s in scores.items()}


def select_removals(scores: dict[str, Tensor], count: int, per_layer: bool = False) -> dict[str, list[int]]:
    """The ``count`` lowest-scored channels over all groups, keeping at least one per group.

    ``per_layer=True`` instead removes the same share from every group (its lowest-scored channels),
    which shrinks every layer evenly.

    Raises:
        StructuredPruningError: ``count`` would take every kernel of some group.
    """
    if per_layer:
        total = sum(len(s) for s in scores.values())
        out = {}
        for name, s in scores.items():
            n = round(count * len(s) / total)
            if n >= len(s):
                raise StructuredPruningError(
                    f"cannot remove {n} of the {len(s)} kernels of `{name}`: "
                    "every convolution must keep at least one kernel"
                )
            out[name] = sorted(torch.argsort(s)[:n].tolist())
        return out
    capacity = sum(len(s) - 1 for s in scores.values())
    if count > capacity:
        raise StructuredPruningError(
            f"cannot remove {count} kernels: every convolution must keep at least one kernel, so at most "
            f"{capacity} of {sum(len(s) for s in scores.values())} can go"
        )
    # Rank all channels except each group's best, which always stays.
    candidates = []
    for name, s in scores.items():
        best = int(torch.argmax(s))
        candidates += [(float(v), name, k) for k, v in enumerate(s.tolist()) if k != best]
    candidates.sort()
    out: dict[str, list[int]] = {name: [] for name in scores}
    for _, name, k in candidates[:count]:
        out[name].append(k)
    return out


def spearman(a: Iterable[float], b: Iterable[float]) -> float:
    """Spearman rank correlation (average ranks for ties).

    Example::

        >>> round(spearman([1, 2, 3, 4], [10, 20, 30, 40]), 6), round(spearman([1, 2, 3], [3, 2, 1]), 6)
        (1.0, -1.0)
    """
    x, y = torch.tensor(list(a), dtype=torch.float64), torch.tensor(list(b), dtype=torch.float64)

    def ranks(v: Tensor) -> Tensor:
        order = v.argsort()
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in v.unique():  # average ranks of ties
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))
