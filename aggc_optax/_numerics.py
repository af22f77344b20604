"""The numerics of one AGGC step: group norms with the overflow rescue, the compensated
EMA, the rescale, and the dtypes each runs in.

Every function here is pure array math on leaves and per-group vectors; what a
group is and which hyperparameters it has is decided elsewhere (``_aggc``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from aggc_optax import _devices
from aggc_optax.labels import Placement


class AcrossDevices(NamedTuple):
    """Inside ``shard_map``/``pmap``: the mapped axes and whether sums become means.

    Each leaf's sum of squares is reduced over the axes of ``axis_name`` that it
    varies over (:mod:`aggc_optax._devices`); ``mean`` is the reference's
    ``sync_dist`` (``pmean``), else ``psum``.
    """

    axis_name: Any
    mean: bool


EPS = 1e-12  # the reference's branch and division epsilon
NORM_FLOOR = 1e-16  # added to the sum of squares: an all-zero group has norm 1e-8
_INT32_MAX = int(np.iinfo(np.int32).max)


def python_max(a: jax.Array, b: jax.Array) -> jax.Array:
    # Python's max(a, b) keeps a unless b > a, so max(0.0, nan) is 0.0; the
    # reference relies on this for non-finite EMAs (docs/reference-behaviour.md §8).
    return jnp.where(b > a, b, a)


def python_min(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.where(b < a, b, a)


def stats_dtype() -> Any:
    # float64 when jax_enable_x64 is on: the reference does its scalar math in
    # Python floats, so that is the closest match; float32 otherwise.
    return jnp.result_type(float)


def compute_dtype(dtype: Any) -> Any:
    # Per-tensor sums and the rescale run in float32 for half-precision leaves
    # (as torch does), in the leaf's own dtype for float32 and float64. float8
    # types have no implicit promotion: they are computed in float32 too.
    if jnp.finfo(dtype).bits < 32:
        return jnp.dtype(jnp.float32)
    return jnp.promote_types(dtype, jnp.float32)


def saturating_add(counter: jax.Array, increment: jax.Array) -> jax.Array:
    """``counter + increment`` that stays at int32's maximum instead of wrapping negative."""
    return jnp.where(counter >= _INT32_MAX - increment, _INT32_MAX, counter + increment)


