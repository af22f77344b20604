"""Where training really spikes: AGGC against the stabilisers users pick instead.

Trains the LLaMA-style byte-level model of ``train_lm.py`` (4 layers by
default) on the running Python's standard library (``text_corpus.py``) in a
regime where AdamW alone shows natural loss spikes (found by
``spike_search.py``, AdamW only), under every method of :data:`METHODS`:
AdamW alone, global-norm clipping, ``aggc()`` with its defaults,
``presets.adagc()``, ``presets.zclip()``, skip-step
(``presets.skip_step``), the group z-score variant
(``presets.group_zscore``) and the authors' LoRA recipe
(``presets.lora_sft``). Every method sees the same initial weights and the
same batches for a given seed; the runs of a method train together under
``jax.vmap``, so each method compiles once.

The spike signal is the **probe loss**: the loss on a fixed set of
``probe_windows`` held-out windows, measured at every step with the weights
before that step's update (the training loss of a 16-window batch varies by
about 0.14 nats from batch to batch with the text it holds, which hides the
optimizer's own jumps). A **spike** is a step ``t >= SPIKE_WINDOW`` whose probe
loss exceeds the mean of the previous ``SPIKE_WINDOW`` probe losses by more
than ``SPIKE_K`` of their standard deviations, and that does not fall inside
an earlier spike; a spike lasts until the probe loss is back at or below that
pre-spike mean, and those steps are the **steps lost** to it. A run
**diverged** if a training or probe loss was not finite or its final held-out
loss is at or above the held-out loss at initialisation.

Writes ``results.json`` (every run's losses, held-out curve, global norms,
per-group factor counts and the per-group norms and factors around AdamW's
spikes), ``summary.md`` (the tables and findings, every sentence computed from
the record) and ``spikes_loss.png``, ``spikes_counts.png``, ``spikes_trace.png``
to ``--out``; ``--report-from`` rewrites the reports from a ``results.json``.
``--quick`` is a smoke test of the pipeline (under a minute), not evidence.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from stability import make_eval
from text_corpus import VOCAB_SIZE, load_corpus, window_starts, windows
from train_lm import LlamaForCausalLM, ModelConfig, group_ids, group_norms, token_losses

# ---------------------------------------------------------------------------
# The protocol, fixed from AdamW-only runs (spike_search.py) before any clipper ran.
# ---------------------------------------------------------------------------

SPIKE_WINDOW = 50  # steps in the running mean and std a spike is measured against
SPIKE_K = 4.0  # a spike: loss above the running mean by more than this many stds
FIRST_LOOKBACK = 5  # steps before a spike in which a group's norm may jump first
GROUP_Z = 4.0  # a group's norm "jumps" at z-score above this (vs its previous 50 steps)
TRACE_BEFORE, TRACE_AFTER = 55, 10  # steps of per-group norms kept around each AdamW spike
RESCALED_TOL = 1e-4  # a factor further than this from 1 counts as "rescaled"
# "Better than AdamW" on a seed: a final held-out loss lower by more than this (nats).
# Two programs that compute the same thing differ by ~1e-5 here (XLA fuses them
# differently); this is a hundred times that.
BETTER_BY = 1e-3


@dataclasses.dataclass(frozen=True)
class Protocol:
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    b1: float
    b2: float
    eps: float
    weight_decay: float
    warmup_steps: int
    final_lr_ratio: float
    seeds: tuple[int, ...]
    eval_every: int
    eval_windows: int
    probe_windows: int
    global_clip_better: float | None
    model: ModelConfig


Builder = Callable[[Protocol], optax.GradientTransformation]


def _global_clip_better(p: Protocol) -> optax.GradientTransformation:
    if p.global_clip_better is None:
        raise SystemExit("global_clip_better: the protocol fixes no second clipping value")
    return optax.clip_by_global_norm(p.global_clip_better)


#: name -> (description, clipper before AdamW). ``skip_step`` wraps AdamW instead.
METHODS: dict[str, tuple[str, Builder]] = {
    "adamw": ("AdamW alone, no clipping", lambda p: optax.identity()),
    "global_clip": ("optax.clip_by_global_norm(1.0)", lambda p: optax.clip_by_global_norm(1.0)),
    "global_clip_better": (
        "optax.clip_by_global_norm at the protocol's second value",
        _global_clip_better,
    ),
    "aggc_default": ("aggc() with its defaults", lambda p: aggc_optax.aggc()),
    "adagc": ("presets.adagc() (per tensor)", lambda p: presets.adagc()),
    "zclip": ("presets.zclip() (ZClip's defaults)", lambda p: presets.zclip()),
    "skip_step": (
        "presets.skip_step(AdamW) (128 steps, 6 sigma, norm and loss)",
        lambda p: optax.identity(),
    ),
    "group_zscore": ("presets.group_zscore() (z 3, beta 0.99)", lambda p: presets.group_zscore()),
    "lora_sft": ("presets.lora_sft(steps)", lambda p: presets.lora_sft(p.steps)),
}
WRAPS_ADAM = frozenset({"skip_step"})
QUICK_METHODS = ("adamw", "aggc_default", "zclip", "skip_step")


def default_methods(protocol: Protocol) -> tuple[str, ...]:
    return tuple(
        m for m in METHODS if m != "global_clip_better" or protocol.global_clip_better is not None
    )


# ---------------------------------------------------------------------------
# Training: the runs of one method (one per seed) under jax.vmap.
# ---------------------------------------------------------------------------


def warmup_cosine(step: jax.Array, steps: int, warmup: int, floor: jax.Array | float) -> jax.Array:
    """Linear warm-up to 1, cosine decay to ``floor`` (1.0: constant): the multiplier of the
    peak rate (also ``spike_search.py``'s, whose grid varies ``floor``)."""
    step = step.astype(jnp.float32)
    progress = jnp.clip((step - warmup) / max(1, steps - warmup), 0.0, 1.0)
    cosine = floor + (1 - floor) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup, (step + 1) / warmup, cosine)


