"""The AGGC state can be donated to a jitted update (no two fields share a buffer)."""

import jax
import jax.numpy as jnp
import optax

import aggc_optax


def test_fields_do_not_alias_and_state_can_be_donated():
    params = {"model": {"q_proj": {"weight": jnp.ones((2, 2))}, "norm": {"weight": jnp.ones(2)}}}
    tx = optax.chain(aggc_optax.presets.lora_sft(None), optax.adam(1e-3))
    state = tx.init(params)
    arrays = [x for x in jax.tree_util.tree_leaves(aggc_optax.find_aggc_states(state))]
    pointers = [x.unsafe_buffer_pointer() for x in arrays]
    assert len(set(pointers)) == len(pointers)

    update = jax.jit(tx.update, donate_argnums=1)
    for _ in range(3):  # donating a state with aliased fields fails at the first call
        _, state = update(params, state, params)
    stats = aggc_optax.group_stats(state)
    assert int(stats["q_proj"]["clip_down_count"]) == 2  # clipped at steps 1 and 2 (norm > 0.6 EMA)
