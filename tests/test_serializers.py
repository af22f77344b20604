"""Every serializer a user has: save mid-run, restore into a fresh optimizer, resume bit for bit.

The optimizer is ``optax.chain(aggc(...), optax.adamw(...))``. For each serializer
(Orbax ``StandardCheckpointer`` and ``CheckpointManager``, ``flax.serialization``
bytes and state dicts, pickle) the state after a few jitted steps is saved, restored
into a state built by a *fresh* optimizer (a new ``aggc()`` call, its own ``init``),
and the next updates must be bit for bit those of the run that was never interrupted.
Then restores whose target groups come in another order (same labels, a leaf added
earlier in the tree): ``check_state`` names both orders, and every update (eager or
under ``jax.jit``) or ``check_state(reorder=True)`` matches the groups by label.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import serialization

import aggc_optax

SAVE_AT, STEPS = 3, 6
SHAPES = {
    "model.layers.0.self_attn.q_proj.weight": (4, 4),
    "model.layers.0.mlp.down_proj.weight": (4, 6),
    "model.layers.1.self_attn.q_proj.weight": (4, 4),
    "model.norm.weight": (4,),
}


def build_tx() -> optax.GradientTransformation:
    # a fresh optimizer each call: nothing of the writer's objects is reused
    return optax.chain(
        aggc_optax.aggc(ema_beta=0.5, low_mult=0.9, high_mult=1.1, ema_init="zero"),
        optax.adamw(0.05),
    )


def params0() -> dict[str, jax.Array]:
    return {k: jnp.full(s, 0.5, jnp.float32) for k, s in SHAPES.items()}


def grads(t: int) -> dict[str, jax.Array]:
    # per-group sizes that jump around, so steps clip down and raise
    rng = np.random.default_rng(100 + t)
    return {
        k: jnp.asarray((rng.lognormal(0, 1.0) * rng.standard_normal(s)).astype(np.float32))
        for k, s in SHAPES.items()
    }


def step_fn(tx: optax.GradientTransformation) -> Any:
    def step(params: Any, state: Any, g: Any) -> tuple[Any, Any]:
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step)


def run(tx: Any, params: Any, state: Any, start: int, stop: int) -> tuple[Any, Any]:
    step = step_fn(tx)
    for t in range(start, stop):
        params, state = step(params, state, grads(t))
    return params, state


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    tx = build_tx()
    mid = run(tx, params0(), tx.init(params0()), 0, SAVE_AT)
    full = run(tx, *mid, SAVE_AT, STEPS)
    stats = aggc_optax.group_stats(full[1])
    # the run really clipped and raised: "bit-identical" would be meaningless otherwise
    assert sum(int(s["clip_down_count"]) for s in stats.values()) > 0
    assert sum(int(s["raise_count"]) for s in stats.values()) > 0
    return {"mid": mid, "full": full}


def assert_bit_identical(got: Any, want: Any) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        where = jax.tree_util.keystr(path)
        assert np.asarray(x).dtype == np.asarray(y).dtype, where
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=where)


def _orbax_standard(tmp: Path, tree: Any, target: Any) -> Any:
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp / "std", tree)
        ckpt.wait_until_finished()
    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(tmp / "std", target)


def _orbax_manager(tmp: Path, tree: Any, target: Any) -> Any:
    options = ocp.CheckpointManagerOptions(max_to_keep=2)
    with ocp.CheckpointManager(tmp / "mgr", options=options) as mgr:
        mgr.save(SAVE_AT, args=ocp.args.StandardSave(tree))
        mgr.wait_until_finished()
    with ocp.CheckpointManager(tmp / "mgr", options=options) as mgr:
        assert mgr.latest_step() == SAVE_AT
        return mgr.restore(SAVE_AT, args=ocp.args.StandardRestore(target))


def _flax_bytes(tmp: Path, tree: Any, target: Any) -> Any:
    (tmp / "state.msgpack").write_bytes(serialization.to_bytes(tree))
    return serialization.from_bytes(target, (tmp / "state.msgpack").read_bytes())


def _flax_state_dict(tmp: Path, tree: Any, target: Any) -> Any:
    del tmp
    state_dict = serialization.to_state_dict(tree)
    # a state dict is plain containers of arrays: it survives a NumPy round trip
    state_dict = jax.tree.map(np.asarray, state_dict)
    return serialization.from_state_dict(target, state_dict)


def _pickle(tmp: Path, tree: Any, target: Any) -> Any:
    del target  # pickle restores the objects themselves
    (tmp / "state.pkl").write_bytes(pickle.dumps(jax.device_get(tree)))
    return jax.tree.map(jnp.asarray, pickle.loads((tmp / "state.pkl").read_bytes()))


SERIALIZERS = {
    "orbax_standard": _orbax_standard,
    "orbax_manager": _orbax_manager,
    "flax_bytes": _flax_bytes,
    "flax_state_dict": _flax_state_dict,
    "pickle": _pickle,
}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("name", list(SERIALIZERS))
def test_round_trip_into_a_fresh_optimizer_resumes_bit_identically(
    reference: dict[str, Any], name: str, tmp_path: Path
) -> None:
    tx = build_tx()  # fresh: a new aggc() and adamw
    params, state = reference["mid"]
    target = {"params": params0(), "opt_state": tx.init(params0())}
    restored = SERIALIZERS[name](tmp_path, {"params": params, "opt_state": state}, target)
    assert_bit_identical(restored["opt_state"], state)
    assert_bit_identical(restored["params"], params)
    restored_state = aggc_optax.check_state(restored["opt_state"])
    aggc_state = aggc_optax.find_aggc_states(restored_state)[0]
    assert aggc_state.labels == aggc_optax.find_aggc_states(state)[0].labels
    assert int(aggc_state.count) == SAVE_AT
    resumed = run(tx, restored["params"], restored_state, SAVE_AT, STEPS)
    assert_bit_identical(resumed, reference["full"])


# ---------------------------------------------------------------------------
# Restores whose groups come in another order.

# The same labels, but a norm leaf added first in the tree: flattening puts
# "a.norm.weight" before everything, so the group order goes from (down_proj,
# q_proj, norm) to (norm, down_proj, q_proj). Only the AGGC part of the state is
# saved and restored here: the parameter trees differ, so AdamW's state does too.
SWAPPED_SHAPES = {"a.norm.weight": (2,), **SHAPES}


def _swapped() -> tuple[Any, Any, Any]:
    tx = build_tx()
    params = {k: jnp.full(s, 0.5, jnp.float32) for k, s in SWAPPED_SHAPES.items()}
    return tx, params, tx.init(params)


def _saved_aggc(reference: dict[str, Any]) -> Any:
    return reference["mid"][1][0]


def test_the_swapped_target_really_has_another_group_order(reference: dict[str, Any]) -> None:
    saved = _saved_aggc(reference).labels
    swapped = _swapped()[2][0].labels
    assert saved == ("down_proj", "q_proj", "norm")
    assert swapped == ("norm", "down_proj", "q_proj")


def _restore_swapped(reference: dict[str, Any], name: str, tmp_path: Path) -> Any:
    saved, target = _saved_aggc(reference), _swapped()[2][0]
    if name == "pickle_into_target":
        # any serializer that restores the arrays into the target's structure
        leaves = jax.tree.leaves(pickle.loads(pickle.dumps(jax.device_get(saved))))
        return jax.tree.unflatten(jax.tree.structure(target), map(jnp.asarray, leaves))
    return SERIALIZERS[name](tmp_path, {"s": saved}, {"s": target})["s"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("name", ["orbax_standard", "orbax_manager", "pickle_into_target"])
def test_restore_into_another_group_order_is_named_and_matched_by_label(
    reference: dict[str, Any], name: str, tmp_path: Path
) -> None:
    restored = _restore_swapped(reference, name, tmp_path)
    assert restored.labels == ("norm", "down_proj", "q_proj")  # the target's static labels
    with pytest.raises(ValueError, match="another order") as err:
        aggc_optax.check_state(restored)
    message = str(err.value)
    assert "['down_proj', 'q_proj', 'norm']" in message  # the saved order
    assert "['norm', 'down_proj', 'q_proj']" in message  # the target's
    # an eager update matches the groups by label, and says so
    tx, params, target = _swapped()
    g = jax.tree.map(jnp.ones_like, params)
    with pytest.warns(UserWarning, match="another order"):
        eager, state = tx.update(g, (restored, target[1]), params)
    want, want_state = tx.update(
        g, (aggc_optax.check_state(restored, reorder=True), target[1]), params
    )
    assert_bit_identical(eager, want)
    assert_bit_identical(state[0], want_state[0])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_under_jit_a_swapped_state_is_matched_by_label(
    reference: dict[str, Any], tmp_path: Path
) -> None:
    restored = _restore_swapped(reference, "orbax_standard", tmp_path)
    tx, params, target = _swapped()
    g = jax.tree.map(lambda x: 100.0 * jnp.ones_like(x), params)  # far above every bound
    step = jax.jit(tx.update)
    updates, new_state = step(g, (restored, target[1]), params)
    # the same compiled step on the state check_state(reorder=True) matched by hand
    fixed = aggc_optax.check_state(restored, reorder=True)
    want, want_state = step(g, (fixed, target[1]), params)
    assert_bit_identical(updates, want)
    assert_bit_identical(new_state[0], want_state[0])
    after = new_state[0]
    assert np.all(np.asarray(after.clip_down_count) == np.asarray(fixed.clip_down_count) + 1)
    np.testing.assert_array_equal(np.asarray(after.restart_count), [0, 0, 0])  # all matched
    assert aggc_optax.check_state(after) is after  # in order now


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("name", ["orbax_standard", "orbax_manager"])
def test_reorder_by_label_gives_each_group_its_own_arrays(
    reference: dict[str, Any], name: str, tmp_path: Path
) -> None:
    restored = _restore_swapped(reference, name, tmp_path)
    fixed = aggc_optax.check_state(restored, reorder=True)
    assert fixed.labels == ("norm", "down_proj", "q_proj")
    saved_stats = aggc_optax.group_stats(_saved_aggc(reference))
    fixed_stats = aggc_optax.group_stats(fixed)
    assert list(fixed_stats) == ["norm", "down_proj", "q_proj"]
    for label, stats in saved_stats.items():
        for field, value in stats.items():
            np.testing.assert_array_equal(np.asarray(fixed_stats[label][field]), value)
    assert aggc_optax.check_state(fixed) is fixed  # in order now: returned as it is
    # the next step runs, eagerly and under jit, each group from its own EMA
    tx, params, target = _swapped()
    g = jax.tree.map(jnp.ones_like, params)
    eager, _ = tx.update(g, (fixed, target[1]), params)
    jitted, state = jax.jit(tx.update)(g, (fixed, target[1]), params)
    for x, y in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)
    assert np.all(np.asarray(state[0].ema_count) == np.asarray(fixed.ema_count) + 1)


def test_reorder_restarts_the_groups_of_other_labels() -> None:
    tx_a = aggc_optax.aggc(param_labels={"x": "a", "y": "b"})
    tx_b = aggc_optax.aggc(param_labels={"x": "a", "y": "c"})
    p = {"x": jnp.ones(2), "y": jnp.ones(2)}
    state_a, state_b = tx_a.init(p), tx_b.init(p)
    # the arrays of labels (a, b) under the static labels (a, c)
    mixed = state_b._replace(label_digest=state_a.label_digest, ema=jnp.asarray([5.0, 7.0]))
    with pytest.raises(ValueError, match=r"\['a', '<a label not in this state, CRC-32 "):
        aggc_optax.check_state(mixed)
    with pytest.warns(UserWarning, match=r"no saved group has the label\(s\) \['c'\]"):
        fixed = aggc_optax.check_state(mixed, reorder=True)
    np.testing.assert_array_equal(np.asarray(fixed.ema), [5.0, 0.0])  # 'a' kept, 'c' afresh
    np.testing.assert_array_equal(np.asarray(fixed.restart_count), [0, 1])
    assert aggc_optax.check_state(fixed) is fixed


def test_flax_restore_into_another_group_order_names_both(reference: dict[str, Any]) -> None:
    target = _swapped()[2][0]
    with pytest.raises(ValueError, match="the saved state has the groups"):
        serialization.from_bytes(target, serialization.to_bytes(_saved_aggc(reference)))
