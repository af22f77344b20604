"""Bad input: a clear error at construction (or init), never later inside jit.

The table of bad inputs lives in ``docs/reliability.md`` and is executed here row
by row, so the documentation and the behaviour cannot drift apart. The rest of
this file tests what the table cannot show: the odd values that are accepted on
purpose (with their behaviour checked against the float64 model of the spec),
the no-label cases, non-float leaves that pass through, and hyperparameters
that arrive as arrays or tracers.
"""

from __future__ import annotations

import math
import pathlib
import re
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aggc_optax import (
    ScaleOnly,
    aggc,
    from_reference_options,
    linear_bounds_schedule,
    regex_labeler,
)
from tests.spec_model import SpecClipper, aggc_options

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
_ROW = re.compile(r"^\| `(?P<expr>[^`]+)` \| `(?P<exc>\w+)` \| `(?P<msg>[^`]+)` \|$")


def _error_table() -> list[tuple[str, str, str]]:
    text = DOC.read_text()
    start = text.index("<!-- error-table:start -->")
    end = text.index("<!-- error-table:end -->")
    rows = []
    for line in text[start:end].splitlines():
        if line.startswith("| `"):
            match = _ROW.match(line)
            assert match is not None, f"malformed error-table row: {line}"
            rows.append((match["expr"], match["exc"], match["msg"]))
    return rows


ERROR_TABLE = _error_table()


def _namespace() -> dict[str, Any]:
    params = {
        "model": {
            "layers": {"0": {"self_attn": {"q_proj": {"weight": jnp.ones((2, 2))}}}},
            "norm": {"weight": jnp.ones(2)},
        }
    }
    return {
        "aggc": aggc,
        "from_reference_options": from_reference_options,
        "linear_bounds_schedule": linear_bounds_schedule,
        "regex_labeler": regex_labeler,
        "ScaleOnly": ScaleOnly,
        "np": np,
        "jnp": jnp,
        "nan": math.nan,
        "inf": math.inf,
        "params": params,
    }


def test_error_table_covers_every_category_of_the_issue() -> None:
    exprs = " ".join(expr for expr, _, _ in ERROR_TABLE)
    assert len(ERROR_TABLE) >= 70
    for needle in (
        "ema_beta=",
        "low_mult=",
        "high_mult=",
        "min_norm=",
        "max_norm=",
        "max_up_scale=",
        "max_down_scale=",
        "=nan",
        "switch_ratio",
        "transition_ratio",
        "total_steps=-",
        "jnp.ones(3)",  # a schedule returning a non-scalar
        "ema_decay",  # an unknown option
        "param_labels={",  # a label tree that does not match
        "lambda name: 3",  # a labeler returning a non-string
        "jnp.arange(3)",  # an integer leaf
        '{"w": jnp.ones(3)',  # nothing gets a label
    ):
        assert needle in exprs, needle


@pytest.mark.parametrize(("expr", "exc", "msg"), ERROR_TABLE, ids=[r[0] for r in ERROR_TABLE])
def test_error_table_row(expr: str, exc: str, msg: str) -> None:
    expected = {"ValueError": ValueError, "TypeError": TypeError}[exc]
    with pytest.raises(Exception) as info:
        eval(expr, _namespace())
    # exactly the documented class, not a subclass or a sibling
    assert type(info.value) is expected, f"{expr}: {type(info.value).__name__}: {info.value}"
    assert msg in str(info.value), f"{expr}: message was {str(info.value)!r}"


# ---------------------------------------------------------------------------
# Accepted on purpose.

PARAMS = {
    "model.layers.0.self_attn.q_proj.weight": np.array([3.0, 4.0], np.float32),
    "model.layers.0.mlp.down_proj.weight": np.array([0.1, 0.2, 0.2], np.float32),
}
LABELS = {name: name.split(".")[-2] for name in PARAMS}


