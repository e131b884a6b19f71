"""The one place that chooses a backend for each weight, and logs why (``logging.DEBUG``).

The native CPU kernels take what they can (contiguous float32 CPU weights ranked by ``|w|``,
one process's whole weights, not ``use_tpu``); the torch reference takes the rest.  The
kernels are built only when some weight could use them: a model on an accelerator never
compiles them.  A new backend adds a file and a line here.
"""

from __future__ import annotations

import logging

from lit_prune.backends.base import Backend
from lit_prune.backends.cpu.backend import NativeCpuBackend
from lit_prune.backends.torch import TorchBackend
from lit_prune.config.hparams import PruningHParams
from lit_prune.engine.reduce import Reducer
from lit_prune.engine.state import WeightState

__all__ = ["NATIVE_CPU", "TORCH", "choose_apply_backend", "choose_backend"]

_log = logging.getLogger(__name__)

TORCH = TorchBackend()
NATIVE_CPU = NativeCpuBackend()


def choose_backend(
    state: WeightState, granularity: str, hparams: PruningHParams, reducer: Reducer, deferred: bool = False
) -> Backend:
    """The backend that updates ``state``'s mask.

    Example::

        >>> import torch
        >>> from lit_prune.engine.reduce import LocalReducer
        >>> from lit_prune.engine.state import WeightSpec
        >>> layer = torch.nn.Linear(4, 4).to(torch.float64)
        >>> state = WeightState.bind(WeightSpec("weight", None, (1, 1)), layer, "weight", "weight")
        >>> choose_backend(state, "elementwise", PruningHParams(), LocalReducer()).name  # float64: not for the kernels
        'torch'
    """
    if not reducer.local:
        reason = "statistics are reduced across processes"
    elif deferred:
        reason = "the NaN check is deferred (weights on an accelerator)"
    elif hparams.use_tpu:
        reason = "use_tpu keeps to static shapes"
    else:
        reason = NATIVE_CPU.refuses(granularity, state, hparams)
    backend = TORCH if reason else NATIVE_CPU
    _log.debug("%s (%s): %s backend, %s", state.name, granularity, backend.name, reason or "native kernels fit")
    return backend


def choose_apply_backend(state: WeightState) -> Backend:
    """The backend that applies ``state``'s mask in ``apply_mask``."""
    reason = NATIVE_CPU.refuses_apply(state)
    return TORCH if reason else NATIVE_CPU
