"""Adaptive Group Gradient Clipping as an optax gradient transformation."""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from aggc_optax import _labels, _validation
from aggc_optax._labels import GroupLayout, ParamLabels

EPS = 1e-12  # the reference's branch and division epsilon
NORM_FLOOR = 1e-16  # added to the sum of squares: an all-zero group has norm 1e-8

NONFINITE_POLICIES = ("skip", "reference")
VARIANTS = ("reference", "paper")
EMA_INITS = ("zero", "first")
AXIS_REDUCTIONS = ("sum", "mean")
GROUP_FIELDS = (
    "ema_beta",
    "low_mult",
    "high_mult",
    "min_norm",
    "max_norm",
    "max_up_scale",
    "max_down_scale",
    "raise_small",
)


class AGGCState(NamedTuple):
    """State of :func:`aggc`: per-group vectors of shape ``[num_groups]``.

    Attributes:
      count: number of updates so far (the 0-based step of the next update).
      ema: each group's EMA of its (post-clip, by default) gradient norm.
      ema_residual: the rounding error of ``ema`` (the EMA is ``ema + ema_residual``
        to twice the state's precision), so a float32 EMA does not stall.
      norm: each group's pre-clip norm at the last step.
      lower: each group's lower bound at the last step.
      upper: each group's upper bound at the last step.
      scale: the factor each group's gradients were multiplied by at the last step.
      ema_count: how many updates each group's EMA has received (steps skipped
        by the ``nonfinite="skip"`` policy do not count).
      clip_down_count: how many steps each group was clipped down, in total.
      raise_count: how many steps each group was raised, in total.
      layout: static (no arrays): the group labels and which leaf is in which group.
    """

    count: jax.Array
    ema: jax.Array
    ema_residual: jax.Array
    norm: jax.Array
    lower: jax.Array
    upper: jax.Array
    scale: jax.Array
    ema_count: jax.Array
    clip_down_count: jax.Array
    raise_count: jax.Array
    layout: GroupLayout


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything :func:`aggc` was given, checked."""

    hyper: Mapping[str, Any]  # the defaults of every GROUP_FIELDS entry
    group_hyperparams: tuple[tuple[str, re.Pattern[str], Mapping[str, Any]], ...]
    auto_bounds: Any
    param_labels: ParamLabels
    nonfinite: str
    variant: str
    ema_init: str
    bias_correction: bool
    axis_name: Any
    axis_reduction: str
    on_no_groups: str  # "error" (aggc) or "disable" (the reference's behaviour)


def _python_max(a: jax.Array, b: jax.Array) -> jax.Array:
    # Python's max(a, b) keeps a unless b > a, so max(0.0, nan) is 0.0; the
    # reference relies on this for non-finite EMAs (spec 8.3).
    return jnp.where(b > a, b, a)


def _python_min(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.where(b < a, b, a)


def _stats_dtype() -> Any:
    # float64 when jax_enable_x64 is on: the reference does its scalar math in
    # Python floats, so that is the closest match; float32 otherwise.
    return jnp.result_type(float)


def _compute_dtype(dtype: Any) -> Any:
    # Per-tensor sums and the rescale run in float32 for half-precision leaves
    # (as torch does), in the leaf's own dtype for float32 and float64.
    return jnp.promote_types(dtype, jnp.float32)


def _check_leaf_dtype(name: str, leaf: Any) -> None:
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"aggc: leaf {name!r} has a group label but dtype {dtype}; only floating-point "
            "gradients can be clipped (give it the label None to pass it through)"
        )


def _group_values(
    config: _Config,
    layout: GroupLayout,
    field: str,
    count: jax.Array,
    transform: Callable[[Any], Any] | None = None,
) -> Any:
    """A hyperparameter's value at step ``count``: a scalar, or a ``[G]`` vector.

    ``transform`` is applied to each value before it becomes an array, so that a
    Python float is transformed in float64 (see ``1 - ema_beta``).
    """

    def evaluate(value: Any) -> Any:
        value = value(count) if callable(value) else value
        return value if transform is None else transform(value)

    default = config.hyper[field]
    if not config.group_hyperparams:
        return evaluate(default)
    per_group = [_resolve_group_field(config, label, field) for label in layout.labels]
    if all(v is default for v in per_group):
        return evaluate(default)
    return jnp.stack([jnp.asarray(evaluate(v), _stats_dtype()) for v in per_group])


def _resolve_group_field(config: _Config, label: str, field: str) -> Any:
    exact = [entry for key, _, entry in config.group_hyperparams if key == label]
    matched = exact or [
        entry for _, regex, entry in config.group_hyperparams if regex.fullmatch(label)
    ]
    if matched and field in matched[0]:
        return matched[0][field]
    return config.hyper[field]


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
    inf propagate exactly as in the reference (spec 8.3).
    """
    plain = beta * ema + one_minus_beta * x
    delta = one_minus_beta * (x - ema) + beta * residual
    total = ema + delta
    delta_part = total - ema
    error = (ema - (total - delta_part)) + (delta - delta_part)
    compensated = jnp.isfinite(plain) & jnp.isfinite(total) & jnp.isfinite(error)
    return jnp.where(compensated, total, plain), jnp.where(compensated, error, 0.0)


