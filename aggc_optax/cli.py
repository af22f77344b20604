"""Command-line flags for AGGC: add them to a training script's parser, build from them.

``import aggc_optax`` does not import this module, and importing it changes
nothing: the flags exist only once :func:`add_aggc_arguments` is called on a
parser.

Example:
  >>> import argparse
  >>> from aggc_optax import cli
  >>> parser = argparse.ArgumentParser()
  >>> _ = cli.add_aggc_arguments(parser)
  >>> args = parser.parse_args(["--aggc-preset", "lora_sft", "--ema-init", "first"])
  >>> tx = cli.aggc_from_args(args, total_steps=1000)
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any

import optax

from aggc_optax import _validation, presets
from aggc_optax._aggc import EMA_INITS, NONFINITE_POLICIES, VARIANTS, aggc
from aggc_optax._labels import lora_label
from aggc_optax._schedule import linear_bounds_schedule

PRESETS = ("lora_sft", "grpo", "default", "adagc")
MULTIPLIER_SCHEDULES = ("constant", "linear", "cosine")
LABEL_RULES = ("reference", "lora")

# aggc()'s defaults (the LoRA recipe without its ramp), plus the ramp the
# recipe would use, for the "default" preset's linear or cosine schedule.
_DEFAULT_PRESET = {
    **presets.LORA_SFT_OPTIONS,
    "bounds_schedule": "none",
}

# flag dest -> the reference's option name, for the numeric hyperparameters
_NUMERIC = {
    "ema_beta": "ema_beta",
    "low_mult": "low_mult",
    "high_mult": "high_mult",
    "low_mult_late": "low_mult_late",
    "high_mult_late": "high_mult_late",
    "min_norm": "min_norm",
    "max_up_scale": "max_up_scale",
    "max_down_scale": "max_down_scale",
    "bounds_switch_ratio": "bounds_switch_ratio",
    "bounds_transition_ratio": "bounds_transition_ratio",
}


def _json_mapping(text: str) -> dict[str, Any]:
    """argparse type of ``--group-hparams``: a JSON object, or ``@path`` to a JSON file."""
    source = "the value"
    if text.startswith("@"):
        source = text[1:]
        try:
            with open(source, encoding="utf-8") as f:
                text = f.read()
        except OSError as err:
            raise argparse.ArgumentTypeError(f"cannot read {source!r}: {err}") from err
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"{source} is not valid JSON: {err}") from err
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise argparse.ArgumentTypeError(
            'expected a JSON object {"label or regex": {"field": value, ...}, ...}, '
            f"got {value!r}"
        )
    return value


def add_aggc_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Adds the AGGC flags to ``parser`` (as an argument group) and returns the group.

    Every flag but ``--aggc-preset`` defaults to ``None``, meaning "as the
    preset has it"; the recipes then reproduce the authors' clipper exactly.

    Args:
      parser: the training script's parser.

    Returns:
      The ``argparse`` argument group holding the flags.
    """
    group = parser.add_argument_group(
        "AGGC",
        "Adaptive Group Gradient Clipping (docs/variants.md). Flags left unset keep the "
        "preset's value.",
    )
    group.add_argument(
        "--aggc-preset",
        choices=PRESETS,
        default="lora_sft",
        help="lora_sft / grpo: the authors' recipes, exactly as the reference runs them; "
        "default: aggc()'s defaults (the LoRA recipe without its ramp, nonfinite='skip'); "
        "adagc: per-tensor, upper bound only (--high-mult is its relative threshold). "
        "Default: %(default)s.",
    )
    group.add_argument(
        "--variant",
        choices=VARIANTS,
        default=None,
        help="reference: bounds from the EMA before the step, fed post-clip norms; paper: "
        "the paper's eq. 2, bounds from the EMA of raw norms including this step.",
    )
    group.add_argument(
        "--ema-init",
        choices=EMA_INITS,
        default=None,
        help="zero (reference) or first: start each group's EMA at its first norm.",
    )
    group.add_argument(
        "--bias-correction",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="divide the EMA by 1 - beta**n when building bounds (only with --ema-init zero).",
    )
    group.add_argument(
        "--nonfinite",
        choices=NONFINITE_POLICIES,
        default=None,
        help="reference: a NaN disables a group for good (spec 8.3); skip: a non-finite "
        "group passes through and keeps its EMA.",
    )
    group.add_argument(
        "--group-hparams",
        type=_json_mapping,
        default=None,
        metavar="JSON",
        help='per-group overrides, e.g. \'{"[qkvo]_proj": {"high_mult": 0.5}}\', or @file.json.',
    )
    group.add_argument(
        "--multiplier-schedule",
        choices=MULTIPLIER_SCHEDULES,
        default=None,
        help="constant: the base multipliers throughout; linear: the reference's ramp to "
        "the late values; cosine: a cosine ramp over the same window. Default: the "
        "preset's (linear for lora_sft, constant for grpo as the authors ran it and for "
        "default).",
    )
    for dest in _NUMERIC:
        group.add_argument(
            "--" + dest.replace("_", "-"), dest=dest, type=float, default=None, metavar="X"
        )
    group.add_argument(
        "--raise-small",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="scale up groups below their lower bound.",
    )
    group.add_argument(
        "--aggc-labels",
        choices=LABEL_RULES,
        default=None,
        help="group labels: reference (module type from the parameter path) or lora (the "
        "LoRA script's rule: only lora_ parameters, grouped by their module).",
    )
    return group


