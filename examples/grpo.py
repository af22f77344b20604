"""GRPO for the LLaMA-style decoder of ``train_lm.py``, as verl computes it.

The pieces of one GRPO step (Shao et al. 2024, DeepSeekMath), each a small
pure function so the tests can check it against hand computation:

* :func:`generate`: ``G`` completions per prompt, sampled at a temperature (or
  greedy), with a key/value cache; prompts are left-padded, and padding is
  neither attended to nor counted in the rotary positions;
* :func:`sequence_logprobs`: the log-probability of every completion token
  under a policy (one full forward pass, the same masking and positions);
* :func:`group_advantages`: the outcome reward of each completion minus its
  group's mean, over the group's standard deviation (``torch.std``'s unbiased
  one) plus ``1e-6``: verl's ``compute_grpo_outcome_advantage``; a one-member
  group gets mean 0 and std 1;
* :func:`policy_loss`: the clipped-ratio surrogate with verl's dual clip for
  negative advantages (``clip_ratio_c = 3``), averaged over all completion
  tokens of the mini-batch (verl's ``loss_agg_mode="token-mean"``);
* :func:`low_var_kl`: Schulman's k3 estimator of ``KL(pi || pi_ref)``,
  ``exp(ref - logp) - (ref - logp) - 1``, the log-ratio clamped to
  ``[-20, 20]`` and the result to ``[-10, 10]`` as verl does (its
  ``kl_loss_type="low_var_kl"``), token-mean like the policy loss;
* :func:`make_update`: one rollout batch split into mini-batches, each an
  optimizer step of the clipper, then AdamW, on
  ``policy_loss + kl_coef * kl``, with the per-group gradient norms before and
  after the clipper recorded.

The model code reads the modules of ``train_lm.LlamaForCausalLM`` (and so of
anything built the same way, LoRA-wrapped projections included) and runs
them with explicit positions, a key mask and a cache; with no padding its
logits equal the model's own ``__call__`` (``tests/test_paper_grpo.py``).
No code of verl is used or copied; the formulas are restated from its
documented behaviour.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_lm import group_norms

NEG_INF = -1e9  # the masked-logit value train_lm's attention uses: same softmax
RATIO_LOG_CLAMP = 20.0  # verl clamps log-ratios to [-20, 20] before exp
KL_CLAMP = 10.0  # and the k3 estimate to [-10, 10]


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """The GRPO objective's constants (verl's defaults unless stated)."""

    clip_ratio: float = 0.2  # actor.clip_ratio
    clip_ratio_c: float = 3.0  # actor.clip_ratio_c, the dual clip for A < 0
    kl_coef: float = 0.001  # actor.kl_loss_coef with use_kl_loss=True
    adv_epsilon: float = 1e-6  # added to the group std
    mini_batches: int = 2  # rollout batch / actor.ppo_mini_batch_size


# ---------------------------------------------------------------------------
# The model with positions, a key mask and a cache.
# ---------------------------------------------------------------------------


def _rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    # train_lm._rope with explicit per-token positions ([batch, time]).
    half = x.shape[-1] // 2
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None] * freqs
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


Cache = list[tuple[jax.Array, jax.Array]]


def empty_cache(model: Any, batch: int, slots: int) -> Cache:
    """Zero keys and values, ``[batch, slots, heads, head_dim]`` per layer."""
    attn = model.model.layers[0].self_attn
    d = model.model.embed_tokens.embedding.shape[-1]
    shape = (batch, slots, attn.num_heads, d // attn.num_heads)
    return [(jnp.zeros(shape), jnp.zeros(shape)) for _ in model.model.layers]


def forward(
    model: Any,
    tokens: jax.Array,
    positions: jax.Array,
    cache: Cache,
    slot: int | jax.Array,
    key_valid: jax.Array,
) -> tuple[jax.Array, Cache]:
    """Logits of ``tokens`` written to cache slots ``slot .. slot + T - 1``.

    A query attends to the cache slots at or before its own that
    ``key_valid`` (``[batch, slots]``) marks; ``positions`` (``[batch, T]``)
    are the rotary positions, so a left-padded prompt is encoded as if it
    were unpadded.
    """
    b, t = tokens.shape
    slots = cache[0][0].shape[1]
    q_slots = slot + jnp.arange(t)
    mask = key_valid[:, None, :] & (jnp.arange(slots)[None, None, :] <= q_slots[None, :, None])
    x = model.model.embed_tokens(tokens)
    new_cache = []
    for layer, (keys, values) in zip(model.model.layers, cache):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        d = h.shape[-1]
        nh = attn.num_heads

        def heads(y: jax.Array, nh: int = nh, d: int = d) -> jax.Array:
            return y.reshape(b, t, nh, d // nh)

        q = _rope(heads(attn.q_proj(h)), positions, attn.rope_base)
        k = _rope(heads(attn.k_proj(h)), positions, attn.rope_base)
        v = heads(attn.v_proj(h))
        keys = jax.lax.dynamic_update_slice(keys, k, (0, slot, 0, 0))
        values = jax.lax.dynamic_update_slice(values, v, (0, slot, 0, 0))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, keys) / math.sqrt(d // nh)
        weights = jax.nn.softmax(jnp.where(mask[:, None], logits, NEG_INF), axis=-1)
        x = x + attn.o_proj(jnp.einsum("bhqk,bkhd->bqhd", weights, values).reshape(b, t, d))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        new_cache.append((keys, values))
    return model.lm_head(model.model.norm(x)), new_cache


def prompt_positions(valid: jax.Array) -> jax.Array:
    """Rotary positions of a left-padded prompt: 0 at its first real token."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)