def _group_step(
    config: _Config,
    layout: GroupLayout,
    norm: jax.Array,
    state: AGGCState,
) -> tuple[jax.Array, ...]:
    """The per-group scalar math of spec section 4, vectorised over groups."""
    dtype = norm.dtype
    t = state.count

    def hp(field: str) -> jax.Array:
        return jnp.asarray(_group_values(config, layout, field, t), dtype)

    beta, low, high = hp("ema_beta"), hp("low_mult"), hp("high_mult")
    # 1 - beta from the Python float: rounding beta = 0.999 to float32 first
    # would put a 1.3e-5 relative error into every EMA update.
    one_minus_beta = jnp.asarray(
        _group_values(config, layout, "ema_beta", t, transform=lambda b: 1 - b), dtype
    )
    min_norm, max_norm = hp("min_norm"), hp("max_norm")
    up_cap, down_cap = hp("max_up_scale"), hp("max_down_scale")
    raise_small = jnp.asarray(_group_values(config, layout, "raise_small", t), bool)
    auto_bounds = jnp.asarray(config.auto_bounds, bool)

    if config.nonfinite == "reference":
        taken = jnp.ones(norm.shape, bool)
    else:
        taken = jnp.isfinite(norm)

    ema, residual = state.ema, state.ema_residual
    if config.ema_init == "first":
        first = (state.ema_count == 0) & taken
        ema, residual = jnp.where(first, norm, ema), jnp.where(first, 0.0, residual)
    if config.variant == "paper":
        # Paper eq. 2-4: the EMA of raw norms, including this step, sets the bounds.
        stepped, stepped_residual = _ema_step(ema, residual, beta, one_minus_beta, norm)
        ema_with_step = jnp.where(taken, stepped, ema)
        residual_with_step = jnp.where(taken, stepped_residual, residual)
        stat, updates_in_stat = ema_with_step, state.ema_count + taken
    else:
        stat, updates_in_stat = ema, state.ema_count
    if config.bias_correction:
        correction = 1 - beta ** updates_in_stat.astype(dtype)
        stat = jnp.where(updates_in_stat > 0, stat / jnp.where(correction > 0, correction, 1), stat)

    lower = jnp.where(auto_bounds, _python_max(min_norm, stat * low), min_norm)
    upper = jnp.where(auto_bounds, _python_max(jnp.zeros_like(stat), stat * high), max_norm)
    lower = jnp.broadcast_to(lower, norm.shape)
    upper = jnp.broadcast_to(upper, norm.shape)

    down = (upper > 0) & (norm > upper + EPS)
    raised = raise_small & (lower > 0) & (norm < lower - EPS) & ~down
    down, raised = down & taken, raised & taken

    down_scale = upper / (norm + EPS)
    down_scale = jnp.where(down_cap > 0, _python_max(down_scale, down_cap), down_scale)
    up_scale = lower / (norm + EPS)
    up_scale = jnp.where(up_cap > 0, _python_min(up_scale, up_cap), up_scale)
    one = jnp.ones_like(norm)
    scale = jnp.where(down, down_scale, jnp.where(raised, up_scale, one))

    if config.variant == "paper":
        new_ema, new_residual = ema_with_step, residual_with_step
    else:
        # The reference feeds the EMA the intended post-clip norm.
        stepped, stepped_residual = _ema_step(ema, residual, beta, one_minus_beta, norm * scale)
        new_ema = jnp.where(taken, stepped, ema)
        new_residual = jnp.where(taken, stepped_residual, residual)
    new_ema_count = state.ema_count + taken.astype(state.ema_count.dtype)
    return scale, lower, upper, new_ema, new_residual, new_ema_count, down, raised


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


