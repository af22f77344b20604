"""The paper's LoRA SFT experiment in miniature: does AGGC lift a fine-tune's accuracy?

Fine-tunes the pretrained byte-level base model (``paper_base.py``) on the
generated GSM8K-style task (``math_task.py``) and scores greedy-decoded answers
on held-out templates and numbers by exact match. Methods (:data:`METHODS`),
every one on the same seeds, paired: a seed fixes the adapters' initial
values and the order of the training batches, for every method.

* ``lora``: LoRA, AdamW, no clipping (as the authors' scripts at accumulation 1,
  where their callback never clipped);
* ``lora_global_clip``: ``optax.clip_by_global_norm(1.0)`` first (the Hugging
  Face Trainer's default ``max_grad_norm``);
* ``lora_sft_preset``: ``presets.lora_sft(steps)`` as the paper describes it, one
  clip of the whole step's gradient per optimizer step (beta 0.95, Table 7);
* ``as_ran_k2`` / ``as_ran_k4``: ``aggc_optax.lora_callback_as_ran`` at
  gradient accumulation 2 and 4, the authors' callback as it ran (micro-batches
  of batch / k, so every method sees the same examples per optimizer step);
* ``lora_aggc``: ``aggc()`` with its defaults;
* ``full_ft``: every weight trains, AdamW, no clipping (as the authors' full
  fine-tuning baseline).

The protocol (:data:`PROTOCOL`: task, lengths, rates, ranks) was fixed from
LoRA-alone calibration runs (``--calibrate``) before any clipper ran; see
``docs/paper-miniature.md``. Runs of one method and rank train together
(``jax.vmap`` over seeds). Writes ``results.json`` (every run: per-problem
correctness, loss curves, clip counts), ``summary.md`` (tables and findings,
every sentence computed from the record) and the figures
``paper_sft_accuracy.png`` and ``paper_sft_loss.png`` to ``--out``;
``--report-from RECORD`` rewrites them from a record. ``--quick`` is a smoke
test of the pipeline (tiny, not evidence).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import os
import sys
import textwrap
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import aggc_optax
from aggc_optax import presets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import math_task
import paper_base
from progress import Progress

# ---------------------------------------------------------------------------
# The protocol: fixed before any clipper ran (docs/paper-miniature.md).
# ---------------------------------------------------------------------------

PROTOCOL: dict[str, Any] = {
    "difficulty": {"factor_max": 5, "count_max": 5, "max_events": 1, "share_max": 3},
    "train_problems": 4000,
    "test_problems": 300,
    "data_seed": 0,
    "seq_len": 128,
    "steps": 1200,
    "batch_size": 8,
    "lr": 5e-3,
    "full_ft_lr": 5e-4,
    "warmup_ratio": 0.03,
    "weight_decay": 0.0,
    "ranks": [8],
    "max_new": 40,
}
QUICK: dict[str, Any] = {"train_problems": 64, "test_problems": 16, "steps": 4, "batch_size": 4}
SEEDS = (0, 1, 2, 3, 4)

METHODS: dict[str, str] = {
    "lora": "LoRA (no clipping)",
    "lora_global_clip": "LoRA + global clip 1.0",
    "lora_sft_preset": "LoRA + presets.lora_sft (as described)",
    "as_ran_k2": "LoRA + callback as ran, accumulation 2",
    "as_ran_k4": "LoRA + callback as ran, accumulation 4",
    "lora_aggc": "LoRA + aggc() defaults",
    "full_ft": "full fine-tuning",
}
CLIPPERS = ("lora_global_clip", "lora_sft_preset", "as_ran_k2", "as_ran_k4", "lora_aggc")
ACCUMULATION = {"as_ran_k2": 2, "as_ran_k4": 4}


def _adamw(lr: float, p: dict[str, Any]) -> optax.GradientTransformation:
    # The paper's recipe: AdamW, cosine schedule with 3% linear warm-up (to 0 at the end,
    # as Hugging Face's cosine), no weight decay; HF's AdamW betas and epsilon.
    warmup = max(1, math.ceil(p["warmup_ratio"] * p["steps"]))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup, max(warmup + 1, p["steps"]), end_value=0.0
    )
    return optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=p["weight_decay"])


def build_tx(method: str, p: dict[str, Any]) -> optax.GradientTransformation:
    """The optimizer of ``method`` under protocol ``p`` (called once per micro-batch for
    the ``as_ran`` methods, once per optimizer step for the others)."""
    steps = p["steps"]
    if method == "full_ft":
        return _adamw(p["full_ft_lr"], p)
    adamw = _adamw(p["lr"], p)
    if method == "lora":
        return adamw
    if method == "lora_global_clip":
        return optax.chain(optax.clip_by_global_norm(1.0), adamw)
    if method == "lora_sft_preset":
        return optax.chain(presets.lora_sft(steps, param_labels=aggc_optax.lora_label), adamw)
    if method in ACCUMULATION:
        return aggc_optax.lora_callback_as_ran(adamw, ACCUMULATION[method], steps)
    if method == "lora_aggc":
        return optax.chain(aggc_optax.aggc(), adamw)
    raise ValueError(f"unknown method {method!r}; allowed: {list(METHODS)}")


def clip_state_of(method: str, state: Any) -> Any:
    """The AGGC state inside ``method``'s optimizer state (``None`` for non-AGGC methods)."""
    if method in ACCUMULATION:
        return state.clip_state
    if method in ("lora_sft_preset", "lora_aggc"):
        return state[0]
    return None


