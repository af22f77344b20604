"""Orbax checkpoints of a state holding AGGC: mid-run save, restore, bit-identical resume.

The AGGC state's ``labels`` is a static pytree node (no arrays), so Orbax stores only
the per-group vectors; the labels come back from the restore target, which must be
built from the same parameters and labels (``tx.init`` or ``jax.eval_shape(tx.init,
params)``). The restore into a sharded layout runs on 8 devices in
``tests/_sharded_suite.py``.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import aggc_optax
from tests._checkpoint_worker import (
    SAVE_AT,
    build_tx,
    flatten,
    initial_params,
    train_step,
    trajectory,
)

# Orbax abandons its other pending reads when one fails (the refused restore below);
# their coroutines complain whenever they are collected, possibly in a later test.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).with_name("_checkpoint_worker.py")


def _run(tx: Any, params: Any, opt_state: Any, grads: list[Any]) -> tuple[Any, Any]:
    step = train_step(tx)
    for g in grads:
        params, opt_state = step(params, opt_state, g)
    return params, opt_state


def _save(path: Path, tree: Any) -> None:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()
    checkpointer.close()


def _restore(path: Path, target: Any) -> Any:
    checkpointer = ocp.StandardCheckpointer()
    restored = checkpointer.restore(path, target)
    checkpointer.close()
    return restored


@pytest.fixture(scope="module")
def runs(tmp_path_factory: Any) -> dict[str, Any]:
    """The uninterrupted run, and a checkpoint written at step SAVE_AT of the same run."""
    tx, params, grads = build_tx(), initial_params(), trajectory()
    mid = _run(tx, params, tx.init(params), grads[:SAVE_AT])
    path = tmp_path_factory.mktemp("ckpt") / f"step{SAVE_AT}"
    _save(path, {"params": mid[0], "opt_state": mid[1]})
    full = _run(tx, *mid, grads[SAVE_AT:])
    return {"path": path, "mid": mid, "full": full}


def _assert_bit_identical(got: Any, want: Any) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        assert np.asarray(x).dtype == np.asarray(y).dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


@pytest.mark.parametrize("target_from", ["eval_shape", "init"])
def test_restore_into_a_fresh_state_resumes_bit_identically(runs: Any, target_from: str) -> None:
    tx, params = build_tx(), initial_params()
    if target_from == "eval_shape":
        opt_target = jax.eval_shape(tx.init, params)
    else:
        opt_target = tx.init(params)  # a fresh, concrete state: its values are overwritten
    restored = _restore(runs["path"], {"params": params, "opt_state": opt_target})
    _assert_bit_identical(restored["opt_state"], runs["mid"][1])
    aggc_state = aggc_optax.find_aggc_states(restored["opt_state"])[0]
    assert aggc_state.labels == aggc_optax.find_aggc_states(runs["mid"][1])[0].labels
    assert int(aggc_state.count) == SAVE_AT
    resumed = _run(tx, restored["params"], restored["opt_state"], trajectory()[SAVE_AT:])
    _assert_bit_identical(resumed, runs["full"])
    # The run did clip: a trivial trajectory would make "bit-identical" meaningless.
    stats = aggc_optax.group_stats(resumed[1])
    assert sum(int(s["clip_down_count"]) for s in stats.values()) > 0
    assert sum(int(s["raise_count"]) for s in stats.values()) > 0


def test_restore_in_a_fresh_process_resumes_bit_identically(runs: Any, tmp_path: Path) -> None:
    out = tmp_path / "resumed.npz"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(runs["path"]), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = dict(np.load(out))
    want = flatten(runs["full"])
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def _tx_with_labels(labeler: Any) -> Any:
    """build_tx() with another label rule (a callable labeler is a static argument)."""
    import optax

    from tests._scaleout_common import CONFIGS

    return optax.MultiSteps(
        optax.apply_if_finite(
            optax.chain(
                optax.inject_hyperparams(aggc_optax.aggc, static_args=("param_labels",))(
                    param_labels=labeler, **CONFIGS["raise"]
                ),
                optax.adamw(0.05),
            ),
            max_consecutive_errors=2,
        ),
        every_k_schedule=1,
    )


def _save_with_groups(path: Path, state: Any) -> None:
    labels = [list(s.labels) for s in aggc_optax.find_aggc_states(state)]
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(
            path,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), aggc_groups=ocp.args.JsonSave(labels)
            ),
        )


def _restore_checked(path: Path, target: Any) -> Any:
    want = [list(s.labels) for s in aggc_optax.find_aggc_states(target)]
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(
            path,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), aggc_groups=ocp.args.JsonRestore()
            ),
        )
    if restored.aggc_groups != want:
        raise ValueError(f"checkpoint groups {restored.aggc_groups} != target groups {want}")
    return restored.state


def test_saving_the_group_labels_catches_a_relabelling(runs: Any, tmp_path: Path) -> None:
    # Orbax does not store the static labels: a relabelling that keeps the number of
    # groups would restore each EMA into another group without a word. Saving the
    # labels next to the state (docs/distributed.md) makes that checkable.
    tx, params = build_tx(), initial_params()
    _save_with_groups(tmp_path / "ckpt", runs["mid"][1])
    restored = _restore_checked(tmp_path / "ckpt", jax.eval_shape(tx.init, params))
    _assert_bit_identical(restored, runs["mid"][1])

    # Another grouping with as many groups: q_proj and v_proj merged, the input norms
    # split per layer. Orbax alone restores into it silently; the label check refuses.
    def regrouped(name: str) -> str | None:
        label = aggc_optax.reference_label(name)
        if label in ("q_proj", "v_proj"):
            return "attn"
        if label == "input_layernorm":
            return f"input_layernorm_{name.split('.')[2]}"
        return label

    other = jax.eval_shape(_tx_with_labels(regrouped).init, params)
    other_labels = aggc_optax.find_aggc_states(other)[0].labels
    saved_labels = aggc_optax.find_aggc_states(runs["mid"][1])[0].labels
    assert len(other_labels) == len(saved_labels)
    assert other_labels != saved_labels
    silently = _restore(runs["path"], {"params": params, "opt_state": other})
    assert aggc_optax.find_aggc_states(silently["opt_state"])[0].labels == other_labels
    # the labels' digests travel with the arrays: check_state sees the relabelling
    with pytest.raises(ValueError, match="group order"):
        aggc_optax.check_state(silently["opt_state"])
    good = _restore(runs["path"], {"params": params, "opt_state": jax.eval_shape(tx.init, params)})
    assert aggc_optax.check_state(good["opt_state"]) is not None  # the right target passes
    with pytest.raises(ValueError, match="groups"):
        _restore_checked(tmp_path / "ckpt", other)


def test_a_target_with_another_number_of_groups_is_refused(runs: Any) -> None:
    params = initial_params()
    one_group = _tx_with_labels(lambda name: "all" if "proj" in name else None)
    target = {"params": params, "opt_state": jax.eval_shape(one_group.init, params)}
    with pytest.raises(ValueError, match="shape"):
        _restore(runs["path"], target)
    gc.collect()