def _grads(t: int) -> dict[str, np.ndarray]:
    # a norm that jumps around, so that clip-down and raise branches both occur
    factors = [1.0, 3.0, 0.2, 5.0, 0.05, 1.0, 8.0, 0.5]
    return {name: g * np.float32(factors[t % len(factors)]) for name, g in PARAMS.items()}


def _compare_with_model(
    tx: optax.GradientTransformation, model: SpecClipper, steps: int
) -> set[float]:
    """Runs both on the same gradients; returns the set of scales the model used."""
    scales = set()
    state = tx.init({k: jnp.asarray(v) for k, v in PARAMS.items()})
    update = jax.jit(tx.update)
    for t in range(steps):
        grads = _grads(t)
        out, state = update({k: jnp.asarray(v) for k, v in grads.items()}, state)
        want, stats = model.step(grads, LABELS, t)
        for name in PARAMS:
            np.testing.assert_allclose(np.asarray(out[name]), want[name], rtol=2e-6)
        for i, label in enumerate(state.labels):
            np.testing.assert_allclose(float(state.scale[i]), stats[label]["scale"], rtol=2e-6)
            np.testing.assert_allclose(float(state.ema[i]), model.ema[label], rtol=2e-6)
            scales.add(stats[label]["scale"])
    return scales