# ---------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
    train_tokens: np.ndarray  # [n, seq_len + 1]
    train_mask: np.ndarray  # [n, seq_len]
    test: list[math_task.Problem]
    prompts: np.ndarray  # [m, prompt buffer]
    lengths: np.ndarray  # [m]


def make_data(p: dict[str, Any]) -> Data:
    difficulty = math_task.Difficulty(**p["difficulty"])
    train = math_task.generate("train", p["train_problems"], p["data_seed"], difficulty)
    test = math_task.generate("test", p["test_problems"], p["data_seed"], difficulty)
    tokens, mask = math_task.sft_arrays(train, p["seq_len"])
    longest = max(len(math_task.encode(q.prompt)) for q in test)
    prompts, lengths = math_task.prompt_arrays(test, longest + p["max_new"])
    return Data(tokens, mask, test, prompts, lengths)


def batch_order(seed: int, p: dict[str, Any]) -> np.ndarray:
    """``[steps, batch]`` training-example indices of ``seed`` (epochs of permutations)."""
    rng = np.random.default_rng(1000 + seed)
    need = p["steps"] * p["batch_size"]
    n = p["train_problems"]
    order = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])[:need]
    return order.reshape(p["steps"], p["batch_size"])


# ---------------------------------------------------------------------------
# Training: all seeds of one (method, rank) at once.
# ---------------------------------------------------------------------------


