"""The options beyond the reference (issue 9): EMA start, bias correction, the paper's
variant, per-group hyperparameters, any optax schedule, event counts.

Every expectation is a number computed by hand (written out below) or comes from
the float64 model in tests/spec_model.py (GroupModel), never from the code under test.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aggc_optax import aggc, from_reference_options, group_stats
from tests.spec_model import GroupModel, aggc_options, spec_label

Q = "model.layers.0.self_attn.q_proj.weight"
K = "model.layers.0.self_attn.k_proj.weight"
V = "model.layers.0.self_attn.v_proj.weight"
UP = "model.layers.0.mlp.up_proj.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"
NORM = "model.norm.weight"

# A plain interval with raising, no caps, the reference's zero start: the clipping
# is easy to follow by hand.
PLAIN = dict(ema_beta=0.9, low_mult=0.5, high_mult=2.0, min_norm=0.0, ema_init="zero")


def _aggc(**kw):
    """aggc() with PLAIN, ``kw`` overriding it."""
    return aggc(**{**PLAIN, **kw})


def _model(**kw) -> GroupModel:
    """The float64 model of ``_aggc(**kw)``, from aggc()'s documented arguments."""
    return GroupModel(**aggc_options(**{**PLAIN, **kw}))


def _vec(norm: float) -> dict[str, jax.Array]:
    # [0.6, 0.8] has norm 1, so the group norm is `norm` (NaN/inf propagate)
    return {Q: jnp.asarray([0.6 * norm, 0.8 * norm], jnp.float32)}


def _run_q(tx: optax.GradientTransformation, norms: list[float]):
    """Runs one q_proj group through the given norms; per-step (output, stats)."""
    state = tx.init(_vec(1.0))
    update = jax.jit(tx.update)
    out = []
    for n in norms:
        g, state = update(_vec(n), state)
        out.append((g, group_stats(state)["q_proj"]))
    return out, state


# Norms 10, 10, 50, 1 through a beta=0.9, [0.5, 2] x EMA interval, by hand:
HAND = {
    # zero start: step 0 untouched (upper 0), then the bounds are 0.1x too small
    ("reference", "zero"): dict(scale=[1.0, 0.2, 0.044, 1.0], ema=1.189, down=2, up=0),
    # EMA starts at 10: [5, 20]; 50 -> 20/50; EMA 9 + 2 = 11; 1 < 5.5 -> x5.5
    ("reference", "first"): dict(scale=[1.0, 1.0, 0.4, 5.5], ema=10.45, down=1, up=1),
    # EMA 1, 1.9, 3.71 over 1 - 0.9^n = 0.1, 0.19, 0.271 -> 10, 10, 13.690037
    ("reference", "bias_corrected"): dict(
        scale=[1.0, 1.0, 0.4, 0.5 * 3.71 / 0.271], ema=3.339 + 0.05 * 3.71 / 0.271, down=1, up=1
    ),
    # S_t = 0.9 S + 0.1 n (raw norms, this step included): 1, 1.9, 6.71, 6.139
    ("paper", "zero"): dict(scale=[0.2, 0.38, 13.42 / 50, 3.0695], ema=6.139, down=3, up=1),
    # S_t: 10, 10, 14, 12.7
    ("paper", "first"): dict(scale=[1.0, 1.0, 0.56, 6.35], ema=12.7, down=1, up=1),
    # S_t / (1 - 0.9^(t+1)): 10, 10, 6.71/0.271, 6.139/0.3439
    ("paper", "bias_corrected"): dict(
        scale=[1.0, 1.0, 2 * 6.71 / 0.271 / 50, 0.5 * 6.139 / 0.3439], ema=6.139, down=1, up=1
    ),
}


