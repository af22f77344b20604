"""Records the bit-identity guard ``preset_bits.npz`` (run once, at commit 2bee2aa).

This script uses the API of that commit (``aggc(raise_small=..., nonfinite=...)``);
it is kept to show how the recording was made, not to be rerun against later code.
``tests/test_preset_bits.py`` builds the same transformations with today's API and
asserts bit-identical updates and state. The recording is a regression guard, not
a source of expectations: the expectations of the behaviour come from
``tests/spec_model.py``.

    PYTHONPATH=$PWD python tests/data/record_preset_bits.py
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import aggc_optax
from aggc_optax import presets

STEPS = 20
SHAPES = {
    "model.layers.0.self_attn.q_proj.weight": ((4, 3), jnp.float32),
    "model.layers.0.self_attn.k_proj.weight": ((4, 3), jnp.float32),
    "model.layers.1.self_attn.q_proj.weight": ((4, 3), jnp.float32),
    "model.layers.0.mlp.down_proj.weight": ((3, 5), jnp.bfloat16),
    "model.layers.0.self_attn.q_proj.lora_A.default.weight": ((2, 3), jnp.float32),
    "model.layers.0.self_attn.q_proj.lora_B.default.weight": ((4, 2), jnp.float32),
    "model.norm.weight": ((5,), jnp.float32),
    "lm_head.weight": ((2, 5), jnp.float32),
}


def trajectory() -> list[dict[str, jax.Array]]:
    """20 steps: normal noise, a NaN at step 6, a x50 spike at 9, tiny steps 12-15."""
    rng = np.random.default_rng(17)
    out = []
    for t in range(STEPS):
        scale = 50.0 if t == 9 else (0.01 if 12 <= t <= 15 else 1.0 + 0.1 * t)
        step = {}
        for name, (shape, dtype) in SHAPES.items():
            g = rng.normal(size=shape) * scale
            if t == 6 and "k_proj" in name:
                g[0, 0] = np.nan
            step[name] = jnp.asarray(g, dtype)
        out.append(step)
    return out


RAISE = dict(ema_beta=0.9, low_mult=0.7, high_mult=1.5, min_norm=0.02, raise_small=True)

# name -> the transformation, built with commit 2bee2aa's API
OLD_CASES = {
    "lora_sft": lambda: presets.lora_sft(STEPS),
    "lora_sft_lora_label": lambda: presets.lora_sft(STEPS, param_labels=aggc_optax.lora_label),
    "grpo": lambda: presets.grpo(),
    "grpo_ramp": lambda: presets.grpo(STEPS),
    "global_norm": lambda: presets.global_norm(1.5),
    "adagc": lambda: presets.adagc(),
    "ref_defaults": lambda: aggc_optax.from_reference_options({"enable": True}),
    "ref_inverted_caps": lambda: aggc_optax.from_reference_options(
        {
            "enable": True,
            "auto_bounds": True,
            "raise_small": True,
            "ema_beta": 0.8,
            "low_mult": 0.9,
            "high_mult": 1.2,
            "min_norm": 0.5,
            "max_up_scale": 0.5,
            "max_down_scale": 1.5,
        }
    ),
    "ref_fixed_raise": lambda: aggc_optax.from_reference_options(
        {"enable": True, "min_norm": 2.0, "max_norm": 4.0, "raise_small": True}
    ),
    "aggc_clip_only": lambda: aggc_optax.aggc(
        ema_beta=0.9,
        high_mult=1.5,
        low_mult=0.0,
        min_norm=0.0,
        max_up_scale=0.0,
        max_down_scale=0.0,
    ),
    "aggc_raise_caps": lambda: aggc_optax.aggc(**RAISE, max_up_scale=1.2, max_down_scale=0.5),
    "aggc_first_paper": lambda: aggc_optax.aggc(
        **RAISE, max_up_scale=0.0, max_down_scale=0.0, ema_init="first", variant="paper"
    ),
    "aggc_bias_corrected": lambda: aggc_optax.aggc(
        **RAISE, max_up_scale=0.0, max_down_scale=0.0, bias_correction=True
    ),
    "aggc_group_hyperparams": lambda: aggc_optax.aggc(
        **RAISE,
        max_up_scale=0.0,
        max_down_scale=0.0,
        ema_init="first",
        group_hyperparams={
            "q_proj": {"high_mult": 1.1, "ema_beta": 0.5},
            ".*_proj": {"low_mult": 0.3},
        },
    ),
    "aggc_fixed_bounds": lambda: aggc_optax.aggc(
        auto_bounds=False, min_norm=0.0, max_norm=2.0, max_up_scale=0.0, max_down_scale=0.0
    ),
}

STATE_FIELDS = (
    "count", "ema", "ema_residual", "norm", "lower", "upper", "scale", "ema_count",
    "clip_down_count", "raise_count",
)  # fmt: skip


def run(tx, traj):
    """Per step: the updates (flattened, in sorted-name order) and the AGGC state fields."""
    state = tx.init(traj[0])
    update = jax.jit(tx.update)
    updates, fields = [], {field: [] for field in STATE_FIELDS}
    for g in traj:
        out, state = update(g, state)
        flat = [np.asarray(out[n].astype(jnp.float32)).ravel() for n in sorted(out)]
        updates.append(np.concatenate(flat))
        (inner,) = aggc_optax.find_aggc_states(state)
        for field in STATE_FIELDS:
            fields[field].append(np.asarray(getattr(inner, field)))
    rows = {"updates": np.stack(updates)}
    rows.update({f"state/{k}": np.stack(v) for k, v in fields.items()})
    return rows


def main() -> None:
    traj = trajectory()
    arrays = {}
    for case, make in OLD_CASES.items():
        for key, value in run(make(), traj).items():
            arrays[f"{case}/{key}"] = value
    path = pathlib.Path(__file__).with_name("preset_bits.npz")
    np.savez_compressed(path, **arrays)
    print(f"wrote {path} ({len(arrays)} arrays)")


if __name__ == "__main__":
    main()
