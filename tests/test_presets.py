"""aggc_optax.presets: the authors' recipes, global-norm clipping and AdaGC-style clipping.

The recipes are checked against the spec's table (section 9), written out here,
and against the float64 model; global_norm against optax.clip_by_global_norm;
adagc against a NumPy model of AdaGC's per-tensor rule.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aggc_optax import from_reference_options, group_stats, presets
from tests.spec_model import GRPO, LORA, SpecClipper, spec_label, spec_schedule

Q = "model.layers.0.self_attn.q_proj.weight"
UP = "model.layers.0.mlp.up_proj.weight"
V = "model.layers.0.self_attn.v_proj.weight"


def _trajectory(steps: int, seed: int = 7) -> list[dict[str, jax.Array]]:
    rng = np.random.default_rng(seed)
    out = []
    for t in range(steps):
        burst = 40.0 if t % 9 == 4 else 1.0
        out.append(
            {
                Q: jnp.asarray(rng.normal(size=(6, 4)) * burst, jnp.float32),
                UP: jnp.asarray(rng.normal(size=(4, 8)) * (1 + 0.1 * t), jnp.float32),
                V: jnp.asarray(rng.normal(size=(6, 4)) * 1e-3, jnp.float32),
            }
        )
    return out


def _run(tx: optax.GradientTransformation, traj):
    state = tx.init(traj[0])
    update = jax.jit(tx.update)
    outs, stats = [], []
    for g in traj:
        out, state = update(g, state)
        outs.append(out)
        stats.append(group_stats(state))
    return outs, stats


def _assert_same_trajectory(a, b) -> None:
    (outs_a, stats_a), (outs_b, stats_b) = a, b
    for oa, ob in zip(outs_a, outs_b):
        for name in oa:
            np.testing.assert_array_equal(np.asarray(oa[name]), np.asarray(ob[name]))
    for sa, sb in zip(stats_a, stats_b):
        for label in sa:
            for field, value in sa[label].items():
                np.testing.assert_array_equal(np.asarray(value), np.asarray(sb[label][field]))


def test_recipe_tables_are_the_spec_tables() -> None:
    assert dict(presets.LORA_SFT_OPTIONS) == LORA
    assert dict(presets.GRPO_OPTIONS) == GRPO


@pytest.mark.parametrize("total_steps", [30, None])
def test_lora_sft_is_the_reference_recipe(total_steps) -> None:
    traj = _trajectory(30)
    got = _run(presets.lora_sft(total_steps), traj)
    _assert_same_trajectory(got, _run(from_reference_options(LORA, total_steps=total_steps), traj))
    # and against the float64 model of the reference, with the linear ramp
    model = SpecClipper(
        ema_beta=0.95,
        low_mult=lambda t: spec_schedule(t, 0.95, 0.98, total_steps, 0.4, 0.3),
        high_mult=lambda t: spec_schedule(t, 0.6, 0.7, total_steps, 0.4, 0.3),
        min_norm=0.01, auto_bounds=True, max_up_scale=1.1, max_down_scale=0.9,
    )  # fmt: skip
    labels = {n: spec_label(n) for n in traj[0]}
    for t, (g, stats) in enumerate(zip(traj, got[1])):
        _, want = model.step({n: np.asarray(a) for n, a in g.items()}, labels, t)
        for label, w in want.items():
            for f in ("lower", "upper", "scale"):
                np.testing.assert_allclose(float(stats[label][f]), w[f], rtol=2e-6)


def test_grpo_as_run_has_an_inert_schedule_and_ramps_when_told_the_length() -> None:
    traj = _trajectory(20)
    inert = _run(presets.grpo(), traj)
    _assert_same_trajectory(inert, _run(from_reference_options(GRPO), traj))
    ramped = _run(presets.grpo(20), traj)
    _assert_same_trajectory(ramped, _run(from_reference_options(GRPO, total_steps=20), traj))
    # step 16: prog 0.8 >= 0.6 + 0.2, so high_mult is the late 0.999 (inert: 0.7);
    # the upper bound is high_mult times the EMA left by step 15
    ema15 = float(ramped[1][15]["up_proj"]["ema"])
    assert float(ramped[1][16]["up_proj"]["upper"]) == pytest.approx(0.999 * ema15, rel=1e-6)
    ema15 = float(inert[1][15]["up_proj"]["ema"])
    assert float(inert[1][16]["up_proj"]["upper"]) == pytest.approx(0.7 * ema15, rel=1e-6)


def test_recipe_overrides_go_to_the_options_or_the_keywords() -> None:
    traj = _trajectory(12)
    got = _run(presets.lora_sft(12, ema_beta=0.9, ema_init="first", nonfinite="skip"), traj)
    want = from_reference_options(
        dict(LORA, ema_beta=0.9), total_steps=12, ema_init="first", nonfinite="skip"
    )
    _assert_same_trajectory(got, _run(want, traj))
    gh = {"q_proj": {"high_mult": 1.5}}
    got = _run(presets.grpo(variant="paper", group_hyperparams=gh), traj)
    want = from_reference_options(GRPO, variant="paper", group_hyperparams=gh)
    _assert_same_trajectory(got, _run(want, traj))
    with pytest.raises(ValueError, match=r"presets.lora_sft: unknown override 'beta'"):
        presets.lora_sft(10, beta=0.9)


# --- global-norm clipping ----------------------------------------------------------------


def _tree(rng: np.random.Generator, dtype) -> dict:
    return {
        "a": jnp.asarray(rng.normal(size=(7, 5)), dtype),
        "b": {
            "c": jnp.asarray(rng.normal(size=(3,)), dtype),
            "d": jnp.asarray(rng.normal(), dtype),
        },
    }


def _scaled(tree: dict, factor: float) -> dict:
    return jax.tree.map(lambda x: x * jnp.asarray(factor, x.dtype), tree)


def _norm64(tree: dict) -> float:
    return math.sqrt(
        sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in jax.tree.leaves(tree))
    )


@pytest.mark.parametrize("max_norm", [1.0, 0.05, 30.0])
def test_global_norm_is_clip_by_global_norm_in_float32(max_norm: float) -> None:
    rng = np.random.default_rng(0)
    ours, theirs = presets.global_norm(max_norm), optax.clip_by_global_norm(max_norm)
    state = ours.init(_tree(rng, jnp.float32))
    update, clip = jax.jit(ours.update), jax.jit(theirs.update)
    clipped = 0
    for ratio in (0.01, 0.5, 0.999, 1.5, 2.0, 1e3, 1e6):
        g = _tree(rng, jnp.float32)
        g = _scaled(g, ratio * max_norm / _norm64(g))
        a, state = update(g, state)
        b, _ = clip(g, None)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            # a few float32 roundings apart (the eps terms are far below float32's ulp)
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=0)
        clipped += ratio > 1
        assert int(group_stats(state)["global"]["clip_down_count"]) == clipped
    assert list(group_stats(state)) == ["global"]


def test_global_norm_is_clip_by_global_norm_in_float64_up_to_eps() -> None:
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        ours, theirs = presets.global_norm(1.0), optax.clip_by_global_norm(1.0)
        state = ours.init(_tree(rng, jnp.float64))
        update, clip = jax.jit(ours.update), jax.jit(theirs.update)
        for ratio in (0.5, 1.5, 1e3):
            g = _tree(rng, jnp.float64)
            g = _scaled(g, ratio / _norm64(g))
            a, state = update(g, state)
            b, _ = clip(g, None)
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
                assert x.dtype == jnp.float64
                # eps / max_norm = 1e-12 plus a few float64 ulps
                np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-12 + 1e-15)
        # the eps band: norm = max_norm (1 + 5e-13); optax scales by 1 / norm, AGGC's
        # `norm > upper + eps` leaves it alone; they differ by less than eps / max_norm
        g = _tree(rng, jnp.float64)
        g = _scaled(g, (1 + 5e-13) / _norm64(g))
        a, _ = update(g, state)
        b, _ = clip(g, None)
        for x, y, z in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(g)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(z))
            assert not np.array_equal(np.asarray(y), np.asarray(z))
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-12)


def test_global_norm_bad_max_norm() -> None:
    with pytest.raises(ValueError, match=r"max_norm must be > 0, got 0.0"):
        presets.global_norm(0.0)
    with pytest.raises(ValueError, match="max_norm must be in"):
        presets.global_norm(-1.0)


# --- AdaGC-style per-tensor clipping -------------------------------------------------------


def _adagc_model(traj: list[dict], lam: float, beta: float) -> list[dict[str, np.ndarray]]:
    """AdaGC's per-tensor rule (Wang et al. 2025), float64, after a one-step warm-up
    with no absolute threshold: h = 1 and gamma = min(inf, |g|) = |g| at the first step;
    then h = min(lam * gamma / |g|, 1), g <- h g, gamma <- beta gamma + (1 - beta) |h g|."""
    gamma: dict[str, float] = {}
    outs = []
    for t, g in enumerate(traj):
        out = {}
        for path, leaf in jax.tree_util.tree_leaves_with_path(g):
            name = jax.tree_util.keystr(path)
            x = np.asarray(leaf, np.float64)
            n = math.sqrt(float(np.sum(x * x)))
            if t == 0:
                h = 1.0
                gamma[name] = n
            else:
                h = min(lam * gamma[name] / n, 1.0)
                gamma[name] = beta * gamma[name] + (1 - beta) * h * n
            out[name] = x * h
        outs.append(out)
    return outs


def test_adagc_matches_a_numpy_model_of_the_per_tensor_rule() -> None:
    rng = np.random.default_rng(4)
    traj = []
    for t in range(25):
        g = {
            "encoder": {
                "w": rng.normal(size=(6, 5)) * (20.0 if t in (6, 7) else 1.0),
                "b": rng.normal(size=(5,)) * 0.1,
            },
            "head": rng.normal(size=(5, 3)) * (1.0 + 0.05 * t) * (50.0 if t == 15 else 1.0),
        }
        traj.append(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), g))
    tx = presets.adagc(rel_threshold=1.05, ema_beta=0.9)
    want = _adagc_model(traj, 1.05, 0.9)
    state = tx.init(traj[0])
    update = jax.jit(tx.update)
    for g, w in zip(traj, want):
        out, state = update(g, state)
        for path, leaf in jax.tree_util.tree_leaves_with_path(out):
            name = jax.tree_util.keystr(path)
            np.testing.assert_allclose(np.asarray(leaf), w[name], rtol=3e-6)
    stats = group_stats(state)
    assert list(stats) == ["encoder.b", "encoder.w", "head"]  # one group per tensor
    clipped = sum(int(s["clip_down_count"]) for s in stats.values())
    assert clipped >= 3 and all(int(s["raise_count"]) == 0 for s in stats.values())


def test_adagc_with_a_zero_start_has_the_reference_warmup() -> None:
    # steady norm 5: step 0 untouched (upper 0), EMA 0.1 * 5; step 1 upper 1.05 * 0.5
    g = {"w": jnp.asarray([3.0, 4.0])}
    tx = presets.adagc(ema_beta=0.9, ema_init="zero")
    state = tx.init(g)
    for _ in range(2):
        _, state = tx.update(g, state)
    assert float(group_stats(state)["w"]["scale"]) == pytest.approx(1.05 * 0.1, rel=1e-5)
    with pytest.raises(ValueError, match="rel_threshold must be > 0"):
        presets.adagc(rel_threshold=0.0)