def test_reference_caps_that_invert_their_meaning_are_reproduced() -> None:
    options = {
        "enable": True,
        "auto_bounds": True,
        "ema_beta": 0.8,
        "low_mult": 0.5,
        "high_mult": 1.5,
        "raise_small": True,
        "max_down_scale": 1.5,
        "max_up_scale": 0.5,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tx = from_reference_options(options)
    model = SpecClipper(
        ema_beta=0.8,
        low_mult=0.5,
        high_mult=1.5,
        auto_bounds=True,
        raise_small=True,
        max_down_scale=1.5,
        max_up_scale=0.5,
    )
    scales = _compare_with_model(tx, model, 16)
    # the inversions really happened: a "clip down" multiplied by 1.5, a "raise" by 0.5
    assert {0.5, 1.5} <= scales


def test_aggc_rejects_the_inverting_caps_that_from_reference_options_accepts() -> None:
    for kwargs in ({"max_down_scale": 1.5}, {"max_up_scale": 0.5}):
        with pytest.raises(ValueError, match="use from_reference_options"):
            aggc(low_mult=0.5, **kwargs)
        from_reference_options({"enable": True, **kwargs})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"low_mult": 0.95, "high_mult": 0.6},  # the LoRA recipe's interval, raising on
        {"low_mult": 2.0, "high_mult": 0.5, "min_norm": 0.0},
        {"auto_bounds": False, "min_norm": 2.0, "max_norm": 1.0},
    ],
)
def test_inverted_intervals_are_accepted_silently_and_follow_the_spec(
    kwargs: dict[str, Any],
) -> None:
    full = {"ema_beta": 0.8, "ema_init": "zero", **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tx = aggc(**full)
    options = aggc_options(**full)
    del options["ema_init"]  # the model starts at 0, as asked
    _compare_with_model(tx, SpecClipper(**options), 16)


def test_fixed_inverted_interval_leaves_nothing_untouched() -> None:
    # docs/reference-behaviour.md §4: with lower > upper and raising, a norm above upper is clipped
    # down to upper and anything at or below it is raised to lower
    tx = aggc(auto_bounds=False, min_norm=2.0, max_norm=1.0)
    params = {"model.norm.weight": jnp.zeros(2)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for norm, expected_norm in ((5.0, 1.0), (1.5, 1.0), (1.0, 2.0), (0.5, 2.0)):
        g = {"model.norm.weight": jnp.array([norm, 0.0])}
        out, state = update(g, state)
        assert float(jnp.linalg.norm(out["model.norm.weight"])) == pytest.approx(
            expected_norm, rel=1e-6
        )


def test_reference_options_other_odd_values() -> None:
    base = {"enable": True, "auto_bounds": True, "bounds_schedule": "linear"}
    # late <= 0 means "use the base value": identical to no schedule at all
    a = from_reference_options(
        {**base, "low_mult_late": -1.0, "high_mult_late": 0.0}, total_steps=100
    )
    b = from_reference_options({"enable": True, "auto_bounds": True})
    for norm_type in (1, 3.0, math.inf):  # no effect (docs/reference-behaviour.md §8), but accepted
        from_reference_options({"enable": True, "norm_type": norm_type})
    params = {k: jnp.asarray(v) for k, v in PARAMS.items()}
    sa, sb = a.init(params), b.init(params)
    update_a, update_b = jax.jit(a.update), jax.jit(b.update)
    for t in range(8):
        g = {k: jnp.asarray(v) for k, v in _grads(t).items()}
        oa, sa = update_a(g, sa)
        ob, sb = update_b(g, sb)
        for name in PARAMS:
            np.testing.assert_array_equal(oa[name], ob[name])


# ---------------------------------------------------------------------------
# Trees, labels, dtypes.


def test_nothing_labelled_reference_warns_and_passes_through() -> None:
    params = {"w": jnp.ones(3), "model": {"layers": {"0": {"gate": jnp.ones(2)}}}}
    tx = from_reference_options({"enable": True})
    with pytest.warns(UserWarning, match="no parameter got a group label"):
        state = tx.init(params)
    assert state.labels == ()
    grads = {
        "w": jnp.array([1e6, jnp.nan, 3.0]),
        "model": {"layers": {"0": {"gate": -jnp.ones(2)}}},
    }
    out, state = jax.jit(tx.update)(grads, state)
    np.testing.assert_array_equal(out["w"], grads["w"])
    np.testing.assert_array_equal(out["model"]["layers"]["0"]["gate"], -jnp.ones(2))
    assert int(state.count) == 1


def test_unlabelled_integer_leaves_pass_through() -> None:
    params = {
        "model": {"norm": {"weight": jnp.ones(2)}},
        "step": jnp.zeros((), jnp.int32),  # no dot: no label
        "mask": jnp.ones(3, bool),
    }
    tx = aggc()
    state = tx.init(params)
    grads = {
        "model": {"norm": {"weight": jnp.array([3.0, 4.0])}},
        "step": jnp.asarray(7, jnp.int32),
        "mask": jnp.array([True, False, True]),
    }
    out, state = jax.jit(tx.update)(grads, state)
    assert out["step"].dtype == jnp.int32 and int(out["step"]) == 7
    np.testing.assert_array_equal(out["mask"], grads["mask"])
    assert state.labels == ("norm",)


def test_integer_gradient_for_a_labelled_leaf_fails_when_traced() -> None:
    params = {"model": {"norm": {"weight": jnp.ones(2)}}}
    tx = aggc()
    state = tx.init(params)
    with pytest.raises(TypeError, match=r"leaf 'model.norm.weight' has a group label but dtype"):
        jax.jit(tx.update)({"model": {"norm": {"weight": jnp.ones(2, jnp.int32)}}}, state)


def test_labeler_returning_none_for_everything_is_the_no_label_error() -> None:
    params = {"model": {"norm": {"weight": jnp.ones(2)}}}
    with pytest.raises(ValueError, match=r"no parameter got a group label.*model.norm.weight"):
        aggc(param_labels=lambda name: None).init(params)


# ---------------------------------------------------------------------------
# Hyperparameters as arrays and tracers.


def test_concrete_array_hyperparameters_are_checked_like_numbers() -> None:
    aggc(ema_beta=jnp.asarray(0.9), low_mult=np.float32(0.5), max_down_scale=np.float64(0.9))
    with pytest.raises(ValueError, match=r"ema_beta must be in \[0.0, 1.0\), got 1.5"):
        aggc(ema_beta=jnp.asarray(1.5))
    with pytest.raises(ValueError, match=r"max_up_scale must be >= 1"):
        aggc(low_mult=0.5, max_up_scale=np.float32(0.5))


def _q_params() -> dict[str, Any]:
    return {
        "model": {
            "layers": {"0": {"self_attn": {"q_proj": {"weight": jnp.ones((2, 2))}}}},
            "norm": {"weight": jnp.ones(3)},
        }
    }


def _steps_of_grads(n: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    out = []
    for t in range(n):
        level = [1.0, 4.0, 0.3, 9.0][t % 4]
        leaves, treedef = jax.tree.flatten(_q_params())
        noisy = [jnp.asarray(level * rng.standard_normal(p.shape), jnp.float32) for p in leaves]
        out.append(jax.tree.unflatten(treedef, noisy))
    return out


def test_inject_hyperparams_under_jit_matches_plain_aggc() -> None:
    hyper = {
        "ema_beta": 0.9,
        "low_mult": 0.5,
        "high_mult": 1.5,
        "min_norm": 0.01,
        "max_up_scale": 1.1,
        "max_down_scale": 0.9,
    }
    injected = optax.inject_hyperparams(aggc)(**hyper)
    plain = aggc(**hyper)
    si, sp = injected.init(_q_params()), plain.init(_q_params())
    ui, up = jax.jit(injected.update), jax.jit(plain.update)
    for g in _steps_of_grads(10):
        oi, si = ui(g, si)
        op, sp = up(g, sp)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), oi, op)
    np.testing.assert_allclose(si.inner_state.ema, sp.ema, rtol=1e-6)


def test_injected_schedule_is_evaluated_per_step() -> None:
    sched = linear_bounds_schedule(0.5, 0.9, total_steps=10, switch_ratio=0.2, transition_ratio=0.3)
    injected = optax.inject_hyperparams(aggc)(high_mult=sched, low_mult=0.1, ema_beta=0.8)
    plain = aggc(high_mult=sched, low_mult=0.1, ema_beta=0.8)
    si, sp = injected.init(_q_params()), plain.init(_q_params())
    ui, up = jax.jit(injected.update), jax.jit(plain.update)
    for g in _steps_of_grads(12):
        oi, si = ui(g, si)
        op, sp = up(g, sp)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), oi, op)
    assert float(si.hyperparams["high_mult"]) == pytest.approx(0.9)


