r"""Skip-step: drop an optimizer step whose gradient norm (or loss) is a rolling outlier.

OLMo-core's ``SkipStepOptimizer`` and Levanter's ``SkipStepConfig`` skip an
update when the loss or the gradient norm exceeds the mean of a rolling
window of past steps by ``sigma`` standard deviations. A true skip must wrap
the optimizer: a zero gradient fed to AdamW still decays its moments, moves
the parameters by the remaining momentum and applies weight decay. Written
here from the behaviour those projects document.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from aggc_optax import _validation
from aggc_optax.clippers.zclip import global_norm


class SkipStepState(NamedTuple):
    """State of :func:`~aggc_optax.presets.skip_step`.

    Attributes:
      inner_state: the wrapped transformation's state (unchanged on a skipped step).
      norms: the ring buffer of past finite global norms, ``[window]``.
      losses: the ring buffer of past finite losses, ``[window]`` (zeros if no
        loss is passed).
      filled: how many entries of the buffers hold values (at most ``window``).
      position: where the next value is written.
      count: updates so far.
      skipped: whether the last update was skipped.
      skip_count: how many updates were skipped so far.
      norm: the global norm of the last update.
      threshold: the norm above which the last update would have been skipped
        (``inf`` while the window holds fewer than ``min_history`` values).
    """

    inner_state: Any
    norms: jax.Array
    losses: jax.Array
    filled: jax.Array
    position: jax.Array
    count: jax.Array  # type: ignore[assignment]  # NamedTuple field named like tuple.count
    skipped: jax.Array
    skip_count: jax.Array
    norm: jax.Array
    threshold: jax.Array


def _outlier_bound(buffer: jax.Array, filled: jax.Array, sigma: float) -> jax.Array:
    """``mean + sigma * std`` (sample std, ``ddof=1``) of the first ``filled`` entries."""
    valid = jnp.arange(buffer.shape[0]) < filled
    n = jnp.maximum(filled, 2).astype(jnp.float32)
    mean = jnp.sum(jnp.where(valid, buffer, 0.0)) / jnp.maximum(filled, 1)
    var = jnp.sum(jnp.where(valid, jnp.square(buffer - mean), 0.0)) / (n - 1)
    return mean + sigma * jnp.sqrt(var)


def skip_step(
    inner: optax.GradientTransformation,
    window: int = 128,
    sigma: float = 6.0,
    *,
    min_history: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Wrap ``inner`` so that a step whose norm or loss is a rolling outlier is skipped.

    With :math:`n_t` the global norm of the incoming gradients and
    :math:`m, s` the mean and sample standard deviation of the last
    ``window`` finite norms (the current one not included), step :math:`t` is
    skipped when

    .. math::
      n_t - m > \sigma s \quad\text{or}\quad \ell_t - m_\ell > \sigma s_\ell
      \quad\text{or}\quad n_t, \ell_t \text{ not finite},

    where :math:`\ell_t` is the loss passed as ``value=`` (optional; the loss
    test is left out without it). No step is skipped for an outlier until the
    window holds ``min_history`` values (default ``window // 2``, as
    OLMo-core). A skipped step returns zeros and leaves ``inner``'s state
    exactly as it was: no moment update, no weight decay, no step count.
    Every finite norm and loss enters the window, skipped or not (as in
    OLMo-core), so a lasting change of scale is soon accepted.

    Args:
      inner: the optimizer to wrap (e.g. ``optax.adamw(3e-4)``); it gets the
        same ``params`` and extra arguments.
      window: how many past steps the statistics cover, ``>= 2``.
      sigma: the outlier threshold in standard deviations, ``> 0``.
      min_history: past values needed before anything is skipped as an
        outlier, in ``[2, window]`` (default ``window // 2``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`SkipStepState`; its update takes the loss as ``value=``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from aggc_optax import presets
      >>> tx = presets.skip_step(optax.sgd(1.0), window=4, sigma=3.0, min_history=3)
      >>> state = tx.init({"w": jnp.zeros(1)})
      >>> for g in (1.0, 1.1, 0.9, 1.0):
      ...     _, state = tx.update({"w": jnp.array([g])}, state)
      >>> out, state = tx.update({"w": jnp.array([9.0])}, state)  # far above 1 + 3 sigma
      >>> float(out["w"][0]), bool(state.skipped)
      (0.0, True)

    References:
      OLMo-core, ``SkipStepOptimizer``; Levanter, ``SkipStepConfig``.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"window must be an int >= 2, got {window!r}")
    sigma = _validation.check_number("sigma", sigma, minimum=0.0)
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    if min_history is None:
        min_history = max(2, window // 2)
    if (
        isinstance(min_history, bool)
        or not isinstance(min_history, int)
        or not 2 <= min_history <= window
    ):
        raise ValueError(f"min_history must be an int in [2, window={window}], got {min_history!r}")
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: optax.Params) -> SkipStepState:
        zero = jnp.zeros((), jnp.int32)
        return SkipStepState(
            inner_state=inner.init(params),
            norms=jnp.zeros((window,), jnp.float32),
            losses=jnp.zeros((window,), jnp.float32),
            filled=zero,
            position=zero,
            count=zero,
            skipped=jnp.zeros((), bool),
            skip_count=zero,
            norm=jnp.zeros((), jnp.float32),
            threshold=jnp.full((), jnp.inf, jnp.float32),
        )

    def update_fn(
        updates: optax.Updates,
        state: SkipStepState,
        params: optax.Params | None = None,
        *,
        value: jax.Array | None = None,
        **extra: Any,
    ) -> tuple[optax.Updates, SkipStepState]:
        norm = global_norm(updates)
        ready = state.filled >= min_history
        bound = jnp.where(ready, _outlier_bound(state.norms, state.filled, sigma), jnp.inf)
        finite = jnp.isfinite(norm)
        skip = ~finite | (norm > bound)
        loss = jnp.zeros((), jnp.float32)
        if value is not None:
            loss = jnp.asarray(value, jnp.float32)
            loss_bound = _outlier_bound(state.losses, state.filled, sigma)
            finite = finite & jnp.isfinite(loss)
            skip = skip | ~jnp.isfinite(loss) | (ready & (loss > loss_bound))
            extra = {**extra, "value": value}
        new, inner_state = inner.update(updates, state.inner_state, params, **extra)
        out = jax.tree_util.tree_map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), new)
        inner_state = jax.tree_util.tree_map(
            lambda old, fresh: jnp.where(skip, old, fresh), state.inner_state, inner_state
        )
        write = finite  # only finite values enter the window
        new_state = SkipStepState(
            inner_state=inner_state,
            norms=jnp.where(write, state.norms.at[state.position].set(norm), state.norms),
            losses=jnp.where(write, state.losses.at[state.position].set(loss), state.losses),
            filled=jnp.where(write, jnp.minimum(state.filled + 1, window), state.filled),
            position=jnp.where(write, (state.position + 1) % window, state.position),
            count=state.count + 1,
            skipped=skip,
            skip_count=state.skip_count + skip.astype(jnp.int32),
            norm=norm,
            threshold=bound.astype(jnp.float32),
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def skip_step_metrics(state: SkipStepState, prefix: str) -> dict[str, float]:
    """The last step of a :class:`SkipStepState` as ``{f"{prefix}/{field}": float}``."""
    values = jax.device_get(
        {
            "norm": state.norm,
            "threshold": state.threshold,
            "skipped": state.skipped.astype(jnp.float32),
            "skip_count": state.skip_count,
        }
    )
    return {f"{prefix}/{k}": float(v) for k, v in values.items()}
