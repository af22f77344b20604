"""Which gradient clipping stabilises training? A study on real text.

Trains the main job's LLaMA-style byte-level model (``train_lm.py``) on the
running Python's standard library (``text_corpus.py``: no download; the file
count, byte count and SHA-256 are printed and recorded) under every method in
:data:`METHODS`: AdamW alone, global-norm clipping, the default ``aggc()``, the
authors' recipes (``presets.lora_sft``, ``presets.grpo``), AdaGC-style
per-tensor clipping (``presets.adagc``) and four variants of ``aggc()``. Every
method sees the same initial weights and the same batches for a given seed.

Regimes:

* **learning-rate sweep**: final held-out loss per (method, rate) over
  ``--seeds`` seeds, and the learning-rate sensitivity of Wortsman et al. 2023,
  ``mean over rates of min(loss(rate), loss_at_init) - min over rates of loss``;
* **group fault**: one module type's gradients (``--fault-group``) multiplied by
  ``--fault-scale`` for ``--fault-steps``, at the rate ``--fault-lr``;
* **bad batch**: one batch of uniformly random bytes at ``--bad-batch-step``.

A fault run is compared with the sweep run of the same method, seed and rate
(same batches, no fault): the held-out loss lost, the steps until the training
loss is back within ``--recover-tol`` of the fault-free run, and per group how
often and how hard the method rescaled the gradient.

All runs of one method train together (``jax.vmap`` over runs), so each method
compiles once. Writes ``results.json`` (every run), ``summary.md`` (the tables
and the findings, every sentence computed from the data), ``loss_vs_lr.png``,
``fault_curves.png`` and ``scale_heatmap.png`` to ``--out``. The full study
takes about half an hour on 2 CPU cores; ``--quick`` is a smoke test of the
pipeline (about a minute), not evidence.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from progress import Progress
from text_corpus import VOCAB_SIZE, Corpus, load_corpus, window_starts, windows
from train_lm import (
    LlamaForCausalLM,
    ModelConfig,
    centered_mean,
    group_factors,
    group_ids,
    group_norms,
    token_losses,
)

# ---------------------------------------------------------------------------
# Methods: name -> (description, builder(total_steps)).
# ---------------------------------------------------------------------------

Builder = Callable[[int], optax.GradientTransformation]

# Recorded with each run, so a record says what "the defaults" were when it ran.
_AGGC_DEFAULTS = {
    k: v.default
    for k, v in inspect.signature(aggc_optax.aggc).parameters.items()
    if v.default is not inspect.Parameter.empty
}

METHODS: dict[str, tuple[str, Builder]] = {
    "adamw": ("AdamW alone, no clipping", lambda t: optax.identity()),
    "global_clip": ("optax.clip_by_global_norm(1.0)", lambda t: optax.clip_by_global_norm(1.0)),
    "aggc_default": (
        f"aggc() with its defaults (high_mult={_AGGC_DEFAULTS['high_mult']}, "
        f"ema_beta={_AGGC_DEFAULTS['ema_beta']}, ema_init={_AGGC_DEFAULTS['ema_init']!r})",
        lambda t: aggc_optax.aggc(),
    ),
    "lora_sft": ("presets.lora_sft(total_steps)", lambda t: presets.lora_sft(t)),
    "grpo": ("presets.grpo() (as the authors ran it)", lambda t: presets.grpo()),
    "adagc": ("presets.adagc() (per tensor)", lambda t: presets.adagc()),
    "aggc_high1.5": ("aggc(high_mult=1.5)", lambda t: aggc_optax.aggc(high_mult=1.5)),
    "aggc_high2": ("aggc(high_mult=2.0)", lambda t: aggc_optax.aggc(high_mult=2.0)),
    "aggc_beta0.95": ("aggc(ema_beta=0.95)", lambda t: aggc_optax.aggc(ema_beta=0.95)),
    "aggc_ema_zero": ('aggc(ema_init="zero")', lambda t: aggc_optax.aggc(ema_init="zero")),
}
# The full study's methods (the 30-minute budget holds nine); --methods takes any of METHODS.
DEFAULT_METHODS = tuple(m for m in METHODS if m != "aggc_beta0.95")
QUICK_METHODS = ("adamw", "global_clip", "aggc_default", "lora_sft")
CLIPPING = tuple(m for m in METHODS if m != "adamw")
RESCALED_TOL = 1e-4  # a factor further than this from 1 counts as "rescaled"


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run: a method at a rate and seed, in one regime."""

    kind: str  # "sweep", "group_fault" or "bad_batch"
    lr: float
    seed: int


@dataclasses.dataclass(frozen=True)
class Setup:
    steps: int
    batch_size: int
    seq_len: int
    rates: tuple[float, ...]
    seeds: tuple[int, ...]
    fault_lr: float
    fault_group: str
    fault_scale: float
    fault_window: tuple[int, int]
    bad_batch_step: int
    eval_every: int
    eval_windows: int
    recover_tol: float
    warmup_steps: int
    weight_decay: float
    model: ModelConfig

    def runs(self) -> list[Run]:
        sweep = [Run("sweep", lr, s) for lr in self.rates for s in self.seeds]
        faults = [
            Run(kind, self.fault_lr, s) for kind in ("group_fault", "bad_batch") for s in self.seeds
        ]
        return sweep + faults


