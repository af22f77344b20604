"""AGGC at work: a small LLaMA-style model trained four ways, side by side.

Trains a byte-level LLaMA-style decoder (Flax NNX) on real text, with the same
batches and the same initial weights under four optimizers:

* ``adamw``: AdamW, no clipping;
* ``global_clip``: ``optax.clip_by_global_norm(--clip-norm)``, then AdamW;
* ``aggc``: AGGC, then AdamW: ``aggc()`` with its defaults unless the AGGC
  flags (:mod:`aggc_optax.cli`) choose another preset or change an argument;
* ``lora_sft``: the authors' LoRA SFT recipe, ``presets.lora_sft(--steps)``,
  then AdamW.

The text (``--data text``, the default) is the running Python's standard
library (``text_corpus.py``, shared with the stability study: no download; the
held-out text comes from files never trained on; ``--corpus PATH`` takes any
other text); its file count, byte count and SHA-256 are printed and recorded.
``--data arithmetic`` trains on character-level arithmetic word problems
generated in this script instead.

By default a burst of faulty gradients hits one module type (every layer's
``v_proj`` gradient is multiplied by 100 on steps 10%-20% of the run; see
``--fault-group``, ``--fault-scale``, ``--fault-steps``), to show how each
clipper treats the faulty group and the groups that did nothing wrong.

Writes to ``--out`` (default ``runs/train_lm``): ``loss.png`` (training and
held-out loss), ``group_norms.png`` (the AGGC run's per-group gradient norm
before and after clipping, with its bounds), ``clip_scales.png`` (the factor
each group's gradient was multiplied by, per clipper), ``per_module_clip.csv``
(the AGGC run in the reference clipper's format), ``group_norms.csv`` (every
run's per-group norms and factors), ``losses.csv`` (training loss),
``heldout.csv`` (held-out loss and accuracy), ``summary.md``, and with
``--tensorboard DIR`` TensorBoard event files. Every title, caption and summary
sentence is computed from the run's own numbers.

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
from aggc_optax import presets
from aggc_optax.cli import HelpFormatter, add_aggc_arguments, aggc_from_args

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from progress import Progress
from text_corpus import VOCAB_SIZE, load_corpus, window_starts, windows

# ---------------------------------------------------------------------------
# Data: real text (text_corpus.py), or arithmetic word problems at character level.
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
    """``num`` random windows of ``length`` consecutive positions (index arrays).

    Used by ``lora_example.py`` on the arithmetic corpus.
    """
    starts = rng.integers(0, len(corpus) - length, size=num)
    return starts[:, None] + np.arange(length)[None, :]


@dataclasses.dataclass(frozen=True)
class Task:
    """What a run trains on: a token stream to cut batches from, and a held-out set."""

    kind: str  # "text" or "arithmetic"
    train: np.ndarray
    eval_tokens: np.ndarray  # [windows, seq_len + 1]
    eval_mask: np.ndarray  # the target positions the held-out accuracy counts
    vocab_size: int
    unit: str  # what one token is: "byte" or "character"
    accuracy: str  # what the held-out accuracy measures
    title: str  # a few words for the figures' titles
    description: str  # a sentence part for the summary
    identity: dict[str, Any]


def make_task(args: argparse.Namespace) -> Task:
    """The training text and held-out windows the flags ask for (``--data``, ``--corpus``)."""
    length = args.seq_len + 1
    eval_rng = np.random.default_rng(args.seed + 1)
    if args.data == "arithmetic":
        stream, _ = make_corpus(args.problems, seed=args.seed)
        eval_stream, eval_answer = make_corpus(max(200, args.problems // 10), seed=args.seed + 1)
        starts = window_starts(eval_stream, args.eval_batch, length, eval_rng)
        mask = eval_answer[np.asarray(starts)[:, None] + np.arange(length)[None, :]]
        return Task(
            kind="arithmetic",
            train=stream,
            eval_tokens=windows(eval_stream, starts, length),
            eval_mask=mask,
            vocab_size=len(VOCAB),
            unit="character",
            accuracy="answer digits right",
            title="Character-level LM on arithmetic word problems",
            description=f"character-level arithmetic word problems ({args.problems:,} "
            "generated for training, others held out)",
            identity={"source": "arithmetic", "problems": args.problems, "seed": args.seed},
        )
    corpus = load_corpus(args.corpus, min_bytes=max(4096, 4 * length))
    if corpus.heldout.size <= length:
        raise SystemExit(
            f"corpus {corpus.source!r}: {corpus.heldout.size} held-out bytes, need more than "
            f"--seq-len + 1 = {length}"
        )
    starts = window_starts(corpus.heldout, args.eval_batch, length, eval_rng)
    tokens = windows(corpus.heldout, starts, length)
    return Task(
        kind="text",
        train=corpus.train,
        eval_tokens=tokens,
        eval_mask=np.ones(tokens.shape, bool),
        vocab_size=VOCAB_SIZE,
        unit="byte",
        accuracy="next-byte accuracy",
        title=f"Byte-level LM on {corpus.source} ({corpus.num_files} files, "
        f"{corpus.num_bytes / 1e6:.1f} MB)",
        description=f"the bytes of {corpus.source}: {corpus.num_files} files, "
        f"{corpus.num_bytes:,} bytes, SHA-256 {corpus.sha256[:16]}..., split by file into "
        f"{corpus.num_train_files} training files ({corpus.train.size:,} bytes) and "
        f"{corpus.num_heldout_files} held-out files ({corpus.heldout.size:,} bytes)",
        identity=corpus.describe(),
    )


def batch(task: Task, args: argparse.Namespace, rng: np.random.Generator) -> np.ndarray:
    """One training batch: ``--batch-size`` random windows of ``--seq-len + 1`` tokens."""
    length = args.seq_len + 1
    return windows(task.train, window_starts(task.train, args.batch_size, length, rng), length)


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

RUNS = ("adamw", "global_clip", "aggc", "lora_sft")
CLIPPERS = ("global_clip", "aggc", "lora_sft")  # the runs that rescale gradients
AGGC_RUNS = ("aggc", "lora_sft")  # the runs with an AGGC state


def build_aggc(args: argparse.Namespace, total_steps: int) -> optax.GradientTransformation:
    """The AGGC transformation of the ``aggc`` run, from the parsed flags.

    With no AGGC flag: ``aggc()`` with its defaults. The flags of
    :mod:`aggc_optax.cli` choose a preset (``--aggc-preset lora_sft``, ``grpo``,
    ``adagc``) or change an argument (``--high-mult 3``, ``--variant paper``,
    ``--group-hparams``, ``--multiplier-schedule``, ...).
    """
    return aggc_from_args(args, total_steps)


def build_clipper(run: str, args: argparse.Namespace) -> optax.GradientTransformation:
    """The transformation that runs before AdamW in ``run``."""
    if run == "adamw":
        return optax.identity()
    if run == "global_clip":
        return optax.clip_by_global_norm(args.clip_norm)
    if run == "lora_sft":
        return presets.lora_sft(args.steps)
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


def aggc_name(args: argparse.Namespace) -> str:
    """How the ``aggc`` run's clipper was chosen, for legends and the summary."""
    changed = dict(getattr(args, "aggc_changed", None) or {})
    preset = changed.pop("--aggc-preset", "default")
    base = "aggc()" if preset == "default" else f"--aggc-preset {preset}"
    if not changed:
        return "aggc() defaults" if preset == "default" else base
    return base + " " + " ".join(f"{flag} {value}" for flag, value in changed.items())


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
    """Held-out loss (every position) and accuracy (the positions ``mask`` marks)."""

    @jax.jit
    def evaluate(params: Any, tokens: jax.Array, mask: jax.Array) -> Any:
        model = nnx.merge(graphdef, params)
        logits = model(tokens[:, :-1])
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        correct = jnp.argmax(logits, -1) == tokens[:, 1:]
        target = mask[:, 1:]
        return (
            jnp.mean(losses),
            jnp.sum(jnp.where(target, correct, False)) / jnp.maximum(jnp.sum(target), 1),
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
    """Run the four optimizers side by side; return everything the reports need."""
    task = make_task(args)
    cfg = ModelConfig(
        vocab_size=task.vocab_size,
        d_model=args.d_model,
        num_layers=args.layers,
        num_heads=args.heads,
        mlp_dim=args.mlp_dim,
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

    print(f"data: {task.description}")
    data_rng = np.random.default_rng(args.seed)
    eval_tokens, eval_mask = jnp.asarray(task.eval_tokens), jnp.asarray(task.eval_mask)
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
            "eval": [(0, *evaluate(params, eval_tokens, eval_mask))],
            "scalars": [],
        }

    os.makedirs(args.out, exist_ok=True)
    logger = aggc_optax.CSVLogger(os.path.join(args.out, "per_module_clip.csv"))
    eval_every = max(1, args.steps // 20)
    bar = Progress(args.steps, "training", quiet=args.quiet)
    start_time = time.perf_counter()
    for step in range(args.steps):
        tokens = jnp.asarray(batch(task, args, data_rng))
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
            if args.tensorboard and name in AGGC_RUNS:
                # One jitted reduction and one transfer per call (aggc_optax.metrics).
                run["scalars"].append(aggc_optax.metrics(run["opt_state"], prefix="aggc"))
            if (step + 1) % eval_every == 0 or step + 1 == args.steps:
                run["eval"].append((step + 1, *evaluate(run["params"], eval_tokens, eval_mask)))
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
            "eval": [(int(s), float(v), float(a)) for s, v, a in jax.device_get(run["eval"])],
            "scalars": run["scalars"],
            "opt_state": run["opt_state"],
        }
    return {
        "task": task,
        "labels": labels,
        "info": info,
        "window": window,
        "results": results,
        "seconds": seconds,
        "num_params": sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params0)),
    }


