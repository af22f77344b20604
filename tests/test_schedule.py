"""linear_bounds_schedule against docs/reference-behaviour.md §5 (and its float64 model)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from aggc_optax import linear_bounds_schedule
from tests.spec_model import spec_schedule


def test_spec_breakpoints_for_60_steps() -> None:
    sched = linear_bounds_schedule(
        0.95, 0.98, total_steps=60, switch_ratio=0.4, transition_ratio=0.3
    )
    # spec: step 24 (prog 0.4, inclusive switch) still uses the base values
    assert float(sched(24)) == pytest.approx(0.95, abs=1e-7)
    assert float(sched(0)) == pytest.approx(0.95, abs=1e-7)
    # by hand: step 33 -> prog 0.55, a = 0.5 -> 0.965
    assert float(sched(33)) == pytest.approx(0.965, abs=1e-7)
    # step 25 -> a = (25/60 - 0.4)/0.3 = 1/18
    assert float(sched(25)) == pytest.approx(0.95 + 0.03 / 18, abs=1e-7)
    # step 42 (prog 0.7) and later: the late values; the clamp keeps them past T
    for t in (42, 59, 60, 1000):
        assert float(sched(t)) == pytest.approx(0.98, abs=1e-7)


@pytest.mark.parametrize(
    ("base", "late", "total", "s", "w"),
    [
        (0.95, 0.98, 60, 0.4, 0.3),
        (0.6, 0.7, 1000, 0.4, 0.3),
        (0.7, 0.999, 97, 0.6, 0.2),
        (1.0, 2.0, 10, 0.5, 0.0),  # hard switch
        (2.0, 0.5, 33, 0.0, 1.0),  # decreasing, whole run
        (1.5, 3.0, 7, 0.9, 0.5),  # window past the end: prog clamps at 1
        (0.9, 0.0, 50, 0.2, 0.2),  # late <= 0 means base
        (0.9, -1.0, 50, 0.2, 0.2),
    ],
)
def test_matches_float64_model_on_every_step(
    base: float, late: float, total: int, s: float, w: float
) -> None:
    sched = linear_bounds_schedule(
        base, late, total_steps=total, switch_ratio=s, transition_ratio=w
    )
    jitted = jax.jit(sched)
    steps = range(0, 2 * total + 3)
    got = np.array([float(jitted(t)) for t in steps])
    want = np.array([spec_schedule(t, base, late, total, s, w) for t in steps])
    np.testing.assert_allclose(got, want, rtol=2e-7, atol=0)
    if late > 0:
        # the phase (base / ramp / late) is exactly the model's at every step
        np.testing.assert_array_equal(got == np.float32(base), want == base)
        np.testing.assert_array_equal(got == np.float32(late), want == late)


def test_hard_switch_happens_on_the_first_step_past_the_switch() -> None:
    sched = linear_bounds_schedule(1.0, 2.0, total_steps=10, switch_ratio=0.5, transition_ratio=0.0)
    values = [float(sched(t)) for t in range(10)]
    # prog 0.5 at t=5 is still base (inclusive); w = 1e-6, so t=6 is late
    assert values == [1.0] * 6 + [2.0] * 4


@pytest.mark.parametrize("total", [None, 0])
def test_unknown_total_steps_means_no_schedule(total: int | None) -> None:
    sched = linear_bounds_schedule(
        0.6, 0.7, total_steps=total, switch_ratio=0.0, transition_ratio=0.0
    )
    values = [float(sched(t)) for t in (0, 1, 10, 10_000)]
    assert values == [float(np.float32(0.6))] * 4


def test_exact_at_float32_sensitive_breakpoints() -> None:
    # 0.4 + 0.3 != 0.7 in float64: step 42 of 60 is (barely) inside the ramp for
    # the reference, a = 0.9999999999999998; the value is the late one to 1e-16.
    sched = linear_bounds_schedule(1.0, 3.0, total_steps=60, switch_ratio=0.4, transition_ratio=0.3)
    assert float(sched(42)) == pytest.approx(spec_schedule(42, 1.0, 3.0, 60, 0.4, 0.3), rel=1e-7)
    assert float(sched(41)) == pytest.approx(spec_schedule(41, 1.0, 3.0, 60, 0.4, 0.3), rel=1e-7)


def test_bad_arguments_name_the_parameter() -> None:
    with pytest.raises(ValueError, match=r"total_steps must be an int >= 0 or None, got -1"):
        linear_bounds_schedule(1.0, 2.0, total_steps=-1)
    with pytest.raises(TypeError, match=r"total_steps must be an int"):
        linear_bounds_schedule(1.0, 2.0, total_steps=10.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"switch_ratio must be in \[0.0, 1.0\], got 1.5"):
        linear_bounds_schedule(1.0, 2.0, total_steps=10, switch_ratio=1.5)
    with pytest.raises(ValueError, match=r"transition_ratio must be in \[0.0, 1.0\], got -0.1"):
        linear_bounds_schedule(1.0, 2.0, total_steps=10, transition_ratio=-0.1)
    with pytest.raises(ValueError, match=r"base must be finite, got nan"):
        linear_bounds_schedule(float("nan"), 2.0, total_steps=10)
