"""from_reference_options: the reference's option dict, defaults, schedule and quirks."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aggc_optax
from aggc_optax import REFERENCE_DEFAULTS, aggc, from_reference_options, group_stats, presets
from tests.spec_model import GRPO, LORA, SpecClipper, spec_label, spec_schedule

Q = "model.layers.0.self_attn.q_proj.weight"
UP = "model.layers.0.mlp.up_proj.weight"
V = "model.layers.0.self_attn.v_proj.weight"

# docs/reference-behaviour.md §8's observed setting: beta 0.9, interval [0.5, 2.0] x EMA,
# raise_small
FAULT = dict(enable=True, auto_bounds=True, ema_beta=0.9, low_mult=0.5, high_mult=2.0,
             raise_small=True)  # fmt: skip


def _model_for(options: dict, total_steps: int | None) -> SpecClipper:
    o = {**REFERENCE_DEFAULTS, **options}

    def mult(base: str, late: str):
        return lambda t: spec_schedule(
            t, o[base], o[late], total_steps, o["bounds_switch_ratio"],
            o["bounds_transition_ratio"], o["bounds_schedule"],
        )  # fmt: skip

    return SpecClipper(
        ema_beta=o["ema_beta"], low_mult=mult("low_mult", "low_mult_late"),
        high_mult=mult("high_mult", "high_mult_late"), min_norm=o["min_norm"],
        max_norm=o["max_norm"], auto_bounds=o["auto_bounds"], raise_small=o["raise_small"],
        max_up_scale=o["max_up_scale"], max_down_scale=o["max_down_scale"],
    )  # fmt: skip


def _trajectory(steps: int) -> list[dict[str, jax.Array]]:
    rng = np.random.default_rng(7)
    out = []
    for t in range(steps):
        scale_q = 40.0 if t % 9 == 4 else 1.0
        out.append(
            {
                Q: jnp.asarray(rng.normal(size=(6, 4)) * scale_q, jnp.float32),
                UP: jnp.asarray(rng.normal(size=(4, 8)) * (1 + 0.1 * t), jnp.float32),
                V: jnp.asarray(rng.normal(size=(6, 4)) * 1e-3, jnp.float32),
            }
        )
    return out


@pytest.mark.parametrize(
    ("options", "total_steps"),
    [(LORA, 30), (GRPO, 30), (LORA, None), (GRPO, 0), (dict(FAULT, max_down_scale=0.9), None)],
)
def test_recipes_match_the_float64_model_step_by_step(options: dict, total_steps) -> None:
    traj = _trajectory(30)
    tx = from_reference_options(options, total_steps=total_steps)
    model = _model_for(options, total_steps)
    labels = {n: spec_label(n) for n in traj[0]}
    state = tx.init(traj[0])
    update = jax.jit(tx.update)
    for t, g in enumerate(traj):
        out, state = update(g, state)
        want_out, want = model.step({n: np.asarray(a) for n, a in g.items()}, labels, t)
        stats = group_stats(state)
        for label, ws in want.items():
            for f in ("norm", "lower", "upper", "scale"):
                np.testing.assert_allclose(float(stats[label][f]), ws[f], rtol=2e-6, err_msg=f)
            np.testing.assert_allclose(float(stats[label]["ema"]), model.ema[label], rtol=2e-6)
        for n in g:
            np.testing.assert_allclose(np.asarray(out[n]), want_out[n], rtol=3e-6)


def test_the_schedule_is_inert_without_total_steps() -> None:
    g = {Q: jnp.ones(3)}
    with_t = from_reference_options(dict(LORA, bounds_switch_ratio=0.0,
                                         bounds_transition_ratio=0.0), total_steps=4)  # fmt: skip
    without = from_reference_options(dict(LORA, bounds_switch_ratio=0.0), total_steps=None)
    uppers = {}
    for name, tx in (("with", with_t), ("without", without)):
        state = tx.init(g)
        for _ in range(3):
            _, state = tx.update(g, state)
        s = group_stats(state)["q_proj"]
        uppers[name] = float(s["upper"]) / float(s["lower"])  # = high / low for these norms
    assert uppers["with"] == pytest.approx(0.7 / 0.98, rel=1e-6)
    assert uppers["without"] == pytest.approx(0.6 / 0.95, rel=1e-6)


def test_enable_false_is_identity() -> None:
    tx = from_reference_options({})
    g = {Q: jnp.full(3, 1e9)}
    state = tx.init(g)
    out, _ = tx.update(g, state)
    np.testing.assert_array_equal(out[Q], g[Q])
    with pytest.raises(ValueError, match="no AGGC state"):
        group_stats(state)


def test_unknown_and_mistyped_options() -> None:
    with pytest.raises(ValueError, match="unknown option 'ema_decay'"):
        from_reference_options({"enable": True, "ema_decay": 0.9})
    with pytest.raises(TypeError, match="auto_bounds must be a bool, got 'yes'"):
        from_reference_options({"enable": True, "auto_bounds": "yes"})
    with pytest.raises(TypeError, match="bounds_schedule must be a str"):
        from_reference_options({"enable": True, "bounds_schedule": 1})
    with pytest.raises(TypeError, match="options must be a mapping"):
        from_reference_options([("enable", True)])  # type: ignore[arg-type]


@pytest.mark.parametrize("norm_type", [1.0, 3.0, math.inf])
def test_norm_type_has_no_effect(norm_type: float) -> None:
    traj = _trajectory(6)
    results = []
    for nt in (2.0, norm_type):
        tx = from_reference_options(dict(FAULT, norm_type=nt))
        state = tx.init(traj[0])
        for g in traj:
            out, state = tx.update(g, state)
        results.append((out, state.ema))
    np.testing.assert_array_equal(results[0][1], results[1][1])
    np.testing.assert_array_equal(results[0][0][Q], results[1][0][Q])


def test_out_of_range_caps_invert_as_in_the_reference() -> None:
    # docs/reference-behaviour.md §4: max_down_scale = 1.5 makes every "clip down" multiply by 1.5
    g0, g1 = {Q: jnp.array([3.0, 4.0])}, {Q: jnp.array([30.0, 40.0])}
    tx = from_reference_options(dict(FAULT, max_down_scale=1.5))
    state = tx.init(g0)
    _, state = tx.update(g0, state)
    out, state = tx.update(g1, state)
    assert float(group_stats(state)["q_proj"]["scale"]) == 1.5
    np.testing.assert_allclose(out[Q], [45.0, 60.0])
    with pytest.raises(ValueError, match=r"max_down_scale must be in \(0, 1\)"):
        aggc(max_down_scale=1.5)


def test_nothing_labelled_disables_like_the_reference() -> None:
    tx = from_reference_options(FAULT)
    g = {"logit_scale": jnp.full((2,), 7.0)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = tx.init(g)
    assert any("disables itself" in str(w.message) for w in caught)
    out, _ = tx.update(g, state)
    np.testing.assert_array_equal(out["logit_scale"], g["logit_scale"])


def _fault_run(options: dict, bad: float, steps: int = 7) -> list[tuple[dict, dict]]:
    """The run of docs/reference-behaviour.md §8: clean steps, one bad entry in q_proj at
    step 3, clean again."""
    rng = np.random.default_rng(11)
    tx = from_reference_options(options)
    gs = []
    for t in range(steps):
        q = rng.normal(size=(8,)).astype(np.float32)
        if t == 3:
            q[2] = bad
        gs.append({Q: jnp.asarray(q), UP: jnp.asarray(rng.normal(size=(8,)), jnp.float32)})
    state = tx.init(gs[0])
    results = []
    for g in gs:
        out, state = jax.jit(tx.update)(g, state)
        results.append((out, group_stats(state)))
    return results


def test_nan_disables_the_group_for_the_rest_of_the_run() -> None:
    res = _fault_run(FAULT, np.nan)
    out3, s3 = res[3]
    assert math.isnan(float(s3["q_proj"]["norm"]))
    assert float(s3["q_proj"]["scale"]) == 1.0  # no branch taken
    assert np.isnan(np.asarray(out3[Q])[2]) and np.isfinite(np.asarray(out3[Q])[[0, 1, 3]]).all()
    assert math.isnan(float(s3["q_proj"]["ema"]))
    for _, s in res[4:]:
        # Python's max(0.0, nan) == 0.0: upper 0, lower = min_norm = 0: never clipped again
        assert float(s["q_proj"]["upper"]) == 0.0 and float(s["q_proj"]["lower"]) == 0.0
        assert float(s["q_proj"]["scale"]) == 1.0
        assert math.isfinite(float(s["up_proj"]["ema"]))  # the other group is unaffected


def test_inf_without_caps_zeroes_the_group_and_poisons_the_ema() -> None:
    out3, s3 = _fault_run(FAULT, np.inf)[3]
    assert float(s3["q_proj"]["scale"]) == 0.0
    q = np.asarray(out3[Q])
    assert np.isnan(q[2]) and (q[[0, 1, 3, 4, 5, 6, 7]] == 0).all()
    assert math.isnan(float(s3["q_proj"]["ema"]))


def test_inf_with_caps_raises_the_group_by_max_up_scale_forever() -> None:
    res = _fault_run(dict(FAULT, max_down_scale=0.9, max_up_scale=1.1), np.inf, steps=9)
    out3, s3 = res[3]
    assert float(s3["q_proj"]["scale"]) == pytest.approx(0.9)
    assert np.isinf(np.asarray(out3[Q])[2])
    assert math.isinf(float(s3["q_proj"]["ema"]))
    for _, s in res[4:]:
        assert math.isinf(float(s["q_proj"]["lower"])) and math.isinf(float(s["q_proj"]["upper"]))
        assert float(s["q_proj"]["scale"]) == pytest.approx(1.1)


def test_the_lora_recipe_without_its_ramp_in_aggc_terms() -> None:
    # raise_small=False: the recipe's low_mult, min_norm and max_up_scale do nothing,
    # so aggc() without them clips the same; only the reported lower bound differs
    traj = _trajectory(12)
    a = aggc(ema_beta=0.95, high_mult=0.6, max_down_scale=0.9, ema_init="zero")
    b = from_reference_options({**LORA, "bounds_schedule": "none"}, nonfinite="skip")
    sa, sb = a.init(traj[0]), b.init(traj[0])
    for g in traj:
        oa, sa = a.update(g, sa)
        ob, sb = b.update(g, sb)
        jax.tree.map(np.testing.assert_array_equal, oa, ob)
        np.testing.assert_array_equal(sa.upper, sb.upper)
        assert (np.asarray(sa.lower) == 0).all() and (np.asarray(sb.lower) >= 0.01).all()
    np.testing.assert_array_equal(sa.ema, sb.ema)
    assert optax.tree.get(sa, "count") == 12


# unchecked array options and typos --------------------------------------


def test_float_array_raise_small_is_rejected() -> None:
    with pytest.raises(TypeError, match=r"\['raise_small'\] must be a bool"):
        aggc_optax.from_reference_options(
            {"enable": True}, group_hyperparams={"q_proj": {"raise_small": jnp.array(0.3)}}
        )
    with pytest.raises(TypeError, match="raise_small must be a bool"):
        aggc_optax.from_reference_options({"enable": True, "raise_small": jnp.array(0.3)})
    # a per-group vector is refused, naming the parameter and the shape
    with pytest.raises(TypeError, match=r"\['raise_small'\].*shape \(2,\)"):
        aggc_optax.from_reference_options(
            {"enable": True},
            group_hyperparams={"q_proj": {"raise_small": jnp.array([True, False])}},
        )
    with pytest.raises(TypeError, match="auto_bounds must be a bool"):
        aggc_optax.from_reference_options({"enable": True, "auto_bounds": jnp.array([True])})


def test_capital_linear_warns_and_is_none_as_in_the_reference() -> None:
    with pytest.warns(UserWarning, match="bounds_schedule='Linear' is not 'linear'"):
        aggc_optax.from_reference_options(
            {"enable": True, "bounds_schedule": "Linear", "high_mult_late": 0.7}, total_steps=10
        )


def test_late_multipliers_without_total_steps_warn() -> None:
    with pytest.warns(UserWarning, match="total_steps is None"):
        aggc_optax.from_reference_options(
            {"enable": True, "bounds_schedule": "linear", "high_mult_late": 0.7}
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        presets.grpo()  # the recipe as the authors ran it: documented, no warning