# ---------------------------------------------------------------------------
# Reports: every number in a title, caption or sentence comes from the run.
# ---------------------------------------------------------------------------

SMOOTH_WIDTH = 9  # steps in the centred moving average of the training-loss curves
FACTOR_TOL = 1e-6  # a factor further than this from 1 counts as "rescaled"
RUN_COLORS = {
    "adamw": "#7f7f7f",
    "global_clip": "#1f77b4",
    "aggc": "#d62728",
    "lora_sft": "#2ca02c",
}
SHORT_NAMES = {
    "adamw": "AdamW",
    "global_clip": "global clip",
    "aggc": "AGGC",
    "lora_sft": "LoRA SFT recipe",
}


def centered_mean(x: np.ndarray, width: int) -> np.ndarray:
    """Moving average centred on each step (shorter at the edges): no shift to the right."""
    half = width // 2
    csum = np.concatenate([[0.0], np.cumsum(x)])
    lo = np.clip(np.arange(x.size) - half, 0, x.size)
    hi = np.clip(np.arange(x.size) + half + 1, 0, x.size)
    return (csum[hi] - csum[lo]) / (hi - lo)


def run_titles(out: dict[str, Any]) -> dict[str, str]:
    """Legend and table names of the runs."""
    return {
        "adamw": "AdamW, no clipping",
        "global_clip": "AdamW + global-norm clip",
        "aggc": f"AdamW + AGGC ({out['aggc_name']})",
        "lora_sft": "AdamW + LoRA SFT recipe",
    }


