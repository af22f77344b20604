"""Construction-time checks: bad hyperparameters fail early, with a clear message.

Values that are JAX tracers (``optax.inject_hyperparams`` under ``jax.jit``)
cannot be inspected in Python and are passed through unchecked.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def as_python_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got the bool {value!r}")
    if isinstance(value, numbers.Real):
        try:
            return float(value)
        except OverflowError:
            digits = len(str(abs(int(value)))) if isinstance(value, numbers.Integral) else None
            what = f"an int of {digits} digits" if digits else repr(value)
            raise ValueError(
                f"{name} must be finite, got {what}, too large for a float (at most about 1.8e308)"
            ) from None
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        arr = np.asarray(value)
        if arr.shape != ():
            raise ValueError(f"{name} must be a scalar, got an array of shape {arr.shape}")
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise TypeError(f"{name} must be a real number, got an array of dtype {arr.dtype}")
        return float(arr)
    raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")


def check_number(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    maximum_exclusive: bool = False,
    allowed: str | None = None,
) -> Any:
    """Checks a scalar hyperparameter; returns it as a float (tracers unchanged).

    ``allowed`` replaces the default description of the domain (``"in [0.0, 1.0)"``)
    in the error messages.
    """
    if is_traced(value):
        return value
    x = as_python_float(name, value)
    if allowed is None and (minimum is not None or maximum is not None):
        lo = "(-inf" if minimum is None else f"[{minimum!r}"
        hi = "inf)" if maximum is None else f"{maximum!r}{')' if maximum_exclusive else ']'}"
        allowed = f"in {lo}, {hi}"
    if not math.isfinite(x):
        domain = f" (it must be {allowed})" if allowed else ""
        raise ValueError(f"{name} must be finite, got {x!r}{domain}")
    below = minimum is not None and x < minimum
    above = maximum is not None and (x >= maximum if maximum_exclusive else x > maximum)
    if below or above:
        raise ValueError(f"{name} must be {allowed}, got {x!r}")
    return x


def check_bool(name: str, value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_total_steps(total_steps: Any, name: str = "total_steps") -> int | None:
    if total_steps is None:
        return None
    if isinstance(total_steps, bool) or not isinstance(total_steps, (numbers.Integral,)):
        raise TypeError(
            f"{name} must be an int >= 0 or None, got {total_steps!r} "
            f"({type(total_steps).__name__})"
        )
    if total_steps < 0:
        raise ValueError(f"{name} must be an int >= 0 or None, got {total_steps!r}")
    return int(total_steps)


def check_schedule_or_number(
    name: str,
    value: Any,
    *,
    minimum: float | None = 0.0,
) -> Any:
    """A multiplier: a number checked now, or a schedule whose output shape is checked now."""
    if callable(value):
        try:
            out = jax.eval_shape(value, jax.ShapeDtypeStruct((), jnp.int32))
        except Exception as err:  # the schedule's own error, re-raised with its name
            raise ValueError(
                f"{name}: the schedule could not be evaluated on a scalar int32 step count: {err}"
            ) from err
        shape = getattr(out, "shape", None)
        dtype = getattr(out, "dtype", None)
        if shape != () or dtype is None:
            raise ValueError(
                f"{name}: a schedule must return a scalar, got {out!r} for a scalar step count"
            )
        if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
            raise TypeError(f"{name}: a schedule must return a real number, got dtype {dtype}")
        return value
    return check_number(name, value, minimum=minimum)


def check_cap(
    name: str,
    value: Any,
    *,
    low: float,
    high: float,
    low_inclusive: bool,
    meaning: str,
    high_inclusive: bool = True,
) -> Any:
    """A cap inside ``[low, high]`` (or ``(low, high]``); outside it would invert its meaning.

    A cap that is not wanted is ``None``, checked by the caller: 0, the
    reference's "off", is rejected here, so that it cannot be mistaken for a cap.
    """
    if is_traced(value):
        return value
    close = "]" if high_inclusive else ")"
    bounds = f"{'[' if low_inclusive else '('}{low}, {high}{close}"
    allowed = f">= {low}" if high == math.inf else f"in {bounds}"
    x = check_number(name, value, minimum=0.0, allowed=allowed)
    below_high = x <= high if high_inclusive else x < high
    if not ((low <= x if low_inclusive else low < x) and below_high):
        raise ValueError(
            f"{name} must be {allowed} ({meaning}) or None (no cap), got {x!r}; the "
            "reference takes 0 as off and accepts other values, which invert the cap's "
            "meaning: use from_reference_options to reproduce that"
        )
    return x


def check_callable(name: str, value: Any) -> Callable[..., Any]:
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {value!r}")
    return value
