"""aggc(): docs/reference-behaviour.md §3-§4, checked by hand and against tests/spec_model.py."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aggc_optax
from aggc_optax import aggc, group_stats
from tests.spec_model import SpecClipper, aggc_options, spec_label

Q = "model.layers.0.self_attn.q_proj.weight"
K = "model.layers.0.self_attn.k_proj.weight"
Q1 = "model.layers.1.self_attn.q_proj.weight"
UP = "model.layers.0.mlp.up_proj.weight"
NORM = "model.norm.weight"

# A plain interval [0.5, 2] x EMA with raising, no caps, the reference's zero start.
PLAIN = dict(ema_beta=0.9, low_mult=0.5, high_mult=2.0, min_norm=0.0, ema_init="zero")
# The same without raising (no lower bound given).
NO_RAISE = dict(ema_beta=0.9, high_mult=2.0, ema_init="zero")
STATIC = dict(ema_beta=0.9, ema_init="zero")  # auto_bounds=False refuses a high_mult


def _grads(scales: dict[str, float], seed: int = 0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    shapes = {Q: (4, 3), K: (4, 3), Q1: (4, 3), UP: (3, 5), NORM: (4,)}
    return {
        n: jnp.asarray(rng.normal(size=shapes[n]) * scales.get(n, 1.0), jnp.float32) for n in shapes
    }


def _norm(*arrays: jax.Array) -> float:
    return math.sqrt(sum(float(np.sum(np.asarray(a, np.float64) ** 2)) for a in arrays))


def _run(tx: optax.GradientTransformation, steps: list[dict[str, jax.Array]], jit: bool = True):
    state = tx.init(steps[0])
    update = jax.jit(tx.update) if jit else tx.update
    outs = []
    for g in steps:
        out, state = update(g, state)
        outs.append((out, group_stats(state)))
    return outs, state


def test_step_zero_never_clips_down_and_raises_below_min_norm() -> None:
    g = {Q: jnp.full((2, 2), 100.0), UP: jnp.full((2, 2), 1e-4)}
    tx = aggc(**{**PLAIN, "min_norm": 0.05})
    (out, stats), *_ = _run(tx, [g])[0]
    # EMA starts at 0: upper = 0, so the huge group is untouched...
    assert stats["q_proj"]["upper"] == 0.0
    assert stats["q_proj"]["scale"] == 1.0
    np.testing.assert_array_equal(out[Q], g[Q])
    # ...and lower = min_norm raises the tiny one (norm 2e-4) to 0.05, x250
    assert float(stats["up_proj"]["lower"]) == pytest.approx(0.05)
    assert float(stats["up_proj"]["scale"]) == pytest.approx(0.05 / 2e-4, rel=1e-6)
    assert _norm(out[UP]) == pytest.approx(0.05, rel=1e-6)


def test_warmup_with_beta_09_clips_everything_to_about_a_fifth() -> None:
    g = _grads({})
    outs, _ = _run(aggc(**PLAIN), [g, g])
    stats1 = outs[1][1]
    for label in ("q_proj", "k_proj", "up_proj", "norm"):
        # step 0: scale 1, EMA = 0.1 * n; step 1: upper = 2 * 0.1 * n = 0.2 n
        assert float(stats1[label]["scale"]) == pytest.approx(0.2, rel=1e-6)


def test_each_branch_and_cap_by_hand() -> None:
    g0 = {Q: jnp.array([3.0, 4.0]), UP: jnp.array([3.0, 4.0])}  # norms 5 and 5
    g1 = {Q: jnp.array([30.0, 40.0]), UP: jnp.array([0.03, 0.04])}  # 50 and 0.05
    caps = dict(PLAIN, max_down_scale=0.9, max_up_scale=1.1)
    outs, _ = _run(aggc(**PLAIN), [g0, g1])
    _, capped_state = _run(aggc(**caps), [g0, g1])
    s = outs[1][1]
    # EMA after step 0: 0.1 * 5 = 0.5; bounds [0.25, 1.0]
    assert float(s["q_proj"]["upper"]) == pytest.approx(1.0, rel=1e-6)
    assert float(s["q_proj"]["lower"]) == pytest.approx(0.25, rel=1e-6)
    assert float(s["q_proj"]["scale"]) == pytest.approx(1.0 / 50.0, rel=1e-6)
    assert float(s["up_proj"]["scale"]) == pytest.approx(0.25 / 0.05, rel=1e-6)
    assert _norm(outs[1][0][Q]) == pytest.approx(1.0, rel=1e-6)
    assert _norm(outs[1][0][UP]) == pytest.approx(0.25, rel=1e-6)
    # the EMA is fed norm * scale: 0.9 * 0.5 + 0.1 * 1.0
    assert float(s["q_proj"]["ema"]) == pytest.approx(0.55, rel=1e-6)
    assert float(s["up_proj"]["ema"]) == pytest.approx(0.45 + 0.1 * 0.25, rel=1e-6)
    c = group_stats(capped_state)
    # the floor and the ceiling
    assert float(c["q_proj"]["scale"]) == pytest.approx(0.9)
    assert float(c["up_proj"]["scale"]) == pytest.approx(1.1)
    assert int(c["q_proj"]["clip_down_count"]) == 1 and int(c["q_proj"]["raise_count"]) == 0
    assert int(c["up_proj"]["raise_count"]) == 1 and int(c["up_proj"]["clip_down_count"]) == 0


def test_raise_small_off_leaves_small_groups_alone() -> None:
    g0 = {UP: jnp.array([3.0, 4.0])}
    g1 = {UP: jnp.array([0.03, 0.04])}
    outs, _ = _run(aggc(**NO_RAISE), [g0, g1])
    assert float(outs[1][1]["up_proj"]["scale"]) == 1.0
    np.testing.assert_array_equal(outs[1][0][UP], g1[UP])


def test_inverted_interval_has_no_untouched_region() -> None:
    # low 1.5 > high 0.5: above upper -> down; at or below upper -> raised to lower
    g0 = {Q: jnp.array([6.0, 8.0])}  # EMA -> 0.1 * 10 = 1; bounds [1.5, 0.5]
    inverted = dict(PLAIN, low_mult=1.5, high_mult=0.5)
    for value, want_scale in ((0.6, 0.5 / 0.6), (0.5, 1.5 / 0.5), (0.1, 1.5 / 0.1)):
        g1 = {Q: jnp.array([value, 0.0])}
        outs, _ = _run(aggc(**inverted), [g0, g1])
        assert float(outs[1][1]["q_proj"]["scale"]) == pytest.approx(want_scale, rel=1e-6)


def test_all_zero_group_has_norm_1e_8_and_feeds_the_ema_its_intended_norm() -> None:
    g = {Q: jnp.zeros((3, 3)), UP: jnp.ones((2,))}
    tx = aggc(**dict(PLAIN, min_norm=0.05))
    (out, stats), *_ = _run(tx, [g])[0]
    assert float(stats["q_proj"]["norm"]) == pytest.approx(1e-8, rel=1e-6)
    # raised with scale min_norm / (1e-8 + eps): the eps shows at this size
    assert float(stats["q_proj"]["scale"]) == pytest.approx(0.05 / (1e-8 + 1e-12), rel=1e-6)
    # the tensors stay zero...
    np.testing.assert_array_equal(out[Q], np.zeros((3, 3)))
    # ...but the EMA gets norm * scale = 0.05, not the clipped tensors' norm 0
    want_ema = 0.1 * 1e-8 * 0.05 / (1e-8 + 1e-12)
    assert float(stats["q_proj"]["ema"]) == pytest.approx(want_ema, rel=1e-6)


def test_static_bounds_still_update_the_ema() -> None:
    g = {Q: jnp.array([3.0, 4.0])}
    tx = aggc(**dict(STATIC, auto_bounds=False, min_norm=1.0, max_norm=2.0))
    outs, _ = _run(tx, [g, g])
    for _, stats in outs:
        assert float(stats["q_proj"]["upper"]) == 2.0
        assert float(stats["q_proj"]["lower"]) == 1.0
        assert float(stats["q_proj"]["scale"]) == pytest.approx(2.0 / 5.0, rel=1e-6)
    # EMA: 0.1 * 2, then 0.9 * 0.2 + 0.1 * 2
    assert float(outs[1][1]["q_proj"]["ema"]) == pytest.approx(0.38, rel=1e-6)


def test_multiply_is_in_the_gradient_dtype_bit_for_bit() -> None:
    rng = np.random.default_rng(3)
    g0 = {Q: jnp.asarray(rng.normal(size=(64,)), jnp.float32)}
    g1 = {Q: jnp.asarray(rng.normal(size=(64,)) * 37.0, jnp.float32)}
    outs, _ = _run(aggc(**PLAIN), [g0, g1])
    scale = outs[1][1]["q_proj"]["scale"]
    assert scale.dtype == jnp.float32
    want = np.asarray(g1[Q]) * np.float32(scale)
    np.testing.assert_array_equal(np.asarray(outs[1][0][Q]), want)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_gradients_keep_their_dtype(dtype: jnp.dtype) -> None:
    g0 = {Q: jnp.full((8,), 1.0, dtype)}
    g1 = {Q: jnp.full((8,), 30.0, dtype)}
    outs, _ = _run(aggc(**PLAIN), [g0, g1])
    out = outs[1][0][Q]
    assert out.dtype == dtype
    # per-tensor sums in float32: norm of 8 x 30 = 84.85..., no float16 overflow
    assert float(outs[1][1]["q_proj"]["norm"]) == pytest.approx(30 * math.sqrt(8), rel=1e-6)
    scale = float(outs[1][1]["q_proj"]["scale"])
    assert float(out[0]) == pytest.approx(30 * scale, rel=1e-2)


def _spike_trajectory(steps: int = 24) -> list[dict[str, jax.Array]]:
    traj = []
    for t in range(steps):
        scales = {Q: 1.0, K: 0.5, Q1: 1.2, UP: 2.0, NORM: 0.01}
        if t in (6, 7):
            scales[Q1] = 80.0  # a spike in one tensor of the q_proj group
        if t == 11:
            scales[UP] = 500.0  # a whole-group spike
        if t == 15:
            scales[K] = 0.0  # an all-zero group step
        traj.append(_grads(scales, seed=t))
    return traj


@pytest.mark.parametrize(
    "hyper",
    [
        PLAIN,
        dict(PLAIN, max_down_scale=0.9, max_up_scale=1.1, min_norm=0.01),
        dict(ema_beta=0.95, high_mult=0.6, max_down_scale=0.9, ema_init="zero"),  # LoRA-like
        dict(STATIC, auto_bounds=False, min_norm=0.5, max_norm=3.0),
        dict(PLAIN, low_mult=0.98, high_mult=1.02, ema_beta=0.5),  # a tiny window
    ],
)
def test_multi_step_trajectory_matches_the_float64_model(hyper: dict) -> None:
    traj = _spike_trajectory()
    tx = aggc(**hyper)
    options = aggc_options(**hyper)
    assert options.pop("ema_init") == "zero"  # the model starts at 0, as the reference
    model = SpecClipper(**options)
    labels = {n: spec_label(n) for n in traj[0]}
    outs, _ = _run(tx, traj)
    branches = 0
    for t, (g, (out, stats)) in enumerate(zip(traj, outs)):
        want_out, want_stats = model.step({n: np.asarray(a) for n, a in g.items()}, labels, t)
        for label, ws in want_stats.items():
            gs = stats[label]
            for f in ("norm", "lower", "upper", "scale"):
                np.testing.assert_allclose(float(gs[f]), ws[f], rtol=2e-6, atol=1e-30)
            np.testing.assert_allclose(float(gs["ema"]), model.ema[label], rtol=2e-6)
            # the same branch on every (step, group)
            want_branch = np.sign(ws["scale"] - 1.0) if ws["scale"] != 1.0 else 0.0
            got_branch = np.sign(float(gs["scale"]) - 1.0) if float(gs["scale"]) != 1.0 else 0.0
            assert want_branch == got_branch, (t, label)
            branches += want_branch != 0
        for n in g:
            np.testing.assert_allclose(np.asarray(out[n]), want_out[n], rtol=3e-6, atol=1e-30)
    assert branches > 0  # the trajectory really exercised clipping


def test_jit_and_no_jit_agree() -> None:
    traj = _spike_trajectory(8)
    jitted, s1 = _run(aggc(**PLAIN), traj, jit=True)
    eager, s2 = _run(aggc(**PLAIN), traj, jit=False)
    for (o1, _), (o2, _) in zip(jitted, eager):
        chex.assert_trees_all_close(o1, o2, rtol=1e-6)
    chex.assert_trees_all_close(s1.ema, s2.ema, rtol=1e-6)
    chex.assert_trees_all_equal(s1.clip_down_count, s2.clip_down_count)


def test_eps_edges_in_float64() -> None:
    with jax.enable_x64(True):
        # step 0 sets EMA = 0.1 * 10 = 1 (beta 0.9), so upper = high_mult * 1 = 1
        hyper = dict(NO_RAISE, high_mult=1.0)
        g0 = {Q: jnp.array([10.0], jnp.float64)}
        for delta, clipped in ((5e-13, False), (2e-12, True)):
            g1 = {Q: jnp.array([1.0 + delta], jnp.float64)}
            outs, state = _run(aggc(**hyper), [g0, g1])
            stats = outs[1][1]["q_proj"]
            assert state.ema.dtype == jnp.float64
            upper = float(stats["upper"])
            assert upper == pytest.approx(1.0, abs=1e-15)
            norm = math.sqrt((1.0 + delta) ** 2 + 1e-16)
            want = upper / (norm + 1e-12) if clipped else 1.0
            assert float(stats["scale"]) == want
            assert outs[1][0][Q].dtype == jnp.float64
        assert 0.999999999996 < want < 0.999999999998  # "0.999999999997-ish"


def test_clip_down_scale_is_never_exactly_upper_over_norm() -> None:
    with jax.enable_x64(True):
        g0 = {Q: jnp.array([10.0], jnp.float64)}
        g1 = {Q: jnp.array([4.0], jnp.float64)}
        outs, _ = _run(aggc(**PLAIN), [g0, g1])
        s = outs[1][1]["q_proj"]
        assert float(s["scale"]) != float(s["upper"]) / float(s["norm"])
        assert float(s["scale"]) == float(s["upper"]) / (float(s["norm"]) + 1e-12)


def test_composes_in_optax_chain_with_an_optimizer() -> None:
    traj = _spike_trajectory(5)
    clip_only, _ = _run(aggc(**PLAIN), traj)
    chained = optax.chain(aggc(**PLAIN), optax.sgd(0.1))
    outs, state = _run(chained, traj)
    for (clipped, _), (update, _) in zip(clip_only, outs):
        chex.assert_trees_all_close(update, jax.tree.map(lambda x: -0.1 * x, clipped), rtol=1e-6)
    assert set(group_stats(state)) == {"q_proj", "k_proj", "up_proj", "norm"}


def _nested_states(g: dict[str, jax.Array]) -> dict[str, object]:
    """One AGGC inside each of optax's wrappers, after one update."""
    mask = {n: n != NORM for n in g}
    labels = {n: "clip" if n != NORM else "plain" for n in g}
    wrappers = {
        "chain": optax.chain(optax.identity(), aggc(**PLAIN), optax.adam(1e-3)),
        "multi_steps": optax.MultiSteps(optax.chain(aggc(**PLAIN), optax.sgd(1.0)), 1),
        "inject": optax.inject_hyperparams(aggc)(**PLAIN),
        "masked": optax.masked(aggc(**PLAIN), mask),
        "partition": optax.partition({"clip": aggc(**PLAIN), "plain": optax.identity()}, labels),
        "if_finite": optax.apply_if_finite(aggc(**PLAIN), 3),
    }
    states = {}
    for name, tx in wrappers.items():
        state = tx.init(g)
        _, state = jax.jit(tx.update)(g, state, g)
        states[name] = state
    return states


