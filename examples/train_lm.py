"""AGGC at work: a small LLaMA-style model trained three ways, side by side.

Trains a character-level LLaMA-style decoder (Flax NNX) on arithmetic word
problems generated in this script (no download), with the same data and the
same initial weights under three optimizers:

* ``adamw``: AdamW, no clipping;
* ``global_clip``: global-norm clipping, then AdamW;
* ``aggc``: AGGC (the authors' LoRA SFT recipe, its bounds schedule included),
  then AdamW.

By default a burst of faulty gradients hits one module type (every layer's
``v_proj`` gradient is multiplied by 100 on steps 10%-20% of the run; see
``--fault-group``, ``--fault-scale``, ``--fault-steps``), so the spill-over of
global clipping is visible: it shrinks *every* group's gradient to make room
for the faulty one, while AGGC rescales each group against its own history.

Writes to ``--out`` (default ``runs/train_lm``): ``loss.png``, ``group_norms.png``
(per-group gradient norm before and after AGGC, with its bounds),
``clip_scales.png`` (the factor each group's gradient was multiplied by, global
clipping versus AGGC), ``per_module_clip.csv`` (the AGGC run in the reference
clipper's format), ``group_norms.csv`` (every run's per-group norms),
``losses.csv`` and ``summary.md``.

Run ``python examples/train_lm.py --help`` for the flags.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import aggc_optax
from aggc_optax.cli import add_aggc_arguments, aggc_from_args

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from progress import Progress

# ---------------------------------------------------------------------------
# Data: arithmetic word problems, character level.
# ---------------------------------------------------------------------------

NAMES = ("Ann", "Ben", "Cal", "Dee", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lou")
ITEMS = ("apple", "pen", "cup", "book", "coin", "egg", "kite", "shell")
KINDS = ("add", "sub", "mul")
VOCAB = "\n .?+-*=" + "0123456789" + "abcdefghijklmnopqrstuvwxyz" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
CHAR_ID = {c: i for i, c in enumerate(VOCAB)}


def make_problem(rng: np.random.Generator, kind: str) -> tuple[str, int]:
    """One word problem and the index where its answer starts (after ``=``)."""
    name = NAMES[rng.integers(len(NAMES))]
    item = ITEMS[rng.integers(len(ITEMS))]
    if kind == "add":
        a, b = (int(x) for x in rng.integers(1, 50, size=2))
        text = f"{name} has {a} {item}s and gets {b} more. How many now? {a}+{b}={a + b}.\n"
    elif kind == "sub":
        a, b = sorted((int(x) for x in rng.integers(1, 60, size=2)), reverse=True)
        text = f"{name} has {a} {item}s and gives {b} away. How many left? {a}-{b}={a - b}.\n"
    elif kind == "mul":
        a, b = int(rng.integers(2, 10)), int(rng.integers(2, 13))
        text = f"{name} buys {a} bags of {b} {item}s. How many in all? {a}*{b}={a * b}.\n"
    else:
        raise ValueError(f"unknown problem kind {kind!r}; allowed: {KINDS}")
    return text, text.index("=") + 1


def make_corpus(
    num_problems: int, seed: int, kinds: Sequence[str] = KINDS
) -> tuple[np.ndarray, np.ndarray]:
    """A stream of problems as token ids, and a mask of the answer characters."""
    rng = np.random.default_rng(seed)
    ids, answer = [], []
    for _ in range(num_problems):
        text, start = make_problem(rng, kinds[rng.integers(len(kinds))])
        ids.extend(CHAR_ID[c] for c in text)
        end = len(text) - 2  # the answer's digits end before ".\n"
        answer.extend(start <= i < end for i in range(len(text)))
    return np.asarray(ids, np.int32), np.asarray(answer, bool)


def sample_windows(
    corpus: np.ndarray, num: int, length: int, rng: np.random.Generator
) -> np.ndarray:
    """``num`` random windows of ``length`` consecutive positions (start indices)."""
    starts = rng.integers(0, len(corpus) - length, size=num)
    return starts[:, None] + np.arange(length)[None, :]


# ---------------------------------------------------------------------------
# Model: a LLaMA-style decoder whose parameter names give the paper's groups.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = len(VOCAB)
    d_model: int = 96
    num_layers: int = 3
    num_heads: int = 4
    mlp_dim: int = 256
    rope_base: float = 10000.0


def _dense(d_in: int, d_out: int, rngs: nnx.Rngs, scale: float = 1.0) -> nnx.Linear:
    init = nnx.initializers.normal(scale / math.sqrt(d_in))
    return nnx.Linear(d_in, d_out, use_bias=False, kernel_init=init, rngs=rngs)


def _rope(x: jax.Array, base: float) -> jax.Array:
    # Rotary position embedding on [batch, time, heads, head_dim].
    t, half = x.shape[1], x.shape[-1] // 2
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = jnp.arange(t, dtype=jnp.float32)[:, None] * freqs[None, :]
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d = cfg.d_model
        self.num_heads, self.rope_base = cfg.num_heads, cfg.rope_base
        self.q_proj = _dense(d, d, rngs)
        self.k_proj = _dense(d, d, rngs)
        self.v_proj = _dense(d, d, rngs)
        self.o_proj = _dense(d, d, rngs, scale=1.0 / math.sqrt(2 * cfg.num_layers))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        h = self.num_heads

        def heads(y: jax.Array) -> jax.Array:
            return y.reshape(b, t, h, d // h)

        q = _rope(heads(self.q_proj(x)), self.rope_base)
        k = _rope(heads(self.k_proj(x)), self.rope_base)
        v = heads(self.v_proj(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // h)
        causal = jnp.tril(jnp.ones((t, t), bool))
        weights = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
        return self.o_proj(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d))


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.gate_proj = _dense(cfg.d_model, cfg.mlp_dim, rngs)
        self.up_proj = _dense(cfg.d_model, cfg.mlp_dim, rngs)
        self.down_proj = _dense(
            cfg.mlp_dim, cfg.d_model, rngs, scale=1.0 / math.sqrt(2 * cfg.num_layers)
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.input_layernorm = nnx.RMSNorm(cfg.d_model, rngs=rngs)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = nnx.RMSNorm(cfg.d_model, rngs=rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        init = nnx.initializers.normal(1.0)
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.d_model, embedding_init=init, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_layers)])
        self.norm = nnx.RMSNorm(cfg.d_model, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class LlamaForCausalLM(nnx.Module):
    """Parameter paths mirror Hugging Face's: ``model.layers.0.self_attn.q_proj.kernel``."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.model = LlamaModel(cfg, rngs)
        self.lm_head = _dense(cfg.d_model, cfg.vocab_size, rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.lm_head(self.model(tokens))


def token_losses(model: nnx.Module, tokens: jax.Array) -> jax.Array:
    """Next-token cross-entropy at every position of ``tokens[:, :-1]``."""
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])


