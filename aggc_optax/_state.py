"""The state of :func:`~aggc_optax.aggc`: the record, its labels, their check after a restore."""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from aggc_optax import _numerics, _validation


class GroupLabels(tuple):
    """The group labels of an :class:`AGGCState`, in group order: a tuple of str.

    A static pytree node (no arrays), so ``jax.jit`` treats it as part of the
    state's structure and Orbax stores nothing for it; ``flax.serialization``
    writes it as ``{"0": label, ...}`` and checks it on restore.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"GroupLabels({tuple(self)!r})"


jax.tree_util.register_static(GroupLabels)


class AGGCState(NamedTuple):
    """State of :func:`aggc`: per-group vectors of shape ``[num_groups]``.

    Attributes:
      count: number of updates so far (the 0-based step of the next update).
      ema: each group's EMA of its (post-clip, by default) gradient norm.
      ema_residual: the rounding error of ``ema`` (the EMA is ``ema + ema_residual``
        to twice the state's precision), so a float32 EMA does not stall.
      norm: each group's pre-clip norm at the last step.
      lower: each group's lower bound at the last step (0 where nothing is raised).
      upper: each group's upper bound at the last step.
      scale: the factor each group's gradients were multiplied by at the last step.
      ema_count: how many updates each group's EMA has received (steps skipped
        for a non-finite norm do not count).
      clip_down_count: how many steps each group was clipped down, in total.
      raise_count: how many steps each group was raised, in total.
      restart_count: how many times each group started afresh, as at ``init``,
        because a restored state held no group of its label (see
        :func:`check_state`); its other statistics count from that restart.
      label_digest: the CRC-32 of each group's label (int32), in the order of the
        arrays: what a checkpoint stores of the labels, so that each update can
        match a restored state's groups to its labels (see :func:`check_state`).
      labels: the group labels, in group order (static, no arrays).
    """

    count: jax.Array  # type: ignore[assignment]  # NamedTuple field named like tuple.count
    ema: jax.Array
    ema_residual: jax.Array
    norm: jax.Array
    lower: jax.Array
    upper: jax.Array
    scale: jax.Array
    ema_count: jax.Array
    clip_down_count: jax.Array
    raise_count: jax.Array
    restart_count: jax.Array
    label_digest: jax.Array
    labels: GroupLabels


def label_digests(labels: tuple[str, ...]) -> np.ndarray:
    """The CRC-32 of each label's UTF-8 bytes, as int32: what travels with the arrays."""
    crcs = np.array([zlib.crc32(label.encode("utf-8")) for label in labels], np.uint32)
    return crcs.view(np.int32)


# The fields of an AGGCState with one entry per group, in group order.
PER_GROUP_FIELDS = (
    "ema",
    "ema_residual",
    "norm",
    "lower",
    "upper",
    "scale",
    "ema_count",
    "clip_down_count",
    "raise_count",
    "restart_count",
    "label_digest",
)

# What each per-group field holds for a group that starts afresh (as init_state).
_FRESH = {field: 1 if field == "scale" else 0 for field in PER_GROUP_FIELDS}


def init_state(labels: tuple[str, ...]) -> AGGCState:
    num_groups, dtype = len(labels), _numerics.stats_dtype()

    # A fresh buffer per field (no shared array): a state whose fields alias
    # one buffer cannot be donated to a jitted update.
    def zeros(dtype: Any = dtype) -> jax.Array:
        return jnp.zeros((num_groups,), dtype)

    return AGGCState(
        count=jnp.zeros((), jnp.int32),
        ema=zeros(),
        ema_residual=zeros(),
        norm=zeros(),
        lower=zeros(),
        upper=zeros(),
        scale=jnp.ones((num_groups,), dtype),
        ema_count=zeros(jnp.int32),
        clip_down_count=zeros(jnp.int32),
        raise_count=zeros(jnp.int32),
        restart_count=zeros(jnp.int32),
        label_digest=jnp.asarray(label_digests(labels)),
        labels=GroupLabels(labels),
    )