# ---------------------------------------------------------------------------
# Training: every run of one method at once.
# ---------------------------------------------------------------------------


def lr_shape(step: jax.Array, setup: Setup) -> jax.Array:
    """Linear warm-up to 1, cosine decay to 0.1: the multiplier of each run's peak rate."""
    step = step.astype(jnp.float32)
    warm = (step + 1) / setup.warmup_steps
    progress = jnp.clip(
        (step - setup.warmup_steps) / max(1, setup.steps - setup.warmup_steps), 0.0, 1.0
    )
    cosine = 0.1 + 0.9 * 0.5 * (1 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < setup.warmup_steps, warm, cosine)


def adam_direction(setup: Setup) -> optax.GradientTransformation:
    """AdamW without its learning rate: the step applies ``-lr * lr_shape`` itself."""
    return optax.chain(
        optax.scale_by_adam(b1=0.9, b2=0.99), optax.add_decayed_weights(setup.weight_decay)
    )


def groups_of(params: Any) -> tuple[list[str], list[int]]:
    """The reference's module-type groups of ``params`` and, per leaf, its group (-1: none)."""
    labels = list(aggc_optax.describe_groups(params)["groups"])
    return labels, group_ids(params, labels)


def make_step(
    graphdef: Any,
    clipper: optax.GradientTransformation,
    adam: optax.GradientTransformation,
    setup: Setup,
    ids: Sequence[int],
    num_groups: int,
    fault_leaf: Sequence[bool],
) -> Any:
    """A jitted training step of all runs of one method (``vmap`` over runs)."""

    def loss_fn(params: Any, tokens: jax.Array) -> jax.Array:
        return jnp.mean(token_losses(nnx.merge(graphdef, params), tokens))

    def one(params: Any, state: Any, tokens: jax.Array, lr: jax.Array, fault: jax.Array) -> Any:
        clip_state, adam_state, count = state
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        leaves, treedef = jax.tree_util.tree_flatten(grads)
        leaves = [g * fault if hit else g for g, hit in zip(leaves, fault_leaf)]
        grads = jax.tree_util.tree_unflatten(treedef, leaves)
        clipped, clip_state = clipper.update(grads, clip_state, params)
        direction, adam_state = adam.update(clipped, adam_state, params)
        step_size = -lr * lr_shape(count, setup)
        params = jax.tree.map(lambda p, u: p + step_size * u, params, direction)
        norms = jnp.stack(
            [group_norms(grads, ids, num_groups), group_norms(clipped, ids, num_groups)]
        )
        return params, (clip_state, adam_state, count + 1), loss, norms

    return jax.jit(jax.vmap(one), donate_argnums=(0, 1))


def make_eval(graphdef: Any) -> Any:
    def one(params: Any, tokens: jax.Array) -> jax.Array:
        return jnp.mean(token_losses(nnx.merge(graphdef, params), tokens))

    return jax.jit(jax.vmap(one, in_axes=(0, None)))


@dataclasses.dataclass
class Data:
    """Every run's batches, drawn once: the same for every method."""

    corpus: Corpus
    starts: dict[int, np.ndarray]  # seed -> [steps, batch] window starts
    bad_batch: dict[int, np.ndarray]  # seed -> [batch, seq+1] random bytes
    eval_tokens: np.ndarray


def make_data(corpus: Corpus, setup: Setup) -> Data:
    length = setup.seq_len + 1
    starts, bad = {}, {}
    for seed in setup.seeds:
        rng = np.random.default_rng(10_000 + seed)
        starts[seed] = np.stack(
            [window_starts(corpus.train, setup.batch_size, length, rng) for _ in range(setup.steps)]
        )
        bad[seed] = rng.integers(0, VOCAB_SIZE, size=(setup.batch_size, length), dtype=np.int32)
    eval_rng = np.random.default_rng(12345)
    eval_tokens = windows(
        corpus.heldout, window_starts(corpus.heldout, setup.eval_windows, length, eval_rng), length
    )
    return Data(corpus, starts, bad, eval_tokens)


def _batch(data: Data, setup: Setup, runs: Sequence[Run], step: int) -> np.ndarray:
    by_seed = {
        s: windows(data.corpus.train, data.starts[s][step], setup.seq_len + 1) for s in setup.seeds
    }
    return np.stack(
        [
            data.bad_batch[r.seed]
            if r.kind == "bad_batch" and step == setup.bad_batch_step
            else by_seed[r.seed]
            for r in runs
        ]
    )


def _fault(setup: Setup, runs: Sequence[Run], step: int) -> np.ndarray:
    start, end = setup.fault_window
    hit = start <= step < end
    return np.asarray(
        [setup.fault_scale if r.kind == "group_fault" and hit else 1.0 for r in runs], np.float32
    )