def masked_loss(model: nnx.Module, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean next-byte cross-entropy over the completion bytes (``mask``)."""
    logits = model(tokens[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def make_train_step(graphdef: Any, tx: optax.GradientTransformation, k: int, full: bool) -> Any:
    """Jitted step of all seeds: ``k`` micro-batches (``[seeds, k, b, T+1]``) per optimizer
    step, each micro-batch's gradient that of its mean loss / k (as the Trainer's
    ``backward()`` gives it), handed to ``tx`` one micro-batch at a time."""

    def one(trained: Any, state: Any, frozen: Any, tokens: jax.Array, mask: jax.Array) -> Any:
        def loss_fn(t: Any, tok: jax.Array, m: jax.Array) -> jax.Array:
            model = nnx.merge(graphdef, t) if full else nnx.merge(graphdef, t, frozen)
            return masked_loss(model, tok, m) / k

        def micro(carry: Any, batch: Any) -> Any:
            t, s = carry
            loss, grads = jax.value_and_grad(loss_fn)(t, *batch)
            updates, s = tx.update(grads, s, t)
            return (optax.apply_updates(t, updates), s), loss

        (trained, state), losses = jax.lax.scan(micro, (trained, state), (tokens, mask))
        return trained, state, jnp.sum(losses)

    return jax.jit(jax.vmap(one, in_axes=(0, 0, None, 0, 0)), donate_argnums=(0, 1))


_DECODERS: dict[Any, Any] = {}


def evaluate(graphdef: Any, trained: Any, frozen: Any, data: Data, full: bool) -> np.ndarray:
    """``[seeds, problems]`` exact-match correctness of greedy decoding on the test split."""
    key = (graphdef, full)
    if key not in _DECODERS:
        _DECODERS[key] = (
            paper_base.make_greedy_decoder(graphdef, batched=True)
            if not full
            else jax.jit(
                jax.vmap(lambda t, pr, ln: paper_base.greedy_decode(nnx.merge(graphdef, t), pr, ln),
                         in_axes=(0, None, None))
            )
        )  # fmt: skip
    decode = _DECODERS[key]
    prompts, lengths = jnp.asarray(data.prompts), jnp.asarray(data.lengths)
    out = (
        decode(trained, (frozen,), prompts, lengths)
        if not full
        else decode(trained, prompts, lengths)
    )
    out = np.asarray(out)
    return np.stack(
        [math_task.score(paper_base.completions(row, data.lengths), data.test) for row in out]
    )


def init_runs(method: str, rank: int, seeds: Sequence[int], base: nnx.Module) -> Any:
    """``(graphdef, trained [seeds, ...], frozen)``: the starting weights of every seed."""
    if method == "full_ft":
        graphdef, params = nnx.split(nnx.clone(base), nnx.Param)
        return graphdef, jax.tree.map(lambda x: jnp.stack([x] * len(seeds)), params), None
    built = [paper_base.lora_model(rank, s, base) for s in seeds]
    graphdef, _, frozen = built[0]
    trained = jax.tree.map(lambda *xs: jnp.stack(xs), *[b[1] for b in built])
    return graphdef, trained, frozen


def train_runs(
    method: str,
    rank: int,
    seeds: Sequence[int],
    p: dict[str, Any],
    data: Data,
    base: nnx.Module,
    bar: Progress | None = None,
) -> dict[str, Any]:
    """Train every seed of ``(method, rank)``; returns correctness, losses and clip counts."""
    full = method == "full_ft"
    k = ACCUMULATION.get(method, 1)
    if p["batch_size"] % k:
        raise ValueError(f"batch_size {p['batch_size']} is not a multiple of accumulation {k}")
    graphdef, trained, frozen = init_runs(method, rank, seeds, base)
    tx = build_tx(method, p)
    state = jax.jit(jax.vmap(tx.init))(trained)
    step = make_train_step(graphdef, tx, k, full)
    orders = np.stack([batch_order(s, p) for s in seeds])  # [seeds, steps, batch]
    start = time.perf_counter()
    losses = []
    for t in range(p["steps"]):
        idx = orders[:, t].reshape(len(seeds), k, -1)
        tokens = jnp.asarray(data.train_tokens[idx])
        mask = jnp.asarray(data.train_mask[idx])
        trained, state, loss = step(trained, state, frozen, tokens, mask)
        losses.append(loss)
        if bar is not None:
            status = f"{method} r{rank}: loss {float(jnp.mean(loss)):.3f}" if t % 10 == 9 else ""
            bar.update(1, status)
    correct = evaluate(graphdef, trained, frozen, data, full)
    clip = clip_state_of(method, state)
    counts = None
    if clip is not None:
        # group_stats reads one state: take each seed's slice of the vmapped state
        per_seed = [
            aggc_optax.group_stats(jax.tree.map(lambda x, i=i: x[i], clip))
            for i in range(len(seeds))
        ]
        counts = {
            label: [int(stats[label]["clip_down_count"]) for stats in per_seed]
            for label in per_seed[0]
        }
    return {
        "method": method,
        "rank": None if full else rank,
        "seeds": list(seeds),
        "correct": correct.astype(np.int8),
        "loss": np.asarray(jax.device_get(losses)).T,  # [seeds, steps]
        "clip_down_count": counts,
        "seconds": time.perf_counter() - start,
        "trained": trained,
        "graphdef": graphdef,
        "frozen": frozen,
    }


def train_one(
    method: str, seed: int, rank: int | None = None, **overrides: Any
) -> tuple[Any, Any, Any]:
    """One run of ``method`` at ``seed`` under :data:`PROTOCOL` (``overrides`` replace its
    entries); returns ``(graphdef, trained, frozen)`` without the seed axis."""
    p = {**PROTOCOL, **overrides}
    rank = p["ranks"][0] if rank is None else rank
    out = train_runs(method, rank, [seed], p, make_data(p), paper_base.load_base())
    return out["graphdef"], jax.tree.map(lambda x: x[0], out["trained"]), out["frozen"]


def calibrate(settings: Sequence[dict[str, Any]], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """LoRA-alone runs under protocol variants (no clipper runs here): test accuracy per
    variant, to fix the protocol's difficulty, length and rate before the study."""
    base = paper_base.load_base()
    rows = []
    for overrides in settings:
        p = {**PROTOCOL, **overrides}
        data = make_data(p)
        bar = Progress(p["steps"], f"calibrate {overrides}", lines=4)
        method = overrides.get("method", "lora")
        out = train_runs(method, p["ranks"][0], seeds, p, data, base, bar)
        bar.close()
        acc = out["correct"].mean(axis=1)
        row = {
            "overrides": {k: v for k, v in overrides.items()},
            "seeds": list(seeds),
            "accuracy": [float(a) for a in acc],
            "final_loss": [float(x) for x in out["loss"][:, -10:].mean(axis=1)],
            "seconds": out["seconds"],
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------
# Analysis: every number of the summary, from the record.
# ---------------------------------------------------------------------------

BOOTSTRAP = 10_000


def config_name(method: str, rank: int | None) -> str:
    return method if rank is None else f"{method}@r{rank}"


def paired_bootstrap(diff: np.ndarray, num: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean of ``diff`` [seeds, problems] (method minus LoRA, per seed
    and problem), resampling seeds and problems with replacement, pairs kept together."""
    diff = np.asarray(diff, float)
    s, q = diff.shape
    rng = np.random.default_rng(seed)
    s_counts = rng.multinomial(s, np.full(s, 1.0 / s), size=num)
    q_counts = rng.multinomial(q, np.full(q, 1.0 / q), size=num)
    means = np.einsum("bs,sq,bq->b", s_counts, diff, q_counts) / (s * q)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def analyse(record: dict[str, Any]) -> dict[str, Any]:
    """Per configuration: accuracy per seed, mean, std, standard error; per clipper and
    full fine-tuning: the paired difference to LoRA alone (same rank; full FT against the
    first rank), wins/ties/losses per seed and the paired bootstrap interval."""
    runs = {config_name(r["method"], r["rank"]): r for r in record["runs"]}
    first_rank = record["protocol"]["ranks"][0]
    out: dict[str, Any] = {}
    for name, r in runs.items():
        correct = np.asarray(r["correct"], float)
        acc = correct.mean(axis=1)
        row = {
            "method": r["method"],
            "rank": r["rank"],
            "accuracy": acc.tolist(),
            "mean": float(acc.mean()),
            "std": float(acc.std(ddof=1)) if acc.size > 1 else 0.0,
            "se_per_seed": float(np.mean(np.sqrt(acc * (1 - acc) / correct.shape[1]))),
        }
        ref_name = config_name("lora", r["rank"] if r["rank"] is not None else first_rank)
        if r["method"] != "lora" and ref_name in runs:  # a --methods subset may lack it
            ref = runs[ref_name]
            ref_correct = np.asarray(ref["correct"], float)
            d = acc - ref_correct.mean(axis=1)
            row["vs_lora"] = {
                "diff": d.tolist(),
                "mean_diff": float(d.mean()),
                "wins": int(np.sum(d > 0)),
                "ties": int(np.sum(d == 0)),
                "losses": int(np.sum(d < 0)),
                "ci95": list(paired_bootstrap(correct - ref_correct)),
            }
        out[name] = row
    return out


def majority_guess(record: dict[str, Any]) -> tuple[int, float]:
    """The most common test answer (the smallest on a tie) and the accuracy of always
    answering it: the floor below which a model has learned nothing usable."""
    answers = np.asarray(record["test_answers"])
    values, counts = np.unique(answers, return_counts=True)
    best = int(values[np.argmax(counts)])
    return best, float(np.mean(answers == best))


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def findings(analysis: dict[str, Any], record: dict[str, Any]) -> list[str]:
    """The summary's sentences, each computed from ``analysis``."""
    lines = []
    n = len(record["seeds"])
    for row in analysis.values():
        v = row.get("vs_lora")
        if v is None:
            continue
        low, high = v["ci95"]
        where = "above" if low > 0 else "below" if high < 0 else "not distinguishable from"
        lines.append(
            f"{METHODS[row['method']]}"
            + (f" (rank {row['rank']})" if row["rank"] is not None else "")
            + f": {_pct(row['mean'])}% mean accuracy, {100 * v['mean_diff']:+.1f} points against "
            f"LoRA alone (95% paired bootstrap interval {100 * low:+.1f} to {100 * high:+.1f}: "
            f"{where} LoRA alone); higher on {v['wins']} of {n} seeds, equal on {v['ties']}, "
            f"lower on {v['losses']}."
        )
    return lines


def headline(analysis: dict[str, Any]) -> str:
    """One sentence: which clippers' intervals exclude zero."""
    compared = {k: r["vs_lora"] for k, r in analysis.items() if "vs_lora" in r}
    above = [
        k for k, v in compared.items() if analysis[k]["method"] in CLIPPERS and v["ci95"][0] > 0
    ]
    below = [
        k for k, v in compared.items() if analysis[k]["method"] in CLIPPERS and v["ci95"][1] < 0
    ]
    if not above and not below:
        return (
            "No clipper's accuracy differs from LoRA alone beyond its 95% paired bootstrap "
            "interval (every interval contains zero): these runs detect no effect of "
            "clipping, AGGC included."
        )
    parts = []
    if above:
        parts.append("above LoRA alone: " + ", ".join(above))
    if below:
        parts.append("below LoRA alone: " + ", ".join(below))
    return (
        "Configurations whose 95% paired bootstrap interval excludes zero: "
        + "; ".join(parts)
        + "."
    )


def summary_md(record: dict[str, Any]) -> str:
    analysis = analyse(record)
    p, meta = record["protocol"], record["meta"]
    n = len(record["seeds"])
    lines = [
        "# LoRA SFT in miniature: summary",
        "",
        f"Base model: {meta['base']['num_params']:,}-parameter byte-level LLaMA-style decoder "
        f"pretrained on the Python standard library (SHA-256 {meta['base']['sha256'][:16]}...). "
        f"Task: generated GSM8K-style word problems, {p['train_problems']} training problems, "
        f"{p['test_problems']} test problems from held-out templates and numbers, exact match of "
        f"the final number under greedy decoding. {p['steps']} optimizer steps of "
        f"{p['batch_size']} problems, AdamW (lr {p['lr']:g} for LoRA, {p['full_ft_lr']:g} for "
        f"full fine-tuning), cosine schedule with {100 * p['warmup_ratio']:g}% warm-up, no "
        f"weight decay. Seeds {record['seeds']} (paired: same adapters' start and batches per "
        f"seed). Training and evaluation took {meta['seconds'] / 60:.1f} minutes.",
        "",
        "| configuration | LoRA rank | accuracy % (mean +- std over seeds) | per seed | "
        "vs LoRA alone (points) | 95% paired bootstrap | higher / equal / lower |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in analysis.values():
        per_seed = ", ".join(_pct(a) for a in row["accuracy"])
        v = row.get("vs_lora")
        rest = (
            f"{100 * v['mean_diff']:+.1f} | "
            f"[{100 * v['ci95'][0]:+.1f}, {100 * v['ci95'][1]:+.1f}] | "
            f"{v['wins']} / {v['ties']} / {v['losses']}"
            if v
            else "(reference) | | "
        )
        rank = "-" if row["rank"] is None else str(row["rank"])
        lines.append(
            f"| {METHODS[row['method']]} | {rank} | {_pct(row['mean'])} +- {_pct(row['std'])} | "
            f"{per_seed} | {rest} |"
        )
    se = max(r["se_per_seed"] for r in analysis.values())
    guess, guess_acc = majority_guess(record)
    lines += [
        "",
        f"Standard error of one seed's accuracy (binomial, {p['test_problems']} problems): at "
        f"most {_pct(se)} points. Answering {guess} (the most common test answer) to every "
        f"problem would score {_pct(guess_acc)}%.",
        "",
        headline(analysis),
        "",
        *[f"- {s}" for s in findings(analysis, record)],
        "",
        f"Wins are counted per seed ({n} seeds): a seed counts as higher when its accuracy "
        "is above LoRA alone's on that seed.",
        "",
    ]
    clip_rows = [r for r in record["runs"] if r["clip_down_count"]]
    if clip_rows:
        lines += [
            f"Optimizer steps on which each group was clipped down (mean over seeds, of "
            f"{p['steps']}):",
            "",
            "| configuration | " + " | ".join(sorted(clip_rows[0]["clip_down_count"])) + " |",
            "|---|" + "---|" * len(clip_rows[0]["clip_down_count"]),
        ]
        for r in clip_rows:
            cells = [
                f"{np.mean(r['clip_down_count'][g]):.1f}" for g in sorted(r["clip_down_count"])
            ]
            lines.append(f"| {config_name(r['method'], r['rank'])} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# The paper's Table 1 GSM8K column (LoRA rank 128 in Appendix A), for the page.
PAPER_TABLE1_GSM8K = {
    "LLaMA 2-7B": {"Full FT": 49.13, "LoRA": 42.85, "AGGC": 48.06},
    "Mistral-7B": {"Full FT": 69.91, "LoRA": 69.5, "AGGC": 72.93},
    "Gemma-7B": {"Full FT": 72.09, "LoRA": 75.11, "AGGC": 78.54},
}


def page_table(record: dict[str, Any]) -> str:
    """The results table of docs/paper-miniature.md (one row per configuration)."""
    analysis = analyse(record)
    lines = [
        "| configuration | what it is | accuracy % (mean +- std) | vs LoRA alone (points) "
        "| 95% paired bootstrap | higher / equal / lower |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in analysis.items():
        v = row.get("vs_lora")
        rest = (
            f"{100 * v['mean_diff']:+.1f} | [{100 * v['ci95'][0]:+.1f}, {100 * v['ci95'][1]:+.1f}] "
            f"| {v['wins']} / {v['ties']} / {v['losses']}"
            if v
            else "(reference) | | "
        )
        lines.append(
            f"| `{name}` | {METHODS[row['method']]} | {_pct(row['mean'])} +- {_pct(row['std'])} "
            f"| {rest} |"
        )
    return "\n".join(lines)


def table1_form(record: dict[str, Any]) -> str:
    """Our accuracies in the form of the paper's Table 1 (GSM8K column), beside its numbers."""
    analysis = analyse(record)
    rank = record["protocol"]["ranks"][0]
    ours = {
        "Full FT": analysis["full_ft"],
        "LoRA": analysis[config_name("lora", rank)],
        "AGGC (presets.lora_sft, as described)": analysis[config_name("lora_sft_preset", rank)],
        "AGGC (callback as ran, accumulation 2)": analysis[config_name("as_ran_k2", rank)],
        "AGGC (callback as ran, accumulation 4)": analysis[config_name("as_ran_k4", rank)],
        "AGGC (aggc() defaults)": analysis[config_name("lora_aggc", rank)],
    }
    models = list(PAPER_TABLE1_GSM8K)
    lines = [
        "| strategy | here: generated test, % (mean +- std, 5 seeds) | "
        + " | ".join(f"paper: {m} GSM8K %" for m in models)
        + " |",
        "|---|---|" + "---|" * len(models),
    ]
    for strategy, row in ours.items():
        key = "AGGC" if strategy.startswith("AGGC") else strategy
        paper = " | ".join(f"{PAPER_TABLE1_GSM8K[m][key]:.2f}" for m in models)
        lines.append(f"| {strategy} | {_pct(row['mean'])} +- {_pct(row['std'])} | {paper} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Figures.
# ---------------------------------------------------------------------------


def _figure(w: float, h: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_accuracy(record: dict[str, Any], path: str) -> Any:
    analysis = analyse(record)
    fig = _figure(9, 4.6)
    ax = fig.subplots()
    names = list(analysis)
    for i, name in enumerate(names):
        row = analysis[name]
        acc = 100 * np.asarray(row["accuracy"])
        ax.scatter(np.full(acc.size, i) + np.linspace(-0.15, 0.15, acc.size), acc, s=14,
                   color="0.4", zorder=3)  # fmt: skip
        ax.errorbar(i, 100 * row["mean"], yerr=100 * row["std"], fmt="o", color="C3", ms=7,
                    capsize=4, zorder=4)  # fmt: skip
    lora = [100 * analysis[n]["mean"] for n in names if analysis[n]["method"] == "lora"]
    for value in lora:
        ax.axhline(value, color="C0", lw=0.8, ls="--")
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy % (exact match)")
    ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(
        f"Test accuracy per seed (grey) and mean +- std (red), {len(record['seeds'])} seeds\n"
        + textwrap.fill(headline(analysis), 130),
        fontsize=9,
    )
    fig.savefig(path, dpi=110)
    return fig


def plot_loss(record: dict[str, Any], path: str) -> Any:
    fig = _figure(9, 4.2)
    ax = fig.subplots()
    for i, r in enumerate(record["runs"]):
        loss = np.asarray(r["loss"], float).mean(axis=0)
        width = max(1, loss.size // 30)
        smooth = np.convolve(loss, np.ones(width) / width, mode="valid")
        ax.plot(np.arange(smooth.size) + width, smooth, lw=1.1, color=f"C{i % 10}",
                label=config_name(r["method"], r["rank"]))  # fmt: skip
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (completion bytes)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    finals = {config_name(r["method"], r["rank"]): float(np.mean(np.asarray(r["loss"])[:, -10:]))
              for r in record["runs"]}  # fmt: skip
    lo, hi = min(finals, key=finals.get), max(finals, key=finals.get)
    fig.suptitle(
        "Training loss, mean over seeds (moving average)\n"
        f"last 10 steps: lowest {lo} {finals[lo]:.3f}, highest {hi} {finals[hi]:.3f}",
        fontsize=9,
    )
    fig.savefig(path, dpi=110)
    return fig


def write_reports(record: dict[str, Any], out: str) -> str:
    os.makedirs(out, exist_ok=True)
    summary = summary_md(record)
    figs = {
        "paper_sft_accuracy.png": plot_accuracy(
            record, os.path.join(out, "paper_sft_accuracy.png")
        ),
        "paper_sft_loss.png": plot_loss(record, os.path.join(out, "paper_sft_loss.png")),
    }
    summary += "\n## Figure titles\n\n" + "".join(
        f"- `{name}`: {fig.get_suptitle().replace(chr(10), ' / ')}\n" for name, fig in figs.items()
    )
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary)
    # the page's tables need every method at the first rank (a second rank may be partial)
    complete = {(m, record["protocol"]["ranks"][0]) for m in METHODS if m != "full_ft"}
    if complete | {("full_ft", None)} <= {(r["method"], r["rank"]) for r in record["runs"]}:
        with open(os.path.join(out, "page_tables.md"), "w") as f:
            f.write(page_table(record) + "\n\n" + table1_form(record) + "\n")
    return summary


def _without_ranks(protocol: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in protocol.items() if k != "ranks"}


def load_record(path: str) -> dict[str, Any]:
    """A record (``results.json`` or ``.json.gz``), or several separated by commas (runs of
    the same protocol and seeds made by separate ``--methods`` or ``--ranks`` processes),
    merged; the merged protocol's ranks are the first record's, then any others in order."""
    records = []
    for part in path.split(","):
        opener = gzip.open if part.endswith(".gz") else open
        with opener(part, "rt") as f:
            records.append(json.load(f))
    merged = records[0]
    for other in records[1:]:
        for key in ("protocol", "seeds", "test_answers"):
            mine, theirs = merged[key], other[key]
            if key == "protocol":  # a second rank is run by its own process
                mine, theirs = _without_ranks(mine), _without_ranks(theirs)
            if mine != theirs:
                raise SystemExit(f"--report-from: the records differ in {key!r}; cannot merge")
        ranks = merged["protocol"]["ranks"]
        ranks += [r for r in other["protocol"]["ranks"] if r not in ranks]
        merged["runs"] += other["runs"]
        merged["meta"]["seconds"] = max(merged["meta"]["seconds"], other["meta"]["seconds"])
        merged["meta"]["command"] += " ; " + other["meta"]["command"]
    order = {m: i for i, m in enumerate(METHODS)}
    merged["runs"].sort(key=lambda r: (r["rank"] is None, r["rank"] or 0, order[r["method"]]))
    return merged


# ---------------------------------------------------------------------------
# The study.
# ---------------------------------------------------------------------------


def run_study(
    p: dict[str, Any],
    seeds: Sequence[int],
    corpus: str | None,
    quiet: bool,
    methods: Sequence[str] = tuple(METHODS),
) -> dict[str, Any]:
    start = time.perf_counter()
    base_path = paper_base.BASE_PATH
    if corpus is not None:  # a base model pretrained on another corpus, made here
        base_path = os.path.join(os.path.dirname(p.get("_out", ".")), "paper_base_custom.msgpack")
        base_meta = paper_base.pretrain(base_path, corpus, quiet=quiet)
        base = paper_base.load_base(base_path, sha256=base_meta["sha256"])
    else:
        base = paper_base.load_base()
        base_meta = {"sha256": paper_base.file_sha256(base_path), "corpus": "python-stdlib"}
    base_meta["num_params"] = int(sum(x.size for x in jax.tree.leaves(nnx.state(base, nnx.Param))))
    data = make_data(p)
    configs = [(m, r) for r in p["ranks"] for m in methods if m != "full_ft"]
    configs += [("full_ft", None)] if "full_ft" in methods else []
    bar = Progress(len(configs) * p["steps"], "paper SFT study", quiet=quiet)
    runs = []
    for method, rank in configs:
        out = train_runs(method, rank if rank else p["ranks"][0], seeds, p, data, base, bar)
        runs.append(
            {
                "method": method,
                "rank": rank,
                "seeds": list(seeds),
                "correct": out["correct"].tolist(),
                "loss": np.round(out["loss"], 5).tolist(),
                "clip_down_count": out["clip_down_count"],
                "seconds": out["seconds"],
            }
        )
        if "_out" in p:  # what is done so far survives an interrupted study
            os.makedirs(p["_out"], exist_ok=True)
            with open(os.path.join(p["_out"], "results.partial.json"), "w") as f:
                json.dump({"protocol": p.get("steps"), "runs": runs}, f)
    bar.close()
    return {
        "study": "paper_sft",
        "protocol": {k: v for k, v in p.items() if not k.startswith("_")},
        "seeds": list(seeds),
        "methods": METHODS,
        "runs": runs,
        "test_answers": [q.answer for q in data.test],
        "meta": {
            "base": base_meta,
            "seconds": time.perf_counter() - start,
            "jax": jax.__version__,
            "optax": optax.__version__,
            "command": "python examples/paper_sft.py " + " ".join(sys.argv[1:]),
        },
    }


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=_ints, default=[0, 1, 2, 3, 4],
                        help="comma-separated seeds (paired across methods)")  # fmt: skip
    parser.add_argument("--out", default=os.path.join("runs", "paper_sft"), help="output folder")
    parser.add_argument("--corpus", default=None, metavar="PATH",
                        help="pretrain the base on this text first (default: the vendored base, "
                        "pretrained on the Python standard library)")  # fmt: skip
    parser.add_argument("--ranks", type=_ints, default=None, help="LoRA ranks (default: protocol)")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny, not evidence")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated subset of the methods (to split the study over "
                        "processes; merge with --report-from A,B)")  # fmt: skip
    parser.add_argument("--report-from", default=None, metavar="RECORD",
                        help="rewrite summary.md and the figures from a record "
                        "(results.json or .json.gz)")  # fmt: skip
    parser.add_argument("--calibrate", default=None, metavar="JSON",
                        help="LoRA-alone calibration: a JSON list of protocol "
                        "overrides")  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds has repeats: {args.seeds}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        parser.error(f"--methods: unknown {unknown}; allowed: {list(METHODS)}")
    if args.ranks is not None and min(args.ranks) < 1:
        parser.error(f"--ranks must be >= 1, got {args.ranks}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.report_from is not None:
        record = load_record(args.report_from)
        summary = write_reports(record, args.out)
        if "," in args.report_from:  # the merged record, next to its reports
            with open(os.path.join(args.out, "results.json"), "w") as f:
                json.dump(record, f)
        print(summary)
        return record
    if args.calibrate is not None:
        rows = calibrate(json.loads(args.calibrate), args.seeds)
        return {"calibration": rows}
    p = {**PROTOCOL, **(QUICK if args.quick else {}), "_out": args.out}
    if args.ranks is not None:
        p["ranks"] = list(args.ranks)
    record = run_study(p, args.seeds, args.corpus, args.quiet, args.methods)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(record, f)
    summary = write_reports(record, args.out)
    if not args.quiet:
        print(summary)
    return record


if __name__ == "__main__":
    main()
