"""Inside ``jax.shard_map`` (or ``jax.pmap``): the mesh axes each leaf's sum of squares is
summed over.

JAX records on every value inside ``shard_map`` (with ``check_vma=True``, the
default) which manual mesh axes it varies over. A gradient sharded over an axis
varies over it; the gradient of a replicated leaf (``PartitionSpec()``) has
already been summed over the devices by JAX's own transposes and varies over
none. Reducing each leaf over exactly its axes gives every group the norm of the
whole gradient, whatever its mix of replicated, sharded and partly sharded leaves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

# A leaf's entry in reduction_axes: reduce over axis_name itself, the one call
# every leaf got before per-leaf reduction (kept where it is right, for its bits).
DECLARED = "<axis_name>"


def _axis_tuple(axis_name: Any) -> tuple[Any, ...]:
    if axis_name is None:
        return ()
    if isinstance(axis_name, (tuple, list)):
        return tuple(axis_name)
    return (axis_name,)


def _manual_axes() -> tuple[Any, ...]:
    """The mesh axes of the enclosing ``jax.shard_map`` (or ``jax.pmap``); () outside."""
    try:
        return tuple(jax.sharding.get_abstract_mesh().manual_axes)
    except (AttributeError, RuntimeError, ValueError):  # a JAX without it: nothing to read
        return ()


def varying_axes(x: Any) -> frozenset[Any] | None:
    """The manual mesh axes ``x`` varies over, as JAX records them (None: not recorded)."""
    try:
        aval = jax.typeof(x)
    except TypeError:
        return None
    vma = getattr(aval, "vma", None)  # the name in JAX's shard_map docs
    if vma is None:  # jax 0.10 keeps it in the aval's manual axis type
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
    return None if vma is None else frozenset(vma)


def not_an_axis(axis_name: Any) -> ValueError:
    return ValueError(
        f"aggc: axis_name={axis_name!r} is not an axis of the enclosing "
        "jax.shard_map or jax.pmap: call update inside one that maps this axis name "
        "(e.g. shard_map over a mesh with that axis), or drop axis_name under plain "
        "jax.jit, where sharded norms are already global"
    )


def reduction_axes(
    axis_name: Any, names: Sequence[str], counted: Sequence[bool], leaves: Sequence[Any]
) -> list[Any]:
    """Per leaf, what its sum of squares is reduced over: None (nothing) or mesh axes.

    ``axis_name`` must name every axis some counted leaf varies over; each leaf
    is reduced over exactly the axes it varies over. Where JAX records nothing
    (``check_vma=False``, ``jax.pmap``) every leaf is reduced over
    ``axis_name``, as the caller declares; there ``axis_name=None`` is an error
    (whether the gradients are split cannot be known) and ``axis_name=()``
    declares whole gradients on every device.

    Raises:
      ValueError: ``axis_name`` is not an axis of the enclosing mapping, misses
        an axis the gradients vary over, or is None where that cannot be known.
    """
    declared = _axis_tuple(axis_name)
    every = DECLARED if declared else None
    manual = _manual_axes()
    if not manual:  # plain jit (sharded norms are global) or eager; a bad name fails in psum
        return [every] * len(leaves)
    if any(axis not in manual for axis in declared):
        raise not_an_axis(axis_name)
    if not getattr(jax.config, "check_vma", False):
        if axis_name is None:
            raise ValueError(
                "aggc: axis_name=None inside jax.shard_map with check_vma=False (or jax.pmap), "
                f"where JAX does not record which of the mesh axes {manual} the gradients "
                "vary over: each device would clip by the norm of its own shard. Pass "
                "axis_name naming the axes the gradients are split over (each leaf's sum of "
                "squares is then summed over them), axis_name=() if every device holds the "
                "whole gradient (e.g. after a psum), or run shard_map with check_vma=True, "
                "where each leaf is reduced over the axes it varies over."
            )
        return [every] * len(leaves)
    varying: list[frozenset[Any] | None] = []
    for name, is_counted, leaf in zip(names, counted, leaves):
        vma = varying_axes(leaf) if is_counted else frozenset()
        if vma is None:
            raise ValueError(
                "aggc: cannot tell which mesh axes of this jax.shard_map the gradient of "
                f"leaf {name!r} varies over (JAX records none on a {type(leaf).__name__}); "
                "pass it as a jax array"
            )
        varying.append(vma if is_counted else None)
    seen = frozenset().union(*(v for v in varying if v))
    if not seen <= set(declared):
        axes = tuple(axis for axis in manual if axis in seen)
        raise ValueError(
            f"aggc: axis_name={axis_name!r}, but inside this jax.shard_map the gradients "
            f"vary over the mesh axes {axes}: each device holds part of them, so each "
            f"group's norm must be summed over those axes. Pass axis_name={axes!r} (a leaf "
            "that does not vary over an axis, e.g. a replicated bias, is not summed over it)."
        )
    if {v for v in varying if v is not None} == {frozenset(declared)}:
        return [None if v is None else every for v in varying]
    return [tuple(axis for axis in manual if axis in v) if v else None for v in varying]


def reduced_totals(
    groups: Sequence[int],
    num_groups: int,
    squares: Sequence[jax.Array | None],
    axes: Sequence[Any],
    axis_name: Any,
    *,
    mean: bool,
    dtype: Any,
    from_zero: bool = False,
) -> jax.Array:
    """``[G]``: each group's sum of its leaves' squares, each leaf reduced over its axes.

    Leaves that vary over the same axes are summed first (per group a chain of
    scalar adds in leaf order, as the reference accumulates its per-tensor sums
    in Python floats; ``from_zero`` starts each chain at 0; no ``[leaves]``
    buffer and no scatter-add), then each such set is reduced once (``psum``,
    or ``pmean`` with ``mean``) over its axes and the sets are added.
    """
    by_axes: dict[Any, list[jax.Array | None]] = {}
    for group, square, leaf_axes in zip(groups, squares, axes):
        if square is None:
            continue
        sums = by_axes.setdefault(leaf_axes, [None] * num_groups)
        prior = sums[group]
        if prior is None and from_zero:
            prior = jnp.zeros((), dtype)
        sums[group] = square if prior is None else prior + square
    total: jax.Array | None = None
    for leaf_axes, sums in by_axes.items():
        part = jnp.stack([jnp.zeros((), dtype) if x is None else x for x in sums])
        if leaf_axes is not None:
            part = _reduce(part, axis_name if leaf_axes == DECLARED else leaf_axes, axis_name, mean)
        total = part if total is None else total + part
    return jnp.zeros((num_groups,), dtype) if total is None else total


def _reduce(total: jax.Array, axes: Any, axis_name: Any, mean: bool) -> jax.Array:
    reduce = jax.lax.pmean if mean else jax.lax.psum
    try:
        return reduce(total, axes)
    except (NameError, AssertionError, KeyError) as err:
        # JAX says "unbound axis name" outside shard_map/pmap, and raises a bare
        # AssertionError for a name the enclosing shard_map's mesh does not have
        raise not_an_axis(axis_name) from err


__all__ = ["DECLARED", "not_an_axis", "reduced_totals", "reduction_axes", "varying_axes"]