def test_group_stats_finds_the_state_in_every_optax_wrapper() -> None:
    g = _grads({})
    want_norm = _norm(g[Q], g[Q1])
    for name, state in _nested_states(g).items():
        stats = group_stats(state)
        assert float(stats["q_proj"]["norm"]) == pytest.approx(want_norm, rel=1e-6), name
        assert float(stats["q_proj"]["ema"]) == pytest.approx(0.1 * want_norm, rel=1e-6), name
        if name in ("masked", "partition"):
            assert "norm" not in stats, name  # masked out of AGGC entirely
        else:
            assert "norm" in stats, name
        assert optax.tree.get(state, "ema").shape == (len(stats),), name


def test_group_stats_errors() -> None:
    with pytest.raises(ValueError, match="no AGGC state found"):
        group_stats(optax.sgd(0.1).init({"a": jnp.ones(2)}))
    g = {Q: jnp.ones(2)}
    two = optax.chain(aggc(), aggc())
    with pytest.raises(ValueError, match="'q_proj' appears in two AGGC states"):
        group_stats(two.init(g))


def test_inject_hyperparams_changes_beta_and_multipliers_mid_run() -> None:
    g0 = {Q: jnp.array([3.0, 4.0])}
    g1 = {Q: jnp.array([30.0, 40.0])}
    tx = optax.inject_hyperparams(aggc)(**PLAIN)
    state = tx.init(g0)
    update = jax.jit(tx.update)
    _, state = update(g0, state)
    assert float(group_stats(state)["q_proj"]["ema"]) == pytest.approx(0.5, rel=1e-6)
    state.hyperparams["high_mult"] = jnp.asarray(4.0)
    state.hyperparams["ema_beta"] = jnp.asarray(0.5)
    _, state = update(g1, state)
    s = group_stats(state)["q_proj"]
    assert float(s["upper"]) == pytest.approx(2.0, rel=1e-6)  # 4.0 * 0.5
    assert float(s["scale"]) == pytest.approx(2.0 / 50.0, rel=1e-6)
    assert float(s["ema"]) == pytest.approx(0.5 * 0.5 + 0.5 * 2.0, rel=1e-6)


