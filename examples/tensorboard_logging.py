"""Logging AGGC to TensorBoard: a Flax NNX training loop with ``aggc_optax.metrics``.

The three lines a training loop needs::

    writer = tensorboardX.SummaryWriter(logdir)
    for key, value in aggc_optax.metrics(optimizer.opt_state).items():
        writer.add_scalar(key, value, step)

``metrics`` returns a flat ``{"aggc/q_proj/norm": float, ...}`` dict (per group
norm, scale, bounds, EMA, clipped/raised flags and counts; global norms before
and after AGGC; the fraction of groups clipped), fetched from the device in one
transfer, so any logger that takes scalars works the same way (W&B:
``wandb.log(aggc_optax.metrics(optimizer.opt_state), step=step)``).

The model is a small two-block MLP with ``q_proj``/``v_proj``-style names on a
random regression task; at step ``--spike-step`` the targets are scaled by 100,
so the dashboard shows a clipped step.

Run: ``python examples/tensorboard_logging.py --logdir runs/tb`` then
``tensorboard --logdir runs/tb``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
import tensorboardX
from flax import nnx

import aggc_optax


class Block(nnx.Module):
    def __init__(self, width: int, rngs: nnx.Rngs):
        self.up_proj = nnx.Linear(width, 2 * width, rngs=rngs)
        self.down_proj = nnx.Linear(2 * width, width, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.down_proj(nnx.relu(self.up_proj(x)))


class Model(nnx.Module):
    def __init__(self, width: int, rngs: nnx.Rngs):
        self.layers = nnx.List([Block(width, rngs) for _ in range(2)])
        self.lm_head = nnx.Linear(width, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.layers:
            x = block(x)
        return self.lm_head(x)[:, 0]


@nnx.jit
def train_step(model: Model, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
    def loss_fn(model: Model) -> jax.Array:
        return jnp.mean((model(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def main(argv: Sequence[str] | None = None) -> list[dict[str, float]]:
    """Trains and logs; returns what was logged at every step (for the tests)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--logdir", default="runs/tensorboard", help="event file directory")
    p.add_argument("--steps", type=int, default=50, help="training steps (50)")
    p.add_argument("--spike-step", type=int, default=20, help="step with x100 targets (20)")
    args = p.parse_args(argv)

    model = Model(8, nnx.Rngs(0))
    # group by module role across blocks: every block's up_proj in one group
    tx = optax.chain(aggc_optax.aggc(param_labels=aggc_optax.module_labels), optax.adam(1e-2))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    key = jax.random.key(1)
    writer = tensorboardX.SummaryWriter(args.logdir)
    logged = []
    for step in range(args.steps):
        key, kx = jax.random.split(key)
        x = jax.random.normal(kx, (32, 8))
        y = jnp.sin(x.sum(axis=1)) * (100.0 if step == args.spike_step else 1.0)
        loss = train_step(model, optimizer, x, y)
        scalars = {"loss": float(loss), **aggc_optax.metrics(optimizer.opt_state)}
        for name, value in scalars.items():
            writer.add_scalar(name, value, step)
        logged.append(scalars)
    writer.close()
    last = logged[-1]
    print(
        f"{args.steps} steps logged to {args.logdir}: {len(last)} scalars per step; "
        f"final loss {last['loss']:.4f}"
    )
    return logged


if __name__ == "__main__":
    main()