def _mismatch_message(saved: np.ndarray, labels: tuple[str, ...], where: str) -> str:
    """What a state whose arrays are not its labels' holds, and what ``where`` does about it."""
    by_digest = dict(zip(label_digests(labels).tolist(), labels))
    saved_list = saved.tolist()
    saved_order = [
        by_digest.get(int(d), f"<a label not in this state, CRC-32 {int(d) & 0xFFFFFFFF:08x}>")
        for d in saved_list
    ]
    missing = [label for d, label in by_digest.items() if d not in saved_list]
    what = {
        "update": "This update matched the groups by label",
        "check_state": "An update (eager or under jax.jit) matches the groups by label",
        "reorder": "check_state(reorder=True) matched the groups by label",
    }[where]
    fresh = ""
    if missing:
        tense = "start" if where == "check_state" else "started"
        fresh = (
            f"; no saved group has the label(s) {missing}: they {tense} afresh, as at init "
            "(restart_count counts it in group_stats and metrics)"
        )
    return (
        "aggc: the state's arrays are in the group order "
        f"{saved_order}, but its labels (those of the transformation) are {list(labels)}: "
        "it was most likely restored from a checkpoint into a target with another "
        f"param_labels or whose groups come in another order. {what}{fresh}. To keep every "
        "group's history, build the restore target from the same parameters and "
        "param_labels as the saved state (docs/checkpointing.md)."
    )


def matched(state: AGGCState) -> AGGCState:
    """The state with its groups matched to its labels by their digests, wherever they sit.

    A restored state's arrays may be in another order than its labels (a target
    whose groups come in another order) or be those of other labels (a target
    built with another ``param_labels``). Each group takes the arrays saved under
    its label's digest; a group with no saved match starts afresh, as at
    ``init``, and its ``restart_count`` goes up by one. Under ``jax.jit`` this
    runs under ``jax.lax.cond`` only on a step whose digests differ: a normal
    step gets the state as it came, so its arithmetic and bits are untouched.
    Eagerly it runs only then, and says so in a warning.
    """
    expected = label_digests(tuple(state.labels))
    digest = state.label_digest
    if np.shape(digest) != expected.shape:
        raise ValueError(
            f"aggc: the state's label_digest has shape {np.shape(digest)}, its labels "
            f"{list(state.labels)} need {expected.shape}: the state was not built by "
            "this transformation's init"
        )
    arrays = {field: getattr(state, field) for field in PER_GROUP_FIELDS}
    if _validation.is_traced(digest):
        arrays = jax.lax.cond(
            jnp.all(digest == expected), lambda a: a, lambda a: _remapped(a, expected), arrays
        )
        return state._replace(**arrays)
    saved = np.asarray(digest)
    if np.array_equal(saved, expected):
        return state
    warnings.warn(_mismatch_message(saved, tuple(state.labels), "update"), stacklevel=4)
    return state._replace(**_remapped(arrays, expected))  # type: ignore[arg-type]  # only per-group array fields


def _remapped(arrays: dict[str, jax.Array], expected: np.ndarray) -> dict[str, jax.Array]:
    """The per-group ``arrays`` in ``expected``'s order of digests; a digest not saved: fresh."""
    match = arrays["label_digest"][None, :] == jnp.asarray(expected)[:, None]  # [target, saved]
    found = jnp.any(match, axis=1)
    source = jnp.argmax(match, axis=1)
    out = {}
    for field, values in arrays.items():
        fresh = jnp.full(values.shape, _FRESH[field], values.dtype)
        out[field] = jnp.where(found, jnp.take(values, source), fresh)
    out["restart_count"] = _numerics.saturating_add(
        out["restart_count"], (~found).astype(jnp.int32)
    )
    out["label_digest"] = jnp.asarray(expected)
    return out


