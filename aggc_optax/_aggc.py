"""Adaptive Group Gradient Clipping as an optax gradient transformation.

One step, for every group at once (``docs/reference-behaviour.md`` §3-§4):

1. place: each leaf's group, from its path (:mod:`aggc_optax.labels`);
2. norms: each group's gradient norm (:func:`_numerics.group_norms`);
3. bounds: ``[lower, upper]`` from the group's EMA and this step's multipliers;
4. scale: the factor that brings a norm outside the bounds back to the nearest one;
5. EMA: fed the clipped norm (or, ``variant="paper"``, the raw one);
6. rescale: every leaf times its group's factor (:func:`_numerics.rescale`).

The authors' clipper differs from :func:`aggc` in a few places; each is a field
of :class:`~aggc_optax._config.Quirks`, read here, set only by ``aggc_optax.reference``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from aggc_optax import _config, _numerics, _state, labels
from aggc_optax._config import Config, Hyper
from aggc_optax._numerics import EPS, python_max, python_min, saturating_add
from aggc_optax._state import AGGCState, GroupLabels, check_state
from aggc_optax.labels import ParamLabels, Placement

__all__ = ["AGGCState", "GroupLabels", "aggc", "build", "check_state"]


class _Ema(NamedTuple):
    """A group's EMA as the state keeps it: value, rounding error, number of updates."""

    value: jax.Array
    residual: jax.Array
    updates: jax.Array


# ------------------------------------------------------------------ the step


def build(config: Config) -> optax.GradientTransformationExtraArgs:
    """The transformation for a checked :class:`Config` (``aggc()`` or the reference layer's)."""
    per_layout: dict[tuple[str, ...], Hyper] = {}  # labels -> one value per group, per field

    def hyper_for(group_labels: tuple[str, ...]) -> Hyper:
        if group_labels not in per_layout:
            per_layout[group_labels] = _config.resolve(config, group_labels)
        return per_layout[group_labels]

    def init_fn(params: optax.Params) -> AGGCState:
        group_labels = _init_labels(config, params)
        hyper_for(group_labels)
        return _state.init_state(group_labels)

    def update_fn(
        updates: optax.Updates, state: AGGCState, params: optax.Params | None = None, **extra: Any
    ) -> tuple[optax.Updates, AGGCState]:
        del params, extra
        if not isinstance(state, AGGCState):
            raise _state.not_an_aggc_state(state)
        # 1. place
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        placement = labels.place(updates, config.param_labels)  # as optax.partition does
        labels.check_placement(placement, leaves, state.labels)
        leaves = [labels.as_array(x) if g >= 0 else x for x, g in zip(leaves, placement.groups)]
        count = optax.safe_increment(state.count)
        if not state.labels:
            return updates, state._replace(count=count)
        state = _state.matched(state)  # a restored state's groups, found by label
        # 2. norms
        norm = _numerics.group_norms(
            placement,
            leaves,
            _numerics.across_devices(config.axis_name, mean=config.quirks.mean_over_devices),
            rescue=not config.quirks.nonfinite_as_is,
        )
        # 3.-5. bounds, scale, EMA
        hp, one_minus_beta = _hyper_at(hyper_for(tuple(state.labels)), state.count, norm.dtype)
        new_state = _group_step(config, hp, one_minus_beta, norm, state)._replace(count=count)
        # 6. rescale
        clipped = _numerics.rescale(placement, leaves, new_state.scale)
        return treedef.unflatten(clipped), new_state  # type: ignore[attr-defined]  # jax's stub lacks PyTreeDef methods

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _group_step(
    config: Config,
    hp: Hyper,
    one_minus_beta: jax.Array,
    norm: jax.Array,
    state: AGGCState,
) -> AGGCState:
    """Steps 3-5 for every group at once: the state after this step (``count`` unchanged)."""
    taken, restart = _taken(config, hp, one_minus_beta, norm, state)
    ema = _start(config, _Ema(state.ema, state.ema_residual, state.ema_count), norm, taken)
    # 3. bounds
    stat, paper_ema = _bound_statistic(config, hp, one_minus_beta, norm, ema, taken)
    lower, upper = _bounds(config, hp, stat, norm.shape)
    # 4. scale
    scale, down, raised = _scale(hp, norm, lower, upper, taken)
    # 5. EMA
    fed = paper_ema if paper_ema is not None else _fed(hp, one_minus_beta, ema, norm * scale, taken)
    value, residual, ema_count = _restarted(fed, ema.updates, taken, restart)
    return state._replace(
        ema=value,
        ema_residual=residual,
        norm=norm,
        lower=lower,
        upper=upper,
        scale=scale,
        ema_count=ema_count,
        clip_down_count=saturating_add(state.clip_down_count, down.astype(jnp.int32)),
        raise_count=saturating_add(state.raise_count, raised.astype(jnp.int32)),
    )