def factors(out: dict[str, Any], run: str) -> np.ndarray:
    """``[steps, groups]``: the factor each group's gradient norm was multiplied by."""
    r = out["results"][run]
    return group_factors(r["before"], r["after"])


def rescaled(f: np.ndarray) -> np.ndarray:
    return np.abs(f - 1.0) > FACTOR_TOL


def factor_range(values: np.ndarray) -> str:
    """``"x0.021"``, or ``"x0.021-x0.034"`` when the smallest and largest differ."""
    lo, hi = f"x{float(np.min(values)):.2g}", f"x{float(np.max(values)):.2g}"
    return lo if lo == hi else f"{lo}-{hi}"


def fault_factors(out: dict[str, Any], run: str) -> dict[str, Any]:
    """During the fault: the factors of the faulty group and of the other groups."""
    start, end = out["window"]
    f = factors(out, run)[start:end]
    j = out["labels"].index(out["fault_group"])
    others = np.delete(f, j, axis=1)
    return {"faulty": f[:, j], "others": others, "others_rescaled": others[rescaled(others)]}


def fault_clause(out: dict[str, Any], run: str) -> str:
    """What ``run``'s factors were during the fault, as one clause."""
    ff = fault_factors(out, run)
    group, faulty, others = out["fault_group"], ff["faulty"], ff["others"]
    head = f"{group} {factor_range(faulty)}" if rescaled(faulty).any() else f"{group} untouched"
    hit = ff["others_rescaled"]
    if hit.size == 0:
        tail = "every other group x1 (untouched)"
    elif hit.size == others.size:
        tail = f"every other group rescaled too, {factor_range(others)}"
    else:
        tail = (
            f"{hit.size} of {others.size} other (step, group) pairs rescaled, {factor_range(hit)}"
        )
    return f"{SHORT_NAMES[run]}: {head}; {tail}"


