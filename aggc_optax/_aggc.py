"""Adaptive Group Gradient Clipping as an optax gradient transformation."""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aggc_optax import _config, _labels, _validation
from aggc_optax._config import Config, Hyper
from aggc_optax._labels import ParamLabels, Placement

EPS = 1e-12  # the reference's branch and division epsilon
NORM_FLOOR = 1e-16  # added to the sum of squares: an all-zero group has norm 1e-8


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


def _python_max(a: jax.Array, b: jax.Array) -> jax.Array:
    # Python's max(a, b) keeps a unless b > a, so max(0.0, nan) is 0.0; the
    # reference relies on this for non-finite EMAs (docs/reference-behaviour.md §8).
    return jnp.where(b > a, b, a)


def _python_min(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.where(b < a, b, a)


def _stats_dtype() -> Any:
    # float64 when jax_enable_x64 is on: the reference does its scalar math in
    # Python floats, so that is the closest match; float32 otherwise.
    return jnp.result_type(float)


def _compute_dtype(dtype: Any) -> Any:
    # Per-tensor sums and the rescale run in float32 for half-precision leaves
    # (as torch does), in the leaf's own dtype for float32 and float64. float8
    # types have no implicit promotion: they are computed in float32 too.
    if jnp.finfo(dtype).bits < 32:
        return jnp.dtype(jnp.float32)
    return jnp.promote_types(dtype, jnp.float32)


def _leaf_dtype(name: str, leaf: Any) -> Any:
    """The dtype of a leaf, or a TypeError naming it when it is not an array or a number."""
    if not isinstance(leaf, (str, bytes)):
        try:
            return jnp.result_type(leaf)
        except TypeError:
            pass
    raise TypeError(
        f"aggc: leaf {name!r} is {leaf!r} ({type(leaf).__name__}), not an array or a number; "
        "give it the label None to pass it through, or keep it out of the tree"
    )


def _as_array(leaf: Any) -> Any:
    # a Python or NumPy scalar leaf (eager use) becomes an array; arrays and tracers stay
    return leaf if hasattr(leaf, "astype") and hasattr(leaf, "dtype") else jnp.asarray(leaf)


_INT32_MAX = int(np.iinfo(np.int32).max)


def _saturating_add(counter: jax.Array, increment: jax.Array) -> jax.Array:
    """``counter + increment`` that stays at int32's maximum instead of wrapping negative."""
    return jnp.where(counter >= _INT32_MAX - increment, _INT32_MAX, counter + increment)


def _check_leaf_dtype(name: str, leaf: Any) -> None:
    dtype = _leaf_dtype(name, leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"aggc: leaf {name!r} has a group label but dtype {dtype}; only floating-point "
            "gradients can be clipped (give it the label None to pass it through)"
        )


def _at_step(
    values: tuple[Any, ...], count: jax.Array, dtype: Any, transform: Callable[[Any], Any] | None
) -> jax.Array:
    """One hyperparameter at step ``count``: a scalar when all groups share it, else ``[G]``.

    ``transform`` is applied to each value before it becomes an array, so that a
    Python float is transformed in float64 (see ``1 - ema_beta``).
    """

    def evaluate(value: Any) -> Any:
        value = value(count) if callable(value) else value
        return value if transform is None else transform(value)

    if all(v is values[0] for v in values):
        return jnp.asarray(evaluate(values[0]), dtype)
    return jnp.stack([jnp.asarray(evaluate(v), dtype) for v in values])


def _hyper_at(per_group: Hyper, count: jax.Array, dtype: Any) -> Hyper:
    """Every hyperparameter as an array (scalar or ``[G]``) at step ``count``."""
    return Hyper(
        **{
            field: _at_step(values, count, bool if field == "raise_small" else dtype, None)
            for field, values in per_group._asdict().items()
        }
    )


def _ema_step(
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


class GroupStep(NamedTuple):
    """What one step decides per group (every field ``[G]``)."""

    scale: jax.Array
    lower: jax.Array
    upper: jax.Array
    ema: jax.Array
    ema_residual: jax.Array
    ema_count: jax.Array
    down: jax.Array
    raised: jax.Array


def _branches(
    hp: Hyper, norm: jax.Array, lower: jax.Array, upper: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """docs/reference-behaviour.md §4 step 2: ``(down_scale, up_scale, down, raised)``."""
    down = (upper > 0) & (norm > upper + EPS)
    raised = hp.raise_small & (lower > 0) & (norm < lower - EPS) & ~down
    down_scale = upper / (norm + EPS)
    floor = hp.max_down_scale
    down_scale = jnp.where(floor > 0, _python_max(down_scale, floor), down_scale)
    up_scale = lower / (norm + EPS)
    up_scale = jnp.where(hp.max_up_scale > 0, _python_min(up_scale, hp.max_up_scale), up_scale)
    return down_scale, up_scale, down, raised


def _group_step(
    config: Config,
    hp: Hyper,
    one_minus_beta: jax.Array,
    norm: jax.Array,
    state: AGGCState,
    in_order: bool | jax.Array = True,
) -> GroupStep:
    """The per-group scalar math of docs/reference-behaviour.md §4, vectorised over groups.

    ``in_order``: whether the state's arrays are in its labels' order (False:
    every group is skipped, under either policy; see :func:`check_state`).
    """
    ema, residual, ema_count = state.ema, state.ema_residual, state.ema_count
    if config.nonfinite == "reference":
        taken = jnp.broadcast_to(jnp.asarray(in_order), norm.shape)
    else:
        # The safe policy: a step with a non-finite norm, or with a hyperparameter
        # out of its range at run time (injected or from a schedule), is skipped for
        # that group (its gradients pass through, its EMA is kept). A non-finite
        # EMA (e.g. from a restore) is detected: that step is skipped too and the
        # group's EMA is reset, so the next step starts it over as if never
        # updated. The reset is applied to the outputs only: selecting on the
        # inputs of the EMA's TwoSum changes how XLA fuses it, and its bits.
        restart = ~(jnp.isfinite(ema) & jnp.isfinite(residual))
        taken = jnp.isfinite(norm) & _hyper_ok(config, hp, one_minus_beta) & ~restart
        if in_order is not True:
            taken = taken & in_order
    if config.ema_init == "first":
        first = (ema_count == 0) & taken
        ema, residual = jnp.where(first, norm, ema), jnp.where(first, 0.0, residual)
    stat, updates_in_stat = ema, ema_count
    if config.variant == "paper":
        # Paper eq. 2-4: the EMA of raw norms, including this step, sets the bounds.
        stepped = _ema_step(ema, residual, hp.ema_beta, one_minus_beta, norm)
        stepped = tuple(jnp.where(taken, new, old) for new, old in zip(stepped, (ema, residual)))  # type: ignore[assignment]  # two arrays in, two out
        stat, updates_in_stat = stepped[0], ema_count + taken
    if config.ema_init == "bias_corrected":
        correction = 1 - hp.ema_beta ** updates_in_stat.astype(norm.dtype)
        corrected = stat / jnp.where(correction > 0, correction, 1)
        stat = jnp.where(updates_in_stat > 0, corrected, stat)

    if config.auto_bounds:
        lower = _python_max(hp.min_norm, stat * hp.low_mult)
        upper = _python_max(jnp.zeros_like(stat), stat * hp.high_mult)
    else:
        lower, upper = hp.min_norm, hp.max_norm
    lower, upper = jnp.broadcast_to(lower, norm.shape), jnp.broadcast_to(upper, norm.shape)
    down_scale, up_scale, down, raised = _branches(hp, norm, lower, upper)
    down, raised = down & taken, raised & taken
    scale = jnp.where(down, down_scale, jnp.where(raised, up_scale, jnp.ones_like(norm)))

    if config.variant != "paper":
        # The reference feeds the EMA the intended post-clip norm.
        fed = _ema_step(ema, residual, hp.ema_beta, one_minus_beta, norm * scale)
        stepped = tuple(jnp.where(taken, new, old) for new, old in zip(fed, (ema, residual)))  # type: ignore[assignment]  # two arrays in, two out
    ema_count = _saturating_add(ema_count, taken.astype(state.ema_count.dtype))
    if config.nonfinite != "reference":
        stepped = tuple(jnp.where(restart, jnp.zeros_like(x), x) for x in stepped)  # type: ignore[assignment]  # two arrays in, two out
        ema_count = jnp.where(restart, 0, ema_count)
    return GroupStep(scale, lower, upper, *stepped, ema_count, down, raised)


def _hyper_ok(config: Config, hp: Hyper, one_minus_beta: jax.Array) -> jax.Array:
    """Whether each group's hyperparameters at this step are in range (scalar or ``[G]``).

    Construction checks numbers; this catches what only exists at run time
    (``optax.inject_hyperparams`` values, schedule outputs). For a number fixed
    at construction XLA folds it to a constant.
    """

    def finite_nonneg(x: jax.Array) -> jax.Array:
        return jnp.isfinite(x) & (x >= 0)

    ok = finite_nonneg(hp.ema_beta) & (hp.ema_beta < 1) & jnp.isfinite(one_minus_beta)
    for x in (hp.low_mult, hp.high_mult, hp.min_norm, hp.max_norm):
        ok = ok & finite_nonneg(x)
    ok = ok & finite_nonneg(hp.max_up_scale) & finite_nonneg(hp.max_down_scale)
    if config.strict_caps:
        # aggc()'s caps: 0 (off), an upward ceiling >= 1, a downward floor in (0, 1)
        # (a floor of 1 would count clips that change nothing)
        ok = ok & ((hp.max_up_scale == 0) | (hp.max_up_scale >= 1)) & (hp.max_down_scale < 1)
    return ok


def _per_group_scalars(values: jax.Array) -> list[jax.Array]:
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


def _group_norms(config: Config, placement: Placement, leaves: list[Any]) -> jax.Array:
    """Each group's norm, ``[G]``, from the leaves its norm counts.

    Overflow-safe for finite input: a group whose plain sum of squares
    overflowed (every entry finite, a float32 norm above about 1.8e19) gets
    ``2**k * sqrt(sum((g * 2**-k)**2))`` instead (:func:`_rescued_norms`,
    exact power-of-two arithmetic), computed under ``jax.lax.cond`` only on a
    step where some group's sum is not finite: a normal step pays one scalar
    test and keeps its bits. A NaN or inf entry makes both sums non-finite, so
    the group's norm stays non-finite and the NaN policy applies.
    """
    dtype = _stats_dtype()
    # Each group's sum of squares is a chain of scalar adds in leaf order, as
    # the reference accumulates its per-tensor sums in Python floats; no
    # [leaves] buffer and no scatter-add (a serial loop on CPU, atomics in
    # no fixed order on GPU).
    sums: list[jax.Array | None] = [None] * len(placement.labels)
    for group, counted, leaf in zip(placement.groups, placement.counted, leaves):
        if counted:
            square = jnp.sum(jnp.square(leaf.astype(_compute_dtype(leaf.dtype)))).astype(dtype)
            sums[group] = square if sums[group] is None else sums[group] + square  # type: ignore[operator]  # not None on this branch
    total = jnp.stack([jnp.zeros((), dtype) if s is None else s for s in sums])
    if config.axis_name is not None:
        total = _axis_reduce(config, total)
    norm = jnp.sqrt(total + NORM_FLOOR)
    if config.nonfinite == "reference":
        # the reference's float32 sums overflow to inf (docs/reference-behaviour.md §8)
        return norm
    counted_leaves = [leaf for leaf, c in zip(leaves, placement.counted) if c]
    rescued = jax.lax.cond(
        jnp.any(~jnp.isfinite(total)),
        lambda xs: _rescued_norms(config, placement, xs),
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


def _rescued_norms(config: Config, placement: Placement, counted: list[Any]) -> jax.Array:
    """``2**k * sqrt(sum((g * 2**-k)**2))`` per group: the norms of an overflowing step.

    Finite for any finite entries whose norm the stats dtype can hold; a NaN or
    inf entry gives a non-finite sum, as in the plain norm.
    """
    dtype = _stats_dtype()
    groups = [g for g, c in zip(placement.groups, placement.counted) if c]
    parts: list[list[tuple[int, jax.Array]]] = [[] for _ in placement.labels]
    for group, leaf in zip(groups, counted):
        op_dtype = _compute_dtype(leaf.dtype)
        shift = _overflow_shift(op_dtype)
        # The factor passes through an optimization barrier with the leaf: as a
        # bare constant, XLA:CPU would materialise its broadcast to the leaf's
        # shape, a gradient-sized buffer shared by the leaves of that shape.
        factor, _ = jax.lax.optimization_barrier((jnp.asarray(2.0**-shift, op_dtype), leaf))
        scaled = jnp.sum(jnp.square(leaf.astype(op_dtype) * factor)).astype(dtype)
        parts[group].append((shift, scaled))
    shifts = [max(k for k, _ in p) for p in parts]
    totals = []
    for shift, p in zip(shifts, parts):
        acc = jnp.zeros((), dtype)
        for k, part in p:
            # to the group's common shift (only a mixed float32/float64 group
            # differs): a power of two, exact
            acc = acc + (part if k == shift else part * jnp.asarray(4.0 ** (k - shift), dtype))
        totals.append(acc)
    total = jnp.stack(totals)
    if config.axis_name is not None:
        total = _axis_reduce(config, total)
    # A norm beyond the stats dtype's range (float32: 3.4e38) is inf: the group is
    # then non-finite, as for an inf entry.
    return jnp.sqrt(total) * jnp.asarray([2.0**k for k in shifts], dtype)


def _axis_reduce(config: Config, total: jax.Array) -> jax.Array:
    reduce = jax.lax.psum if config.axis_reduction == "sum" else jax.lax.pmean
    try:
        return reduce(total, config.axis_name)
    except (NameError, AssertionError, KeyError) as err:
        # JAX says "unbound axis name" outside shard_map/pmap, and raises a bare
        # AssertionError for a name the enclosing shard_map's mesh does not have
        raise ValueError(
            f"aggc: axis_name={config.axis_name!r} is not an axis of the enclosing "
            "jax.shard_map or jax.pmap: call update inside one that maps this axis name "
            "(e.g. shard_map over a mesh with that axis), or drop axis_name under plain "
            "jax.jit, where sharded norms are already global"
        ) from err


def _not_an_aggc_state(state: Any) -> TypeError:
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


def _rescale(placement: Placement, leaves: list[Any], scale: jax.Array) -> list[Any]:
    """Every labelled leaf times its group's factor, in the leaf's compute dtype."""
    group_scale = _per_group_scalars(scale)
    out = []
    for group, leaf in zip(placement.groups, leaves):
        if group < 0:
            out.append(leaf)
            continue
        op_dtype = _compute_dtype(leaf.dtype)
        factor = group_scale[group]
        scaled = (leaf.astype(op_dtype) * factor.astype(op_dtype)).astype(leaf.dtype)
        # A group left alone comes back bit-identical (XLA:CPU flushes subnormal
        # products to zero); the select fuses into the multiply's kernel.
        out.append(jnp.where(factor == 1, leaf, scaled))
    return out


def _check_placement(placement: Placement, leaves: list[Any], labels: tuple[str, ...]) -> None:
    for name, group, leaf in zip(placement.names, placement.groups, leaves):
        if group >= 0:
            _check_leaf_dtype(name, leaf)
    if placement.labels != tuple(labels):
        raise ValueError(
            "aggc: the updates do not have the groups of the parameters AGGC was initialised "
            f"with: {list(placement.labels)} in the updates, {list(labels)} at init"
        )


def _is_float_leaf(leaf: Any) -> bool:
    try:
        return jnp.issubdtype(_leaf_dtype("", leaf), jnp.floating)
    except TypeError:  # a str or other non-array leaf left out of every group
        return False


def _warn_unlabelled(config: Config, params: Any, placement: Placement) -> None:
    """Under the default rule, say how much of the model is left out of every group."""
    if config.param_labels is not None or config.unlabelled == "ignore":
        return
    leaves = jax.tree_util.tree_leaves(params)
    sizes = [int(np.prod(np.shape(leaf), dtype=np.int64)) for leaf in leaves]
    left_out = [
        (name, size)
        for name, group, leaf, size in zip(placement.names, placement.groups, leaves, sizes)
        if group < 0 and _is_float_leaf(leaf)
    ]
    if not left_out or not placement.labels:
        return
    share = sum(size for _, size in left_out) / max(1, sum(sizes))
    first = ", ".join(repr(name) for name, _ in left_out[:5])
    message = (
        f"aggc: the default label rule (aggc_optax.reference_label) puts {len(left_out)} "
        f"floating-point {'leaf' if len(left_out) == 1 else 'leaves'} ({share:.1%} of all "
        "parameters) in no group, so they are never "
        f"clipped: {first}{', ...' if len(left_out) > 5 else ''}. See "
        "aggc_optax.describe_groups(params); label them with param_labels (e.g. "
        "aggc_optax.module_labels), or pass unlabelled='ignore' if that is intended."
    )
    if config.unlabelled == "error":
        raise ValueError(message)
    warnings.warn(message, stacklevel=3)


def _no_groups(config: Config, placement: Placement) -> None:
    if config.on_no_groups == "error":
        more = " ..." if len(placement.names) > 8 else ""
        raise ValueError(
            "aggc: no parameter got a group label, so nothing would be clipped. "
            f"Leaves seen: {list(placement.names)[:8]}{more}. Pass param_labels "
            "(a labeler, aggc_optax.regex_labeler(rules) or a label tree); see describe_groups()."
        )
    warnings.warn(
        "AGGC: no parameter got a group label; like the reference clipper, the "
        "transformation disables itself and passes gradients through untouched.",
        stacklevel=3,
    )


def _init_state(labels: tuple[str, ...]) -> AGGCState:
    num_groups, dtype = len(labels), _stats_dtype()

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


def _state_in_order(state: AGGCState) -> bool | jax.Array:
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


def _build(config: Config) -> optax.GradientTransformationExtraArgs:
    per_layout: dict[tuple[str, ...], Hyper] = {}  # labels -> one value per group, per field

    def hyper_for(labels: tuple[str, ...]) -> Hyper:
        if labels not in per_layout:
            per_layout[labels] = _config.resolve(config, labels)
        return per_layout[labels]

    def init_fn(params: optax.Params) -> AGGCState:
        placement = _labels.place(params, config.param_labels)
        _check_placement(placement, jax.tree_util.tree_leaves(params), placement.labels)
        if not placement.labels:
            _no_groups(config, placement)
        _warn_unlabelled(config, params, placement)
        for key in _config.unmatched_keys(config, placement.labels):
            # most likely a typo (or the wrong label rule): say so rather than
            # leave that group silently on the default hyperparameters
            warnings.warn(
                f"aggc: group_hyperparams key {key!r} matches no group label (labels: "
                f"{list(placement.labels)}); its entry has no effect. Keys are exact labels "
                "or regular expressions matched against the whole label.",
                stacklevel=3,
            )
        hyper_for(placement.labels)
        return _init_state(placement.labels)

    def update_fn(
        updates: optax.Updates, state: AGGCState, params: optax.Params | None = None, **extra: Any
    ) -> tuple[optax.Updates, AGGCState]:
        del params, extra
        if not isinstance(state, AGGCState):
            raise _not_an_aggc_state(state)
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        placement = _labels.place(updates, config.param_labels)  # as optax.partition does
        _check_placement(placement, leaves, state.labels)
        leaves = [_as_array(x) if g >= 0 else x for x, g in zip(leaves, placement.groups)]
        count = optax.safe_increment(state.count)
        in_order = _state_in_order(state)
        if not state.labels:
            return updates, state._replace(count=count)
        norm = _group_norms(config, placement, leaves)
        per_group = hyper_for(tuple(state.labels))
        hp = _hyper_at(per_group, state.count, norm.dtype)
        # 1 - beta from the Python float: rounding beta = 0.999 to float32 first
        # would put a 1.3e-5 relative error into every EMA update.
        one_minus_beta = _at_step(per_group.ema_beta, state.count, norm.dtype, lambda b: 1 - b)
        step = _group_step(config, hp, one_minus_beta, norm, state, in_order)
        new_state = AGGCState(
            count=count,
            ema=step.ema,
            ema_residual=step.ema_residual,
            norm=norm,
            lower=step.lower,
            upper=step.upper,
            scale=step.scale,
            ema_count=step.ema_count,
            clip_down_count=_saturating_add(state.clip_down_count, step.down.astype(jnp.int32)),
            raise_count=_saturating_add(state.raise_count, step.raised.astype(jnp.int32)),
            label_digest=state.label_digest,
            labels=state.labels,
        )
        return treedef.unflatten(_rescale(placement, leaves, step.scale)), new_state  # type: ignore[attr-defined]  # jax's stub lacks PyTreeDef methods

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def aggc(
    *,
    high_mult: float | jax.Array | optax.Schedule = _config.DEFAULT_HIGH_MULT,
    ema_beta: float | jax.Array = 0.99,
    ema_init: str = "first",
    low_mult: float | jax.Array | optax.Schedule | None = None,
    min_norm: float | jax.Array | None = None,
    max_up_scale: float | jax.Array | None = None,
    max_down_scale: float | jax.Array | None = None,
    auto_bounds: bool = True,
    max_norm: float | jax.Array | None = None,
    variant: str = "reference",
    param_labels: ParamLabels = None,
    group_hyperparams: Mapping[str, Mapping[str, Any]] | None = None,
    axis_name: Any = None,
    unlabelled: str = "warn",
) -> optax.GradientTransformationExtraArgs:
    r"""Adaptive Group Gradient Clipping (AGGC).

    Leaves are grouped by module type (every layer's ``q_proj`` in one group,
    and so on, from their pytree paths). For group :math:`j` at step :math:`t`,
    with :math:`\|g_j\| = \sqrt{\sum_i \|g_{j,i}\|^2 + 10^{-16}}` and
    :math:`S_j` its EMA before the step:

    .. math::
      U_j = \alpha_\text{high}(t)\, S_j, \qquad
      L_j = \max(\text{min\_norm}, \alpha_\text{low}(t)\, S_j),

    .. math::
      c_j = \begin{cases}
        \max(U_j / (\|g_j\| + \epsilon), \text{max\_down\_scale}) &
          \|g_j\| > U_j + \epsilon \\
        \min(L_j / (\|g_j\| + \epsilon), \text{max\_up\_scale}) &
          \text{raising},\ \|g_j\| < L_j - \epsilon \\
        1 & \text{otherwise,} \end{cases}

    every gradient of the group is multiplied by :math:`c_j` (in its own dtype)
    and :math:`S_j \leftarrow \beta S_j + (1 - \beta) \|g_j\| c_j`, with
    :math:`\epsilon = 10^{-12}`. Raising happens only when ``low_mult`` or
    ``min_norm`` is given; a cap not given is off. With ``auto_bounds=False``
    the bounds are ``[min_norm, max_norm]`` and the EMA is still updated.
    A group whose norm is NaN or inf passes its gradients through unchanged and
    keeps its EMA, so one bad batch neither disables nor inflates the group and
    an outer ``optax.apply_if_finite`` still sees the fault. The update runs
    inside ``jax.jit`` with no host round-trip, at the cost of a global-norm clip.

    The defaults leave normal steps untouched and clip a group down to three
    times its EMA when its norm exceeds that; the EMA starts at the group's first
    norm, so the first step clips nothing and there is no warm-up with tiny bounds.
    In the stability study (``docs/stability.md``: a byte-level LLaMA-style
    model on real text, 3 seeds) they rescaled 0.04% of normal (step, group)
    pairs, cut a ``v_proj`` x100 fault to 0.068x with 2 of 660 other pairs
    touched, and cost +0.002 held-out loss where global clipping cost +0.026;
    they did not improve the best loss. They ended within 0.07 of AdamW alone
    at every learning rate of the 3-seed sweep (1e-3 to 3), where
    ``high_mult=2.0`` did not, but 0.27 above it at lr 3 over 8 seeds (3.345
    against 3.076).
    The authors' recipes, exactly as their PyTorch clipper runs them, are
    ``aggc_optax.presets.lora_sft(total_steps)`` and ``presets.grpo()``
    (``docs/reference-behaviour.md`` §9).

    Args:
      high_mult: :math:`\alpha_\text{high}`, ``>= 0``: a number or an optax
        schedule of the 0-based step count (e.g. :func:`linear_bounds_schedule`).
      ema_beta: EMA decay :math:`\beta`, in ``[0, 1)``.
      ema_init: how :math:`S_j` starts: ``"first"`` (at the group's first finite
        norm, as if that norm had always been seen), ``"zero"`` (at 0, as the
        reference: the first steps clip to tiny bounds) or ``"bias_corrected"``
        (at 0, and the bounds use :math:`S_j / (1 - \beta^n)` after ``n``
        updates, as Adam does; the state keeps the uncorrected EMA).
      low_mult: :math:`\alpha_\text{low}` (a number or a schedule); giving it
        turns on raising groups below :math:`L_j`. Only with ``auto_bounds``.
      min_norm: floor of the lower bound (the whole lower bound without
        ``auto_bounds``); giving it turns on raising.
      max_up_scale: a ceiling (``>= 1``) on an upward scale; only with raising.
      max_down_scale: a floor (in ``(0, 1)``) on a downward scale (1 would
        never clip, so it is refused).
      auto_bounds: bounds from the EMA (``True``) or fixed ``[min_norm, max_norm]``.
      max_norm: the fixed upper bound; required with ``auto_bounds=False`` and
        rejected otherwise.
      variant: ``"reference"`` (bounds from the EMA before the step, fed the
        post-clip norm) or ``"paper"`` (the paper's eq. 2: the EMA of raw
        norms, including this step, sets this step's bounds).
      param_labels: how leaves get their group: ``None`` (the reference's rule,
        :func:`reference_label`, on each leaf's dotted path), a callable
        ``fn(name)`` or ``fn(name, leaf)``, :func:`regex_labeler` rules, or a
        pytree of labels shaped like the parameters. A label is a str, ``None``
        (the leaf passes through untouched) or :class:`ScaleOnly` (scaled with
        its group, not counted in the group's norm).
      group_hyperparams: per-group overrides: ``{label or regex: {field: value}}``
        for any of ``ema_beta, low_mult, high_mult, min_norm, max_norm,
        max_up_scale, max_down_scale``, with the meanings above (``None`` is
        "not given"). An exact label wins over patterns; among patterns
        (matched in full) the first wins; a key that is not a valid pattern
        (``"a[b"``) is an exact label only; fields not given take the arguments
        above. A key matching no group warns at ``init``.
      axis_name: inside ``shard_map``/``pmap``, the mapped axis (or axes) over
        which the per-group sums of squares are summed, so the norms are those
        of the whole sharded gradient. Not needed under ``jax.jit`` with
        sharded arrays: there the norms are already global.
      unlabelled: what ``init`` does when the default rule (``param_labels=None``)
        leaves floating-point leaves in no group: ``"warn"`` (how many, their
        share of the parameters, the first paths), ``"error"`` or ``"ignore"``.
        Leaves a labeler or label tree maps to ``None`` are left out on purpose
        and never reported.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is an
      :class:`AGGCState`; read its statistics with :func:`group_stats`.

    Example:
      >>> import jax.numpy as jnp, optax, aggc_optax
      >>> params = {"model": {"layers": {"0": {"q_proj": {"weight": jnp.ones((2, 2))}}}}}
      >>> tx = optax.chain(aggc_optax.aggc(), optax.adamw(1e-3))
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)
      >>> sorted(aggc_optax.group_stats(state))
      ['q_proj']

    References:
      Li, Wu, Chang, `AGGC: Adaptive Group Gradient Clipping for Stabilizing
      Large Language Model Training <https://arxiv.org/abs/2601.11864>`_,
      Findings of ACL 2026.
    """
    fields = {
        "ema_beta": ema_beta,
        "low_mult": low_mult,
        "high_mult": high_mult,
        "min_norm": min_norm,
        "max_norm": max_norm,
        "max_up_scale": max_up_scale,
        "max_down_scale": max_down_scale,
    }
    config = _config.aggc_config(
        fields,
        auto_bounds=auto_bounds,
        variant=variant,
        ema_init=ema_init,
        param_labels=param_labels,
        group_hyperparams=group_hyperparams,
        axis_name=axis_name,
        unlabelled=unlabelled,
    )
    return _build(config)


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