def test_schedules_are_evaluated_at_the_zero_based_step() -> None:
    seen: list[float] = []

    def high(count: jax.Array) -> jax.Array:
        return jnp.where(count < 1, 2.0, 4.0)

    g = {Q: jnp.array([3.0, 4.0])}
    outs, _ = _run(aggc(**dict(PLAIN, high_mult=high)), [g, g, g])
    for _, stats in outs:
        seen.append(float(stats["q_proj"]["upper"]))
    # step 0: EMA 0; step 1: upper 4.0 * 0.5 = 2, norm 5 clipped to 2; step 2: 4.0 * EMA_1
    ema1 = 0.9 * 0.5 + 0.1 * 2.0
    assert seen == pytest.approx([0.0, 2.0, 4.0 * ema1], rel=1e-6)


def test_nothing_labelled_is_an_error_for_aggc() -> None:
    with pytest.raises(ValueError, match="no parameter got a group label"):
        aggc().init({"logit_scale": jnp.ones(())})


def test_updates_with_a_different_structure_are_rejected() -> None:
    tx = aggc()
    state = tx.init({Q: jnp.ones(2)})
    with pytest.raises(ValueError, match=r"\['model'\] in the updates, \['q_proj'\] at init"):
        tx.update({"model.x": jnp.ones(2)}, state)


