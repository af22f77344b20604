"""AGGC composed with optax: chain, MultiSteps, inject_hyperparams, apply_if_finite,
masked, partition, and reading the statistics back through all of them.

Expectations come from the float64 spec model (``tests/spec_model.py``) and from
optax's own optimizers fed the spec model's clipped gradients.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aggc_optax
from tests._scaleout_common import (
    CONFIGS,
    SHAPES,
    assert_step_matches,
    grad_trajectory,
    make_aggc,
    spec_clipper,
    spec_trajectory,
)
from tests.spec_model import spec_label, spec_schedule

LR = 0.1


def _params() -> dict[str, np.ndarray]:
    return {k: np.full(s, 0.25, np.float32) for k, s in SHAPES.items()}


def _assert_tree_equal(a: Any, b: Any) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------------------ chain


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda: optax.sgd(LR, momentum=0.9),
        lambda: optax.adamw(LR, weight_decay=0.01),
        lambda: optax.rmsprop(LR),
    ],
    ids=["sgd_momentum", "adamw", "rmsprop"],
)
def test_chain_before_an_optimizer_feeds_it_the_clipped_gradients(make_opt: Any) -> None:
    grads = grad_trajectory(6, seed=21)
    spec = spec_trajectory(grads, "raise")
    tx = optax.chain(make_aggc("raise"), make_opt())
    plain = make_opt()  # the optimizer alone, on the spec model's clipped gradients
    params = _params()
    state, plain_state = tx.init(params), plain.init(params)
    step = jax.jit(tx.update)
    for t, g in enumerate(grads):
        upd, state = step(g, state, params)
        want, plain_state = plain.update(spec[t][0], plain_state, params)
        for name in SHAPES:
            np.testing.assert_allclose(
                np.asarray(upd[name]), np.asarray(want[name]), rtol=1e-4, atol=1e-7
            )
        assert_step_matches(spec[t][0], aggc_optax.group_stats(state), spec[t], where=f"step {t}")


# -------------------------------------------------------------------------- MultiSteps


def test_multisteps_clips_the_accumulated_gradient_once_per_real_step() -> None:
    k, real_steps = 3, 4
    micro = grad_trajectory(k * real_steps, seed=22)
    # MultiSteps averages the micro-batch gradients; AGGC sees that average once.
    accumulated = [
        {n: np.mean([micro[s * k + i][n] for i in range(k)], axis=0) for n in SHAPES}
        for s in range(real_steps)
    ]
    spec = spec_trajectory(accumulated, "raise")
    tx = optax.MultiSteps(optax.chain(make_aggc("raise"), optax.sgd(LR)), every_k_schedule=k)
    params = _params()
    state = tx.init(params)
    step = jax.jit(tx.update)
    for s in range(real_steps):
        for i in range(k):
            before = aggc_optax.find_aggc_states(state)[0]
            upd, state = step(micro[s * k + i], state, params)
            after = aggc_optax.find_aggc_states(state)[0]
            if i < k - 1:  # a micro-step: no update, AGGC untouched
                _assert_tree_equal(after, before)
                assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(upd))
        assert int(after.count) == s + 1
        assert_step_matches(
            {n: -np.asarray(upd[n]) / LR for n in SHAPES},
            aggc_optax.group_stats(state),
            spec[s],
            rtol=5e-5,
            where=f"real step {s}",
        )


def test_multisteps_sees_cancelling_micro_batches_unlike_the_reference_hooks() -> None:
    # docs/reference-behaviour.md §8: the reference's hooks sum squared norms over micro-batches, so
    # g and -g
    # give sqrt(2)|g| although the accumulated gradient is 0. MultiSteps hands AGGC the
    # accumulated gradient, whose norm is 0: the group gets the 1e-8 floor.
    name = "model.layers.0.self_attn.q_proj.weight"
    g = np.array([[3.0, 4.0]], np.float32)  # |g| = 5
    tx = optax.MultiSteps(make_aggc("raise"), every_k_schedule=2)
    state = tx.init({name: g})
    step = jax.jit(tx.update)
    _, state = step({name: g}, state)
    _, state = step({name: -g}, state)
    norm = float(aggc_optax.group_stats(state)["q_proj"]["norm"])
    assert norm == pytest.approx(1e-8, rel=1e-3)
    reference_hooks = np.sqrt(2 * 25.0)  # what the PyTorch clipper would report
    assert abs(norm - reference_hooks) > 7.0


# ------------------------------------------------------------------- inject_hyperparams


def test_inject_hyperparams_changes_beta_and_multipliers_mid_run() -> None:
    grads = grad_trajectory(7, seed=23)
    cfg = CONFIGS["raise"]
    tx = optax.inject_hyperparams(aggc_optax.aggc)(**cfg)
    params = _params()
    state = tx.init(params)
    assert set(state.hyperparams) >= {"ema_beta", "low_mult", "high_mult", "min_norm"}
    # strings stay static (inject_hyperparams leaves them out of the injected values)
    assert "ema_init" not in state.hyperparams

    clipper = spec_clipper("raise")
    labels = {n: spec_label(n) for n in SHAPES}
    step = jax.jit(tx.update)
    changes = {3: {"ema_beta": 0.8, "low_mult": 0.6, "high_mult": 1.5}}
    for t, g in enumerate(grads):
        if t in changes:
            state = optax.tree.set(state, **changes[t])
            for key, value in changes[t].items():
                setattr(clipper, key, value)
            assert float(optax.tree.get(state, "ema_beta")) == pytest.approx(0.8)
        upd, state = step(g, state, params)
        expected = clipper.step(g, labels, t)
        assert_step_matches(upd, aggc_optax.group_stats(state), expected, where=f"step {t}")


def test_inject_hyperparams_with_a_schedule_and_a_callable_labeler() -> None:
    # A callable param_labels must be declared static, or inject_hyperparams would
    # take it for a schedule; a schedule hyperparameter is evaluated at the step count.
    lora = {
        "model.layers.0.self_attn.q_proj.weight": np.ones((4, 4), np.float32),
        "model.layers.0.self_attn.q_proj.lora_A.default.weight": np.ones((2, 4), np.float32),
        "model.layers.0.self_attn.q_proj.lora_B.default.weight": np.ones((4, 2), np.float32),
    }
    sched = aggc_optax.linear_bounds_schedule(0.8, 0.5, total_steps=6, switch_ratio=0.2)
    cfg = {**CONFIGS["raise"], "high_mult": sched}
    tx = optax.inject_hyperparams(aggc_optax.aggc, static_args=("param_labels",))(
        param_labels=aggc_optax.lora_label, **cfg
    )
    state = tx.init(lora)
    assert aggc_optax.find_aggc_states(state)[0].labels == ("q_proj",)
    groups = aggc_optax.describe_groups(lora, aggc_optax.lora_label)["groups"]
    assert sorted(groups["q_proj"]["leaves"]) == [
        "model.layers.0.self_attn.q_proj.lora_A.default.weight",
        "model.layers.0.self_attn.q_proj.lora_B.default.weight",
    ]
    clipper = spec_clipper("raise")
    clipper.high_mult = lambda t: spec_schedule(t, 0.8, 0.5, 6, switch=0.2)
    lora_only = {k: v for k, v in lora.items() if "lora_" in k}
    rng = np.random.default_rng(0)
    step = jax.jit(tx.update)
    for t in range(6):
        g = {k: (rng.normal(size=v.shape) * (1 + t)).astype(np.float32) for k, v in lora.items()}
        upd, state = step(g, state, lora)
        exp_upd, exp_stats = clipper.step(
            {k: g[k] for k in lora_only}, {k: "q_proj" for k in lora_only}, t
        )
        stats = aggc_optax.group_stats(state)
        for field in ("norm", "lower", "upper", "scale"):
            np.testing.assert_allclose(
                float(stats["q_proj"][field]), exp_stats["q_proj"][field], rtol=2e-5
            )
        for k in lora_only:
            np.testing.assert_allclose(np.asarray(upd[k]), exp_upd[k], rtol=2e-5, atol=1e-7)
        base = "model.layers.0.self_attn.q_proj.weight"
        np.testing.assert_array_equal(np.asarray(upd[base]), g[base])  # not a LoRA leaf


# ---------------------------------------------------------------------- apply_if_finite


def _with_nan(g: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    bad = {k: v.copy() for k, v in g.items()}
    bad[name][0, 0] = np.nan
    return bad


def test_apply_if_finite_around_aggc_skips_the_step_and_leaves_aggc_untouched() -> None:
    grads = grad_trajectory(5, seed=24)
    nan_step = 2
    trajectory = [*grads[:nan_step], _with_nan(grads[nan_step], "lm_head.weight"), *grads[3:]]
    tx = optax.apply_if_finite(optax.chain(make_aggc("raise"), optax.sgd(LR)), 3)
    params = _params()
    state = tx.init(params)
    step = jax.jit(tx.update)
    finite = [g for t, g in enumerate(trajectory) if t != nan_step]
    spec = spec_trajectory(finite, "raise")
    k = 0
    for t, g in enumerate(trajectory):
        before = aggc_optax.find_aggc_states(state)[0]
        upd, state = step(g, state, params)
        if t == nan_step:
            _assert_tree_equal(aggc_optax.find_aggc_states(state)[0], before)
            assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(upd))
            assert int(state.total_notfinite) == 1
            continue
        # The skipped step does not exist for AGGC: later steps match the spec model
        # run on the finite gradients only.
        assert_step_matches(
            {n: -np.asarray(upd[n]) / LR for n in SHAPES},
            aggc_optax.group_stats(state),
            spec[k],
            where=f"step {t}",
        )
        k += 1
    assert int(aggc_optax.find_aggc_states(state)[0].count) == len(finite)


def test_apply_if_finite_after_aggc_needs_the_skip_policy() -> None:
    # AGGC outside the guard sees the NaN. nonfinite="skip" passes the bad group through
    # with its EMA unchanged (the guard then drops the optimizer step); the other
    # groups' EMAs advance. nonfinite="reference" poisons the group's EMA
    # (docs/reference-behaviour.md §8).
    grads = grad_trajectory(2, seed=25)
    bad = _with_nan(grads[1], "lm_head.weight")
    params = _params()
    emas = {}
    reference = {"enable": True, "auto_bounds": True, "ema_beta": 0.5, "low_mult": 0.9,
                 "high_mult": 1.1, "raise_small": True}  # fmt: skip  # CONFIGS["raise"]
    clippers = {
        "skip": aggc_optax.aggc(**CONFIGS["raise"]),
        "reference": aggc_optax.from_reference_options(reference),
    }
    for policy in ("skip", "reference"):
        tx = optax.chain(
            clippers[policy],
            optax.apply_if_finite(optax.adam(LR), 3),
        )
        state = tx.init(params)
        step = jax.jit(tx.update)
        _, state = step(grads[0], state, params)
        adam_before = state[1].inner_state
        ema_before = dict(aggc_optax.group_stats(state))
        upd, state = step(bad, state, params)
        _assert_tree_equal(state[1].inner_state, adam_before)  # the guard skipped Adam
        assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(upd))
        emas[policy] = (ema_before, aggc_optax.group_stats(state))
    before, after = emas["skip"]
    assert float(after["lm_head"]["ema"]) == float(before["lm_head"]["ema"])
    spec = spec_trajectory([grads[0], {**bad, "lm_head.weight": bad["lm_head.weight"]}], "raise")
    for label in after:
        if label != "lm_head":
            assert float(after[label]["ema"]) != float(before[label]["ema"])
            np.testing.assert_allclose(
                float(after[label]["scale"]), spec[1][1][label]["scale"], rtol=2e-5
            )
    assert np.isnan(float(emas["reference"][1]["lm_head"]["ema"]))


# ------------------------------------------------------------------- masked / partition

LORA_SHAPES = {
    f"base_model.model.model.layers.{i}.self_attn.{p}.{part}": shape
    for i in range(2)
    for p in ("q_proj", "v_proj")
    for part, shape in (
        ("base_layer.weight", (16, 16)),
        ("lora_A.default.weight", (4, 16)),
        ("lora_B.default.weight", (16, 4)),
    )
}


def _lora_grads(steps: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            n: (rng.normal(size=s) * np.exp(rng.normal())).astype(np.float32)
            for n, s in LORA_SHAPES.items()
        }
        for _ in range(steps)
    ]


def _lora_spec(grads: list[dict[str, np.ndarray]]) -> list[Any]:
    only = [{n: g[n] for n in g if "lora_" in n} for g in grads]
    return spec_trajectory(only, "raise")


def test_masked_applies_aggc_to_the_lora_adapters_only() -> None:
    grads = _lora_grads(5, seed=26)
    mask = {n: "lora_" in n for n in LORA_SHAPES}
    tx = optax.masked(make_aggc("raise"), mask)
    state = tx.init({n: np.zeros(s, np.float32) for n, s in LORA_SHAPES.items()})
    assert aggc_optax.find_aggc_states(state)[0].labels == ("q_proj", "v_proj")
    spec = _lora_spec(grads)
    step = jax.jit(tx.update)
    for t, g in enumerate(grads):
        upd, state = step(g, state)
        for n in LORA_SHAPES:
            if not mask[n]:
                np.testing.assert_array_equal(np.asarray(upd[n]), g[n])  # untouched
        lora_upd = {n: upd[n] for n in LORA_SHAPES if mask[n]}
        assert_step_matches(lora_upd, aggc_optax.group_stats(state), spec[t], where=f"{t}")


def test_partition_trains_the_adapters_and_freezes_the_base() -> None:
    grads = _lora_grads(4, seed=27)
    labels = {n: "lora" if "lora_" in n else "frozen" for n in LORA_SHAPES}
    tx = optax.partition(
        {"lora": optax.chain(make_aggc("raise"), optax.sgd(LR)), "frozen": optax.set_to_zero()},
        labels,
    )
    params = {n: np.zeros(s, np.float32) for n, s in LORA_SHAPES.items()}
    state = tx.init(params)
    spec = _lora_spec(grads)
    step = jax.jit(tx.update)
    for t, g in enumerate(grads):
        upd, state = step(g, state, params)
        for n in LORA_SHAPES:
            if labels[n] == "frozen":
                assert not np.any(np.asarray(upd[n]))
        clipped = {n: -np.asarray(upd[n]) / LR for n in LORA_SHAPES if labels[n] == "lora"}
        assert_step_matches(clipped, aggc_optax.group_stats(state), spec[t], where=f"{t}")


# ------------------------------------------------------- statistics through every wrapper


def _wrappers() -> dict[str, tuple[Any, int]]:
    """name -> (transformation, micro-steps per real step)."""
    cfg = CONFIGS["raise"]
    mask = {n: True for n in SHAPES}
    return {
        "chain": (optax.chain(aggc_optax.aggc(**cfg), optax.adamw(LR)), 1),
        "multisteps": (optax.MultiSteps(aggc_optax.aggc(**cfg), every_k_schedule=2), 2),
        "inject_hyperparams": (optax.inject_hyperparams(aggc_optax.aggc)(**cfg), 1),
        "apply_if_finite": (optax.apply_if_finite(aggc_optax.aggc(**cfg), 2), 1),
        "masked": (optax.masked(aggc_optax.aggc(**cfg), mask), 1),
        "partition": (
            optax.partition({"a": aggc_optax.aggc(**cfg)}, dict.fromkeys(SHAPES, "a")),
            1,
        ),
        "all_nested": (
            optax.MultiSteps(
                optax.apply_if_finite(
                    optax.chain(
                        optax.masked(optax.inject_hyperparams(aggc_optax.aggc)(**cfg), mask),
                        optax.adamw(LR),
                    ),
                    2,
                ),
                every_k_schedule=2,
            ),
            2,
        ),
    }


@pytest.mark.parametrize("wrapper", sorted(_wrappers()))
def test_group_stats_and_tree_get_through_every_wrapper(wrapper: str) -> None:
    tx, k = _wrappers()[wrapper]
    grads = grad_trajectory(2, seed=28)
    spec = spec_trajectory(grads, "raise")
    params = _params()
    state = tx.init(params)
    step = jax.jit(tx.update)
    for t, g in enumerate(grads):
        for _ in range(k):  # the same micro-batch k times: the accumulated mean is g
            _, state = step(g, state, params)
        stats = aggc_optax.group_stats(state)
        # group order: first appearance in the flattened tree (dict keys sorted)
        first_seen = dict.fromkeys(spec_label(n) for n in sorted(SHAPES))
        assert list(stats) == [label for label in first_seen if label is not None]
        for label, exp in spec[t][1].items():
            for field in ("norm", "lower", "upper", "scale"):
                np.testing.assert_allclose(
                    float(stats[label][field]), exp[field], rtol=2e-5, err_msg=f"{label}.{field}"
                )
        ema = optax.tree.get(state, "ema")
        np.testing.assert_array_equal(
            np.asarray(ema), np.asarray([stats[label]["ema"] for label in stats])
        )
        assert int(jnp.sum(optax.tree.get(state, "clip_down_count"))) == sum(
            int(s["clip_down_count"]) for s in stats.values()
        )
