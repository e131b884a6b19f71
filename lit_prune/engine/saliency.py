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

import torch
from torch import Tensor

__all__ = ["SALIENCY_STATE", "advance_saliency", "init_saliency_state", "saliency_scores", "update_saliency"]

#: The state tensors each option keeps per weight.
SALIENCY_STATE: dict[str, tuple[str, ...]] = {
    "weight": (),
    "first_order_gradient": ("gradient", "old_weight"),
    "second_order_gradient": ("gradient", "old_weight", "old_old_weight"),
}


def init_saliency_state(weight: Tensor, option: str) -> dict[str, Tensor]:
    """Zero-initialised state for ``option`` (empty for ``weight``), float32, on the weight's device."""
    return {name: torch.zeros_like(weight, dtype=torch.float32) for name in SALIENCY_STATE[option]}


def _l2_normalize(x: Tensor) -> Tensor:
    # tf.nn.l2_normalize: x / sqrt(max(sum(x^2), 1e-12))
    return x * torch.rsqrt(torch.clamp(x.square().sum(), min=1e-12))


@torch.no_grad()
def advance_saliency(weight: Tensor, state: dict[str, Tensor], option: str, decay: float) -> None:
    """Advance ``state`` one mask update (the gradient estimate, then the weight copies).

    Example::

        >>> w = torch.linspace(1, 10, 10)
        >>> state = init_saliency_state(w, "first_order_gradient")
        >>> advance_saliency(w, state, "first_order_gradient", decay=0.5)
        >>> torch.allclose(state["gradient"], 0.5 * w / w.norm()), torch.equal(state["old_weight"], w)
        (True, True)
    """
    if option == "weight":
        return
    w = weight.detach().to(torch.float32)
    old = state["old_weight"]
    delta = w - old if option == "first_order_gradient" else w + state["old_old_weight"] - 2.0 * old
    gradient = state["gradient"]
    gradient.mul_(decay).add_(_l2_normalize(delta.abs()), alpha=1.0 - decay)
    if option == "second_order_gradient":
        state["old_old_weight"].copy_(old)
    old.copy_(w)


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
