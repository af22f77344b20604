"""AGGC in a Flax Linen training loop, through ``optax.chain``.

A small gated-MLP regressor (Linen) learns a random teacher network. Its
submodules are named like a transformer's MLP (``up_proj``, ``gate_proj``,
``down_proj``), so the reference's labels give one group per module type
across all blocks. AGGC sits in front of Adam in an ``optax.chain``; the loop
prints the loss and, every few steps, each group's norm, bounds and scale.

Run: ``python examples/linen_example.py [--steps N]``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

import aggc_optax


class Block(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.LayerNorm(name="input_layernorm")(x)
        gate = nn.Dense(self.hidden, name="gate_proj")(h)
        up = nn.Dense(self.hidden, name="up_proj")(h)
        return x + nn.Dense(x.shape[-1], name="down_proj")(nn.silu(gate) * up)


class Regressor(nn.Module):
    width: int = 32
    hidden: int = 64
    num_blocks: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.width, name="in_proj")(x)
        for i in range(self.num_blocks):
            x = Block(self.hidden, name=f"layers_{i}")(x)
        return nn.Dense(1, name="head")(x)[..., 0]


def make_data(seed: int, n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and the outputs of a fixed random two-layer teacher (plus a little noise)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    w1, w2 = rng.normal(size=(dim, 16)) / np.sqrt(dim), rng.normal(size=16) / 4.0
    y = np.tanh(x @ w1) @ w2
    y = y / y.std() + 0.05 * rng.normal(size=n)
    return x, y.astype(np.float32)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--print-every", type=int, default=100)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")

    x, y = make_data(0, 4096, dim=8)
    model = Regressor()
    # Under jit: run eagerly, initialisation compiles one random op per shape.
    params = jax.jit(model.init)(jax.random.key(1), x[:1])

    # See the groups before training: Linen paths are "params.layers_0.up_proj.kernel".
    info = aggc_optax.describe_groups(params)
    for label, entry in info["groups"].items():
        print(f"group {label:<16} {entry['num_params']:>6} params  {entry['leaves']}")

    tx = optax.chain(aggc_optax.aggc(), optax.adam(args.lr))
    opt_state = tx.init(params)

    def loss_fn(p: optax.Params, xb: jax.Array, yb: jax.Array) -> jax.Array:
        return jnp.mean((model.apply(p, xb) - yb) ** 2)

    @jax.jit
    def step(p: optax.Params, s: optax.OptState, xb: jax.Array, yb: jax.Array):
        loss, grads = jax.value_and_grad(loss_fn)(p, xb, yb)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    evaluate = jax.jit(loss_fn)
    first = float(evaluate(params, x, y))
    batches = np.random.default_rng(0).integers(0, x.shape[0], (args.steps, args.batch_size))
    for t in range(args.steps):
        params, opt_state, loss = step(params, opt_state, x[batches[t]], y[batches[t]])
        if (t + 1) % args.print_every == 0 or t + 1 == args.steps:
            stats = aggc_optax.group_stats(opt_state)
            print(f"step {t + 1:>4}  batch loss {float(loss):.4f}")
            for label, s in stats.items():
                print(
                    f"    {label:<16} norm {float(s['norm']):.3e}  "
                    f"[L {float(s['lower']):.3e}, U {float(s['upper']):.3e}]  "
                    f"scale {float(s['scale']):.3f}  clipped {int(s['clip_down_count'])}x"
                )
    last = float(evaluate(params, x, y))
    print(f"mean squared error on all data: {first:.4f} -> {last:.4f}")
    return {"first_loss": first, "last_loss": last}


if __name__ == "__main__":
    main()