@pytest.mark.parametrize(("variant", "ema_init"), list(HAND))
def test_hand_computed_four_step_trajectories(variant, ema_init) -> None:
    want = HAND[(variant, ema_init)]
    tx = _aggc(variant=variant, ema_init=ema_init)
    norms = [10.0, 10.0, 50.0, 1.0]
    steps, state = _run_q(tx, norms)
    model = _model(variant=variant, ema_init=ema_init)
    for t, ((g, stats), n, scale) in enumerate(zip(steps, norms, want["scale"])):
        assert float(stats["scale"]) == pytest.approx(scale, rel=1e-5), t
        assert model.step(n, t)["scale"] == pytest.approx(scale, rel=1e-9), t  # model agrees
        np.testing.assert_allclose(np.asarray(g[Q]), np.array([0.6, 0.8]) * n * scale, rtol=1e-5)
    final = group_stats(state)["q_proj"]
    assert float(final["ema"]) == pytest.approx(want["ema"], rel=1e-5)
    assert int(final["clip_down_count"]) == want["down"]
    assert int(final["raise_count"]) == want["up"]
    assert int(state.ema_count[0]) == 4


@pytest.mark.parametrize("variant", ["reference", "paper"])
def test_first_start_waits_for_a_non_zero_norm(variant) -> None:
    # GRPO's first step from the reference policy can be exactly zero. Norms 0, 0, 4,
    # 4, 20 with aggc()'s defaults (beta 0.99, bounds 3x EMA, no raising), by hand:
    # the zero steps are not taken (EMA unstarted, count 0, gradients as they are);
    # the EMA starts at 4, so 4 passes and 20 is cut to the upper bound 3 * 4 = 12
    # (the paper variant's EMA includes this step: 0.99 * 4 + 0.01 * 20 = 4.16 -> 12.48).
    tx = aggc(variant=variant)
    steps, state = _run_q(tx, [0.0, 0.0, 4.0, 4.0, 20.0])
    for g, stats in steps[:2]:
        assert float(stats["scale"]) == 1.0
        assert float(stats["ema"]) == 0.0
        np.testing.assert_array_equal(np.asarray(g[Q]), [0.0, 0.0])
    assert [float(s["scale"]) for _, s in steps[2:4]] == [1.0, 1.0]
    upper = 12.0 if variant == "reference" else 3 * (0.99 * 4 + 0.01 * 20)
    assert float(steps[4][1]["scale"]) == pytest.approx(upper / 20, rel=1e-5)
    np.testing.assert_allclose(np.asarray(steps[4][0][Q]), [0.6 * upper, 0.8 * upper], rtol=1e-5)
    assert int(state.ema_count[0]) == 3
    model = GroupModel(**aggc_options(variant=variant, high_mult=3.0, ema_init="first"))
    for t, n in enumerate([0.0, 0.0, 4.0, 4.0, 20.0]):
        assert model.step(n, t)["scale"] == pytest.approx(float(steps[t][1]["scale"]), rel=1e-6)


def test_paper_variant_step_zero_clips_to_one_minus_beta_times_high() -> None:
    # docs/reference-behaviour.md §6 taken literally: S_0 = (1 - beta) n, so U_0 = (1 - beta) high n
    for beta in (0.9, 0.99):
        (_, stats), *_ = _run_q(_aggc(ema_beta=beta, variant="paper"), [7.0])[0]
        assert float(stats["scale"]) == pytest.approx((1 - beta) * 2.0, rel=1e-5)
        # ...while the EMA is fed the raw norm, not the clipped one
        assert float(stats["ema"]) == pytest.approx((1 - beta) * 7.0, rel=1e-5)


def test_warm_start_and_bias_correction_remove_the_warmup_collapse() -> None:
    # a steady norm of 3: the zero start clips step 1 to 0.2 (upper 2 * 0.1 * 3) and
    # keeps clipping while its clipped EMA recovers by about 10% a step; a warm
    # start or bias correction see the steady norm at once and never clip
    norms = [3.0] * 30
    counts = {}
    for name, kw in {
        "zero": {},
        "first": {"ema_init": "first"},
        "bias": {"ema_init": "bias_corrected"},
        "paper_first": {"variant": "paper", "ema_init": "first"},
    }.items():
        steps, state = _run_q(_aggc(**kw), norms)
        counts[name] = int(group_stats(state)["q_proj"]["clip_down_count"])
        if name == "zero":
            assert float(steps[1][1]["scale"]) == pytest.approx(0.2, rel=1e-5)
        else:
            assert all(float(s["scale"]) == 1.0 for _, s in steps)
            assert float(steps[-1][1]["upper"]) == pytest.approx(6.0, rel=1e-5)
    assert counts["zero"] >= 10
    assert counts["first"] == counts["bias"] == counts["paper_first"] == 0


