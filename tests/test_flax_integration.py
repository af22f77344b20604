"""AGGC inside Flax: ``nnx.Optimizer`` (with ``wrt`` filters) and a Linen ``TrainState``.

Group labels are checked against names built here from the Flax state paths and
labelled by the spec model's own rule (``tests/spec_model.spec_label``); the
per-step statistics and clipped gradients against the float64 spec model.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import aggc_optax
from tests._scaleout_common import CONFIGS, spec_clipper
from tests.spec_model import spec_label

LR = 0.05
DIM, HIDDEN, VOCAB, RANK = 8, 16, 12, 2


def _expected_layout(names: list[str]) -> dict[str, list[str]]:
    """label -> sorted leaf names, from the spec's rule on hand-built names."""
    groups: dict[str, list[str]] = {}
    for name in names:
        label = spec_label(name)
        if label is not None:
            groups.setdefault(label, []).append(name)
    return {label: sorted(leaves) for label, leaves in groups.items()}


def _layout_groups(state: Any, params: Any) -> dict[str, list[str]]:
    """label -> sorted leaf names as AGGC groups ``params`` (its state holds the labels)."""
    groups = aggc_optax.describe_groups(params)["groups"]
    assert tuple(groups) == aggc_optax.find_aggc_states(state)[0].labels
    return {label: sorted(entry["leaves"]) for label, entry in groups.items()}


def _check_stats(state: Any, expected: dict[str, dict[str, float]], where: str) -> None:
    stats = aggc_optax.group_stats(state)
    assert set(stats) == set(expected), where
    for label, exp in expected.items():
        for field in ("norm", "lower", "upper", "scale"):
            np.testing.assert_allclose(
                float(stats[label][field]),
                exp[field],
                rtol=2e-5,
                atol=1e-7,
                err_msg=f"{where}: {label}.{field}",
            )


# ---------------------------------------------------------------------------- NNX