def lr_shape(step: jax.Array, p: Protocol) -> jax.Array:
    """The protocol's multiplier of the peak rate (:func:`warmup_cosine`)."""
    return warmup_cosine(step, p.steps, p.warmup_steps, p.final_lr_ratio)


def adam_direction(p: Protocol) -> optax.GradientTransformation:
    """AdamW without its learning rate (the step applies ``-lr * lr_shape``)."""
    return optax.chain(
        optax.scale_by_adam(b1=p.b1, b2=p.b2, eps=p.eps),
        optax.add_decayed_weights(p.weight_decay),
    )


def init_params(p: Protocol, seed: int) -> tuple[Any, Any]:
    model = nnx.jit(lambda: LlamaForCausalLM(p.model, nnx.Rngs(seed)))()
    return nnx.split(model, nnx.Param)


def make_step(graphdef: Any, method: str, p: Protocol, ids: Sequence[int], g: int) -> Any:
    clipper = METHODS[method][1](p)
    adam = adam_direction(p)
    wrapped = method in WRAPS_ADAM
    direction_tx = presets.skip_step(adam) if wrapped else adam

    def loss_fn(params: Any, tokens: jax.Array) -> jax.Array:
        return jnp.mean(token_losses(nnx.merge(graphdef, params), tokens))

    def init(params: Any) -> Any:
        return clipper.init(params), direction_tx.init(params), jnp.int32(0)

    def one(params: Any, state: Any, tokens: jax.Array, probe: jax.Array) -> Any:
        clip_state, dir_state, count = state
        probe_loss = loss_fn(params, probe)  # the weights before this step's update
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        clipped, clip_state = clipper.update(grads, clip_state, params)
        if wrapped:
            direction, dir_state = direction_tx.update(clipped, dir_state, params, value=loss)
            applied = 1.0 - dir_state.skipped.astype(jnp.float32)
        else:
            direction, dir_state = direction_tx.update(clipped, dir_state, params)
            applied = jnp.float32(1.0)
        step_size = -p.lr * lr_shape(count, p)
        params = jax.tree.map(lambda w, u: w + step_size * u, params, direction)
        before = group_norms(grads, ids, g)
        after = group_norms(clipped, ids, g) * applied
        out = jnp.stack([before, after])
        return params, (clip_state, dir_state, count + 1), jnp.stack([loss, probe_loss]), out

    step = jax.vmap(one, in_axes=(0, 0, 0, None))
    return jax.jit(jax.vmap(init)), jax.jit(step, donate_argnums=(0, 1))


@dataclasses.dataclass
class Data:
    train: np.ndarray
    starts: dict[int, np.ndarray]  # seed -> [steps, batch] window starts
    eval_tokens: np.ndarray
    probe: np.ndarray  # the held-out windows whose loss is the spike signal


def probe_tokens(heldout: np.ndarray, seq_len: int, num: int) -> np.ndarray:
    """The fixed held-out windows whose loss is measured at every step (the spike signal)."""
    length = seq_len + 1
    rng = np.random.default_rng(777)
    return windows(heldout, window_starts(heldout, num, length, rng), length)


def make_data(train: np.ndarray, heldout: np.ndarray, p: Protocol) -> Data:
    length = p.seq_len + 1
    starts = {}
    for seed in p.seeds:
        rng = np.random.default_rng(20_000 + seed)
        starts[seed] = np.stack(
            [window_starts(train, p.batch_size, length, rng) for _ in range(p.steps)]
        )
    eval_rng = np.random.default_rng(54321)
    eval_tokens = windows(heldout, window_starts(heldout, p.eval_windows, length, eval_rng), length)
    return Data(train, starts, eval_tokens, probe_tokens(heldout, p.seq_len, p.probe_windows))


