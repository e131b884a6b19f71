"""The one error type of the pruning specification."""

from __future__ import annotations

__all__ = ["HParamsError"]


class HParamsError(ValueError):
    """A pruning hyperparameter is malformed; the message names the field and what is accepted.

    Example::

        >>> from lit_prune import PruningHParams
        >>> try:
        ...     PruningHParams(target_sparsity=1.5)
        ... except HParamsError as err:
        ...     print(err)
        `target_sparsity` must be a float in [0, 1), got 1.5
    """