def fault_caption(out: dict[str, Any]) -> list[str]:
    """One clause per clipper: what its factors were during the fault."""
    return [fault_clause(out, run) for run in CLIPPERS]


def normal_rescaling(out: dict[str, Any], run: str) -> dict[str, Any]:
    """Outside the fault window: how many (step, group) pairs ``run`` rescaled, and how."""
    f = factors(out, run)
    keep = np.ones(f.shape[0], bool)
    if out["window"] is not None:
        keep[out["window"][0] : out["window"][1]] = False
    f = f[keep]
    hit = rescaled(f)
    return {
        "steps": int(keep.sum()),
        "pairs": int(f.size),
        "rescaled": int(hit.sum()),
        "steps_rescaled": int(hit.any(axis=1).sum()),
        "median": float(np.median(f[hit])) if hit.any() else 1.0,
    }


def normal_sentence(out: dict[str, Any]) -> str:
    where = "Outside the fault window" if out["window"] is not None else "Over the run"
    stats = {run: normal_rescaling(out, run) for run in CLIPPERS}
    first = stats[CLIPPERS[0]]
    parts = []
    for run, s in stats.items():
        if s["rescaled"] == 0:
            parts.append(f"{SHORT_NAMES[run]} none")
        else:
            parts.append(
                f"{SHORT_NAMES[run]} {s['rescaled']} ({100 * s['rescaled'] / s['pairs']:.1f}%, "
                f"on {s['steps_rescaled']} steps, median factor x{s['median']:.3g})"
            )
    return (
        f"{where} ({first['steps']} steps x {len(out['labels'])} groups = {first['pairs']} "
        f"(step, group) pairs), the pairs each clipper rescaled: " + "; ".join(parts) + "."
    )


def normal_shares(out: dict[str, Any]) -> str:
    """The short form of :func:`normal_sentence`, for a figure title."""
    where = "outside the grey band" if out["window"] is not None else "over the run"
    shares = ", ".join(
        f"{SHORT_NAMES[run]} {100 * s['rescaled'] / s['pairs']:.1f}%"
        for run, s in ((run, normal_rescaling(out, run)) for run in CLIPPERS)
    )
    return f"{where}, the share of (step, group) pairs rescaled: {shares}"


def nonfinite_sentence(out: dict[str, Any]) -> str | None:
    """Which runs saw NaN or inf (a loss, or a group's norm), or None when none did."""
    parts = []
    for run, r in out["results"].items():
        losses = int(np.sum(~np.isfinite(r["loss"])))
        norms = int(np.sum(~np.isfinite(r["before"])))
        if losses or norms:
            parts.append(
                f"{SHORT_NAMES[run]}: loss on {losses} steps, gradient norm on {norms} "
                "(step, group) pairs"
            )
    if not parts:
        return None
    return (
        "Non-finite values (their factors count as 1 in the counts above and below): "
        + "; ".join(parts)
        + "."
    )


def eval_at(r: dict[str, Any], step: int) -> tuple[float, float]:
    """Held-out loss and accuracy after ``step`` optimizer steps."""
    return next((v, a) for s, v, a in r["eval"] if s == step)


def after_fault(out: dict[str, Any]) -> int:
    """The first evaluation at or after the end of the fault window (optimizer steps done)."""
    evals = [s for s, _, _ in out["results"]["aggc"]["eval"]]
    return next((s for s in evals if s >= out["window"][1]), evals[-1])


