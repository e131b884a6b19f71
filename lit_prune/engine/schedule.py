"""TF's gradual sparsity schedule and its mask-update gating, as pure functions.

The schedule is ``s(t) = s_f + (s_i - s_f) * (1 - p)^e`` with the clamped progress
``p = min(1, max(0, (t - b) / (E - b)))``, evaluated in float32 operation by operation as
``Pruning._setup_sparsity`` does in TF (so values match the original to the last bit, except
where TF's ``pow`` kernel itself rounds differently).  The gating is TF's
``conditional_mask_update_op`` rule: inside ``[begin_pruning_step, end_pruning_step]`` and at
least ``pruning_frequency`` steps after the last update (*not* ``step % frequency == 0``).
"""

from __future__ import annotations

from lit_prune.config.hparams import HParamsError, PruningHParams
from lit_prune.engine.float32 import f32

__all__ = ["external_scale", "gradual_sparsity", "should_update", "weight_sparsity"]


def _progress(step: int, begin: int, end: int) -> float:
    # p = min(1, max(0, float32(t - b) / (E - b)))   -- float32 division, as in TF
    return min(1.0, max(0.0, f32(f32(float(step - begin)) / f32(float(end - begin)))))


def _polynomial(initial: float, final: float, one_minus_p_pow: float) -> float:
    # s = (s_i - s_f) * (1 - p)^e + s_f, each op rounded to float32
    return f32(f32(f32(initial - final) * one_minus_p_pow) + f32(final))


def _decay(step: int, hp: PruningHParams) -> float:
    p = _progress(step, hp.sparsity_function_begin_step, hp.sparsity_function_end_step)
    return f32(f32(1.0 - p) ** f32(hp.sparsity_function_exponent))


def gradual_sparsity(step: int, hparams: PruningHParams) -> float:
    """The scheduled sparsity at ``step``, exactly as TF's ``<name>/sparsity`` tensor computes it.

    Before ``sparsity_function_begin_step`` it is ``initial_sparsity``; after
    ``sparsity_function_end_step`` it is ``target_sparsity``; in between it is continuous in the
    step (not quantised to the pruning grid), and independent of ``begin/end_pruning_step``.

    Example::

        >>> from lit_prune import PruningHParams
        >>> hp = PruningHParams()  # b=0, E=100, s_i=0, s_f=0.5, e=3
        >>> [round(gradual_sparsity(t, hp), 6) for t in (0, 10, 50, 100, 150)]
        [0.0, 0.1355, 0.4375, 0.5, 0.5]
    """
    return _polynomial(hparams.initial_sparsity, hparams.target_sparsity, _decay(step, hparams))


def external_scale(hparams: PruningHParams, own_target: float) -> float:
    """The factor an external sparsity is scaled by for a weight with its own target: ``own / target_sparsity``.

    TF's rule (``Pruning(spec, sparsity=...)`` with ``weight_sparsity_map``), which N:M weights
    (own target ``1 - N/M``) follow too.  It has no value when ``target_sparsity`` is 0: there is
    no global target for the external value to be relative to, and guessing one (the external
    value itself, or the weight's own target) would prune the weight on a schedule nobody asked
    for.  So that case is an :class:`HParamsError` naming both settings, and how to fix it.

    Raises:
        HParamsError: ``target_sparsity`` is 0.

    Example::

        >>> from lit_prune import PruningHParams
        >>> external_scale(PruningHParams(target_sparsity=0.5), own_target=0.75)
        1.5
    """
    if hparams.target_sparsity == 0.0:
        raise HParamsError(
            f"an external `sparsity` is scaled per weight by its own target / `target_sparsity` (as in TF), and a "
            f"weight has its own target {own_target:g} (a `weight_sparsity_map` entry or N:M's 1 - N/M) while "
            "`target_sparsity` is 0: set `target_sparsity` > 0 (the value the external `sparsity` ends at, so that "
            "the weight ends at its own target), or drop the external `sparsity` to follow the schedule"
        )
    return f32(own_target / hparams.target_sparsity)


def weight_sparsity(step: int, hparams: PruningHParams, own_target: float, base: float | None = None) -> float:
    """The sparsity of a weight whose own target (``weight_sparsity_map``, or N:M's ``1 - N/M``) is ``own_target``.

    TF scales the global value: ``s(t) * own_target / target_sparsity``.  That equals
    ``own_target`` at the end of the schedule but starts at ``initial_sparsity * own_target /
    target_sparsity`` rather than at ``initial_sparsity``, and divides by zero when
    ``target_sparsity`` is 0.  lit_prune keeps TF's product where it is exact (``initial_sparsity
    == 0``, ``target_sparsity > 0``) and otherwise runs the same polynomial from
    ``initial_sparsity`` to ``own_target``.  An externally supplied sparsity ``base`` is scaled as
    TF scales it, by :func:`external_scale` (``base * own_target / target_sparsity``), which
    raises :class:`HParamsError` when ``target_sparsity`` is 0.

    Raises:
        HParamsError: an external ``base`` with ``target_sparsity`` 0.

    Example::

        >>> from lit_prune import PruningHParams
        >>> hp = PruningHParams(target_sparsity=0.5)
        >>> weight_sparsity(100, hp, own_target=0.75), weight_sparsity(50, hp, own_target=0.75)
        (0.75, 0.65625)
        >>> weight_sparsity(7, hp, own_target=0.75, base=0.25)
        0.375
    """
    if base is not None:
        return f32(base * external_scale(hparams, own_target))
    if hparams.initial_sparsity == 0.0 and hparams.target_sparsity > 0.0:
        return f32(gradual_sparsity(step, hparams) * f32(own_target / hparams.target_sparsity))
    return _polynomial(hparams.initial_sparsity, own_target, _decay(step, hparams))


def should_update(step: int, last_update_step: int, hparams: PruningHParams) -> bool:
    """TF's ``conditional_mask_update_op`` predicate, decided on the host from the step alone.

    ``begin_pruning_step <= step <= end_pruning_step`` (end inclusive; -1 = forever) and
    ``last_update_step + pruning_frequency <= step``.  With ``last_update_step`` starting at 0,
    the default spec first updates at step 10, not 0.

    Example::

        >>> from lit_prune import PruningHParams
        >>> hp = PruningHParams(begin_pruning_step=1, end_pruning_step=6, pruning_frequency=2)
        >>> last, updates = 0, []
        >>> for t in range(10):
        ...     if should_update(t, last, hp):
        ...         last = t
        ...         updates.append(t)
        >>> updates
        [2, 4, 6]
    """
    in_range = step >= hparams.begin_pruning_step and (hparams.end_pruning_step < 0 or step <= hparams.end_pruning_step)
    return in_range and last_update_step + hparams.pruning_frequency <= step