def cosine_ramp(
    base: float,
    late: float,
    *,
    total_steps: int,
    switch_ratio: float = 0.5,
    transition_ratio: float = 0.2,
) -> optax.Schedule:
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
    total_steps = _validation.check_total_steps(total_steps)
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


def _multipliers(
    values: Mapping[str, Any], schedule: str, total_steps: int | None
) -> tuple[Any, Any, str]:
    """(low, high, bounds_schedule) for the reference's option dict."""
    if schedule == "constant":
        return values["low_mult"], values["high_mult"], "none"
    if schedule == "linear":
        return values["low_mult"], values["high_mult"], "linear"
    if not total_steps:
        raise ValueError(
            "--multiplier-schedule cosine needs the run's length: pass total_steps > 0 to "
            f"aggc_from_args (got {total_steps!r})"
        )
    ramp = {
        "total_steps": total_steps,
        "switch_ratio": values["bounds_switch_ratio"],
        "transition_ratio": values["bounds_transition_ratio"],
    }
    low = cosine_ramp(values["low_mult"], values["low_mult_late"], **ramp)
    high = cosine_ramp(values["high_mult"], values["high_mult_late"], **ramp)
    return low, high, "none"


def aggc_from_args(
    args: argparse.Namespace, total_steps: int | None
) -> optax.GradientTransformation:
    """The AGGC transformation the flags of :func:`add_aggc_arguments` describe.

    ``lora_sft`` and ``grpo`` go through :mod:`aggc_optax.presets` (so through
    :func:`~aggc_optax.from_reference_options`): with no other flag they are the
    authors' clipper exactly. ``default`` is :func:`~aggc_optax.aggc` with the
    flags as arguments; ``adagc`` is :func:`aggc_optax.presets.adagc`.

    Args:
      args: the parsed namespace.
      total_steps: the run's number of optimizer steps (for the linear and
        cosine multiplier schedules), or ``None``.

    Returns:
      An ``optax.GradientTransformation``.

    Raises:
      ValueError: a flag that the chosen preset cannot use (e.g. ``--low-mult``
        with ``adagc``), or a cosine schedule without ``total_steps``.
    """
    preset = _validation.check_choice("--aggc-preset", args.aggc_preset, PRESETS)
    given = {dest: getattr(args, dest) for dest in _NUMERIC if getattr(args, dest) is not None}
    labels = {None: None, "reference": None, "lora": lora_label}[args.aggc_labels]

    if preset == "adagc":
        unusable = [f"--{d.replace('_', '-')}" for d in given if d not in ("high_mult", "ema_beta")]
        for flag, value in (
            ("--variant", args.variant),
            ("--bias-correction", args.bias_correction),
            ("--group-hparams", args.group_hparams),
            ("--multiplier-schedule", args.multiplier_schedule),
            ("--raise-small", args.raise_small),
        ):
            if value is not None:
                unusable.append(flag)
        if unusable:
            raise ValueError(
                f"{', '.join(unusable)} cannot be used with --aggc-preset adagc (it takes "
                "--high-mult as its relative threshold, --ema-beta, --ema-init, --nonfinite "
                "and --aggc-labels)"
            )
        return presets.adagc(
            rel_threshold=given.get("high_mult", 1.05),
            ema_beta=given.get("ema_beta", 0.98),
            ema_init=args.ema_init or "first",
            nonfinite=args.nonfinite or "skip",
            param_labels=labels,
        )

    recipe = {
        "lora_sft": presets.LORA_SFT_OPTIONS,
        "grpo": presets.GRPO_OPTIONS,
        "default": _DEFAULT_PRESET,
    }[preset]
    values = {**recipe, **given}
    if args.raise_small is not None:
        values["raise_small"] = args.raise_small
    default_schedule = "linear" if preset == "lora_sft" else "constant"
    low, high, bounds_schedule = _multipliers(
        values, args.multiplier_schedule or default_schedule, total_steps
    )
    keywords = {
        key: value
        for key, value in (
            ("variant", args.variant),
            ("ema_init", args.ema_init),
            ("bias_correction", args.bias_correction),
            ("nonfinite", args.nonfinite),
            ("group_hyperparams", args.group_hparams),
            ("param_labels", labels),
        )
        if value is not None
    }

    if preset == "default":
        if bounds_schedule == "linear":
            if not total_steps:
                raise ValueError(
                    "--multiplier-schedule linear with --aggc-preset default needs "
                    f"total_steps > 0 (got {total_steps!r})"
                )
            ramp = {
                "total_steps": total_steps,
                "switch_ratio": values["bounds_switch_ratio"],
                "transition_ratio": values["bounds_transition_ratio"],
            }
            low = linear_bounds_schedule(low, values["low_mult_late"], **ramp)
            high = linear_bounds_schedule(high, values["high_mult_late"], **ramp)
        return aggc(
            ema_beta=values["ema_beta"],
            low_mult=low,
            high_mult=high,
            min_norm=values["min_norm"],
            raise_small=values["raise_small"],
            max_up_scale=values["max_up_scale"],
            max_down_scale=values["max_down_scale"],
            **keywords,
        )

    overrides = {**given, "low_mult": low, "high_mult": high, "bounds_schedule": bounds_schedule}
    if args.raise_small is not None:
        overrides["raise_small"] = args.raise_small
    builder = presets.lora_sft if preset == "lora_sft" else presets.grpo
    return builder(total_steps, **overrides, **keywords)


__all__ = ["add_aggc_arguments", "aggc_from_args", "cosine_ramp"]
