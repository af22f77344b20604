"""optax's own tests of ``clip_by_global_norm``, rewritten for ``presets.global_norm``.

The cases follow what optax 0.2.8 tests about its global-norm clip
(``optax/transforms/_clipping_test.py``: repeated clipping to ``1 / i``;
``optax/schedules/_inject_test.py``: an injected ``max_norm`` under ``jax.jit``;
``optax/_src/float64_test.py``: mixed float32/float64 leaves keep their dtypes),
and every array that file feeds to a clipper. Each case checks the property
optax checks and, on the same input, that ``presets.global_norm`` agrees with
``optax.clip_by_global_norm``. Where the two deliberately differ (NaN/inf
entries, float32 overflow, float16 sums) the difference is the one documented
in the ``global_norm`` docstring and ``docs/reliability.md``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aggc_optax import presets

UPDATES = (jnp.array([500.0, 5.0]), jnp.array([300.0, 3.0]))
PARAMS = (jnp.array([1.0, 2.0]), jnp.array([3.0, 4.0]))
STEPS = 50


def _aggc(max_norm: float, g: Any) -> Any:
    tx = presets.global_norm(max_norm)
    return tx.update(g, tx.init(g))[0]


def _optax(max_norm: float, g: Any) -> Any:
    return optax.clip_by_global_norm(max_norm).update(g, optax.EmptyState())[0]


def _assert_trees_close(a: Any, b: Any, rtol: float = 1e-6, atol: float = 0.0) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_repeated_clipping_to_one_over_i() -> None:
    # optax: clip the previous output to 1 / i for i = 1..50; the norm is 1 / i to
    # 6 places, and clipping the original updates gives the same result
    updates = UPDATES
    for i in range(1, STEPS + 1):
        updates = _aggc(1.0 / i, updates)
        assert float(optax.tree.norm(updates)) == pytest.approx(1.0 / i, abs=5e-7)
        _assert_trees_close(updates, _aggc(1.0 / i, UPDATES), rtol=1e-5)
        # the same step through optax, from the same input
        _assert_trees_close(_aggc(1.0 / i, UPDATES), _optax(1.0 / i, UPDATES), rtol=1e-6)


def test_repeated_clipping_follows_optax_step_by_step() -> None:
    ours, theirs = UPDATES, UPDATES
    for i in range(1, STEPS + 1):
        ours, theirs = _aggc(1.0 / i, ours), _optax(1.0 / i, theirs)
        _assert_trees_close(ours, theirs, rtol=1e-5)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_injected_max_norm_overridden_between_steps(jit: bool) -> None:
    # optax: inject_hyperparams(clip_by_global_norm)(0.1), then max_norm = i for
    # i = 0..4 on ones((3, 5, 7)): the output norm is i (0 included: zeros)
    params = jnp.zeros((3, 5, 7))
    grads = jnp.ones_like(params)
    ours = optax.inject_hyperparams(presets.global_norm)(0.1)
    theirs = optax.inject_hyperparams(optax.clip_by_global_norm)(0.1)
    ours_state, theirs_state = ours.init(params), theirs.init(params)
    ours_update = jax.jit(ours.update) if jit else ours.update
    theirs_update = jax.jit(theirs.update) if jit else theirs.update
    for i in range(5):
        ours_state.hyperparams["max_norm"] = jnp.asarray(float(i))
        theirs_state.hyperparams["max_norm"] = jnp.asarray(float(i))
        out, ours_state = ours_update(grads, ours_state)
        want, theirs_state = theirs_update(grads, theirs_state)
        assert float(jnp.linalg.norm(out.ravel())) == pytest.approx(i, rel=1e-6)
        _assert_trees_close(out, want, rtol=1e-6)


def test_mixed_float32_float64_leaves_keep_their_dtypes() -> None:
    # optax's float64 test: a float32 and a float64 leaf under x64
    with jax.enable_x64(True):
        g = (jnp.array([1.0, 2.0], jnp.float32), jnp.array([3.0, 4.0], jnp.float64))
        out, want = _aggc(1.0, g), _optax(1.0, g)
        assert [x.dtype for x in out] == [jnp.float32, jnp.float64]
        _assert_trees_close(out, want, rtol=1e-6)
        assert float(optax.tree.norm(out)) == pytest.approx(1.0, rel=1e-6)


# Every array optax's clipping tests feed to a clipper, each as a tree of its own.
INPUTS = {
    "per_step_updates": UPDATES,
    "init_params": PARAMS,
    "conv3d_grad": jnp.ones((2, 2, 2, 3, 4)) * 2.0,
    "linear_grad": jnp.ones((5, 6)) * 3.0,
    "small_conv3d_grad": jnp.ones((2, 2, 2, 3, 4)) * 0.1,
    "arange_5d": jnp.arange(2 * 2 * 2 * 3 * 4, dtype=jnp.float32).reshape(2, 2, 2, 3, 4),
    "matrix_2x2": [jnp.array([[1.0, 2.0], [3.0, 4.0]])],
    "per_example": [
        jnp.array([[0, -0.5], [3, 4], [5, 6], [0, 0]], jnp.float32),
        jnp.array([[0], [5], [-3], [0]], jnp.float32),
    ],
    "per_layer": [
        jnp.array([[0.5], [1.5], [-2.0], [3.0]]),
        jnp.ones([4, 3, 3, 2], dtype=jnp.float32),
    ],
    "zeros": (jnp.zeros(3), jnp.zeros((2, 2))),
}


@pytest.mark.parametrize("max_norm", [1e-3, 0.5, 1.0, 7.0, 1e6])
@pytest.mark.parametrize("name", list(INPUTS))
def test_agrees_with_optax_on_every_input(name: str, max_norm: float) -> None:
    g = INPUTS[name]
    out, want = _aggc(max_norm, g), _optax(max_norm, g)
    _assert_trees_close(out, want, rtol=1e-6, atol=1e-7 * max_norm)
    norm_in = float(optax.tree.norm(g))
    expected = min(norm_in, max_norm)
    assert float(optax.tree.norm(out)) == pytest.approx(expected, rel=1e-6, abs=1e-12)


# ---------------------------------------------------------------------------
# Deliberate differences (the global_norm docstring, docs/reliability.md).


def test_nan_entry_passes_through_where_optax_returns_nan() -> None:
    g = (jnp.array([jnp.nan, 5.0]), jnp.array([300.0, 3.0]))
    out, want = _aggc(1.0, g), _optax(1.0, g)
    for x, y in zip(out, g):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert all(np.all(np.isnan(np.asarray(x))) for x in want)


def test_inf_entry_passes_through_where_optax_returns_nan_and_zeros() -> None:
    g = (jnp.array([jnp.inf, 5.0]), jnp.array([300.0, 3.0]))
    out, want = _aggc(1.0, g), _optax(1.0, g)
    for x, y in zip(out, g):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(want[0]), [np.nan, 0.0])
    np.testing.assert_array_equal(np.asarray(want[1]), [0.0, 0.0])


def test_float32_overflow_is_clipped_where_optax_returns_zeros() -> None:
    g = (jnp.array([1e20, 1e20]), jnp.array([1.0, 2.0]))
    out, want = _aggc(1.0, g), _optax(1.0, g)
    assert float(optax.tree.norm(out)) == pytest.approx(1.0, rel=1e-6)
    for x in want:
        np.testing.assert_array_equal(np.asarray(x), 0.0)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_sums_in_float32(dtype: Any) -> None:
    # float16 squares of 300 overflow float16's 65504: optax's norm is inf and it
    # returns zeros; AGGC sums in float32 and clips to the bound
    g = (jnp.array([300.0, 300.0], dtype), jnp.array([3.0, 4.0], dtype))
    out, want = _aggc(1.0, g), _optax(1.0, g)
    assert [x.dtype for x in out] == [dtype, dtype]
    norm = float(optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), out)))
    assert norm == pytest.approx(1.0, rel=1e-2)  # the outputs' own half-precision rounding
    if dtype == jnp.float16:
        for x in want:
            np.testing.assert_array_equal(np.asarray(x, np.float32), 0.0)
    else:  # bfloat16 has float32's range: optax clips too, to bfloat16 rounding
        _assert_trees_close(
            jax.tree.map(lambda x: x.astype(jnp.float32), out),
            jax.tree.map(lambda x: x.astype(jnp.float32), want),
            rtol=1e-2,
        )


def test_small_float16_tree_agrees_with_optax() -> None:
    # below float16's overflow the two agree to float16 rounding
    g = (jnp.array([5.0, 5.0], jnp.float16), jnp.array([3.0, 4.0], jnp.float16))
    out, want = _aggc(1.0, g), _optax(1.0, g)
    _assert_trees_close(
        jax.tree.map(lambda x: x.astype(jnp.float32), out),
        jax.tree.map(lambda x: x.astype(jnp.float32), want),
        rtol=2e-3,
    )