def ema_step(
    ema: jax.Array,
    residual: jax.Array,
    beta: jax.Array,
    one_minus_beta: jax.Array,
    x: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """``beta * ema + (1 - beta) * x`` on the unevaluated sum ``ema + residual``.

    A float32 EMA stalls once its increment drops below half an ulp: at
    ``beta = 0.999`` it can stay ``2**-24 / (1 - beta)``, about 6e-5 relative,
    away from the float64 recurrence of the reference. Carrying the rounding
    error of each update in ``residual`` (an exact TwoSum) keeps the EMA within
    float32 rounding of it. Non-finite values take the plain formula, so NaN and
    inf propagate exactly as in the reference (docs/reference-behaviour.md §8).
    """
    plain = beta * ema + one_minus_beta * x
    delta = one_minus_beta * (x - ema) + beta * residual
    total = ema + delta
    delta_part = total - ema
    error = (ema - (total - delta_part)) + (delta - delta_part)
    compensated = jnp.isfinite(plain) & jnp.isfinite(total) & jnp.isfinite(error)
    return jnp.where(compensated, total, plain), jnp.where(compensated, error, 0.0)


def per_group_scalars(values: jax.Array) -> list[jax.Array]:
    """``values[g]`` for every group ``g``, each as a scalar of its own.

    A plain ``values[g]`` is a static slice, which XLA fuses into every
    consumer: each leaf's update kernel would then embed its group's index, so
    leaves of one shape would need one compiled kernel per group (XLA compiles
    one kernel per distinct fused computation) and compile time would grow with
    the number of groups, to 4x a global-norm clip's with one group per leaf.
    The max of a pair of neighbours with the other one masked to ``-inf`` is
    exact (``max(v, -inf) == v``, NaN and inf included) and, being a
    reduction, is not fused into an elementwise consumer: leaves of one shape
    share one kernel whatever their group, as under a global-norm clip, and the
    extraction costs one tiny kernel per group.
    """
    num_groups = values.shape[0]
    if num_groups == 1:
        return [values[0]]
    out = []
    for g in range(num_groups):
        start = min(g, num_groups - 2)
        pair = values[start : start + 2]
        out.append(jnp.max(jnp.where(jnp.arange(2) == g - start, pair, -jnp.inf)))
    return out


def group_norms(
    placement: Placement, leaves: Sequence[Any], across_devices: AcrossDevices, *, rescue: bool
) -> jax.Array:
    """Each group's norm, ``[G]``, from the leaves its norm counts.

    Overflow-safe for finite input: a group whose plain sum of squares
    overflowed (every entry finite, a float32 norm above about 1.8e19) gets
    ``2**k * sqrt(sum((g * 2**-k)**2))`` instead (:func:`_rescued_norms`,
    exact power-of-two arithmetic), computed under ``jax.lax.cond`` only on a
    step where some group's sum is not finite: a normal step pays one scalar
    test and keeps its bits. A NaN or inf entry makes both sums non-finite, so
    the group's norm stays non-finite and the NaN policy applies.
    """
    dtype = stats_dtype()
    # Per-tensor sums, added per group in leaf order (_devices.reduced_totals): no
    # [leaves] buffer and no scatter-add (a serial loop on CPU, atomics in no fixed
    # order on GPU).
    axes = _devices.reduction_axes(
        across_devices.axis_name, placement.names, placement.counted, leaves
    )
    squares = [
        jnp.sum(jnp.square(leaf.astype(compute_dtype(leaf.dtype)))).astype(dtype)
        if counted
        else None
        for counted, leaf in zip(placement.counted, leaves)
    ]
    total = _sum_groups(placement, squares, axes, across_devices)
    norm = jnp.sqrt(total + NORM_FLOOR)
    if not rescue:
        # the reference's float32 sums overflow to inf (docs/reference-behaviour.md §8)
        return norm
    counted_leaves = [leaf for leaf, c in zip(leaves, placement.counted) if c]
    rescued = jax.lax.cond(
        jnp.any(~jnp.isfinite(total)),
        lambda xs: _rescued_norms(placement, xs, axes, across_devices),
        lambda xs: jnp.full(norm.shape, jnp.nan, dtype),
        counted_leaves,
    )
    return jnp.where(jnp.isfinite(total) | ~jnp.isfinite(rescued), norm, rescued)


def _overflow_shift(dtype: Any) -> int:
    """``k`` such that ``sum((x * 2**-k) ** 2)`` is finite for any finite ``x`` of ``dtype``.

    Each scaled square is below ``2**(2 * maxexp - 2 * k)``; ``k = (maxexp +
    64) / 2`` keeps a sum of ``2**63`` of them below ``2**(maxexp - 1)`` (96
    for float32, 544 for float64). The entries whose scaled squares underflow
    (float32: below ``2**33``) add at most ``n * 2**-62`` of a sum that
    overflowed (above ``2**128``): negligible.
    """
    return (int(jnp.finfo(dtype).maxexp) + 64) // 2


#: In the overflow rescue, leaves of at most this many entries are reduced together,
#: by shape, dtype and sharding, up to this many entries at a time: one variadic
#: reduction instead of one per leaf (compile time with many small leaves), with no
#: copy of the leaves. Larger leaves are reduced one by one.
_STACK_ENTRIES = 1 << 14
_STACK_CAP = 1 << 18


def _rescued_norms(
    placement: Placement, counted: list[Any], axes: list[Any], across_devices: AcrossDevices
) -> jax.Array:
    """``2**k * sqrt(sum((g * 2**-k)**2))`` per group: the norms of an overflowing step.

    Finite for any finite entries whose norm the stats dtype can hold; a NaN or
    inf entry gives a non-finite sum, as in the plain norm.
    """
    dtype = stats_dtype()
    groups = [g for g, c in zip(placement.groups, placement.counted) if c]
    counted_axes = [a for a, c in zip(axes, placement.counted) if c]
    shifts = [_overflow_shift(compute_dtype(leaf.dtype)) for leaf in counted]
    # each group's common shift: only a mixed float32/float64 group has two
    group_shift = [0] * len(placement.labels)
    for group, shift in zip(groups, shifts):
        group_shift[group] = max(group_shift[group], shift)
    per_leaf: list[jax.Array | None] = [None] * len(counted)
    for members in _stacks(counted, counted_axes):
        sums = _scaled_square_sums([counted[i] for i in members], shifts[members[0]])
        for j, i in enumerate(members):
            # to the group's common shift: a power of two, exact
            weight = 4.0 ** (shifts[i] - group_shift[groups[i]])
            leaf_sum = sums[j].astype(dtype)
            per_leaf[i] = leaf_sum if weight == 1.0 else leaf_sum * jnp.asarray(weight, dtype)
    in_order = iter(per_leaf)
    squares = [next(in_order) if c else None for c in placement.counted]
    # each leaf reduced over the mesh axes it varies over (_devices.reduced_totals)
    total = _sum_groups(placement, squares, axes, across_devices, from_zero=True)
    # A norm beyond the stats dtype's range (float32: 3.4e38) is inf: the group is
    # then non-finite, as for an inf entry.
    return jnp.sqrt(total) * jnp.asarray([2.0**k for k in group_shift], dtype)


def _stacks(leaves: list[Any], axes: list[Any]) -> list[list[int]]:
    """Indices of ``leaves`` reduced together: small ones by shape, dtype, sharding and axes.

    The sharding is part of the key because the operands of one reduction must
    share it (under a mesh with explicit axes, mixing them is refused); the mesh
    axes a leaf varies over (``axes``) because each leaf's sum is reduced over
    its own.
    """
    stacks: dict[Any, list[int]] = {}
    done: list[list[int]] = []
    for i, (leaf, leaf_axes) in enumerate(zip(leaves, axes)):
        size = int(np.prod(leaf.shape, dtype=np.int64))
        if size > _STACK_ENTRIES:
            done.append([i])
            continue
        key = (leaf.shape, leaf.dtype, getattr(jax.typeof(leaf), "sharding", None), leaf_axes)
        stack = stacks.setdefault(key, [])
        if (len(stack) + 1) * size > _STACK_CAP:
            done.append(stack)
            stack = stacks[key] = []
        stack.append(i)
    return done + [s for s in stacks.values() if s]


def _scaled_square_sums(leaves: list[Any], shift: int) -> list[jax.Array]:
    """``sum((x * 2**-shift)**2)`` of each of ``leaves`` (one shape and dtype), in order.

    One variadic reduction over all of them: no stacked copy, one kernel.
    """
    op_dtype = compute_dtype(leaves[0].dtype)
    # The factor passes through an optimization barrier with the leaves: as a
    # bare constant, XLA:CPU would materialise its broadcast to their shape.
    factor, _ = jax.lax.optimization_barrier((jnp.asarray(2.0**-shift, op_dtype), leaves))
    scaled = tuple(jnp.square(x.astype(op_dtype) * factor) for x in leaves)
    zeros = tuple(jnp.zeros((), op_dtype) for _ in leaves)

    def add(a: tuple[jax.Array, ...], b: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        return tuple(x + y for x, y in zip(a, b))

    return list(jax.lax.reduce(scaled, zeros, add, tuple(range(leaves[0].ndim))))


def _sum_groups(
    placement: Placement,
    squares: list[jax.Array | None],
    axes: list[Any],
    across_devices: AcrossDevices,
    *,
    from_zero: bool = False,
) -> jax.Array:
    return _devices.reduced_totals(
        placement.groups,
        len(placement.labels),
        squares,
        axes,
        across_devices.axis_name,
        mean=across_devices.mean,
        dtype=stats_dtype(),
        from_zero=from_zero,
    )


def across_devices(axis_name: Any, *, mean: bool) -> AcrossDevices:
    """How the per-group sums of squares are summed over devices (nothing without ``axis_name``
    outside ``shard_map``/``pmap``; see :mod:`aggc_optax._devices`)."""
    return AcrossDevices(axis_name, mean)


def rescale(placement: Placement, leaves: Sequence[Any], scale: jax.Array) -> list[Any]:
    """Every labelled leaf times its group's factor, in the leaf's compute dtype."""
    group_scale = per_group_scalars(scale)
    out = []
    for group, leaf in zip(placement.groups, leaves):
        if group < 0:
            out.append(leaf)
            continue
        op_dtype = compute_dtype(leaf.dtype)
        factor = group_scale[group]
        scaled = (leaf.astype(op_dtype) * factor.astype(op_dtype)).astype(leaf.dtype)
        # A group left alone comes back bit-identical (XLA:CPU flushes subnormal
        # products to zero); the select fuses into the multiply's kernel.
        out.append(jnp.where(factor == 1, leaf, scaled))
    return out
