"""Shared inputs for the scale-out tests (sharding, multi-host, composition, checkpoints).

A small LLaMA-like gradient tree (flat dict of torch-style names, so labels follow spec
section 2), a deterministic gradient trajectory whose per-group sizes jump around enough
to take every branch of docs/reference-behaviour.md §4, and helpers that run the float64 spec model
(``tests/spec_model.py``) over it. Nothing here calls the code under test except
:func:`make_aggc`, which only builds the transformation from a named configuration.

No JAX device state is touched at import: the multi-device scripts import this module
after setting their XLA flags.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tests.spec_model import SpecClipper, aggc_options, spec_label

# Every dimension is a multiple of 8, so each leaf can be split over 8 devices on any axis.
SHAPES: dict[str, tuple[int, ...]] = {
    "model.embed_tokens.weight": (32, 16),
    "model.layers.0.self_attn.q_proj.weight": (16, 16),
    "model.layers.0.self_attn.v_proj.weight": (16, 16),
    "model.layers.0.mlp.up_proj.weight": (16, 32),
    "model.layers.0.mlp.down_proj.weight": (32, 16),
    "model.layers.0.input_layernorm.weight": (16,),
    "model.layers.0.residual_gate": (16,),  # no label: never counted, never clipped
    "model.layers.1.self_attn.q_proj.weight": (16, 16),
    "model.layers.1.self_attn.v_proj.weight": (16, 16),
    "model.layers.1.mlp.up_proj.weight": (16, 32),
    "model.layers.1.mlp.down_proj.weight": (32, 16),
    "model.layers.1.input_layernorm.weight": (16,),
    "model.norm.weight": (16,),
    "lm_head.weight": (16, 32),
}

LABELS: dict[str, str | None] = {name: spec_label(name) for name in SHAPES}
GROUPS: tuple[str, ...] = tuple(sorted({lab for lab in LABELS.values() if lab is not None}))

# Two configurations of aggc(); the spec model gets their documented meaning
# (tests.spec_model.aggc_options). Both start the EMA at zero, as the reference, and
# leave residual_gate out on purpose (unlabelled="ignore").
CONFIGS: dict[str, dict[str, Any]] = {
    # the LoRA SFT recipe's clipping without its ramp: no raising, the 0.9 floor
    "recipe": {"ema_beta": 0.95, "high_mult": 0.6, "max_down_scale": 0.9, "ema_init": "zero",
               "unlabelled": "ignore"},
    # No caps and raising on: scales are the raw bound / norm ratios, both directions.
    "raise": {"ema_beta": 0.5, "low_mult": 0.9, "high_mult": 1.1, "min_norm": 0.0,
              "ema_init": "zero", "unlabelled": "ignore"},
}  # fmt: skip


def make_aggc(config: str, **extra: Any) -> Any:
    """aggc() with a named configuration (``extra`` e.g. ``axis_name``)."""
    import aggc_optax

    return aggc_optax.aggc(**CONFIGS[config], **extra)


def grad_trajectory(
    num_steps: int, seed: int = 0, shapes: Mapping[str, tuple[int, ...]] = SHAPES
) -> list[dict[str, np.ndarray]]:
    """float32 gradients; each group's size is multiplied by a log-normal factor per step."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_steps):
        factors = {g: float(np.exp(rng.normal(0.0, 1.0))) for g in GROUPS}
        step = {}
        for name, shape in shapes.items():
            factor = factors.get(LABELS[name], 1.0) if LABELS[name] else 1.0
            step[name] = (rng.normal(size=shape) * factor).astype(np.float32)
        out.append(step)
    return out


def spec_clipper(config: str) -> SpecClipper:
    options = aggc_options(**CONFIGS[config])
    assert options.pop("ema_init") == "zero"
    return SpecClipper(**options)


def spec_trajectory(
    grads: Sequence[Mapping[str, np.ndarray]],
    config: str,
    clipper: SpecClipper | None = None,
    start: int = 0,
) -> list[tuple[dict[str, np.ndarray], dict[str, dict[str, float]]]]:
    """The spec model over a trajectory: per step, the clipped gradients and per-group stats."""
    clipper = clipper or spec_clipper(config)
    labels = {name: spec_label(name) for name in grads[0]}
    return [clipper.step(g, labels, start + t) for t, g in enumerate(grads)]


def assert_step_matches(
    updates: Mapping[str, Any],
    stats: Mapping[str, Mapping[str, Any]],
    expected: tuple[dict[str, np.ndarray], dict[str, dict[str, float]]],
    *,
    rtol: float = 2e-5,
    where: str = "",
) -> None:
    """Clipped gradients and per-group stats equal the spec model's within float32 noise."""
    exp_updates, exp_stats = expected
    assert set(stats) == set(exp_stats), f"{where}: groups {sorted(stats)} != {sorted(exp_stats)}"
    for label, exp in exp_stats.items():
        for field in ("norm", "lower", "upper", "scale"):
            got = float(np.asarray(stats[label][field]))
            np.testing.assert_allclose(
                got, exp[field], rtol=rtol, atol=1e-7, err_msg=f"{where}: {label}.{field}"
            )
    for name, exp in exp_updates.items():
        np.testing.assert_allclose(
            np.asarray(updates[name]), exp, rtol=rtol, atol=1e-7, err_msg=f"{where}: {name}"
        )


def branch_counts(
    spec: Sequence[tuple[Any, dict[str, dict[str, float]]]],
) -> tuple[int, int]:
    """How many (group, step) pairs the spec model clipped down and raised."""
    down = sum(1 for _, st in spec for s in st.values() if s["scale"] < 1.0)
    up = sum(1 for _, st in spec for s in st.values() if s["scale"] > 1.0)
    return down, up