def init_params(setup: Setup, seed: int) -> tuple[Any, Any]:
    model = nnx.jit(lambda: LlamaForCausalLM(setup.model, nnx.Rngs(seed)))()
    return nnx.split(model, nnx.Param)


def train_method(method: str, setup: Setup, data: Data, bar: Progress) -> dict[str, np.ndarray]:
    """Every run of ``method``: losses, held-out curve and group norms before/after."""
    runs = setup.runs()
    clipper = METHODS[method][1](setup.steps)
    built = {s: init_params(setup, s) for s in setup.seeds}
    graphdef = built[setup.seeds[0]][0]
    params = jax.tree.map(lambda *xs: jnp.stack(xs), *[built[r.seed][1] for r in runs])
    labels, ids = groups_of(built[setup.seeds[0]][1])
    fault_leaf = [j >= 0 and labels[j] == setup.fault_group for j in ids]
    adam = adam_direction(setup)
    state = jax.jit(jax.vmap(lambda p: (clipper.init(p), adam.init(p), jnp.int32(0))))(params)
    step_fn = make_step(graphdef, clipper, adam, setup, ids, len(labels), fault_leaf)
    evaluate = make_eval(graphdef)
    lrs = jnp.asarray([r.lr for r in runs], jnp.float32)
    eval_tokens = jnp.asarray(data.eval_tokens)

    losses, norms, evals = [], [], [(0, evaluate(params, eval_tokens))]
    for step in range(setup.steps):
        tokens = jnp.asarray(_batch(data, setup, runs, step))
        fault = jnp.asarray(_fault(setup, runs, step))
        params, state, loss, norm = step_fn(params, state, tokens, lrs, fault)
        losses.append(loss)
        norms.append(norm)
        if (step + 1) % setup.eval_every == 0 or step + 1 == setup.steps:
            evals.append((step + 1, evaluate(params, eval_tokens)))
        bar.update(1, f"{method}: median train loss {float(jnp.nanmedian(loss)):.3f}")
    return {
        "labels": labels,
        "loss": np.asarray(jax.device_get(losses)).T,  # [runs, steps]
        "before": np.asarray(jax.device_get(norms))[:, :, 0].transpose(1, 0, 2),  # [runs, steps, G]
        "after": np.asarray(jax.device_get(norms))[:, :, 1].transpose(1, 0, 2),
        "eval_steps": np.asarray([s for s, _ in evals]),
        "eval": np.asarray(jax.device_get([v for _, v in evals])).T,  # [runs, evals]
    }


# ---------------------------------------------------------------------------
# Analysis: every number of the summary, from the recorded runs.
# ---------------------------------------------------------------------------


def finite_or_inf(x: float) -> float:
    return float(x) if math.isfinite(x) else math.inf


def lr_sensitivity(losses_by_rate: Sequence[float], loss_at_init: float) -> float:
    """Wortsman et al. 2023: mean over rates of ``min(loss, init) - min over rates``."""
    capped = [min(finite_or_inf(v), loss_at_init) for v in losses_by_rate]
    return float(np.mean(capped) - min(capped))


def steps_to_recover(diff: np.ndarray, fault_end: int, tol: float, width: int = 9) -> int | None:
    """Steps after ``fault_end`` until the smoothed loss gap stays within ``tol``; None: never."""
    if not np.all(np.isfinite(diff[fault_end:])):
        return None
    smooth = centered_mean(diff, width)
    above = np.nonzero(np.abs(smooth[fault_end:]) > tol)[0]
    if above.size == 0:
        return 0
    last = int(above[-1])
    return None if fault_end + last + 1 >= diff.size else last + 1


