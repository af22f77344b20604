"""Faults: NaN, inf and extreme gradients never corrupt the state or leak across groups.

Expectations come from the float64 model of the spec (``tests/spec_model.py``),
from a clean run of the same transformation (for "untouched" claims, bit for
bit), or from hand computation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aggc_optax
from aggc_optax import aggc, from_reference_options, presets
from tests.spec_model import SpecClipper, spec_label

SHAPES = {
    "model.layers.0.mlp.down_proj.weight": (6,),
    "model.layers.0.self_attn.q_proj.weight": (4, 4),
    "model.layers.1.self_attn.q_proj.weight": (4, 4),
    "model.norm.weight": (3,),
}
LABELS = {name: spec_label(name) for name in SHAPES}
GROUPS = ("down_proj", "q_proj", "norm")  # order of first appearance in the flat dict
FAULT_LEAF = "model.layers.1.self_attn.q_proj.weight"
Q = GROUPS.index("q_proj")
FIELDS = ("ema", "norm", "lower", "upper", "scale", "ema_count", "clip_down_count", "raise_count")
STEPS = 60

Grads = dict[str, np.ndarray]


def grad_sequence(steps: int, seed: int = 0) -> list[Grads]:
    """Per-group norms that wander (log-normal) and spike 8x one step in ten."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        step = {}
        for name, shape in SHAPES.items():
            level = math.exp(rng.normal(0.0, 0.5)) * (8.0 if rng.random() < 0.1 else 1.0)
            step[name] = (level * rng.standard_normal(shape)).astype(np.float32)
        out.append(step)
    return out


SEQUENCE = grad_sequence(STEPS)

# name -> the reference's options, for from_reference_options and the float64 model
# alike (nonfinite="skip" there is aggc()'s policy; the reference form also reports
# the lower bound when nothing is raised, so the model's every number is checked)
CONFIGS: dict[str, dict[str, Any]] = {
    # the LoRA SFT recipe without its ramp
    "default": {
        "ema_beta": 0.95,
        "low_mult": 0.95,
        "high_mult": 0.6,
        "min_norm": 0.01,
        "raise_small": False,
        "max_up_scale": 1.1,
        "max_down_scale": 0.9,
    },
    "raise_no_caps": {
        "ema_beta": 0.9,
        "low_mult": 0.8,
        "high_mult": 1.2,
        "min_norm": 0.05,
        "raise_small": True,
        "max_up_scale": 0.0,
        "max_down_scale": 0.0,
    },
    "grpo": {
        "ema_beta": 0.99,
        "low_mult": 0.98,
        "high_mult": 0.7,
        "min_norm": 0.0,
        "raise_small": True,
        "max_up_scale": 1.1,
        "max_down_scale": 0.9,
    },
}


def model_for(config: str) -> SpecClipper:
    return SpecClipper(auto_bounds=True, **CONFIGS[config])


@functools.cache
def transformation(config: str, nonfinite: str = "skip") -> tuple[Any, Callable[..., Any]]:
    options = {"enable": True, "auto_bounds": True, **CONFIGS[config]}
    tx = from_reference_options(options, nonfinite=nonfinite)
    return tx, jax.jit(tx.update)


def _params() -> dict[str, jax.Array]:
    return {name: jnp.zeros(shape, jnp.float32) for name, shape in SHAPES.items()}


def run(config: str, sequence: list[Grads], nonfinite: str = "skip") -> list[tuple[Grads, Any]]:
    """Every step's clipped gradients and state, as NumPy arrays."""
    tx, update = transformation(config, nonfinite)
    state = tx.init(_params())
    assert state.labels == GROUPS
    history = []
    for grads in sequence:
        out, state = update({k: jnp.asarray(v) for k, v in grads.items()}, state)
        history.append(
            (
                {k: np.asarray(v) for k, v in out.items()},
                {f: np.asarray(getattr(state, f)) for f in FIELDS},
            )
        )
    return history


@functools.cache
def _clean_run(config: str) -> list[tuple[Grads, Any]]:
    return run(config, SEQUENCE)


