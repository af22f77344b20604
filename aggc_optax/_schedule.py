"""Multiplier schedules: the reference's linear ramp (docs/reference-behaviour.md §5,
paper eq. 5) and a cosine-shaped ramp over the same window."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from aggc_optax import _validation

_NEVER = 2**31 - 1  # a step count an int32 counter never reaches


def _reference_phase(t: int, total_steps: int, switch: float, window: float) -> int:
    """0: base, 1: in transition, 2: late; computed in float64 as the reference does."""
    prog = min(max(t / max(1, total_steps), 0.0), 1.0)
    if prog <= switch:
        return 0
    if prog >= switch + window:
        return 2
    return 1


def _first_step_with_phase(phase: int, total_steps: int, switch: float, window: float) -> int:
    # prog is non-decreasing in t and constant from t = total_steps on, so a
    # binary search over [0, total_steps] finds the first step of each phase.
    if _reference_phase(total_steps, total_steps, switch, window) < phase:
        return _NEVER
    lo, hi = 0, total_steps
    while lo < hi:
        mid = (lo + hi) // 2
        if _reference_phase(mid, total_steps, switch, window) >= phase:
            hi = mid
        else:
            lo = mid + 1
    return lo


def linear_bounds_schedule(
    base: float,
    late: float,
    *,
    total_steps: int | None,
    switch_ratio: float = 0.5,
    transition_ratio: float = 0.2,
) -> Any:
    r"""The AGGC multiplier schedule: constant, then a linear ramp, then constant.

    With :math:`p = \mathrm{clip}(t / \max(1, T), 0, 1)`, :math:`s` the switch
    ratio and :math:`w = \max(10^{-6}, \text{transition ratio})`:

    .. math::
      \alpha(t) = \begin{cases} \alpha_\text{base} & p \le s \\
      (1 - \lambda)\,\alpha_\text{base} + \lambda\,\alpha_\text{late} & s < p < s + w,
      \ \lambda = (p - s) / w \\
      \alpha_\text{late} & p \ge s + w \end{cases}

    This reproduces the reference clipper exactly: the switch is inclusive,
    ``late <= 0`` means "use ``base``", a transition ratio of 0 is a hard
    switch, and ``total_steps`` of ``None`` or 0 (the reference's
    ``on_train_begin`` never called) means no schedule at all. Which phase a
    step is in is decided ahead of time in float64, as the reference does, so
    the breakpoints are exact in float32 too.

    Args:
      base: the multiplier at the start (``low_mult`` or ``high_mult``).
      late: the multiplier after the transition; ``<= 0`` means ``base``.
      total_steps: the run's number of optimizer steps ``T``, or ``None``/0.
      switch_ratio: ``s``, the progress at which the transition starts.
      transition_ratio: ``w``, the transition's length as a fraction of ``T``.

    Returns:
      An optax-style schedule: a function of the 0-based step count returning
      a scalar array.

    Example:
      >>> sched = linear_bounds_schedule(0.95, 0.98, total_steps=60,
      ...                                switch_ratio=0.4, transition_ratio=0.3)
      >>> round(float(sched(24)), 6), round(float(sched(33)), 6), round(float(sched(42)), 6)
      (0.95, 0.965, 0.98)

    References:
      Li, Wu, Chang, `AGGC: Adaptive Group Gradient Clipping for Stabilizing
      Large Language Model Training <https://arxiv.org/abs/2601.11864>`_, 2026 (eq. 5).
    """
    base = _validation.check_number("base", base, minimum=0.0)
    late = _validation.check_number("late", late)
    total_steps = _validation.check_total_steps(total_steps)
    switch = _validation.check_number("switch_ratio", switch_ratio, minimum=0.0, maximum=1.0)
    transition = _validation.check_number(
        "transition_ratio", transition_ratio, minimum=0.0, maximum=1.0
    )
    late_value = late if late > 0 else base
    if not total_steps or late_value == base:
        return _constant(base)

    window = max(1e-6, transition)
    ramp_start = _first_step_with_phase(1, total_steps, switch, window)
    late_start = _first_step_with_phase(2, total_steps, switch, window)
    denominator = max(1, total_steps)

    def schedule(count: jax.typing.ArrayLike) -> jax.Array:
        dtype = jnp.result_type(float)
        t = jnp.asarray(count)
        prog = jnp.minimum(t, total_steps).astype(dtype) / denominator
        a = (prog - switch) / window
        ramp = base * (1 - a) + late_value * a
        value = jnp.where(t < ramp_start, base, jnp.where(t >= late_start, late_value, ramp))
        return value.astype(dtype)

    return schedule


def _constant(value: float) -> Any:
    def schedule(count: jax.typing.ArrayLike) -> jax.Array:
        del count
        return jnp.asarray(value, dtype=jnp.result_type(float))

    return schedule


def cosine_ramp(
    base: float,
    late: float,
    *,
    total_steps: int,
    switch_ratio: float = 0.5,
    transition_ratio: float = 0.2,
) -> Any:
    r"""``base`` until step ``round(s T)``, a cosine to ``late`` over ``round(w T)`` steps.

    .. math::
      \alpha(t) = \alpha_\text{late} + (\alpha_\text{base} - \alpha_\text{late})
      \tfrac{1}{2}\big(1 + \cos(\pi \min(t - t_0, n) / n)\big), \quad t \ge t_0,

    with :math:`t_0 = \mathrm{round}(sT)` and :math:`n = \max(1, \mathrm{round}(wT))`:
    the linear ramp of :func:`~aggc_optax.linear_bounds_schedule` with a cosine
    shape, built from ``optax.join_schedules`` and ``optax.cosine_decay_schedule``.
    ``late <= 0`` means ``base``, as in the reference.

    Args:
      base: the multiplier at the start.
      late: the multiplier after the ramp.
      total_steps: the run's number of steps ``T`` (``> 0``).
      switch_ratio: ``s``.
      transition_ratio: ``w``.

    Returns:
      An optax schedule of the 0-based step.

    Example:
      >>> sched = cosine_ramp(0.6, 0.7, total_steps=100, switch_ratio=0.4,
      ...                     transition_ratio=0.3)
      >>> [round(float(sched(t)), 4) for t in (0, 40, 55, 70, 99)]
      [0.6, 0.6, 0.65, 0.7, 0.7]
    """
    base = _validation.check_number("base", base, minimum=0.0)
    late = _validation.check_number("late", late)
    total_steps = _validation.check_total_steps(total_steps)  # type: ignore[assignment]  # check_total_steps returns None only for None
    if not total_steps:
        raise ValueError(f"cosine_ramp: total_steps must be > 0, got {total_steps!r}")
    switch = _validation.check_number("switch_ratio", switch_ratio, minimum=0.0, maximum=1.0)
    window = _validation.check_number(
        "transition_ratio", transition_ratio, minimum=0.0, maximum=1.0
    )
    late = late if late > 0 else base
    start = round(switch * total_steps)
    length = max(1, round(window * total_steps))
    cosine = optax.cosine_decay_schedule(init_value=base - late, decay_steps=length)

    def ramp(count: Any) -> Any:
        return late + cosine(count)

    return optax.join_schedules([optax.constant_schedule(base), ramp], [start])
