"""Find a spike regime with AdamW alone: a grid of (peak lr, beta2, lr floor) x seeds, no clipping.

The regime search behind ``docs/spikes.md``: every (rate, beta2, seed) run trains
together under ``jax.vmap`` (AdamW only, so one program), on the stdlib corpus, with
the model and schedule of ``spikes.py``; it prints, per setting, the spike count of
each seed under the study's spike definition (``spikes.find_spikes``) and writes
``search.json``. No clipper runs here: the study's protocol is fixed from this output.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from progress import Progress
from spikes import find_spikes, probe_tokens, warmup_cosine
from text_corpus import VOCAB_SIZE, load_corpus, window_starts, windows
from train_lm import LlamaForCausalLM, ModelConfig, token_losses


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="1e-2,2e-2,4e-2")
    p.add_argument("--b2s", default="0.999")
    p.add_argument(
        "--floors", default="0.1", help="final lr as a fraction of the peak (1.0: no decay)"
    )
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp-dim", type=int, default=172)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--probe-windows", type=int, default=32)
    p.add_argument("--out", default="runs/spike_search")
    a = p.parse_args(argv)
    rates = [float(x) for x in a.rates.split(",")]
    b2s = [float(x) for x in a.b2s.split(",")]
    floors = [float(x) for x in a.floors.split(",")]
    seeds = [int(x) for x in a.seeds.split(",")]
    grid = list(itertools.product(rates, b2s, floors, seeds))
    cfg = ModelConfig(VOCAB_SIZE, a.d_model, a.layers, a.heads, a.mlp_dim)
    corpus = load_corpus(None)
    built = {
        s: nnx.split(nnx.jit(lambda s=s: LlamaForCausalLM(cfg, nnx.Rngs(s)))(), nnx.Param)
        for s in seeds
    }
    graphdef = built[seeds[0]][0]
    n_params = sum(int(x.size) for x in jax.tree_util.tree_leaves(built[seeds[0]][1]))
    print(f"{n_params:,} parameters; {len(grid)} runs", flush=True)
    params = jax.tree.map(lambda *xs: jnp.stack(xs), *[built[s][1] for *_, s in grid])

    def loss_fn(p: Any, tokens: jax.Array) -> jax.Array:
        return jnp.mean(token_losses(nnx.merge(graphdef, p), tokens))

    def one(p, state, tokens, lr, b2, floor, probe):
        mu, nu, count = state
        probe_loss = loss_fn(p, probe)  # the weights before this step's update
        loss, g = jax.value_and_grad(loss_fn)(p, tokens)
        gnorm = optax.global_norm(g)
        mu = jax.tree.map(lambda m, x: 0.9 * m + 0.1 * x, mu, g)
        nu = jax.tree.map(lambda v, x: b2 * v + (1 - b2) * x * x, nu, g)
        t = (count + 1).astype(jnp.float32)
        c1, c2 = 1 - 0.9**t, 1 - b2**t
        step = lr * warmup_cosine(count, a.steps, a.warmup, floor)
        p = jax.tree.map(
            lambda w, m, v: w - step * ((m / c1) / (jnp.sqrt(v / c2) + 1e-8) + a.weight_decay * w),
            p,
            mu,
            nu,
        )
        return p, (mu, nu, count + 1), loss, gnorm, probe_loss

    step_fn = jax.jit(jax.vmap(one, in_axes=(0, 0, 0, 0, 0, 0, None)), donate_argnums=(0, 1))
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = (zeros, jax.tree.map(jnp.zeros_like, params), jnp.zeros(len(grid), jnp.int32))
    lrs = jnp.asarray([r for r, _, _, _ in grid], jnp.float32)
    b2v = jnp.asarray([b for _, b, _, _ in grid], jnp.float32)
    floorv = jnp.asarray([f for _, _, f, _ in grid], jnp.float32)
    length = a.seq_len + 1
    rngs = {s: np.random.default_rng(10_000 + s) for s in seeds}
    probe = jnp.asarray(probe_tokens(corpus.heldout, a.seq_len, a.probe_windows))
    losses, norms, probes = [], [], []
    bar = Progress(a.steps, "search")
    t0 = time.perf_counter()
    for _ in range(a.steps):
        # other batches than the study's (seed 20_000 + s there): the search does not
        # pick a regime on the study's own data
        by_seed = {
            s: windows(
                corpus.train, window_starts(corpus.train, a.batch_size, length, rngs[s]), length
            )
            for s in seeds
        }
        tokens = jnp.asarray(np.stack([by_seed[s] for *_, s in grid]))
        params, state, loss, gn, pl = step_fn(params, state, tokens, lrs, b2v, floorv, probe)
        losses.append(loss)
        norms.append(gn)
        probes.append(pl)
        bar.update(1, f"median loss {float(jnp.median(loss)):.3f}")
    bar.close()
    loss = np.asarray(jax.device_get(losses)).T
    gn = np.asarray(jax.device_get(norms)).T
    probe_loss = np.asarray(jax.device_get(probes)).T
    os.makedirs(a.out, exist_ok=True)
    rec = {
        "args": vars(a),
        "grid": grid,
        "loss": loss.round(5).tolist(),
        "gnorm": gn.round(5).tolist(),
        "probe_loss": probe_loss.round(5).tolist(),
        "seconds": time.perf_counter() - t0,
        "num_params": n_params,
    }
    with open(os.path.join(a.out, "search.json"), "w") as f:
        json.dump(rec, f)
    for i, (lr, b2, floor, s) in enumerate(grid):
        x = loss[i]
        spikes = find_spikes(probe_loss[i])
        print(
            f"lr {lr:g} b2 {b2:g} floor {floor:g} seed {s}: {len(spikes['onsets'])} spikes at "
            f"{spikes['onsets']} (lost {sum(spikes['lost'])} steps); final train loss "
            f"{np.mean(x[-20:]):.3f}; global norm > 1 on "
            f"{100 * np.mean(gn[i, a.warmup :] > 1):.0f}% of post-warm-up steps, "
            f"95th percentile {np.percentile(gn[i, a.warmup :], 95):.3g}"
        )
    return rec


if __name__ == "__main__":
    main()