def with_fault(sequence: list[Grads], step: int, kind: str) -> list[Grads]:
    faulty = [dict(g) for g in sequence]
    g = faulty[step][FAULT_LEAF].copy()
    if kind == "nan":
        g[2, 3] = np.nan
    elif kind == "inf":
        g[2, 3] = np.inf
    elif kind == "-inf":
        g[0, 0] = -np.inf
    elif kind == "overflow":  # every entry finite, the float32 sum of squares is not
        g = np.full_like(g, 1e20)
    elif kind == "float32_max":
        g[1, 1] = np.float32(3.0e38)
    else:
        raise AssertionError(kind)
    faulty[step][FAULT_LEAF] = g
    return faulty


def model_trajectory(
    model: SpecClipper, sequence: list[Grads], skip: int | None = None
) -> dict[int, tuple[Grads, dict[str, dict[str, float]], dict[str, float]]]:
    """The model's clipped gradients, statistics and EMA at every step but ``skip``."""
    out = {}
    for t, grads in enumerate(sequence):
        if t == skip:
            continue
        with np.errstate(all="ignore"):
            clipped, stats = model.step(grads, LABELS, t)
        out[t] = (clipped, stats, dict(model.ema))
    return out


# ---------------------------------------------------------------------------
# nonfinite="skip"


@pytest.mark.parametrize("config", ["default", "raise_no_caps"])
@pytest.mark.parametrize("step", [0, 3, 40], ids=["step0", "warmup", "late"])
# Finite entries whose float32 squares overflow are not a fault: such a group
# is clipped (tests/test_numerics.py, "overflowing norms").
@pytest.mark.parametrize("kind", ["nan", "inf", "-inf"])
def test_skip_policy_isolates_the_faulty_group(config: str, step: int, kind: str) -> None:
    faulty = with_fault(SEQUENCE, step, kind)
    got = run(config, faulty)
    clean = _clean_run(config)
    q_leaves = [n for n in SHAPES if LABELS[n] == "q_proj"]
    other_leaves = [n for n in SHAPES if LABELS[n] != "q_proj"]

    for t in range(STEPS):
        out, state = got[t]
        clean_out, clean_state = clean[t]
        # other groups: bit for bit what they are without the fault
        for name in other_leaves:
            np.testing.assert_array_equal(out[name], clean_out[name])
        for field in FIELDS:
            np.testing.assert_array_equal(
                np.delete(state[field], Q), np.delete(clean_state[field], Q), err_msg=field
            )
        # the state stays finite; only the reported norm of the faulty step is not
        for field in FIELDS:
            values = state[field].astype(np.float64)
            if t == step and field == "norm":
                assert not np.isfinite(values[Q])
                values = np.delete(values, Q)
            assert np.all(np.isfinite(values)), (t, field, values)

    # the faulty step: gradients untouched, EMA and counters as they were
    out, state = got[step]
    for name in q_leaves:
        np.testing.assert_array_equal(out[name], faulty[step][name])
    assert state["scale"][Q] == 1.0
    if step == 0:
        assert state["ema"][Q] == 0.0 and state["ema_count"][Q] == 0
    else:
        before = got[step - 1][1]
        for field in ("ema", "ema_count", "clip_down_count", "raise_count"):
            assert state[field][Q] == before[field][Q], field
    assert state["ema_count"][Q] == step  # every step but the faulty one counted

    # after it: exactly the model run on the clean steps only (the step never happened)
    expected = model_trajectory(model_for(config), SEQUENCE, skip=step)
    resumed = 0
    for t in range(STEPS):
        if t == step:
            continue
        out, state = got[t]
        want, stats, ema = expected[t]
        for name in q_leaves:
            np.testing.assert_allclose(out[name], want[name], rtol=3e-6, atol=0)
        np.testing.assert_allclose(state["ema"][Q], ema["q_proj"], rtol=3e-6)
        np.testing.assert_allclose(state["scale"][Q], stats["q_proj"]["scale"], rtol=3e-6)
        resumed += t > step and stats["q_proj"]["scale"] != 1.0
    assert resumed > 5  # clipping of the group really resumed


