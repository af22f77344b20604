"""AGGC's configuration: checked once, when the transformation is built.

:func:`aggc` and :func:`from_reference_options` describe the same algorithm in two
vocabularies. Both end in one :class:`Config`, whose hyperparameters are in the
reference's form (``docs/reference-behaviour.md`` §1 and §4): ``raise_small`` a
bool, ``low_mult = min_norm = 0`` when nothing is raised, a cap of 0 is off. Per
group, :func:`resolve` turns them into one value per group, once per set of labels.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from aggc_optax import _labels, _validation
from aggc_optax._labels import ParamLabels

# aggc()'s default high_mult, chosen in docs/stability.md; one copy for the signature and checks.
DEFAULT_HIGH_MULT = 3.0

NONFINITE_POLICIES = ("skip", "reference")
VARIANTS = ("reference", "paper")
EMA_INITS = ("zero", "first", "bias_corrected")
UNLABELLED = ("warn", "error", "ignore")
AXIS_REDUCTIONS = ("sum", "mean")


class Hyper(NamedTuple):
    """One group's hyperparameters, in the reference's form (numbers, schedules or tracers)."""

    ema_beta: Any
    low_mult: Any
    high_mult: Any
    min_norm: Any
    max_norm: Any
    max_up_scale: Any
    max_down_scale: Any
    raise_small: Any


#: The fields a ``group_hyperparams`` entry of :func:`aggc` may set.
AGGC_GROUP_FIELDS = tuple(f for f in Hyper._fields if f != "raise_small")


@dataclasses.dataclass(frozen=True)
class _Entry:
    key: str
    regex: re.Pattern[str] | None  # None: the key is not a valid pattern, only an exact label
    hyper: Hyper  # the whole entry: its fields over the defaults


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything the transformation needs, checked."""

    default: Hyper
    entries: tuple[_Entry, ...]
    auto_bounds: bool
    param_labels: ParamLabels
    nonfinite: str
    variant: str
    ema_init: str
    axis_name: Any
    axis_reduction: str
    on_no_groups: str  # "error" (aggc) or "disable" (the reference, §2)
    unlabelled: str  # what init does when the default rule leaves float leaves out
    # aggc()'s cap ranges are checked at run time too (the reference's form takes
    # any cap >= 0: out-of-range values invert it, §4)
    strict_caps: bool = False


def resolve(config: Config, labels: tuple[str, ...]) -> Hyper:
    """Each field as a tuple, one value per group: an exact key wins, then the first pattern."""
    per_group = []
    for label in labels:
        exact = [e for e in config.entries if e.key == label]
        matched = exact or [e for e in config.entries if e.regex and e.regex.fullmatch(label)]
        per_group.append(matched[0].hyper if matched else config.default)
    return Hyper(*(tuple(values) for values in zip(*per_group))) if labels else Hyper(*[()] * 8)


def unmatched_keys(config: Config, labels: tuple[str, ...]) -> list[str]:
    return [
        e.key
        for e in config.entries
        if not any(e.key == label or (e.regex and e.regex.fullmatch(label)) for label in labels)
    ]


# ----------------------------------------------------------------- value checks


def _beta(name: str, v: Any) -> Any:
    return _validation.check_number(name, v, minimum=0.0, maximum=1.0, maximum_exclusive=True)


def _nonneg(name: str, v: Any) -> Any:
    return _validation.check_number(name, v, minimum=0.0)


def _mult(name: str, v: Any) -> Any:
    return _validation.check_schedule_or_number(name, v, minimum=0.0)


def _reference_cap(name: str, v: Any) -> Any:
    # any value >= 0, as the reference takes it: out of range inverts the cap (§4)
    return _validation.check_number(
        name, v, minimum=0.0, allowed="in [0.0, inf) (0 is off; any other value is a cap)"
    )


def _up_cap(name: str, v: Any) -> Any:
    return _validation.check_cap(
        name, v, low=1, high=math.inf, low_inclusive=True, meaning="a ceiling on an upward scale"
    )