def train_method(
    method: str,
    p: Protocol,
    data: Data,
    bar: Progress,
    trace_steps: dict[int, list[int]] | None,
) -> dict[str, Any]:
    """The runs of ``method``, one per seed: what the record keeps of each."""
    built = {s: init_params(p, s) for s in p.seeds}
    graphdef = built[p.seeds[0]][0]
    params = jax.tree.map(lambda *xs: jnp.stack(xs), *[built[s][1] for s in p.seeds])
    labels = list(aggc_optax.describe_groups(built[p.seeds[0]][1])["groups"])
    ids = group_ids(built[p.seeds[0]][1], labels)
    init, step_fn = make_step(graphdef, method, p, ids, len(labels))
    state = init(params)
    evaluate = make_eval(graphdef)
    eval_tokens = jnp.asarray(data.eval_tokens)
    probe = jnp.asarray(data.probe)
    length = p.seq_len + 1
    losses, norms, evals = [], [], [(0, evaluate(params, eval_tokens))]
    for step in range(p.steps):
        tokens = jnp.asarray(
            np.stack([windows(data.train, data.starts[s][step], length) for s in p.seeds])
        )
        params, state, loss, norm = step_fn(params, state, tokens, probe)
        losses.append(loss)
        norms.append(norm)
        if (step + 1) % p.eval_every == 0 or step + 1 == p.steps:
            evals.append((step + 1, evaluate(params, eval_tokens)))
        bar.update(1, f"{method}: median probe loss {float(jnp.nanmedian(loss[:, 1])):.3f}")
    both = np.asarray(jax.device_get(losses))  # [steps, seeds, 2]
    loss, probe_loss = both[:, :, 0].T, both[:, :, 1].T  # [seeds, steps]
    norm = np.asarray(jax.device_get(norms), np.float64)  # [steps, seeds, 2, G]
    before, after = norm[:, :, 0].transpose(1, 0, 2), norm[:, :, 1].transpose(1, 0, 2)
    factors = np.where(before > 0, after / np.where(before > 0, before, 1.0), 1.0)
    eval_steps = [s for s, _ in evals]
    heldout = np.asarray(jax.device_get([v for _, v in evals])).T  # [seeds, evals]
    runs = []
    for i, seed in enumerate(p.seeds):
        steps = (trace_steps or {}).get(seed)
        if steps is None:  # AdamW: the record's spike traces come from these runs
            onsets = find_spikes(probe_loss[i])["onsets"]
            steps = sorted({s for t in onsets for s in _trace_range(t, p.steps)})
        runs.append(
            {
                "method": method,
                "seed": seed,
                "train_loss": [round(float(x), 5) for x in loss[i]],
                "probe_loss": [round(float(x), 5) for x in probe_loss[i]],
                "heldout_curve": [[int(s), float(v)] for s, v in zip(eval_steps, heldout[i])],
                "final_heldout": float(heldout[i, -1]),
                "global_norm": [
                    float(f"{x:.5g}") for x in np.sqrt(np.sum(before[i] ** 2, axis=-1))
                ],
                "rescaled_steps_by_group": np.sum(
                    np.abs(factors[i] - 1) > RESCALED_TOL, axis=0
                ).tolist(),
                "any_rescaled_steps": int(
                    np.sum(np.any(np.abs(factors[i] - 1) > RESCALED_TOL, -1))
                ),
                "trace_steps": steps,
                "trace_norms": [[float(f"{x:.5g}") for x in before[i, s]] for s in steps],
                "trace_factors": [[round(float(x), 5) for x in factors[i, s]] for s in steps],
            }
        )
    return {"labels": labels, "runs": runs}


def _trace_range(onset: int, steps: int) -> range:
    return range(max(0, onset - TRACE_BEFORE), min(steps, onset + TRACE_AFTER + 1))


# ---------------------------------------------------------------------------
# Analysis: spikes, divergences and the rest, from the record alone.
# ---------------------------------------------------------------------------


def find_spikes(loss: Sequence[float]) -> dict[str, Any]:
    """Spike onsets in a loss curve, their lengths (steps lost), and whether it went non-finite.

    A spike starts at ``t >= SPIKE_WINDOW`` when ``loss[t] > m + SPIKE_K * s``,
    with ``m, s`` the mean and (population) std of ``loss[t - SPIKE_WINDOW:t]``,
    unless ``t`` lies inside an earlier spike. It lasts until the first later
    step whose loss is at or below ``m`` (to the end of the run if none):
    ``lost`` counts its steps, the onset included.
    """
    x = np.asarray(loss, np.float64)
    onsets: list[int] = []
    lost: list[int] = []
    t = SPIKE_WINDOW
    while t < x.size:
        if not np.isfinite(x[t]):
            onsets.append(t)
            lost.append(int(x.size - t))
            break
        past = x[t - SPIKE_WINDOW : t]
        m, s = float(np.mean(past)), float(np.std(past))
        if x[t] > m + SPIKE_K * s:
            back = np.nonzero(x[t + 1 :] <= m)[0]
            length = int(back[0]) + 1 if back.size else int(x.size - t)
            onsets.append(t)
            lost.append(length)
            t += length
            continue
        t += 1
    return {"onsets": onsets, "lost": lost, "nonfinite": bool(not np.all(np.isfinite(x)))}