@pytest.mark.parametrize("config", ["default", "grpo"])
def test_skip_policy_on_a_group_that_is_faulty_for_many_steps(config: str) -> None:
    # the group is NaN for 20 steps in a row: it keeps its EMA all along
    faulty = [dict(g) for g in SEQUENCE]
    for t in range(10, 30):
        faulty[t][FAULT_LEAF] = np.full(SHAPES[FAULT_LEAF], np.nan, np.float32)
    got = run(config, faulty)
    ema_before = got[9][1]["ema"][Q]
    for t in range(10, 30):
        assert got[t][1]["ema"][Q] == ema_before
        assert got[t][1]["ema_count"][Q] == 10
    assert got[-1][1]["ema_count"][Q] == STEPS - 20
    assert np.all(np.isfinite(got[-1][1]["ema"]))


# ---------------------------------------------------------------------------
# nonfinite="reference": docs/reference-behaviour.md §8 exactly


REFERENCE_OPTIONS = {
    "enable": True,
    "auto_bounds": True,
    "ema_beta": 0.9,
    "low_mult": 0.5,
    "high_mult": 2.0,
    "min_norm": 0.0,
    "raise_small": True,
}


@pytest.mark.parametrize(
    ("kind", "caps"),
    [("nan", False), ("nan", True), ("inf", False), ("inf", True), ("overflow", True)],
)
def test_reference_policy_is_spec_8_3(kind: str, caps: bool) -> None:
    options = dict(REFERENCE_OPTIONS)
    if caps:
        options.update(max_down_scale=0.9, max_up_scale=1.1)
    tx = from_reference_options(options)
    model = SpecClipper(
        ema_beta=0.9,
        low_mult=0.5,
        high_mult=2.0,
        auto_bounds=True,
        raise_small=True,
        max_down_scale=0.9 if caps else 0.0,
        max_up_scale=1.1 if caps else 0.0,
    )
    steps, bad = 20, 3
    sequence = with_fault(grad_sequence(steps, seed=1), bad, kind)
    expected = model_trajectory(model, sequence)
    state = tx.init(_params())
    update = jax.jit(tx.update)
    q_leaves = [n for n in SHAPES if LABELS[n] == "q_proj"]
    for t, grads in enumerate(sequence):
        out, state = update({k: jnp.asarray(v) for k, v in grads.items()}, state)
        want, stats, ema = expected[t]
        for name in SHAPES:
            np.testing.assert_allclose(np.asarray(out[name]), want[name], rtol=3e-6)
        for i, label in enumerate(GROUPS):
            for field in ("norm", "lower", "upper", "scale"):
                np.testing.assert_allclose(
                    float(getattr(state, field)[i]), stats[label][field], rtol=3e-6, err_msg=field
                )
            np.testing.assert_allclose(float(state.ema[i]), ema[label], rtol=3e-6)
        # never a leak into other groups
        assert np.all(np.isfinite(np.delete(np.asarray(state.ema), Q)))

        # the spec's own words, by hand
        scale, lower, upper = (float(getattr(state, f)[Q]) for f in ("scale", "lower", "upper"))
        fault = np.asarray(out[FAULT_LEAF])
        if t == bad and kind == "nan":
            assert scale == 1.0 and np.isnan(fault[2, 3])
        if t == bad and kind == "inf" and not caps:
            assert scale == 0.0 and np.isnan(fault[2, 3])  # inf * 0
            assert np.all(np.delete(fault.ravel(), 2 * 4 + 3) == 0.0)
        if t == bad and caps and kind in ("inf", "overflow"):
            assert scale == pytest.approx(0.9)
            assert np.isinf(fault[2, 3]) if kind == "inf" else np.all(np.isfinite(fault))
        if t > bad and (kind == "nan" or not caps):
            # the EMA is NaN; max(0.0, nan) == 0.0: never clipped again
            assert math.isnan(float(state.ema[Q]))
            assert upper == 0.0 and lower == 0.0 and scale == 1.0
            for name in q_leaves:
                np.testing.assert_array_equal(np.asarray(out[name]), grads[name])
        if t > bad and caps and kind in ("inf", "overflow"):
            # lower = upper = inf: raised by max_up_scale at every step, forever
            assert math.isinf(float(state.ema[Q]))
            assert lower == math.inf and upper == math.inf
            assert scale == pytest.approx(1.1)
            for name in q_leaves:
                np.testing.assert_array_equal(
                    np.asarray(out[name]), grads[name] * np.float32(scale)
                )


