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
import inspect
import json
from collections.abc import Mapping
from typing import Any

import optax

from aggc_optax import _config, _validation, presets
from aggc_optax._aggc import aggc
from aggc_optax._schedule import cosine_ramp, linear_bounds_schedule
from aggc_optax.labels import lora_label
from aggc_optax.reference import REFERENCE_DEFAULTS

PRESETS = ("lora_sft", "grpo", "default", "adagc")
MULTIPLIER_SCHEDULES = ("constant", "linear", "cosine")
LABEL_RULES = ("reference", "lora")
RECIPES = {"lora_sft": presets.LORA_SFT_OPTIONS, "grpo": presets.GRPO_OPTIONS}

# flag dests that are the reference's numeric options (and, where they exist, aggc()'s)
_NUMERIC = (
    "ema_beta",
    "low_mult",
    "high_mult",
    "low_mult_late",
    "high_mult_late",
    "min_norm",
    "max_up_scale",
    "max_down_scale",
    "bounds_switch_ratio",
    "bounds_transition_ratio",
)
_RAMP = ("low_mult_late", "high_mult_late", "bounds_switch_ratio", "bounds_transition_ratio")
_NUMERIC_HELP = {
    "ema_beta": "decay beta of each group's EMA of its gradient norm, in [0, 1)",
    "low_mult": "alpha_low: the lower bound is max(min_norm, alpha_low x EMA); a norm below it "
    "is raised where raising is on",
    "high_mult": "alpha_high: a norm above alpha_high x EMA is clipped down to it",
    "low_mult_late": "alpha_low at the end of a --multiplier-schedule ramp",
    "high_mult_late": "alpha_high at the end of a --multiplier-schedule ramp",
    "min_norm": "floor of the lower bound",
    "max_up_scale": "ceiling (>= 1) on an upward scale; only where raising is on",
    "max_down_scale": "floor of a downward scale: a clip multiplies by at least this "
    "(in the recipes 0 is no floor)",
    "bounds_switch_ratio": "fraction of the run at which a --multiplier-schedule ramp starts",
    "bounds_transition_ratio": "fraction of the run a --multiplier-schedule ramp takes",
}