def _taken(
    config: Config,
    hp: Hyper,
    one_minus_beta: jax.Array,
    norm: jax.Array,
    state: AGGCState,
) -> tuple[jax.Array, jax.Array | None]:
    """Which groups this step acts on, and which restart their EMA (None: none can).

    aggc()'s policy: a step with a non-finite norm, or with a hyperparameter
    out of its range at run time (injected or from a schedule), is skipped for
    that group (its gradients pass through, its EMA is kept). A non-finite EMA
    (e.g. from a restore) is detected: that step is skipped too and the group's
    EMA is reset, so the next step starts it over as if never updated. With
    ``ema_init="first"`` a group whose EMA has not started and whose gradient is
    all zero is not taken either (:func:`_awaiting_first_norm`).
    """
    if config.quirks.nonfinite_as_is:
        taken, restart = jnp.ones(norm.shape, bool), None
    else:
        restart = ~(jnp.isfinite(state.ema) & jnp.isfinite(state.ema_residual))
        taken = jnp.isfinite(norm) & _hyper_ok(config, hp, one_minus_beta) & ~restart
    if config.ema_init == "first":
        taken = taken & ~_awaiting_first_norm(norm, state.ema_count)
    return taken, restart


def _awaiting_first_norm(norm: jax.Array, ema_count: jax.Array) -> jax.Array:
    """``ema_init="first"``: the groups whose EMA has not started and whose gradient is all zero.

    Such a group (frozen parameters; GRPO's first step, where the policy equals
    the reference and uniform rewards zero every advantage) has no scale to start
    from: starting at the floor would set its upper bound to ~3e-8 and clip every
    later gradient to nothing for hundreds of steps. It waits, untouched, for its
    first non-zero norm. An all-zero gradient's norm is ``sqrt(NORM_FLOOR)``,
    computed as :func:`_numerics.group_norms` computes it.
    """
    zero = norm <= jnp.sqrt(jnp.asarray(_numerics.NORM_FLOOR, norm.dtype))
    return (ema_count == 0) & zero


def _start(config: Config, ema: _Ema, norm: jax.Array, taken: jax.Array) -> _Ema:
    """``ema_init="first"``: a group's first taken step starts its EMA at its norm."""
    if config.ema_init != "first":
        return ema
    first = (ema.updates == 0) & taken
    return ema._replace(
        value=jnp.where(first, norm, ema.value), residual=jnp.where(first, 0.0, ema.residual)
    )