def test_variant_and_ema_init_are_checked() -> None:
    with pytest.raises(ValueError, match="variant must be one of"):
        aggc(variant="Paper")
    with pytest.raises(ValueError, match="ema_init must be one of"):
        aggc(ema_init="warm")


def test_skipped_nonfinite_steps_do_not_count_as_ema_updates() -> None:
    # paper + bias correction, norms 10, NaN, 10, 50: the NaN step passes through,
    # keeps S = 1 and n = 1, so step 2 sees S = 1.9 over 1 - 0.9^2 (= 10, untouched)
    # and step 3 S = 6.71 over 1 - 0.9^3 (upper 49.52, 50 clipped by 0.99041)
    tx = _aggc(variant="paper", ema_init="bias_corrected")
    steps, state = _run_q(tx, [10.0, math.nan, 10.0, 50.0])
    assert [float(s["scale"]) for _, s in steps[:3]] == [1.0, 1.0, 1.0]
    assert float(steps[3][1]["scale"]) == pytest.approx(2 * 6.71 / 0.271 / 50, rel=1e-5)
    assert np.isnan(np.asarray(steps[1][0][Q])).all()  # passed through as it came
    assert float(steps[1][1]["ema"]) == pytest.approx(1.0, rel=1e-6)
    assert int(state.ema_count[0]) == 3 and int(state.count) == 4
    assert int(state.clip_down_count[0]) == 1 and int(state.raise_count[0]) == 0


def test_warm_start_waits_for_the_first_finite_norm() -> None:
    for variant in ("reference", "paper"):
        steps, _ = _run_q(_aggc(ema_init="first", variant=variant), [math.inf, 10.0, 50.0])
        assert float(steps[0][1]["ema"]) == 0.0  # inf skipped: still no EMA
        assert float(steps[1][1]["scale"]) == 1.0  # EMA starts at 10: [5, 20]
        want = 0.4 if variant == "reference" else 28.0 / 50.0  # S = 9 + 5 = 14
        assert float(steps[2][1]["scale"]) == pytest.approx(want, rel=1e-5)


def test_paper_variant_with_reference_nonfinite_matches_the_model() -> None:
    # nonfinite="reference" keeps the reference's NaN semantics in the paper variant
    # too: Python's max(0.0, nan) is 0.0, so the group is never clipped again
    norms = [10.0, 12.0, math.nan, 500.0, 0.01]
    tx = from_reference_options(FAULT, variant="paper")
    steps, _ = _run_q(tx, norms)
    model = _model(variant="paper", nonfinite="reference")
    for t, ((_, stats), n) in enumerate(zip(steps, norms)):
        want = model.step(n, t)
        for f in ("lower", "upper", "scale"):
            np.testing.assert_allclose(float(stats[f]), want[f], rtol=1e-5, err_msg=f"{t} {f}")
    assert float(steps[3][1]["upper"]) == 0.0 and float(steps[3][1]["scale"]) == 1.0


# The reference's options for PLAIN.
FAULT = dict(enable=True, auto_bounds=True, ema_beta=0.9, low_mult=0.5, high_mult=2.0,
             raise_small=True)  # fmt: skip


# --- a multi-group trajectory against the model --------------------------------------

SHAPES = {Q: (6, 4), K: (6, 4), V: (6, 4), UP: (4, 8), DOWN: (8, 4), NORM: (8,)}