# ---------------------------------------------------------------------------
# optax.apply_if_finite


@pytest.mark.parametrize("nonfinite", ["skip", "reference"])
def test_apply_if_finite_leaves_the_aggc_state_as_it_was(nonfinite: str) -> None:
    tx = optax.apply_if_finite(
        optax.chain(transformation("raise_no_caps", nonfinite)[0], optax.sgd(0.1)),
        max_consecutive_errors=3,
    )
    params = _params()
    update = jax.jit(tx.update)
    state = tx.init(params)
    as_jnp = lambda g: {k: jnp.asarray(v) for k, v in g.items()}  # noqa: E731
    for t in range(3):
        _, state = update(as_jnp(SEQUENCE[t]), state, params)
    before = state
    _, after = update(as_jnp(with_fault(SEQUENCE, 3, "nan")[3]), before, params)
    assert int(after.notfinite_count) == 1
    jax.tree.map(np.testing.assert_array_equal, after.inner_state, before.inner_state)
    # and the next clean step is exactly as if the NaN step had never happened
    _, resumed = update(as_jnp(SEQUENCE[4]), after, params)
    _, never = update(as_jnp(SEQUENCE[4]), before, params)
    jax.tree.map(np.testing.assert_array_equal, resumed.inner_state, never.inner_state)
    assert int(resumed.inner_state[0].count) == 4


# ---------------------------------------------------------------------------
# Extreme magnitudes


@pytest.mark.parametrize("nonfinite", ["skip", "reference"])
def test_a_norm_just_below_the_overflow_threshold_is_clipped_normally(nonfinite: str) -> None:
    sequence = [dict(g) for g in SEQUENCE[:12]]
    sequence[8][FAULT_LEAF] = np.full(SHAPES[FAULT_LEAF], 1e18, np.float32)  # norm ~4e18
    got = run("raise_no_caps", sequence, nonfinite)
    expected = model_trajectory(model_for("raise_no_caps"), sequence)
    out, state = got[8]
    want, stats, _ = expected[8]
    assert np.isfinite(state["norm"][Q])
    np.testing.assert_allclose(state["norm"][Q], stats["q_proj"]["norm"], rtol=1e-6)
    assert stats["q_proj"]["scale"] < 1e-17  # clipped down to the upper bound
    q_squares = [np.sum(out[n].astype(np.float64) ** 2) for n in out if LABELS[n] == "q_proj"]
    q_norm = math.sqrt(sum(q_squares))
    assert q_norm == pytest.approx(stats["q_proj"]["upper"], rel=1e-5)
    for name in SHAPES:
        np.testing.assert_allclose(out[name], want[name], rtol=3e-6)


@pytest.mark.parametrize("config", ["default", "raise_no_caps"])
def test_gradients_near_the_smallest_normal_float32(config: str) -> None:
    sequence = [dict(g) for g in SEQUENCE[:10]]
    tiny = np.float32(2e-38)  # normal; its square underflows to 0 in float32
    assert tiny >= np.finfo(np.float32).tiny
    for t in range(10):
        for name in SHAPES:
            if LABELS[name] == "q_proj":
                sequence[t][name] = np.where(sequence[t][name] > 0, tiny, -tiny)
    got = run(config, sequence)
    expected = model_trajectory(model_for(config), sequence)
    for t in range(10):
        out, state = got[t]
        want, stats, ema = expected[t]
        assert stats["q_proj"]["norm"] == 1e-8  # the norm floor, in the model
        np.testing.assert_allclose(state["norm"][Q], 1e-8, rtol=1e-7)
        np.testing.assert_allclose(state["scale"][Q], stats["q_proj"]["scale"], rtol=3e-6)
        np.testing.assert_allclose(state["ema"][Q], ema["q_proj"], rtol=3e-6)
        for name in SHAPES:
            np.testing.assert_allclose(out[name], want[name], rtol=3e-6, atol=0)
            assert np.all(np.isfinite(out[name]))
    if config == "raise_no_caps":
        assert got[-1][1]["scale"][Q] > 1e6  # min_norm / 1e-8: raised, as in the reference


