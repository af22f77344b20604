r"""Ready-made AGGC settings: the authors' recipes and two known clippers.

* :func:`lora_sft` and :func:`grpo`: the authors' two recipes
  (``docs/reference-behaviour.md`` §9), through
  :func:`~aggc_optax.from_reference_options`, so they behave exactly like the
  authors' PyTorch clipper, except that by default a non-finite group norm is
  skipped (``nonfinite="skip"``); ``nonfinite="reference"`` gives the
  reference's NaN behaviour too.
* :func:`global_norm`: AGGC with one group, static bounds and no raising, which
  is global-norm clipping (``optax.clip_by_global_norm``) up to AGGC's
  :math:`\epsilon = 10^{-12}`.
* :func:`adagc`: AGGC with one group per tensor and only an upper bound, which
  is the per-tensor rule of AdaGC (Wang et al., 2025) after its warm-up.
* :func:`zclip`: ZClip (Kumar et al., 2025), the global norm clipped when its
  z-score against EMA statistics is an outlier.
* :func:`skip_step`: wraps an optimizer and skips a step whose gradient norm
  or loss is a rolling 6-sigma outlier (OLMo-core, Levanter).
* :func:`group_zscore`: AGGC's groups with each upper bound at its own
  ``mean + z * std`` (experimental; ``docs/spikes.md``).

Example:
  >>> import optax
  >>> from aggc_optax import presets
  >>> tx = optax.chain(presets.lora_sft(total_steps=1000), optax.adamw(2e-5))
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from aggc_optax import _validation
from aggc_optax._aggc import aggc
from aggc_optax.clippers.group_zscore import GroupZScoreState as GroupZScoreState
from aggc_optax.clippers.group_zscore import group_zscore
from aggc_optax.clippers.skip_step import SkipStepState as SkipStepState
from aggc_optax.clippers.skip_step import skip_step
from aggc_optax.clippers.zclip import ZClipState as ZClipState
from aggc_optax.clippers.zclip import zclip
from aggc_optax.labels import ParamLabels
from aggc_optax.reference.recipes import GRPO_OPTIONS, LORA_SFT_OPTIONS, grpo, lora_sft

__all__ = ["GRPO_OPTIONS", "LORA_SFT_OPTIONS", "adagc", "global_norm", "grpo", "lora_sft"]


def _single_group(name: str) -> str:
    del name
    return "global"


def global_norm(max_norm: float) -> optax.GradientTransformation:
    r"""Global-norm clipping, written as AGGC with one group and static bounds.

    Every leaf is in the single group ``"global"``; the bounds are
    ``[0, max_norm]`` with no raising and no caps, so with
    :math:`n = \sqrt{\sum_i \|g_i\|^2 + 10^{-16}}`:

    .. math::
      g \leftarrow \begin{cases} g \cdot \text{max\_norm} / (n + \epsilon) &
      n > \text{max\_norm} + \epsilon \\ g & \text{otherwise.} \end{cases}

    ``optax.clip_by_global_norm(max_norm)`` computes
    ``g / n * max_norm`` whenever ``n >= max_norm``. The two agree exactly
    except for AGGC's :math:`\epsilon = 10^{-12}` and the :math:`10^{-16}` under
    the root: in exact arithmetic the elementwise relative difference is at
    most :math:`\epsilon / \text{max\_norm} + 10^{-16} / (2\,\text{max\_norm}^2)`
    (the band :math:`\text{max\_norm} \le n \le \text{max\_norm} + \epsilon`,
    which optax scales by at least :math:`1 - \epsilon / \text{max\_norm}` and
    this leaves alone, included). In float32 the different order of the
    roundings adds a few ulps (``tests/test_presets.py`` checks ``rtol=1e-6``;
    in float64, ``rtol=1e-12 + 1e-15`` for ``max_norm = 1``). Where they differ:

    * a genuinely non-finite norm (a NaN or inf entry): AGGC passes the
      gradients through unchanged, so ``optax.apply_if_finite`` or a loss
      scaler still sees the fault (optax returns all NaN for a NaN entry; for
      an inf entry, NaN there and zeros elsewhere);
    * finite entries whose float32 sum of squares overflows (a norm above
      about 1.8e19): AGGC recomputes the norm with a power-of-two scaling on
      that step and clips correctly (``[1e20, 1e20], [1, 2]`` comes out with
      norm 1), where optax's norm is inf and it returns zeros; a norm beyond
      float32's range (about 3.4e38) is inf and counts as non-finite
      (``docs/reliability.md``, "Overflow");
    * float16 and bfloat16 gradients: AGGC sums their squares in float32, so
      a float16 tree of norm above 256 (squares above float16's 65504) is
      clipped to ``max_norm``, where optax sums in float16, gets inf and
      returns zeros.

    An injected ``max_norm=0`` (``optax.inject_hyperparams``) returns zeros,
    as optax does; a literal ``global_norm(0.0)`` is an error.

    It exists to relate AGGC to the clipper it replaces (and for tests); in
    training, ``optax.clip_by_global_norm`` is the simpler choice.

    Args:
      max_norm: the largest global norm let through; ``> 0``. May be injected
        (``optax.inject_hyperparams``), where an injected 0 zeroes the gradients.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import jax.numpy as jnp
      >>> from aggc_optax import presets
      >>> tx = presets.global_norm(1.0)
      >>> g = {"a": jnp.array([3.0, 4.0])}
      >>> out, _ = tx.update(g, tx.init(g))
      >>> [round(float(x), 4) for x in out["a"]]
      [0.6, 0.8]
    """
    injected = isinstance(max_norm, jax.Array)  # as optax.inject_hyperparams passes it
    max_norm = _validation.check_number("max_norm", max_norm, minimum=0.0)
    if not injected and max_norm <= 0:
        # a literal 0 is most likely a mistake; an injected 0 (a schedule's end) is
        # taken as optax takes it
        raise ValueError(
            f"max_norm must be > 0, got {max_norm!r} (an array 0, as optax.inject_hyperparams "
            "passes it, zeroes the gradients as optax.clip_by_global_norm(0) does)"
        )
    inner = aggc(param_labels=_single_group, auto_bounds=False, max_norm=max_norm)

    def init_fn(params: optax.Params) -> Any:
        if not any(jnp.issubdtype(jnp.result_type(x), jnp.floating) for x in _leaves(params)):
            raise ValueError(
                "presets.global_norm: the parameters have no floating-point leaf, so there is "
                f"nothing to clip (got {params!r})"
            )
        return inner.init(params)

    def update_fn(updates: optax.Updates, state: Any, params: Any = None, **extra: Any) -> Any:
        out, state = inner.update(updates, state, params, **extra)
        if _validation.is_traced(max_norm) or max_norm == 0:
            # optax.clip_by_global_norm(0) returns zeros; AGGC's upper bound of 0 is "off"
            # (a Python branch only where max_norm is a known number: no `if` on a tracer)
            keep = jnp.asarray(max_norm) > 0
            out = jax.tree_util.tree_map(lambda g: jnp.where(keep, g, jnp.zeros_like(g)), out)
        return out, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _leaves(tree: Any) -> list[Any]:
    return jax.tree_util.tree_leaves(tree)


def _per_tensor(name: str) -> str:
    return name or "<root>"


def adagc(
    rel_threshold: float = 1.05,
    ema_beta: float = 0.98,
    *,
    ema_init: str = "first",
    param_labels: ParamLabels = None,
) -> optax.GradientTransformation:
    r"""Per-tensor adaptive clipping in the style of AdaGC, written as AGGC.

    One group per tensor (by default: the label is the leaf's dotted path),
    only an upper bound (no raising, no caps):
    with :math:`\gamma_i` the tensor's EMA before the step,

    .. math::
      h_i = \begin{cases} \lambda_\text{rel}\,\gamma_i / (\|g_i\| + \epsilon) &
      \|g_i\| > \lambda_\text{rel}\gamma_i + \epsilon \\ 1 & \text{otherwise,}
      \end{cases} \quad g_i \leftarrow h_i g_i, \quad
      \gamma_i \leftarrow \beta \gamma_i + (1 - \beta)\, h_i \|g_i\|,

    which is AdaGC's rule after its warm-up: the threshold is relative to an
    EMA of the *clipped* norms, as AGGC's reference EMA is. What is not the
    same:

    * AdaGC's warm-up (its first steps clip the *global* norm against an
      absolute threshold and set :math:`\gamma_i` to the running minimum of
      the clipped norms) is not reproduced. With ``ema_init="first"`` (the
      default here) :math:`\gamma_i` starts at the tensor's first norm and
      that first step is never clipped (for ``rel_threshold >= 1``): this is
      exactly AdaGC with a one-step warm-up and no absolute threshold. With
      ``ema_init="zero"`` the first steps clip everything to tiny bounds (the
      reference's warm-up), which AdaGC avoids.
    * AGGC's :math:`\epsilon = 10^{-12}` in the test and the division, and
      the :math:`10^{-16}` under the root (``tests/test_presets.py``: equal to
      a NumPy model of the rule to ``rtol=3e-6`` in float32).

    Args:
      rel_threshold: :math:`\lambda_\text{rel}` (``high_mult``), ``> 0``; ``>= 1``
        for the equivalence above. 1.05 here is a starting point, not a value
        from the AdaGC paper.
      ema_beta: :math:`\beta`, in ``[0, 1)``.
      ema_init: ``"first"`` (default), ``"zero"`` or ``"bias_corrected"``, as in
        :func:`~aggc_optax.aggc`.
      param_labels: ``None`` (one group per leaf) or any labeling of
        :func:`~aggc_optax.aggc` (e.g. per module type, which is then AGGC
        with only an upper bound).

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import optax
      >>> from aggc_optax import presets
      >>> tx = optax.chain(presets.adagc(), optax.adamw(3e-4))

    References:
      Wang et al., `AdaGC: Improving Training Stability for Large Language
      Model Pretraining <https://arxiv.org/abs/2502.11034>`_, 2025.
    """
    rel_threshold = _validation.check_number("rel_threshold", rel_threshold, minimum=0.0)
    if not _validation.is_traced(rel_threshold) and rel_threshold <= 0:
        raise ValueError(f"rel_threshold must be > 0, got {rel_threshold!r}")
    return aggc(
        ema_beta=ema_beta,
        high_mult=rel_threshold,
        ema_init=ema_init,
        param_labels=_per_tensor if param_labels is None else param_labels,
    )


__all__ = [
    "GRPO_OPTIONS",
    "LORA_SFT_OPTIONS",
    "adagc",
    "global_norm",
    "group_zscore",
    "grpo",
    "lora_sft",
    "skip_step",
    "zclip",
]