def _trajectory(steps: int, seed: int = 3) -> list[dict[str, jax.Array]]:
    rng = np.random.default_rng(seed)
    out = []
    for t in range(steps):
        level = {Q: 1.0, K: 2.0, V: 0.5, UP: 1 + 0.1 * t, DOWN: 3.0, NORM: 0.05}
        if t % 7 == 3:
            level[Q] *= 30.0  # bursts
        if t % 5 == 2:
            level[UP] *= 0.02  # collapses, to exercise raising
        out.append(
            {n: jnp.asarray(rng.normal(size=s) * level[n], jnp.float32) for n, s in SHAPES.items()}
        )
    return out


def _group_norms(g: dict[str, jax.Array]) -> dict[str, float]:
    sums: dict[str, float] = {}
    for name, a in g.items():
        x = np.asarray(a, np.float64)
        sums[spec_label(name)] = sums.get(spec_label(name), 0.0) + float(np.sum(x * x))
    return {label: math.sqrt(s + 1e-16) for label, s in sums.items()}


def _check_against_models(tx, models: dict[str, GroupModel], traj, rtol: float = 2e-5) -> None:
    state = tx.init(traj[0])
    update = jax.jit(tx.update)
    for t, g in enumerate(traj):
        out, state = update(g, state)
        stats = group_stats(state)
        norms = _group_norms(g)
        want = {label: models[label].step(norms[label], t) for label in models}
        for label, w in want.items():
            for f in ("norm", "lower", "upper", "scale", "ema"):
                np.testing.assert_allclose(
                    float(stats[label][f]), w[f], rtol=rtol, atol=1e-30, err_msg=f"{t} {label} {f}"
                )
            assert int(stats[label]["clip_down_count"]) == models[label].clip_down_count
            assert int(stats[label]["raise_count"]) == models[label].raise_count
        for name in g:
            scale = want[spec_label(name)]["scale"]
            np.testing.assert_allclose(
                np.asarray(out[name]), np.asarray(g[name], np.float64) * scale, rtol=rtol
            )


@pytest.mark.parametrize(
    "kw",
    [
        dict(ema_init="first"),
        dict(ema_init="bias_corrected"),
        dict(variant="paper"),
        dict(variant="paper", ema_init="first", max_down_scale=0.5, max_up_scale=2.0),
        dict(low_mult=None, min_norm=None, ema_init="first", max_down_scale=0.7),  # no raising
    ],
)
def test_multi_group_trajectory_matches_the_model(kw: dict) -> None:
    traj = _trajectory(25)
    labels = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj", "norm")
    models = {label: _model(**kw) for label in labels}
    _check_against_models(_aggc(**kw), models, traj)


# --- per-group hyperparameters ------------------------------------------------------

GROUP_HPARAMS = {
    # exact label: wins over every pattern; fields it leaves out take aggc()'s
    # arguments (beta 0.9), not the pattern below (0.5)
    "q_proj": {"high_mult": 1.5},
    # tighter bounds (and a faster EMA, a floor on down-scaling) for the rest of attention
    "[qkvo]_proj": {"high_mult": 1.2, "ema_beta": 0.5, "max_down_scale": 0.8},
    # the MLP: no raising (no lower bound), a floor on down-scaling
    "(up|down)_proj": {"low_mult": None, "min_norm": None, "max_down_scale": 0.7},
    # never reached by the MLP: the first matching pattern wins
    ".*_proj": {"ema_beta": 0.99},
    # catch-all, last: only "norm" gets here
    ".*": {"max_up_scale": 3.0, "low_mult": optax.piecewise_constant_schedule(0.5, {4: 2.0})},
}