def first_groups(run: dict[str, Any], labels: Sequence[str], onset: int) -> list[str]:
    """The groups whose norm jumped first (z-score above ``GROUP_Z``) before ``onset``.

    A group's z-score at step ``s`` compares its norm with the mean and std of
    its norms over ``s - 50 .. s - 1``; the earliest step in ``onset -
    FIRST_LOOKBACK .. onset`` at which any group's z-score exceeds ``GROUP_Z``
    names the groups that exceed it there. Empty: no group jumped.
    """
    where = {s: i for i, s in enumerate(run["trace_steps"])}
    norms = np.asarray(run["trace_norms"], np.float64)
    for s in range(onset - FIRST_LOOKBACK, onset + 1):
        past = [where.get(u) for u in range(s - SPIKE_WINDOW, s)]
        if s not in where or any(i is None for i in past):
            continue
        hist = norms[past]
        z = (norms[where[s]] - hist.mean(0)) / np.maximum(hist.std(0), 1e-12)
        jumped = [labels[j] for j in np.nonzero(z > GROUP_Z)[0]]
        if jumped:
            return jumped
    return []


def analyse(record: dict[str, Any]) -> dict[str, Any]:
    labels = record["labels"]
    methods = list(record["methods"])
    seeds = record["protocol"]["seeds"]
    steps = record["protocol"]["steps"]
    by = {(r["method"], r["seed"]): r for r in record["runs"]}
    init = float(np.mean([r["heldout_curve"][0][1] for r in record["runs"]]))
    out: dict[str, Any] = {"loss_at_init": init, "methods": {}}
    adam_final = {s: by[("adamw", s)]["final_heldout"] for s in seeds}
    for m in methods:
        spikes = {s: find_spikes(by[(m, s)]["probe_loss"]) for s in seeds}
        finals = [by[(m, s)]["final_heldout"] for s in seeds]
        diverged = [
            s
            for s in seeds
            if spikes[s]["nonfinite"]
            or not np.all(np.isfinite(by[(m, s)]["train_loss"]))
            or not math.isfinite(by[(m, s)]["final_heldout"])
            or by[(m, s)]["final_heldout"] >= init
        ]
        finite = [v for v in finals if math.isfinite(v)]
        rescaled = np.sum([by[(m, s)]["rescaled_steps_by_group"] for s in seeds], axis=0)
        out["methods"][m] = {
            "spikes_by_seed": [len(spikes[s]["onsets"]) for s in seeds],
            "onsets_by_seed": [spikes[s]["onsets"] for s in seeds],
            "spikes": int(sum(len(spikes[s]["onsets"]) for s in seeds)),
            "steps_lost": int(sum(sum(spikes[s]["lost"]) for s in seeds)),
            "diverged_seeds": diverged,
            "final_by_seed": finals,
            "final_mean": float(np.mean(finite)) if finite else math.inf,
            "final_std": float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0,
            "better_than_adamw": int(
                sum(by[(m, s)]["final_heldout"] < adam_final[s] - BETTER_BY for s in seeds)
            ),
            "rescaled_share_by_group": {
                lab: float(rescaled[j] / (steps * len(seeds))) for j, lab in enumerate(labels)
            },
            "steps_rescaled_share": float(
                sum(by[(m, s)]["any_rescaled_steps"] for s in seeds) / (steps * len(seeds))
            ),
        }
    firsts: dict[str, int] = {lab: 0 for lab in labels}
    events = []
    for s in seeds:
        run = by[("adamw", s)]
        for t in out["methods"]["adamw"]["onsets_by_seed"][seeds.index(s)]:
            jumped = first_groups(run, labels, t)
            events.append({"seed": s, "onset": t, "first": jumped})
            for lab in jumped:
                firsts[lab] += 1
    out["adamw_spike_events"] = events
    out["first_group_counts"] = firsts
    out["factors_at_adamw_spikes"] = factors_at_spikes(record, events)
    return out


