"""Build the transformation from the PyTorch reference's option dict."""

from __future__ import annotations

import numbers
import os
import warnings
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import numpy as np
import optax

from aggc_optax import _aggc, _config, _validation
from aggc_optax._schedule import linear_bounds_schedule
from aggc_optax.labels import ParamLabels

#: The reference's options and their defaults (docs/reference-behaviour.md §1).
REFERENCE_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "enable": False,
        "auto_bounds": False,
        "min_norm": 0.0,
        "max_norm": 1.0,
        "norm_type": 2.0,
        "low_mult": 1.0,
        "high_mult": 1.0,
        "raise_small": False,
        "ema_beta": 0.98,
        "sync_dist": False,
        "bounds_schedule": "none",
        "low_mult_late": 0.0,
        "high_mult_late": 0.0,
        "bounds_switch_ratio": 0.5,
        "bounds_transition_ratio": 0.2,
        "max_up_scale": 0.0,
        "max_down_scale": 0.0,
        "output_dir": None,
        "keep_global_clip": False,
    }
)


def _reference_cap(name: str, v: Any) -> Any:
    # any value >= 0, as the reference takes it: out of range inverts the cap (§4)
    return _validation.check_number(
        name, v, minimum=0.0, allowed="in [0.0, inf) (0 is off; any other value is a cap)"
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
    "ema_beta": _config.beta,
    "low_mult": _config.mult,
    "high_mult": _config.mult,
    "min_norm": _config.nonneg,
    "max_norm": _config.nonneg,
    "max_up_scale": _reference_cap,
    "max_down_scale": _reference_cap,
    "raise_small": _flag,
}


def _reference_config(
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
) -> _config.Config:
    """The reference's (already checked) options, with the multipliers as scheduled."""
    default = _config.Hyper(
        **{f: options[f] for f in _config.Hyper._fields if f not in ("low_mult", "high_mult")},
        low_mult=low_mult,
        high_mult=high_mult,
    )

    def make(merged: Mapping[str, Any], where: str) -> _config.Hyper:
        del where
        return _config.Hyper(**merged)

    return _config.Config(
        default=default,
        entries=_config.entries(group_hyperparams, REFERENCE_CHECKS, make, default._asdict()),
        auto_bounds=options["auto_bounds"],
        axis_name=axis_name,
        quirks=_config.Quirks(
            nonfinite_as_is=nonfinite == "reference",
            mean_over_devices=options["sync_dist"],
            disable_without_groups=True,
            any_cap=True,
        ),
        **_config.common(param_labels, variant, ema_init, "ignore"),
    )


_BOOL_OPTIONS = ("enable", "auto_bounds", "raise_small", "sync_dist", "keep_global_clip")


