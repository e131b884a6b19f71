"""Schedule and update gating against values worked out from TF's code (tf_pruning_spec.md §3, §12).

Run: pytest tests/test_schedule.py
"""

import pytest

from lit_prune import PruningHParams, gradual_sparsity
from lit_prune.engine.schedule import should_update, weight_sparsity


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, 0.0), (10, 0.1355), (25, 0.2890625), (50, 0.4375), (75, 0.4921875), (99, 0.499999), (100, 0.5), (150, 0.5)],
)
def test_default_schedule(step, expected):
    assert gradual_sparsity(step, PruningHParams()) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (999, 0.1),
        (1000, 0.1),
        (1010, 0.102398),
        (3500, 0.5625),
        (6000, 0.8),
        (8500, 0.8875),
        (11000, 0.9),
        (20000, 0.9),
    ],
)
def test_offset_schedule_with_initial_sparsity(step, expected):
    hp = PruningHParams(
        sparsity_function_begin_step=1000, sparsity_function_end_step=11000, initial_sparsity=0.1, target_sparsity=0.9
    )
    assert gradual_sparsity(step, hp) == pytest.approx(expected, abs=1e-6)


def test_by_hand_from_the_formula():
    # s(t) = s_f + (s_i - s_f) * (1 - (t - b) / (E - b))^e with b=20, E=60, s_i=0.2, s_f=0.8, e=2:
    # t=30: p = 0.25, (0.75)^2 = 0.5625, s = 0.8 - 0.6 * 0.5625 = 0.4625
    hp = PruningHParams(
        sparsity_function_begin_step=20,
        sparsity_function_end_step=60,
        initial_sparsity=0.2,
        target_sparsity=0.8,
        sparsity_function_exponent=2,
    )
    assert gradual_sparsity(30, hp) == pytest.approx(0.4625, abs=1e-7)
    assert gradual_sparsity(10, hp) == pytest.approx(0.2, abs=1e-7)


@pytest.mark.parametrize(("step", "expected"), [(25, 0.2), (50, 0.4), (100, 0.8)])
def test_linear_schedule(step, expected):
    hp = PruningHParams(target_sparsity=0.8, sparsity_function_exponent=1)
    assert gradual_sparsity(step, hp) == pytest.approx(expected, abs=1e-6)


def test_schedule_is_float32_exact():
    # float32 arithmetic, as TF: s(10) = 0.5 - 0.5 * 0.9^3 evaluated in float32
    value = gradual_sparsity(10, PruningHParams())
    import numpy as np

    p = np.float32(10) / np.float32(100)
    expected = np.float32(
        np.float32(np.float32(-0.5) * np.float32(np.float32(1) - p) ** np.float32(3)) + np.float32(0.5)
    )
    assert value == float(expected)


def _updates(hp, steps):
    last, out = 0, []
    for t in steps:
        if should_update(t, last, hp):
            last = t
            out.append(t)
    return out, last


def test_gating_defaults_first_update_at_frequency_not_zero():
    updates, last = _updates(PruningHParams(), range(0, 31))
    assert updates == [10, 20, 30]
    assert _updates(PruningHParams(), range(0, 11))[1] == 10


def test_gating_begin_not_on_grid():
    assert _updates(PruningHParams(begin_pruning_step=5, pruning_frequency=10), range(0, 35))[0] == [10, 20, 30]


def test_gating_end_is_inclusive():
    hp = PruningHParams(begin_pruning_step=1, end_pruning_step=6, pruning_frequency=2)
    assert _updates(hp, range(0, 12))[0] == [2, 4, 6]


def test_gating_late_begin_large_frequency():
    hp = PruningHParams(begin_pruning_step=10000, pruning_frequency=100, sparsity_function_end_step=20000)
    assert _updates(hp, range(9990, 10205))[0] == [10000, 10100, 10200]


def test_gating_drifts_when_steps_jump():
    # TPU-style loops: the step advances by 3 between runs; next update = first run with t >= L + freq.
    hp = PruningHParams(pruning_frequency=10)
    assert _updates(hp, range(0, 40, 3))[0] == [12, 24, 36]


def test_per_weight_schedule_scales_like_tf_when_initial_is_zero():
    hp = PruningHParams(target_sparsity=0.5)
    assert weight_sparsity(50, hp, 0.75) == pytest.approx(0.4375 * 1.5, abs=1e-7)
    assert weight_sparsity(100, hp, 0.75) == 0.75


def test_per_weight_schedule_generalised_with_initial_sparsity():
    hp = PruningHParams(initial_sparsity=0.2, target_sparsity=0.5)
    # Starts at initial_sparsity (TF would start at 0.2 * 0.9 / 0.5 = 0.36) and ends at its own target.
    assert weight_sparsity(0, hp, 0.9) == pytest.approx(0.2)
    assert weight_sparsity(100, hp, 0.9) == pytest.approx(0.9)
    assert weight_sparsity(50, hp, 0.9) == pytest.approx(0.9 + (0.2 - 0.9) * 0.125)


def test_per_weight_schedule_with_zero_global_target():
    hp = PruningHParams(target_sparsity=0.0)
    assert weight_sparsity(100, hp, 0.6) == pytest.approx(0.6)  # TF: division by zero


def test_external_sparsity_with_zero_global_target_is_a_clear_error_not_a_zero_division():
    # An N:M weight has its own target 1 - N/M; an external sparsity is scaled by own / target_sparsity.
    import torch
    from torch import nn

    from lit_prune import HParamsError, Pruning

    torch.manual_seed(0)
    with pytest.raises(HParamsError, match=r"`target_sparsity`.*`sparsity`|`sparsity`.*`target_sparsity`"):
        Pruning(nn.Linear(8, 8), "nm_sparsity=2:4,target_sparsity=0", sparsity=0.3)  # before any training


def test_external_sparsity_scaling_needs_a_global_target():
    from lit_prune import HParamsError
    from lit_prune.engine.schedule import external_scale

    hp = PruningHParams(target_sparsity=0.5)
    assert external_scale(hp, 0.75) == 1.5
    assert weight_sparsity(3, hp, 0.75, base=0.2) == pytest.approx(0.3)
    zero = PruningHParams(target_sparsity=0.0)
    for call in (lambda: external_scale(zero, 0.5), lambda: weight_sparsity(3, zero, 0.5, base=0.2)):
        with pytest.raises(HParamsError, match=r"`target_sparsity` is 0: set `target_sparsity` > 0"):
            call()
    assert weight_sparsity(100, zero, 0.5) == pytest.approx(0.5)  # without an external value: its own schedule