# ---------------------------------------------------------------------------
# Optimizers.
# ---------------------------------------------------------------------------

RUNS = ("adamw", "global_clip", "aggc")


def build_aggc(args: argparse.Namespace, total_steps: int) -> optax.GradientTransformation:
    """The AGGC transformation of the ``aggc`` run, from the parsed flags.

    With no AGGC flag: the authors' LoRA SFT recipe (docs/reference-behaviour.md §9) with its
    linear ramp of the multipliers (0.95 -> 0.98 and 0.6 -> 0.7, starting at
    40% of the run, over 30% of it), and ``aggc()``'s safe ``nonfinite="skip"``
    policy. The flags of :mod:`aggc_optax.cli` switch on every variant
    (``--ema-init first``, ``--variant paper``, ``--ema-init bias_corrected``,
    ``--group-hparams``, ``--multiplier-schedule``, ``--aggc-preset``, ...).
    """
    return aggc_from_args(args, total_steps)


def build_clipper(run: str, args: argparse.Namespace) -> optax.GradientTransformation:
    if run == "adamw":
        return optax.identity()
    if run == "global_clip":
        return optax.clip_by_global_norm(args.clip_norm)
    return build_aggc(args, args.steps)


def build_adamw(args: argparse.Namespace) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        args.lr,
        warmup_steps=max(1, args.steps // 20),
        decay_steps=args.steps,
        end_value=args.lr * 0.1,
    )
    return optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=args.weight_decay)


# ---------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------