def _check_options(options: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(options, Mapping):
        raise TypeError(
            "options must be a mapping of the reference's option names, got "
            f"{type(options).__name__}"
        )
    unknown = [k for k in options if k not in REFERENCE_DEFAULTS]
    if unknown:
        raise ValueError(
            f"from_reference_options: unknown option {unknown[0]!r}; the reference's options "
            f"are {sorted(REFERENCE_DEFAULTS)}"
        )
    merged = {**REFERENCE_DEFAULTS, **options}
    for key in _BOOL_OPTIONS:
        _validation.check_bool(key, merged[key])
    if not isinstance(merged["bounds_schedule"], str):
        raise TypeError(
            f"bounds_schedule must be a str ('linear' or anything else for none), got "
            f"{merged['bounds_schedule']!r}"
        )
    output_dir = merged["output_dir"]
    if output_dir is not None and not isinstance(output_dir, (str, os.PathLike)):
        raise TypeError(f"output_dir must be a path or None, got {output_dir!r}")
    _check_norm_type(merged["norm_type"])
    # Checked even with enable=False, so a bad recipe fails when it is written,
    # not on the day someone enables it. Caps take any value >= 0, as in the
    # reference (out-of-range values invert their meaning, docs/reference-behaviour.md §4).
    for key, check in REFERENCE_CHECKS.items():
        merged[key] = check(key, merged[key])
    for key in ("low_mult_late", "high_mult_late"):
        # any finite value: <= 0 means "use the base value" (docs/reference-behaviour.md §5)
        _validation.check_number(
            key, merged[key], allowed="any finite number; <= 0 means the base value"
        )
    for key in ("bounds_switch_ratio", "bounds_transition_ratio"):
        _validation.check_number(key, merged[key], minimum=0.0, maximum=1.0)
    return merged


class InertOptionWarning(UserWarning):
    """An option value that the reference silently ignores (so this does too)."""


def _warn_inert(options: Mapping[str, Any], opts: Mapping[str, Any], total_steps: Any) -> None:
    """Warn where the reference would silently ignore what the options ask for (§5)."""
    schedule = opts["bounds_schedule"]
    if schedule != "linear" and schedule.strip().lower() == "linear":
        warnings.warn(
            f"from_reference_options: bounds_schedule={schedule!r} is not 'linear' (the "
            "reference compares the exact, case-sensitive string), so no schedule is applied, "
            "as in the reference; pass bounds_schedule='linear' for the ramp",
            InertOptionWarning,
            stacklevel=3,
        )
    late = [k for k in ("low_mult_late", "high_mult_late") if options.get(k, 0.0) > 0]
    if late and schedule == "linear" and not total_steps:
        warnings.warn(
            f"from_reference_options: {late} are set but total_steps is {total_steps!r}, so "
            "the linear schedule never starts and the base multipliers are used throughout "
            "(as in the reference when on_train_begin is not called); pass total_steps for "
            "the ramp",
            InertOptionWarning,
            stacklevel=3,
        )
    elif late and schedule.strip().lower() != "linear":
        warnings.warn(
            f"from_reference_options: {late} are set but bounds_schedule={schedule!r} is not "
            "'linear', so they have no effect (as in the reference)",
            InertOptionWarning,
            stacklevel=3,
        )


def _check_norm_type(value: Any) -> None:
    # No effect (docs/reference-behaviour.md §8), but a typo should still fail;
    # inf is the max norm in torch.
    allowed = "a number > 0 or inf (it has no effect: the norm is always L2)"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"norm_type must be {allowed}, got {value!r} ({type(value).__name__})")
    if not value > 0:  # type: ignore[operator]  # checked to be a real number above
        raise ValueError(f"norm_type must be {allowed}, got {value!r}")