def generate(
    model: Any,
    prompts: jax.Array,
    prompt_valid: jax.Array,
    key: jax.Array,
    *,
    max_new: int,
    eos_id: int,
    pad_id: int,
    temperature: float,
) -> tuple[jax.Array, jax.Array]:
    """Completions of left-padded ``prompts`` (``[batch, Lp]``).

    ``temperature=0`` is greedy decoding. Sampling stops per sequence after
    ``eos_id``. Returns ``tokens`` (``[batch, max_new]``, ``pad_id`` after the
    end) and ``mask`` (the generated tokens, ``eos_id`` included: what verl's
    response mask counts).
    """
    b, lp = prompts.shape
    cache = empty_cache(model, b, lp + max_new)
    key_valid = jnp.concatenate([prompt_valid, jnp.zeros((b, max_new), bool)], axis=1)
    logits, cache = forward(model, prompts, prompt_positions(prompt_valid), cache, 0, key_valid)
    lengths = jnp.sum(prompt_valid, axis=-1).astype(jnp.int32)

    def body(carry: Any, i: jax.Array) -> Any:
        last, cache, key_valid, done, key = carry
        key, sub = jax.random.split(key)
        if temperature > 0:
            tok = jax.random.categorical(sub, last / temperature, axis=-1)
        else:
            tok = jnp.argmax(last, axis=-1)
        tok = jnp.where(done, pad_id, tok).astype(jnp.int32)
        emitted = ~done
        done = done | (tok == eos_id)
        key_valid = key_valid.at[:, lp + i].set(True)
        out, cache = forward(model, tok[:, None], (lengths + i)[:, None], cache, lp + i, key_valid)
        return (out[:, 0], cache, key_valid, done, key), (tok, emitted)

    init = (logits[:, -1], cache, key_valid, jnp.zeros(b, bool), key)
    _, (tokens, mask) = jax.lax.scan(body, init, jnp.arange(max_new))
    return tokens.T, mask.T


def sequence_logprobs(
    model: Any, prompts: jax.Array, prompt_valid: jax.Array, completions: jax.Array
) -> jax.Array:
    """``log pi(token)`` of every completion token (``[batch, Lc]``), one forward pass."""
    b, lp = prompts.shape
    lc = completions.shape[1]
    tokens = jnp.concatenate([prompts, completions], axis=1)
    valid = jnp.concatenate([prompt_valid, jnp.ones((b, lc), bool)], axis=1)
    lengths = jnp.sum(prompt_valid, axis=-1, keepdims=True).astype(jnp.int32)
    positions = jnp.concatenate(
        [prompt_positions(prompt_valid), lengths + jnp.arange(lc)[None, :]], axis=1
    )
    cache = empty_cache(model, b, lp + lc)
    logits, _ = forward(model, tokens[:, :-1], positions[:, :-1], cache, 0, valid)
    logp = jax.nn.log_softmax(logits[:, lp - 1 :].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, completions[..., None], axis=-1)[..., 0]


# ---------------------------------------------------------------------------
# The GRPO objective.
# ---------------------------------------------------------------------------


def group_advantages(rewards: jax.Array, group_size: int, epsilon: float = 1e-6) -> jax.Array:
    """``(r - mean_group) / (std_group + epsilon)`` per completion (``rewards``: ``[P * G]``).

    The groups are consecutive runs of ``group_size``; the std is the unbiased
    one (``ddof=1``) as ``torch.std`` computes it. A group of one gets mean 0
    and std 1, as in verl.
    """
    r = rewards.reshape(-1, group_size).astype(jnp.float32)
    if group_size == 1:
        return r.reshape(-1) / (1.0 + epsilon)
    mean = jnp.mean(r, axis=1, keepdims=True)
    std = jnp.std(r, axis=1, keepdims=True, ddof=1)
    return ((r - mean) / (std + epsilon)).reshape(-1)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``x`` over the tokens ``mask`` marks (verl's ``token-mean``)."""
    m = mask.astype(x.dtype)
    return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def policy_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    clip_ratio: float = 0.2,
    clip_ratio_c: float = 3.0,
) -> tuple[jax.Array, jax.Array]:
    """The clipped-ratio surrogate (to minimise) and the fraction of tokens it clipped.

    Per token, with ``rho = exp(logp - old_logp)`` and advantage ``A``:
    ``l = max(-A rho, -A clip(rho, 1 - eps, 1 + eps))``, and where ``A < 0``
    also ``min(l, -A c)`` (dual clip). ``advantages`` is per sequence
    (``[batch]``) or per token.
    """
    adv = advantages[:, None] if advantages.ndim == 1 else advantages
    log_ratio = jnp.clip(logp - old_logp, -RATIO_LOG_CLAMP, RATIO_LOG_CLAMP)
    ratio = jnp.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
    loss = jnp.maximum(unclipped, clipped)
    loss = jnp.where(adv < 0, jnp.minimum(loss, -adv * clip_ratio_c), loss)
    return masked_mean(loss, mask), masked_mean((clipped > unclipped).astype(jnp.float32), mask)