def _build(config: _Config) -> optax.GradientTransformation:
    def init_fn(params: optax.Params) -> AGGCState:
        layout = _labels.build_layout(params, config.param_labels)
        flat = jax.tree_util.tree_leaves(params)
        for name, group, leaf in zip(layout.leaf_names, layout.leaf_groups, flat):
            if group >= 0:
                _check_leaf_dtype(name, leaf)
        if layout.num_groups == 0:
            if config.on_no_groups == "error":
                raise ValueError(
                    "aggc: no parameter got a group label, so nothing would be clipped. "
                    f"Leaves seen: {list(layout.leaf_names)[:8]}"
                    f"{' ...' if len(layout.leaf_names) > 8 else ''}. Pass param_labels "
                    "(a labeler, regex rules or a label tree); see describe_groups()."
                )
            warnings.warn(
                "AGGC: no parameter got a group label; like the reference clipper, the "
                "transformation disables itself and passes gradients through untouched.",
                stacklevel=3,
            )
        _warn_unmatched_group_hyperparams(config, layout)
        num_groups = layout.num_groups
        dtype = _stats_dtype()

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
            layout=layout,
        )

    def update_fn(
        updates: optax.Updates, state: AGGCState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, AGGCState]:
        del params
        layout = state.layout
        flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
        names = tuple(_labels.path_name(p) for p, _ in flat)
        if names != layout.leaf_names:
            _raise_tree_mismatch(layout.leaf_names, names)
        leaves = [leaf for _, leaf in flat]
        count = optax.safe_increment(state.count)
        if layout.num_groups == 0:
            return updates, state._replace(count=count)

        dtype = _stats_dtype()
        # Each group's sum of squares is a chain of scalar adds in leaf order, as
        # the reference accumulates its per-tensor sums in Python floats; no
        # [leaves] buffer and no scatter-add (a serial loop on CPU, atomics in
        # no fixed order on GPU).
        group_sums: list[jax.Array | None] = [None] * layout.num_groups
        for name, group, leaf in zip(names, layout.leaf_groups, leaves):
            if group < 0:
                continue
            _check_leaf_dtype(name, leaf)
            x = leaf.astype(_compute_dtype(leaf.dtype))
            square = jnp.sum(jnp.square(x)).astype(dtype)
            total = group_sums[group]
            group_sums[group] = square if total is None else total + square
        sums = jnp.stack([jnp.zeros((), dtype) if s is None else s for s in group_sums])
        if config.axis_name is not None:
            reduce = jax.lax.psum if config.axis_reduction == "sum" else jax.lax.pmean
            sums = reduce(sums, config.axis_name)
        norm = jnp.sqrt(sums + NORM_FLOOR)

        scale, lower, upper, ema, ema_residual, ema_count, down, raised = _group_step(
            config, layout, norm, state
        )

        group_scale = _per_group_scalars(scale)
        new_leaves = []
        for group, leaf in zip(layout.leaf_groups, leaves):
            if group < 0:
                new_leaves.append(leaf)
                continue
            op_dtype = _compute_dtype(leaf.dtype)
            factor = group_scale[group].astype(op_dtype)
            new_leaves.append((leaf.astype(op_dtype) * factor).astype(leaf.dtype))

        new_state = AGGCState(
            count=count,
            ema=ema,
            ema_residual=ema_residual,
            norm=norm,
            lower=lower,
            upper=upper,
            scale=scale,
            ema_count=ema_count,
            clip_down_count=state.clip_down_count + down.astype(jnp.int32),
            raise_count=state.raise_count + raised.astype(jnp.int32),
            layout=layout,
        )
        return jax.tree_util.tree_unflatten(treedef, new_leaves), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def _warn_unmatched_group_hyperparams(config: _Config, layout: GroupLayout) -> None:
    # A key that matches no group is most likely a typo (or the wrong label rule):
    # silently ignoring it would leave that group on the default hyperparameters.
    for key, regex, _ in config.group_hyperparams:
        if not any(key == label or regex.fullmatch(label) for label in layout.labels):
            warnings.warn(
                f"aggc: group_hyperparams key {key!r} matches no group label (labels: "
                f"{list(layout.labels)}); its entry has no effect. Keys are exact labels "
                "or regular expressions matched against the whole label.",
                stacklevel=4,
            )