def factors_at_spikes(record: dict[str, Any], events: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per method and group: the smallest factor in ``onset - 5 .. onset + 5`` of AdamW's spikes.

    Also how many of the events the method rescaled any group in that window.
    """
    labels = record["labels"]
    by = {(r["method"], r["seed"]): r for r in record["runs"]}
    out: dict[str, Any] = {}
    for m in record["methods"]:
        mins = np.ones(len(labels))
        touched = 0
        for e in events:
            run = by[(m, e["seed"])]
            where = {s: i for i, s in enumerate(run["trace_steps"])}
            rows = [where[s] for s in range(e["onset"] - 5, e["onset"] + 6) if s in where]
            f = np.asarray(run["trace_factors"], np.float64)[rows]
            if f.size:
                mins = np.minimum(mins, f.min(0))
                touched += int(np.any(np.abs(f - 1) > RESCALED_TOL))
        out[m] = {
            "min_factor_by_group": dict(zip(labels, mins.tolist())),
            "events_rescaled": touched,
        }
    return out


# ---------------------------------------------------------------------------
# Reports.
# ---------------------------------------------------------------------------


def _seed_list(values: Sequence[Any]) -> str:
    return ", ".join(str(v) for v in values)


def headline_md(record: dict[str, Any]) -> str:
    a = record["analysis"]
    n = len(record["protocol"]["seeds"])
    lines = [
        "| method | spikes (per seed) | diverged | final held-out loss | below AdamW by > 0.001 "
        "| steps lost to spikes | steps rescaled or skipped |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in record["methods"]:
        e = a["methods"][m]
        better = "-" if m == "adamw" else f"{e['better_than_adamw']} of {n}"
        lines.append(
            f"| {m} | {e['spikes']} ({_seed_list(e['spikes_by_seed'])}) | "
            f"{len(e['diverged_seeds'])} of {n} | {e['final_mean']:.3f} ± {e['final_std']:.3f} | "
            f"{better} | {e['steps_lost']} | {100 * e['steps_rescaled_share']:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def first_groups_md(record: dict[str, Any]) -> str:
    a = record["analysis"]
    counts = a["first_group_counts"]
    events = a["adamw_spike_events"]
    none = sum(1 for e in events if not e["first"])
    order = sorted(counts, key=lambda k: (-counts[k], record["labels"].index(k)))
    lines = ["| group | AdamW spikes it jumped first in |", "|---|---|"]
    lines += [f"| {k} | {counts[k]} of {len(events)} |" for k in order]
    lines.append(f"| (no group jumped) | {none} of {len(events)} |")
    return "\n".join(lines) + "\n"


def factors_md(record: dict[str, Any]) -> str:
    a = record["analysis"]["factors_at_adamw_spikes"]
    labels = record["labels"]
    n = len(record["analysis"]["adamw_spike_events"])
    lines = [
        "| method | events rescaled | " + " | ".join(labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    for m in record["methods"]:
        if m == "adamw":
            continue
        mins = a[m]["min_factor_by_group"]
        lines.append(
            f"| {m} | {a[m]['events_rescaled']} of {n} | "
            + " | ".join(f"{mins[k]:.3g}" for k in labels)
            + " |"
        )
    return "\n".join(lines) + "\n"


def findings(record: dict[str, Any]) -> list[str]:
    a = record["analysis"]
    m = a["methods"]
    n = len(record["protocol"]["seeds"])
    adam = m["adamw"]
    lines = [
        f"AdamW alone spiked {adam['spikes']} times over {n} seeds "
        f"({_seed_list(adam['spikes_by_seed'])} per seed); it diverged on "
        f"{len(adam['diverged_seeds'])} of {n} seeds."
    ]
    fewest = min(v["spikes"] for v in m.values())
    lines.append(
        f"Fewest spikes: {', '.join(k for k in m if m[k]['spikes'] == fewest)} ({fewest}); "
        f"aggc() defaults: {m['aggc_default']['spikes']}."
        if "aggc_default" in m
        else f"Fewest spikes: {', '.join(k for k in m if m[k]['spikes'] == fewest)} ({fewest})."
    )
    best = min(m, key=lambda k: m[k]["final_mean"])
    lines.append(
        f"Lowest mean final held-out loss: {best} ({m[best]['final_mean']:.3f}); AdamW alone "
        f"{adam['final_mean']:.3f}."
    )
    every = [k for k in m if k != "adamw" and m[k]["better_than_adamw"] == n]
    lines.append(
        f"Ended below AdamW alone (by more than {BETTER_BY:g}) on every seed: "
        + (", ".join(every) if every else "none")
        + "."
    )
    diverged = [k for k in m if m[k]["diverged_seeds"]]
    lines.append(
        "Diverged on some seed: "
        + (
            ", ".join(f"{k} (seeds {_seed_list(m[k]['diverged_seeds'])})" for k in diverged)
            if diverged
            else "no method"
        )
        + "."
    )
    counts = a["first_group_counts"]
    events = a["adamw_spike_events"]
    if events:
        top = max(counts.values())
        lead = [k for k in counts if counts[k] == top]
        lines.append(
            f"Before AdamW's {len(events)} spikes, the group whose norm jumped first most often: "
            f"{', '.join(lead)} ({top} of {len(events)})."
        )
    return lines


def _schedule_after_warmup(floor: float) -> str:
    return "then constant" if floor == 1.0 else f"cosine decay to {floor:g}x"


def summary_md(record: dict[str, Any]) -> str:
    p = record["protocol"]
    mc = p["model"]
    c = record["corpus"]
    parts = [
        "# Spike study\n",
        f"Corpus: {c['source']}, {c['num_files']} files ({c['num_train_files']} train / "
        f"{c['num_heldout_files']} held out), {c['num_bytes']:,} bytes, sha256 `{c['sha256']}`.",
        f"Model: LLaMA-style byte-level decoder, {record['num_params']:,} parameters "
        f"({mc['num_layers']} layers, d_model {mc['d_model']}, MLP {mc['mlp_dim']}); "
        f"{p['steps']} steps of {p['batch_size']} x {p['seq_len']} bytes; AdamW (lr {p['lr']:g}, "
        f"b1 {p['b1']:g}, b2 {p['b2']:g}, eps {p['eps']:g}, weight decay {p['weight_decay']:g}), "
        f"{p['warmup_steps']} warm-up steps, {_schedule_after_warmup(p['final_lr_ratio'])}. "
        f"Seeds {_seed_list(p['seeds'])}. Held-out loss at initialisation "
        f"{record['analysis']['loss_at_init']:.3f}. Took {record['seconds']:.0f} s.",
        f"Spike: a step whose probe loss (the loss on {p['probe_windows']} fixed held-out "
        "windows, with the weights before the step's update) is above the mean of the previous "
        f"{SPIKE_WINDOW} by more than {SPIKE_K:g} of their standard deviations (not inside an "
        "earlier spike); steps lost: until the probe loss is back at that mean. Diverged: a "
        "non-finite loss, or a final held-out loss at or above the loss at initialisation.\n",
        "## Findings\n",
        *[f"- {line}" for line in findings(record)],
        "",
        "## Per method (all seeds)\n",
        headline_md(record),
        "## Which group's norm jumped first before AdamW's spikes\n",
        f"A group jumps when its norm's z-score against its previous {SPIKE_WINDOW} steps "
        f"exceeds {GROUP_Z:g}; the earliest step from {FIRST_LOOKBACK} before the spike to the "
        "spike decides (ties: every group at that step).\n",
        first_groups_md(record),
        "## Each method's smallest factor per group around AdamW's spikes\n",
        "Steps spike - 5 .. spike + 5 of each AdamW spike, in the same seed's run of the "
        "method (same batches; its trajectory may differ); skip-step's factor is 0 on a "
        "skipped step.\n",
        factors_md(record),
        "Methods:\n",
        *[f"- `{k}`: {v}" for k, v in record["methods"].items()],
        "",
    ]
    return "\n".join(parts)


def _figure(w: float, h: float) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.figure(figsize=(w, h), layout="constrained")


def plot_loss(record: dict[str, Any], path: str) -> None:
    methods = list(record["methods"])
    seeds = record["protocol"]["seeds"]
    a = record["analysis"]["methods"]
    by = {(r["method"], r["seed"]): r for r in record["runs"]}
    ncols = 3
    nrows = math.ceil(len(methods) / ncols)
    fig = _figure(5 * ncols, 2.8 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    colors = [f"C{i}" for i in range(len(seeds))]
    for i, m in enumerate(methods):
        ax = axes[i // ncols][i % ncols]
        for j, s in enumerate(seeds):
            loss = np.asarray(by[(m, s)]["probe_loss"], np.float64)
            ax.plot(loss, lw=0.5, color=colors[j], label=f"seed {s}")
            on = a[m]["onsets_by_seed"][j]
            ax.plot(on, loss[on], "v", color=colors[j], ms=5, mec="k", mew=0.4)
        n = a[m]["spikes"]
        ax.set_title(f"{m}: {n} spike{'' if n == 1 else 's'}", fontsize=9)
        ax.set_ylim(1.5, 3.5)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(True, alpha=0.3, lw=0.5)
    for j in range(len(methods), nrows * ncols):
        fig.delaxes(axes[j // ncols][j % ncols])
    axes[0][0].legend(fontsize=7)
    axes[0][0].set_ylabel("probe loss (nats/byte)")
    fig.suptitle(
        f"Probe loss per method and seed; triangles: spikes (probe loss above the "
        f"previous {SPIKE_WINDOW} steps' mean by > {SPIKE_K:g} std)"
    )
    fig.savefig(path, dpi=100)


def plot_counts(record: dict[str, Any], path: str) -> None:
    methods = list(record["methods"])
    seeds = record["protocol"]["seeds"]
    a = record["analysis"]["methods"]
    fig = _figure(9, 3.6)
    ax, ax2 = fig.subplots(1, 2)
    bottom = np.zeros(len(methods))
    for j, s in enumerate(seeds):
        v = np.asarray([a[m]["spikes_by_seed"][j] for m in methods], float)
        ax.bar(methods, v, bottom=bottom, label=f"seed {s}", color=f"C{j}")
        bottom += v
    ax.set_ylabel("spikes")
    ax.set_title("Spikes per method, stacked by seed", fontsize=9)
    ax.tick_params(axis="x", rotation=60, labelsize=7)
    ax.legend(fontsize=7)
    means = [a[m]["final_mean"] for m in methods]
    stds = [a[m]["final_std"] for m in methods]
    ax2.bar(methods, means, yerr=stds, color="#888888")
    lo = min(means) - 3 * max([*stds, 0.01])
    ax2.set_ylim(max(0.0, lo), max(means) + 3 * max([*stds, 0.01]))
    ax2.set_ylabel("final held-out loss")
    ax2.set_title("Final held-out loss, mean ± std over seeds", fontsize=9)
    ax2.tick_params(axis="x", rotation=60, labelsize=7)
    fig.savefig(path, dpi=100)


def plot_trace(record: dict[str, Any], path: str) -> None:
    """Around AdamW's largest spike: its loss, its per-group norms, each method's factors."""
    a = record["analysis"]
    labels = record["labels"]
    events = a["adamw_spike_events"]
    fig = _figure(12, 8)
    if not events:
        fig.suptitle("AdamW alone had no spike in this run: nothing to trace")
        fig.savefig(path, dpi=100)
        return
    by = {(r["method"], r["seed"]): r for r in record["runs"]}

    def height(e: dict[str, Any]) -> float:
        loss = np.asarray(by[("adamw", e["seed"])]["probe_loss"], np.float64)
        t = e["onset"]
        past = loss[t - SPIKE_WINDOW : t]
        return float((loss[t] - past.mean()) / max(past.std(), 1e-12))

    e = max(events, key=height)
    s, t = e["seed"], e["onset"]
    lo, hi = max(0, t - 20), min(record["protocol"]["steps"], t + TRACE_AFTER + 1)
    axes = fig.subplots(3, 1, sharex=True)
    x = np.arange(lo, hi)
    for m in record["methods"]:
        loss = np.asarray(by[(m, s)]["probe_loss"], np.float64)
        style = {"color": "k", "lw": 2} if m == "adamw" else {"lw": 1}
        axes[0].plot(x, loss[lo:hi], label=m, **style)
    axes[0].set_ylabel("probe loss")
    axes[0].legend(fontsize=7, ncol=3)
    run = by[("adamw", s)]
    where = {u: i for i, u in enumerate(run["trace_steps"])}
    norms = np.asarray(run["trace_norms"], np.float64)
    base = norms[[where[u] for u in range(t - SPIKE_WINDOW, t) if u in where]].mean(0)
    rows = [where[u] for u in x if u in where]
    xs = [u for u in x if u in where]
    for j, lab in enumerate(labels):
        axes[1].plot(
            xs,
            norms[rows, j] / base[j],
            lw=1.2 if lab in e["first"] else 0.7,
            label=lab + (" (first)" if lab in e["first"] else ""),
        )
    axes[1].set_yscale("log")
    axes[1].set_ylabel("AdamW group norm /\nits mean before")
    axes[1].legend(fontsize=6, ncol=4)
    for m in record["methods"]:
        if m == "adamw":
            continue
        r = by[(m, s)]
        where_m = {u: i for i, u in enumerate(r["trace_steps"])}
        f = np.asarray(r["trace_factors"], np.float64)
        xm = [u for u in x if u in where_m]
        axes[2].plot(xm, f[[where_m[u] for u in xm]].min(1), marker=".", lw=1, label=m)
    axes[2].set_ylabel("smallest factor\nover groups")
    axes[2].set_xlabel("step")
    axes[2].legend(fontsize=7, ncol=4)
    for ax in axes:
        ax.axvline(t, color="r", lw=0.8, ls="--")
        ax.grid(True, alpha=0.3, lw=0.5)
    fig.suptitle(
        f"AdamW's largest spike: seed {s}, step {t} (dashed); every method's run of "
        "that seed over the same steps"
    )
    fig.savefig(path, dpi=100)


def write_reports(record: dict[str, Any], out: str, *, quiet: bool = False) -> str:
    record["analysis"] = analyse(record)
    summary = summary_md(record)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary)
    plot_loss(record, os.path.join(out, "spikes_loss.png"))
    plot_counts(record, os.path.join(out, "spikes_counts.png"))
    plot_trace(record, os.path.join(out, "spikes_trace.png"))
    if not quiet:
        print(summary)
        print(
            f"Wrote results.json, summary.md, spikes_loss.png, spikes_counts.png, "
            f"spikes_trace.png to {out}/"
        )
    return summary


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------

#: The study's protocol (fixed from AdamW-only runs before any clipper ran; docs/spikes.md).
FULL = dict(
    steps=400,
    batch_size=16,
    seq_len=64,
    lr=0.15,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=0.1,
    warmup_steps=20,
    final_lr_ratio=1.0,
    seeds=(0, 1, 2, 3, 4),
    eval_windows=64,
    probe_windows=32,
    global_clip_better=None,
    d_model=64,
    layers=4,
    heads=4,
    mlp_dim=172,
)
QUICK = dict(
    FULL,
    steps=60,
    seeds=(0,),
    eval_windows=8,
    probe_windows=8,
    d_model=32,
    layers=2,
    mlp_dim=64,
    global_clip_better=None,
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", default=os.path.join("runs", "spikes"), help="output folder")
    p.add_argument("--corpus", default=None, help="a text file or folder (default: the stdlib)")
    p.add_argument("--quick", action="store_true", help="a smoke test (not evidence)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0-4; quick 0)")
    p.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated subset of: {', '.join(METHODS)} (default: all the protocol "
        f"fixes; quick: {','.join(QUICK_METHODS)})",
    )
    p.add_argument("--steps", type=int, default=None, help="override the protocol's steps")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument(
        "--report-from",
        default=None,
        metavar="RESULTS_JSON",
        help="only rewrite summary.md and the PNGs in --out from a results.json",
    )
    args = p.parse_args(argv)
    base = dict(QUICK if args.quick else FULL)
    if args.steps is not None:
        if args.steps <= SPIKE_WINDOW:
            p.error(f"--steps must be > {SPIKE_WINDOW} (the spike window), got {args.steps}")
        base["steps"] = args.steps
    if args.seeds is not None:
        try:
            base["seeds"] = tuple(int(x) for x in args.seeds.split(","))
        except ValueError:
            p.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
        if len(set(base["seeds"])) != len(base["seeds"]):
            p.error(f"--seeds: a seed is repeated in {args.seeds!r}")
    args.protocol = Protocol(
        steps=base["steps"],
        batch_size=base["batch_size"],
        seq_len=base["seq_len"],
        lr=base["lr"],
        b1=base["b1"],
        b2=base["b2"],
        eps=base["eps"],
        weight_decay=base["weight_decay"],
        warmup_steps=base["warmup_steps"],
        final_lr_ratio=base["final_lr_ratio"],
        seeds=base["seeds"],
        eval_every=max(1, base["steps"] // 10),
        eval_windows=base["eval_windows"],
        probe_windows=base["probe_windows"],
        global_clip_better=base["global_clip_better"],
        model=ModelConfig(
            VOCAB_SIZE, base["d_model"], base["layers"], base["heads"], base["mlp_dim"]
        ),
    )
    if args.methods is None:
        methods = QUICK_METHODS if args.quick else default_methods(args.protocol)
    else:
        methods = tuple(x for x in args.methods.split(",") if x)
    unknown = [x for x in methods if x not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; allowed: {', '.join(METHODS)}")
    if "adamw" not in methods:
        p.error("--methods must include adamw (spikes are traced and compared against it)")
    if "global_clip_better" in methods and args.protocol.global_clip_better is None:
        p.error("--methods: global_clip_better needs a protocol value; this protocol has none")
    args.methods = ("adamw", *(m for m in methods if m != "adamw"))
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.report_from is not None:
        with open(args.report_from) as f:
            record = json.load(f)
        os.makedirs(args.out, exist_ok=True)
        write_reports(record, args.out, quiet=args.quiet)
        return record
    p = args.protocol
    corpus = load_corpus(args.corpus, min_bytes=max(4096, 4 * (p.seq_len + 1)))
    data = make_data(corpus.train, corpus.heldout, p)
    os.makedirs(args.out, exist_ok=True)
    bar = Progress(len(args.methods) * p.steps, "spikes", quiet=args.quiet)
    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []
    trace_steps: dict[int, list[int]] | None = None
    labels: list[str] = []
    for method in args.methods:
        out = train_method(method, p, data, bar, trace_steps)
        labels = out["labels"]
        runs += out["runs"]
        if method == "adamw":  # every other method keeps its factors at AdamW's spikes
            trace_steps = {r["seed"]: r["trace_steps"] for r in out["runs"]}
    bar.close()
    _, params0 = init_params(p, p.seeds[0])
    record = {
        "corpus": corpus.describe(),
        "num_params": sum(int(x.size) for x in jax.tree_util.tree_leaves(params0)),
        "seconds": time.perf_counter() - t0,
        "quick": args.quick,
        "protocol": {k: v for k, v in dataclasses.asdict(p).items() if k != "model"}
        | {"model": dataclasses.asdict(p.model)},
        "spike_definition": {
            "window": SPIKE_WINDOW,
            "k": SPIKE_K,
            "group_z": GROUP_Z,
            "first_lookback": FIRST_LOOKBACK,
        },
        "methods": {k: METHODS[k][0] for k in args.methods},
        "labels": labels,
        "jax": jax.__version__,
        "optax": optax.__version__,
        "runs": runs,
    }
    write_reports(record, args.out, quiet=args.quiet)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(record, f, allow_nan=True)
    return record


if __name__ == "__main__":
    main()
