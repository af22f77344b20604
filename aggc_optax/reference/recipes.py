"""The authors' two recipes, in the reference's option names, and the presets built on them.

:func:`lora_sft` and :func:`grpo` go through
:func:`~aggc_optax.from_reference_options`, so they behave exactly like the
authors' PyTorch clipper, except that by default a non-finite group norm is
skipped (``nonfinite="skip"``). ``aggc_optax.presets`` re-exports them.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import optax

from aggc_optax.reference._options import (
    REFERENCE_DEFAULTS,
    InertOptionWarning,
    from_reference_options,
)

__all__ = ["GRPO_OPTIONS", "LORA_SFT_OPTIONS", "grpo", "lora_sft"]

#: The authors' LoRA SFT recipe (``LoRA/scripts/*/run_lora_AGGC.sh``), in the
#: reference's option names.
LORA_SFT_OPTIONS: Mapping[str, Any] = MappingProxyType(
    {
        "enable": True,
        "auto_bounds": True,
        "ema_beta": 0.95,
        "low_mult": 0.95,
        "high_mult": 0.6,
        "min_norm": 0.01,
        "raise_small": False,
        "bounds_schedule": "linear",
        "low_mult_late": 0.98,
        "high_mult_late": 0.7,
        "bounds_switch_ratio": 0.4,
        "bounds_transition_ratio": 0.3,
        "max_up_scale": 1.1,
        "max_down_scale": 0.9,
        "sync_dist": True,
    }
)

#: The authors' GRPO recipe (``GRPO/my_scripts/run_qwen2.5-3b_gsm8k.sh``).
GRPO_OPTIONS: Mapping[str, Any] = MappingProxyType(
    {
        "enable": True,
        "auto_bounds": True,
        "ema_beta": 0.99,
        "low_mult": 0.98,
        "high_mult": 0.7,
        "min_norm": 0.0,
        "raise_small": True,
        "bounds_schedule": "linear",
        "low_mult_late": 0.98,
        "high_mult_late": 0.999,
        "bounds_switch_ratio": 0.6,
        "bounds_transition_ratio": 0.2,
        "max_up_scale": 1.1,
        "max_down_scale": 0.9,
        "keep_global_clip": False,
        "sync_dist": True,
    }
)

# Keyword arguments of from_reference_options that a recipe override may set.
_KEYWORDS = (
    "param_labels",
    "axis_name",
    "variant",
    "ema_init",
    "nonfinite",
    "group_hyperparams",
)


def _recipe(
    name: str, recipe: Mapping[str, Any], total_steps: int | None, overrides: Mapping[str, Any]
) -> optax.GradientTransformation:
    options = dict(recipe)
    keywords: dict[str, Any] = {"nonfinite": "skip"}
    nested = overrides.get("overrides")
    if isinstance(nested, Mapping) and "overrides" not in REFERENCE_DEFAULTS:
        # optax.inject_hyperparams binds the signature and passes the **overrides
        # dict back as one keyword named "overrides": unpack it.
        overrides = {**nested, **{k: v for k, v in overrides.items() if k != "overrides"}}
    for key, value in overrides.items():
        if key in _KEYWORDS:
            keywords[key] = value
        elif key in REFERENCE_DEFAULTS:
            options[key] = value
        else:
            raise ValueError(
                f"presets.{name}: unknown override {key!r}; allowed: the reference's options "
                f"{sorted(REFERENCE_DEFAULTS)} and {list(_KEYWORDS)}"
            )
    with warnings.catch_warnings():
        # total_steps=None (grpo as the authors ran it; documented) leaves the late
        # multipliers inert by design: not worth a warning from a preset
        if not total_steps:
            warnings.simplefilter("ignore", InertOptionWarning)
        return from_reference_options(options, total_steps=total_steps, **keywords)


def lora_sft(total_steps: int | None, **overrides: Any) -> optax.GradientTransformation:
    """The authors' LoRA SFT recipe, the one behind the paper's headline GSM8K result.

    ``ema_beta=0.95``, multipliers ``0.95``/``0.6`` ramped linearly to
    ``0.98``/``0.7`` between 40% and 70% of the run, ``min_norm=0.01``, no
    raising, caps ``1.1``/``0.9``, ``sync_dist`` (see
    :data:`LORA_SFT_OPTIONS`). Equal to
    ``from_reference_options(LORA_SFT_OPTIONS, total_steps=total_steps,
    nonfinite="skip")``: the reference's clipper exactly on finite gradients,
    while a group whose norm is NaN or inf passes through and keeps its EMA
    (the reference would disable it for the rest of the run, §8). With
    ``nonfinite="reference"`` it is the reference in that case too.

    This is the recipe as meant: one clip per optimizer step (with
    ``param_labels=aggc_optax.lora_label`` for the LoRA script's groups). The
    authors' LoRA runs did something else: their Hugging Face callback's
    per-step clip is never called by the ``Trainer``, and it clipped only from
    ``on_substep_end``, part of an accumulated gradient on some steps
    (docs/differences.md; :func:`aggc_optax.lora_callback_as_ran` reproduces
    it). Replayed on 60 optimizer steps of the recipe
    (``tests/golden/lora_callback/``, 8 groups)::

      | accumulation | scripts | steps clipped | after micro-batch | groups clipped down |
      |---|---|---|---|---|
      | 1 | none | 0 of 60 | never | none checked |
      | 2 | metamath | 30 of 60 (every other step) | 1 of 2 | 173 of 240 checked |
      | 4 | conversation, code | 45 of 60 | 1, 2 or 3 of 4 (15 steps each) | 264 of 360 checked |
      | as meant | | 60 of 60 | the last (the whole step) | 298 of 480 checked |

    Args:
      total_steps: the run's number of optimizer steps (what the LoRA script's
        callback reads from the trainer's ``max_steps``); ``None`` or 0 leaves
        the multipliers at their base values.
      **overrides: any of the reference's option names (replacing the
        recipe's value, e.g. ``ema_beta=0.9``), or the keywords of
        :func:`~aggc_optax.from_reference_options`: ``param_labels``,
        ``axis_name``, ``variant``, ``ema_init``, ``nonfinite`` (default
        ``"skip"``), ``group_hyperparams``.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> from aggc_optax import presets
      >>> tx = presets.lora_sft(2000, ema_init="first")
      >>> exact = presets.lora_sft(2000, nonfinite="reference")  # NaN as the reference too

    References:
      Li, Wu, Chang, `AGGC <https://arxiv.org/abs/2601.11864>`_, 2026 (appendix C).
    """
    return _recipe("lora_sft", LORA_SFT_OPTIONS, total_steps, overrides)


def grpo(total_steps: int | None = None, **overrides: Any) -> optax.GradientTransformation:
    """The authors' GRPO recipe (Qwen2.5-3B on GSM8K with verl).

    ``ema_beta=0.99``, multipliers ``0.98``/``0.7`` (late ``0.98``/``0.999``,
    switch 0.6, transition 0.2), ``min_norm=0``, raising on, caps
    ``1.1``/``0.9`` (see :data:`GRPO_OPTIONS`). Equal to
    ``from_reference_options(GRPO_OPTIONS, total_steps=total_steps,
    nonfinite="skip")``, as for :func:`lora_sft`.

    The default ``total_steps=None`` is what the authors ran: the verl trainer
    never calls ``on_train_begin``, so the recipe's linear schedule is inert
    there (``docs/reference-behaviour.md`` §8). Pass the run's length to get
    the ramp the script asks for.

    Args:
      total_steps: ``None`` (the recipe as run) or the run's number of steps.
      **overrides: as for :func:`lora_sft`.

    Returns:
      An ``optax.GradientTransformation``.
    """
    return _recipe("grpo", GRPO_OPTIONS, total_steps, overrides)
