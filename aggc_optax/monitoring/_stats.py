"""Reading AGGC's statistics out of any optax state."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from aggc_optax._state import AGGCState, GroupLabels

STAT_FIELDS = ("norm", "lower", "upper", "scale", "ema", "clip_down_count", "raise_count")
# The array fields of AGGCState: a mapping with all of them is an AGGC state that
# lost its NamedTuple type (nnx.state, flax.serialization.to_state_dict, Orbax
# restores without a target).
_ARRAY_FIELDS = frozenset(f for f in AGGCState._fields if f != "labels")


def unbox(x: Any) -> jax.Array:
    if isinstance(x, jax.Array):  # the common case; jnp.asarray costs ~20 us a call
        return x
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


def _is_state_mapping(x: Any) -> bool:
    # called on every node of the optimizer state: the length test first
    return (
        isinstance(x, Mapping)
        and len(x) >= len(_ARRAY_FIELDS)
        and _ARRAY_FIELDS <= {str(k) for k in x}
    )


def _is_found(x: Any) -> bool:
    return isinstance(x, AGGCState) or (isinstance(x, Mapping) and _is_state_mapping(x))


def _labels_of(stored: Any) -> tuple[str, ...] | None:
    # flax.serialization writes GroupLabels as {"0": label, ...}
    if stored is None:
        return None
    if isinstance(stored, Mapping):
        return tuple(str(stored[str(i)]) for i in range(len(stored)))
    return tuple(str(label) for label in stored)


def _from_mapping(mapping: Mapping[Any, Any], labels: tuple[str, ...] | None) -> AGGCState:
    by_name = {str(k): v for k, v in mapping.items()}
    num_groups = int(jnp.shape(unbox(by_name["norm"]))[0])
    stored = _labels_of(by_name.get("labels"))
    if stored is None:
        stored = labels
    if stored is None:
        stored = tuple(str(i) for i in range(num_groups))
        warnings.warn(
            f"aggc_optax: an AGGC state without its group labels (nnx.state() keeps them "
            f"in the graphdef, not the State); its {num_groups} groups are named by index "
            f"{list(stored)}. Pass labels= (e.g. labels=optimizer.opt_state) to name them.",
            stacklevel=4,
        )
    if len(stored) != num_groups:
        raise ValueError(
            f"aggc_optax: labels has {len(stored)} entries but the AGGC state has "
            f"{num_groups} groups"
        )
    fields = {f: by_name[f] for f in AGGCState._fields if f != "labels"}
    return AGGCState(**fields, labels=GroupLabels(stored))


def _given_labels(labels: Any) -> list[tuple[str, ...]] | None:
    """``labels=`` as one label tuple per AGGC state: from a sequence of str or a state."""
    if labels is None:
        return None
    if isinstance(labels, Sequence) and all(isinstance(x, str) for x in labels):
        return [tuple(labels)]
    states = find_aggc_states(labels)
    return [tuple(s.labels) for s in states]


def find_aggc_states(opt_state: Any, labels: Any = None) -> list[AGGCState]:
    """Every :class:`AGGCState` inside ``opt_state``, in flattening order.

    Besides ``AGGCState`` tuples (inside any optax state or an ``nnx.Optimizer``),
    this finds states that lost their type: the mappings of ``nnx.state(optimizer)``,
    ``flax.serialization.to_state_dict`` and Orbax restores without a target.
    ``nnx.state`` drops the group labels (they are static, kept in the graphdef):
    such groups take their labels from ``labels``, else are named ``"0"``,
    ``"1"``, ... with a warning.

    Args:
      opt_state: an optax state, an ``nnx.Optimizer`` or an ``nnx.State``.
      labels: group labels for states that lack them: a sequence of str (one
        AGGC state) or a state holding the same AGGC states with their labels,
        such as ``optimizer.opt_state``.

    Returns:
      The states, as :class:`AGGCState` (with labels), in flattening order.

    Raises:
      ValueError: ``labels`` does not match the states found.
    """
    found = jax.tree_util.tree_leaves(opt_state, is_leaf=_is_found)
    given = _given_labels(labels)
    candidates = [x for x in found if _is_found(x)]
    if given is not None and len(given) != len(candidates):
        raise ValueError(
            f"aggc_optax: labels holds {len(given)} AGGC label sets but opt_state "
            f"{len(candidates)} AGGC states"
        )
    out = []
    for i, x in enumerate(candidates):
        if isinstance(x, AGGCState):
            out.append(x)
        else:
            out.append(_from_mapping(x, None if given is None else given[i]))
    return out


# treedef -> where each AGGC state's arrays sit among the flattened leaves; the
# search with a Python is_leaf visits every node (~0.1 ms for an AdamW state of
# 100 leaves), a C++ flatten and a lookup do not.
_PLANS: dict[Any, list[tuple[GroupLabels, dict[str, int]]] | None] = {}


def _raw(x: Any) -> Any:
    return x.get_value() if hasattr(x, "get_value") else x


def cached_states(opt_state: Any) -> list[AGGCState]:
    """:func:`find_aggc_states` (no ``labels``), with the search cached per tree structure."""
    leaves, treedef = jax.tree_util.tree_flatten(opt_state)
    if treedef not in _PLANS:
        states = find_aggc_states(opt_state)
        where = {id(leaf): i for i, leaf in enumerate(leaves)}
        found: list[tuple[GroupLabels, dict[str, int]]] | None = []
        for state in states:
            idx = {f: where.get(id(_raw(getattr(state, f)))) for f in _ARRAY_FIELDS}
            if found is None or any(i is None for i in idx.values()):
                found = None  # arrays not among the leaves as such: search every time
                break
            found.append((state.labels, {f: int(i) for f, i in idx.items() if i is not None}))
        if len(_PLANS) > 64:
            _PLANS.clear()
        _PLANS[treedef] = found
        return states
    plan = _PLANS[treedef]
    if plan is None:
        return find_aggc_states(opt_state)
    return [
        AGGCState(**{f: leaves[i] for f, i in idx.items()}, labels=labels) for labels, idx in plan
    ]


def group_stats(opt_state: Any, labels: Any = None) -> dict[str, dict[str, jax.Array]]:
    """Per-group statistics of the last AGGC step, from anywhere in an optax state.

    Finds the :class:`AGGCState` inside ``optax.chain`` tuples,
    ``optax.MultiSteps``, ``optax.inject_hyperparams``, ``optax.masked``,
    ``optax.partition`` / ``multi_transform``, ``optax.apply_if_finite``, Flax
    NNX optimizers and ``nnx.state(optimizer)`` (see :func:`find_aggc_states`
    for the labels there), and returns, per group label (in group order), the
    pre-clip ``norm``, ``lower`` and ``upper`` bounds and ``scale`` of the last
    step, the ``ema`` after it, and the running ``clip_down_count`` and
    ``raise_count``. Before the first step norm and bounds read 0 and scale 1.
    For a logger, :func:`metrics` returns the same as one flat dict of floats,
    fetched in one transfer.

    Args:
      opt_state: an optax state holding one or more AGGC states (their labels
        must not collide).
      labels: group labels for states stored without them, as in
        :func:`find_aggc_states`.

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
    states = cached_states(opt_state) if labels is None else find_aggc_states(opt_state, labels)
    if not states:
        raise ValueError(
            "group_stats: no AGGC state found in opt_state (is aggc() part of the optimizer?)"
        )
    out: dict[str, dict[str, jax.Array]] = {}
    for state in states:
        arrays = _split_groups({field: unbox(getattr(state, field)) for field in STAT_FIELDS})
        for i, label in enumerate(state.labels):
            if label in out:
                raise ValueError(
                    f"group_stats: the label {label!r} appears in two AGGC states; call "
                    "group_stats on each sub-state separately"
                )
            out[label] = {field: arrays[field][i] for field in STAT_FIELDS}
    return out