def test_labelled_integer_leaves_are_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"leaf 'model.layers.0.self_attn.q_proj.weight'.*int32"):
        aggc().init({Q: jnp.ones(2, jnp.int32)})


def test_reported_state_dtypes_and_shapes() -> None:
    g = _grads({})
    state = aggc().init(g)
    chex.assert_shape([state.ema, state.norm, state.lower, state.upper, state.scale], (4,))
    chex.assert_type([state.ema, state.scale], jnp.float32)
    chex.assert_type([state.count, state.clip_down_count, state.raise_count], jnp.int32)
    assert aggc_optax.AGGCState._fields[-1] == "labels"
    assert state.labels == ("up_proj", "k_proj", "q_proj", "norm")  # sorted dict keys


def test_ema_uses_one_minus_beta_computed_before_rounding() -> None:
    # beta = 0.999: float32(0.999) is off by 1.3e-8, so 1 - float32(beta) would be
    # off by 1.3e-5 relative; the spec computes 1 - beta in float64.
    g = {Q: jnp.array([3.0, 4.0])}
    (_, stats), *_ = _run(aggc(**dict(PLAIN, ema_beta=0.999)), [g])[0]
    assert float(stats["q_proj"]["ema"]) == pytest.approx(0.001 * 5.0, rel=1e-6)