def test_subnormal_gradients_come_out_unchanged_or_flushed_to_zero() -> None:
    sequence = [dict(g) for g in SEQUENCE[:3]]
    sub = np.float32(1e-39)
    assert 0 < sub < np.finfo(np.float32).tiny
    for t in range(3):
        sequence[t][FAULT_LEAF] = np.full(SHAPES[FAULT_LEAF], sub, np.float32)
        sequence[t]["model.layers.0.self_attn.q_proj.weight"] = np.zeros((4, 4), np.float32)
    got = run("default", sequence)
    expected = model_trajectory(model_for("default"), sequence)
    for t in range(3):
        out, state = got[t]
        want = expected[t][0][FAULT_LEAF]
        # XLA:CPU flushes subnormals to zero in arithmetic; NumPy (the model) does not
        assert np.all((out[FAULT_LEAF] == 0) | (out[FAULT_LEAF] == want))
        assert state["norm"][Q] == np.float32(1e-8)
        assert all(np.all(np.isfinite(v)) for v in state.values())


@pytest.mark.parametrize("config", ["default", "raise_no_caps", "grpo"])
def test_an_all_zero_group_for_many_steps(config: str) -> None:
    steps = 400
    sequence = grad_sequence(steps, seed=2)
    for g in sequence:
        g["model.layers.0.mlp.down_proj.weight"] = np.zeros(6, np.float32)
    got = run(config, sequence)
    expected = model_trajectory(model_for(config), sequence)
    d = GROUPS.index("down_proj")
    tiny = np.finfo(np.float32).tiny
    for t in range(steps):
        out, state = got[t]
        _, stats, ema = expected[t]
        assert np.all(out["model.layers.0.mlp.down_proj.weight"] == 0.0)
        assert state["norm"][d] == np.float32(1e-8)
        assert np.isfinite(state["ema"][d]) and state["ema"][d] >= tiny  # never subnormal
        np.testing.assert_allclose(state["ema"][d], ema["down_proj"], rtol=1e-5)
        np.testing.assert_allclose(state["scale"][d], stats["down_proj"]["scale"], rtol=1e-5)
    if config == "raise_no_caps":
        # docs/reference-behaviour.md §4: no max_up_scale, so the scale is about min_norm / 1e-8
        assert got[-1][1]["scale"][d] == pytest.approx(0.05 / 1e-8, rel=1e-3)


def _fixed_bounds(lower: float, upper: float) -> optax.GradientTransformation:
    return aggc(auto_bounds=False, min_norm=lower, max_norm=upper)


def test_a_norm_exactly_at_a_fixed_bound_is_untouched() -> None:
    params = {"model.norm.weight": jnp.zeros(2)}
    cases = [
        (np.array([3.0, 4.0], np.float32), "at"),  # norm 5 exactly, in float32 and float64
        # a few units in the last place away: norms 5.0000014 and 4.9999986 in float32
        (np.array([3.0, 4.0000024], np.float32), "above"),
        (np.array([3.0, 3.9999976], np.float32), "below"),
    ]
    for bound in ("upper", "lower", "both"):
        lower = 5.0 if bound in ("lower", "both") else 0.0
        upper = 5.0 if bound in ("upper", "both") else 10.0
        tx = _fixed_bounds(lower, upper)
        update = jax.jit(tx.update)
        for g, where in cases:
            state = tx.init(params)
            out, state = update({"model.norm.weight": jnp.asarray(g)}, state)
            out = np.asarray(out["model.norm.weight"])
            moved = (where == "above" and upper == 5.0) or (where == "below" and lower == 5.0)
            if moved:
                assert float(state.scale[0]) != 1.0
                assert np.linalg.norm(out.astype(np.float64)) == pytest.approx(5.0, rel=2e-7)
            else:
                assert float(state.scale[0]) == 1.0, (bound, where)
                np.testing.assert_array_equal(out, g)