def _raise_tree_mismatch(expected: tuple[str, ...], got: tuple[str, ...]) -> None:
    for i, (a, b) in enumerate(zip(expected, got)):
        if a != b:
            raise ValueError(
                "aggc: the updates do not have the structure of the parameters AGGC was "
                f"initialised with: leaf {i} is {b!r} in the updates but {a!r} at init"
            )
    raise ValueError(
        "aggc: the updates do not have the structure of the parameters AGGC was "
        f"initialised with: {len(got)} leaves in the updates, {len(expected)} at init"
    )


def _check_group_hyperparams(
    group_hyperparams: Mapping[str, Mapping[str, Any]] | None,
    checkers: Mapping[str, Callable[[str, Any], Any]],
) -> tuple[tuple[str, re.Pattern[str], Mapping[str, Any]], ...]:
    if group_hyperparams is None:
        return ()
    if not isinstance(group_hyperparams, Mapping):
        raise TypeError(
            "group_hyperparams must be a mapping from a label (or regex pattern) to a "
            f"mapping of hyperparameters, got {type(group_hyperparams).__name__}"
        )
    entries = []
    for key, fields in group_hyperparams.items():
        if not isinstance(key, str):
            raise TypeError(f"group_hyperparams: keys must be str labels or patterns, got {key!r}")
        try:
            regex = re.compile(key)
        except re.error as err:
            raise ValueError(f"group_hyperparams: invalid pattern {key!r}: {err}") from err
        if not isinstance(fields, Mapping):
            raise TypeError(
                f"group_hyperparams[{key!r}] must be a mapping of hyperparameters, got {fields!r}"
            )
        checked = {}
        for field, value in fields.items():
            if field not in GROUP_FIELDS:
                raise ValueError(
                    f"group_hyperparams[{key!r}]: unknown hyperparameter {field!r}; "
                    f"allowed: {GROUP_FIELDS}"
                )
            checked[field] = checkers[field](f"group_hyperparams[{key!r}][{field!r}]", value)
        entries.append((key, regex, checked))
    return tuple(entries)