def _unset_values(dest: str) -> str:
    """What an unset numeric flag means under each preset, read from the code's own defaults."""
    params = inspect.signature(aggc).parameters
    if dest in params:
        value = params[dest].default
        default = "off" if value is None else f"{value:g}"
    elif dest in _RAMP:
        # _default ramps only with --multiplier-schedule, from the reference's defaults.
        value = REFERENCE_DEFAULTS[dest]
        default = f"{value:g}" + (" (the base value)" if dest.endswith("_late") else "")
    else:
        default = "n/a"
    recipes = ", ".join(f"{name} {RECIPES[name][dest]:g}" for name in RECIPES)
    adagc_params = inspect.signature(presets.adagc).parameters
    adagc_name = {"high_mult": "rel_threshold", "ema_beta": "ema_beta"}.get(dest)
    adagc = f", adagc {adagc_params[adagc_name].default:g}" if adagc_name else ""
    return f"Unset: default {default}, {recipes}{adagc}."


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``ArgumentDefaultsHelpFormatter`` that leaves out ``(default: None)``.

    The AGGC flags default to ``None`` ("as the preset has it") and say in
    their help what that is under each preset.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


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
        default="default",
        help="default: aggc() with the flags given as its arguments (unset flags take "
        "aggc()'s defaults); lora_sft / grpo: the authors' recipes, as the reference runs them "
        "(with a non-finite group skipped unless --nonfinite reference); adagc: per-tensor, "
        "upper bound only (--high-mult is its relative threshold).",
    )
    group.add_argument(
        "--variant",
        choices=_config.VARIANTS,
        default=None,
        help="reference: bounds from the EMA before the step, fed post-clip norms; paper: "
        "the paper's eq. 2, bounds from the EMA of raw norms including this step. "
        "Unset: reference.",
    )
    group.add_argument(
        "--ema-init",
        choices=_config.EMA_INITS,
        default=None,
        help="zero (reference): the EMA starts at 0; first: at each group's first norm; "
        "bias_corrected: at 0, with Adam's bias correction in the bounds. Unset: first with "
        "default and adagc, zero with lora_sft and grpo.",
    )
    group.add_argument(
        "--nonfinite",
        choices=_config.NONFINITE_POLICIES,
        default=None,
        help="lora_sft / grpo only. skip (default): a non-finite group passes through and "
        "keeps its EMA; reference: a NaN disables the group for good, as in the reference "
        "(docs/reference-behaviour.md §8).",
    )
    group.add_argument(
        "--group-hparams",
        type=_json_mapping,
        default=None,
        metavar="JSON",
        help='per-group overrides, e.g. \'{"[qkvo]_proj": {"high_mult": 0.5}}\', or @file.json. '
        "Unset: none.",
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
            "--" + dest.replace("_", "-"),
            dest=dest,
            type=float,
            default=None,
            metavar="X",
            help=f"{_NUMERIC_HELP[dest]}. {_unset_values(dest)}",
        )
    group.add_argument(
        "--raise-small",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="lora_sft / grpo only: scale up groups below their lower bound (with the "
        "default preset, --low-mult or --min-norm turns raising on). Unset: off with "
        "lora_sft, on with grpo.",
    )
    group.add_argument(
        "--aggc-labels",
        choices=LABEL_RULES,
        default=None,
        help="group labels: reference (module type from the parameter path) or lora (the "
        "LoRA script's rule: only lora_ parameters, grouped by their module). Unset: "
        "reference.",
    )
    return group


def _ramp(
    kind: str, base: float, late: float, values: Mapping[str, Any], total_steps: int | None
) -> Any:
    """``base`` ramped to ``late`` by the ``linear`` or ``cosine`` schedule."""
    if not total_steps:
        raise ValueError(
            f"--multiplier-schedule {kind} needs the run's length: pass total_steps > 0 to "
            f"aggc_from_args (got {total_steps!r})"
        )
    build = linear_bounds_schedule if kind == "linear" else cosine_ramp
    return build(
        base,
        late,
        total_steps=total_steps,
        switch_ratio=values["bounds_switch_ratio"],
        transition_ratio=values["bounds_transition_ratio"],
    )


def _reject(preset: str, flags: Mapping[str, Any], allowed: str) -> None:
    unusable = [flag for flag, value in flags.items() if value is not None]
    if unusable:
        raise ValueError(
            f"{', '.join(unusable)} cannot be used with --aggc-preset {preset} (it takes {allowed})"
        )


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _recipe(args: argparse.Namespace, given: Mapping[str, Any], total_steps: int | None) -> Any:
    """lora_sft / grpo through :mod:`aggc_optax.presets`, the flags as overrides."""
    overrides: dict[str, Any] = dict(given)
    values = {**RECIPES[args.aggc_preset], **given}
    schedule = args.multiplier_schedule or (
        "linear" if args.aggc_preset == "lora_sft" else "constant"
    )
    overrides["bounds_schedule"] = "linear" if schedule == "linear" else "none"
    if schedule == "cosine":
        for key in ("low_mult", "high_mult"):
            late = values[f"{key}_late"]
            overrides[key] = _ramp("cosine", values[key], late, values, total_steps)
    for key, value in (
        ("raise_small", args.raise_small),
        ("variant", args.variant),
        ("ema_init", args.ema_init),
        ("nonfinite", args.nonfinite),
        ("group_hyperparams", args.group_hparams),
    ):
        if value is not None:
            overrides[key] = value
    builder = presets.lora_sft if args.aggc_preset == "lora_sft" else presets.grpo
    return builder(total_steps, param_labels=_labels(args), **overrides)


