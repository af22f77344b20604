"""The optax transformation contract, checked once for aggc() and every preset.

As optax's ``contrib/_common_test.py`` does for its optimizers: each
transformation below must run eagerly and under ``jax.jit`` with the same
bits, compile once for a run, accept the extra arguments of
``GradientTransformationExtraArgs``, work under ``optax.inject_hyperparams``
and ``optax.MultiSteps``, keep each gradient's dtype, keep its state in
distinct buffers that can be donated, and round-trip its state through
``flax.serialization`` and pickle to resume bit for bit. State sharding over 8
devices is the same contract's last clause; it runs in ``tests/_sharded_suite.py``
(``test_contract_state_sharding``), which needs its own process.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

import aggc_optax
from aggc_optax import aggc, presets

JIT = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])

#: Every public way to build the transformation, on its defaults where it has them.
TRANSFORMS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "aggc": lambda: aggc(),
    "aggc_raising_paper_bias_corrected": lambda: aggc(
        low_mult=0.5, variant="paper", ema_init="bias_corrected", max_up_scale=2.0
    ),
    "from_reference_options": lambda: aggc_optax.from_reference_options(
        presets.LORA_SFT_OPTIONS, total_steps=10
    ),
    "lora_sft": lambda: presets.lora_sft(10),
    "grpo": lambda: presets.grpo(),
    "global_norm": lambda: presets.global_norm(1.0),
    "adagc": lambda: presets.adagc(),
}

#: For optax.inject_hyperparams: the factory and the arguments it is called with.
INJECTED: dict[str, tuple[Callable[..., Any], dict[str, Any], tuple[str, ...]]] = {
    "aggc": (aggc, {"high_mult": 2.0, "ema_beta": 0.9}, ()),
    "aggc_raising_paper_bias_corrected": (
        aggc,
        {"low_mult": 0.5, "variant": "paper", "ema_init": "bias_corrected", "max_up_scale": 2.0},
        ("variant", "ema_init"),
    ),
    "from_reference_options": (
        aggc_optax.from_reference_options,
        {"options": presets.LORA_SFT_OPTIONS, "total_steps": 10},
        ("options", "total_steps"),
    ),
    "lora_sft": (presets.lora_sft, {"total_steps": 10}, ("total_steps",)),
    "grpo": (presets.grpo, {}, ()),
    "global_norm": (presets.global_norm, {"max_norm": 1.0}, ()),
    "adagc": (presets.adagc, {}, ()),
}


def _params(dtype: Any = jnp.float32) -> dict[str, Any]:
    keys = jax.random.split(jax.random.PRNGKey(0), 4)

    def leaf(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return jax.random.normal(key, shape).astype(dtype)

    return {
        "model": {
            "layers": {
                "0": {
                    "self_attn": {"q_proj": {"weight": leaf(keys[0], (8, 8))}},
                    "mlp": {"up_proj": {"weight": leaf(keys[1], (16, 8))}},
                }
            },
            "embed_tokens": {"weight": leaf(keys[2], (16, 8))},
        },
        "lm_head": {"weight": leaf(keys[3], (16, 8))},
    }


def _grads(params: Any, t: int) -> Any:
    # step-dependent magnitudes, so that later steps clip (and raise) some groups
    factors = [1.0, 8.0, 0.05, 3.0, 40.0]
    leaves, treedef = jax.tree.flatten(params)
    scaled = [
        (jnp.sin(x.astype(jnp.float32) * (t + 1)) * factors[(t + i) % len(factors)]).astype(x.dtype)
        for i, x in enumerate(leaves)
    ]
    return treedef.unflatten(scaled)


def _run(tx: optax.GradientTransformation, steps: int, update: Callable[..., Any]) -> Any:
    params = _params()
    state = tx.init(params)
    outs = []
    for t in range(steps):
        out, state = update(_grads(params, t), state)
        outs.append(out)
    return outs, state


def _assert_same_bits(a: Any, b: Any) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_close(a: Any, b: Any, rtol: float = 4e-6) -> None:
    # Eager runs op by op where jit fuses (XLA:CPU contracts a multiply-add in a
    # fused kernel), and an injected hyperparameter is a float32 array where the
    # plain one is a Python float (1 - beta rounds once, not twice): the last bits
    # may differ, a few float32 ulps at most over these steps.
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol)


def _assert_same_state(a: Any, b: Any) -> None:
    """The same counts, the statistics to a few ulps; the EMA's rounding error
    (``ema_residual``, below one float32 ulp of the EMA) is checked at that scale."""
    [x], [y] = aggc_optax.find_aggc_states(a), aggc_optax.find_aggc_states(b)
    assert x.labels == y.labels
    for field in ("count", "ema_count", "clip_down_count", "raise_count", "label_digest"):
        np.testing.assert_array_equal(np.asarray(getattr(x, field)), np.asarray(getattr(y, field)))
    for field in ("ema", "norm", "lower", "upper", "scale"):
        _assert_close(getattr(x, field), getattr(y, field))
    ulp = np.spacing(np.abs(np.asarray(x.ema, np.float32)))
    assert np.all(np.abs(np.asarray(x.ema_residual) - np.asarray(y.ema_residual)) <= 2 * ulp)


NAMES = pytest.mark.parametrize("name", sorted(TRANSFORMS))


@NAMES
def test_jit_and_eager_agree(name: str) -> None:
    tx = TRANSFORMS[name]()
    eager = _run(tx, 5, tx.update)
    jitted = _run(tx, 5, jax.jit(tx.update))
    _assert_close(eager[0], jitted[0])
    _assert_same_state(eager[1], jitted[1])
    [state] = aggc_optax.find_aggc_states(jitted[1])
    assert int(state.count) == 5
    # the gradients were large enough on some step for something to be clipped
    assert int(np.sum(state.clip_down_count)) + int(np.sum(state.raise_count)) > 0


@NAMES
def test_jit_does_not_retrace_from_step_to_step(name: str) -> None:
    tx = TRANSFORMS[name]()
    update = jax.jit(tx.update)
    _run(tx, 4, update)
    assert update._cache_size() == 1


@NAMES
def test_extra_args_are_accepted(name: str) -> None:
    params = _params()
    tx = TRANSFORMS[name]()
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    chained = optax.chain(tx, optax.sgd(0.1))
    _, state = chained.update(params, chained.init(params), params, loss=jnp.asarray(1.0))
    assert int(aggc_optax.find_aggc_states(state)[0].count) == 1


@NAMES
def test_inject_hyperparams_equals_the_plain_transformation(name: str) -> None:
    factory, kwargs, static = INJECTED[name]
    injected = optax.inject_hyperparams(factory, static_args=static)(**kwargs)
    plain = factory(**kwargs)
    outs_injected, state = _run(injected, 4, jax.jit(injected.update))
    outs_plain, plain_state = _run(plain, 4, jax.jit(plain.update))
    _assert_close(outs_injected, outs_plain)
    _assert_same_state(state, plain_state)
    assert aggc_optax.group_stats(state).keys() == aggc_optax.group_stats(plain_state).keys()


@NAMES
def test_multisteps_clips_the_mean_once_per_real_step(name: str) -> None:
    # two identical micro-batches: their mean is the micro-batch exactly
    params = _params()
    tx = TRANSFORMS[name]()
    multi = optax.MultiSteps(tx, every_k_schedule=2)
    m_state, state = multi.init(params), tx.init(params)
    update = jax.jit(multi.update)
    for t in range(3):
        g = _grads(params, t)
        held, m_state = update(g, m_state, params)
        _assert_same_bits(held, jax.tree.map(jnp.zeros_like, g))
        out, m_state = update(g, m_state, params)
        want, state = jax.jit(tx.update)(g, state)
        _assert_same_bits(out, want)
    _assert_same_state(m_state, state)


@NAMES
def test_every_gradient_keeps_its_dtype(name: str) -> None:
    dtypes = iter([jnp.bfloat16, jnp.float16, jnp.float32, jnp.bfloat16])
    params = jax.tree.map(lambda x: x.astype(next(dtypes)), _params())
    tx = TRANSFORMS[name]()
    update = jax.jit(tx.update)
    state = tx.init(params)
    for t in range(3):
        g = _grads(params, t)
        out, state = update(g, state)
        for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(g)):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert bool(jnp.all(jnp.isfinite(x)))
    [inner] = aggc_optax.find_aggc_states(state)
    for field in ("ema", "ema_residual", "norm", "lower", "upper", "scale"):
        assert getattr(inner, field).dtype == jnp.float32, field
    for field in ("count", "ema_count", "clip_down_count", "raise_count", "label_digest"):
        assert getattr(inner, field).dtype == jnp.int32, field


@NAMES
def test_state_fields_are_distinct_buffers_and_can_be_donated(name: str) -> None:
    params = _params()
    tx = optax.chain(TRANSFORMS[name](), optax.adam(1e-3))
    state = tx.init(params)
    arrays = jax.tree.leaves(aggc_optax.find_aggc_states(state))
    pointers = [x.unsafe_buffer_pointer() for x in arrays]
    assert len(set(pointers)) == len(pointers)
    donated = jax.jit(tx.update, donate_argnums=1)
    plain = jax.jit(tx.update)
    d_state, p_state = state, tx.init(params)
    for t in range(3):  # donating a state with aliased fields fails at the first call
        g = _grads(params, t)
        d_out, d_state = donated(g, d_state, params)
        p_out, p_state = plain(g, p_state, params)
        _assert_same_bits(d_out, p_out)
    _assert_same_bits(d_state, p_state)


@NAMES
def test_state_round_trips_and_resumes_bit_for_bit(name: str) -> None:
    for how in ("flax", "pickle"):
        _round_trip(name, how)


def _round_trip(name: str, how: str) -> None:
    params = _params()
    tx = optax.chain(TRANSFORMS[name](), optax.adamw(1e-2))
    update = jax.jit(tx.update)
    state = tx.init(params)
    for t in range(3):
        _, state = update(_grads(params, t), state, params)
    if how == "flax":
        restored = serialization.from_bytes(tx.init(params), serialization.to_bytes(state))
    else:
        restored = pickle.loads(pickle.dumps(jax.device_get(state)))
    _assert_same_bits(restored, state)
    restored = aggc_optax.check_state(restored)
    for t in range(3, 5):
        g = _grads(params, t)
        out, state = update(g, state, params)
        out_restored, restored = update(g, restored, params)
        _assert_same_bits(out_restored, out)
    _assert_same_bits(restored, state)


def _update(tx: Any, g: Any, state: Any, jit: bool) -> Any:
    return (jax.jit(tx.update) if jit else tx.update)(g, state)


# ------------------------------------------- injected presets, by hand computation

G = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.0, 0.0])}


@JIT
def test_injected_global_norm(jit: bool) -> None:
    tx = optax.inject_hyperparams(presets.global_norm)(0.1)
    out, _ = _update(tx, G, tx.init(G), jit)
    np.testing.assert_allclose(np.asarray(out["a"]), [0.06, 0.08], rtol=1e-6)


@JIT
def test_injected_max_norm_zero_returns_zeros_like_optax(jit: bool) -> None:
    tx = optax.inject_hyperparams(presets.global_norm)(0.0)
    out, _ = _update(tx, G, tx.init(G), jit)
    ref, _ = optax.clip_by_global_norm(0.0).update(G, optax.EmptyState())
    for k in G:
        np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(ref[k]))
        np.testing.assert_array_equal(np.asarray(out[k]), 0.0)


@JIT
def test_injected_adagc(jit: bool) -> None:
    tx = optax.inject_hyperparams(presets.adagc)(1.05, 0.9)
    state = tx.init(G)
    out, state = _update(tx, G, state, jit)
    np.testing.assert_array_equal(np.asarray(out["a"]), [3.0, 4.0])  # first step: EMA = norm
    big = {"a": jnp.array([30.0, 40.0]), "b": jnp.array([0.0, 0.0])}
    out, _ = _update(tx, big, state, jit)
    # bound 1.05 * 5 = 5.25, norm 50: a * 5.25 / 50
    np.testing.assert_allclose(np.asarray(out["a"]), [3.15, 4.2], rtol=1e-6)


@JIT
@pytest.mark.parametrize("which", ["lora_sft", "grpo"])
def test_injected_recipes(jit: bool, which: str) -> None:
    params = {"model": {"layers": {"0": {"q_proj": {"weight": jnp.array([3.0, 4.0])}}}}}
    if which == "lora_sft":
        tx = optax.inject_hyperparams(presets.lora_sft, static_args=("total_steps",))(
            total_steps=100
        )
        direct = presets.lora_sft(100)
    else:
        tx = optax.inject_hyperparams(presets.grpo)()
        direct = presets.grpo()
    out, _ = _update(tx, params, tx.init(params), jit)
    want, _ = direct.update(params, direct.init(params))
    np.testing.assert_array_equal(
        np.asarray(jax.tree.leaves(out)[0]), np.asarray(jax.tree.leaves(want)[0])
    )


def test_lora_sft_donated_state_clips_at_steps_1_and_2() -> None:
    params = {"model": {"q_proj": {"weight": jnp.ones((2, 2))}, "norm": {"weight": jnp.ones(2)}}}
    tx = optax.chain(aggc_optax.presets.lora_sft(None), optax.adam(1e-3))
    state = tx.init(params)
    arrays = [x for x in jax.tree_util.tree_leaves(aggc_optax.find_aggc_states(state))]
    pointers = [x.unsafe_buffer_pointer() for x in arrays]
    assert len(set(pointers)) == len(pointers)

    update = jax.jit(tx.update, donate_argnums=1)
    for _ in range(3):  # donating a state with aliased fields fails at the first call
        _, state = update(params, state, params)
    stats = aggc_optax.group_stats(state)
    assert int(stats["q_proj"]["clip_down_count"]) == 2  # clipped at steps 1 and 2 (norm > 0.6 EMA)