def _checkers(reference_caps: bool) -> dict[str, Callable[[str, Any], Any]]:
    def beta(name: str, v: Any) -> Any:
        return _validation.check_number(name, v, minimum=0.0, maximum=1.0, maximum_exclusive=True)

    def nonneg(name: str, v: Any) -> Any:
        return _validation.check_number(name, v, minimum=0.0)

    def mult(name: str, v: Any) -> Any:
        return _validation.check_schedule_or_number(name, v, minimum=0.0)

    def reference_cap(name: str, v: Any) -> Any:
        return _validation.check_number(
            name, v, minimum=0.0, allowed="in [0.0, inf) (0 is off; any other value is a cap)"
        )

    def up_cap(name: str, v: Any) -> Any:
        if reference_caps:
            return reference_cap(name, v)
        return _validation.check_cap(
            name,
            v,
            low=1.0,
            high=math.inf,
            meaning="a ceiling on an upward scale",
            allowed="0 (off) or >= 1",
        )

    def down_cap(name: str, v: Any) -> Any:
        if reference_caps:
            return reference_cap(name, v)
        return _validation.check_cap(
            name,
            v,
            low=0.0,
            high=1.0,
            meaning="a floor on a downward scale",
            allowed="0 (off) or in (0, 1]",
        )

    def boolean(name: str, v: Any) -> Any:
        return (
            v
            if _validation.is_traced(v) or isinstance(v, jax.Array)
            else (_validation.check_bool(name, v))
        )

    return {
        "ema_beta": beta,
        "low_mult": mult,
        "high_mult": mult,
        "min_norm": nonneg,
        "max_norm": nonneg,
        "max_up_scale": up_cap,
        "max_down_scale": down_cap,
        "raise_small": boolean,
    }


def _make_config(
    *,
    hyper: Mapping[str, Any],
    auto_bounds: Any,
    param_labels: ParamLabels,
    nonfinite: str,
    variant: str,
    ema_init: str,
    bias_correction: bool,
    group_hyperparams: Mapping[str, Mapping[str, Any]] | None,
    axis_name: Any,
    axis_reduction: str,
    reference_caps: bool,
    on_no_groups: str,
) -> _Config:
    checkers = _checkers(reference_caps)
    checked = {field: checkers[field](field, hyper[field]) for field in GROUP_FIELDS}
    if not (_validation.is_traced(auto_bounds) or isinstance(auto_bounds, jax.Array)):
        auto_bounds = _validation.check_bool("auto_bounds", auto_bounds)
    nonfinite = _validation.check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
    variant = _validation.check_choice("variant", variant, VARIANTS)
    ema_init = _validation.check_choice("ema_init", ema_init, EMA_INITS)
    bias_correction = _validation.check_bool("bias_correction", bias_correction)
    if bias_correction and ema_init != "zero":
        raise ValueError(
            "bias_correction=True corrects a zero-initialised EMA; it cannot be combined "
            f"with ema_init={ema_init!r} (allowed: ema_init='zero')"
        )
    axis_reduction = _validation.check_choice("axis_reduction", axis_reduction, AXIS_REDUCTIONS)
    _check_param_labels(param_labels)
    return _Config(
        hyper=checked,
        group_hyperparams=_check_group_hyperparams(group_hyperparams, checkers),
        auto_bounds=auto_bounds,
        param_labels=param_labels,
        nonfinite=nonfinite,
        variant=variant,
        ema_init=ema_init,
        bias_correction=bias_correction,
        axis_name=axis_name,
        axis_reduction=axis_reduction,
        on_no_groups=on_no_groups,
    )


def _check_param_labels(param_labels: ParamLabels) -> None:
    if isinstance(param_labels, str):
        raise TypeError(
            "param_labels must be None, a callable labeler, a list of (regex, label) rules "
            f"or a pytree of labels; got the string {param_labels!r}"
        )
    if (
        isinstance(param_labels, (list, tuple))
        and param_labels
        and all(isinstance(r, tuple) for r in param_labels)
    ):
        _labels.regex_labeler(param_labels)  # validates the rules now, not at init
        return
    if param_labels is None or callable(param_labels):
        return
    # A label tree: every leaf must be a str or None (its structure is checked at init).
    flat = jax.tree_util.tree_flatten_with_path(
        param_labels, is_leaf=lambda x: x is None or isinstance(x, str)
    )[0]
    for path, value in flat:
        if not (value is None or isinstance(value, str)):
            name = _labels.path_name(path)
            where = f"leaf {name!r}" if name else "the root"
            raise TypeError(
                f"param_labels: got {value!r} ({type(value).__name__}) at {where}; "
                "param_labels must be None, a callable labeler, a list of (regex, label) "
                "rules, or a pytree of str/None labels shaped like the parameters"
            )


