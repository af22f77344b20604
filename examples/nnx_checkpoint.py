"""Checkpointing an NNX model and its AGGC optimizer with Orbax, and resuming bit-identically.

1. Trains a small NNX model with ``nnx.Optimizer(model, optax.chain(aggc, adamw))``
   for ``--steps`` steps and saves ``nnx.state(model)`` and ``nnx.state(optimizer)``
   with ``orbax.checkpoint.StandardCheckpointer``.
2. Takes one more step: the reference.
3. Builds a fresh model and optimizer (other initial weights), restores the
   checkpoint into them (the fresh states are the restore target, so the AGGC
   state's static group labels come from the target), reads the restored AGGC
   statistics, and takes the same step.
4. Checks that the parameters and the whole optimizer state after that step are
   bit-identical to the reference.

Run: ``python examples/nnx_checkpoint.py [--steps N] [--dir DIR]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

import aggc_optax


class Model(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.q_proj = nnx.Linear(8, 16, rngs=rngs)
        self.v_proj = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.v_proj(nnx.relu(self.q_proj(x)))[:, 0]


def build(seed: int) -> tuple[Model, nnx.Optimizer]:
    model = Model(nnx.Rngs(seed))
    tx = optax.chain(
        aggc_optax.aggc(param_labels=lambda name: name.split(".")[0]), optax.adamw(1e-2)
    )
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def train_step(model: Model, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
    def loss_fn(model: Model) -> jax.Array:
        return jnp.mean((model(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def batch(step: int) -> tuple[jax.Array, jax.Array]:
    x = jax.random.normal(jax.random.key(step), (32, 8))
    return x, jnp.sin(x.sum(axis=1))


def _bits(tree: object) -> list[bytes]:
    return [np.asarray(leaf).tobytes() for leaf in jax.tree_util.tree_leaves(tree)]


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="steps before the checkpoint (10)")
    p.add_argument("--dir", default=None, help="checkpoint directory (a temporary one)")
    args = p.parse_args(argv)
    root = os.path.abspath(args.dir or tempfile.mkdtemp(prefix="nnx_checkpoint_"))
    path = os.path.join(root, f"step_{args.steps}")

    model, optimizer = build(seed=0)
    for step in range(args.steps):
        loss = train_step(model, optimizer, *batch(step))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, {"model": nnx.state(model), "optimizer": nnx.state(optimizer)})
    checkpointer.wait_until_finished()
    print(f"saved step {args.steps} (loss {float(loss):.4f}) to {path}", flush=True)

    train_step(model, optimizer, *batch(args.steps))  # the reference step

    fresh_model, fresh_optimizer = build(seed=1)
    target = {"model": nnx.state(fresh_model), "optimizer": nnx.state(fresh_optimizer)}
    restored = checkpointer.restore(path, target)
    checkpointer.close()
    # nnx.state does not keep AGGC's static group labels: take them from the optimizer
    stats = aggc_optax.group_stats(restored["optimizer"], labels=fresh_optimizer.opt_state)
    print(
        "restored AGGC EMAs: "
        + ", ".join(f"{label} {float(s['ema']):.4f}" for label, s in stats.items()),
        flush=True,
    )
    nnx.update(fresh_model, restored["model"])
    nnx.update(fresh_optimizer, restored["optimizer"])
    train_step(fresh_model, fresh_optimizer, *batch(args.steps))

    same_params = _bits(nnx.state(model)) == _bits(nnx.state(fresh_model))
    same_state = _bits(nnx.state(optimizer)) == _bits(nnx.state(fresh_optimizer))
    print(
        f"step {args.steps + 1} after the restore: parameters "
        f"{'bit-identical' if same_params else 'DIFFER'}, optimizer state "
        f"{'bit-identical' if same_state else 'DIFFERS'}"
    )
    if not (same_params and same_state):
        raise SystemExit("nnx_checkpoint: the resumed step differs from the uninterrupted one")
    return {"path": path, "same_params": same_params, "same_state": same_state, "stats": stats}


if __name__ == "__main__":
    main()
