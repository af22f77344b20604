"""Issue 23, points 3 and 4: AGGC inside ``jax.shard_map`` as FSDP / tensor-parallel code writes it.

Run by ``tests/test_user_setups.py`` in a child process with 8 simulated CPU devices
(not collected by the main run: the name does not start with ``test_``). By hand::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python -m pytest -q tests/_user_setups_sharded.py

The models keep some leaves replicated (``PartitionSpec()``: biases, norm scales), as
FSDP code commonly does; the gradients come from ``jax.grad`` inside the shard_map, so
JAX's own transposes decide which manual axes each gradient varies over. Expected
norms: the same loss on one device, in float64.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import aggc_optax


@pytest.fixture(scope="session", autouse=True)
def _eight_devices() -> None:
    if jax.device_count() != 8:
        pytest.fail(f"this module needs 8 devices, got {jax.device_count()}")


def _params(rng: np.random.Generator) -> dict[str, Any]:
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    return {
        "model": {
            "layers": {
                "0": {
                    "mlp": {
                        "up_proj": {"kernel": f(8, 8), "bias": f(8)},
                        "down_proj": {"kernel": f(8, 8)},
                    }
                }
            },
            "norm": {"weight": f(8)},
        }
    }


def _mlp(p: dict[str, Any], x: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    mlp = p["model"]["layers"]["0"]["mlp"]
    h = jnp.tanh(x @ up + mlp["up_proj"]["bias"])
    return jnp.sum((h @ down * p["model"]["norm"]["weight"]) ** 2)


def _full_loss(p: dict[str, Any], xs: jax.Array) -> jax.Array:
    # the sum over the batch shards of the local losses, on one device
    mlp = p["model"]["layers"]["0"]["mlp"]
    return sum(_mlp(p, x, mlp["up_proj"]["kernel"], mlp["down_proj"]["kernel"]) for x in xs)  # type: ignore[return-value]


def _true_norms(params: Any, xs: jax.Array) -> dict[str, float]:
    g = jax.grad(_full_loss)(params, xs)
    mlp = g["model"]["layers"]["0"]["mlp"]
    sq = lambda *a: sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in a)  # noqa: E731
    return {
        "up_proj": np.sqrt(sq(mlp["up_proj"]["kernel"], mlp["up_proj"]["bias"])),
        "down_proj": np.sqrt(sq(mlp["down_proj"]["kernel"])),
        "norm": np.sqrt(sq(g["model"]["norm"]["weight"])),
    }


def _specs(kernel_up: P, kernel_down: P) -> dict[str, Any]:
    return {
        "model": {
            "layers": {
                "0": {
                    "mlp": {
                        "up_proj": {"kernel": kernel_up, "bias": P()},  # a replicated bias
                        "down_proj": {"kernel": kernel_down},
                    }
                }
            },
            "norm": {"weight": P()},  # a replicated norm scale, alone in its group
        }
    }


def _fsdp_step(mesh: Mesh, tx: optax.GradientTransformation, check_vma: bool = True) -> Any:
    """1-D FSDP: kernels split by rows over 'fsdp', gathered for the forward pass."""
    specs = _specs(P("fsdp"), P("fsdp"))

    def step(params: Any, state: Any, x: jax.Array) -> Any:
        def loss(p: Any) -> jax.Array:
            mlp = p["model"]["layers"]["0"]["mlp"]
            up = jax.lax.all_gather(mlp["up_proj"]["kernel"], "fsdp", axis=0, tiled=True)
            down = jax.lax.all_gather(mlp["down_proj"]["kernel"], "fsdp", axis=0, tiled=True)
            return _mlp(p, x[0], up, down)

        grads = jax.grad(loss)(params)
        return tx.update(grads, state, params)

    return jax.jit(
        jax.shard_map(
            step,
            mesh=mesh,
            in_specs=(specs, P(), P("fsdp")),
            out_specs=(specs, P()),
            check_vma=check_vma,
        )
    ), specs


def _run(step: Any, specs: Any, mesh: Mesh, tx: Any, params: Any, xs: jax.Array) -> Any:
    shard = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    params = jax.tree.map(jax.device_put, params, shard)
    state = jax.device_put(tx.init(params), NamedSharding(mesh, P()))
    _, state = step(params, state, xs)
    return aggc_optax.group_stats(state)


def _xs(rng: np.random.Generator, shards: int) -> jax.Array:
    return jnp.asarray(rng.normal(size=(shards, 2, 8)), jnp.float32)


def test_fsdp_with_replicated_bias_and_norm_gives_the_true_norms() -> None:
    rng = np.random.default_rng(0)
    params, xs = _params(rng), _xs(rng, 8)
    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    tx = aggc_optax.aggc(axis_name="fsdp")
    step, specs = _fsdp_step(mesh, tx)
    stats = _run(step, specs, mesh, tx, params, xs)
    want = _true_norms(params, xs)
    for label in ("up_proj", "down_proj", "norm"):
        assert float(stats[label]["norm"]) == pytest.approx(want[label], rel=1e-5), label


def _two_d_loss(p: Any, x: jax.Array) -> jax.Array:
    mlp = p["model"]["layers"]["0"]["mlp"]
    up = jax.lax.all_gather(mlp["up_proj"]["kernel"], "model", axis=1, tiled=True)
    down = jax.lax.all_gather(mlp["down_proj"]["kernel"], "data", axis=0, tiled=True)
    down = jax.lax.all_gather(down, "model", axis=1, tiled=True)
    # all_gather's result still varies over its axis: the mean over 'model' makes the
    # loss one value per batch shard, as tensor-parallel code does before jax.grad
    return jax.lax.pmean(_mlp(p, x[0], up, down), "model")


def _two_d_step(mesh: Mesh, tx: optax.GradientTransformation, specs: Any) -> Any:
    def step(params: Any, state: Any, x: jax.Array) -> Any:
        return tx.update(jax.grad(_two_d_loss)(params, x), state, params)

    return jax.jit(
        jax.shard_map(step, mesh=mesh, in_specs=(specs, P(), P("data")), out_specs=(specs, P()))
    )


def test_two_d_mesh_with_sharded_partly_sharded_and_replicated_leaves() -> None:
    # 4-way data parallel x 2-way model parallel: up_proj's kernel split over 'model'
    # only (replicated over 'data'), down_proj's over both, the bias and norm replicated.
    rng = np.random.default_rng(1)
    params, xs = _params(rng), _xs(rng, 4)
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    specs = _specs(P(None, "model"), P("data", "model"))
    tx = aggc_optax.aggc(axis_name=("data", "model"))
    stats = _run(_two_d_step(mesh, tx, specs), specs, mesh, tx, params, xs)
    want = _true_norms(params, xs)
    for label in ("up_proj", "down_proj", "norm"):
        assert float(stats[label]["norm"]) == pytest.approx(want[label], rel=1e-5), label
    # naming one of the two axes the gradients vary over is an error naming both
    partial = aggc_optax.aggc(axis_name="model")
    with pytest.raises(ValueError, match=r"axis_name='model'.*\('data', 'model'\)"):
        _run(_two_d_step(mesh, partial, specs), specs, mesh, partial, params, xs)


def test_forgotten_axis_name_is_an_error_naming_it_and_the_axes() -> None:
    rng = np.random.default_rng(2)
    params, xs = _params(rng), _xs(rng, 8)
    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    tx = aggc_optax.aggc()  # axis_name forgotten
    step, specs = _fsdp_step(mesh, tx)
    with pytest.raises(ValueError, match=r"axis_name=None.*\('fsdp',\)"):
        _run(step, specs, mesh, tx, params, xs)


def test_forgotten_axis_name_with_check_vma_off_is_an_error_too() -> None:
    # with check_vma=False JAX records nothing: each device would clip by its own shard
    rng = np.random.default_rng(3)
    params, xs = _params(rng), _xs(rng, 8)
    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    tx = aggc_optax.aggc()
    step, specs = _fsdp_step(mesh, tx, check_vma=False)
    with pytest.raises(ValueError, match=r"axis_name.*check_vma=False.*\('fsdp',\)"):
        _run(step, specs, mesh, tx, params, xs)


def test_overflowing_step_with_a_replicated_bias_gets_the_true_norm() -> None:
    # entries whose float32 squares overflow: the rescued norms take the same per-leaf
    # reduction (the sharded kernel summed over 'fsdp', the replicated bias not)
    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    kernel = np.full((8, 4), 1e20, np.float32)
    bias = np.full(4, 2e20, np.float32)
    grads = {"model": {"layers": {"0": {"mlp": {"up_proj": {"kernel": kernel, "bias": bias}}}}}}
    specs = {"model": {"layers": {"0": {"mlp": {"up_proj": {"kernel": P("fsdp"), "bias": P()}}}}}}
    tx = aggc_optax.aggc(axis_name="fsdp")
    step = jax.jit(
        jax.shard_map(tx.update, mesh=mesh, in_specs=(specs, P()), out_specs=(specs, P()))
    )
    shard = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    state = jax.device_put(tx.init(grads), NamedSharding(mesh, P()))
    _, state = step(jax.tree.map(jax.device_put, grads, shard), state)
    want = np.sqrt(np.sum(kernel.astype(np.float64) ** 2) + np.sum(bias.astype(np.float64) ** 2))
    assert np.isfinite(want) and want > 1.8e19  # beyond float32's squares
    assert float(state.norm[0]) == pytest.approx(want, rel=1e-6)
