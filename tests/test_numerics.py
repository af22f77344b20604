"""aggc_optax._numerics: overflowing norms, non-finite entries, subnormals.

Expectations by hand computation, eager and under jax.jit.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aggc_optax
from aggc_optax import presets

JIT = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def _update(tx: Any, g: Any, state: Any, jit: bool) -> Any:
    return (jax.jit(tx.update) if jit else tx.update)(g, state)


# 1. overflowing norms: finite entries are clipped, NaN/inf keep their policy --


@JIT
def test_global_norm_clips_finite_entries_whose_squares_overflow(jit: bool) -> None:
    # the issue's case: norm sqrt(2) * 1e20, far above float32's sqrt(max) = 1.8e19
    g = {"a": jnp.array([1e20, 1e20]), "b": jnp.array([1.0, 2.0])}
    tx = presets.global_norm(1.0)
    out, state = _update(tx, g, tx.init(g), jit)
    np.testing.assert_allclose(float(optax.tree.norm(out)), 1.0, rtol=1e-6)
    # by hand: g / (sqrt(2) * 1e20)
    np.testing.assert_allclose(np.asarray(out["a"]), [2**-0.5, 2**-0.5], rtol=1e-6)
    want_b = [2**-0.5 * 1e-20, 2**0.5 * 1e-20]
    np.testing.assert_allclose(np.asarray(out["b"]), want_b, rtol=1e-6)
    np.testing.assert_allclose(float(state.norm[0]), 2**0.5 * 1e20, rtol=1e-6)


@JIT
def test_aggc_group_whose_squares_overflow_is_clipped(jit: bool) -> None:
    # A finite group whose float32 squares overflow gets its true norm: it is
    # clipped like any other (EMA fed the post-clip norm), the other group is
    # untouched and nothing in the state is non-finite.
    labels = {"q": "q", "k": "k"}
    tx = aggc_optax.aggc(high_mult=2.0, param_labels=labels)
    g0 = {"q": jnp.full((4,), 1.0), "k": jnp.full((4,), 1.0)}
    state = tx.init(g0)
    _, state = _update(tx, g0, state, jit)  # EMA starts at the first norm, 2 (by hand)
    q = list(state.labels).index("q")
    g1 = {"q": jnp.full((4,), 1e20), "k": jnp.full((4,), 1.0)}
    out, state = _update(tx, g1, state, jit)
    # norm 2e20 > 2 x 2: clipped to 4, each entry 1e20 x 4 / 2e20 = 2
    np.testing.assert_allclose(np.asarray(out["q"]), np.full(4, 2.0), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out["k"]), np.ones(4))
    np.testing.assert_allclose(float(state.norm[q]), 2e20, rtol=1e-6)
    np.testing.assert_allclose(float(state.ema[q]), 0.99 * 2 + 0.01 * 4, rtol=1e-6)
    assert int(state.ema_count[q]) == 2 and int(state.clip_down_count[q]) == 1
    for field in ("ema", "ema_residual", "lower", "upper", "scale"):
        assert np.all(np.isfinite(np.asarray(getattr(state, field)))), field


def test_overflowing_fault_sequence_matches_the_float64_model() -> None:
    # tests/test_faults.py's sequence with every entry of one q_proj tensor 1e20
    # at step 3. The spec's model overflows as the reference does, so it runs the
    # same sequence with 1e10 there: also clipped down to the upper bound, so the
    # EMA is fed the same value and every later step must agree with the model.
    from tests import test_faults as tf

    step = 3
    faulty = tf.with_fault(tf.SEQUENCE, step, "overflow")
    tamed = [dict(g) for g in faulty]
    tamed[step][tf.FAULT_LEAF] = np.full_like(faulty[step][tf.FAULT_LEAF], 1e10)
    got = tf.run("raise_no_caps", faulty)
    expected = tf.model_trajectory(tf.model_for("raise_no_caps"), tamed)
    for t in range(tf.STEPS):
        out, state = got[t]
        want, _, ema = expected[t]
        for i, label in enumerate(tf.GROUPS):
            np.testing.assert_allclose(state["ema"][i], ema[label], rtol=3e-6, err_msg=label)
        if t == step:
            continue
        for name in tf.SHAPES:
            np.testing.assert_allclose(out[name], want[name], rtol=3e-6, atol=0, err_msg=name)
    # the step itself, by hand: every q_proj entry times upper / norm (float64 norm)
    out, state = got[step]
    upper = 1.2 * got[step - 1][1]["ema"][tf.Q]
    q_leaves = [n for n in tf.SHAPES if tf.LABELS[n] == "q_proj"]
    norm = math.sqrt(sum(float(np.sum(faulty[step][n].astype(np.float64) ** 2)) for n in q_leaves))
    np.testing.assert_allclose(state["norm"][tf.Q], norm, rtol=1e-6)
    for name in q_leaves:
        want = faulty[step][name].astype(np.float64) * upper / norm
        np.testing.assert_allclose(out[name], want, rtol=3e-6, err_msg=name)
    np.testing.assert_allclose(state["ema"][tf.Q], 0.9 * upper / 1.2 + 0.1 * upper, rtol=3e-6)


def test_single_entry_at_float32_max_is_clipped() -> None:
    g = {"a": jnp.array([3e38, 1.0]), "b": jnp.array([1.0, 2.0])}
    tx = presets.global_norm(1e6)  # a bound that keeps the clipped entries normal floats
    out, state = tx.update(g, tx.init(g))
    np.testing.assert_allclose(float(state.norm[0]), 3e38, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["a"]), [1e6, 1e6 / 3e38], rtol=1e-5)


@JIT
def test_inf_entry_next_to_overflowing_entries_is_still_non_finite(jit: bool) -> None:
    # an all-finite group is clipped, the same group with one inf entry is a fault
    finite = {"a": jnp.array([1e20, 1e20]), "b": jnp.array([1.0, 2.0])}
    with_inf = {"a": jnp.array([jnp.inf, 1e20]), "b": jnp.array([1.0, 2.0])}
    tx = aggc_optax.aggc(param_labels=lambda name: "g", ema_init="zero")
    state = tx.init(finite)
    _, s_finite = _update(tx, finite, state, jit)
    out, s_inf = _update(tx, with_inf, state, jit)
    assert np.isfinite(float(s_finite.norm[0])) and int(s_finite.ema_count[0]) == 1
    assert np.isinf(float(s_inf.norm[0])) and int(s_inf.ema_count[0]) == 0
    np.testing.assert_array_equal(np.asarray(out["a"]), np.asarray(with_inf["a"]))  # untouched
    np.testing.assert_array_equal(np.asarray(out["b"]), [1.0, 2.0])


@pytest.mark.parametrize("entry", [np.nan, -np.inf])
def test_nan_or_minus_inf_next_to_overflowing_entries_is_non_finite(entry: float) -> None:
    g = {"a": jnp.array([entry, 1e20, 1e20])}
    tx = presets.global_norm(1.0)
    out, state = tx.update(g, tx.init(g))
    assert not np.isfinite(float(state.norm[0]))
    np.testing.assert_array_equal(np.asarray(out["a"]), np.asarray(g["a"]))


def test_norm_beyond_float32_range_is_non_finite() -> None:
    # sqrt(2) * 3e38 cannot be a float32: the group is non-finite and passes through
    g = {"a": jnp.array([3e38, 3e38])}
    tx = presets.global_norm(1.0)
    out, state = tx.update(g, tx.init(g))
    assert np.isinf(float(state.norm[0]))
    np.testing.assert_array_equal(np.asarray(out["a"]), np.asarray(g["a"]))


def test_reference_policy_keeps_the_reference_overflow() -> None:
    # nonfinite="reference" is the reference's float32 arithmetic: the norm is inf
    g = {"model": {"layers": {"0": {"q_proj": {"weight": jnp.full((2,), 1e20)}}}}}
    tx = aggc_optax.from_reference_options({"enable": True}, nonfinite="reference")
    _, state = tx.update(g, tx.init(g))
    assert np.isinf(float(state.norm[0]))


def test_float64_overflow_and_mixed_dtype_group() -> None:
    with jax.enable_x64(True):
        tx = aggc_optax.aggc(param_labels=lambda name: "g", auto_bounds=False, max_norm=1.0)
        # float64 squares overflow above 1.3e154
        g = {"a": jnp.array([1e200, 1e200], jnp.float64)}
        out, state = jax.jit(tx.update)(g, tx.init(g))
        np.testing.assert_allclose(float(state.norm[0]), 2**0.5 * 1e200, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(out["a"]), [2**-0.5] * 2, rtol=1e-12)
        # one group of a float64 and a float32 leaf; only the float32 sum overflows
        g = {"a": jnp.array([1e20, 1e20], jnp.float64), "b": jnp.array([1e20, 1e20], jnp.float32)}
        out, state = jax.jit(tx.update)(g, tx.init(g))
        np.testing.assert_allclose(float(state.norm[0]), 2e20, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(out["a"]), [0.5, 0.5], rtol=1e-6)
        np.testing.assert_allclose(np.asarray(out["b"]), [0.5, 0.5], rtol=1e-6)


# 2. subnormals ---------------------------------------------------------------


@JIT
def test_untouched_group_is_bit_identical_with_subnormals(jit: bool) -> None:
    tiny = np.float32(1e-40)  # subnormal in float32
    g = {"a": jnp.array([tiny, -tiny, 1.0], jnp.float32)}
    tx = presets.global_norm(10.0)
    out, state = _update(tx, g, tx.init(g), jit)
    assert float(state.scale[0]) == 1.0
    assert np.asarray(out["a"]).tobytes() == np.asarray(g["a"]).tobytes()