def heldout_sentences(out: dict[str, Any]) -> list[str]:
    """Each clipped run's held-out loss relative to AdamW's, at the end and after the fault."""
    results = out["results"]
    points = [("at the end", results["adamw"]["eval"][-1][0])]
    if out["window"] is not None:
        points.insert(0, ("after the fault", after_fault(out)))
    lines = []
    for when, step in points:
        base = eval_at(results["adamw"], step)[0]
        diffs = ", ".join(
            f"{SHORT_NAMES[run]} {eval_at(results[run], step)[0] - base:+.4f}" for run in CLIPPERS
        )
        lines.append(f"Held-out loss {when} (step {step}) minus AdamW's ({base:.4f}): {diffs}.")
    return lines


def _shade(ax: Any, window: tuple[int, int] | None) -> None:
    if window is not None:
        ax.axvspan(window[0] - 0.5, window[1] - 0.5, color="0.5", alpha=0.2, lw=0)


def write_csvs(out: dict[str, Any], folder: str) -> None:
    """``group_norms.csv`` (every run, every group), ``losses.csv`` and ``heldout.csv``."""
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
    with open(os.path.join(folder, "heldout.csv"), "w", newline="") as f:
        w = csv.writer(f)
        # step: optimizer steps done before the evaluation (0: the initial weights).
        w.writerow(["step", "run", "heldout_loss", "heldout_accuracy"])
        for run, r in results.items():
            for step, loss, acc in r["eval"]:
                w.writerow([step, run, repr(loss), repr(acc)])


def loss_axis(
    curves: Sequence[tuple[np.ndarray, np.ndarray]], from_step: int
) -> tuple[float, float, float] | None:
    """Linear y limits for curves of (steps, values): the range from ``from_step`` on.

    Returns ``(low, top, highest)``: the finite range from ``from_step`` on (all
    steps if there are none), and the highest finite value of any step; None when
    nothing is finite (every run diverged).
    """

    def finite(after: int) -> np.ndarray:
        parts = [v[(s >= after) & np.isfinite(v)] for s, v in curves]
        return np.concatenate(parts) if parts else np.empty(0)

    shown = finite(from_step)
    if shown.size == 0:
        shown = finite(0)
    if shown.size == 0:
        return None
    return float(shown.min()), float(shown.max()), float(finite(0).max())