def group_ids(params: Any, labels: Sequence[str]) -> list[int]:
    """Per leaf (flattening order), the index of its group in ``labels``, or -1."""
    info = aggc_optax.describe_groups(params)
    group_of = {
        leaf: labels.index(label)
        for label, entry in info["groups"].items()
        for leaf in entry["leaves"]
    }
    names = [aggc_optax.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return [group_of.get(name, -1) for name in names]


def group_factors(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """The factor each group's gradient norm was multiplied by (1 where the norm is 0)."""
    return np.where(before > 0, after / np.where(before > 0, before, 1.0), 1.0)


def group_norms(tree: Any, group_ids: Sequence[int], num_groups: int) -> jax.Array:
    squares, ids = [], []
    for leaf, gid in zip(jax.tree_util.tree_leaves(tree), group_ids):
        if gid >= 0:
            squares.append(jnp.sum(jnp.square(leaf.astype(jnp.float32))))
            ids.append(gid)
    sums = jax.ops.segment_sum(jnp.stack(squares), jnp.asarray(ids), num_segments=num_groups)
    return jnp.sqrt(sums)


def make_train_step(
    graphdef: Any,
    clipper: optax.GradientTransformation,
    adamw: optax.GradientTransformation,
    group_ids: Sequence[int],
    num_groups: int,
    fault_leaves: Sequence[bool],
) -> Callable[..., Any]:
    """A jitted step of ``optax.chain(clipper, adamw)`` that also reports group norms.

    The chain's state is the tuple ``(clipper_state, adamw_state)``; the step
    runs the two stages itself so it can measure each group's norm before and
    after clipping. ``fault`` multiplies the gradients of the leaves flagged in
    ``fault_leaves`` (1.0 outside the fault window).
    """

    def loss_fn(params: Any, tokens: jax.Array) -> jax.Array:
        return jnp.mean(token_losses(nnx.merge(graphdef, params), tokens))

    def step(params: Any, opt_state: Any, tokens: jax.Array, fault: jax.Array) -> Any:
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        leaves, treedef = jax.tree_util.tree_flatten(grads)
        leaves = [g * fault if hit else g for g, hit in zip(leaves, fault_leaves)]
        grads = jax.tree_util.tree_unflatten(treedef, leaves)
        clipped, clip_state = clipper.update(grads, opt_state[0], params)
        updates, adam_state = adamw.update(clipped, opt_state[1], params)
        params = optax.apply_updates(params, updates)
        before = group_norms(grads, group_ids, num_groups)
        after = group_norms(clipped, group_ids, num_groups)
        return params, (clip_state, adam_state), loss, before, after

    return jax.jit(step, donate_argnums=(0, 1))


def make_eval(graphdef: Any) -> Callable[..., Any]:
    @jax.jit
    def evaluate(params: Any, tokens: jax.Array, answer: jax.Array) -> Any:
        model = nnx.merge(graphdef, params)
        logits = model(tokens[:, :-1])
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        correct = jnp.argmax(logits, -1) == tokens[:, 1:]
        mask = answer[:, 1:]
        return (
            jnp.mean(losses),
            jnp.sum(jnp.where(mask, correct, False)) / jnp.maximum(jnp.sum(mask), 1),
        )

    return evaluate


def parse_fault_steps(text: str, total_steps: int) -> tuple[int, int] | None:
    """``"auto"``, ``"none"`` or ``"START:END"`` (END exclusive) -> a window or None."""
    if text == "none":
        return None
    if text == "auto":
        # Early, while the loss still falls fast, so lost progress shows in the curves.
        start = total_steps // 10
        return start, min(total_steps, start + max(2, total_steps // 10))
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise SystemExit(
            f"--fault-steps must be 'auto', 'none' or START:END (two integers), got {text!r}"
        ) from None
    if not 0 <= start < end:
        raise SystemExit(f"--fault-steps {text!r}: need 0 <= START < END")
    if start >= total_steps:
        raise SystemExit(f"--fault-steps {text!r}: START must be below --steps ({total_steps})")
    return start, min(end, total_steps)


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run the three optimizers side by side; return everything the reports need."""
    cfg = ModelConfig(
        d_model=args.d_model, num_layers=args.layers, num_heads=args.heads, mlp_dim=args.mlp_dim
    )
    # Built under jit: eager initialisation compiles one random op per shape.
    model = nnx.jit(lambda: LlamaForCausalLM(cfg, nnx.Rngs(args.seed)))()
    graphdef, params0 = nnx.split(model, nnx.Param)

    info = aggc_optax.describe_groups(params0)
    labels = list(info["groups"])
    leaf_groups = group_ids(params0, labels)
    if args.fault_group not in ("none", *labels):
        raise SystemExit(f"--fault-group {args.fault_group!r} is not a group; groups: {labels}")
    fault_leaves = [gid >= 0 and labels[gid] == args.fault_group for gid in leaf_groups]
    window = parse_fault_steps(args.fault_steps, args.steps) if args.fault_group != "none" else None

    corpus, _ = make_corpus(args.problems, seed=args.seed)
    eval_corpus, eval_answer = make_corpus(max(200, args.problems // 10), seed=args.seed + 1)
    data_rng = np.random.default_rng(args.seed)
    eval_idx = sample_windows(eval_corpus, args.eval_batch, args.seq_len + 1, data_rng)
    eval_tokens, eval_mask = jnp.asarray(eval_corpus[eval_idx]), jnp.asarray(eval_answer[eval_idx])

    adamw = build_adamw(args)
    evaluate = make_eval(graphdef)
    runs = {}
    print_groups(info)
    for name in RUNS:
        clipper = build_clipper(name, args)
        # Every run starts from its own copy of the same weights (the step donates them).
        params, opt_state = jax.jit(
            lambda p, c=clipper: (jax.tree.map(jnp.copy, p), (c.init(p), adamw.init(p)))
        )(params0)
        runs[name] = {
            "params": params,
            "opt_state": opt_state,
            "step": make_train_step(
                graphdef, clipper, adamw, leaf_groups, len(labels), fault_leaves
            ),
            "loss": [],
            "before": [],
            "after": [],
            "eval": [],
        }

    os.makedirs(args.out, exist_ok=True)
    logger = aggc_optax.CSVLogger(os.path.join(args.out, "per_module_clip.csv"))
    eval_every = max(1, args.steps // 20)
    bar = Progress(args.steps, "training", quiet=args.quiet)
    start_time = time.perf_counter()
    for step in range(args.steps):
        tokens = jnp.asarray(
            corpus[sample_windows(corpus, args.batch_size, args.seq_len + 1, data_rng)]
        )
        in_fault = window is not None and window[0] <= step < window[1]
        fault = jnp.float32(args.fault_scale if in_fault else 1.0)
        for name, run in runs.items():
            run["params"], run["opt_state"], loss, before, after = run["step"](
                run["params"], run["opt_state"], tokens, fault
            )
            run["loss"].append(loss)
            run["before"].append(before)
            run["after"].append(after)
            if name == "aggc":
                logger.log(run["opt_state"], step)
            if (step + 1) % eval_every == 0 or step + 1 == args.steps:
                run["eval"].append((step, *evaluate(run["params"], eval_tokens, eval_mask)))
        status = ""
        if (step + 1) % 10 == 0 or step + 1 == args.steps:
            status = " ".join(f"{name}={float(run['loss'][-1]):.3f}" for name, run in runs.items())
        bar.update(1, status)
    bar.close()
    logger.close()
    seconds = time.perf_counter() - start_time

    results = {}
    for name, run in runs.items():
        results[name] = {
            "loss": np.asarray(jax.device_get(run["loss"])),
            "before": np.asarray(jax.device_get(run["before"])),
            "after": np.asarray(jax.device_get(run["after"])),
            "eval": [(s, float(v), float(a)) for s, v, a in jax.device_get(run["eval"])],
            "opt_state": run["opt_state"],
        }
    return {
        "labels": labels,
        "info": info,
        "window": window,
        "results": results,
        "seconds": seconds,
        "num_params": sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params0)),
    }


# ---------------------------------------------------------------------------
# Reports.
# ---------------------------------------------------------------------------


def _smooth(x: np.ndarray, beta: float = 0.8) -> np.ndarray:
    # Bias-corrected EMA, so the curve starts at the first value.
    out, avg = np.empty_like(x), 0.0
    for i, v in enumerate(x):
        avg = beta * avg + (1 - beta) * v
        out[i] = avg / (1 - beta ** (i + 1))
    return out


def _shade(ax: Any, window: tuple[int, int] | None) -> None:
    if window is not None:
        ax.axvspan(window[0] - 0.5, window[1] - 0.5, color="0.5", alpha=0.2, lw=0)


def write_csvs(out: dict[str, Any], folder: str) -> None:
    """``group_norms.csv`` (every run, every group) and ``losses.csv``."""
    labels, results = out["labels"], out["results"]
    with open(os.path.join(folder, "group_norms.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "step", "module", "norm_before", "norm_after", "scale"])
        for run, r in results.items():
            for step in range(len(r["loss"])):
                for j, label in enumerate(labels):
                    # str() of a NumPy float32 is its shortest round-trip form.
                    b, a = r["before"][step, j], r["after"][step, j]
                    scale = a / b if b > 0 else np.float32(1.0)
                    w.writerow([run, step, label, str(b), str(a), str(scale)])
    with open(os.path.join(folder, "losses.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", *results])
        for step in range(len(results[RUNS[0]]["loss"])):
            w.writerow([step, *(str(r["loss"][step]) for r in results.values())])


RUN_COLORS = {"adamw": "#7f7f7f", "global_clip": "#1f77b4", "aggc": "#d62728"}
RUN_TITLES = {
    "adamw": "AdamW, no clipping",
    "global_clip": "AdamW + global-norm clip",
    "aggc": "AdamW + AGGC",
}


def plot_losses(out: dict[str, Any], path: str, fault_text: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_train, ax_eval = fig.subplots(1, 2)
    for run, r in out["results"].items():
        steps = np.arange(len(r["loss"]))
        # AdamW dashed and on top: it often lies right under the AGGC curve.
        style = {
            "color": RUN_COLORS[run],
            "ls": "--" if run == "adamw" else "-",
            "zorder": 3 if run == "adamw" else 2,
            "label": RUN_TITLES[run],
        }
        ax_train.plot(steps, r["loss"], color=style["color"], alpha=0.15, lw=0.7)
        ax_train.plot(steps, _smooth(r["loss"]), lw=1.6, **style)
        ev = np.asarray(r["eval"])
        ax_eval.plot(ev[:, 0] + 1, ev[:, 1], marker="o", ms=3, lw=1.4, **style)
    for ax, name in ((ax_train, "training loss (smoothed; raw faint)"), (ax_eval, "held-out loss")):
        _shade(ax, out["window"])
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3, lw=0.5)
    ax_train.legend()
    if out["window"] is not None:
        ax_eval.text(
            0.98,
            0.97,
            f"grey band: {fault_text}",
            transform=ax_eval.transAxes,
            ha="right",
            va="top",
            fontsize=8,
        )
    fig.suptitle("Character-level LM on arithmetic word problems: same data, same initial weights")
    fig.savefig(path, dpi=110)


def plot_group_norms(out: dict[str, Any], csv_path: str, path: str, fault_text: str) -> None:
    from aggc_optax.plotting import plot_group_norms as plot

    title = "AGGC run: gradient norm of each group before / after clipping, with its bounds"
    if out["window"] is not None:
        title += f"\n(grey band: {fault_text})"
    fig = plot(csv_path, title=title)
    for ax in fig.axes:
        _shade(ax, out["window"])
    fig.savefig(path, dpi=110)


def plot_clip_scales(out: dict[str, Any], path: str, fault_text: str) -> None:
    """The factor each group's gradient was multiplied by: global clip versus AGGC."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = out["labels"]
    ncols = 4
    nrows = math.ceil(len(labels) / ncols)
    fig = Figure(figsize=(3.6 * ncols, 2.3 * nrows + 1.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    for j, label in enumerate(labels):
        ax = axes[j // ncols][j % ncols]
        for run in ("global_clip", "aggc"):
            r = out["results"][run]
            before, after = r["before"][:, j], r["after"][:, j]
            scale = group_factors(before, after)
            ax.plot(scale, color=RUN_COLORS[run], lw=1.1, label=RUN_TITLES[run])
        _shade(ax, out["window"])
        ax.set_yscale("log")
        ax.set_title(label, fontsize=10)
        ax.tick_params(labelsize=8)
        ax.grid(True, which="both", alpha=0.3, lw=0.5)
        if j + ncols >= len(labels):
            ax.set_xlabel("step", fontsize=9)
    for j in range(len(labels), nrows * ncols):
        fig.delaxes(axes[j // ncols][j % ncols])
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=2)
    title = "Factor applied to each group's gradient (1 = untouched)"
    if out["window"] is not None:
        title += f"\ngrey band: {fault_text}. {fault_caption(out)}"
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def fault_factors(out: dict[str, Any], run: str) -> tuple[float, float]:
    """During the fault: the smallest factor on the faulty group, and on any other group."""
    labels, (start, end) = out["labels"], out["window"]
    r = out["results"][run]
    before, after = r["before"][start:end], r["after"][start:end]
    scale = group_factors(before, after)
    j = labels.index(out["fault_group"])
    others = np.delete(scale, j, axis=1)
    return float(scale[:, j].min()), float(others.min()) if others.size else 1.0


def fault_caption(out: dict[str, Any]) -> str:
    """What the run's own factors show during the fault, one clause per clipper."""
    parts = []
    for run in ("global_clip", "aggc"):
        faulty, others = fault_factors(out, run)
        name = RUN_TITLES[run].removeprefix("AdamW + ")
        if others >= 1 - 1e-6:
            parts.append(f"{name}: {out['fault_group']} x{faulty:.2g}, other groups untouched")
        else:
            parts.append(
                f"{name}: {out['fault_group']} x{faulty:.2g}, other groups down to x{others:.2g}"
            )
    return "; ".join(parts)


def summarize(out: dict[str, Any], args: argparse.Namespace, fault_text: str) -> str:
    """The Markdown summary: final losses, and per group how often each clipper acted."""
    results, labels, info = out["results"], out["labels"], out["info"]
    tail = max(1, args.steps // 10)
    lines = [
        "# AGGC demo: summary",
        "",
        f"LLaMA-style decoder, {out['num_params']:,} parameters ({args.layers} layers, "
        f"d_model {args.d_model}), character-level arithmetic word problems; "
        f"{args.steps} steps of {args.batch_size} x {args.seq_len} characters; same data and "
        f"initial weights for every run. Fault: {fault_text if out['window'] else 'none'}. "
        f"Training took {out['seconds']:.0f} s for the three runs.",
        "",
        "| run | "
        + (f"held-out loss after the fault (step {_after_fault(out)}) | " if out["window"] else "")
        + f"train loss (mean of last {tail} steps) | held-out loss | answer digits right |",
        "|---|---|---|---|" + ("---|" if out["window"] else ""),
    ]
    for run, r in results.items():
        _, eval_loss, acc = r["eval"][-1]
        cells = [RUN_TITLES[run]]
        if out["window"]:
            cells.append(f"{dict((s + 1, v) for s, v, _ in r['eval'])[_after_fault(out)]:.4f}")
        cells += [f"{np.mean(r['loss'][-tail:]):.4f}", f"{eval_loss:.4f}", f"{100 * acc:.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Held-out loss: next-character loss on problems not trained on; answer digits right: "
        "the share of answer digits (after `=`) the model predicts exactly, given the text "
        "before them (teacher forcing).",
    ]
    stats = aggc_optax.group_stats(results["aggc"]["opt_state"])
    glob = results["global_clip"]
    global_scale = glob["after"].sum(1) / np.maximum(glob["before"].sum(1), 1e-30)
    global_clipped = int(np.sum(global_scale < 1 - 1e-6))
    lines += [
        "",
        "Steps on which each group's gradient was rescaled (of "
        f"{args.steps}). Global clipping rescales all groups together.",
        "",
        "| group | parameters | AGGC: clipped down | AGGC: raised | global clip: clipped |",
        "|---|---|---|---|---|",
    ]
    for label in labels:
        lines.append(
            f"| {label} | {info['groups'][label]['num_params']:,} "
            f"| {int(stats[label]['clip_down_count'])} | {int(stats[label]['raise_count'])} "
            f"| {global_clipped} |"
        )
    if out["window"] is not None:
        start, end = out["window"]
        lines += [
            "",
            f"During the fault (steps {start}-{end - 1}), the mean factor applied to the "
            "other groups' gradients: global clip "
            f"{_mean_other_scale(glob, labels, out['fault_group'], start, end):.3g}, AGGC "
            f"{_mean_other_scale(results['aggc'], labels, out['fault_group'], start, end):.3g}"
            f" (1 = untouched). Smallest factors during the fault: {fault_caption(out)}.",
        ]
    if getattr(args, "aggc_changed", None):
        flags = ", ".join(f"{flag} {value}" for flag, value in args.aggc_changed.items())
        lines += ["", f"AGGC flags changed from the LoRA SFT recipe: {flags}."]
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "Note: the recipe's interval is inverted (alpha_low 0.95 > alpha_high 0.6) and its "
        "downward scale has a 0.9 floor, so AGGC multiplies a group by 0.9 on nearly every "
        "step on which its norm exceeds 0.6x its EMA, which is almost every step. AdamW is "
        "nearly invariant to such a steady factor, so the AGGC run tracks the unclipped run; "
        "the difference shows when one group leaves its own history.",
    ]
    return "\n".join(lines) + "\n"


def _after_fault(out: dict[str, Any]) -> int:
    """The first evaluation step at or after the end of the fault window."""
    evals = [s + 1 for s, _, _ in out["results"]["aggc"]["eval"]]
    return next((s for s in evals if s >= out["window"][1]), evals[-1])


def _mean_other_scale(
    r: dict[str, Any], labels: list[str], fault_group: str, a: int, b: int
) -> float:
    keep = [j for j, label in enumerate(labels) if label != fault_group]
    before, after = r["before"][a:b, keep], r["after"][a:b, keep]
    return float(np.mean(after / np.maximum(before, 1e-30)))


def print_groups(info: dict[str, Any]) -> None:
    print("AGGC groups (aggc_optax.describe_groups):")
    for label, entry in info["groups"].items():
        print(f"  {label:<26} {len(entry['leaves']):>2} leaves {entry['num_params']:>8,} params")
    if info["unlabelled"]:
        print(f"  left out (never clipped): {info['unlabelled']}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    parser.add_argument("--out", default=os.path.join("runs", "train_lm"), help="output folder")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--mlp-dim", type=int, default=172)
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--clip-norm", type=float, default=1.0, help="global-norm clip threshold")
    parser.add_argument("--problems", type=int, default=20000, help="training problems generated")
    parser.add_argument("--eval-batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fault-group", default="v_proj", help="group whose gradients are corrupted, or 'none'"
    )
    parser.add_argument("--fault-scale", type=float, default=100.0, help="gradient multiplier")
    parser.add_argument(
        "--fault-steps",
        default="auto",
        help="START:END (END exclusive), 'auto' (steps 10%%-20%% of the run) or 'none'",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    aggc_flags = add_aggc_arguments(parser)
    # The main job shows aggc()'s own default fault policy; --nonfinite reference
    # gives the authors' clipper exactly.
    parser.set_defaults(nonfinite="skip")
    args = parser.parse_args(argv)
    args.aggc_changed = {
        action.option_strings[0]: getattr(args, action.dest)
        for action in aggc_flags._group_actions
        if getattr(args, action.dest) != parser.get_default(action.dest)
    }
    for flag in ("steps", "batch_size", "seq_len", "d_model", "layers", "heads", "mlp_dim",
                 "eval_batch"):  # fmt: skip
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.d_model % (2 * args.heads):
        parser.error(
            f"--d-model ({args.d_model}) must be a multiple of 2 x --heads ({args.heads}): "
            "each head's width must be even for the rotary embedding"
        )
    if args.problems < 100:
        parser.error(f"--problems must be >= 100, got {args.problems}")

    out = train(args)
    out["fault_group"] = args.fault_group
    fault_text = ""
    if out["window"] is not None:
        start, end = out["window"]
        fault_text = (
            f"{args.fault_group} gradients x{args.fault_scale:g} at steps {start}-{end - 1}"
        )
    folder = args.out
    write_csvs(out, folder)
    plot_losses(out, os.path.join(folder, "loss.png"), fault_text)
    plot_group_norms(
        out,
        os.path.join(folder, "per_module_clip.csv"),
        os.path.join(folder, "group_norms.png"),
        fault_text,
    )
    plot_clip_scales(out, os.path.join(folder, "clip_scales.png"), fault_text)
    summary = summarize(out, args, fault_text)
    with open(os.path.join(folder, "summary.md"), "w") as f:
        f.write(summary)
    print()
    print(summary)
    print(
        f"Wrote to {folder}/: loss.png, group_norms.png, clip_scales.png, per_module_clip.csv, "
        "group_norms.csv, losses.csv, summary.md"
    )
    return out


if __name__ == "__main__":
    main()