def analyse(results: dict[str, dict[str, Any]], setup: Setup) -> dict[str, Any]:
    runs = setup.runs()
    index = {(r.kind, r.lr, r.seed): i for i, r in enumerate(runs)}
    first = next(iter(results.values()))
    labels = first["labels"]
    loss_at_init = float(np.mean(first["eval"][:, 0]))
    fault_g = labels.index(setup.fault_group)
    others = [j for j in range(len(labels)) if j != fault_g]
    start, end = setup.fault_window
    out: dict[str, Any] = {"loss_at_init": loss_at_init, "labels": labels, "methods": {}}
    for method, r in results.items():
        final = r["eval"][:, -1]
        sweep = {
            lr: [finite_or_inf(final[index[("sweep", lr, s)]]) for s in setup.seeds]
            for lr in setup.rates
        }
        mean_by_rate = [float(np.mean(sweep[lr])) for lr in setup.rates]
        best = int(np.argmin([finite_or_inf(v) for v in mean_by_rate]))
        f = group_factors(r["before"], r["after"])
        base_runs = [index[("sweep", setup.fault_lr, s)] for s in setup.seeds]
        normal = f[base_runs]
        entry: dict[str, Any] = {
            "final_heldout": {str(lr): sweep[lr] for lr in setup.rates},
            "mean_by_rate": mean_by_rate,
            "best_rate": setup.rates[best],
            "best_loss": mean_by_rate[best],
            "sensitivity": lr_sensitivity(mean_by_rate, loss_at_init),
            "diverged_rates": [
                lr for lr, v in zip(setup.rates, mean_by_rate) if not v < loss_at_init
            ],
            "normal_rescaled_share": float(np.mean(np.abs(normal - 1) > RESCALED_TOL)),
            "normal_rescaled_share_by_group": {
                label: float(np.mean(np.abs(normal[:, :, j] - 1) > RESCALED_TOL))
                for j, label in enumerate(labels)
            },
        }
        for kind in ("group_fault", "bad_batch"):
            hit = [index[(kind, setup.fault_lr, s)] for s in setup.seeds]
            # The fault's steps [first, at): the window, or the one bad step.
            first, at = (
                (start, end)
                if kind == "group_fault"
                else (setup.bad_batch_step, setup.bad_batch_step + 1)
            )
            window = slice(first, at)
            eval_at = int(np.searchsorted(r["eval_steps"], at))
            diffs = r["loss"][hit] - r["loss"][base_runs]
            if kind == "bad_batch":  # the bad batch's own loss is not a training-loss gap
                diffs[:, setup.bad_batch_step] = 0.0
            fw = f[hit][:, window]
            entry[kind] = {
                "heldout_gap_after": float(
                    np.mean(r["eval"][hit, eval_at] - r["eval"][base_runs, eval_at])
                ),
                "heldout_after_step": int(r["eval_steps"][eval_at]),
                "final_gap": float(np.mean(r["eval"][hit, -1] - r["eval"][base_runs, -1])),
                "steps_to_recover": [steps_to_recover(d, at, setup.recover_tol) for d in diffs],
                "gap_curve": np.mean(diffs, axis=0).tolist(),
                "min_factor_by_group": {
                    label: float(np.min(fw[:, :, j])) for j, label in enumerate(labels)
                },
                "rescaled_share_by_group": {
                    label: float(np.mean(np.abs(fw[:, :, j] - 1) > RESCALED_TOL))
                    for j, label in enumerate(labels)
                },
                "other_groups_min_factor": float(np.min(fw[:, :, others])),
                "other_groups_rescaled": int(np.sum(np.abs(fw[:, :, others] - 1) > RESCALED_TOL)),
                "other_groups_pairs": int(fw[:, :, others].size),
            }
        out["methods"][method] = entry
    return out


# ---------------------------------------------------------------------------
# Reports.
# ---------------------------------------------------------------------------


def _fmt(v: float, digits: int = 3) -> str:
    return "diverged (inf/nan)" if not math.isfinite(v) else f"{v:.{digits}f}"


def _recover_text(values: Sequence[int | None]) -> str:
    return ", ".join("never" if v is None else str(v) for v in values)


def findings(analysis: dict[str, Any], setup: Setup) -> list[str]:
    """The summary's sentences, each computed from ``analysis``."""
    m = analysis["methods"]
    init = analysis["loss_at_init"]
    clipping = [k for k in CLIPPING if k in m]
    lines = []
    sens = sorted(m, key=lambda k: m[k]["sensitivity"])
    lines.append(
        f"Lowest learning-rate sensitivity: {sens[0]} ({m[sens[0]]['sensitivity']:.3f}); "
        f"highest: {sens[-1]} ({m[sens[-1]]['sensitivity']:.3f}); AdamW alone: "
        f"{m['adamw']['sensitivity']:.3f}; aggc() defaults: {m['aggc_default']['sensitivity']:.3f}."
    )
    best = min(m, key=lambda k: m[k]["best_loss"])
    lines.append(
        f"Lowest held-out loss at any rate: {best} ({m[best]['best_loss']:.3f} at lr "
        f"{m[best]['best_rate']:g}); AdamW alone {m['adamw']['best_loss']:.3f} at lr "
        f"{m['adamw']['best_rate']:g}."
    )
    div = {k: v["diverged_rates"] for k, v in m.items() if v["diverged_rates"]}
    if "adamw" not in div:
        lines.append(
            f"AdamW alone never ended above its loss at initialisation ({init:.3f}) at any rate "
            f"up to {max(setup.rates):g}: on this model the sweep does not reach a rate where "
            "unclipped AdamW diverges."
        )
    if div:
        lines.append(
            "Ended at or above the loss at initialisation (seed mean): "
            + "; ".join(f"{k} at lr {', '.join(f'{x:g}' for x in v)}" for k, v in div.items())
            + "."
        )
    else:
        lines.append("No method ended above its loss at initialisation at any rate.")
    fault = {k: v["group_fault"] for k, v in m.items()}
    spill = [k for k in clipping if fault[k]["other_groups_rescaled"] > 0]
    clean = [k for k in clipping if fault[k]["other_groups_rescaled"] == 0]
    g = setup.fault_group
    lines.append(
        f"During the {g} fault, the other groups were never rescaled by: "
        + (", ".join(clean) if clean else "no clipping method")
        + "; rescaled by: "
        + (
            ", ".join(f"{k} (min factor {fault[k]['other_groups_min_factor']:.3g})" for k in spill)
            if spill
            else "none"
        )
        + "."
    )
    hard = [k for k in clipping if fault[k]["min_factor_by_group"][g] < 0.2]
    lines.append(
        f"Methods that scaled {g} below 0.2 during its fault: "
        + (
            ", ".join(f"{k} ({fault[k]['min_factor_by_group'][g]:.3g})" for k in hard)
            if hard
            else "none"
        )
        + "."
    )
    normal = sorted(clipping, key=lambda k: m[k]["normal_rescaled_share"])
    lines.append(
        f"On fault-free steps at lr {setup.fault_lr:g}, the share of (step, group) pairs "
        "rescaled: "
        + ", ".join(f"{k} {100 * m[k]['normal_rescaled_share']:.1f}%" for k in normal)
        + "."
    )
    for kind, name in (("group_fault", f"the {g} fault"), ("bad_batch", "the bad batch")):
        order = sorted(m, key=lambda k: m[k][kind]["final_gap"])
        lines.append(
            f"Final held-out loss cost of {name} (fault run minus fault-free run): smallest "
            f"{order[0]} ({m[order[0]][kind]['final_gap']:+.3f}), largest {order[-1]} "
            f"({m[order[-1]][kind]['final_gap']:+.3f}); AdamW alone "
            f"{m['adamw'][kind]['final_gap']:+.3f}, aggc() defaults "
            f"{m['aggc_default'][kind]['final_gap']:+.3f}."
        )
    return lines


