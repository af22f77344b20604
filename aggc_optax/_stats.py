"""Reading AGGC's statistics out of any optax state."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from aggc_optax._aggc import AGGCState

STAT_FIELDS = ("norm", "lower", "upper", "scale", "ema", "clip_down_count", "raise_count")


def _unbox(x: Any) -> jax.Array:
    # Flax NNX's Optimizer keeps state arrays inside Variable boxes; their `.value`
    # is deprecated since flax 0.12 (a warning per access), `get_value()` is not.
    if hasattr(x, "get_value"):
        return jnp.asarray(x.get_value())
    return jnp.asarray(x.value if hasattr(x, "value") else x)


@jax.jit
def _split_groups(arrays: dict[str, jax.Array]) -> dict[str, list[jax.Array]]:
    # One dispatch for all groups and fields; indexing eagerly costs one
    # dispatch per (group, field), milliseconds per call for a dozen groups.
    return {field: list(a) for field, a in arrays.items()}


def find_aggc_states(opt_state: Any) -> list[AGGCState]:
    """Every :class:`AGGCState` inside ``opt_state``, in flattening order."""
    found = jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, AGGCState))
    return [x for x in found if isinstance(x, AGGCState)]


def group_stats(opt_state: Any) -> dict[str, dict[str, jax.Array]]:
    """Per-group statistics of the last AGGC step, from anywhere in an optax state.

    Finds the :class:`AGGCState` inside ``optax.chain`` tuples,
    ``optax.MultiSteps``, ``optax.inject_hyperparams``, ``optax.masked``,
    ``optax.partition`` / ``multi_transform``, ``optax.apply_if_finite`` and Flax
    NNX optimizers, and returns, per group label (in group order), the
    pre-clip ``norm``, ``lower`` and ``upper`` bounds and ``scale`` of the last
    step, the ``ema`` after it, and the running ``clip_down_count`` and
    ``raise_count``. Before the first step norm and bounds read 0 and scale 1.

    Args:
      opt_state: an optax state holding one or more AGGC states (their labels
        must not collide).

    Returns:
      ``{label: {field: scalar array}}``.

    Raises:
      ValueError: no AGGC state is found, or two AGGC states share a label.

    Example:
      >>> import jax.numpy as jnp, optax, aggc_optax
      >>> params = {"model": {"norm": {"weight": jnp.ones(3)}}}
      >>> tx = optax.chain(aggc_optax.aggc(), optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> _, state = tx.update({"model": {"norm": {"weight": jnp.full(3, 2.0)}}}, state)
      >>> round(float(aggc_optax.group_stats(state)["norm"]["norm"]), 4)
      3.4641
    """
    states = find_aggc_states(opt_state)
    if not states:
        raise ValueError(
            "group_stats: no AGGC state found in opt_state (is aggc() part of the optimizer?)"
        )
    out: dict[str, dict[str, jax.Array]] = {}
    for state in states:
        arrays = _split_groups({field: _unbox(getattr(state, field)) for field in STAT_FIELDS})
        for i, label in enumerate(state.labels):
            if label in out:
                raise ValueError(
                    f"group_stats: the label {label!r} appears in two AGGC states; call "
                    "group_stats on each sub-state separately"
                )
            out[label] = {field: arrays[field][i] for field in STAT_FIELDS}
    return out
