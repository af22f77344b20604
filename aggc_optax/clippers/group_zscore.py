r"""AGGC's groups with z-score upper bounds: each group's bound from its own EMA mean and variance.

AGGC bounds a group's norm by a multiple of its EMA (``high_mult * EMA``); a
group whose norm is naturally noisy and one whose norm is steady get the same
relative room. Here the room follows the group's own spread, as ZClip does
for the global norm: the bound is ``mean + z * std`` of the group's recent
(clipped) norms. An experimental variant, studied in ``docs/spikes.md``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aggc_optax import _validation, labels
from aggc_optax._numerics import EPS
from aggc_optax._state import GroupLabels
from aggc_optax.clippers.zclip import check_warmup_steps, running_moments
from aggc_optax.labels import ParamLabels


class GroupZScoreState(NamedTuple):
    """State of :func:`~aggc_optax.presets.group_zscore`: per-group vectors ``[num_groups]``.

    Attributes:
      count: updates so far.
      seen: finite norms each group collected in its warm-up (stops at ``warmup_steps``).
      mean: each group's mean norm (running mean in the warm-up, then the EMA).
      var: each group's variance (running population variance, then the EMA).
      norm: each group's norm at the last step, before clipping.
      upper: each group's upper bound at the last step (``inf`` in the warm-up).
      scale: the factor each group was multiplied by at the last step.
      clip_down_count: how many steps each group was clipped so far.
      labels: the group labels, in group order (static).
    """

    count: jax.Array  # type: ignore[assignment]  # NamedTuple field named like tuple.count
    seen: jax.Array
    mean: jax.Array
    var: jax.Array
    norm: jax.Array
    upper: jax.Array
    scale: jax.Array
    clip_down_count: jax.Array
    labels: GroupLabels


def group_zscore(
    z: float = 3.0,
    ema_beta: float = 0.99,
    warmup_steps: int = 25,
    *,
    param_labels: ParamLabels = None,
) -> optax.GradientTransformation:
    r"""Clip each group's norm to its own ``mean + z * std`` (AGGC with variance-aware bounds).

    Groups as in :func:`~aggc_optax.aggc` (``param_labels``; by default the
    reference's module types). For group :math:`j` with norm :math:`n_j` and
    statistics :math:`\mu_j, \sigma_j^2` from before the step:

    * **warm-up** (the group's first ``warmup_steps`` finite norms, as ZClip):
      nothing is clipped; :math:`\mu_j, \sigma_j^2` are the running mean and
      population variance of the norms seen;
    * **then**: the upper bound is :math:`u_j = \mu_j + z\sigma_j`; a group with
      :math:`n_j > u_j + \epsilon` is multiplied by :math:`u_j / (n_j + \epsilon)`
      (AGGC's rule, :math:`\epsilon = 10^{-12}`), others are left alone; no
      lower bound. The statistics follow the clipped norm
      :math:`c_j = \min(n_j, u_j)`: :math:`\mu_j \leftarrow \beta\mu_j +
      (1-\beta)c_j`, :math:`\sigma_j^2 \leftarrow \beta\sigma_j^2 +
      (1-\beta)(c_j - \mu_j)^2` with the new :math:`\mu_j`.

    A group whose norm is not finite passes through unchanged and keeps its
    statistics. ``z=3`` and ``ema_beta=0.99`` mirror :func:`~aggc_optax.aggc`'s
    ``high_mult=3`` and EMA; the warm-up is ZClip's.

    Args:
      z: the bound in standard deviations above the mean, ``> 0``.
      ema_beta: :math:`\beta`, in ``[0, 1)``.
      warmup_steps: finite norms a group collects before it is clipped, ``>= 1``.
      param_labels: the grouping, as for :func:`~aggc_optax.aggc`.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`GroupZScoreState`.

    Example:
      >>> import jax.numpy as jnp
      >>> from aggc_optax import presets
      >>> tx = presets.group_zscore(z=2.0, warmup_steps=2)
      >>> g = lambda q: {"q_proj": {"weight": jnp.array([q])}, "v_proj": {"weight": jnp.ones(1)}}
      >>> state = tx.init(g(1.0))
      >>> for q in (1.0, 3.0):  # q_proj: mean 2, std 1
      ...     _, state = tx.update(g(q), state)
      >>> out, state = tx.update(g(10.0), state)  # clipped to 2 + 2 * 1
      >>> round(float(out["q_proj"]["weight"][0]), 4)
      4.0
    """
    z = _validation.check_number("z", z, minimum=0.0)
    if not z > 0:
        raise ValueError(f"z must be > 0, got {z!r}")
    ema_beta = _validation.check_number(
        "ema_beta", ema_beta, minimum=0.0, maximum=1.0, maximum_exclusive=True
    )
    check_warmup_steps(warmup_steps)
    labels.check_param_labels(param_labels)

    def init_fn(params: optax.Params) -> GroupZScoreState:
        placement = labels.place(params, param_labels)
        if not placement.labels:
            raise ValueError(
                "group_zscore: no parameter has a group label, so nothing would be clipped; "
                "pass param_labels (see aggc_optax.describe_groups)"
            )
        g = len(placement.labels)
        zeros = jnp.zeros((g,), jnp.float32)
        return GroupZScoreState(
            count=jnp.zeros((), jnp.int32),
            seen=jnp.zeros((g,), jnp.int32),
            mean=zeros,
            var=zeros,
            norm=zeros,
            upper=jnp.full((g,), jnp.inf, jnp.float32),
            scale=jnp.ones((g,), jnp.float32),
            clip_down_count=jnp.zeros((g,), jnp.int32),
            labels=GroupLabels(placement.labels),
        )

    def update_fn(
        updates: optax.Updates, state: GroupZScoreState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, GroupZScoreState]:
        del params
        placement = labels.place(updates, param_labels)
        if placement.labels != tuple(state.labels):
            raise ValueError(
                f"group_zscore: the updates' groups {placement.labels} are not the state's "
                f"{tuple(state.labels)}: was the state made for other parameters?"
            )
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        sums = [jnp.zeros((), jnp.float32) for _ in placement.labels]
        for group, counted, leaf in zip(placement.groups, placement.counted, leaves):
            if group >= 0 and counted:
                wide = leaf.astype(jnp.promote_types(leaf.dtype, jnp.float32))
                sums[group] = sums[group] + jnp.sum(jnp.square(wide)).astype(jnp.float32)
        norm = jnp.sqrt(jnp.stack(sums))
        finite = jnp.isfinite(norm)
        warm = state.seen < warmup_steps
        upper = jnp.where(warm, jnp.inf, state.mean + z * jnp.sqrt(state.var))
        clipped = finite & (norm > upper + EPS)
        scale = jnp.where(clipped, upper / (norm + EPS), 1.0).astype(jnp.float32)
        kept = jnp.where(clipped, upper, norm)

        mean, var = running_moments(state.mean, state.var, state.seen, norm, kept, ema_beta, warm)
        mean = jnp.where(finite, mean, state.mean)
        var = jnp.where(finite, var, state.var)

        out = []
        for group, leaf in zip(placement.groups, leaves):
            if group < 0:
                out.append(leaf)
                continue
            factor = scale[group]
            out.append(jnp.where(factor == 1, leaf, (leaf * factor.astype(leaf.dtype))))
        new_state = GroupZScoreState(
            count=state.count + 1,
            seen=jnp.where(finite & warm, state.seen + 1, state.seen),
            mean=mean,
            var=var,
            norm=norm,
            upper=upper.astype(jnp.float32),
            scale=scale,
            clip_down_count=state.clip_down_count + clipped.astype(jnp.int32),
            labels=state.labels,
        )
        return jax.tree_util.tree_unflatten(treedef, out), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def group_zscore_metrics(state: GroupZScoreState, prefix: str) -> dict[str, float]:
    """The last step of a :class:`GroupZScoreState`, per group: ``f"{prefix}/{label}/{field}"``."""
    arrays = jax.device_get(
        {
            "norm": state.norm,
            "scale": state.scale,
            "upper": state.upper,
            "mean": state.mean,
            "std": jnp.sqrt(state.var),
            "clipped": (state.scale < 1).astype(jnp.float32),
            "clip_down_count": state.clip_down_count,
        }
    )
    out: dict[str, float] = {}
    for j, label in enumerate(state.labels):
        out.update({f"{prefix}/{label}/{k}": float(np.asarray(v)[j]) for k, v in arrays.items()})
    return out