def _down_cap(name: str, v: Any) -> Any:
    # 1 is refused: a floor of 1 never clips, yet every step above the bound would
    # count as clipped down
    return _validation.check_cap(
        name,
        v,
        low=0,
        high=1,
        low_inclusive=False,
        high_inclusive=False,
        meaning="a floor on a downward scale; 1 would never clip",
    )


def _flag(name: str, v: Any) -> Any:
    # A tracer (injected under jit) cannot be inspected; a concrete array must be a
    # scalar bool: jnp.array(0.3) is not taken as True, and a per-group vector is
    # refused (one value per group is what group_hyperparams is for).
    if _validation.is_traced(v):
        return v
    if isinstance(v, (jax.Array, np.ndarray)):
        if v.dtype != np.bool_ or v.shape != ():
            raise TypeError(
                f"{name} must be a bool (or a scalar bool array), got an array of dtype "
                f"{v.dtype} and shape {v.shape}; for per-group values use group_hyperparams"
            )
        return v
    return _validation.check_bool(name, v)


REFERENCE_CHECKS: Mapping[str, Callable[[str, Any], Any]] = {
    "ema_beta": _beta,
    "low_mult": _mult,
    "high_mult": _mult,
    "min_norm": _nonneg,
    "max_norm": _nonneg,
    "max_up_scale": _reference_cap,
    "max_down_scale": _reference_cap,
    "raise_small": _flag,
}


def _optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    return lambda name, v: None if v is None else check(name, v)


# aggc()'s form: None is "not given" (no raising, no cap, no fixed upper bound)
_AGGC_CHECKS: Mapping[str, Callable[[str, Any], Any]] = {
    "ema_beta": _beta,
    "low_mult": _optional(_mult),
    "high_mult": _mult,
    "min_norm": _optional(_nonneg),
    "max_norm": _optional(_nonneg),
    "max_up_scale": _optional(_up_cap),
    "max_down_scale": _optional(_down_cap),
}


def _aggc_hyper(fields: Mapping[str, Any], auto_bounds: bool, where: str) -> Hyper:
    """aggc()'s arguments (``where`` names them in errors) in the reference's form."""
    raising = fields["low_mult"] is not None or fields["min_norm"] is not None
    if fields["max_up_scale"] is not None and not raising:
        raise ValueError(
            f"{where}max_up_scale caps an upward scale, but nothing is raised: give low_mult "
            "(or min_norm) to raise groups below their lower bound, or drop max_up_scale"
        )
    if auto_bounds and fields["max_norm"] is not None:
        raise ValueError(
            f"{where}max_norm is the fixed upper bound of auto_bounds=False; with "
            "auto_bounds=True the upper bound is high_mult x EMA (drop max_norm, or pass "
            "auto_bounds=False)"
        )
    if not auto_bounds:
        if fields["max_norm"] is None:
            raise ValueError(f"{where}auto_bounds=False needs max_norm, the fixed upper bound")
        if fields["low_mult"] is not None:
            raise ValueError(
                f"{where}low_mult scales the EMA, which auto_bounds=False does not use; the "
                "fixed lower bound is min_norm"
            )
    return Hyper(
        ema_beta=fields["ema_beta"],
        low_mult=0.0 if fields["low_mult"] is None else fields["low_mult"],
        high_mult=fields["high_mult"],
        min_norm=0.0 if fields["min_norm"] is None else fields["min_norm"],
        max_norm=0.0 if fields["max_norm"] is None else fields["max_norm"],
        max_up_scale=0.0 if fields["max_up_scale"] is None else fields["max_up_scale"],
        max_down_scale=0.0 if fields["max_down_scale"] is None else fields["max_down_scale"],
        raise_small=raising,
    )