def summary_md(analysis: dict[str, Any], setup: Setup, meta: dict[str, Any]) -> str:
    m = analysis["methods"]
    c = meta["corpus"]
    start, end = setup.fault_window
    lines = [
        "# Stability study: summary",
        "",
        f"Corpus: {c['source']}, {c['num_files']} files ({c['num_train_files']} train / "
        f"{c['num_heldout_files']} held out), {c['num_bytes']:,} bytes, sha256 `{c['sha256']}`.",
        f"Model: LLaMA-style byte-level decoder, {meta['num_params']:,} parameters "
        f"({setup.model.num_layers} layers, d_model {setup.model.d_model}); {setup.steps} steps "
        f"of {setup.batch_size} x {setup.seq_len} bytes; AdamW (b2 0.99, weight decay "
        f"{setup.weight_decay:g}), {setup.warmup_steps} warm-up steps, cosine decay to 0.1x. "
        f"Seeds {', '.join(map(str, setup.seeds))}. Held-out loss: mean next-byte loss on "
        f"{setup.eval_windows} fixed windows of held-out files; at initialisation "
        f"{analysis['loss_at_init']:.3f}. Took {meta['seconds']:.0f} s.",
        "",
        "## Findings",
        "",
        *[f"- {s}" for s in findings(analysis, setup)],
        "",
        "## Learning-rate sweep: final held-out loss (seed mean ± std)",
        "",
        "| method | "
        + " | ".join(f"lr {lr:g}" for lr in setup.rates)
        + " | best | LR sensitivity |",
        "|---|" + "---|" * (len(setup.rates) + 2),
    ]
    for k, v in m.items():
        cells = []
        for lr in setup.rates:
            vals = np.asarray(v["final_heldout"][str(lr)])
            cells.append(
                _fmt(float(np.mean(vals)))
                if not np.all(np.isfinite(vals))
                else f"{np.mean(vals):.3f} ± {np.std(vals):.3f}"
            )
        lines.append(
            f"| {k} | "
            + " | ".join(cells)
            + f" | {v['best_loss']:.3f} @ {v['best_rate']:g} | {v['sensitivity']:.3f} |"
        )
    g = setup.fault_group
    for kind, title in (
        ("group_fault", f"{g} gradients x{setup.fault_scale:g} at steps {start}-{end - 1}"),
        ("bad_batch", f"one batch of random bytes at step {setup.bad_batch_step}"),
    ):
        lines += [
            "",
            f"## Fault: {title} (lr {setup.fault_lr:g})",
            "",
            "Gaps are fault run minus the fault-free run of the same method and seed (seed mean); "
            f"recovery: steps until the smoothed training-loss gap stays within "
            f"{setup.recover_tol:g} (per seed).",
            "",
            "| method | held-out gap after | final held-out gap | steps to recover | "
            f"{g} min factor | other groups min factor | other (step, group) pairs rescaled |",
            "|---|---|---|---|---|---|---|",
        ]
        for k, v in m.items():
            e = v[kind]
            lines.append(
                f"| {k} | {e['heldout_gap_after']:+.3f} (step {e['heldout_after_step']}) "
                f"| {e['final_gap']:+.3f} | {_recover_text(e['steps_to_recover'])} "
                f"| {e['min_factor_by_group'][g]:.3g} | {e['other_groups_min_factor']:.3g} "
                f"| {e['other_groups_rescaled']} of {e['other_groups_pairs']} |"
            )
    labels = analysis["labels"]
    lines += [
        "",
        f"## Fault-free steps: share of steps each group was rescaled (lr {setup.fault_lr:g})",
        "",
        "| method | all groups | " + " | ".join(labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    for k in (k for k in CLIPPING if k in m):
        v = m[k]
        lines.append(
            f"| {k} | {100 * v['normal_rescaled_share']:.1f}% | "
            + " | ".join(f"{100 * v['normal_rescaled_share_by_group'][lb]:.1f}%" for lb in labels)
            + " |"
        )
    lines += ["", "Methods:", ""]
    # the record's own descriptions: what a method meant when it ran, not what it means now
    described = meta.get("methods", {})
    lines += [f"- `{k}`: {described.get(k, METHODS[k][0])}" for k in m]
    return "\n".join(lines) + "\n"


def _figure(w: float, h: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colors(methods: Sequence[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {k: cmap(i % 10) for i, k in enumerate(methods)}


def plot_loss_vs_lr(analysis: dict[str, Any], setup: Setup, path: str) -> None:
    fig = _figure(8, 5)
    ax = fig.subplots()
    colors = _colors(list(analysis["methods"]))
    init = analysis["loss_at_init"]
    for k, v in analysis["methods"].items():
        vals = np.asarray([v["final_heldout"][str(lr)] for lr in setup.rates])  # [rates, seeds]
        shown = np.minimum(np.where(np.isfinite(vals), vals, np.inf), init * 1.2)
        ax.plot(
            setup.rates,
            shown.mean(1),
            marker="o",
            ms=3,
            color=colors[k],
            label=k,
            ls="--" if k == "adamw" else "-",
        )
        ax.fill_between(setup.rates, shown.min(1), shown.max(1), color=colors[k], alpha=0.15, lw=0)
    ax.axhline(init, color="k", lw=0.8, ls=":", label=f"loss at initialisation ({init:.2f})")
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final held-out loss (nats/byte)")
    ax.set_title(
        f"Final held-out loss vs learning rate, {len(setup.seeds)} seeds\n"
        "(line: seed mean, band: min-max; values capped at 1.2x the initial loss)"
    )
    ax.grid(True, which="both", alpha=0.3, lw=0.5)
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path, dpi=110)


def plot_fault_curves(analysis: dict[str, Any], setup: Setup, path: str) -> None:
    fig = _figure(12, 4.5)
    axes = fig.subplots(1, 2)
    colors = _colors(list(analysis["methods"]))
    start, end = setup.fault_window
    for ax, kind, title, span in (
        (axes[0], "group_fault", f"{setup.fault_group} x{setup.fault_scale:g}", (start, end)),
        (
            axes[1],
            "bad_batch",
            "one random-byte batch",
            (setup.bad_batch_step, setup.bad_batch_step + 1),
        ),
    ):
        for k, v in analysis["methods"].items():
            gap = np.asarray(v[kind]["gap_curve"])
            ax.plot(
                centered_mean(gap, 9),
                color=colors[k],
                lw=1.2,
                label=k,
                ls="--" if k == "adamw" else "-",
            )
        ax.axvspan(span[0] - 0.5, span[1] - 0.5, color="0.5", alpha=0.25, lw=0)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss, fault run minus fault-free run")
        ax.set_title(f"{title} (grey band), lr {setup.fault_lr:g}")
        ax.grid(True, alpha=0.3, lw=0.5)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(
        f"Fault run minus fault-free run, mean of {len(setup.seeds)} seed(s), centred 9-step mean\n"
        "(it spreads each event 4 steps either way, so curves move just before a fault)"
    )
    fig.savefig(path, dpi=110)


def plot_scale_heatmap(
    scales: dict[str, np.ndarray], labels: Sequence[str], setup: Setup, path: str
) -> None:
    from matplotlib.colors import TwoSlopeNorm

    methods = [k for k in scales if k != "adamw"]
    ncols = 3
    nrows = math.ceil(len(methods) / ncols)
    fig = _figure(5 * ncols, 2.6 * nrows + 0.8)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    norm = TwoSlopeNorm(vmin=-2.0, vcenter=0.0, vmax=0.5)
    image = None
    for i, k in enumerate(methods):
        ax = axes[i // ncols][i % ncols]
        logf = np.log10(np.clip(scales[k].T, 1e-2, 10**0.5))
        image = ax.imshow(logf, aspect="auto", cmap="RdBu", norm=norm, interpolation="nearest")
        ax.set_title(k, fontsize=9)
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
        ax.set_xlabel("step", fontsize=8)
    for j in range(len(methods), nrows * ncols):
        fig.delaxes(axes[j // ncols][j % ncols])
    start, end = setup.fault_window
    fig.suptitle(
        f"Factor applied to each group's gradient (log10; 0 = untouched, red = shrunk, blue = "
        f"raised), {setup.fault_group} x{setup.fault_scale:g} at steps {start}-{end - 1}"
        f", seed {setup.seeds[0]}"
    )
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="log10(factor)")
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _window(text: str) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END, got {text!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"need 0 <= START < END, got {text!r}")
    return start, end


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", default=os.path.join("runs", "stability"), help="output folder")
    p.add_argument(
        "--corpus",
        default=None,
        help="a text file or a folder of text files (default: the Python stdlib)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test of the pipeline: 30 steps, 2 rates, 1 seed, 4 methods (not evidence)",
    )
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 200; quick 30)")
    p.add_argument(
        "--rates",
        type=_floats,
        default=None,
        help="peak learning rates (default 1e-3,3e-3,...,1,3; quick 1e-3,3e-3)",
    )
    p.add_argument("--seeds", type=_ints, default=None, help="seeds (default 0,1,2; quick 0)")
    p.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated subset of: {', '.join(METHODS)} (default: all but aggc_beta0.95; "
        f"quick: {','.join(QUICK_METHODS)})",
    )
    p.add_argument("--batch-size", type=int, default=16, help="sequences per batch")
    p.add_argument("--seq-len", type=int, default=64, help="bytes per sequence")
    p.add_argument("--d-model", type=int, default=64, help="model width")
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--mlp-dim", type=int, default=172, help="MLP hidden width")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument(
        "--fault-lr",
        type=float,
        default=3e-3,
        help="learning rate of the fault runs (must be one of --rates)",
    )
    p.add_argument("--fault-group", default="v_proj", help="group whose gradients are corrupted")
    p.add_argument("--fault-scale", type=float, default=100.0, help="gradient multiplier")
    p.add_argument(
        "--fault-steps",
        type=_window,
        default=None,
        help="START:END, END exclusive (default 50:70; quick 10:15)",
    )
    p.add_argument(
        "--bad-batch-step",
        type=int,
        default=None,
        help="step of the random-byte batch (default 100; quick 20)",
    )
    p.add_argument(
        "--recover-tol",
        type=float,
        default=0.02,
        help="training-loss gap (nats) counted as recovered",
    )
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows evaluated")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument(
        "--report-from",
        default=None,
        metavar="RESULTS_JSON",
        help="only rewrite summary.md and the PNGs in --out from an earlier results.json",
    )
    args = p.parse_args(argv)
    quick = args.quick
    args.steps = args.steps or (30 if quick else 200)
    args.rates = args.rates or (
        (1e-3, 3e-3) if quick else (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)
    )
    args.seeds = args.seeds or ((0,) if quick else (0, 1, 2))
    args.fault_steps = args.fault_steps or ((10, 15) if quick else (50, 70))
    if args.bad_batch_step is None:
        args.bad_batch_step = 20 if quick else 100
    if args.methods is None:
        args.methods = ",".join(QUICK_METHODS if quick else DEFAULT_METHODS)
    args.methods = tuple(x for x in args.methods.split(",") if x)
    unknown = [x for x in args.methods if x not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; allowed: {', '.join(METHODS)}")
    if "adamw" not in args.methods or "aggc_default" not in args.methods:
        p.error("--methods must include adamw and aggc_default (the summary compares them)")
    if args.fault_lr not in args.rates:
        p.error(
            f"--fault-lr {args.fault_lr:g} must be one of --rates {args.rates}: a fault run "
            "is compared with the sweep run at its rate"
        )
    for flag in (
        "steps",
        "batch_size",
        "seq_len",
        "d_model",
        "layers",
        "heads",
        "mlp_dim",
        "eval_windows",
    ):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.d_model % (2 * args.heads):
        p.error(f"--d-model ({args.d_model}) must be a multiple of 2 x --heads ({args.heads})")
    if args.fault_steps[1] > args.steps or not 0 <= args.bad_batch_step < args.steps:
        p.error("--fault-steps and --bad-batch-step must lie within --steps")
    return args


def setup_of(record: dict[str, Any]) -> Setup:
    """The :class:`Setup` a ``results.json`` record was made with."""
    fields = dict(record["setup"])
    for key in ("rates", "seeds", "fault_window"):
        fields[key] = tuple(fields[key])
    fields["model"] = ModelConfig(**fields["model"])
    return Setup(**fields)


def pooled_sweep(records: Sequence[dict[str, Any]]) -> dict[tuple[str, float], dict[int, float]]:
    """Final held-out loss by ``(method, rate)`` and seed, over several study records.

    Only records with the same corpus, model and schedule may be pooled; a seed
    that two records both ran must agree (same seed, same run).
    """
    keys = ("model", "steps", "batch_size", "seq_len", "weight_decay")
    first = records[0]
    pooled: dict[tuple[str, float], dict[int, float]] = {}
    for record in records:
        if record["corpus"]["sha256"] != first["corpus"]["sha256"] or any(
            record["setup"][k] != first["setup"][k] for k in keys
        ):
            raise ValueError("records differ in corpus or setup; they cannot be pooled")
        for run in record["runs"]:
            if run["kind"] != "sweep":
                continue
            seeds = pooled.setdefault((run["method"], float(run["lr"])), {})
            loss = finite_or_inf(run["final_heldout"])
            if run["seed"] in seeds and seeds[run["seed"]] != loss:
                raise ValueError(f"seed {run['seed']} differs between records")
            seeds[run["seed"]] = loss
    return pooled


def pooled_md(records: Sequence[dict[str, Any]], methods: Sequence[str]) -> str:
    """Markdown table of :func:`pooled_sweep` (seed mean ± std) at the rates all records ran."""
    pooled = pooled_sweep(records)
    # the rates every record ran: there the seeds of all records pool
    rates = sorted(set.intersection(*(set(map(float, r["setup"]["rates"])) for r in records)))
    lines = [
        "| method | " + " | ".join(f"lr {lr:g}" for lr in rates) + " |",
        "|---|" + "---|" * len(rates),
    ]
    for k in methods:
        cells = []
        for lr in rates:
            v = np.array(list(pooled[(k, lr)].values()))
            cells.append(f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f} (n={v.size})")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def seeds_below(
    pooled: dict[tuple[str, float], dict[int, float]], a: str, b: str, lr: float
) -> tuple[int, int]:
    """On how many of the seeds both ran at ``lr`` method ``a`` ended below ``b``."""
    common = sorted(set(pooled[(a, lr)]) & set(pooled[(b, lr)]))
    return sum(pooled[(a, lr)][s] < pooled[(b, lr)][s] for s in common), len(common)


def write_reports(record: dict[str, Any], out: str, *, quiet: bool = False) -> None:
    """``summary.md`` and the PNGs, from a ``results.json`` record alone."""
    setup, analysis = setup_of(record), record["analysis"]
    summary = summary_md(analysis, setup, record)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary)
    scales = {
        run["method"]: np.asarray(run["factors"], np.float64)
        for run in record["runs"]
        if run["kind"] == "group_fault" and run["seed"] == setup.seeds[0]
    }
    plot_loss_vs_lr(analysis, setup, os.path.join(out, "loss_vs_lr.png"))
    plot_fault_curves(analysis, setup, os.path.join(out, "fault_curves.png"))
    plot_scale_heatmap(scales, analysis["labels"], setup, os.path.join(out, "scale_heatmap.png"))
    if not quiet:
        print(summary)
        print(
            "Wrote results.json, summary.md, loss_vs_lr.png, fault_curves.png, "
            f"scale_heatmap.png to {out}/"
        )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.report_from is not None:
        with open(args.report_from) as f:
            record = json.load(f)
        os.makedirs(args.out, exist_ok=True)
        write_reports(record, args.out, quiet=args.quiet)
        return record
    corpus = load_corpus(args.corpus)
    cdesc = corpus.describe()
    if not args.quiet:
        print(
            f"corpus {cdesc['source']}: {cdesc['num_files']} files, {cdesc['num_bytes']:,} "
            f"bytes, sha256 {cdesc['sha256']}",
            flush=True,
        )
    setup = Setup(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        rates=args.rates,
        seeds=args.seeds,
        fault_lr=args.fault_lr,
        fault_group=args.fault_group,
        fault_scale=args.fault_scale,
        fault_window=args.fault_steps,
        bad_batch_step=args.bad_batch_step,
        eval_every=max(1, args.steps // 10),
        eval_windows=args.eval_windows,
        recover_tol=args.recover_tol,
        warmup_steps=max(1, args.steps // 20),
        weight_decay=args.weight_decay,
        model=ModelConfig(
            vocab_size=VOCAB_SIZE,
            d_model=args.d_model,
            num_layers=args.layers,
            num_heads=args.heads,
            mlp_dim=args.mlp_dim,
        ),
    )
    _, params0 = init_params(setup, setup.seeds[0])
    labels, _ = groups_of(params0)
    if setup.fault_group not in labels:
        raise SystemExit(f"--fault-group {setup.fault_group!r} is not a group; groups: {labels}")
    data = make_data(corpus, setup)
    os.makedirs(args.out, exist_ok=True)
    bar = Progress(len(args.methods) * setup.steps, "study", quiet=args.quiet)
    results, t0 = {}, time.perf_counter()
    for method in args.methods:
        results[method] = train_method(method, setup, data, bar)
    bar.close()
    seconds = time.perf_counter() - t0
    meta = {
        "corpus": cdesc,
        "num_params": sum(int(x.size) for x in jax.tree_util.tree_leaves(params0)),
        "seconds": seconds,
        "quick": args.quick,
        "setup": {k: v for k, v in dataclasses.asdict(setup).items() if k != "model"}
        | {"model": dataclasses.asdict(setup.model)},
        "methods": {k: METHODS[k][0] for k in args.methods},
        "jax": jax.__version__,
        "optax": optax.__version__,
    }
    analysis = analyse(results, setup)
    runs = setup.runs()
    record = {
        **meta,
        "analysis": analysis,
        "runs": [
            {
                "method": method,
                "kind": run.kind,
                "lr": run.lr,
                "seed": run.seed,
                "final_heldout": float(r["eval"][i, -1]),
                "heldout_curve": [
                    [int(s), float(v)] for s, v in zip(r["eval_steps"], r["eval"][i])
                ],
                "train_loss": [round(float(x), 5) for x in r["loss"][i]],
                **(
                    {"factors": np.round(group_factors(r["before"][i], r["after"][i]), 6).tolist()}
                    if run.kind != "sweep" or run.lr == setup.fault_lr
                    else {}
                ),
            }
            for method, r in results.items()
            for i, run in enumerate(runs)
        ],
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(record, f, allow_nan=True)
    write_reports(record, args.out, quiet=args.quiet)
    return record


if __name__ == "__main__":
    main()
