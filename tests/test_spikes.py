"""The spike study (examples/spikes.py): its pipeline, and docs/spikes.md against its record.

One ``--quick`` run feeds the pipeline tests. The vendored record of the full
run (``docs/data/spikes_results.json.gz``) feeds the docs tests: every table
in ``docs/spikes.md`` must be what ``--report-from`` makes of it, and every
claim in the prose is recomputed here from the per-run losses, with the spike
rule written out again in this file.
"""

from __future__ import annotations

import gzip
import importlib
import json
import math
import os
import sys

import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
DOCS = os.path.join(os.path.dirname(EXAMPLES), "docs")


def _load(name: str):
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    return importlib.import_module(name)


spikes = _load("spikes")


# --- the spike rule, written out independently -------------------------------


def spikes_by_hand(loss, window=50, k=4.0):
    """(onsets, steps lost): the rule of docs/spikes.md, in plain Python."""
    onsets, lost, t = [], [], window
    while t < len(loss):
        if not math.isfinite(loss[t]):
            return [*onsets, t], [*lost, len(loss) - t]
        past = loss[t - window : t]
        mean = sum(past) / window
        std = math.sqrt(sum((x - mean) ** 2 for x in past) / window)
        if loss[t] > mean + k * std:
            end = next((u for u in range(t + 1, len(loss)) if loss[u] <= mean), len(loss))
            onsets.append(t)
            lost.append(end - t)
            t = end
            continue
        t += 1
    return onsets, lost


def test_find_spikes_by_hand():
    loss = [2.0 + 0.01 * (i % 2) for i in range(160)]  # window mean 2.005, std 0.005
    loss[70] = 3.0  # a spike: back at or below the mean at 73
    loss[71], loss[72], loss[73] = 2.6, 2.1, 1.9
    loss[130], loss[131] = 2.5, 1.9  # far enough from the first: its window is quiet again
    got = spikes.find_spikes(loss)
    assert got["onsets"] == [70, 130] and got["lost"] == [3, 1] and not got["nonfinite"]
    assert (got["onsets"], got["lost"]) == spikes_by_hand(loss)
    loss[150] = math.nan
    got = spikes.find_spikes(loss)
    assert got["onsets"] == [70, 130, 150] and got["lost"][-1] == 10 and got["nonfinite"]
    assert spikes.find_spikes(loss[:50])["onsets"] == []  # no full window yet


def test_find_spikes_agrees_with_the_hand_rule_on_noisy_losses():
    rng = np.random.default_rng(0)
    for _ in range(20):
        loss = (2 + 0.05 * rng.standard_normal(300)).tolist()
        for t in rng.integers(50, 300, 4):
            loss[t] += float(rng.uniform(0.1, 1.0))
        got = spikes.find_spikes(loss)
        assert (got["onsets"], got["lost"]) == spikes_by_hand(loss)


def test_first_groups_by_hand():
    labels = ["q_proj", "v_proj"]
    steps = list(range(0, 80))
    norms = [[1.0 + 0.01 * (s % 2), 1.0 + 0.01 * (s % 2)] for s in steps]
    norms[58][1] = 5.0  # v_proj jumps 2 steps before the spike at 60
    norms[60] = [5.0, 5.0]
    run = {"trace_steps": steps, "trace_norms": norms}
    assert spikes.first_groups(run, labels, 60) == ["v_proj"]
    norms[58][1] = 1.0
    assert spikes.first_groups(run, labels, 60) == ["q_proj", "v_proj"]
    flat = {"trace_steps": steps, "trace_norms": [[1.0 + 0.01 * (s % 2)] * 2 for s in steps]}
    assert spikes.first_groups(flat, labels, 60) == []


# --- the pipeline, on a --quick run ------------------------------------------------


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("spikes")
    spikes.main(["--quick", "--quiet", "--out", str(out)])
    with open(out / "results.json") as f:
        return out, json.load(f)