def test_a_norm_exactly_at_an_ema_bound_is_untouched() -> None:
    # beta 0.5: after a step of norm 4 the EMA is 2 exactly, so both bounds are 2;
    # a step of norm exactly 2 is neither clipped down nor raised
    tx = aggc(ema_beta=0.5, low_mult=1.0, high_mult=1.0, ema_init="zero")
    params = {"model.norm.weight": jnp.zeros(2)}
    state = tx.init(params)
    _, state = tx.update({"model.norm.weight": jnp.array([4.0, 0.0])}, state)
    assert float(state.ema[0]) == 2.0
    g = jnp.array([0.0, 2.0])
    out, state = tx.update({"model.norm.weight": g}, state)
    assert float(state.lower[0]) == float(state.upper[0]) == float(state.norm[0]) == 2.0
    assert float(state.scale[0]) == 1.0
    assert int(state.clip_down_count[0]) == 0 and int(state.raise_count[0]) == 0
    np.testing.assert_array_equal(out["model.norm.weight"], g)


def test_the_1e_12_margin_with_x64() -> None:
    # docs/reference-behaviour.md §4: upper + 5e-13 is untouched, upper + 2e-12 is
    # clipped by ~0.999999999997
    with jax.enable_x64(True):
        params = {"model.norm.weight": jnp.zeros(1, jnp.float64)}
        for lower, upper, value, expected_scale in (
            (0.0, 1.0, 1.0 + 5e-13, 1.0),
            (0.0, 1.0, 1.0 + 2e-12, 1.0 / (1.0 + 2e-12 + 1e-12)),
            (1.0, 10.0, 1.0 - 5e-13, 1.0),
            (1.0, 10.0, 1.0 - 2e-12, 1.0 / (1.0 - 2e-12 + 1e-12)),
        ):
            tx = _fixed_bounds(lower, upper)
            state = tx.init(params)
            g = jnp.array([value], jnp.float64)
            out, state = jax.jit(tx.update)({"model.norm.weight": g}, state)
            assert state.scale.dtype == jnp.float64
            assert float(state.scale[0]) == pytest.approx(expected_scale, rel=1e-15, abs=0)
            assert float(out["model.norm.weight"][0]) == pytest.approx(
                value * expected_scale, rel=1e-15
            )
        assert 1.0 - 1.0 / (1.0 + 3e-12) == pytest.approx(3e-12, rel=1e-3)


# ------------------------------------- run-time faults, by hand, eager and under jit

JIT = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def _update(tx: Any, g: Any, state: Any, jit: bool) -> Any:
    return (jax.jit(tx.update) if jit else tx.update)(g, state)


# traps -------------------------------------------------------------------


def test_global_norm_empty_tree_error_names_no_param_labels() -> None:
    with pytest.raises(ValueError, match="nothing to clip") as err:
        presets.global_norm(1.0).init({})
    assert "param_labels" not in str(err.value)


def test_lora_sft_default_nan_policy_is_skip() -> None:
    params = {"model": {"layers": {"0": {"q_proj": {"weight": jnp.array([3.0, 4.0])}}}}}
    tx = presets.lora_sft(100)
    state = tx.init(params)
    _, state = tx.update(params, state)
    bad = jax.tree.map(lambda x: x.at[0].set(jnp.nan), params)
    _, state2 = tx.update(bad, state)
    assert np.all(np.isfinite(np.asarray(state2.ema)))  # the reference's policy would give NaN


# bad run-time values never poison the state ------------------------------