def test_per_group_hyperparameters_by_hand() -> None:
    # two steps, q_proj and k_proj only: step 0 untouched (zero start), EMAs
    # 0.1 * 10 = 1 (q, beta 0.9) and 0.5 * 10 = 5 (k, beta 0.5); step 1 with norm
    # 50: q upper 1.5 * 1 -> scale 0.03; k upper 1.2 * 5 = 6 -> 0.12, floored to 0.8
    tx = _aggc(group_hyperparams=GROUP_HPARAMS)
    params = {Q: jnp.zeros(2), K: jnp.zeros(2)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the MLP and norm keys match no group here
        state = tx.init(params)
    update = jax.jit(tx.update)
    for n in (10.0, 50.0):
        g = {Q: jnp.asarray([0.6 * n, 0.8 * n]), K: jnp.asarray([0.8 * n, 0.6 * n])}
        _, state = update(g, state)
    s = group_stats(state)
    assert float(s["q_proj"]["upper"]) == pytest.approx(1.5, rel=1e-6)
    assert float(s["q_proj"]["scale"]) == pytest.approx(0.03, rel=1e-5)
    assert float(s["q_proj"]["ema"]) == pytest.approx(0.9 + 0.1 * 1.5, rel=1e-5)
    assert float(s["k_proj"]["upper"]) == pytest.approx(6.0, rel=1e-6)
    assert float(s["k_proj"]["scale"]) == pytest.approx(0.8, rel=1e-6)
    assert float(s["k_proj"]["ema"]) == pytest.approx(2.5 + 0.5 * 40.0, rel=1e-5)


def test_per_group_hyperparameters_trajectory_matches_per_group_models() -> None:
    traj = _trajectory(20, seed=11)

    def norm_low(t: int) -> float:
        return 0.5 if t < 4 else 1.0  # piecewise_constant_schedule(0.5, {4: 2.0})

    models = {
        "q_proj": _model(high_mult=1.5),
        "k_proj": _model(high_mult=1.2, ema_beta=0.5, max_down_scale=0.8),
        "v_proj": _model(high_mult=1.2, ema_beta=0.5, max_down_scale=0.8),
        "up_proj": _model(low_mult=None, min_norm=None, max_down_scale=0.7),
        "down_proj": _model(low_mult=None, min_norm=None, max_down_scale=0.7),
        "norm": _model(max_up_scale=3.0, low_mult=norm_low),
    }
    _check_against_models(_aggc(group_hyperparams=GROUP_HPARAMS), models, traj)


def test_group_hyperparams_combine_with_the_paper_variant_and_warm_start() -> None:
    traj = _trajectory(15, seed=5)
    gh = {"[qkv]_proj": {"high_mult": 1.1, "ema_beta": 0.7}}
    opts = dict(variant="paper", ema_init="first")
    models = {
        label: _model(**opts, **(gh["[qkv]_proj"] if label[0] in "qkv" else {}))
        for label in ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj", "norm")
    }
    _check_against_models(_aggc(**opts, group_hyperparams=gh), models, traj)


def test_group_hyperparams_errors_name_the_entry() -> None:
    with pytest.raises(ValueError, match=r"group_hyperparams\['q_proj'\]: unknown.*'beta'"):
        aggc(group_hyperparams={"q_proj": {"beta": 0.9}})
    with pytest.raises(ValueError, match=r"group_hyperparams\['q_proj'\]\['ema_beta'\].*1.0"):
        aggc(group_hyperparams={"q_proj": {"ema_beta": 1.0}})
    with pytest.raises(ValueError, match=r"group_hyperparams\['k'\]\['max_down_scale'\]"):
        aggc(group_hyperparams={"k": {"max_down_scale": 1.5}})
    with pytest.raises(ValueError, match=r"group_hyperparams\['k'\]: max_up_scale caps"):
        aggc(group_hyperparams={"k": {"max_up_scale": 1.5}})  # nothing raised in that group
    with pytest.raises(ValueError, match=r"unknown hyperparameter 'raise_small'"):
        aggc(group_hyperparams={"k": {"raise_small": True}})  # low_mult turns raising on
    # not a valid pattern, so an exact label (docs/reliability.md); accepted
    aggc(group_hyperparams={"(q": {"ema_beta": 0.9}})
    with pytest.raises(TypeError, match="mapping"):
        aggc(group_hyperparams=[("q_proj", {"ema_beta": 0.9})])
    with pytest.raises(TypeError, match=r"group_hyperparams\['q_proj'\] must be a mapping"):
        aggc(group_hyperparams={"q_proj": 0.9})


def test_a_key_that_matches_no_group_warns_at_init() -> None:
    tx = aggc(group_hyperparams={"attn": {"high_mult": 0.5}, "q_proj": {"high_mult": 0.5}})
    with pytest.warns(UserWarning, match="'attn' matches no group label"):
        tx.init({Q: jnp.ones(2)})
    tx = aggc(group_hyperparams={"q_proj|k_proj": {"high_mult": 0.5}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tx.init({Q: jnp.ones(2)})  # a pattern matching some group is fine


# --- any optax schedule for the multipliers -----------------------------------------


def _cosine(t: int, init: float, steps: int, alpha: float) -> float:
    c = 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps))
    return init * ((1 - alpha) * c + alpha)


SCHEDULES = {
    "cosine": (
        optax.cosine_decay_schedule(0.9, decay_steps=10, alpha=0.5),
        optax.cosine_decay_schedule(3.0, decay_steps=10, alpha=0.4),
        lambda t: _cosine(t, 0.9, 10, 0.5),
        lambda t: _cosine(t, 3.0, 10, 0.4),
    ),
    "piecewise": (
        optax.piecewise_constant_schedule(0.5, {3: 0.5, 8: 1.6}),
        optax.piecewise_constant_schedule(2.5, {5: 0.5}),
        lambda t: 0.5 * (0.5 if t >= 3 else 1.0) * (1.6 if t >= 8 else 1.0),
        lambda t: 2.5 * (0.5 if t >= 5 else 1.0),
    ),
    "joined": (
        optax.join_schedules(
            [optax.constant_schedule(0.5), optax.linear_schedule(0.5, 0.9, 6)], [4]
        ),
        optax.join_schedules(
            [optax.constant_schedule(2.0), optax.exponential_decay(2.0, 1, 0.9)], [6]
        ),
        lambda t: 0.5 if t < 4 else 0.5 + 0.4 * min(t - 4, 6) / 6,
        lambda t: 2.0 if t < 6 else 2.0 * 0.9 ** (t - 6),
    ),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_optax_schedules_for_the_multipliers(name: str) -> None:
    low, high, low_hand, high_hand = SCHEDULES[name]
    traj = _trajectory(16, seed=2)
    models = {
        label: _model(low_mult=low_hand, high_mult=high_hand)
        for label in ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj", "norm")
    }
    _check_against_models(_aggc(low_mult=low, high_mult=high), models, traj)


def test_schedule_value_is_the_one_used_at_each_step() -> None:
    # constant norm 4, warm start, no clipping while 0.5 < 1 < high: each step's
    # upper is high(t) * 4 exactly, read back from the state
    sched = optax.cosine_decay_schedule(3.0, decay_steps=8, alpha=0.5)
    steps, _ = _run_q(_aggc(high_mult=sched, ema_init="first"), [4.0] * 10)
    for t, (_, s) in enumerate(steps):
        assert float(s["upper"]) == pytest.approx(4.0 * _cosine(t, 3.0, 8, 0.5), rel=1e-5)


def test_a_schedule_that_returns_a_vector_is_rejected() -> None:
    with pytest.raises(ValueError, match="high_mult: a schedule must return a scalar"):
        aggc(high_mult=lambda count: jnp.ones(2) * count)


# --- event counts ---------------------------------------------------------------------


def test_counts_accumulate_from_the_start_and_survive_optax_wrappers() -> None:
    tx = optax.chain(_aggc(ema_init="first"), optax.sgd(0.1))
    norms = [10.0, 50.0, 1.0, 50.0, 10.0, 1.0, 1.0]
    # EMA from 10: 50 down (EMA 11), 1 up (10.45), 50 down (11.495), 10 inside
    # [5.75, 22.99] (11.3455), then 1 up twice (lower 5.67, then 5.39)
    g0 = _vec(1.0)
    state = tx.init(g0)
    update = jax.jit(tx.update)
    downs, ups = [], []
    for n in norms:
        _, state = update(_vec(n), state, g0)
        s = group_stats(state)["q_proj"]
        downs.append(int(s["clip_down_count"]))
        ups.append(int(s["raise_count"]))
        assert s["clip_down_count"].dtype == jnp.int32
    assert downs == [0, 1, 1, 2, 2, 2, 2]
    assert ups == [0, 0, 1, 1, 1, 2, 3]


# --- from_reference_options: the options exist there too, off by default ---------------


def test_from_reference_options_defaults_are_the_reference() -> None:
    norms = [10.0, 10.0, 50.0, 1.0]
    ref, _ = _run_q(from_reference_options(FAULT), norms)
    assert [float(s["scale"]) for _, s in ref] == pytest.approx(
        HAND[("reference", "zero")]["scale"], rel=1e-5
    )
    for key in HAND:
        variant, ema_init = key
        tx = from_reference_options(FAULT, variant=variant, ema_init=ema_init)
        steps, _ = _run_q(tx, norms)
        assert [float(s["scale"]) for _, s in steps] == pytest.approx(HAND[key]["scale"], rel=1e-5)


def test_from_reference_options_nonfinite_skip_keeps_the_group_alive() -> None:
    norms = [10.0, 10.0, math.nan, 50.0]
    ref, _ = _run_q(from_reference_options(FAULT), norms)
    skip, _ = _run_q(from_reference_options(FAULT, nonfinite="skip"), norms)
    assert (
        float(ref[3][1]["upper"]) == 0.0 and float(ref[3][1]["scale"]) == 1.0
    )  # docs/reference-behaviour.md §8
    # skip, by hand: EMA 1, then 0.9 + 0.1 * 2 = 1.1, kept through the NaN: upper 2.2
    assert float(skip[3][1]["upper"]) == pytest.approx(2.2, rel=1e-6)
    assert float(skip[3][1]["scale"]) == pytest.approx(2.2 / 50, rel=1e-5)


def test_from_reference_options_group_hyperparams_and_schedule_errors() -> None:
    tx = from_reference_options(FAULT, group_hyperparams={"q_proj": {"high_mult": 1.5}})
    steps, _ = _run_q(tx, [10.0, 50.0])
    assert float(steps[1][1]["upper"]) == pytest.approx(1.5, rel=1e-6)
    sched = optax.linear_schedule(2.0, 1.0, 10)
    with pytest.raises(ValueError, match=r"high_mult is a schedule.*bounds_schedule='none'"):
        from_reference_options(
            dict(FAULT, high_mult=sched, bounds_schedule="linear"), total_steps=5
        )
    # without the linear ramp, a schedule goes straight through
    steps, _ = _run_q(from_reference_options(dict(FAULT, high_mult=sched)), [10.0, 50.0])
    assert float(steps[1][1]["upper"]) == pytest.approx(1.0 * 1.9, rel=1e-6)


def test_an_exact_label_wins_even_after_a_matching_pattern() -> None:
    # step 0 untouched (zero start), EMA 0.1 * 10 = 1; step 1 upper = high_mult * 1
    gh = {"[qk]_proj": {"high_mult": 1.2}, "q_proj": {"high_mult": 1.5}}
    tx = _aggc(group_hyperparams=gh)
    params = {Q: jnp.zeros(2), K: jnp.zeros(2)}
    state, update = tx.init(params), jax.jit(tx.update)
    for n in (10.0, 50.0):
        _, state = update({Q: jnp.asarray([0.6 * n, 0.8 * n]), K: jnp.asarray([n, 0.0])}, state)
    s = group_stats(state)
    assert float(s["q_proj"]["upper"]) == pytest.approx(1.5, rel=1e-6)
    assert float(s["k_proj"]["upper"]) == pytest.approx(1.2, rel=1e-6)