def test_out_of_domain_traced_hyperparameters_do_not_crash() -> None:
    injected = optax.inject_hyperparams(aggc)(ema_beta=0.9, max_down_scale=0.9, min_norm=0.1)
    state = injected.init(_q_params())
    for name, value in (("ema_beta", 1.5), ("max_down_scale", 3.0), ("min_norm", -1.0)):
        state.hyperparams[name] = jnp.asarray(value)
    g = _steps_of_grads(1)[0]
    out, new_state = jax.jit(injected.update)(g, state)  # computes; no check can run here
    assert jax.tree.structure(out) == jax.tree.structure(g)
    assert new_state.inner_state.ema.shape == (2,)
    # outside jit, inject_hyperparams rebuilds aggc from concrete values: they are checked
    with pytest.raises(ValueError, match=r"ema_beta must be in \[0.0, 1.0\), got 1.5"):
        injected.update(g, state)


def test_aggc_built_inside_jit_from_traced_values() -> None:
    params = _q_params()
    state = aggc().init(params)

    @jax.jit
    def step(beta: jax.Array, low: jax.Array, cap: jax.Array, g: Any, s: Any) -> Any:
        tx = aggc(ema_beta=beta, low_mult=low, max_down_scale=cap)
        return tx.update(g, s)

    grads = _steps_of_grads(3)
    s_traced, s_plain = state, state
    plain = aggc(ema_beta=0.8, low_mult=0.7, max_down_scale=0.95)
    plain_update = jax.jit(plain.update)
    for g in grads:
        o1, s_traced = step(jnp.asarray(0.8), jnp.asarray(0.7), jnp.asarray(0.95), g, s_traced)
        o2, s_plain = plain_update(g, s_plain)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), o1, o2)
