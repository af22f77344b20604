"""The state of :func:`~aggc_optax.aggc`: the record, its labels, their check after a restore."""

from __future__ import annotations

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
      label_digest: the CRC-32 of each group's label (int32), in the order of the
        arrays: what a checkpoint stores of the labels, so that a restore into a
        target whose groups come in another order is detected (see
        :func:`check_state`).
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
    "label_digest",
)


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
        label_digest=jnp.asarray(label_digests(labels)),
        labels=GroupLabels(labels),
    )


def _order_error(saved: np.ndarray, labels: tuple[str, ...]) -> ValueError:
    by_digest = dict(zip(label_digests(labels).tolist(), labels))
    saved_order = [
        by_digest.get(int(d), f"<a label not in this state, CRC-32 {int(d) & 0xFFFFFFFF:08x}>")
        for d in saved.tolist()
    ]
    return ValueError(
        "aggc: the state's arrays are in the group order "
        f"{saved_order}, but its labels (those of the transformation) are {list(labels)}: "
        "it was most likely restored from a checkpoint into a target whose groups come "
        "in another order. Re-order it by label with aggc_optax.check_state(state, "
        "reorder=True), or build the restore target from the same parameters and "
        "param_labels as the saved state."
    )


def in_order(state: AGGCState) -> bool | jax.Array:
    """Whether the state's arrays are in its labels' order.

    Concrete (an eager update): checked here, a mismatch raises. Traced (under
    ``jax.jit``): a bool array, as nothing can be raised from compiled code;
    the update then skips every group (see :func:`check_state`).
    """
    expected = label_digests(tuple(state.labels))
    digest = state.label_digest
    if np.shape(digest) != expected.shape:
        raise ValueError(
            f"aggc: the state's label_digest has shape {np.shape(digest)}, its labels "
            f"{list(state.labels)} need {expected.shape}: the state was not built by "
            "this transformation's init"
        )
    if _validation.is_traced(digest):
        return jnp.all(digest == expected)
    saved = np.asarray(digest)
    if not np.array_equal(saved, expected):
        raise _order_error(saved, tuple(state.labels))
    return True


def check_state(opt_state: Any, *, reorder: bool = False) -> Any:
    """Checks (or re-orders) every AGGC state in ``opt_state`` after a restore.

    A checkpoint (Orbax, ``flax.serialization``, pickle) stores an
    :class:`AGGCState`'s arrays and, in ``label_digest``, the CRC-32 of each
    group's label in the order of the arrays; its labels come back from the
    restore target. When the target's groups come in another order (the same
    labels, a leaf added earlier in the tree), each restored EMA would belong
    to another group. An eager ``update`` raises on such a state; under
    ``jax.jit`` the update cannot raise, so it skips every group (gradients
    pass through, the EMAs are kept, ``count - ema_count`` grows). Call this
    after every restore.

    Args:
      opt_state: any optax state (a restored one), holding AGGC states anywhere.
      reorder: re-order the per-group arrays of a state whose groups are the
        target's in another order, by label, instead of raising.

    Returns:
      ``opt_state`` (with the re-ordered AGGC states when ``reorder``).

    Raises:
      ValueError: a state's arrays are not in its labels' order (and
        ``reorder`` is False, or its saved labels are not the target's).

    Example:
      >>> import jax.numpy as jnp, aggc_optax
      >>> tx = aggc_optax.aggc(param_labels={"a": "a", "b": "b"})
      >>> state = tx.init({"a": jnp.ones(2), "b": jnp.ones(2)})
      >>> aggc_optax.check_state(state) is state
      True
    """

    def fix(node: Any) -> Any:
        if not isinstance(node, AGGCState):
            return node
        labels = tuple(node.labels)
        expected = label_digests(labels)
        saved = np.asarray(node.label_digest)
        if saved.shape == expected.shape and np.array_equal(saved, expected):
            return node
        saved_list = saved.tolist()
        permutation = (
            saved.shape == expected.shape
            and len(set(saved_list)) == len(saved_list)
            and sorted(saved_list) == sorted(expected.tolist())
        )
        if not (reorder and permutation):
            raise _order_error(saved, labels)
        index = jnp.asarray([saved_list.index(d) for d in expected.tolist()])
        return node._replace(**{f: jnp.take(getattr(node, f), index) for f in PER_GROUP_FIELDS})  # type: ignore[arg-type]  # only per-group array fields

    return jax.tree.map(fix, opt_state, is_leaf=lambda x: isinstance(x, AGGCState))


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