@JIT
@pytest.mark.parametrize("beta", [float("nan"), 1.0, -3.0, float("inf")])
def test_bad_injected_ema_beta_skips_the_step(jit: bool, beta: float) -> None:
    tx = optax.inject_hyperparams(aggc_optax.aggc, static_args=("param_labels",))(
        ema_beta=0.5, high_mult=2.0, param_labels={"a": "a", "b": None}
    )
    g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([1.0])}
    state = tx.init(g)
    _, state = _update(tx, g, state, jit)  # EMA 5
    state.hyperparams["ema_beta"] = jnp.asarray(beta)
    spike = {"a": jnp.array([300.0, 400.0]), "b": jnp.array([1.0])}
    if not jit:  # a concrete injected value is checked when the inner aggc() is built
        with pytest.raises(ValueError, match="ema_beta must be"):
            _update(tx, spike, state, jit)
        return
    out, state = _update(tx, spike, state, jit)
    np.testing.assert_array_equal(np.asarray(out["a"]), [300.0, 400.0])  # passes through
    assert float(state.inner_state.ema[0]) == 5.0 and int(state.inner_state.ema_count[0]) == 1
    state.hyperparams["ema_beta"] = jnp.asarray(0.5)
    out, state = _update(tx, spike, state, jit)
    # clipping works again: bound 2 x 5 = 10, norm 500
    np.testing.assert_allclose(np.asarray(out["a"]), [6.0, 8.0], rtol=1e-6)


@JIT
def test_injected_max_down_scale_above_one_is_a_fault(jit: bool) -> None:
    tx = optax.inject_hyperparams(aggc_optax.aggc, static_args=("param_labels",))(
        max_down_scale=0.5, param_labels={"a": "a"}
    )
    g = {"a": jnp.array([3.0, 4.0])}
    state = tx.init(g)
    _, state = _update(tx, g, state, jit)
    state.hyperparams["max_down_scale"] = jnp.asarray(5.0)
    if not jit:
        with pytest.raises(ValueError, match="max_down_scale must be in"):
            _update(tx, {"a": jnp.array([30.0, 40.0])}, state, jit)
        return
    out, _ = _update(tx, {"a": jnp.array([30.0, 40.0])}, state, jit)
    np.testing.assert_array_equal(np.asarray(out["a"]), [30.0, 40.0])  # not multiplied by 5


@JIT
def test_nan_in_restored_ema_restarts_the_group(jit: bool) -> None:
    tx = aggc_optax.aggc(high_mult=2.0, param_labels={"a": "a"})
    g = {"a": jnp.array([3.0, 4.0])}
    state = tx.init(g)
    _, state = _update(tx, g, state, jit)
    state = state._replace(ema=jnp.full_like(state.ema, jnp.nan))
    out, state = _update(tx, {"a": jnp.array([30.0, 40.0])}, state, jit)
    # detected: this step passes through and the EMA is reset
    np.testing.assert_array_equal(np.asarray(out["a"]), [30.0, 40.0])
    assert float(state.ema[0]) == 0.0 and int(state.ema_count[0]) == 0
    _, state = _update(tx, g, state, jit)
    # restarted as never updated: ema_init="first" takes this norm, 5
    np.testing.assert_allclose(float(state.ema[0]), 5.0, rtol=1e-6)
    out, _ = _update(tx, {"a": jnp.array([300.0, 400.0])}, state, jit)
    np.testing.assert_allclose(np.asarray(out["a"]), [6.0, 8.0], rtol=1e-6)


# a state of other groups --------------------------------------------------


@JIT
def test_state_of_other_labels_is_an_error_naming_both(jit: bool) -> None:
    g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([1.0])}
    first = aggc_optax.aggc(param_labels={"a": "x", "b": "y"})
    second = aggc_optax.aggc(param_labels={"a": "y", "b": "z"})
    state = first.init(g)
    with pytest.raises(ValueError, match=r"\['y', 'z'\] in the updates, \['x', 'y'\] at init"):
        _update(second, g, state, jit)
