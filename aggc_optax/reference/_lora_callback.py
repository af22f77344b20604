"""The authors' LoRA clipping callback as it ran under the Hugging Face Trainer.

The LoRA recipe's clipper (``LoraGradPlotCallback`` in the authors'
``LoRA/train.py``) meant to clip the accumulated gradient once per optimizer
step, but its per-step clip sits in a method the Trainer never calls
(``on_before_optimizer_step``; docs/reference-behaviour.md section 10). What
ran is its ``on_substep_end``: the Trainer calls it after every micro-batch but
the last of each optimizer step, and the callback clips there when its own
running count of those calls is a multiple of the accumulation count ``k``. It
then scales the gradient accumulated so far (``p.grad`` after some of the
micro-batches), with the norm taken from the hook sums of those micro-batches,
and the later micro-batches are added unscaled. :func:`lora_callback_as_ran`
reproduces that in JAX; the recipe as meant is
``presets.lora_sft(T, param_labels=aggc_optax.lora_label)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from aggc_optax import _numerics, labels
from aggc_optax._state import AGGCState
from aggc_optax.labels import lora_label
from aggc_optax.reference._options import from_reference_options
from aggc_optax.reference.recipes import LORA_SFT_OPTIONS

__all__ = ["LoraCallbackAsRanState", "lora_callback_as_ran"]


class LoraCallbackAsRanState(NamedTuple):
    """State of :func:`lora_callback_as_ran`.

    Attributes:
      micro_step: micro-batches seen in the current optimizer step (0 to k-1).
      substep_calls: how many times the Trainer would have called the
        callback's ``on_substep_end`` so far (after each micro-batch but the
        last of a step), over the whole run; the callback clips when this count
        reaches a multiple of k.
      step: optimizer steps done (the Trainer's ``global_step``).
      accumulated: the gradient accumulated so far in this step (``p.grad``).
      hook_sumsq: per leaf, the sum over this step's micro-batches so far of
        its squared norm (what the callback's gradient hooks added up).
      clip_state: the clipper's :class:`~aggc_optax.AGGCState`; it moves only
        at a clip (``group_stats`` reads it: ``clip_down_count`` counts clips).
      inner_state: the inner optimizer's state.
    """

    micro_step: jax.Array
    substep_calls: jax.Array
    step: jax.Array
    accumulated: optax.Updates
    hook_sumsq: optax.Updates
    clip_state: AGGCState
    inner_state: optax.OptState


def lora_callback_as_ran(
    inner: optax.GradientTransformation,
    accumulation_steps: int,
    total_steps: int,
    *,
    options: Mapping[str, Any] = LORA_SFT_OPTIONS,
    param_labels: Any = lora_label,
) -> optax.GradientTransformationExtraArgs:
    """The authors' LoRA callback as it ran under Hugging Face's Trainer, at accumulation k.

    Like ``optax.MultiSteps``, it is called once per micro-batch with that
    micro-batch's gradient, returns zeros until the last micro-batch of an
    optimizer step, and then returns ``inner``'s update of what the Trainer
    handed its optimizer: the sum of the step's micro-batch gradients, in
    which the first ``m`` micro-batches' sum is multiplied by the clipper's
    factor on the steps where the callback clipped after micro-batch ``m``.
    That happens when the running count of non-final micro-batches reaches a
    multiple of ``k``: never at ``k = 1``, after micro-batch 1 of 2 on every
    other step at ``k = 2``, on 3 steps of every 4 at ``k = 4``. The norm of a
    clip is the root of the hook sums, the summed squared norms of the
    micro-batches so far (not the norm of their sum), the bounds use the
    optimizer step's schedule, and the EMA moves only at a clip.

    This is a reproduction of what the authors' LoRA runs did, for comparing
    with their numbers; it is not AGGC as the paper describes it. For that (one
    clip of the whole accumulated gradient per optimizer step) use
    ``optax.chain(presets.lora_sft(total_steps, param_labels=aggc_optax.lora_label), inner)``.

    Pass the gradients the Trainer's ``backward()`` produces: it divides each
    micro-batch's loss by ``k`` before its backward pass, so give the gradient
    of ``loss / k`` to get its sum (``optax.MultiSteps`` averages instead).

    Args:
      inner: the optimizer (``optax.adamw(...)`` for the recipe).
      accumulation_steps: ``k``, the Trainer's ``gradient_accumulation_steps``.
      total_steps: the Trainer's ``max_steps`` (optimizer steps), for the
        multiplier schedule.
      options: the reference's option names (default: the LoRA recipe,
        :data:`aggc_optax.presets.LORA_SFT_OPTIONS`).
      param_labels: how leaves are grouped, from their dotted names: ``None``
        (the reference's rule) or a callable ``fn(name)``; default
        :func:`aggc_optax.lora_label`, the callback's rule.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`LoraCallbackAsRanState`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import aggc_optax
      >>> tx = aggc_optax.lora_callback_as_ran(optax.sgd(1e-3), accumulation_steps=2,
      ...                                      total_steps=100)
      >>> params = {"model.layers.0.self_attn.q_proj.lora_A.default.weight": jnp.ones((2, 4))}
      >>> state = tx.init(params)
      >>> for micro in range(2):  # one optimizer step of two micro-batches
      ...     updates, state = tx.update(params, state, params)
      >>> int(state.step), int(state.substep_calls)
      (1, 1)

    References:
      docs/reference-behaviour.md section 10; tests/golden/lora_callback/.
    """
    if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int):
        raise TypeError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
    if accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    if param_labels is not None and (
        not callable(param_labels)
        or isinstance(param_labels, labels.TreeLabeler)
        or labels.labeler_arity(param_labels) != 1
    ):
        raise ValueError(
            "lora_callback_as_ran: param_labels must be None or a callable fn(name) (such as "
            f"aggc_optax.lora_label), as the callback labels by name; got {param_labels!r}"
        )
    k = accumulation_steps
    clipper = from_reference_options(
        dict(options), total_steps=total_steps, param_labels=param_labels
    )
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: optax.Params) -> LoraCallbackAsRanState:
        clip_state = clipper.init(params)
        if not isinstance(clip_state, AGGCState):
            raise ValueError(
                "lora_callback_as_ran: these options clip nothing (enable is False), so there "
                "is no callback to reproduce"
            )
        dtype = _numerics.stats_dtype()
        zero = jnp.zeros((), jnp.int32)
        return LoraCallbackAsRanState(
            micro_step=zero,
            substep_calls=zero,
            step=zero,
            accumulated=jax.tree_util.tree_map(jnp.zeros_like, params),
            hook_sumsq=jax.tree_util.tree_map(lambda _: jnp.zeros((), dtype), params),
            clip_state=clip_state,
            inner_state=inner.init(params),
        )

    def clip(
        accumulated: optax.Updates, hook_sumsq: optax.Updates, clip_state: AGGCState, step: Any
    ) -> tuple[optax.Updates, AGGCState]:
        # The clipper sees one scalar per leaf whose square is the leaf's hook
        # sum, so its group norms are the hook norms; its factors then scale
        # the partial accumulation, leaf by leaf as it scales its own input.
        stand_in = jax.tree_util.tree_map(jnp.sqrt, hook_sumsq)
        _, clip_state = clipper.update(stand_in, clip_state._replace(count=step))
        leaves, treedef = jax.tree_util.tree_flatten(accumulated)
        placement = labels.place(accumulated, param_labels)
        return treedef.unflatten(_numerics.rescale(placement, leaves, clip_state.scale)), clip_state  # type: ignore[attr-defined]  # jax's stub lacks PyTreeDef methods

    def update_fn(
        updates: optax.Updates,
        state: LoraCallbackAsRanState,
        params: optax.Params | None = None,
        **extra: Any,
    ) -> tuple[optax.Updates, LoraCallbackAsRanState]:
        dtype = _numerics.stats_dtype()
        accumulated = jax.tree_util.tree_map(
            lambda a, g: a + g.astype(a.dtype), state.accumulated, updates
        )
        hook_sumsq = jax.tree_util.tree_map(
            lambda h, g: (
                h + jnp.sum(jnp.square(g.astype(_numerics.compute_dtype(g.dtype)))).astype(dtype)
            ),
            state.hook_sumsq,
            updates,
        )
        micro_step = state.micro_step + 1
        final = micro_step == k
        substep_calls = state.substep_calls + jnp.where(final, 0, 1).astype(jnp.int32)
        event = jnp.logical_and(~final, substep_calls % k == 0)
        accumulated, clip_state = jax.lax.cond(
            event,
            lambda a, c: clip(a, hook_sumsq, c, state.step),
            lambda a, c: (a, c),
            accumulated,
            state.clip_state,
        )

        def emit(acc: optax.Updates, inner_state: Any) -> tuple[optax.Updates, Any]:
            return inner.update(acc, inner_state, params, **extra)

        def hold(acc: optax.Updates, inner_state: Any) -> tuple[optax.Updates, Any]:
            return jax.tree_util.tree_map(jnp.zeros_like, acc), inner_state

        out, inner_state = jax.lax.cond(final, emit, hold, accumulated, state.inner_state)

        def restart(tree: Any) -> Any:
            return jax.tree_util.tree_map(lambda x: jnp.where(final, jnp.zeros_like(x), x), tree)

        new_state = LoraCallbackAsRanState(
            micro_step=jnp.where(final, 0, micro_step).astype(jnp.int32),
            substep_calls=substep_calls,
            step=state.step + final.astype(jnp.int32),
            accumulated=restart(accumulated),
            hook_sumsq=restart(hook_sumsq),
            clip_state=clip_state,
            inner_state=inner_state,
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
