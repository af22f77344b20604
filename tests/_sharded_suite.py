"""AGGC on 8 devices: SPMD sharding, shard_map/pmap reductions, sharded Orbax restore.

Not collected by the main test run (the name does not start with ``test_``):
``tests/test_sharding.py`` runs this module with pytest in a subprocess whose
``XLA_FLAGS`` ask for 8 simulated CPU devices, so the flag never reaches the
process that runs the other tests. Run it by hand with::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest -q tests/_sharded_suite.py

Expectations come from the float64 spec model (``tests/spec_model.py``) and, for
"equals the single-device run", from the same jitted step on one device.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import aggc_optax
from tests._scaleout_common import (
    GROUPS,
    SHAPES,
    assert_step_matches,
    branch_counts,
    grad_trajectory,
    make_aggc,
    spec_trajectory,
)

NUM_STEPS = 8


@pytest.fixture(scope="session", autouse=True)
def _eight_devices() -> None:
    # A failure, not a skip: running this module without the flag is a harness bug.
    if jax.device_count() != 8:
        pytest.fail(
            f"this module needs 8 devices, got {jax.device_count()}; run it through "
            "tests/test_sharding.py (it sets --xla_force_host_platform_device_count=8)"
        )


# --------------------------------------------------------------------------- layouts


def _fsdp_layout() -> tuple[Mesh, dict[str, P]]:
    # A plain Mesh (Auto axes): every leaf split along its first axis over all 8 devices.
    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    return mesh, {name: P("fsdp") for name in SHAPES}


def _tp_layout() -> tuple[Mesh, dict[str, P]]:
    # jax.make_mesh (Explicit axes in jax 0.10), 4-way FSDP x 2-way tensor parallel.
    # Weights are torch-style [out, in]: column-parallel layers split `out` over tp,
    # row-parallel ones split `in`; norms are replicated.
    mesh = jax.make_mesh((4, 2), ("fsdp", "tp"))
    specs = {}
    for name, shape in SHAPES.items():
        if "down_proj" in name:
            specs[name] = P("fsdp", "tp")
        elif len(shape) == 2:
            specs[name] = P("tp", "fsdp")
        elif "residual_gate" in name:
            specs[name] = P("fsdp")
        else:
            specs[name] = P()
    return mesh, specs


LAYOUTS: dict[str, Callable[[], tuple[Mesh, dict[str, P]]]] = {
    "fsdp": _fsdp_layout,
    "tp": _tp_layout,
}


def _shardings(mesh: Mesh, specs: Mapping[str, P]) -> dict[str, NamedSharding]:
    return {name: NamedSharding(mesh, spec) for name, spec in specs.items()}


def _put(tree: Mapping[str, Any], shardings: Mapping[str, NamedSharding]) -> dict[str, jax.Array]:
    return {name: jax.device_put(x, shardings[name]) for name, x in tree.items()}


def _assert_same_sharding(got: jax.Array, want: NamedSharding, where: str) -> None:
    assert got.sharding.is_equivalent_to(want, got.ndim), (
        f"{where}: output sharding {got.sharding} differs from the input's {want}"
    )


def _mesh_context(mesh: Mesh) -> Any:
    return jax.set_mesh(mesh)


# ------------------------------------------------------------------- SPMD trajectory


@pytest.mark.parametrize("config", ["recipe", "raise"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sharded_trajectory_matches_spec_and_single_device(layout: str, config: str) -> None:
    mesh, specs = LAYOUTS[layout]()
    shardings = _shardings(mesh, specs)
    grads = grad_trajectory(NUM_STEPS, seed=1)
    spec = spec_trajectory(grads, config)
    down, up = branch_counts(spec)
    assert down > 0 and (config == "recipe" or up > 0), "trajectory must exercise the branches"

    tx = make_aggc(config)
    step = jax.jit(tx.update)
    single_state, single = tx.init(grads[0]), []
    for g in grads:
        upd, single_state = step(g, single_state)
        single.append(upd)

    with _mesh_context(mesh):
        state = tx.init(grads[0])
        for t, g in enumerate(grads):
            upd, state = step(_put(g, shardings), state)
            where = f"{layout}/{config} step {t}"
            for name in SHAPES:
                _assert_same_sharding(upd[name], shardings[name], f"{where} {name}")
                np.testing.assert_allclose(
                    np.asarray(upd[name]),
                    np.asarray(single[t][name]),
                    rtol=1e-5,
                    atol=1e-7,
                    err_msg=f"{where}: sharded vs single-device {name}",
                )
            assert_step_matches(upd, aggc_optax.group_stats(state), spec[t], where=where)
            for field in ("ema", "norm", "scale"):
                arr = getattr(state, field)
                assert arr.shape == (len(GROUPS),)
                assert arr.sharding.is_fully_replicated, f"{where}: state.{field} not replicated"
    np.testing.assert_allclose(np.asarray(state.ema), np.asarray(single_state.ema), rtol=1e-5)


# ----------------------------------------------------------------------- the HLO check

_COLLECTIVE = re.compile(
    r"=\s*(?P<shape>.*?)\s+(?P<op>all-reduce|all-gather|all-to-all|reduce-scatter|"
    r"collective-permute|collective-broadcast|ragged-all-to-all)(?:-start)?\("
)
_ARRAY = re.compile(r"\b[a-z]+\d*\[([\d,]*)\]")


def _collectives(hlo: str) -> list[tuple[str, int]]:
    """(opcode, elements of its largest array) for every collective in compiled HLO text."""
    found = []
    for line in hlo.splitlines():
        match = _COLLECTIVE.search(line)
        if match is None:
            continue
        sizes = [
            math.prod(int(d) for d in dims.split(",") if d)
            for dims in _ARRAY.findall(match["shape"])
        ]
        found.append((match["op"], max(sizes, default=0)))
    return found


def test_hlo_parser_finds_a_gradient_sized_all_gather() -> None:
    # Negative control for the check below: replicating an FSDP-sharded gradient
    # must show up as a collective of the gradient's full size.
    mesh, specs = _fsdp_layout()
    name = "model.layers.0.mlp.up_proj.weight"
    g = jax.device_put(np.ones(SHAPES[name], np.float32), NamedSharding(mesh, specs[name]))
    gather = jax.jit(lambda x: x * 2.0, out_shardings=NamedSharding(mesh, P()))
    found = _collectives(gather.lower(g).compile().as_text())
    assert found, "the parser found no collective in a function that must gather"
    assert max(size for _, size in found) >= math.prod(SHAPES[name])


def _train_step(tx: optax.GradientTransformation) -> Callable[..., Any]:
    def step(params: Any, opt_state: Any, grads: Any) -> tuple[Any, Any]:
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(step)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_train_step_keeps_shardings_and_moves_no_gradients(layout: str) -> None:
    mesh, specs = LAYOUTS[layout]()
    shardings = _shardings(mesh, specs)
    grads = grad_trajectory(2, seed=2)
    tx = optax.chain(make_aggc("recipe"), optax.adamw(1e-2))
    step = _train_step(tx)
    with _mesh_context(mesh):
        params = _put(grads[1], shardings)  # any values do
        opt_state = tx.init(params)
        g = _put(grads[0], shardings)
        new_params, new_state = step(params, opt_state, g)
        hlo = step.lower(params, opt_state, g).compile().as_text()

    for name in SHAPES:
        _assert_same_sharding(new_params[name], shardings[name], f"{layout} params {name}")
        for moment in ("mu", "nu"):
            leaf = getattr(new_state[1][0], moment)[name]
            _assert_same_sharding(leaf, shardings[name], f"{layout} adam.{moment} {name}")
    aggc_state = aggc_optax.find_aggc_states(new_state)[0]
    assert aggc_state.ema.sharding.is_fully_replicated

    found = _collectives(hlo)
    # The group norms need cross-device sums: XLA must have inserted them...
    assert any(op == "all-reduce" for op, _ in found), f"no all-reduce in the step: {found}"
    # ...and nothing larger than the [G] vector of sums of squares may travel.
    smallest_leaf = min(math.prod(s) for s in SHAPES.values())
    assert len(GROUPS) < smallest_leaf
    too_big = [(op, size) for op, size in found if size > len(GROUPS)]
    assert not too_big, f"{layout}: collectives larger than the group sums: {too_big}"


# --------------------------------------------------------------- shard_map and pmap


def test_shard_map_psum_gives_global_norms() -> None:
    # Each device holds one FSDP shard; axis_name makes the per-group sums global.
    mesh = jax.make_mesh((8,), ("d",))
    grads = grad_trajectory(NUM_STEPS, seed=3)
    spec = spec_trajectory(grads, "raise")
    tx = make_aggc("raise", axis_name="d")

    def local_step(g: Any, state: Any) -> Any:
        return tx.update(g, state)

    step = jax.jit(
        jax.shard_map(local_step, mesh=mesh, in_specs=(P("d"), P()), out_specs=(P("d"), P()))
    )
    shard = NamedSharding(mesh, P("d"))
    state = jax.device_put(tx.init(grads[0]), NamedSharding(mesh, P()))
    for t, g in enumerate(grads):
        upd, state = step(jax.device_put(g, shard), state)
        assert_step_matches(upd, aggc_optax.group_stats(state), spec[t], where=f"step {t}")


def _two_device_mesh() -> Mesh:
    return jax.make_mesh((2,), ("d",), devices=jax.devices()[:2])


def _sync_norm(tx: optax.GradientTransformation, mesh: Mesh, local_grads: np.ndarray) -> float:
    """Run one step inside shard_map where device i holds ``local_grads[i]``."""
    g = {"model.layers.0.self_attn.q_proj.weight": local_grads}
    step = jax.jit(
        jax.shard_map(
            lambda g, s: tx.update(g, s), mesh=mesh, in_specs=(P("d"), P()), out_specs=(P("d"), P())
        )
    )
    state = jax.device_put(tx.init(g), NamedSharding(mesh, P()))
    _, state = step(jax.device_put(g, NamedSharding(mesh, P("d"))), state)
    return float(state.norm[0])


def test_axis_reduction_mean_is_the_references_sync_dist() -> None:
    # docs/reference-behaviour.md §8, measured with two ranks: shards of norm 5 and 0 give 3.5355
    # with
    # sync_dist (the root of the mean over ranks of the squared norms), 5 summed.
    mesh = _two_device_mesh()
    shards = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)  # rank 0: norm 5; rank 1: 0
    by_ref = {
        sync: _sync_norm(
            aggc_optax.from_reference_options(
                {"enable": True, "auto_bounds": True, "sync_dist": sync}, axis_name="d"
            ),
            mesh,
            shards,
        )
        for sync in (True, False)
    }
    assert by_ref[True] == pytest.approx(math.sqrt(25.0 / 2), rel=1e-6)  # 3.5355...
    assert by_ref[False] == pytest.approx(5.0, rel=1e-6)
    mean = _sync_norm(_reference_sync(), mesh, shards)
    total = _sync_norm(aggc_optax.aggc(axis_name="d"), mesh, shards)
    assert mean == pytest.approx(3.5355339, rel=1e-6)
    assert total == pytest.approx(5.0, rel=1e-6)


def _reference_sync() -> Any:
    # the reference's sync_dist (a mean over devices) is a from_reference_options switch
    return aggc_optax.from_reference_options(
        {"enable": True, "auto_bounds": True, "sync_dist": True}, axis_name="d"
    )


def test_mean_reduction_of_replicated_gradients_is_the_true_norm() -> None:
    # DDP: every device holds the same (already averaged) gradient; "mean" then gives
    # its norm, "sum" overcounts by sqrt(world size).
    mesh = jax.make_mesh((8,), ("d",))
    row = np.array([1.0, 2.0, 2.0], np.float32)  # norm 3
    replicated = np.tile(row, (8, 1))
    mean = _sync_norm(_reference_sync(), mesh, replicated)
    total = _sync_norm(aggc_optax.aggc(axis_name="d"), mesh, replicated)
    assert mean == pytest.approx(3.0, rel=1e-6)
    assert total == pytest.approx(3.0 * math.sqrt(8), rel=1e-6)


def test_pmap_axis_name_sums_over_devices() -> None:
    grads = grad_trajectory(3, seed=4)
    spec = spec_trajectory(grads, "raise")
    tx = make_aggc("raise", axis_name="d")
    step = jax.pmap(lambda g, s: tx.update(g, s), axis_name="d", in_axes=(0, None), out_axes=0)
    state = tx.init(grads[0])
    for t, g in enumerate(grads):
        # Device i gets rows i::8 of every leaf's first axis: a non-contiguous split.
        local = {k: np.stack([v[i::8] for i in range(8)]) for k, v in g.items()}
        upd, states = step(local, state)
        state = jax.tree.map(lambda x: x[0], states)
        for i in range(1, 8):
            np.testing.assert_array_equal(np.asarray(states.ema[i]), np.asarray(state.ema))
        merged = {}
        for k, v in upd.items():
            full = np.empty(g[k].shape, np.float32)
            for i in range(8):
                full[i::8] = np.asarray(v[i])
            merged[k] = full
        assert_step_matches(merged, aggc_optax.group_stats(state), spec[t], where=f"pmap {t}")


# ---------------------------------------------------------------- sharded checkpoints


def _abstract_on_mesh(mesh: Mesh, tree: Any) -> Any:
    # Under jax.set_mesh with Explicit axes, eval_shape reports the sharding of every
    # leaf computed from an input, on the abstract mesh; Orbax wants the concrete mesh.
    # Leaves made from nothing (step counters) report none: replicate them.
    def on_mesh(x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        spec = x.sharding.spec if x.sharding is not None else P()
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

    return jax.tree.map(on_mesh, tree)


def test_orbax_midrun_restore_into_sharded_layout_is_bit_identical(tmp_path: Any) -> None:
    mesh, specs = _tp_layout()
    shardings = _shardings(mesh, specs)
    grads = grad_trajectory(6, seed=5)
    tx = optax.chain(make_aggc("raise"), optax.adamw(1e-2))
    step = _train_step(tx)
    with _mesh_context(mesh):
        params0 = _put({k: np.full(s, 0.5, np.float32) for k, s in SHAPES.items()}, shardings)
        sharded_grads = [_put(g, shardings) for g in grads]

        params, opt_state = params0, tx.init(params0)
        for g in sharded_grads:
            params, opt_state = step(params, opt_state, g)
        uninterrupted = (params, opt_state)

        params, opt_state = params0, tx.init(params0)
        for g in sharded_grads[:3]:
            params, opt_state = step(params, opt_state, g)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp_path / "step3", {"params": params, "opt_state": opt_state})
        checkpointer.wait_until_finished()
        del params, opt_state

        abstract_params = jax.eval_shape(lambda: params0)
        target = _abstract_on_mesh(
            mesh, {"params": abstract_params, "opt_state": jax.eval_shape(tx.init, params0)}
        )
        restored = checkpointer.restore(tmp_path / "step3", target)
        checkpointer.close()
        for name in SHAPES:
            _assert_same_sharding(restored["params"][name], shardings[name], f"restored {name}")
            mu = restored["opt_state"][1][0].mu[name]
            _assert_same_sharding(mu, shardings[name], f"restored mu {name}")
        params, opt_state = restored["params"], restored["opt_state"]
        for g in sharded_grads[3:]:
            params, opt_state = step(params, opt_state, g)

    assert jax.tree.structure(opt_state) == jax.tree.structure(uninterrupted[1])
    for got, want in zip(jax.tree.leaves((params, opt_state)), jax.tree.leaves(uninterrupted)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert int(aggc_optax.find_aggc_states(opt_state)[0].count) == 6


def _state_target(abstract_state: Any, param_shardings: Mapping[str, Any], mesh: Mesh) -> Any:
    # For an Auto mesh: a state leaf whose path ends in a parameter's path and has its
    # shape (Adam's mu and nu) takes that parameter's sharding; the rest (AGGC's [G]
    # vectors, counters) is replicated.
    by_path = {
        tuple(path): (leaf.shape, sharding)
        for (path, leaf), sharding in zip(
            jax.tree_util.tree_flatten_with_path(
                {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in SHAPES.items()}
            )[0],
            jax.tree.leaves(param_shardings),
        )
    }
    replicated = NamedSharding(mesh, P())

    def target(path: Any, leaf: Any) -> jax.ShapeDtypeStruct:
        sharding = replicated
        for i in range(len(path)):
            hit = by_path.get(tuple(path[i:]))
            if hit is not None and hit[0] == leaf.shape:
                sharding = hit[1]
                break
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(target, abstract_state)


def test_single_device_checkpoint_restores_into_fsdp(tmp_path: Any) -> None:
    mesh, specs = _fsdp_layout()
    shardings = _shardings(mesh, specs)
    grads = grad_trajectory(5, seed=6)
    tx = optax.chain(make_aggc("recipe"), optax.adam(1e-2))
    step = _train_step(tx)
    device0 = jax.devices()[0]
    params = jax.device_put({k: np.full(s, 0.5, np.float32) for k, s in SHAPES.items()}, device0)
    opt_state = tx.init(params)
    for g in grads[:3]:
        params, opt_state = step(params, opt_state, jax.device_put(g, device0))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "single", opt_state)
    checkpointer.wait_until_finished()

    target = _state_target(jax.eval_shape(tx.init, params), shardings, mesh)
    restored = checkpointer.restore(tmp_path / "single", target)
    checkpointer.close()
    for got, want, tgt in zip(
        jax.tree.leaves(restored), jax.tree.leaves(opt_state), jax.tree.leaves(target)
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding.is_equivalent_to(tgt.sharding, got.ndim)
    assert restored[0].labels == opt_state[0].labels
    assert not restored[1][0].mu["model.norm.weight"].sharding.is_fully_replicated

    # Continue sharded and single-device: the same run within float32 noise.
    s_params, s_state = _put(params, shardings), restored
    for g in grads[3:]:
        s_params, s_state = step(s_params, s_state, _put(g, shardings))
        params, opt_state = step(params, opt_state, jax.device_put(g, device0))
    for name in SHAPES:
        _assert_same_sharding(s_params[name], shardings[name], name)
        np.testing.assert_allclose(
            np.asarray(s_params[name]), np.asarray(params[name]), rtol=1e-5, atol=1e-7
        )
    np.testing.assert_allclose(np.asarray(s_state[0].ema), np.asarray(opt_state[0].ema), rtol=1e-5)


# ------------------------------------------------- the transformation contract, sharded


@pytest.mark.parametrize("name", ["aggc", "lora_sft", "grpo", "global_norm", "adagc"])
def test_contract_state_sharding(name: str) -> None:
    # tests/test_contract.py's last clause: every leaf split over 8 devices, the
    # jitted update gives the single-device result and a replicated state
    from tests.test_contract import TRANSFORMS, _grads, _params

    tx = TRANSFORMS[name]()
    params = _params()
    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    sharded = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P("fsdp"))), params)
    update = jax.jit(tx.update)
    state, single = tx.init(sharded), tx.init(params)
    for t in range(4):
        out, state = update(_grads(sharded, t), state)
        want, single = update(_grads(params, t), single)
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-30)
            assert a.sharding.spec == P("fsdp"), a.sharding
    [inner] = aggc_optax.find_aggc_states(state)
    for field in inner._fields:
        if field != "labels":
            assert getattr(inner, field).sharding.is_fully_replicated, field
    assert int(np.sum(inner.clip_down_count)) + int(np.sum(inner.raise_count)) > 0
