"""Precision: half-precision and float64 gradients, and 100,000-step runs.

Expectations come from the float64 model of the spec in ``tests/spec_model.py``
(``SpecClipper`` for short runs, the vectorised ``spec_trajectory`` for long
ones) or from hand computation.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import scipy.signal

from aggc_optax import aggc, linear_bounds_schedule, presets
from tests.spec_model import SpecClipper, spec_label, spec_schedule, spec_trajectory, tensor_sq_sums

HALF = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def _one_group(dtype: Any, values: np.ndarray) -> dict[str, Any]:
    return {"model.layers.0.self_attn.q_proj.weight": jnp.asarray(values.astype(dtype))}


@pytest.mark.parametrize("dtype_name", sorted(HALF))
def test_half_precision_keeps_its_dtype_and_gets_the_exact_norm(dtype_name: str) -> None:
    dtype = HALF[dtype_name]
    name = "model.layers.0.self_attn.q_proj.weight"
    # 100 entries of 64: the sum of squares, 409600, is far above float16's max (65504)
    big = np.full((10, 10), 64.0)
    tx = presets.lora_sft(None)  # the recipe: at step 1 the group is clipped by the 0.9 floor
    model = SpecClipper(
        ema_beta=0.95,
        low_mult=0.95,
        high_mult=0.6,
        min_norm=0.01,
        auto_bounds=True,
        max_up_scale=1.1,
        max_down_scale=0.9,
    )
    state = tx.init(_one_group(dtype, big))
    update = jax.jit(tx.update)
    for t in range(3):
        grads = _one_group(dtype, big)
        out, state = update(grads, state)
        _, stats = model.step({name: np.asarray(grads[name])}, {name: "q_proj"}, t)
        assert out[name].dtype == dtype
        assert float(state.norm[0]) == 640.0 == stats["q_proj"]["norm"]
        scale = stats["q_proj"]["scale"]
        assert float(state.scale[0]) == pytest.approx(scale, rel=1e-6)
        # the rescale is done in float32 and rounded once to the gradient's dtype
        want = (big.astype(dtype).astype(np.float32) * np.float32(scale)).astype(dtype)
        np.testing.assert_array_equal(np.asarray(out[name]), want)
    assert float(state.scale[0]) == pytest.approx(0.9)


@pytest.mark.parametrize("dtype_name", sorted(HALF))
def test_half_precision_squares_that_underflow_still_count(dtype_name: str) -> None:
    dtype = HALF[dtype_name]
    small = np.full((10, 10), 1e-4).astype(dtype)
    # in the gradient's own dtype every square would underflow to 0 (float16)
    # or lose precision (bfloat16)
    assert dtype_name != "float16" or float((small * small)[0, 0]) == 0.0
    tx = aggc()
    state = tx.init(_one_group(dtype, small))
    _, state = jax.jit(tx.update)(_one_group(dtype, small), state)
    want = math.sqrt(100 * float(small[0, 0].astype(np.float64)) ** 2 + 1e-16)
    assert float(state.norm[0]) == pytest.approx(want, rel=1e-6)


def test_mixed_dtypes_in_one_group() -> None:
    rng = np.random.default_rng(0)
    dtypes = {
        "model.layers.0.self_attn.q_proj.weight": np.float16,
        "model.layers.1.self_attn.q_proj.weight": ml_dtypes.bfloat16,
        "model.layers.2.self_attn.q_proj.weight": np.float32,
    }
    labels = dict.fromkeys(dtypes, "q_proj")
    model = SpecClipper(ema_beta=0.5, low_mult=0.5, high_mult=0.8, auto_bounds=True)
    tx = aggc(ema_beta=0.5, high_mult=0.8, ema_init="zero")  # the model's, as raise_small=False
    state = tx.init({n: jnp.zeros(3, d) for n, d in dtypes.items()})
    update = jax.jit(tx.update)
    for t in range(4):
        grads = {n: (300.0 * rng.standard_normal(3)).astype(d) for n, d in dtypes.items()}
        out, state = update({n: jnp.asarray(g) for n, g in grads.items()}, state)
        _, stats = model.step(grads, labels, t)
        assert float(state.norm[0]) == pytest.approx(stats["q_proj"]["norm"], rel=1e-6)
        scale = np.float32(stats["q_proj"]["scale"])
        for n, d in dtypes.items():
            assert out[n].dtype == d
            want = (grads[n].astype(np.float32) * scale).astype(d)
            # one unit in the last place at most: the scale itself may differ in its last bit
            np.testing.assert_allclose(
                np.asarray(out[n]).astype(np.float64),
                want.astype(np.float64),
                rtol=2.0 ** (1 - ml_dtypes.finfo(d).nmant),
            )
    assert int(state.clip_down_count[0]) > 0


def test_float64_gradients_are_not_downcast() -> None:
    name = "model.layers.0.self_attn.q_proj.weight"
    beta, high = 0.5, 0.5
    with jax.enable_x64(True):
        # detail at 1e-12 that float32 would lose
        g = np.array([1.0 + 1e-12, 2.0 - 3e-12, -2.0 + 7e-13])
        assert not np.array_equal(g.astype(np.float32).astype(np.float64), g)
        tx = aggc(ema_beta=beta, high_mult=high, ema_init="zero")
        state = tx.init({name: jnp.zeros(3, jnp.float64)})
        update = jax.jit(tx.update)
        # step 0: the EMA is 0, nothing is clipped: the gradients come back bit for bit
        out, state = update({name: jnp.asarray(g)}, state)
        assert out[name].dtype == jnp.float64
        assert state.ema.dtype == state.norm.dtype == jnp.float64
        np.testing.assert_array_equal(np.asarray(out[name]), g)
        norm = math.sqrt(float(np.sum(g * g)) + 1e-16)
        assert float(state.norm[0]) == pytest.approx(norm, rel=1e-15)
        # step 1: clipped down to 0.5 * EMA, in float64
        ema = (1 - beta) * norm
        out, state = update({name: jnp.asarray(g)}, state)
        scale = high * ema / (norm + 1e-12)
        assert float(state.scale[0]) == pytest.approx(scale, rel=1e-15)
        np.testing.assert_allclose(np.asarray(out[name]), g * scale, rtol=1e-15)


# ---------------------------------------------------------------------------
# 100,000 steps under jax.lax.scan

LONG_STEPS = 100_000
LONG_SHAPES = {
    "model.layers.0.self_attn.q_proj.weight": (4, 4),
    "model.layers.1.self_attn.q_proj.weight": (4, 4),
    "model.layers.0.mlp.down_proj.weight": (8,),
    "model.layers.0.input_layernorm.weight": (3,),
    "model.norm.weight": (5,),
}
# each group's typical norm: a spread of 5 orders of magnitude
LONG_LEVELS = {"q_proj": 1.0, "down_proj": 30.0, "input_layernorm": 1e-4, "norm": 0.5}


def _long_gradients() -> dict[str, np.ndarray]:
    """A realistic gradient process, one array ``[T, *shape]`` per leaf.

    Per leaf: a level that decays like ``(1 + t / 20000) ** -0.5``, AR(1)
    log-normal noise (correlation 0.9, sigma 0.3), 8x-100x spikes on 0.1% of
    the steps, random directions. ``model.norm.weight`` is constant, and
    ``input_layernorm`` (norm ~1e-4) is all zero for steps 30,000 to 60,000.
    """
    rng = np.random.default_rng(1234)
    t = np.arange(LONG_STEPS)
    phi = 0.9
    grads = {}
    for name, shape in LONG_SHAPES.items():
        label = spec_label(name)
        noise = scipy.signal.lfilter(
            [math.sqrt(1 - phi**2)], [1, -phi], rng.standard_normal(t.size)
        )
        spikes = np.where(rng.random(t.size) < 1e-3, rng.uniform(8, 100, t.size), 1.0)
        target = LONG_LEVELS[label] * (1 + t / 20000) ** -0.5 * np.exp(0.3 * noise) * spikes
        direction = rng.standard_normal((t.size, *shape))
        axes = tuple(range(1, direction.ndim))
        direction /= np.sqrt(np.sum(direction**2, axis=axes, keepdims=True))
        grads[name] = (direction * target.reshape(-1, *[1] * len(shape))).astype(np.float32)
    grads["model.norm.weight"][:] = np.float32(0.5)
    grads["model.layers.0.input_layernorm.weight"][30_000:60_000] = 0.0
    return grads


LONG_CONFIGS = {
    # the authors' LoRA SFT recipe, with its linear schedule
    "lora": {
        "ema_beta": 0.95,
        "low": (0.95, 0.98),
        "high": (0.6, 0.7),
        "switch": 0.4,
        "transition": 0.3,
        "min_norm": 0.01,
        "raise_small": False,
        "max_up_scale": 1.1,
        "max_down_scale": 0.9,
    },
    # the authors' GRPO recipe, with its linear schedule
    "grpo": {
        "ema_beta": 0.99,
        "low": (0.98, 0.98),
        "high": (0.7, 0.999),
        "switch": 0.6,
        "transition": 0.2,
        "min_norm": 0.0,
        "raise_small": True,
        "max_up_scale": 1.1,
        "max_down_scale": 0.9,
    },
    # a long EMA, no caps: where float32's resolution shows
    "beta0.999": {
        "ema_beta": 0.999,
        "low": (0.5, 0.5),
        "high": (2.0, 2.0),
        "switch": 0.5,
        "transition": 0.2,
        "min_norm": 1e-3,
        "raise_small": True,
        "max_up_scale": 0.0,
        "max_down_scale": 0.0,
    },
}


@pytest.fixture(scope="module")
def long_gradients() -> dict[str, np.ndarray]:
    return _long_gradients()


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(LONG_CONFIGS))
def test_100k_steps_under_scan_track_the_float64_model(
    config: str, long_gradients: dict[str, np.ndarray]
) -> None:
    c = LONG_CONFIGS[config]
    ramp = {"total_steps": LONG_STEPS, "switch_ratio": c["switch"]}
    ramp["transition_ratio"] = c["transition"]
    raising = {"low_mult": linear_bounds_schedule(*c["low"], **ramp), "min_norm": c["min_norm"]}
    raising["max_up_scale"] = c["max_up_scale"] or None  # 0 is "no cap"
    tx = aggc(
        ema_beta=c["ema_beta"],
        high_mult=linear_bounds_schedule(*c["high"], **ramp),
        max_down_scale=c["max_down_scale"] or None,
        ema_init="zero",
        unlabelled="ignore",
        **(raising if c["raise_small"] else {}),
    )
    state = tx.init({n: jnp.zeros(s, jnp.float32) for n, s in LONG_SHAPES.items()})
    labels = state.labels

    def body(s: Any, g: Any) -> tuple[Any, tuple[jax.Array, ...]]:
        _, s = tx.update(g, s)
        return s, (s.ema, s.norm, s.lower, s.upper, s.scale)

    scan = jax.jit(lambda s, xs: jax.lax.scan(body, s, xs))
    final, history = scan(state, long_gradients)
    ema, norm, lower, upper, scale = (np.asarray(h) for h in history)
    assert int(final.count) == LONG_STEPS and ema.dtype == np.float32

    # the model: float32 per-tensor sums (docs/reference-behaviour.md §3), everything else in
    # float64
    sq = np.zeros((LONG_STEPS, len(labels)))
    for name in LONG_SHAPES:
        sq[:, labels.index(spec_label(name))] += tensor_sq_sums(long_gradients[name])

    def multipliers(base: float, late: float) -> np.ndarray:
        args = (base, late, LONG_STEPS, c["switch"], c["transition"])
        return np.array([spec_schedule(t, *args) for t in range(LONG_STEPS)])

    model = spec_trajectory(
        sq,
        ema_beta=c["ema_beta"],
        low_mult=multipliers(*c["low"]),
        high_mult=multipliers(*c["high"]),
        min_norm=c["min_norm"],
        raise_small=c["raise_small"],
        max_up_scale=c["max_up_scale"],
        max_down_scale=c["max_down_scale"],
        # With raise_small and an inverted interval the scale jumps at the upper
        # bound; a norm within float32 rounding of it may go either way, so the
        # model follows the float32 run there (and only there): see spec_trajectory.
        observed_scale=scale,
        tie_tol=2e-5,
    )
    assert int(model["ties"]) <= 20  # out of 400,000 group-steps

    rel = np.abs(ema - model["ema"]) / np.abs(model["ema"])
    # the bound, for every beta: the compensated EMA does not stall
    bound = 1e-5
    print(f"{config}: max relative EMA error {rel.max():.2e}, ties {int(model['ties'])}")
    assert rel.max() < bound, (config, rel.max(axis=0))
    np.testing.assert_allclose(scale, model["scale"], rtol=2 * bound)
    np.testing.assert_allclose(upper, model["upper"], rtol=2 * bound)
    # no drift: the error late in the run is no larger than early on
    tenth = LONG_STEPS // 10
    assert rel[-tenth:].max() <= 1.5 * rel[:-tenth].max()
    # the EMA of the constant group settles and stays put, to a few units in the last place
    settled = ema[-tenth:, labels.index("norm")]
    assert (settled.max() - settled.min()) / settled.max() <= 4 * 2.0**-23
    # nothing ever subnormal (or negative, or non-finite)
    tiny = np.finfo(np.float32).tiny
    for values in (ema, norm, lower, upper, scale):
        assert np.all(np.isfinite(values))
        assert np.all((values == 0) | (np.abs(values) >= tiny))
        assert np.all(values >= 0)
    # the all-zero stretch of input_layernorm: norm 1e-8, the EMA finite and normal
    zero_stretch = norm[30_000:60_000, labels.index("input_layernorm")]
    assert np.all(zero_stretch == np.float32(1e-8))
