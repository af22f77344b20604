"""LoRA fine-tuning with AGGC: only the adapters train, grouped by the projection they adapt.

1. Pretrains the small LLaMA-style model of ``train_lm.py`` on addition and
   subtraction word problems (plain AdamW).
2. Wraps every projection (``q_proj k_proj v_proj o_proj gate_proj up_proj
   down_proj``) in a low-rank adapter (``flax.nnx.LoRA``; the adapter matrices
   start at zero change) and fine-tunes on multiplication problems, which the
   base model never saw.

The optimizer is ``optax.partition``: the adapters get ``optax.chain(aggc,
adamw)``, every other weight gets ``optax.set_to_zero()``, so the base model is
left exactly as it was. AGGC labels come from ``aggc_optax.lora_label`` (the
LoRA script's rule, docs/reference-behaviour.md §10): the adapters of all layers are grouped by
the projection they adapt (every layer's ``q_proj`` adapter in group
``q_proj``), and nothing else is counted or clipped.

Run: ``python examples/lora_example.py [--steps N] [--pretrain-steps N] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import aggc_optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_lm  # the model and the data of the main example
from progress import Progress

PROJECTIONS = {
    "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}


def add_lora(model: train_lm.LlamaForCausalLM, rank: int, rngs: nnx.Rngs) -> None:
    """Wrap each projection of each layer in ``nnx.LoRA`` (base weights kept as they are)."""
    for layer in model.model.layers:
        for block_name, names in PROJECTIONS.items():
            block = getattr(layer, block_name)
            for name in names:
                base = getattr(block, name)
                d_in, d_out = base.kernel.shape
                setattr(block, name, nnx.LoRA(d_in, rank, d_out, base_module=base, rngs=rngs))


def make_step(graphdef: Any, tx: optax.GradientTransformation) -> Callable[..., Any]:
    def loss_fn(params: Any, tokens: jax.Array) -> jax.Array:
        return jnp.mean(train_lm.token_losses(nnx.merge(graphdef, params), tokens))

    @jax.jit
    def step(params: Any, opt_state: Any, tokens: jax.Array) -> Any:
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def make_loss(graphdef: Any) -> Callable[..., Any]:
    @jax.jit
    def loss(params: Any, tokens: jax.Array) -> jax.Array:
        return jnp.mean(train_lm.token_losses(nnx.merge(graphdef, params), tokens))

    return loss


def batches(kinds: Sequence[str], args: argparse.Namespace, seed: int) -> Any:
    corpus, _ = train_lm.make_corpus(args.problems, seed=seed, kinds=kinds)
    rng = np.random.default_rng(seed)
    while True:
        yield jnp.asarray(
            corpus[train_lm.sample_windows(corpus, args.batch_size, args.seq_len + 1, rng)]
        )


def _status(t: int, total: int, loss: jax.Array) -> str:
    # reading the loss waits for the device: only every 10th step and the last
    return f"loss {float(loss):.3f}" if (t + 1) % 10 == 0 or t + 1 == total else ""


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--pretrain-steps",
        type=int,
        default=200,
        help="AdamW steps of base-model pretraining on addition and subtraction problems",
    )
    parser.add_argument(
        "--steps", type=int, default=200, help="LoRA fine-tuning steps on multiplication"
    )
    parser.add_argument("--rank", type=int, default=4, help="rank of every LoRA adapter")
    parser.add_argument("--lr", type=float, default=1e-2, help="adapters' learning rate")
    parser.add_argument(
        "--batch-size", type=int, default=16, help="sequences per step (both phases)"
    )
    parser.add_argument(
        "--seq-len", type=int, default=64, help="tokens (bytes) per training sequence"
    )
    parser.add_argument("--d-model", type=int, default=64, help="the model's width")
    parser.add_argument("--layers", type=int, default=2, help="the model's decoder layers")
    parser.add_argument(
        "--problems",
        type=int,
        default=5000,
        help="word problems generated for each phase's corpus",
    )
    parser.add_argument("--out", default=None, help="if given, write per_module_clip.csv here")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    for flag in ("pretrain_steps", "steps", "rank"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")

    cfg = train_lm.ModelConfig(d_model=args.d_model, num_layers=args.layers, mlp_dim=64 * 2)
    model = nnx.jit(lambda: train_lm.LlamaForCausalLM(cfg, nnx.Rngs(0)))()

    # 1. Pretraining on addition and subtraction: every weight trains.
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adamw(3e-3)
    step, opt_state = make_step(graphdef, tx), tx.init(params)
    data = batches(("add", "sub"), args, seed=1)
    progress = Progress(args.pretrain_steps, "pretraining", quiet=args.quiet, lines=5)
    for t in range(args.pretrain_steps):
        params, opt_state, loss = step(params, opt_state, next(data))
        progress.update(1, _status(t, args.pretrain_steps, loss))
    progress.close()
    print(f"pretrained on add/sub for {args.pretrain_steps} steps, loss {float(loss):.3f}")
    nnx.update(model, params)

    # 2. LoRA on multiplication: only the adapters train.
    add_lora(model, args.rank, nnx.Rngs(1))
    graphdef, params = nnx.split(model, nnx.Param)
    info = aggc_optax.describe_groups(params, aggc_optax.lora_label)
    print("AGGC groups (lora_label): adapters grouped by the projection they adapt")
    for label, entry in info["groups"].items():
        print(
            f"  {label:<10} {len(entry['leaves'])} adapter matrices, {entry['num_params']} params"
        )
    n = len(info["unlabelled"])
    print(f"  left out (frozen, never clipped): {n} {'leaf' if n == 1 else 'leaves'}")

    def role(path: Any, _: Any) -> str:
        return "adapter" if aggc_optax.lora_label(aggc_optax.path_name(path)) else "frozen"

    roles = jax.tree_util.tree_map_with_path(role, params)
    schedule = optax.cosine_decay_schedule(args.lr, args.steps, alpha=0.1)
    tx = optax.partition(
        {
            "adapter": optax.chain(
                aggc_optax.aggc(param_labels=aggc_optax.lora_label),
                optax.adamw(schedule, weight_decay=0.0),
            ),
            "frozen": optax.set_to_zero(),
        },
        roles,
    )
    step, opt_state = make_step(graphdef, tx), tx.init(params)
    evaluate = make_loss(graphdef)
    held_out = next(batches(("mul",), argparse.Namespace(**{**vars(args), "batch_size": 64}), 7))
    before = float(evaluate(params, held_out))
    frozen_before = [
        np.asarray(x)
        for x, r in zip(jax.tree.leaves(params), jax.tree.leaves(roles))
        if r == "frozen"
    ]

    logger = None
    if args.out:
        logger = aggc_optax.CSVLogger(os.path.join(args.out, "per_module_clip.csv"))
    data = batches(("mul",), args, seed=2)
    progress = Progress(args.steps, "LoRA fine-tuning", quiet=args.quiet, lines=5)
    for t in range(args.steps):
        params, opt_state, loss = step(params, opt_state, next(data))
        if logger is not None:
            logger.log(opt_state, t)
        progress.update(1, _status(t, args.steps, loss))
    progress.close()
    if logger is not None:
        logger.close()
    after = float(evaluate(params, held_out))

    frozen_after = [
        np.asarray(x)
        for x, r in zip(jax.tree.leaves(params), jax.tree.leaves(roles))
        if r == "frozen"
    ]
    frozen_change = max(float(np.max(np.abs(a - b))) for a, b in zip(frozen_after, frozen_before))
    stats = aggc_optax.group_stats(opt_state)
    trainable = sum(e["num_params"] for e in info["groups"].values())
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    print(f"trainable: {trainable} of {total} parameters")
    print(
        "AGGC after fine-tuning (clip-downs per group): "
        + ", ".join(f"{k} {int(v['clip_down_count'])}" for k, v in stats.items())
    )
    print(f"held-out loss on multiplication problems: {before:.4f} -> {after:.4f}")
    print(f"largest change of a frozen weight: {frozen_change}")
    return {"loss_before": before, "loss_after": after, "frozen_change": frozen_change}


if __name__ == "__main__":
    main()