def _default(args: argparse.Namespace, given: Mapping[str, Any], total_steps: int | None) -> Any:
    """aggc() with the flags as its arguments (unset flags take aggc()'s defaults)."""
    reference_nan = args.nonfinite if args.nonfinite == "reference" else None
    _reject(
        "default",
        {"--nonfinite reference": reference_nan, "--raise-small": args.raise_small},
        "aggc()'s arguments: it always skips a non-finite group and raises when --low-mult "
        "or --min-norm is given",
    )
    kwargs = {k: v for k, v in given.items() if k not in _RAMP}
    schedule = args.multiplier_schedule or "constant"
    if schedule != "constant":
        values = {**REFERENCE_DEFAULTS, **given}
        for key in ("low_mult", "high_mult"):
            if key in kwargs or key == "high_mult":
                base = kwargs.get(key, _config.DEFAULT_HIGH_MULT)
                kwargs[key] = _ramp(schedule, base, values[f"{key}_late"], values, total_steps)
    for key, value in (
        ("variant", args.variant),
        ("ema_init", args.ema_init),
        ("group_hyperparams", args.group_hparams),
    ):
        if value is not None:
            kwargs[key] = value
    return aggc(param_labels=_labels(args), **kwargs)


def _adagc(args: argparse.Namespace, given: Mapping[str, Any]) -> Any:
    flags = {_flag(d): v for d, v in given.items() if d not in ("high_mult", "ema_beta")}
    flags.update(
        {
            "--variant": args.variant,
            "--nonfinite reference": args.nonfinite if args.nonfinite == "reference" else None,
            "--group-hparams": args.group_hparams,
            "--multiplier-schedule": args.multiplier_schedule,
            "--raise-small": args.raise_small,
        }
    )
    _reject(
        "adagc",
        flags,
        "--high-mult as its relative threshold, --ema-beta, --ema-init and --aggc-labels",
    )
    kwargs = {"rel_threshold": given.get("high_mult"), "ema_beta": given.get("ema_beta")}
    kwargs["ema_init"] = args.ema_init
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return presets.adagc(param_labels=_labels(args), **kwargs)


def _labels(args: argparse.Namespace) -> Any:
    return {None: None, "reference": None, "lora": lora_label}[args.aggc_labels]


def aggc_from_args(
    args: argparse.Namespace, total_steps: int | None
) -> optax.GradientTransformation:
    """The AGGC transformation the flags of :func:`add_aggc_arguments` describe.

    ``lora_sft`` and ``grpo`` go through :mod:`aggc_optax.presets` (so through
    :func:`~aggc_optax.from_reference_options`): with no other flag they are the
    authors' clipper, with a non-finite group skipped (``--nonfinite reference``
    for the reference's NaN behaviour too). ``default`` is
    :func:`~aggc_optax.aggc` with the flags as arguments; ``adagc`` is
    :func:`aggc_optax.presets.adagc`.

    Args:
      args: the parsed namespace.
      total_steps: the run's number of optimizer steps (for the linear and
        cosine multiplier schedules), or ``None``.

    Returns:
      An ``optax.GradientTransformation``.

    Raises:
      ValueError: a flag that the chosen preset cannot use (e.g. ``--low-mult``
        with ``adagc``), or a ramp without ``total_steps``.
    """
    preset = _validation.check_choice("--aggc-preset", args.aggc_preset, PRESETS)
    given = {dest: getattr(args, dest) for dest in _NUMERIC if getattr(args, dest) is not None}
    if preset == "adagc":
        return _adagc(args, given)
    if preset == "default":
        return _default(args, given, total_steps)
    return _recipe(args, given, total_steps)


# cosine_ramp lives in aggc_optax._schedule; it stays importable from here.
__all__ = ["HelpFormatter", "add_aggc_arguments", "aggc_from_args", "cosine_ramp"]