def check_state(opt_state: Any, *, reorder: bool = False) -> Any:
    """Checks (or matches by label) every AGGC state in ``opt_state`` after a restore.

    A checkpoint (Orbax, ``flax.serialization``, pickle) stores an
    :class:`AGGCState`'s arrays and, in ``label_digest``, the CRC-32 of each
    group's label in the order of the arrays; its labels come back from the
    restore target. A target whose groups come in another order (the same
    labels, a leaf added earlier in the tree), or that was built with another
    ``param_labels``, gets arrays that are not its groups'. ``update`` (eager
    or under ``jax.jit``) then matches the groups by their digests, wherever
    they sit, and starts a group with no saved match afresh, as at ``init``
    (its ``restart_count`` goes up by one, in :func:`group_stats` and
    :func:`metrics`); an eager update and :func:`metrics` say so in a warning.
    Call this after every restore to hear about it before training goes on.

    Args:
      opt_state: any optax state (a restored one), holding AGGC states anywhere.
      reorder: match the per-group arrays to the labels now, as an update
        would (groups with no saved match start afresh, with a warning),
        instead of raising.

    Returns:
      ``opt_state`` (with the matched AGGC states when ``reorder``).

    Raises:
      ValueError: a state's arrays are not its labels', in its labels' order
        (and ``reorder`` is False); the message names the saved order and the
        labels that would start afresh.

    Example:
      >>> import jax.numpy as jnp, aggc_optax
      >>> tx = aggc_optax.aggc(param_labels={"a": "a", "b": "b"})
      >>> state = tx.init({"a": jnp.ones(2), "b": jnp.ones(2)})
      >>> aggc_optax.check_state(state) is state
      True
      >>> swapped = state._replace(label_digest=state.label_digest[::-1])
      >>> aggc_optax.check_state(swapped, reorder=True).label_digest.tolist() == (
      ...     state.label_digest.tolist())
      True
    """

    def fix(node: Any) -> Any:
        if not isinstance(node, AGGCState):
            return node
        labels = tuple(node.labels)
        expected = label_digests(labels)
        saved = np.asarray(_raw(node.label_digest))
        if saved.shape == expected.shape and np.array_equal(saved, expected):
            return node
        if saved.shape != expected.shape:
            raise ValueError(
                f"aggc: the state's label_digest has shape {saved.shape}, its labels "
                f"{list(labels)} need {expected.shape}: the state was not built by "
                "this transformation's init"
            )
        if not reorder:
            raise ValueError(
                _mismatch_message(saved, labels, "check_state")
                + " Or match them now with aggc_optax.check_state(state, reorder=True)."
            )
        if not set(expected.tolist()) <= set(saved.tolist()):
            warnings.warn(_mismatch_message(saved, labels, "reorder"), stacklevel=4)
        arrays = {f: jnp.asarray(_raw(getattr(node, f))) for f in PER_GROUP_FIELDS}
        return node._replace(**_remapped(arrays, expected))  # type: ignore[arg-type]  # only per-group array fields

    return jax.tree.map(fix, opt_state, is_leaf=lambda x: isinstance(x, AGGCState))


def _raw(x: Any) -> Any:
    # Flax NNX's Optimizer keeps its state's arrays in Variable boxes
    return x.get_value() if hasattr(x, "get_value") else x


def not_an_aggc_state(state: Any) -> TypeError:
    found = (
        [i for i, part in enumerate(state) if isinstance(part, AGGCState)]
        if isinstance(state, tuple)
        else []
    )
    where = f" (it holds one at index {found[0]})" if found else ""
    return TypeError(
        f"aggc: update expects this transformation's own AGGCState, got a "
        f"{type(state).__name__}{where}: pass the aggc part of the state (e.g. state[0] "
        "of optax.chain(aggc(), ...)), or call the update of the whole optax.chain"
    )


def _register_with_flax() -> None:
    try:
        from flax import serialization
    except ImportError:  # flax is optional
        return

    def to_state_dict(labels: GroupLabels) -> dict[str, str]:
        return {str(i): label for i, label in enumerate(labels)}

    def from_state_dict(target: GroupLabels, state: Mapping[str, str]) -> GroupLabels:
        restored = tuple(state[str(i)] for i in range(len(state)))
        if restored != tuple(target):
            raise ValueError(
                f"aggc: the saved state has the groups {list(restored)}, the target "
                f"{list(target)}; build the target from the same parameters and param_labels"
            )
        return target

    serialization.register_serialization_state(
        GroupLabels, to_state_dict, from_state_dict, override=True
    )


_register_with_flax()
