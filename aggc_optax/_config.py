"""AGGC's configuration: checked once, when the transformation is built.

:func:`~aggc_optax.aggc`'s arguments end in one :class:`Config`. Its
hyperparameters are numbers where a switch is off (``raise_small`` a bool,
``low_mult = min_norm = 0`` when nothing is raised, a cap of 0 is off), the
form the update computes with. Every behaviour of the authors' clipper that
``aggc()`` does not share is one field of :class:`Quirks`, all off by default;
only ``aggc_optax.reference`` turns any on. Per group, :func:`resolve` turns
the hyperparameters into one value per group, once per set of labels.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from aggc_optax import _validation, labels
from aggc_optax.labels import ParamLabels

# aggc()'s default high_mult, chosen in docs/stability.md; one copy for the signature and checks.
DEFAULT_HIGH_MULT = 3.0

NONFINITE_POLICIES = ("skip", "reference")  # from_reference_options(nonfinite=)
VARIANTS = ("reference", "paper")
EMA_INITS = ("zero", "first", "bias_corrected")
UNLABELLED = ("warn", "error", "ignore")


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
class Quirks:
    """The authors' clipper's behaviours that :func:`~aggc_optax.aggc` does not share.

    None is on by default; ``aggc_optax.reference`` (``from_reference_options``
    and the recipes built on it) is the only place that turns one on. Each
    names the section of ``docs/reference-behaviour.md`` it reproduces.
    """

    #: §8: a non-finite norm is used as is (a NaN disables its group for the
    #: rest of the run, a float32 sum of squares overflows to inf) instead of
    #: skipping the step for that group and rescuing an overflowing sum.
    nonfinite_as_is: bool = False
    #: ``sync_dist``: the mean over ``axis_name`` of the sums of squares, not their sum.
    mean_over_devices: bool = False
    #: §2: no labelled leaf disables the clipper (a warning) instead of raising.
    disable_without_groups: bool = False
    #: §4: caps take any value >= 0 at run time (out of range inverts them);
    #: without it an injected or scheduled cap out of aggc()'s ranges skips the step.
    any_cap: bool = False


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything the transformation needs, checked."""

    default: Hyper
    entries: tuple[_Entry, ...]
    auto_bounds: bool
    param_labels: ParamLabels
    variant: str
    ema_init: str
    axis_name: Any
    unlabelled: str  # what init does when the default rule leaves float leaves out
    quirks: Quirks = Quirks()


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


def beta(name: str, v: Any) -> Any:
    return _validation.check_number(name, v, minimum=0.0, maximum=1.0, maximum_exclusive=True)


def nonneg(name: str, v: Any) -> Any:
    return _validation.check_number(name, v, minimum=0.0)


def mult(name: str, v: Any) -> Any:
    return _validation.check_schedule_or_number(name, v, minimum=0.0)


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


def _optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    return lambda name, v: None if v is None else check(name, v)


# aggc()'s form: None is "not given" (no raising, no cap, no fixed upper bound)
_AGGC_CHECKS: Mapping[str, Callable[[str, Any], Any]] = {
    "ema_beta": beta,
    "low_mult": _optional(mult),
    "high_mult": mult,
    "min_norm": _optional(nonneg),
    "max_norm": _optional(nonneg),
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


def entries(
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


def common(
    param_labels: ParamLabels, variant: str, ema_init: str, unlabelled: str
) -> dict[str, Any]:
    labels.check_param_labels(param_labels)
    return {
        "param_labels": param_labels,
        "variant": _validation.check_choice("variant", variant, VARIANTS),
        "ema_init": _validation.check_choice("ema_init", ema_init, EMA_INITS),
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
        entries=entries(group_hyperparams, _AGGC_CHECKS, make, fields),
        auto_bounds=auto_bounds,
        axis_name=axis_name,
        **common(param_labels, variant, ema_init, unlabelled),
    )