def from_reference_options(
    options: Mapping[str, Any],
    *,
    total_steps: int | None = None,
    param_labels: ParamLabels = None,
    nonfinite: str = "reference",
    axis_name: Any = None,
    variant: str = "reference",
    ema_init: str = "zero",
    group_hyperparams: Mapping[str, Mapping[str, Any]] | None = None,
) -> optax.GradientTransformation:
    """The transformation that behaves exactly like the reference clipper.

    Takes the option dict of the authors' ``PerModuleGradNormOptions`` (missing
    keys take the reference's defaults, an unknown key is a ``ValueError``) and
    returns the AGGC transformation that reproduces it, with the reference's
    switches that :func:`aggc` does not offer: its NaN/inf behaviour
    (``nonfinite="reference"``, Python's ``max(0.0, nan) == 0.0`` included,
    ``docs/reference-behaviour.md`` §8), ``sync_dist``'s mean over devices,
    ``raise_small`` and ``lower`` reported even when nothing is raised, caps
    whose out-of-range values invert their meaning (accepted as the reference
    accepts them, §4), and, where no leaf gets a label, a pass-through (the
    reference disables itself, §2) with a warning. Leaves the label rule leaves
    out are not reported (the reference does not either).

    Options with no counterpart:

    * ``enable=False`` (the reference's default) gives ``optax.identity()``:
      gradients untouched, no state.
    * ``norm_type`` has no effect, as in the reference: the norm is always L2.
    * ``sync_dist``: under ``jax.jit`` with sharded arrays the group norms are
      already the true global norms, which is what ``sync_dist`` gives for
      replicated (DDP) gradients. With ``axis_name`` (inside ``shard_map`` or
      ``pmap``), ``sync_dist=True`` averages the sums of squares over that axis
      as the reference does (for sharded gradients that is the true norm
      divided by sqrt(world size), §8), ``sync_dist=False`` sums them.
    * ``output_dir``: ignored; write the same CSV with
      ``aggc_optax.CSVLogger`` from :func:`group_stats`.
    * ``keep_global_clip``: ignored; chain ``optax.clip_by_global_norm`` after
      this transformation yourself if the recipe keeps the global clip.

    Args:
      options: the reference's options (the field names of §1).
      total_steps: what the reference's ``on_train_begin`` would receive; ``None``
        or 0 means the ``linear`` schedule stays inert, as in the verl trainer.
      param_labels: override the reference's label rule (e.g.
        ``aggc_optax.lora_label`` for the LoRA script's copy, §10); the forms
        of :func:`aggc`.
      nonfinite: ``"reference"`` (default: §8 exactly, a NaN disables its group
        for the rest of the run) or ``"skip"`` (:func:`aggc`'s policy: a
        non-finite group passes through and keeps its EMA).
      axis_name: see ``sync_dist`` above.
      variant: ``"reference"`` (default) or ``"paper"``; see :func:`aggc`.
      ema_init: ``"zero"`` (default, the reference), ``"first"`` or
        ``"bias_corrected"``; see :func:`aggc`.
      group_hyperparams: ``None`` (default) or per-group overrides
        ``{label or regex: {option: value}}`` in the reference's vocabulary
        (``ema_beta, low_mult, high_mult, min_norm, max_norm, max_up_scale,
        max_down_scale, raise_small``; a cap of 0 is off); the option dict's
        values are the default entry. A group entry's ``low_mult``/``high_mult``
        replaces the recipe's (scheduled) multiplier for that group: give a
        schedule to keep a ramp.

      ``nonfinite="skip"``, ``variant``, ``ema_init`` and ``group_hyperparams``
      are the fixes the reference lacks (``docs/variants.md``); each is off by
      default, so the defaults reproduce the reference exactly.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import aggc_optax
      >>> tx = aggc_optax.from_reference_options(
      ...     {"enable": True, "auto_bounds": True, "ema_beta": 0.95, "low_mult": 0.95,
      ...      "high_mult": 0.6, "min_norm": 0.01, "bounds_schedule": "linear",
      ...      "low_mult_late": 0.98, "high_mult_late": 0.7, "bounds_switch_ratio": 0.4,
      ...      "bounds_transition_ratio": 0.3, "max_up_scale": 1.1, "max_down_scale": 0.9},
      ...     total_steps=1000)
    """
    opts = _check_options(options)
    total_steps = _validation.check_total_steps(total_steps)
    if not opts["enable"]:
        return optax.identity()

    _warn_inert(options, opts, total_steps)
    low, high = opts["low_mult"], opts["high_mult"]
    if opts["bounds_schedule"] == "linear" and total_steps:
        for key in ("low_mult", "high_mult"):
            if callable(opts[key]):
                raise ValueError(
                    f"{key} is a schedule, but bounds_schedule='linear' builds its own ramp "
                    f"from a number; pass a number, or bounds_schedule='none' to use the "
                    f"schedule as given (got {opts[key]!r})"
                )
        ramp = {
            "total_steps": total_steps,
            "switch_ratio": opts["bounds_switch_ratio"],
            "transition_ratio": opts["bounds_transition_ratio"],
        }
        low = linear_bounds_schedule(low, opts["low_mult_late"], **ramp)
        high = linear_bounds_schedule(high, opts["high_mult_late"], **ramp)

    nonfinite = _validation.check_choice("nonfinite", nonfinite, _config.NONFINITE_POLICIES)
    config = _reference_config(
        opts,
        low_mult=low,
        high_mult=high,
        variant=variant,
        ema_init=ema_init,
        nonfinite=nonfinite,
        param_labels=param_labels,
        group_hyperparams=group_hyperparams,
        axis_name=axis_name,
    )
    return _aggc.build(config)
