"""Gradient saliency of google-research's ``model_pruning`` (``prune_option``).

``first_order_gradient`` scores a weight by ``|w| * g`` with ``g <- gamma * g + (1 - gamma) *
l2_normalize(|w - w_old|)``; ``second_order_gradient`` uses ``|w + w_oldold - 2 * w_old|``.
Despite the names these are finite differences of the weights between two mask updates, not
autograd gradients; ``gamma`` is ``gradient_decay_rate``.  The state (``gradient``,
``old_weight`` and, for second order, ``old_old_weight``) is kept in float32 next to the mask and
only advanced on mask-update steps, as in the original.  Unlike the original, the order within
an update is fixed: gradient first, then the weight copies, then the mask from the new score.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "SALIENCY_STATE",
    "advance_saliency",
    "advance_saliency_of",
    "init_saliency_state",
    "saliency_scores",
    "update_saliency",
]

#: The state tensors each option keeps per weight.
SALIENCY_STATE: dict[str, tuple[str, ...]] = {
    "weight": (),
    "first_order_gradient": ("gradient", "old_weight"),
    "second_order_gradient": ("gradient", "old_weight", "old_old_weight"),
}


def init_saliency_state(weight: Tensor, option: str) -> dict[str, Tensor]:
    """Zero-initialised state for ``option`` (empty for ``weight``), float32, on the weight's device."""
    return {name: torch.zeros_like(weight, dtype=torch.float32) for name in SALIENCY_STATE[option]}


def _delta(weight: Tensor, state: dict[str, Tensor], option: str) -> Tensor:
    """``|w - w_old|`` (first order) or ``|w + w_oldold - 2 w_old|`` (second order), float32, a new tensor."""
    w = weight.detach().to(torch.float32)
    old = state["old_weight"]
    delta = w - old if option == "first_order_gradient" else w + state["old_old_weight"] - 2.0 * old
    return delta.abs_()


def _sum_sq(delta: Tensor) -> Tensor:
    """``sum(delta^2)``, summed in float64 where the device has it.

    Shards' partial sums then add up to the whole weight's sum rounded once, so a sharded
    weight is normalised as one process normalises it.
    """
    wide = torch.float64 if delta.device.type in ("cpu", "cuda") else torch.float32
    return delta.square().sum(dtype=wide)


@torch.no_grad()
def advance_saliency(
    weight: Tensor, state: dict[str, Tensor], option: str, decay: float, sum_sq: Tensor | None = None
) -> None:
    """Advance ``state`` one mask update (the gradient estimate, then the weight copies).

    ``sum_sq``: the whole weight's ``sum(delta^2)`` when ``weight`` is one process's shard of it
    (see :func:`advance_saliency_of`); ``None`` computes it from ``weight``.

    Example::

        >>> w = torch.linspace(1, 10, 10)
        >>> state = init_saliency_state(w, "first_order_gradient")
        >>> advance_saliency(w, state, "first_order_gradient", decay=0.5)
        >>> torch.allclose(state["gradient"], 0.5 * w / w.norm()), torch.equal(state["old_weight"], w)
        (True, True)
    """
    if option == "weight":
        return
    delta = _delta(weight, state, option)
    if sum_sq is None:
        sum_sq = _sum_sq(delta)
    normalized = delta.mul_(
        torch.rsqrt(torch.clamp(sum_sq.to(torch.float32), min=1e-12))
    )  # tf.nn.l2_normalize over the whole weight
    state["gradient"].mul_(decay).add_(normalized, alpha=1.0 - decay)
    old = state["old_weight"]
    if option == "second_order_gradient":
        state["old_old_weight"].copy_(old)
    old.copy_(weight.detach())


@torch.no_grad()
def advance_saliency_of(
    parts: list[tuple[Tensor, dict[str, Tensor]]],
    option: str,
    decay: float,
    reduce_sum: Callable[[Tensor], Tensor] | None = None,
    counted: list[bool] | None = None,
) -> None:
    """Advance the saliency state of several weights; ``reduce_sum``: they are shards, normalised as wholes.

    Each weight's ``sum(delta^2)`` is summed over the processes (one ``reduce_sum`` for all of
    them, each shard counted where ``counted`` says), so a shard is normalised by its whole
    weight's norm, as one process would.

    Example::

        >>> w = torch.linspace(1, 10, 10)
        >>> state = init_saliency_state(w, "first_order_gradient")
        >>> advance_saliency_of([(w, state)], "first_order_gradient", 0.5, reduce_sum=lambda t: t)
        >>> torch.allclose(state["gradient"], 0.5 * w / w.norm())
        True
    """
    if option == "weight" or not parts:
        return
    sums: list[Tensor | None] = [None] * len(parts)
    if reduce_sum is not None:
        counted = counted or [True] * len(parts)
        local_sums = [_sum_sq(_delta(w, s, option)) * c for (w, s), c in zip(parts, counted, strict=True)]
        sums = list(reduce_sum(torch.stack(local_sums)).unbind())
    for (weight, state), sum_sq in zip(parts, sums, strict=True):
        advance_saliency(weight, state, option, decay, sum_sq)


@torch.no_grad()
def saliency_scores(weight: Tensor, state: dict[str, Tensor], option: str, out: Tensor | None = None) -> Tensor:
    """The non-negative float32 scores to rank: ``|w|``, or ``|w| * gradient`` (into ``out`` if given).

    Example::

        >>> saliency_scores(torch.tensor([-2.0, 1.0]), {}, "weight").tolist()
        [2.0, 1.0]
    """
    if out is None:
        out = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    scores = out.copy_(weight.detach()).abs_() if weight.dtype != torch.float32 else torch.abs(weight.detach(), out=out)
    return scores if option == "weight" else scores.mul_(state["gradient"])


@torch.no_grad()
def update_saliency(weight: Tensor, state: dict[str, Tensor], option: str, decay: float) -> Tensor:
    """Advance ``state`` one mask update and return the non-negative scores to rank.

    Example::

        >>> w = torch.linspace(1, 10, 10)
        >>> state = init_saliency_state(w, "first_order_gradient")
        >>> scores = update_saliency(w, state, "first_order_gradient", decay=0.5)
        >>> torch.allclose(scores, w * state["gradient"])
        True
    """
    advance_saliency(weight, state, option, decay)
    return saliency_scores(weight, state, option)
