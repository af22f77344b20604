"""presets.zclip, presets.skip_step and presets.group_zscore against hand computation.

Each rule is also written out here as an independent float64 NumPy model (from
the docstrings' math, not from the code under test) and compared over random
gradient sequences with spikes, with and without ``jax.jit``.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aggc_optax
from aggc_optax import presets

# --- independent float64 models ----------------------------------------------


def zclip_model(norms, alpha=0.97, z_thresh=2.5, warmup=25, max_norm=None, eps=1e-6,
                clip_option="adaptive_scaling", clip_factor=1.0):  # fmt: skip
    """Per step: the factor ZClip applies, from the global norms alone."""
    buf, mean, var, out = [], None, None, []
    for n in norms:
        if mean is None:
            buf.append(n)
            if len(buf) == warmup:
                mean = sum(buf) / len(buf)
                var = sum((x - mean) ** 2 for x in buf) / len(buf)
            limit = n if max_norm is None else min(n, max_norm)
            out.append(limit / (n + 1e-6) if n > limit else 1.0)
            continue
        std = math.sqrt(var)
        z = (n - mean) / (std + eps)
        if z > z_thresh:
            if clip_option == "mean":
                c = mean
            else:
                c = (mean + z_thresh * std / (z / z_thresh)) * clip_factor
        else:
            c = n
        limit = c if max_norm is None else min(c, max_norm)
        out.append(limit / (n + 1e-6) if n > limit else 1.0)
        mean = alpha * mean + (1 - alpha) * c
        var = alpha * var + (1 - alpha) * (c - mean) ** 2
    return np.asarray(out)


def skip_model(norms, losses, window=128, sigma=6.0, min_history=64):
    """Per step: True where the step is skipped."""
    hist_n, hist_l, out = [], [], []
    for n, loss in zip(norms, losses):
        skip = False
        if len(hist_n) >= min_history:
            hn, hl = np.asarray(hist_n[-window:]), np.asarray(hist_l[-window:])
            skip = (n > hn.mean() + sigma * hn.std(ddof=1)) or (
                loss is not None and loss > hl.mean() + sigma * hl.std(ddof=1)
            )
        out.append(skip)
        hist_n.append(n)
        hist_l.append(0.0 if loss is None else loss)
    return np.asarray(out)


def group_model(norms, z=3.0, beta=0.99, warmup=25):
    """norms [steps, G] -> factors [steps, G]."""
    steps, g = norms.shape
    mean, var, seen = np.zeros(g), np.zeros(g), np.zeros(g, int)
    out = np.ones((steps, g))
    for t in range(steps):
        for j in range(g):
            n = norms[t, j]
            if seen[j] < warmup:
                seen[j] += 1
                d = n - mean[j]
                mean[j] += d / seen[j]
                var[j] += (d * (n - mean[j]) - var[j]) / seen[j]
                continue
            u = mean[j] + z * math.sqrt(var[j])
            c = n
            if n > u + 1e-12:
                out[t, j] = u / (n + 1e-12)
                c = u
            mean[j] = beta * mean[j] + (1 - beta) * c
            var[j] = beta * var[j] + (1 - beta) * (c - mean[j]) ** 2
    return out


def _spiky_norms(rng, steps, size=1):
    base = 1.0 + 0.1 * rng.standard_normal((steps, size))
    spikes = rng.random((steps, size)) < 0.05
    return np.abs(np.where(spikes, base * rng.uniform(3, 30, (steps, size)), base))


# --- ZClip -------------------------------------------------------------------


def test_zclip_hand_computed_step():
    tx = presets.zclip(warmup_steps=2)
    state = tx.init({"w": jnp.zeros(2)})
    for g in ([3.0, 4.0], [6.0, 8.0]):  # norms 5 and 10: mean 7.5, population var 6.25
        out, state = tx.update({"w": jnp.array(g)}, state)
        np.testing.assert_array_equal(out["w"], np.array(g, np.float32))  # warm-up: untouched
    assert float(state.mean) == pytest.approx(7.5) and float(state.var) == pytest.approx(6.25)
    out, state = tx.update({"w": jnp.array([30.0, 40.0])}, state)  # norm 50
    z = (50 - 7.5) / (2.5 + 1e-6)
    c = 7.5 + 2.5**2 / z * 2.5
    np.testing.assert_allclose(out["w"], np.array([30.0, 40.0]) * c / (50 + 1e-6), rtol=1e-6)
    mean = 0.97 * 7.5 + 0.03 * c
    assert float(state.mean) == pytest.approx(mean, rel=1e-6)
    assert float(state.var) == pytest.approx(0.97 * 6.25 + 0.03 * (c - mean) ** 2, rel=1e-6)
    assert float(state.threshold) == pytest.approx(c, rel=1e-6)
    assert int(state.clip_count) == 1


def test_zclip_mean_option_and_max_norm():
    tx = presets.zclip(warmup_steps=2, clip_option="mean", max_norm=6.0)
    state = tx.init({"w": jnp.zeros(2)})
    out, state = tx.update({"w": jnp.array([3.0, 4.0])}, state)  # 5: under the cap
    np.testing.assert_array_equal(out["w"], [3.0, 4.0])
    out, state = tx.update({"w": jnp.array([6.0, 8.0])}, state)  # 10: capped at 6 in warm-up
    np.testing.assert_allclose(out["w"], np.array([6.0, 8.0]) * 6 / (10 + 1e-6), rtol=1e-6)
    out, state = tx.update({"w": jnp.array([30.0, 40.0])}, state)  # spike: to the mean 7.5, cap 6
    np.testing.assert_allclose(out["w"], np.array([30.0, 40.0]) * 6 / (50 + 1e-6), rtol=1e-6)
    assert float(state.mean) == pytest.approx(7.5)  # the EMA follows the mean, not the cap


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize(
    "kwargs", [{}, {"max_norm": 1.5}, {"clip_option": "mean"}, {"clip_factor": 0.8, "alpha": 0.9}]
)
def test_zclip_matches_the_float64_model(jit, kwargs):
    rng = np.random.default_rng(0)
    norms = _spiky_norms(rng, 120)[:, 0]
    tx = presets.zclip(warmup_steps=10, **kwargs)
    update = jax.jit(tx.update) if jit else tx.update
    direction = rng.standard_normal(5)
    direction /= np.linalg.norm(direction)
    state = tx.init({"w": jnp.zeros(5)})
    got = []
    for n in norms:
        g = jnp.asarray(direction * n, jnp.float32)
        out, state = update({"w": g}, state)
        got.append(float(jnp.linalg.norm(out["w"]) / jnp.linalg.norm(g)))
    model_kwargs = {"warmup": 10, **kwargs}
    want = zclip_model(norms.astype(np.float32).astype(np.float64), **model_kwargs)
    assert np.sum(want < 1) >= 3  # the sequence really clips
    np.testing.assert_allclose(got, want, rtol=2e-5)


def test_zclip_nonfinite_step_passes_through_and_keeps_the_statistics():
    tx = presets.zclip(warmup_steps=1)
    state = tx.init({"w": jnp.zeros(2)})
    _, state = tx.update({"w": jnp.array([3.0, 4.0])}, state)
    before = state
    out, state = tx.update({"w": jnp.array([jnp.nan, 1.0])}, state)
    assert np.isnan(out["w"][0]) and float(out["w"][1]) == 1.0
    assert float(state.mean) == float(before.mean) and float(state.var) == float(before.var)
    assert int(state.seen) == 1 and int(state.count) == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 1.0}, "alpha"),
        ({"z_thresh": 0.0}, "z_thresh"),
        ({"warmup_steps": 0}, "warmup_steps"),
        ({"max_norm": -1.0}, "max_norm"),
        ({"clip_option": "median"}, "clip_option"),
        ({"clip_factor": 0.0}, "clip_factor"),
    ],
)
def test_zclip_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        presets.zclip(**kwargs)


def test_zclip_state_is_arrays_and_metrics_reads_it():
    tx = optax.chain(presets.zclip(warmup_steps=1), optax.sgd(0.1))
    params = {"w": jnp.ones(4)}
    state = tx.init(params)
    assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(state))
    _, state = tx.update({"w": jnp.full(4, 0.5)}, state)  # norm 1
    m = aggc_optax.metrics(state, prefix="clip")
    assert m["clip/zclip/norm"] == pytest.approx(1.0)
    assert m["clip/zclip/scale"] == 1.0 and m["clip/zclip/clipped"] == 0.0
    assert optax.tree.get(state, "clip_count") == 0


# --- skip-step -----------------------------------------------------------------


def test_skip_step_skips_an_outlier_and_freezes_the_inner_state():
    inner = optax.adamw(0.1, weight_decay=0.5)
    tx = presets.skip_step(inner, window=4, sigma=3.0, min_history=3)
    params = {"w": jnp.ones(2)}
    state = tx.init(params)
    for g in (1.0, 1.1, 0.9, 1.0):
        out, state = tx.update({"w": jnp.full(2, g)}, state, params)
        assert not bool(state.skipped)
    inner_before = state.inner_state
    out, state = tx.update({"w": jnp.full(2, 9.0)}, state, params)
    assert bool(state.skipped) and int(state.skip_count) == 1
    np.testing.assert_array_equal(out["w"], 0.0)  # no step, no weight decay
    chex.assert_trees_all_equal(state.inner_state, inner_before)
    # the window has the last 4 norms sqrt(2) * (1.1, 0.9, 1.0, 9.0) now
    hist = np.sqrt(2) * np.array([1.0, 1.1, 0.9, 1.0])
    assert float(state.threshold) == pytest.approx(hist.mean() + 3 * hist.std(ddof=1), rel=1e-5)


def test_skip_step_uses_the_loss_when_given():
    tx = presets.skip_step(optax.sgd(1.0), window=8, sigma=2.0, min_history=4)
    state = tx.init({"w": jnp.zeros(1)})
    for loss in (2.0, 2.1, 1.9, 2.0, 2.05):
        _, state = tx.update({"w": jnp.ones(1)}, state, value=jnp.float32(loss))
    out, state = tx.update({"w": jnp.ones(1)}, state, value=jnp.float32(5.0))  # same norm
    assert bool(state.skipped) and float(out["w"][0]) == 0.0
    out, state = tx.update({"w": jnp.ones(1)}, state, value=jnp.float32(jnp.nan))
    assert bool(state.skipped)
    assert int(state.filled) == 6  # the NaN loss did not enter the window


@pytest.mark.parametrize("jit", [False, True])
def test_skip_step_matches_the_float64_model(jit):
    rng = np.random.default_rng(1)
    norms = _spiky_norms(rng, 200)[:, 0]
    losses = 2.0 + 0.05 * rng.standard_normal(200)
    losses[[120, 150]] += 3.0
    tx = presets.skip_step(optax.sgd(1.0), window=32, sigma=4.0, min_history=16)
    update = jax.jit(tx.update) if jit else tx.update
    state = tx.init({"w": jnp.zeros(1)})
    got = []
    for n, loss in zip(norms, losses):
        _, state = update({"w": jnp.asarray([n], jnp.float32)}, state, value=jnp.float32(loss))
        got.append(bool(state.skipped))
    want = skip_model(
        norms.astype(np.float32).astype(np.float64),
        losses.astype(np.float32).astype(np.float64),
        window=32,
        sigma=4.0,
        min_history=16,
    )
    assert want.sum() >= 4 and want[120] and want[150]
    np.testing.assert_array_equal(got, want)


def test_skip_step_rejects_bad_arguments():
    with pytest.raises(ValueError, match="window"):
        presets.skip_step(optax.sgd(1.0), window=1)
    with pytest.raises(ValueError, match="sigma"):
        presets.skip_step(optax.sgd(1.0), sigma=0.0)
    with pytest.raises(ValueError, match="min_history"):
        presets.skip_step(optax.sgd(1.0), window=8, min_history=9)


# --- group z-score -------------------------------------------------------------


def test_group_zscore_hand_computed_step():
    tx = presets.group_zscore(z=2.0, warmup_steps=2)
    g = lambda q: {"q_proj": {"weight": jnp.array([q])}, "v_proj": {"weight": jnp.ones(1)}}  # noqa: E731
    state = tx.init(g(1.0))
    assert tuple(state.labels) == ("q_proj", "v_proj")
    for q in (1.0, 3.0):
        _, state = tx.update(g(q), state)
    out, state = tx.update(g(10.0), state)  # q_proj: mean 2, std 1: bound 4
    assert float(out["q_proj"]["weight"][0]) == pytest.approx(4.0, rel=1e-6)
    assert float(out["v_proj"]["weight"][0]) == 1.0  # its own bound is 1 + 0: not exceeded
    assert float(state.mean[0]) == pytest.approx(0.99 * 2 + 0.01 * 4.0)
    m = aggc_optax.metrics(state)
    assert m["aggc/group_zscore/q_proj/upper"] == pytest.approx(4.0)
    assert m["aggc/group_zscore/q_proj/clipped"] == 1.0
    assert m["aggc/group_zscore/v_proj/clipped"] == 0.0


@pytest.mark.parametrize("jit", [False, True])
def test_group_zscore_matches_the_float64_model(jit):
    rng = np.random.default_rng(2)
    norms = _spiky_norms(rng, 150, size=3)
    tx = presets.group_zscore(z=2.0, warmup_steps=10)
    update = jax.jit(tx.update) if jit else tx.update
    names = ("q_proj", "k_proj", "v_proj")
    state = tx.init({k: {"weight": jnp.zeros(1)} for k in names})
    got = []
    for row in norms:
        grads = {k: {"weight": jnp.asarray([v], jnp.float32)} for k, v in zip(names, row)}
        out, state = update(grads, state)
        got.append([float(out[k]["weight"][0]) / float(grads[k]["weight"][0]) for k in names])
    want = group_model(norms.astype(np.float32).astype(np.float64), z=2.0, warmup=10)
    assert np.sum(want < 1) >= 5
    np.testing.assert_allclose(got, want, rtol=2e-5)


def test_group_zscore_rejects_bad_arguments_and_foreign_trees():
    with pytest.raises(ValueError, match="z must"):
        presets.group_zscore(z=0.0)
    with pytest.raises(ValueError, match="ema_beta"):
        presets.group_zscore(ema_beta=1.0)
    with pytest.raises(ValueError, match="no parameter has a group label"):
        presets.group_zscore().init({"w": jnp.zeros(2)})
    tx = presets.group_zscore()
    state = tx.init({"q_proj": {"weight": jnp.zeros(1)}})
    with pytest.raises(ValueError, match="not the state's"):
        tx.update({"k_proj": {"weight": jnp.zeros(1)}}, state)


def test_metrics_reads_a_skip_step_inside_a_chain_next_to_aggc():
    params = {"q_proj": {"weight": jnp.ones(4)}}
    tx = optax.chain(aggc_optax.aggc(), presets.skip_step(optax.sgd(0.1), window=4, min_history=2))
    state = tx.init(params)
    for g in (1.0, 1.0, 50.0):
        _, state = tx.update({"q_proj": {"weight": jnp.full(4, g)}}, state, params)
    m = aggc_optax.metrics(state)
    # AGGC clipped the 50 (norm 100) to 3x its EMA of 2: the skip test saw 6, far above 2 + 6 * 0
    assert m["aggc/q_proj/norm"] == pytest.approx(100.0)
    assert m["aggc/skip_step/norm"] == pytest.approx(6.0, rel=1e-5)
    assert m["aggc/skip_step/skipped"] == 1.0 and m["aggc/skip_step/skip_count"] == 1.0
