r"""ZClip: global-norm clipping with a z-score threshold from EMA statistics.

Kumar, Owen, Roy Chowdhury, Güra, "ZClip: Adaptive Spike Mitigation for LLM
Pre-Training" (arXiv 2504.02507): the global gradient norm's mean and variance
are tracked by exponential moving averages; a norm whose z-score exceeds a
threshold is clipped to a bound that shrinks as the outlier grows. Written
here from the paper and the behaviour of the authors' ``ZClip`` class.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from aggc_optax import _validation

# The reference divides the clip value by ``norm + 1e-6``: kept, so a clipped
# step's factor matches the authors' class to float32 rounding.
CLIP_EPS = 1e-6
_MODES = ("adaptive_scaling", "mean")


class ZClipState(NamedTuple):
    """State of :func:`~aggc_optax.presets.zclip`: scalars.

    Attributes:
      count: updates so far (non-finite ones included).
      seen: finite norms collected in the warm-up (stops at ``warmup_steps``).
      mean: during the warm-up the running mean of the norms seen, then their EMA.
      var: during the warm-up the running (population) variance, then its EMA.
      norm: the global norm of the last update, before clipping.
      threshold: the norm the last update was clipped to (``inf`` when it was not).
      scale: the factor the last update was multiplied by.
      clip_count: how many updates were clipped so far.
    """

    count: jax.Array  # type: ignore[assignment]  # NamedTuple field named like tuple.count
    seen: jax.Array
    mean: jax.Array
    var: jax.Array
    norm: jax.Array
    threshold: jax.Array
    scale: jax.Array
    clip_count: jax.Array


def global_norm(tree: Any) -> jax.Array:
    """The L2 norm of every floating-point leaf of ``tree``, summed in float32 or wider."""
    squares = [
        jnp.sum(jnp.square(x.astype(jnp.promote_types(x.dtype, jnp.float32))))
        for x in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.floating)
    ]
    if not squares:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(sum(squares[1:], squares[0])).astype(jnp.float32)


def running_moments(
    mean: jax.Array,
    var: jax.Array,
    seen: jax.Array,
    norm: jax.Array,
    followed: jax.Array,
    beta: float,
    warm: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """The mean and variance after one step: Welford's in the warm-up, EMAs after it.

    In the warm-up ``norm`` is the ``seen + 1``-th value of a running mean and
    population variance; after it the EMAs follow ``followed`` (the clipped
    norm), the variance about the new mean.
    """
    n = (seen + 1).astype(mean.dtype)
    delta = norm - mean
    warm_mean = mean + delta / n
    warm_var = var + (delta * (norm - warm_mean) - var) / n
    ema_mean = beta * mean + (1 - beta) * followed
    ema_var = beta * var + (1 - beta) * jnp.square(followed - ema_mean)
    return jnp.where(warm, warm_mean, ema_mean), jnp.where(warm, warm_var, ema_var)


def check_warmup_steps(warmup_steps: Any) -> int:
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
        raise ValueError(f"warmup_steps must be an int >= 1, got {warmup_steps!r}")
    return warmup_steps


def scale_tree(tree: Any, factor: jax.Array) -> Any:
    """Every floating-point leaf times ``factor``, in its own dtype; the rest unchanged."""

    def one(x: Any) -> Any:
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            return x
        return (x * factor.astype(x.dtype)).astype(x.dtype)

    return jax.tree_util.tree_map(one, tree)


def zclip(
    alpha: float = 0.97,
    z_thresh: float = 2.5,
    warmup_steps: int = 25,
    *,
    max_norm: float | None = None,
    clip_option: str = "adaptive_scaling",
    clip_factor: float = 1.0,
    eps: float = 1e-6,
    skip_update_on_spike: bool = False,
) -> optax.GradientTransformation:
    r"""ZClip: clip the global gradient norm when its z-score is an outlier.

    With :math:`n_t` the global norm of the update, :math:`\mu` and
    :math:`\sigma^2` the statistics before the step:

    * **warm-up** (the first ``warmup_steps`` finite norms): nothing is
      clipped (only ``max_norm``, if set); :math:`\mu, \sigma^2` are the mean
      and population variance of the norms seen;
    * **then**: :math:`z_t = (n_t - \mu) / (\sigma + \text{eps})`. If
      :math:`z_t > z_\text{thresh}` the norm is clipped to

      .. math::
        c_t = \Bigl(\mu + \frac{z_\text{thresh}^2}{z_t}\,\sigma\Bigr)\cdot
        \text{clip\_factor}

      with ``clip_option="adaptive_scaling"`` (the default), so a larger outlier
      gets a tighter bound, or :math:`c_t = \mu` with ``clip_option="mean"``;
      otherwise :math:`c_t = n_t`.
      The update is multiplied by :math:`\min(c_t, \text{max\_norm}) / (n_t
      + 10^{-6})` when :math:`n_t` exceeds that bound, and the statistics
      follow the clipped norm:
      :math:`\mu \leftarrow \alpha\mu + (1-\alpha)c_t`,
      :math:`\sigma^2 \leftarrow \alpha\sigma^2 + (1-\alpha)(c_t - \mu)^2`
      (with the new :math:`\mu`).

    This is the rule of the authors' ``ZClip`` class (``mode="zscore"``) and
    its defaults, with ``max_norm=None``: the paper's algorithm has no fixed
    cap; later versions of the authors' class default to ``max_grad_norm=1.0``,
    which ``max_norm=1.0`` reproduces. One difference: a non-finite norm (a NaN
    or inf entry) passes the update through unchanged and leaves the
    statistics alone, so ``optax.apply_if_finite`` or a loss scaler still sees
    the fault (the authors' class would take the NaN into its mean).

    Args:
      alpha: the EMA factor :math:`\alpha`, in ``[0, 1)``.
      z_thresh: the z-score above which a norm is clipped, ``> 0``.
      warmup_steps: finite norms collected before the first clip, ``>= 1``.
      max_norm: ``None`` (default) or a cap on the norm applied on every step
        (warm-up included), ``> 0``.
      clip_option: ``"adaptive_scaling"`` (default) or ``"mean"``.
      clip_factor: multiplies the adaptive bound (``"adaptive_scaling"``), ``> 0``.
      eps: added to :math:`\sigma` in the z-score, ``>= 0``.
      skip_update_on_spike: leave the statistics unchanged on a clipped step.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`ZClipState`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from aggc_optax import presets
      >>> tx = presets.zclip(warmup_steps=2)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> for g in ([3.0, 4.0], [6.0, 8.0]):  # norms 5 and 10: mean 7.5, std 2.5
      ...     _, state = tx.update({"w": jnp.array(g)}, state)
      >>> out, state = tx.update({"w": jnp.array([30.0, 40.0])}, state)  # z = 17
      >>> round(float(state.threshold), 4)  # 7.5 + 2.5**2 / 17 * 2.5
      8.4191

    References:
      Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
      <https://arxiv.org/abs/2504.02507>`_, 2025.
    """
    alpha = _validation.check_number(
        "alpha", alpha, minimum=0.0, maximum=1.0, maximum_exclusive=True
    )
    z_thresh = _positive("z_thresh", z_thresh)
    clip_factor = _positive("clip_factor", clip_factor)
    eps = _validation.check_number("eps", eps, minimum=0.0)
    check_warmup_steps(warmup_steps)
    if max_norm is not None:
        max_norm = _positive("max_norm", max_norm)
    if clip_option not in _MODES:
        raise ValueError(f"clip_option must be one of {_MODES}, got {clip_option!r}")

    def init_fn(params: optax.Params) -> ZClipState:
        del params
        zero = jnp.zeros((), jnp.float32)
        return ZClipState(
            count=jnp.zeros((), jnp.int32),
            seen=jnp.zeros((), jnp.int32),
            mean=zero,
            var=zero,
            norm=zero,
            threshold=jnp.full((), jnp.inf, jnp.float32),
            scale=jnp.ones((), jnp.float32),
            clip_count=jnp.zeros((), jnp.int32),
        )

    def update_fn(
        updates: optax.Updates, state: ZClipState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, ZClipState]:
        del params
        norm = global_norm(updates)
        finite = jnp.isfinite(norm)
        warm = state.seen < warmup_steps
        std = jnp.sqrt(state.var)
        z = (norm - state.mean) / (std + eps)
        spike = finite & ~warm & (z > z_thresh)
        if clip_option == "adaptive_scaling":
            bound = (state.mean + z_thresh**2 / jnp.where(spike, z, 1.0) * std) * clip_factor
        else:
            bound = state.mean
        clip_value = jnp.where(spike, bound, norm)  # what the statistics follow
        limit = clip_value if max_norm is None else jnp.minimum(clip_value, max_norm)
        clipped = finite & (norm > limit)
        scale = jnp.where(clipped, limit / (norm + CLIP_EPS), 1.0).astype(jnp.float32)

        mean, var = running_moments(
            state.mean, state.var, state.seen, norm, clip_value, alpha, warm
        )
        keep = ~finite | (spike & skip_update_on_spike)
        mean = jnp.where(keep, state.mean, mean)
        var = jnp.where(keep, state.var, var)
        new_state = ZClipState(
            count=state.count + 1,
            seen=jnp.where(finite & warm, state.seen + 1, state.seen),
            mean=mean,
            var=var,
            norm=norm,
            threshold=jnp.where(clipped, limit, jnp.inf).astype(jnp.float32),
            scale=scale,
            clip_count=state.clip_count + clipped.astype(jnp.int32),
        )
        return scale_tree(updates, scale), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def _positive(name: str, value: Any) -> float:
    value = _validation.check_number(name, value, minimum=0.0)
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


def zclip_metrics(state: ZClipState, prefix: str) -> dict[str, float]:
    """The last step of a :class:`ZClipState` as ``{f"{prefix}/{field}": float}``."""
    values = jax.device_get(
        {
            "norm": state.norm,
            "threshold": state.threshold,
            "scale": state.scale,
            "clipped": (state.scale < 1).astype(jnp.float32),
            "mean": state.mean,
            "std": jnp.sqrt(state.var),
            "clip_count": state.clip_count,
        }
    )
    return {f"{prefix}/{k}": float(v) for k, v in values.items()}