def _entries(
    group_hyperparams: Mapping[str, Mapping[str, Any]] | None,
    checks: Mapping[str, Callable[[str, Any], Any]],
    make: Callable[[Mapping[str, Any], str], Hyper],
    defaults: Mapping[str, Any],
) -> tuple[_Entry, ...]:
    if group_hyperparams is None:
        return ()
    if not isinstance(group_hyperparams, Mapping):
        raise TypeError(
            "group_hyperparams must be a mapping from a label (or regex pattern) to a "
            f"mapping of hyperparameters, got {type(group_hyperparams).__name__}"
        )
    entries = []
    for key, fields in group_hyperparams.items():
        if not isinstance(key, str):
            raise TypeError(f"group_hyperparams: keys must be str labels or patterns, got {key!r}")
        try:
            regex: re.Pattern[str] | None = re.compile(key)
        except re.error:
            # not a pattern ("a[b"): an exact label only; a key that matches no group
            # label warns at init, so a broken pattern is not silently ignored
            regex = None
        if not isinstance(fields, Mapping):
            raise TypeError(
                f"group_hyperparams[{key!r}] must be a mapping of hyperparameters, got {fields!r}"
            )
        where = f"group_hyperparams[{key!r}]"
        for field, value in fields.items():
            if field not in checks:
                raise ValueError(
                    f"{where}: unknown hyperparameter {field!r}; allowed: {tuple(checks)}"
                )
            checks[field](f"{where}[{field!r}]", value)
        entries.append(_Entry(key, regex, make({**defaults, **fields}, f"{where}: ")))
    return tuple(entries)


def _common(
    param_labels: ParamLabels, variant: str, ema_init: str, nonfinite: str, unlabelled: str
) -> dict[str, Any]:
    _labels.check_param_labels(param_labels)
    return {
        "param_labels": param_labels,
        "variant": _validation.check_choice("variant", variant, VARIANTS),
        "ema_init": _validation.check_choice("ema_init", ema_init, EMA_INITS),
        "nonfinite": _validation.check_choice("nonfinite", nonfinite, NONFINITE_POLICIES),
        "unlabelled": _validation.check_choice("unlabelled", unlabelled, UNLABELLED),
    }


def aggc_config(
    fields: Mapping[str, Any],
    *,
    auto_bounds: Any,
    variant: str,
    ema_init: str,
    param_labels: ParamLabels,
    group_hyperparams: Mapping[str, Mapping[str, Any]] | None,
    axis_name: Any,
    unlabelled: str,
) -> Config:
    """:func:`aggc`'s arguments (``fields``: its hyperparameters), checked."""
    fields = {key: _AGGC_CHECKS[key](key, value) for key, value in fields.items()}
    auto_bounds = _validation.check_bool("auto_bounds", auto_bounds)
    high = fields["high_mult"]
    if not auto_bounds and (
        callable(high) or (not _validation.is_traced(high) and high != DEFAULT_HIGH_MULT)
    ):
        raise ValueError(
            "high_mult scales the EMA, which auto_bounds=False does not use; the fixed "
            "upper bound is max_norm"
        )

    def make(merged: Mapping[str, Any], where: str) -> Hyper:
        return _aggc_hyper(merged, auto_bounds, where)

    return Config(
        default=make(fields, ""),
        entries=_entries(group_hyperparams, _AGGC_CHECKS, make, fields),
        auto_bounds=auto_bounds,
        axis_name=axis_name,
        axis_reduction="sum",
        on_no_groups="error",
        strict_caps=True,
        **_common(param_labels, variant, ema_init, "skip", unlabelled),
    )


def reference_config(
    options: Mapping[str, Any],
    *,
    low_mult: Any,
    high_mult: Any,
    variant: str,
    ema_init: str,
    nonfinite: str,
    param_labels: ParamLabels,
    group_hyperparams: Mapping[str, Mapping[str, Any]] | None,
    axis_name: Any,
) -> Config:
    """The reference's (already checked) options, with the multipliers as scheduled."""
    default = Hyper(
        **{f: options[f] for f in Hyper._fields if f not in ("low_mult", "high_mult")},
        low_mult=low_mult,
        high_mult=high_mult,
    )

    def make(merged: Mapping[str, Any], where: str) -> Hyper:
        del where
        return Hyper(**merged)

    return Config(
        default=default,
        entries=_entries(group_hyperparams, REFERENCE_CHECKS, make, default._asdict()),
        auto_bounds=options["auto_bounds"],
        axis_name=axis_name,
        axis_reduction="mean" if options["sync_dist"] else "sum",
        on_no_groups="disable",
        **_common(param_labels, variant, ema_init, nonfinite, "ignore"),
    )