def plot_losses(out: dict[str, Any], path: str, fault_text: str) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    task, results, titles = out["task"], out["results"], run_titles(out)
    steps = np.arange(len(results["adamw"]["loss"]))
    width = min(SMOOTH_WIDTH, steps.size)
    fig = Figure(figsize=(12, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax_train, ax_eval = fig.subplots(1, 2)
    smooth, evals = [], []
    for run, r in results.items():
        # AdamW dashed and on top: it often lies right under a clipped run's curve.
        style = {
            "color": RUN_COLORS[run],
            "ls": "--" if run == "adamw" else "-",
            "zorder": 3 if run == "adamw" else 2,
            "label": titles[run],
        }
        curve = centered_mean(r["loss"].astype(np.float64), width)
        smooth.append((steps, curve))
        ax_train.plot(steps, r["loss"], color=style["color"], alpha=0.15, lw=0.7)
        ax_train.plot(steps, curve, lw=1.6, **style)
        ev = np.asarray([(s, v) for s, v, _ in r["eval"]])
        evals.append((ev[:, 0], ev[:, 1]))
        ax_eval.plot(ev[:, 0], ev[:, 1], marker="o", ms=3, lw=1.4, **style)
    # Linear axes, cut above the highest curve from the fault (or 10% of the run) on:
    # the first steps' loss would squash the differences that matter into a sliver.
    first = max(1, steps.size // 10)
    if out["window"] is not None:
        first = min(first, out["window"][0])
    unit = f"nats per {task.unit}"
    for ax, curves, name in (
        (ax_train, smooth, f"training loss ({unit}), centred {width}-step mean; raw faint"),
        (ax_eval, evals, f"held-out loss ({unit})"),
    ):
        limits = loss_axis(curves, first)
        if limits is not None:
            low, top, highest = limits
            margin = 0.05 * (top - low) or 0.05
            ax.set_ylim(low - margin, top + margin)
            if highest > top + margin:
                name += f"\n(axis cut: before step {first} the loss reaches {highest:.2f})"
        _shade(ax, out["window"])
        ax.set_xlabel("step")
        ax.set_ylabel(f"loss ({unit})")
        ax.set_title(name, fontsize=10)
        ax.grid(True, alpha=0.3, lw=0.5)
    ax_train.legend(fontsize=8)
    if out["window"] is not None:
        ax_eval.text(
            0.98, 0.97, f"grey band: {fault_text}", transform=ax_eval.transAxes,
            ha="right", va="top", fontsize=8,
        )  # fmt: skip
    final = ", ".join(f"{SHORT_NAMES[run]} {r['eval'][-1][1]:.3f}" for run, r in results.items())
    fig.suptitle(
        f"{task.title}: same batches, same initial weights\n"
        f"final held-out loss (step {steps.size}): {final}",
        fontsize=11,
    )
    fig.savefig(path, dpi=110)
    return fig


def plot_group_norms(out: dict[str, Any], csv_path: str, path: str, fault_text: str) -> Any:
    from aggc_optax.plotting import plot_group_norms as plot

    f = factors(out, "aggc")
    down, up = int(np.sum(f < 1 - FACTOR_TOL)), int(np.sum(f > 1 + FACTOR_TOL))
    title = (
        f"AGGC run ({out['aggc_name']}): each group's gradient norm before / after clipping, "
        f"with its bounds\nclipped down on {down} and raised on {up} of {f.size} "
        "(step, group) pairs"
    )
    if out["window"] is not None:
        title += f"; grey band: {fault_text}"
    fig = plot(csv_path, title=title)
    for ax in fig.axes:
        _shade(ax, out["window"])
        ax.set_ylabel("gradient norm", fontsize=9)
    fig.savefig(path, dpi=110)
    return fig


def plot_clip_scales(out: dict[str, Any], path: str, fault_text: str) -> Any:
    """The factor each group's gradient was multiplied by, under each clipper."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels, titles = out["labels"], run_titles(out)
    ncols = 4
    nrows = math.ceil(len(labels) / ncols)
    fig = Figure(figsize=(3.6 * ncols, 2.3 * nrows + 1.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    for j, label in enumerate(labels):
        ax = axes[j // ncols][j % ncols]
        for run in CLIPPERS:
            ax.plot(factors(out, run)[:, j], color=RUN_COLORS[run], lw=1.1, label=titles[run])
        _shade(ax, out["window"])
        ax.set_yscale("log")
        ax.set_title(label, fontsize=10)
        ax.set_ylabel("factor", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, which="both", alpha=0.3, lw=0.5)
        if j + ncols >= len(labels):
            ax.set_xlabel("step", fontsize=9)
    for j in range(len(labels), nrows * ncols):
        fig.delaxes(axes[j // ncols][j % ncols])
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=len(CLIPPERS))
    lines = ["Factor applied to each group's gradient norm (after / before; 1 = untouched)"]
    if out["window"] is not None:
        lines.append(f"during the grey band ({fault_text}):")
        lines += fault_caption(out)
    lines.append(normal_shares(out))
    fig.suptitle("\n".join(lines), fontsize=10)
    fig.savefig(path, dpi=110)
    return fig


def summarize(out: dict[str, Any], args: argparse.Namespace, fault_text: str) -> str:
    """The Markdown summary: held-out losses, and per group how often each clipper acted."""
    results, labels, info, task = out["results"], out["labels"], out["info"], out["task"]
    titles = run_titles(out)
    tail = max(1, args.steps // 10)
    layers = f"{args.layers} layer" + ("s" if args.layers != 1 else "")
    lines = [
        "# AGGC demo: summary",
        "",
        f"LLaMA-style decoder, {out['num_params']:,} parameters ({layers}, "
        f"d_model {args.d_model}), trained on {task.description}; {args.steps} steps of "
        f"{args.batch_size} x {args.seq_len} {task.unit}s; the same batches and initial "
        f"weights for every run; held-out set: {len(task.eval_tokens)} windows of "
        f"{args.seq_len + 1} {task.unit}s. Fault: {fault_text if out['window'] else 'none'}. "
        f"Training took {out['seconds']:.0f} s for the {len(results)} runs.",
        "",
        f"Clippers before AdamW: global clip `optax.clip_by_global_norm({args.clip_norm:g})`; "
        f"AGGC {out['aggc_name']}; LoRA SFT recipe `presets.lora_sft({args.steps})`.",
        "",
    ]
    header = ["run"]
    if out["window"]:
        header.append(f"held-out loss after the fault (step {after_fault(out)})")
    header += [f"train loss (mean of last {tail} steps)", "final held-out loss", task.accuracy]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run, r in results.items():
        _, eval_loss, acc = r["eval"][-1]
        cells = [titles[run]]
        if out["window"]:
            cells.append(f"{eval_at(r, after_fault(out))[0]:.4f}")
        cells += [f"{np.mean(r['loss'][-tail:]):.4f}", f"{eval_loss:.4f}", f"{100 * acc:.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *heldout_sentences(out), ""]
    nonfinite = nonfinite_sentence(out)
    if nonfinite:
        lines += [nonfinite, ""]
    lines.append(
        "One seed: the spread between seeds is not measured here (docs/stability.md "
        "measures it over 3 seeds)."
    )
    if out["window"] is not None:
        start, end = out["window"]
        lines += ["", f"During the fault (steps {start}-{end - 1}), the factor applied to each "
                  "group's gradient norm (1 = untouched):", ""]  # fmt: skip
        lines += [f"- {clause}" for clause in fault_caption(out)]
    lines += ["", normal_sentence(out), ""]
    lines += [
        f"Steps on which each group's gradient was rescaled (of {args.steps}; factor further "
        f"than {FACTOR_TOL:g} from 1). Global clipping rescales all groups together.",
        "",
        "| group | parameters | AGGC: clipped down | AGGC: raised | LoRA SFT: clipped down "
        "| LoRA SFT: raised | global clip: clipped |",
        "|---|---|---|---|---|---|---|",
    ]
    f_aggc, f_lora, f_glob = (factors(out, run) for run in ("aggc", "lora_sft", "global_clip"))
    for j, label in enumerate(labels):
        counts = [
            int(np.sum(f_aggc[:, j] < 1 - FACTOR_TOL)),
            int(np.sum(f_aggc[:, j] > 1 + FACTOR_TOL)),
            int(np.sum(f_lora[:, j] < 1 - FACTOR_TOL)),
            int(np.sum(f_lora[:, j] > 1 + FACTOR_TOL)),
            int(np.sum(f_glob[:, j] < 1 - FACTOR_TOL)),
        ]
        lines.append(
            f"| {label} | {info['groups'][label]['num_params']:,} | "
            + " | ".join(str(c) for c in counts)
            + " |"
        )
    return "\n".join(lines) + "\n"


def write_tensorboard(out: dict[str, Any], folder: str) -> str:
    """Every run's curves as TensorBoard scalars under ``<run>/...``; returns the folder."""
    from tensorboardX import SummaryWriter

    labels = out["labels"]
    with SummaryWriter(folder) as writer:
        for run, r in out["results"].items():
            f = group_factors(r["before"], r["after"])
            for step in range(len(r["loss"])):
                writer.add_scalar(f"{run}/loss", float(r["loss"][step]), step)
                for j, label in enumerate(labels):
                    writer.add_scalar(
                        f"{run}/norm_before/{label}", float(r["before"][step, j]), step
                    )
                    writer.add_scalar(f"{run}/factor/{label}", float(f[step, j]), step)
                for key, value in (r["scalars"][step] if r["scalars"] else {}).items():
                    writer.add_scalar(f"{run}/{key}", float(value), step)
            for step, loss, acc in r["eval"]:
                writer.add_scalar(f"{run}/heldout_loss", loss, step)
                writer.add_scalar(f"{run}/heldout_accuracy", acc, step)
    return folder


def print_groups(info: dict[str, Any]) -> None:
    print("AGGC groups (aggc_optax.describe_groups):")
    for label, entry in info["groups"].items():
        leaves = len(entry["leaves"])
        print(
            f"  {label:<26} {leaves:>2} {'leaf' if leaves == 1 else 'leaves'} "
            f"{entry['num_params']:>8,} params"
        )
    if info["unlabelled"]:
        print(f"  left out (never clipped): {info['unlabelled']}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        choices=("text", "arithmetic"),
        default="text",
        help="text: byte-level real text (--corpus); arithmetic: character-level word "
        "problems generated in this script",
    )
    data.add_argument(
        "--corpus",
        default=None,
        metavar="PATH",
        help="with --data text: a text file or a folder of text files. Unset: the running "
        "Python's standard library (examples/text_corpus.py)",
    )
    data.add_argument(
        "--problems",
        type=int,
        default=20000,
        help="with --data arithmetic: training problems generated (>= 100)",
    )
    data.add_argument("--seq-len", type=int, default=64, help="tokens per training sequence")
    data.add_argument("--batch-size", type=int, default=16, help="sequences per batch")
    data.add_argument(
        "--eval-batch", type=int, default=256, help="held-out windows of --seq-len + 1 tokens"
    )
    data.add_argument("--seed", type=int, default=0, help="initial weights and data order")
    model = parser.add_argument_group("model (LLaMA-style decoder)")
    model.add_argument("--d-model", type=int, default=64, help="model width")
    model.add_argument("--layers", type=int, default=2, help="decoder layers")
    model.add_argument(
        "--heads", type=int, default=4, help="attention heads (--d-model / heads must be even)"
    )
    model.add_argument("--mlp-dim", type=int, default=172, help="MLP hidden width")
    train_flags = parser.add_argument_group("training")
    train_flags.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    train_flags.add_argument(
        "--lr",
        type=float,
        default=3e-3,
        help="AdamW peak learning rate (linear warm-up over 5%% of the run, cosine decay to "
        "a tenth)",
    )
    train_flags.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    train_flags.add_argument(
        "--clip-norm", type=float, default=1.0, help="threshold of the global-clip run"
    )
    fault = parser.add_argument_group("fault injection")
    fault.add_argument(
        "--fault-group", default="v_proj", help="group whose gradients are corrupted, or 'none'"
    )
    fault.add_argument(
        "--fault-scale", type=float, default=100.0, help="multiplier of the faulty gradients"
    )
    fault.add_argument(
        "--fault-steps",
        default="auto",
        help="START:END (END exclusive), 'auto' (steps 10%%-20%% of the run) or 'none'",
    )
    output = parser.add_argument_group("output")
    output.add_argument("--out", default=os.path.join("runs", "train_lm"), help="output folder")
    output.add_argument(
        "--tensorboard",
        default=None,
        metavar="DIR",
        help="also write TensorBoard event files to DIR (needs tensorboardX): per run "
        "(tag prefix: the run's name) the loss, held-out loss, each group's norm and factor, "
        "and the AGGC runs' aggc_optax.metrics (tags <run>/aggc/...). Unset: none",
    )
    output.add_argument("--quiet", action="store_true", help="no progress bar")
    aggc_flags = add_aggc_arguments(parser)
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
    if args.corpus is not None and args.data != "text":
        parser.error("--corpus is for --data text")
    if args.tensorboard:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            parser.error('--tensorboard needs tensorboardX: pip install "aggc_optax[examples]"')
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = train(args)
    out["fault_group"] = args.fault_group
    out["aggc_name"] = aggc_name(args)
    fault_text = ""
    if out["window"] is not None:
        start, end = out["window"]
        fault_text = (
            f"{args.fault_group} gradients x{args.fault_scale:g} at steps {start}-{end - 1}"
        )
    folder = args.out
    write_csvs(out, folder)
    figures = {
        "loss.png": plot_losses(out, os.path.join(folder, "loss.png"), fault_text),
        "group_norms.png": plot_group_norms(
            out,
            os.path.join(folder, "per_module_clip.csv"),
            os.path.join(folder, "group_norms.png"),
            fault_text,
        ),
        "clip_scales.png": plot_clip_scales(
            out, os.path.join(folder, "clip_scales.png"), fault_text
        ),
    }
    summary = summarize(out, args, fault_text)
    # The figures' titles, here too, so they can be read (and tested) as text.
    summary += "\n## Figure titles\n\n" + "".join(
        f"- `{name}`: {fig.get_suptitle().replace(chr(10), ' / ')}\n"
        for name, fig in figures.items()
    )
    with open(os.path.join(folder, "summary.md"), "w") as f:
        f.write(summary)
    written = (
        "loss.png, group_norms.png, clip_scales.png, per_module_clip.csv, group_norms.csv, "
        "losses.csv, heldout.csv, summary.md"
    )
    if args.tensorboard:
        write_tensorboard(out, args.tensorboard)
        written += f"; TensorBoard events to {args.tensorboard}/"
    print()
    print(summary)
    print(f"Wrote to {folder}/: {written}")
    return out


if __name__ == "__main__":
    main()