def test_every_output_is_written_and_every_run_recorded(study):
    out, saved = study
    for name in ("results.json", "summary.md", "spikes_loss.png", "spikes_counts.png",
                 "spikes_trace.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    p = saved["protocol"]
    assert list(saved["methods"]) == list(spikes.QUICK_METHODS)
    assert {(r["method"], r["seed"]) for r in saved["runs"]} == {
        (m, s) for m in saved["methods"] for s in p["seeds"]
    }
    for run in saved["runs"]:
        assert len(run["train_loss"]) == len(run["probe_loss"]) == p["steps"]
        assert len(run["global_norm"]) == p["steps"]
        assert run["heldout_curve"][0][0] == 0 and run["heldout_curve"][-1][0] == p["steps"]
        assert len(run["rescaled_steps_by_group"]) == len(saved["labels"])


def test_every_method_starts_from_the_same_weights_and_batches(study):
    _, saved = study
    first = {}
    for run in saved["runs"]:
        # same weights: the same held-out loss at step 0; same first batch and weights:
        # the same first training loss and global norm (nothing has been applied yet)
        key = (
            run["heldout_curve"][0][1],
            run["train_loss"][0],
            run["probe_loss"][0],
            run["global_norm"][0],
        )
        first.setdefault(run["seed"], set()).add(key)
    assert all(len(v) == 1 for v in first.values()), first


def test_adamw_never_rescales_and_skip_step_zeroes_whole_steps(study):
    _, saved = study
    for run in saved["runs"]:
        if run["method"] == "adamw":
            assert run["any_rescaled_steps"] == 0 and sum(run["rescaled_steps_by_group"]) == 0
        if run["method"] == "skip_step":
            # a skipped step has factor 0 for every group at once
            counts = set(run["rescaled_steps_by_group"])
            assert len(counts) == 1 and counts == {run["any_rescaled_steps"]}


def test_report_from_rewrites_the_same_summary(study, tmp_path):
    out, _ = study
    spikes.main(["--report-from", str(out / "results.json"), "--out", str(tmp_path), "--quiet"])
    assert (tmp_path / "summary.md").read_text() == (out / "summary.md").read_text()
    assert (tmp_path / "spikes_trace.png").stat().st_size > 0


def test_flag_errors():
    with pytest.raises(SystemExit):
        spikes.parse_args(["--methods", "adamw,nope"])
    with pytest.raises(SystemExit):
        spikes.parse_args(["--methods", "zclip"])  # no adamw to compare with
    with pytest.raises(SystemExit):
        spikes.parse_args(["--steps", "40"])  # not longer than the spike window
    with pytest.raises(SystemExit):
        spikes.parse_args(["--seeds", "1,1"])


# --- docs/spikes.md against the run it reports -----------------------------------


@pytest.fixture(scope="module")
def vendored():
    with gzip.open(os.path.join(DOCS, "data", "spikes_results.json.gz"), "rt") as f:
        record = json.load(f)
    record["analysis"] = spikes.analyse(record)
    return record


def _doc_block(name):
    doc = open(os.path.join(DOCS, "spikes.md")).read()
    return doc.split(f"<!-- {name}:start -->")[1].split(f"<!-- {name}:end -->")[0]


def _as_subsections(summary):
    return "\n".join(("#" + x if x.startswith("#") else x) for x in summary.splitlines()[1:])


def test_docs_tables_are_the_vendored_runs_summary(vendored):
    assert (
        _doc_block("spikes-summary").strip() == _as_subsections(spikes.summary_md(vendored)).strip()
    )
    assert _doc_block("spikes-headline").strip() == spikes.headline_md(vendored).strip()


def test_vendored_record_is_the_fixed_protocol(vendored):
    p = vendored["protocol"]
    full = spikes.FULL
    for key in ("steps", "batch_size", "seq_len", "lr", "b1", "b2", "eps", "weight_decay",
                "warmup_steps", "final_lr_ratio", "probe_windows", "eval_windows"):  # fmt: skip
        assert p[key] == full[key], key
    assert tuple(p["seeds"]) == full["seeds"] and len(p["seeds"]) >= 5
    assert p["model"]["num_layers"] == full["layers"] and p["model"]["d_model"] == full["d_model"]
    assert p["global_clip_better"] is None
    assert list(vendored["methods"]) == list(spikes.default_methods(spikes.Protocol(**{
        **{k: v for k, v in p.items() if k != "model"},
        "seeds": tuple(p["seeds"]),
        "model": spikes.ModelConfig(**p["model"]),
    })))  # fmt: skip
    assert vendored["spike_definition"] == {
        "window": 50, "k": 4.0, "group_z": 4.0, "first_lookback": 5
    }  # fmt: skip
    assert vendored["num_params"] == 230_976 and not vendored["quick"]
    # the second protocol (ce21b9b): lr 0.15 held constant after 20 warm-up steps
    assert (p["lr"], p["final_lr_ratio"], p["warmup_steps"], p["steps"]) == (0.15, 1.0, 20, 400)
    assert p["seeds"] == [0, 1, 2, 3, 4] and p["b2"] == 0.999
    assert len(vendored["runs"]) == len(vendored["methods"]) * len(p["seeds"]) == 40


def test_vendored_spikes_recomputed_by_hand(vendored):
    a = vendored["analysis"]["methods"]
    seeds = vendored["protocol"]["seeds"]
    for run in vendored["runs"]:
        onsets, _ = spikes_by_hand(run["probe_loss"])
        i = seeds.index(run["seed"])
        assert a[run["method"]]["onsets_by_seed"][i] == onsets, (run["method"], run["seed"])
    for m, e in a.items():
        runs = [r for r in vendored["runs"] if r["method"] == m]
        assert e["steps_lost"] == sum(sum(spikes_by_hand(r["probe_loss"])[1]) for r in runs)


def test_vendored_final_losses_and_pairs_recomputed(vendored):
    a = vendored["analysis"]
    by = {(r["method"], r["seed"]): r["final_heldout"] for r in vendored["runs"]}
    seeds = vendored["protocol"]["seeds"]
    init = float(np.mean([r["heldout_curve"][0][1] for r in vendored["runs"]]))
    assert a["loss_at_init"] == pytest.approx(init)
    for m, e in a["methods"].items():
        finals = np.array([by[(m, s)] for s in seeds])
        assert e["final_mean"] == pytest.approx(finals.mean())
        assert e["final_std"] == pytest.approx(finals.std(ddof=1))
        assert e["better_than_adamw"] == sum(by[(m, s)] < by[("adamw", s)] - 1e-3 for s in seeds)
        assert e["diverged_seeds"] == [s for s in seeds if not by[(m, s)] < init]


def _doc_text():
    return " ".join(open(os.path.join(DOCS, "spikes.md")).read().split())


def _bullet(doc, title):
    """The text of the bullet of 'What the runs show' that starts with ``title``."""
    shown = doc.split("## What the runs show")[1].split("### The first run")[0]
    return shown.split(f"- **{title}")[1].split(" - **")[0].split("What the runs do not")[0]


def _hand(record):
    """Spikes, steps lost and finals per (method, seed), recomputed here from the raw curves."""
    runs = {(r["method"], r["seed"]): r for r in record["runs"]}
    hand = {k: spikes_by_hand(r["probe_loss"]) for k, r in runs.items()}
    finals = {k: r["final_heldout"] for k, r in runs.items()}
    return runs, hand, finals


def _window_factors(run, onset):
    """A run's factors over onset - 5 .. onset + 5 (steps the record traced)."""
    where = {s: i for i, s in enumerate(run["trace_steps"])}
    rows = [run["trace_factors"][where[s]] for s in range(onset - 5, onset + 6) if s in where]
    return np.asarray(rows, np.float64)


T95_4DF = 2.776  # Student's t, 97.5th percentile, 4 degrees of freedom (5 paired seeds)


def test_docs_prose_claims_hold_in_the_vendored_run(vendored):
    doc = _doc_text()
    seeds = vendored["protocol"]["seeds"]
    methods = list(vendored["methods"])
    labels = vendored["labels"]
    runs, hand, finals = _hand(vendored)
    onsets = {k: v[0] for k, v in hand.items()}
    total = {m: sum(len(onsets[(m, s)]) for s in seeds) for m in methods}
    assert len(runs) == 40 and seeds == [0, 1, 2, 3, 4]

    # Results: the run's time
    assert f"{vendored['seconds']:.0f} s" == "3318 s" and round(vendored["seconds"] / 60) == 55
    assert "took 3318 s (55 minutes)" in doc and "took 55 minutes (3318 s" in doc
    assert vendored["seconds"] < 3600  # "most of its hour"

    # "AdamW alone spiked on every seed": 9 spikes, the steps per seed
    b = _bullet(doc, "AdamW alone spiked on every seed")
    adam = [onsets[("adamw", s)] for s in seeds]
    assert adam == [[162], [203, 365], [170], [99, 167], [117, 190, 345]]
    assert all(adam) and total["adamw"] == 9 and "9 spikes in all" in b
    for s, o in zip(seeds, adam):
        n = len(o)
        steps = o[0] if n == 1 else ", ".join(map(str, o))
        assert f"{n} on seed {s} ({'step ' if n == 1 else ''}{steps})" in b, s
    # "lowest between steps 72 and 135 on every seed and then rose, by 0.18-0.40 nats"
    lows, rises = [], []
    for s in seeds:
        probe = np.asarray(runs[("adamw", s)]["probe_loss"])
        lows.append(int(np.argmin(probe)))
        rises.append(float(probe[-50:].mean() - probe.min()))
    assert (min(lows), max(lows)) == (72, 135) and "between steps 72 and 135" in b
    assert f"{min(rises):.2f}-{max(rises):.2f}" == "0.18-0.40" and "by 0.18-0.40 nats" in b

    # "No method removed spikes": every method spiked on every seed; the totals
    b = _bullet(doc, "No method removed spikes")
    for m in methods:
        for s in seeds:
            assert onsets[(m, s)], (m, s)
    names = {
        "global_clip": "global clipping",
        "aggc_default": "`aggc()`",
        "adagc": "AdaGC",
        "zclip": "ZClip",
        "skip_step": "skip-step",
        "group_zscore": "the group z-score variant",
        "lora_sft": "the LoRA recipe",
    }
    for m, name in names.items():
        assert f"{name} {total[m]}" in b or f"{name} {total[m]} times" in b, m
    assert min(total, key=total.get) == "lora_sft" and sorted(total.values())[1] > total["lora_sft"]
    assert "the LoRA recipe 8 (the fewest)" in b
    assert (total["aggc_default"], total["adamw"]) == (12, 9) and "(12 against 9)" in b
    # "Apart from skip-step and one spike of the group z-score variant (seed 2, step 170),
    # no method spiked at a step where AdamW did"
    same = {
        m: [(s, t) for s in seeds for t in onsets[(m, s)] if t in onsets[("adamw", s)]]
        for m in methods
        if m != "adamw"
    }
    assert same.pop("group_zscore") == [(2, 170)] and same.pop("skip_step")
    assert all(v == [] for v in same.values()), same

    # "No run diverged": all 40 finals finite and far below the loss at initialisation
    init = float(np.mean([r["heldout_curve"][0][1] for r in vendored["runs"]]))
    assert f"{init:.3f}" == "6.167" and "(6.167)" in _bullet(doc, "No run diverged")
    for k, r in runs.items():
        assert all(math.isfinite(x) for x in r["train_loss"] + r["probe_loss"]), k
        assert math.isfinite(finals[k]) and finals[k] < init - 3, k

    # "Final held-out loss: lower means, within seed noise"
    b = _bullet(doc, "Final held-out loss: differences within seed noise")
    f = {m: np.array([finals[(m, s)] for s in seeds]) for m in methods}
    means = {m: f[m].mean() for m in methods}
    for m in methods:
        assert f"{means[m]:.3f} ± {f[m].std(ddof=1):.3f}" in b, m
    order = sorted(methods, key=means.get)
    assert order == ["adagc", "aggc_default", "group_zscore", "global_clip", "zclip", "adamw",
                     "skip_step", "lora_sft"]  # fmt: skip
    below = {m: int(np.sum(f[m] < f["adamw"] - 1e-3)) for m in methods if m != "adamw"}
    assert below == {"global_clip": 4, "aggc_default": 4, "adagc": 4, "zclip": 2,
                     "skip_step": 2, "group_zscore": 3, "lora_sft": 1}  # fmt: skip
    assert max(below.values()) < len(seeds) and "none on every seed" in b
    for m in methods[1:]:
        d = f[m] - f["adamw"]
        half = T95_4DF * d.std(ddof=1) / math.sqrt(len(d))
        assert d.mean() - half < 0 < d.mean() + half, m  # "the 95% interval ... includes zero"
    d = f["aggc_default"] - f["adamw"]
    half = T95_4DF * d.std(ddof=1) / math.sqrt(len(d))
    assert f"{d.mean():.3f} ± {half:.3f}" == "-0.169 ± 0.245" and "-0.169 ± 0.245" in b
    # the two clusters: 8 runs at 2.41-2.50, 32 at 2.78-3.00, which runs are low
    low = sorted((m, s) for (m, s), v in finals.items() if v < 2.6)
    high = [v for v in finals.values() if v >= 2.6]
    lows_v = [finals[k] for k in low]
    assert len(low) == 8 and len(high) == 32
    assert (
        f"{min(lows_v):.2f}-{max(lows_v):.2f}" == "2.41-2.50" and "8 runs ended at 2.41-2.50" in b
    )
    assert f"{min(high):.2f}-{max(high):.2f}" == "2.78-3.00" and "32 at 2.78-3.00" in b
    assert max(lows_v) + 0.2 < min(high)  # two clusters, with a gap
    assert low == sorted(
        [("aggc_default", 0), ("aggc_default", 2), ("adagc", 0), ("adagc", 2),
         ("group_zscore", 0), ("group_zscore", 2), ("global_clip", 0), ("zclip", 2)]
    )  # fmt: skip
    assert not {m for m, _ in low} & {"adamw", "skip_step", "lora_sft"}
    # "within the upper cluster every method's mean is within 0.06 of AdamW's"
    for m in methods:
        upper = [finals[(m, s)] for s in seeds if finals[(m, s)] >= 2.6]
        assert abs(np.mean(upper) - means["adamw"]) < 0.06, m
    assert "within 0.06 of AdamW's" in b
    # "2 of 5 against 0 of 5 ... one-sided p = 0.22": P(both low runs fall in one arm's 5)
    p_one = math.comb(5, 2) * math.comb(5, 0) / math.comb(10, 2)
    assert f"{p_one:.2f}" == "0.22" and p_one > 0.05 and "one-sided p = 0.22" in b

    # "Steps lost say little here"
    b = _bullet(doc, "Steps lost say little here")
    lost = {m: sum(sum(hand[(m, s)][1]) for s in seeds) for m in methods}
    assert (lost["adamw"], lost["aggc_default"], lost["adagc"], lost["global_clip"]) == (
        655,
        479,
        154,
        934,
    )
    assert min(lost, key=lost.get) == "adagc" and max(lost, key=lost.get) == "global_clip"
    steps = vendored["protocol"]["steps"]
    to_end = {
        m: sum(n for s in seeds for t, n in zip(*hand[(m, s)]) if t + n == steps) for m in methods
    }
    assert (to_end["adamw"], to_end["aggc_default"]) == (526, 222)
    assert "526 of AdamW's 655 steps, 222 of `aggc()`'s 479" in b

    # "At AdamW's spikes, what each method did": recomputed from the traced factors
    b = _bullet(doc, "At AdamW's spikes")
    events = [(s, t) for s in seeds for t in onsets[("adamw", s)]]
    touched, lowest = {}, {}
    for m in methods[1:]:
        wins = [_window_factors(runs[(m, s)], t) for s, t in events]
        assert all(w.shape == (11, len(labels)) for w in wins), m
        touched[m] = sum(bool(np.any(np.abs(w - 1) > 1e-4)) for w in wins)
        lowest[m] = np.min(np.stack(wins), axis=(0, 1))
    assert touched["global_clip"] == 0 and np.all(lowest["global_clip"] == 1)
    assert touched["aggc_default"] == 5 and "around 5 of the 9" in b
    cut = {lab: v for lab, v in zip(labels, lowest["aggc_default"]) if v < 1 - 1e-4}
    assert {k: round(v, 3) for k, v in cut.items()} == {
        "embed_tokens": 0.146, "input_layernorm": 0.096, "q_proj": 0.157, "k_proj": 0.377,
        "v_proj": 0.591, "post_attention_layernorm": 0.921,
    }  # fmt: skip
    for k, v in cut.items():
        assert f"{k} ({'down to ' if k == 'embed_tokens' else ''}{v:.3f})" in b, k
    untouched = set(labels) - set(cut)
    assert untouched == {"down_proj", "gate_proj", "up_proj", "o_proj", "lm_head", "norm"}
    assert touched["zclip"] == 5 and np.ptp(lowest["zclip"]) == 0
    assert f"(down to {lowest['zclip'][0]:.3f})" == "(down to 0.138)" and "(down to 0.138)" in b
    for s, t in events:  # ZClip's factor is one number for all groups at every step
        w = _window_factors(runs[("zclip", s)], t)
        assert np.all(np.ptp(w, axis=1) == 0), (s, t)
    gz = lowest["group_zscore"]
    assert touched["group_zscore"] == 4 and int(np.sum(gz < 1 - 1e-4)) == 6
    assert f"{gz.min():.3f}" == "0.185" and "cut six groups around 4 (down to 0.185)" in b
    assert touched["adagc"] == 9 and np.all(lowest["adagc"] < 1 - 1e-4)
    assert f"{lowest['adagc'].min():.3f}" == "0.042" and "(down to 0.042)" in b
    assert touched["lora_sft"] == 9 and np.allclose(lowest["lora_sft"], 0.9)
    assert "ZClip cut every group at once around 5 of the 9" in b
    assert "AdaGC rescaled every group around all 9" in b
    assert "multiplied every group by 0.9 around all 9" in b
    share = sum(runs[("lora_sft", s)]["any_rescaled_steps"] for s in seeds) / (steps * len(seeds))
    assert f"{100 * share:.1f}%" == "99.4%" and "99.4% of its steps" in b

    # "Skip-step avoided one AdamW spike, in an exact pair"
    b = _bullet(doc, "Skip-step avoided one AdamW spike, in an exact pair")
    first_skip = []
    for s in seeds:
        a = np.asarray(runs[("adamw", s)]["probe_loss"])
        k = np.asarray(runs[("skip_step", s)]["probe_loss"])
        ta = np.asarray(runs[("adamw", s)]["train_loss"])
        tk = np.asarray(runs[("skip_step", s)]["train_loss"])
        d = int(np.nonzero(a != k)[0][0])  # the probe loss is taken before the step's update
        assert np.array_equal(a[:d], k[:d]) and np.array_equal(ta[:d], tk[:d]), s
        first_skip.append(d - 1)
    assert first_skip == [161, 193, 215, 182, 169] and "(steps 161, 193, 215, 182 and 169" in b
    shared = [(s, t) for s, t in events if t <= first_skip[seeds.index(s)]]
    assert shared == [(2, 170), (3, 99), (3, 167), (4, 117)]
    for s, t in shared:
        assert t in onsets[("skip_step", s)], (s, t)
    assert "(seed 2 step 170, seed 3 steps 99 and 167, seed 4 step 117)" in b
    run0 = runs[("skip_step", 0)]
    skipped = [u for u, fs in zip(run0["trace_steps"], run0["trace_factors"]) if max(fs) == 0]
    assert skipped == [161, 162] and "skipped steps 161 and 162" in b
    assert 162 in onsets[("adamw", 0)] and 162 not in onsets[("skip_step", 0)]
    assert onsets[("skip_step", 0)] == [194, 212, 278] and "spiked 3 times later" in b
    # "where AdamW's group norms jumped": z-score above 4 at step 161 (as in first_groups)
    adam0 = runs[("adamw", 0)]
    where = {u: i for i, u in enumerate(adam0["trace_steps"])}
    norms = np.asarray(adam0["trace_norms"])
    past = norms[[where[u] for u in range(111, 161)]]
    z = (norms[where[161]] - past.mean(0)) / past.std(0)
    assert np.sum(z > 4) >= 1

    # "Which group moves first": recomputed with the z-score rule written out here
    b = _bullet(doc, "Which group moves first")
    firsts = []
    for s, t in events:
        run = runs[("adamw", s)]
        where = {u: i for i, u in enumerate(run["trace_steps"])}
        norms = np.asarray(run["trace_norms"], np.float64)
        jumped = []
        for u in range(t - 5, t + 1):
            past = norms[[where[v] for v in range(u - 50, u)]]
            zs = (norms[where[u]] - past.mean(0)) / np.maximum(past.std(0), 1e-12)
            jumped = [labels[j] for j in range(len(labels)) if zs[j] > 4]
            if jumped:
                break
        firsts.append(jumped)
    assert sum(1 for x in firsts if x) == 8 and "Before 8 of AdamW's 9" in b
    singles = [(s, t, x[0]) for (s, t), x in zip(events, firsts) if len(x) == 1]
    assert singles == [(2, 170, "post_attention_layernorm"), (3, 167, "lm_head")]
    assert "(post_attention_layernorm on seed 2, lm_head on seed 3)" in b
    sizes = [len(x) for x in firsts if len(x) > 1]
    assert len(sizes) == 6 and (min(sizes), max(sizes)) == (2, 10)
    assert "in the other 6 events 2 to 10 groups" in b
    count = {lab: sum(lab in x for x in firsts) for lab in labels}
    assert max(count.values()) == 4 < len(events) / 2  # "no single group led"
    assert [k for k, v in count.items() if v == 4] == ["embed_tokens", "input_layernorm"]
    assert all(("embed_tokens" in x) == ("input_layernorm" in x) for x in firsts)
    assert {k for k, v in count.items() if v == 3} == {"k_proj", "o_proj", "v_proj"}

    # "The group z-score variant did not earn an aggc() option" (the rule fixed in advance)
    b = _bullet(doc, "The group z-score variant did not earn")
    earned = total["group_zscore"] < total["aggc_default"] and (
        means["group_zscore"] <= means["aggc_default"]
    )
    assert not earned
    assert total["group_zscore"] < total["aggc_default"] and "(10 against 12)" in b
    assert f"({means['group_zscore']:.3f} against {means['aggc_default']:.3f})" in b

    # "null on the final loss, and it had more spikes than AdamW alone, not fewer"
    closing = doc.split("What the runs do not support")[1].split("### The first run")[0]
    assert "more spikes than AdamW alone, not fewer (12 against 9;" in closing
    assert total["aggc_default"] > total["adamw"] and below["aggc_default"] < len(seeds)
    # "a split at least this uneven would occur about two times in three": given n spikes
    # in all, each is aggc()'s with probability 1/2; two-sided binomial tail
    a, n = total["aggc_default"], total["aggc_default"] + total["adamw"]
    tail = sum(math.comb(n, k) for k in range(n + 1) if abs(2 * k - n) >= abs(2 * a - n)) / 2**n
    assert 0.6 < tail < 0.72 and "about two times in three" in closing


def test_hyperparameters_page_numbers_are_the_vendored_runs(vendored):
    seeds = vendored["protocol"]["seeds"]
    steps = vendored["protocol"]["steps"]
    runs, hand, finals = _hand(vendored)
    methods = list(vendored["methods"])
    text = " ".join(open(os.path.join(DOCS, "hyperparameters.md")).read().split())
    section = text.split("### When training spikes")[1].split("## Every option")[0]
    total = {m: sum(len(hand[(m, s)][0]) for s in seeds) for m in methods}
    mean = {m: float(np.mean([finals[(m, s)] for s in seeds])) for m in methods}
    # a fraction first, then percent, as the tables do (1987 of 2000 steps: 99.4%, not 99.3%)
    share = {
        m: 100 * (sum(runs[(m, s)]["any_rescaled_steps"] for s in seeds) / (steps * len(seeds)))
        for m in methods
    }
    below = {m: sum(finals[(m, s)] < finals[("adamw", s)] - 1e-3 for s in seeds) for m in methods}
    # "AdamW alone spiked 9 times, on every seed"; "every method spiked on every seed, 8 to 13"
    assert all(hand[("adamw", s)][0] for s in seeds)
    assert f"AdamW alone spiked {total['adamw']} times, on every seed" in section
    for m in methods:
        assert all(hand[(m, s)][0] for s in seeds), m
    others = [total[m] for m in methods if m != "adamw"]
    assert f"{min(others)} to {max(others)} times" in section
    assert all(below[m] < len(seeds) for m in methods)
    numbers = [
        f"{total['aggc_default']} spikes and {mean['aggc_default']:.3f} mean final loss against "
        f"AdamW's {total['adamw']} and {mean['adamw']:.3f}",
        f"({share['aggc_default']:.1f}% of steps",
        f"below AdamW on {below['aggc_default']} of 5 seeds",
        f"({share['adagc']:.1f}% of steps)",
        f"lowest mean final loss ({mean['adagc']:.3f}) with {total['adagc']} spikes",
        f"{total['zclip']} spikes and {mean['zclip']:.3f}; it acted on {share['zclip']:.1f}%",
        f"({share['skip_step']:.1f}% of steps there); {total['skip_step']} spikes, the most, and "
        f"{mean['skip_step']:.3f}",
        f"{total['global_clip']} spikes and {mean['global_clip']:.3f} ({share['global_clip']:.1f}%",
        f"({share['lora_sft']:.1f}% of steps); the fewest spikes ({total['lora_sft']}) but the "
        f"highest mean final loss ({mean['lora_sft']:.3f})",
        f"{total['group_zscore']} spikes against `aggc()`'s {total['aggc_default']}",
        f"mean final loss ({mean['group_zscore']:.3f}) above `aggc()`'s "
        f"({mean['aggc_default']:.3f})",
    ]
    for number in numbers:
        assert number in section, number
    assert max(total, key=total.get) == "skip_step" and min(total, key=total.get) == "lora_sft"
    assert max(mean, key=mean.get) == "lora_sft" and min(mean, key=mean.get) == "adagc"
    # skip-step "skipped the two steps before one AdamW spike (seed 0, step 162)"
    run0 = runs[("skip_step", 0)]
    skipped = [u for u, fs in zip(run0["trace_steps"], run0["trace_factors"]) if max(fs) == 0]
    assert skipped == [161, 162] and 162 in hand[("adamw", 0)][0]
    assert 162 not in hand[("skip_step", 0)][0]
    # "At AdamW's spikes it cut embedding, attention and layer-norm groups, never the MLP"
    labels = vendored["labels"]
    cut = set()
    for s in seeds:
        for t in hand[("adamw", s)][0]:
            w = _window_factors(runs[("aggc_default", s)], t)
            cut |= {labels[j] for j in np.nonzero(np.any(w < 1 - 1e-4, axis=0))[0]}
    assert cut and not cut & {"down_proj", "gate_proj", "up_proj"}
    assert cut <= {"embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "input_layernorm",
                   "post_attention_layernorm"}  # fmt: skip
    assert "cut embedding, attention and layer-norm groups, never the MLP" in section


# --- the second regime search (AdamW alone) against docs/spikes.md ----------------


def test_second_search_chose_the_protocol_by_its_rule():
    with gzip.open(os.path.join(DOCS, "data", "spike_search_constant_lr.json.gz"), "rt") as f:
        search = json.load(f)
    assert search["num_params"] == 230_976 and search["args"]["steps"] == 400
    doc = " ".join(open(os.path.join(DOCS, "spikes.md")).read().split())
    counts: dict[tuple[float, float], list[int]] = {}
    train_end: dict[tuple[float, float], list[float]] = {}
    clip_share: dict[tuple[float, float], list[float]] = {}
    warmup = search["args"]["warmup"]
    for (lr, b2, floor, _seed), probe, loss, gnorm in zip(
        search["grid"], search["probe_loss"], search["loss"], search["gnorm"]
    ):
        assert b2 == 0.999
        counts.setdefault((lr, floor), []).append(len(spikes_by_hand(probe)[0]))
        train_end.setdefault((lr, floor), []).append(float(np.mean(loss[-20:])))
        share = float(np.mean(np.asarray(gnorm[warmup:]) > 1))
        clip_share.setdefault((lr, floor), []).append(share)
    assert sorted(counts) == [(0.15, 0.1), (0.15, 1.0), (0.3, 0.1), (0.3, 1.0)]
    for (lr, floor), c in counts.items():
        name = f"{lr:g} {'constant' if floor == 1.0 else 'decayed'}: {', '.join(map(str, c))}"
        assert name in doc, name
    # the rule: spikes on >= 4 of 5 seeds, no divergence (final training loss < 5, finite);
    # most spikes wins, ties to the lower rate
    eligible = {
        k: sum(c)
        for k, c in counts.items()
        if sum(n > 0 for n in c) >= 4 and all(math.isfinite(x) and x < 5.0 for x in train_end[k])
    }
    assert sorted(eligible) == [(0.15, 1.0), (0.3, 1.0)]
    chosen = max(sorted(eligible), key=lambda k: (eligible[k], -k[0]))
    assert chosen == (spikes.FULL["lr"], spikes.FULL["final_lr_ratio"]) == (0.15, 1.0)
    assert "(16 against 12)" in doc and (eligible[(0.15, 1.0)], eligible[(0.3, 1.0)]) == (16, 12)
    # "ended at a training loss of 2.95-3.07 ... against 2.15-2.58 with decay"
    lo, hi = min(train_end[(0.15, 1.0)]), max(train_end[(0.15, 1.0)])
    assert f"{lo:.2f}-{hi:.2f}" == "2.95-3.07" and "2.95-3.07" in doc
    lo, hi = min(train_end[(0.15, 0.1)]), max(train_end[(0.15, 0.1)])
    assert f"{lo:.2f}-{hi:.2f}" == "2.15-2.58" and "2.15-2.58 with decay" in doc
    # the second clipping value's rule: global clip 1.0 acts on 1-50% of post-warm-up steps
    shares = clip_share[(0.15, 1.0)]
    assert all(0.01 <= x <= 0.5 for x in shares) and spikes.FULL["global_clip_better"] is None
    assert {round(100 * x) for x in shares} == {2, 3} and "acted on 2-3% of" in doc


# --- the first full run (protocol d11f317: cosine decay) against its paragraph -----


def test_first_run_paragraph_is_its_record():
    with gzip.open(os.path.join(DOCS, "data", "spikes_results_d11f317.json.gz"), "rt") as f:
        first = json.load(f)
    p = first["protocol"]
    assert (p["lr"], p["final_lr_ratio"], p["steps"], p["seeds"]) == (
        0.15,
        0.1,
        400,
        [0, 1, 2, 3, 4],
    )
    assert first["num_params"] == 230_976 and len(first["runs"]) == 40
    doc = " ".join(open(os.path.join(DOCS, "spikes.md")).read().split())
    para = doc.split("### The first run")[1].split("##")[0]
    by = {(r["method"], r["seed"]): r for r in first["runs"]}
    seeds = p["seeds"]
    methods = list(first["methods"])
    counts = {m: [len(spikes_by_hand(by[(m, s)]["probe_loss"])[0]) for s in seeds] for m in methods}
    finals = {m: np.array([by[(m, s)]["final_heldout"] for s in seeds]) for m in methods}
    assert f"{first['seconds']:.0f} s" == "2813 s" and "2813 s" in para
    # "AdamW alone spiked twice, both on seed 0 (1 of 5 seeds)"
    assert [spikes_by_hand(by[("adamw", s)]["probe_loss"])[0] for s in seeds] == [
        [91, 177], [], [], [], []
    ]  # fmt: skip
    assert "spiked twice, both on seed 0 (1 of 5 seeds)" in para
    # "aggc() spiked 4 times and ended at 2.338 ± 0.154 against AdamW's 2.280 ± 0.092"
    assert sum(counts["aggc_default"]) == 4 and "spiked 4 times" in para
    for m in ("aggc_default", "adamw"):
        text = f"{finals[m].mean():.3f} ± {finals[m].std(ddof=1):.3f}"
        assert text in para, (m, text)
    # "ZClip had the fewest spikes (1) and the lowest mean (2.242)"
    total = {m: sum(c) for m, c in counts.items()}
    assert min(total, key=total.get) == "zclip" and total["zclip"] == 1
    assert sorted(total.values())[1] > 1
    means = {m: finals[m].mean() for m in methods}
    assert min(means, key=means.get) == "zclip" and f"{means['zclip']:.3f}" == "2.242"
    assert "fewest spikes (1) and the lowest mean final held-out loss (2.242)" in para
    # "no method removed spikes or ended below AdamW alone on every seed"
    for m in methods:
        if m != "adamw":
            assert total[m] > 0, m
            assert not np.all(finals[m] < finals["adamw"] - 1e-3), m
    # "the group z-score variant (5 spikes against aggc()'s 4) did not earn an option"
    assert (total["group_zscore"], total["aggc_default"]) == (5, 4)
    assert "(5 spikes against `aggc()`'s 4)" in para
