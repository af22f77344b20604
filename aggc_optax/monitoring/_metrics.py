"""AGGC's statistics as one flat dict of floats, for any metrics logger."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aggc_optax.monitoring._clipper_metrics import clipper_metrics
from aggc_optax.monitoring._stats import cached_states, find_aggc_states, unbox

# Per-group columns of the stacked array, in order.
GROUP_KEYS = (
    "norm",
    "scale",
    "lower",
    "upper",
    "ema",
    "clipped",
    "raised",
    "clip_down_count",
    "raise_count",
    "restart_count",
)
# Per-state entries after the group rows.
GLOBAL_KEYS = ("global_norm_before", "global_norm_after", "fraction_clipped", "fraction_raised")
_INPUTS = (
    "norm",
    "scale",
    "lower",
    "upper",
    "ema",
    "clip_down_count",
    "raise_count",
    "restart_count",
)
# (state labels, label) pairs whose restart metrics() has reported: said once each
_RESTARTS_SAID: set[tuple[tuple[str, ...], str]] = set()


@jax.jit
def _stack(states: list[dict[str, jax.Array]]) -> list[jax.Array]:
    """Per state: ``[G * len(GROUP_KEYS) + len(GLOBAL_KEYS)]`` values, one vector."""
    out = []
    for s in states:
        dtype = jnp.result_type(s["norm"].dtype, jnp.float32)
        norm, scale = s["norm"].astype(dtype), s["scale"].astype(dtype)
        clipped, raised = (scale < 1).astype(dtype), (scale > 1).astype(dtype)
        columns = [
            norm,
            scale,
            s["lower"].astype(dtype),
            s["upper"].astype(dtype),
            s["ema"].astype(dtype),
            clipped,
            raised,
            s["clip_down_count"].astype(dtype),
            s["raise_count"].astype(dtype),
            s["restart_count"].astype(dtype),
        ]
        per_group = jnp.stack(columns, axis=1).reshape(-1)
        num_groups = norm.shape[0]
        if num_groups:
            globals_ = [
                jnp.sqrt(jnp.sum(jnp.square(norm))),
                jnp.sqrt(jnp.sum(jnp.square(norm * scale))),
                jnp.mean(clipped),
                jnp.mean(raised),
            ]
        else:
            globals_ = [jnp.zeros((), dtype)] * len(GLOBAL_KEYS)
        out.append(jnp.concatenate([per_group, jnp.stack(globals_)]))
    # One vector for all states: one device-to-host transfer.
    return [jnp.concatenate(out)] if out else []


@functools.lru_cache(maxsize=256)
def _keys(prefixes: tuple[str, ...], label_sets: tuple[tuple[str, ...], ...]) -> list[str]:
    keys = []
    for prefix, labels in zip(prefixes, label_sets):
        keys += [f"{prefix}/{label}/{field}" for label in labels for field in GROUP_KEYS]
        keys += [f"{prefix}/{field}" for field in GLOBAL_KEYS]
    return keys


def metrics(opt_state: Any, prefix: str = "aggc", labels: Any = None) -> dict[str, float]:
    """AGGC's statistics of the last step as a flat ``{name: float}`` dict, for any logger.

    Per group ``label`` (keys ``f"{prefix}/{label}/{field}"``):

    - ``norm``: the group's norm before AGGC; ``scale``: the factor applied;
      ``lower`` / ``upper``: the bounds; ``ema``: the EMA after the step;
    - ``clipped`` / ``raised``: 1.0 if the step multiplied the group by a factor
      below / above 1, else 0.0;
    - ``clip_down_count`` / ``raise_count``: how many steps so far did so
      (counted by the clipper's own branch; exact as floats up to 2**24 steps);
    - ``restart_count``: how many times the group started afresh because a
      restored state held no group of its label (:func:`check_state`); the
      first call that sees a restart says so in a warning.

    and per AGGC state (keys ``f"{prefix}/{field}"``):

    - ``global_norm_before`` / ``global_norm_after``: the norm of all grouped
      gradients before / after AGGC, :math:`\\sqrt{\\sum_j \\|g_j\\|^2}` and
      :math:`\\sqrt{\\sum_j (c_j \\|g_j\\|)^2}` from the group norms (leaves
      labelled ``None`` or :class:`ScaleOnly` are not in them; each group norm
      carries AGGC's :math:`10^{-16}` floor in its square);
    - ``fraction_clipped`` / ``fraction_raised``: the share of groups clipped /
      raised at the step.

    The package's other clippers add their own keys: ``f"{prefix}/zclip/{field}"``
    (:func:`~aggc_optax.presets.zclip`: ``norm``, ``threshold``, ``scale``,
    ``clipped``, ``mean``, ``std``, ``clip_count``),
    ``f"{prefix}/skip_step/{field}"`` (:func:`~aggc_optax.presets.skip_step`:
    ``norm``, ``threshold``, ``skipped``, ``skip_count``) and
    ``f"{prefix}/group_zscore/{label}/{field}"``
    (:func:`~aggc_optax.presets.group_zscore`: ``norm``, ``scale``, ``upper``,
    ``mean``, ``std``, ``clipped``, ``clip_down_count``); a second state of one
    kind gets its index after the kind.

    Before the first step norms and bounds read 0 and scales 1. The values are
    computed on device by one jitted function and fetched in one transfer, so a
    call costs about as much as fetching one array (well under a millisecond for
    a dozen groups, ``examples/benchmark.py``). The state is found wherever
    :func:`group_stats` finds it, ``nnx.state(optimizer)`` included (there the
    labels come from ``labels``, see :func:`find_aggc_states`). With several AGGC
    states in ``opt_state`` (e.g. under ``optax.partition``) each gets its index
    in flattening order after the prefix: ``f"{prefix}/0/{label}/norm"``,
    ``f"{prefix}/1/global_norm_before"``, ...

    Args:
      opt_state: an optax state, ``nnx.Optimizer`` or ``nnx.State`` holding AGGC.
      prefix: the first component of every key.
      labels: group labels for states stored without them (``nnx.state``), as
        in :func:`find_aggc_states`.

    Returns:
      ``{key: float}``, groups in group order, then the per-state entries.

    Raises:
      ValueError: no AGGC, ZClip, skip-step or group z-score state is found in
        ``opt_state``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, aggc_optax
      >>> params = {"q_proj": {"weight": jnp.ones(4)}, "v_proj": {"weight": jnp.ones(4)}}
      >>> tx = optax.chain(aggc_optax.aggc(), optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> step = jax.jit(tx.update)
      >>> grads = lambda q: {"q_proj": {"weight": jnp.full(4, q)}, "v_proj": params["v_proj"]}
      >>> _, state = step(grads(1.0), state)  # norms 2: the EMAs start at 2, bounds 6
      >>> _, state = step(grads(4.0), state)  # q_proj's norm 8 is clipped to 6
      >>> m = aggc_optax.metrics(state)
      >>> m["aggc/q_proj/norm"], m["aggc/q_proj/upper"], m["aggc/q_proj/clipped"]
      (8.0, 6.0, 1.0)
      >>> round(m["aggc/global_norm_after"], 5), round((6.0**2 + 2.0**2) ** 0.5, 5)
      (6.32456, 6.32456)
    """
    others = clipper_metrics(opt_state, prefix)
    states = cached_states(opt_state) if labels is None else find_aggc_states(opt_state, labels)
    if not states:
        if others:
            return others
        raise ValueError(
            "metrics: no AGGC state found in opt_state (is aggc() part of the optimizer?)"
        )
    arrays = [{f: unbox(getattr(s, f)) for f in _INPUTS} for s in states]
    (values,) = jax.device_get(_stack(arrays))
    if len(states) == 1:
        prefixes: tuple[str, ...] = (prefix,)
    else:
        prefixes = tuple(f"{prefix}/{i}" for i in range(len(states)))
    keys = _keys(prefixes, tuple(tuple(s.labels) for s in states))
    out = dict(zip(keys, np.asarray(values).tolist()))
    _say_restarts(out, prefixes, states)
    return out | others


def _say_restarts(out: dict[str, float], prefixes: tuple[str, ...], states: list[Any]) -> None:
    """Warns once per group that has started afresh after a restore (restart_count > 0)."""
    for prefix, state in zip(prefixes, states):
        labels = tuple(state.labels)
        new = [
            label
            for label in labels
            if out[f"{prefix}/{label}/restart_count"] > 0 and (labels, label) not in _RESTARTS_SAID
        ]
        if not new:
            continue
        _RESTARTS_SAID.update((labels, label) for label in new)
        warnings.warn(
            f"aggc: the group(s) {new} started afresh, as at init (restart_count > 0): a "
            "restored state held no saved group with their label (a restore target built "
            "with another param_labels?), so their EMA and counters restarted. See "
            "aggc_optax.check_state and docs/checkpointing.md.",
            stacklevel=3,
        )