def aggc(
    *,
    ema_beta: float | jax.Array = 0.95,
    low_mult: float | jax.Array | optax.Schedule = 0.95,
    high_mult: float | jax.Array | optax.Schedule = 0.6,
    min_norm: float | jax.Array = 0.01,
    max_norm: float | jax.Array = 1.0,
    auto_bounds: bool = True,
    raise_small: bool = False,
    max_up_scale: float | jax.Array = 1.1,
    max_down_scale: float | jax.Array = 0.9,
    param_labels: ParamLabels = None,
    nonfinite: str = "skip",
    variant: str = "reference",
    ema_init: str = "zero",
    bias_correction: bool = False,
    group_hyperparams: Mapping[str, Mapping[str, Any]] | None = None,
    axis_name: Any = None,
    axis_reduction: str = "sum",
) -> optax.GradientTransformation:
    r"""Adaptive Group Gradient Clipping (AGGC).

    Leaves are grouped by module type (every layer's ``q_proj`` in one group,
    and so on, from their pytree paths). For group :math:`j` at step :math:`t`,
    with :math:`\|g_j\| = \sqrt{\sum_i \|g_{j,i}\|^2 + 10^{-16}}` and
    :math:`S_j` its EMA before the step (starting at 0, no bias correction):

    .. math::
      L_j = \max(\text{min\_norm}, \alpha_\text{low}(t) S_j), \quad
      U_j = \max(0, \alpha_\text{high}(t) S_j),

    .. math::
      c_j = \begin{cases}
        \max(U_j / (\|g_j\| + \epsilon), \text{max\_down\_scale}) &
          U_j > 0,\ \|g_j\| > U_j + \epsilon \\
        \min(L_j / (\|g_j\| + \epsilon), \text{max\_up\_scale}) &
          \text{raise\_small},\ L_j > 0,\ \|g_j\| < L_j - \epsilon \\
        1 & \text{otherwise,} \end{cases}

    every gradient of the group is multiplied by :math:`c_j` (in its own dtype)
    and :math:`S_j \leftarrow \beta S_j + (1 - \beta) \|g_j\| c_j`; a cap of 0
    is off, :math:`\epsilon = 10^{-12}`. With ``auto_bounds=False`` the bounds
    are ``[min_norm, max_norm]`` and the EMA is still updated. This is exactly
    the authors' PyTorch clipper (see ``docs/``); the update runs inside
    ``jax.jit`` with no host round-trip, and its cost is that of a global-norm
    clip.

    The defaults are the authors' LoRA SFT recipe (the one behind the paper's
    headline GSM8K result): ``ema_beta=0.95``, multipliers ``0.95``/``0.6``,
    ``min_norm=0.01``, no raising, caps ``1.1``/``0.9``. The recipe also ramps
    the multipliers to ``0.98``/``0.7``; that needs the run's length, so use
    ``aggc_optax.presets.lora_sft(total_steps)`` or pass
    :func:`linear_bounds_schedule` multipliers. Note that the recipe's interval
    is inverted (``low_mult > high_mult``): with the ``0.9`` floor it mostly
    multiplies a group by 0.9 whenever its norm exceeds 0.6 times its EMA.

    Args:
      ema_beta: EMA decay :math:`\beta`, in ``[0, 1)``.
      low_mult: :math:`\alpha_\text{low}`: a number or an optax schedule of the
        0-based step count (e.g. :func:`linear_bounds_schedule`).
      high_mult: :math:`\alpha_\text{high}`: a number or a schedule.
      min_norm: floor of the lower bound (the whole lower bound without
        ``auto_bounds``).
      max_norm: the upper bound when ``auto_bounds=False``; unused otherwise.
      auto_bounds: bounds from the EMA (``True``) or fixed ``[min_norm, max_norm]``.
      raise_small: also scale *up* groups below the lower bound.
      max_up_scale: a ceiling (``>= 1``) on an upward scale; 0 is off.
      max_down_scale: a floor (in ``(0, 1]``) on a downward scale; 0 is off.
      param_labels: how leaves get their group: ``None`` (the reference's rule,
        :func:`reference_label`, on each leaf's dotted path), a callable
        ``fn(name)`` or ``fn(name, leaf)`` returning a label or ``None``, a
        list of ``(regex, label)`` rules, or a pytree of labels shaped like the
        parameters. A leaf labelled ``None`` passes through untouched.
      nonfinite: ``"skip"`` (default): a group whose norm is NaN or inf passes
        its gradients through unchanged and keeps its EMA, so one bad batch
        neither disables nor inflates the group and an outer
        ``optax.apply_if_finite`` still sees the fault. ``"reference"``: exactly
        the reference's behaviour (spec 8.3; a NaN disables the group forever).
      variant: ``"reference"`` (bounds from the EMA before the step, fed the
        post-clip norm) or ``"paper"`` (the paper's eq. 2: the EMA of raw
        norms, including this step, sets this step's bounds; with a zero
        start, step 0 is then clipped to about ``(1 - beta) * high_mult``).
      ema_init: ``"zero"`` (reference) or ``"first"``: a group's EMA starts at
        its first observed (finite) norm, as if that norm had always been
        seen, which avoids the tiny bounds of the warm-up.
      bias_correction: divide the EMA by :math:`1 - \beta^n` (``n`` updates so
        far) when building bounds, as Adam does; only with ``ema_init="zero"``.
        The ``ema`` kept in the state stays uncorrected.
      group_hyperparams: per-group overrides: ``{label or regex: {field: value}}``
        for any of ``ema_beta, low_mult, high_mult, min_norm, max_norm,
        max_up_scale, max_down_scale, raise_small``. An exact label wins over
        patterns; among patterns (matched in full) the first wins; fields not
        given take the arguments above, which are the default entry (there is
        no magic key: a last entry ``".*"`` is a catch-all). A key matching
        no group warns at ``init``. ``docs/variants.md`` shows when to use
        each of ``variant``, ``ema_init``, ``bias_correction`` and
        ``group_hyperparams``; ``aggc_optax.presets`` has ready-made settings.
      axis_name: inside ``shard_map``/``pmap``, the mapped axis (or axes) over
        which the per-group sums of squares are reduced. Not needed under
        ``jax.jit`` with sharded arrays: there the norms are already global.
      axis_reduction: ``"sum"`` (the true norm of gradients sharded over the
        axis) or ``"mean"`` (the reference's ``sync_dist``: the root of the
        mean over devices of the squared norms).

    Returns:
      An ``optax.GradientTransformation`` whose state is an :class:`AGGCState`;
      read its statistics with :func:`group_stats`.

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
    config = _make_config(
        hyper={
            "ema_beta": ema_beta,
            "low_mult": low_mult,
            "high_mult": high_mult,
            "min_norm": min_norm,
            "max_norm": max_norm,
            "max_up_scale": max_up_scale,
            "max_down_scale": max_down_scale,
            "raise_small": raise_small,
        },
        auto_bounds=auto_bounds,
        param_labels=param_labels,
        nonfinite=nonfinite,
        variant=variant,
        ema_init=ema_init,
        bias_correction=bias_correction,
        group_hyperparams=group_hyperparams,
        axis_name=axis_name,
        axis_reduction=axis_reduction,
        reference_caps=False,
        on_no_groups="error",
    )
    return _build(config)
