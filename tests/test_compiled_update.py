"""Properties of the compiled AGGC update that performance depends on.

Not timings: donation works (no state field shares a buffer), donating changes
no result, and XLA's buffer assignment gives AGGC no temporary the size of a
gradient (the per-group rescale fuses into the optimizer's elementwise update).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import aggc_optax


def _tree(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, jax.Array]:
    keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
    return {n: jax.random.normal(k, s) for k, (n, s) in zip(keys, shapes.items())}


def _params() -> dict[str, jax.Array]:
    shapes = {
        "model.embed_tokens.weight": (64, 32),
        "model.layers.0.self_attn.q_proj.weight": (32, 32),
        "model.layers.0.self_attn.k_proj.weight": (32, 32),
        "model.layers.0.mlp.up_proj.weight": (96, 32),
        "model.layers.0.mlp.down_proj.weight": (32, 96),
        "model.layers.0.input_layernorm.weight": (32,),
        "model.layers.0.residual_gate": (4,),  # no label: passes through
        "lm_head.weight": (64, 32),
    }
    return _tree(shapes, seed=0)


def _step(tx):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def test_init_state_fields_are_distinct_buffers():
    params = _params()
    state = aggc_optax.aggc().init(params)
    arrays = [x for x in jax.tree.leaves(state)]
    pointers = [x.unsafe_buffer_pointer() for x in arrays if x.size]
    assert len(pointers) == len(set(pointers)) == len(aggc_optax.AGGCState._fields) - 1


def test_donated_update_runs_and_matches_the_undonated_one():
    params = _params()
    tx = optax.chain(aggc_optax.aggc(low_mult=0.5), optax.adamw(1e-2))
    donated = jax.jit(_step(tx), donate_argnums=(0, 1))
    plain = jax.jit(_step(tx))
    p_d, s_d = jax.tree.map(jnp.copy, params), tx.init(params)
    p_p, s_p = params, tx.init(params)
    for t in range(4):
        grads = jax.tree.map(lambda x, t=t: (t + 1.0) * jnp.sin(x), params)
        p_d, s_d = donated(p_d, s_d, grads)
        p_p, s_p = plain(p_p, s_p, grads)
    for a, b in zip(jax.tree.leaves((p_d, s_d)), jax.tree.leaves((p_p, s_p))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(aggc_optax.group_stats(s_d)["q_proj"]["clip_down_count"]) >= 1


def _temp_bytes(tx, params) -> int:
    state = tx.init(params)
    compiled = jax.jit(_step(tx), donate_argnums=(0, 1)).lower(params, state, params).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_no_temporary_the_size_of_a_gradient():
    # Leaves large enough for XLA's CPU backend to reduce them in place (it
    # squares tiny leaves into a scratch buffer first, for any clipper).
    shapes = {
        "model.layers.0.self_attn.q_proj.weight": (256, 256),
        "model.layers.0.self_attn.k_proj.weight": (256, 256),
        "model.layers.0.mlp.up_proj.weight": (512, 256),
        "model.layers.0.mlp.down_proj.weight": (256, 512),
    }
    params = _tree(shapes, seed=1)
    adamw = optax.adamw(1e-3)
    aggc_temp = _temp_bytes(optax.chain(aggc_optax.aggc(), adamw), params)
    global_temp = _temp_bytes(optax.chain(optax.clip_by_global_norm(1.0), adamw), params)
    smallest_leaf_bytes = 256 * 256 * 4
    # AGGC's temporaries are its [groups] statistics: far below one gradient
    # leaf, whereas optax's global clip materialises the clipped gradients.
    assert aggc_temp < smallest_leaf_bytes // 16
    assert aggc_temp <= global_temp