def _bound_statistic(
    config: Config,
    hp: Hyper,
    one_minus_beta: jax.Array,
    norm: jax.Array,
    ema: _Ema,
    taken: jax.Array,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """The EMA the bounds scale (bias-corrected if asked), and the paper variant's new EMA.

    ``variant="paper"`` (eq. 2-4): the EMA of raw norms, including this step,
    sets the bounds, so the EMA is stepped here; the reference steps it after
    the clip (:func:`_fed`).
    """
    stat, updates_in_stat, stepped = ema.value, ema.updates, None
    if config.variant == "paper":
        stepped = _fed(hp, one_minus_beta, ema, norm, taken)
        stat, updates_in_stat = stepped[0], ema.updates + taken
    if config.ema_init == "bias_corrected":
        correction = 1 - hp.ema_beta ** updates_in_stat.astype(norm.dtype)
        corrected = stat / jnp.where(correction > 0, correction, 1)
        stat = jnp.where(updates_in_stat > 0, corrected, stat)
    return stat, stepped


def _bounds(
    config: Config, hp: Hyper, stat: jax.Array, shape: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
    """``[max(min_norm, low_mult * S), max(0, high_mult * S)]``; fixed without ``auto_bounds``.

    Python's ``max`` (:func:`_numerics.python_max`): a NaN statistic gives the
    other operand, as the reference computes its bounds in Python floats.
    """
    if config.auto_bounds:
        lower = python_max(hp.min_norm, stat * hp.low_mult)
        upper = python_max(jnp.zeros_like(stat), stat * hp.high_mult)
    else:
        lower, upper = hp.min_norm, hp.max_norm
    return jnp.broadcast_to(lower, shape), jnp.broadcast_to(upper, shape)


def _scale(
    hp: Hyper, norm: jax.Array, lower: jax.Array, upper: jax.Array, taken: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """docs/reference-behaviour.md §4 step 2: ``(scale, clipped down, raised)`` per group."""
    down = (upper > 0) & (norm > upper + EPS)
    raised = hp.raise_small & (lower > 0) & (norm < lower - EPS) & ~down
    down_scale = upper / (norm + EPS)
    floor = hp.max_down_scale
    down_scale = jnp.where(floor > 0, python_max(down_scale, floor), down_scale)
    up_scale = lower / (norm + EPS)
    up_scale = jnp.where(hp.max_up_scale > 0, python_min(up_scale, hp.max_up_scale), up_scale)
    down, raised = down & taken, raised & taken
    scale = jnp.where(down, down_scale, jnp.where(raised, up_scale, jnp.ones_like(norm)))
    return scale, down, raised


def _fed(
    hp: Hyper, one_minus_beta: jax.Array, ema: _Ema, x: jax.Array, taken: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The EMA (value, residual) fed ``x`` where the step is taken; kept elsewhere.

    The reference feeds it the intended post-clip norm ``norm * scale``.
    """
    new = _numerics.ema_step(ema.value, ema.residual, hp.ema_beta, one_minus_beta, x)
    return jnp.where(taken, new[0], ema.value), jnp.where(taken, new[1], ema.residual)


def _restarted(
    fed: tuple[jax.Array, jax.Array],
    count: jax.Array,
    taken: jax.Array,
    restart: jax.Array | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The EMA after the step, with the groups whose EMA was not finite reset to zero.

    The reset is applied to the outputs only: selecting on the inputs of the
    EMA's TwoSum changes how XLA fuses it, and its bits.
    """
    value, residual = fed
    count = saturating_add(count, taken.astype(count.dtype))
    if restart is None:
        return value, residual, count
    value = jnp.where(restart, jnp.zeros_like(value), value)
    residual = jnp.where(restart, jnp.zeros_like(residual), residual)
    return value, residual, jnp.where(restart, 0, count)


# ------------------------------------------------------------ hyperparameters


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


def _hyper_at(per_group: Hyper, count: jax.Array, dtype: Any) -> tuple[Hyper, jax.Array]:
    """Every hyperparameter as an array (scalar or ``[G]``) at step ``count``, and ``1 - beta``."""
    hp = Hyper(
        **{
            field: _at_step(values, count, bool if field == "raise_small" else dtype, None)
            for field, values in per_group._asdict().items()
        }
    )
    # 1 - beta from the Python float: rounding beta = 0.999 to float32 first
    # would put a 1.3e-5 relative error into every EMA update.
    return hp, _at_step(per_group.ema_beta, count, dtype, lambda b: 1 - b)


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
    if not config.quirks.any_cap:
        # aggc()'s caps: 0 (off), an upward ceiling >= 1, a downward floor in (0, 1)
        # (a floor of 1 would count clips that change nothing)
        ok = ok & ((hp.max_up_scale == 0) | (hp.max_up_scale >= 1)) & (hp.max_down_scale < 1)
    return ok


# ------------------------------------------------------------------- at init


def _init_labels(config: Config, params: optax.Params) -> tuple[str, ...]:
    """The group labels of ``params``, checked, with a warning for what looks unintended."""
    placement = labels.place(params, config.param_labels)
    labels.check_placement(placement, jax.tree_util.tree_leaves(params), placement.labels)
    if not placement.labels:
        _no_groups(config, placement)
    labels.warn_unlabelled(params, placement, config.param_labels, config.unlabelled)
    if not config.quirks.disable_without_groups:  # aggc()'s form, not the reference's
        labels.warn_merged_modules(params, placement, config.param_labels)
    _warn_unmatched(config, placement.labels)
    return placement.labels


def _no_groups(config: Config, placement: Placement) -> None:
    if not config.quirks.disable_without_groups:
        more = " ..." if len(placement.names) > 8 else ""
        raise ValueError(
            "aggc: no parameter got a group label, so nothing would be clipped. "
            f"Leaves seen: {list(placement.names)[:8]}{more}. Pass param_labels "
            "(a labeler, aggc_optax.regex_labeler(rules) or a label tree); see describe_groups()."
        )
    warnings.warn(
        "AGGC: no parameter got a group label; like the reference clipper, the "
        "transformation disables itself and passes gradients through untouched.",
        stacklevel=4,
    )


def _warn_unmatched(config: Config, group_labels: tuple[str, ...]) -> None:
    for key in _config.unmatched_keys(config, group_labels):
        # most likely a typo (or the wrong label rule): say so rather than
        # leave that group silently on the default hyperparameters
        warnings.warn(
            f"aggc: group_hyperparams key {key!r} matches no group label (labels: "
            f"{list(group_labels)}); its entry has no effect. Keys are exact labels "
            "or regular expressions matched against the whole label.",
            stacklevel=5,
        )


# ------------------------------------------------------------------ the API


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
    non-zero norm, so the first step clips nothing and there is no warm-up with tiny bounds.
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
        non-zero norm, as if that norm had always been seen; until then the
        group passes untouched), ``"zero"`` (at 0, as the
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
        :func:`reference_label`, on each leaf's dotted path; ``init`` warns
        when it leaves float leaves out or puts modules of different positions
        in one group), a callable
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
        of the whole sharded gradient. It must name every axis the gradients
        vary over (else a ``ValueError`` naming them); each leaf is summed only
        over the axes it varies over (a replicated bias over none), as JAX
        records them with ``check_vma=True``; with ``check_vma=False`` or under
        ``pmap`` every leaf is summed over ``axis_name`` (``()``: whole
        gradients on every device). Not needed under ``jax.jit`` with sharded
        arrays: there the norms are already global (``docs/distributed.md``).
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
    return build(config)
