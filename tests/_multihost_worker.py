"""One of the two processes of ``tests/test_multihost.py`` (not a test module).

Usage: ``python tests/_multihost_worker.py PROCESS_ID PORT OUT.npz`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=2``: each process contributes two
CPU devices to a 4-device global mesh (gloo CPU collectives), and both run:

1. the jitted AGGC update on gradients sharded FSDP x TP over the mesh that spans
   both processes (the group norms need cross-process sums, which XLA inserts);
2. the same inside ``shard_map`` with ``axis_name`` (explicit ``psum`` across hosts);
3. the two-rank experiment of docs/reference-behaviour.md §8: one device per process,
   shards of norm 5 and 0, the reference's ``sync_dist`` mean (``from_reference_options``)
   and ``aggc()``'s sum.

Results are gathered to every process and written to ``OUT.npz``; the parent
compares them with the single-process run and the float64 spec model.
"""

from __future__ import annotations

import sys

NUM_STEPS = 4
SEED = 11


def main(process_id: int, port: int, out_path: str) -> None:
    import jax

    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=90,
        heartbeat_timeout_seconds=30,
        shutdown_timeout_seconds=30,
    )
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import aggc_optax
    from tests._scaleout_common import SHAPES, grad_trajectory, make_aggc

    assert jax.process_count() == 2, jax.process_count()
    assert jax.device_count() == 4 and jax.local_device_count() == 2, jax.devices()

    def gathered(tree: object) -> object:
        return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))

    def global_arrays(tree: dict, specs: dict, mesh: jax.sharding.Mesh) -> dict:
        # Every process knows the full (deterministic) gradient and hands over its shards.
        return {
            name: jax.make_array_from_callback(
                x.shape, NamedSharding(mesh, specs[name]), lambda idx, x=x: x[idx]
            )
            for name, x in tree.items()
        }

    out: dict[str, np.ndarray] = {}
    grads = grad_trajectory(NUM_STEPS, seed=SEED)

    # 1. SPMD: fsdp across the two processes, tp within each.
    mesh = jax.make_mesh((2, 2), ("fsdp", "tp"))
    specs = {n: P("fsdp", "tp") if len(s) == 2 else P("fsdp") for n, s in SHAPES.items()}
    tx = make_aggc("raise")
    step = jax.jit(tx.update)
    with jax.set_mesh(mesh):
        state = tx.init(grads[0])
        for t, g in enumerate(grads):
            upd, state = step(global_arrays(g, specs, mesh), state)
            for name, x in gathered(upd).items():
                out[f"spmd/{t}/upd/{name}"] = x
            for label, fields in aggc_optax.group_stats(gathered(state)).items():
                for field, value in fields.items():
                    out[f"spmd/{t}/stat/{label}/{field}"] = np.asarray(value)

    # 2. shard_map with an explicit cross-host psum.
    flat_mesh = jax.make_mesh((4,), ("d",))
    tx_axis = make_aggc("raise", axis_name="d")
    local_step = jax.jit(
        jax.shard_map(
            lambda g, s: tx_axis.update(g, s),
            mesh=flat_mesh,
            in_specs=(P("d"), P()),
            out_specs=(P("d"), P()),
        )
    )
    state = jax.device_put(tx_axis.init(grads[0]), NamedSharding(flat_mesh, P()))
    for t, g in enumerate(grads):
        upd, state = local_step(global_arrays(g, dict.fromkeys(g, P("d")), flat_mesh), state)
        for name, x in gathered(upd).items():
            out[f"shard_map/{t}/upd/{name}"] = x
        for label, fields in aggc_optax.group_stats(gathered(state)).items():
            for field, value in fields.items():
                out[f"shard_map/{t}/stat/{label}/{field}"] = np.asarray(value)

    # 3. docs/reference-behaviour.md §8 with two ranks: one device of each process.
    ranks = [
        min((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id) for p in (0, 1)
    ]
    rank_mesh = jax.make_mesh((2,), ("d",), devices=ranks)
    shards = {"model.layers.0.self_attn.q_proj.weight": np.array([[3.0, 4.0], [0.0, 0.0]])}
    shards = {k: v.astype(np.float32) for k, v in shards.items()}
    for reduction in ("mean", "sum"):
        tx_sync = aggc_optax.from_reference_options(
            {"enable": True, "auto_bounds": True, "sync_dist": reduction == "mean"}, axis_name="d"
        )
        sync_step = jax.jit(
            jax.shard_map(
                lambda g, s, tx_sync=tx_sync: tx_sync.update(g, s),
                mesh=rank_mesh,
                in_specs=(P("d"), P()),
                out_specs=(P("d"), P()),
            )
        )
        state = jax.device_put(tx_sync.init(shards), NamedSharding(rank_mesh, P()))
        _, state = sync_step(global_arrays(shards, dict.fromkeys(shards, P("d")), rank_mesh), state)
        out[f"sync/{reduction}"] = np.asarray(gathered(state.norm))

    np.savez(out_path, **out)
    print(f"process {process_id}: wrote {len(out)} arrays", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