class _Attention(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.q_proj = nnx.LoRALinear(DIM, DIM, lora_rank=RANK, rngs=rngs)
        self.v_proj = nnx.LoRALinear(DIM, DIM, lora_rank=RANK, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.tanh(self.q_proj(x)) * self.v_proj(x)


class _Mlp(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.up_proj = nnx.Linear(DIM, HIDDEN, rngs=rngs)
        self.down_proj = nnx.Linear(HIDDEN, DIM, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.up_proj(x)))


class _Layer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.input_layernorm = nnx.RMSNorm(DIM, rngs=rngs)
        self.self_attn = _Attention(rngs)
        self.mlp = _Mlp(rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(x)


class _NnxModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.layers = nnx.List([_Layer(rngs) for _ in range(2)])
        self.norm = nnx.RMSNorm(DIM, rngs=rngs)
        self.lm_head = nnx.Linear(DIM, VOCAB, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def _nnx_names(state: nnx.State) -> dict[str, Any]:
    """Dotted name -> array, joined by hand from the NNX state's flat paths."""
    out = {}
    for path, value in nnx.to_flat_state(state):
        raw = value.get_value() if hasattr(value, "get_value") else value
        out[".".join(str(k) for k in path)] = np.asarray(raw)
    return out


def _loss(model: _NnxModel, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _batches(steps: int, seed: int) -> list[tuple[jax.Array, jax.Array]]:
    rng = np.random.default_rng(seed)
    return [
        (
            jnp.asarray(rng.normal(size=(4, DIM)) * np.exp(rng.normal()), jnp.float32),
            jnp.asarray(rng.integers(0, VOCAB, size=4)),
        )
        for _ in range(steps)
    ]


@pytest.mark.parametrize("wrt", ["Param", "LoRAParam"])
def test_nnx_state_paths_give_the_expected_groups(wrt: str) -> None:
    model = _NnxModel(nnx.Rngs(0))
    filt = getattr(nnx, wrt)
    optimizer = nnx.Optimizer(model, aggc_optax.aggc(), wrt=filt)
    names = list(_nnx_names(nnx.state(model, filt)))
    want = _expected_layout(names)
    assert _layout_groups(optimizer.opt_state, nnx.state(model, filt)) == want
    if wrt == "LoRAParam":
        assert sorted(want) == ["q_proj", "v_proj"]
        assert all(".lora." in n for leaves in want.values() for n in leaves)
        assert len(want["q_proj"]) == 4  # lora_a and lora_b of two layers
    else:
        assert sorted(want) == sorted(
            ["q_proj", "v_proj", "up_proj", "down_proj", "input_layernorm", "norm", "lm_head"]
        )
        assert "layers.1.self_attn.q_proj.kernel" in want["q_proj"]


def test_nnx_optimizer_on_lora_params_trains_adapters_only_and_matches_spec() -> None:
    model = _NnxModel(nnx.Rngs(1))
    tx = optax.chain(aggc_optax.aggc(**CONFIGS["raise"]), optax.sgd(LR))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
    frozen_before = _nnx_names(nnx.state(model, nnx.Not(nnx.LoRAParam)))

    @nnx.jit
    def grads_of(model: _NnxModel, x: jax.Array, y: jax.Array) -> Any:
        return nnx.grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, x, y)

    @nnx.jit
    def apply(model: _NnxModel, optimizer: nnx.Optimizer, grads: Any) -> None:
        optimizer.update(model, grads)

    clipper = spec_clipper("raise")
    for t, (x, y) in enumerate(_batches(5, seed=2)):
        grads = grads_of(model, x, y)
        flat_grads = _nnx_names(grads)
        before = _nnx_names(nnx.state(model, nnx.LoRAParam))
        apply(model, optimizer, grads)
        after = _nnx_names(nnx.state(model, nnx.LoRAParam))
        clipped, stats = clipper.step(flat_grads, {n: spec_label(n) for n in flat_grads}, t)
        _check_stats(optimizer.opt_state, stats, f"step {t}")
        for name in flat_grads:
            np.testing.assert_allclose(
                before[name] - after[name],
                LR * clipped[name],
                rtol=1e-3,
                atol=1e-6,
                err_msg=f"step {t}: {name}",
            )
    final = aggc_optax.group_stats(optimizer.opt_state)
    assert sum(int(s["clip_down_count"]) for s in final.values()) > 0
    frozen_after = _nnx_names(nnx.state(model, nnx.Not(nnx.LoRAParam)))
    for name, value in frozen_before.items():
        np.testing.assert_array_equal(frozen_after[name], value, err_msg=name)


# --------------------------------------------------------------------------- Linen


class _LinenLayer(nn.Module):
    partitioned: bool = False

    def setup(self) -> None:
        kernel_init = nn.initializers.lecun_normal()
        if self.partitioned:
            kernel_init = nn.with_partitioning(kernel_init, (None, "model"))
        self.input_layernorm = nn.RMSNorm()
        self.q_proj = nn.Dense(DIM, kernel_init=kernel_init)
        self.v_proj = nn.Dense(DIM)
        self.up_proj = nn.Dense(HIDDEN)
        self.down_proj = nn.Dense(DIM)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.input_layernorm(x)
        x = x + jnp.tanh(self.q_proj(h)) * self.v_proj(h)
        return x + self.down_proj(jax.nn.silu(self.up_proj(x)))


class _LinenModel(nn.Module):
    partitioned: bool = False

    def setup(self) -> None:
        self.layers = [_LinenLayer(self.partitioned) for _ in range(2)]
        self.norm = nn.RMSNorm()
        self.lm_head = nn.Dense(VOCAB)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def _linen_names(tree: Any) -> dict[str, np.ndarray]:
    """Dotted name -> array from nested dicts, joined by hand (boxes unboxed)."""
    out = {}

    def walk(node: Any, prefix: tuple[str, ...]) -> None:
        if isinstance(node, dict) or hasattr(node, "items"):
            for key, child in node.items():
                walk(child, (*prefix, str(key)))
        else:
            out[".".join(prefix)] = np.asarray(nn.meta.unbox(node))

    walk(tree, ())
    return out


@pytest.mark.parametrize("partitioned", [False, True], ids=["plain", "partitioned"])
def test_linen_train_state_matches_spec(partitioned: bool) -> None:
    model = _LinenModel(partitioned)
    batches = _batches(5, seed=3)
    params = model.init(jax.random.key(0), batches[0][0])["params"]
    if partitioned:  # the boxes stay in the tree: paths end in ".value", dropped for labels
        assert isinstance(params["layers_0"]["q_proj"]["kernel"], nn.Partitioned)
    names = list(_linen_names(params))
    assert "layers_1.q_proj.kernel" in names
    tx = optax.chain(aggc_optax.aggc(**CONFIGS["raise"]), optax.sgd(LR))
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    assert _layout_groups(state.opt_state, params) == _expected_layout(names)

    def loss(p: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        logits = state.apply_fn({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grad_fn = jax.jit(jax.grad(loss))
    apply = jax.jit(lambda s, g: s.apply_gradients(grads=g))
    clipper = spec_clipper("raise")
    for t, (x, y) in enumerate(batches):
        grads = grad_fn(state.params, x, y)
        flat = _linen_names(grads)
        before = _linen_names(state.params)
        state = apply(state, grads)
        after = _linen_names(state.params)
        clipped, stats = clipper.step(flat, {n: spec_label(n) for n in flat}, t)
        _check_stats(state.opt_state, stats, f"step {t}")
        for name in flat:
            np.testing.assert_allclose(
                before[name] - after[name],
                LR * clipped[name],
                rtol=1e-3,
                atol=1e-6,
                err_msg=f"step {t}: {name}",
            )
    assert int(state.step) == len(batches)