def low_var_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """Per-token k3 estimate of ``KL(pi || pi_ref)`` from samples of ``pi``."""
    log_ratio = jnp.clip(ref_logp - logp, -RATIO_LOG_CLAMP, RATIO_LOG_CLAMP)
    return jnp.clip(jnp.exp(log_ratio) - log_ratio - 1.0, -KL_CLAMP, KL_CLAMP)


# ---------------------------------------------------------------------------
# One rollout batch -> mini-batch optimizer steps.
# ---------------------------------------------------------------------------


def adamw_direction(b1: float, b2: float, eps: float, weight_decay: float) -> Any:
    """AdamW without its learning rate (``-lr`` times this is ``optax.adamw``'s update).

    Torch's ``AdamW``, which verl uses, decays decoupled from the gradient and
    scaled by the rate, as ``optax.adamw`` does; the rate stays outside so one
    compiled step serves runs at different rates.
    """
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps), optax.add_decayed_weights(weight_decay)
    )


def make_update(
    graphdef: Any,
    clipper: optax.GradientTransformation,
    adam: optax.GradientTransformation,
    cfg: GRPOConfig,
    group_size: int,
    ids: Sequence[int],
    num_groups: int,
) -> Callable[..., Any]:
    """``update(params, state, ref_params, batch, lr) -> (params, state, metrics)``, one run.

    ``batch`` holds the rollout: ``prompts``/``prompt_valid`` (``[P * G, Lp]``,
    each prompt repeated ``G`` times consecutively), ``completions`` and
    ``mask`` (``[P * G, Lc]``) and ``rewards`` (``[P * G]``). The old-policy
    log-probabilities are those of ``params`` before the first mini-batch step
    (they are what sampled the batch); the reference is ``ref_params``. The
    mini-batches split the rollout by whole groups, in order, as verl's
    ``ppo_mini_batch_size`` does with ``shuffle=False``. ``state`` is
    ``(clipper_state, adam_state)``; ``adam`` is :func:`adamw_direction`, applied
    as ``params - lr * direction``. The metrics are per mini-batch step.
    """

    def logprobs(params: Any, b: dict[str, jax.Array]) -> jax.Array:
        model = nnx.merge(graphdef, params)
        return sequence_logprobs(model, b["prompts"], b["prompt_valid"], b["completions"])

    def loss_fn(params: Any, b: dict[str, jax.Array]) -> tuple[jax.Array, Any]:
        logp = logprobs(params, b)
        pg, clipfrac = policy_loss(
            logp, b["old_logp"], b["adv"], b["mask"], cfg.clip_ratio, cfg.clip_ratio_c
        )
        kl = masked_mean(low_var_kl(logp, b["ref_logp"]), b["mask"])
        return pg + cfg.kl_coef * kl, (pg, kl, clipfrac)

    def update(
        params: Any, state: Any, ref_params: Any, batch: dict[str, jax.Array], lr: jax.Array
    ) -> Any:
        batch = dict(batch)
        batch["adv"] = group_advantages(batch["rewards"], group_size, cfg.adv_epsilon)
        batch["old_logp"] = jax.lax.stop_gradient(logprobs(params, batch))
        batch["ref_logp"] = jax.lax.stop_gradient(logprobs(ref_params, batch))
        n = batch["rewards"].shape[0]
        if n % (cfg.mini_batches * group_size):
            raise ValueError(
                f"rollout batch {n} must split into mini_batches={cfg.mini_batches} whole "
                f"groups of {group_size}"
            )
        # One compiled body for every mini-batch (lax.scan), in order.
        split = {
            k: v.reshape(cfg.mini_batches, n // cfg.mini_batches, *v.shape[1:])
            for k, v in batch.items()
        }

        def step(carry: Any, mb: dict[str, jax.Array]) -> Any:
            params, clip_state, adam_state = carry
            (_, (pg, kl, clipfrac)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
            clipped, clip_state = clipper.update(grads, clip_state, params)
            direction, adam_state = adam.update(clipped, adam_state, params)
            params = jax.tree.map(lambda p, u: p - lr * u, params, direction)
            metrics = {
                "pg_loss": pg,
                "kl": kl,
                "clipfrac": clipfrac,
                "norms_before": group_norms(grads, ids, num_groups),
                "norms_after": group_norms(clipped, ids, num_groups),
            }
            return (params, clip_state, adam_state), metrics

        (params, clip_state, adam_state), metrics = jax.lax.scan(step, (params, *state), split)
        return params, (clip_state, adam_state), metrics

    return update
