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


def test_docs_prose_claims_hold_in_the_vendored_run(vendored):
    a = vendored["analysis"]
    m = a["methods"]
    seeds = vendored["protocol"]["seeds"]
    by = {(r["method"], r["seed"]): r for r in vendored["runs"]}
    # "The regime spiked rarely": AdamW twice, both on seed 0 (steps 91 and 177)
    assert m["adamw"]["onsets_by_seed"] == [[91, 177], [], [], [], []]
    # "No method removed spikes": every method spiked at least once, 1 to 5 in all
    counts = {k: v["spikes"] for k, v in m.items()}
    assert all(1 <= c <= 5 for c in counts.values())
    assert min(counts, key=counts.get) == "zclip" and counts["zclip"] == 1
    assert m["zclip"]["steps_lost"] == 8
    assert counts["aggc_default"] == 4 and m["aggc_default"]["steps_lost"] == max(
        v["steps_lost"] for v in m.values()
    )
    assert spikes_by_hand(by[("aggc_default", 1)]["probe_loss"]) == ([125, 168], [7, 99])
    assert counts["adagc"] == counts["group_zscore"] == 5
    # "mostly on seeds where AdamW alone did not"
    others = [
        (k, i) for k in m if k != "adamw" for i, o in enumerate(m[k]["onsets_by_seed"]) for _ in o
    ]
    assert sum(i != 0 for _, i in others) > len(others) / 2
    # "no method is better than AdamW alone on every seed"; zclip lowest mean, 3 of 5
    assert all(v["better_than_adamw"] < len(seeds) for v in m.values())
    means = {k: v["final_mean"] for k, v in m.items()}
    assert min(means, key=means.get) == "zclip"
    assert round(means["zclip"], 3) == 2.242 and round(means["adamw"], 3) == 2.280
    for k in ("zclip", "adagc", "group_zscore", "lora_sft"):
        assert m[k]["better_than_adamw"] == 3, k
    assert m["aggc_default"]["better_than_adamw"] == m["global_clip"]["better_than_adamw"] == 2
    assert max(means, key=means.get) == "global_clip"
    stds = [v["final_std"] for v in m.values()]
    assert 0.08 < min(stds) and max(stds) < 0.16
    assert all(v["diverged_seeds"] == [] for v in m.values())
    # "At AdamW's two spikes, the global methods did nothing"
    f = a["factors_at_adamw_spikes"]
    for k in ("global_clip", "zclip", "skip_step"):
        assert f[k]["events_rescaled"] == 0, k
    adam0 = np.asarray(by[("adamw", 0)]["probe_loss"])
    skip0 = np.asarray(by[("skip_step", 0)]["probe_loss"])
    first_diff = int(np.nonzero(adam0 != skip0)[0][0])
    assert first_diff == 257 and m["skip_step"]["onsets_by_seed"][0][:2] == [91, 177]
    aggc_min = f["aggc_default"]["min_factor_by_group"]
    assert f["aggc_default"]["events_rescaled"] == 1
    assert [k for k, v in aggc_min.items() if v < 1 - 1e-4] == ["input_layernorm"]
    assert round(aggc_min["input_layernorm"], 3) == 0.898
    gz = f["group_zscore"]["min_factor_by_group"]
    assert [k for k, v in gz.items() if v < 1 - 1e-4] == ["embed_tokens", "input_layernorm"]
    adagc = f["adagc"]["min_factor_by_group"]
    assert sum(v < 1 - 1e-4 for v in adagc.values()) == 8 and round(min(adagc.values()), 3) == 0.155
    assert all(abs(v - 0.9) < 1e-4 for v in f["lora_sft"]["min_factor_by_group"].values())
    assert round(100 * m["lora_sft"]["steps_rescaled_share"], 1) == 99.8
    # "Which group moves first: two events"
    events = a["adamw_spike_events"]
    assert [e["first"] for e in events] == [
        ["down_proj", "gate_proj", "up_proj", "post_attention_layernorm", "o_proj", "v_proj"],
        ["k_proj"],
    ]
    # "The group z-score variant did not earn an aggc() option" (the rule fixed in advance)
    earned = counts["group_zscore"] < counts["aggc_default"] and (
        means["group_zscore"] <= means["aggc_default"]
    )
    assert not earned and means["group_zscore"] < means["aggc_default"]


def test_hyperparameters_page_numbers_are_the_vendored_runs(vendored):
    m = vendored["analysis"]["methods"]
    text = " ".join(open(os.path.join(DOCS, "hyperparameters.md")).read().split())
    numbers = [
        f"fewest spikes ({m['zclip']['spikes']})",
        f"({m['zclip']['final_mean']:.3f} against AdamW's {m['adamw']['final_mean']:.3f})",
        f"acted on {100 * m['zclip']['steps_rescaled_share']:.1f}% of steps",
        f"({100 * m['skip_step']['steps_rescaled_share']:.1f}% of steps there)",
        f"({100 * m['aggc_default']['steps_rescaled_share']:.1f}% of steps",
        f"{m['aggc_default']['spikes']} spikes and {m['aggc_default']['final_mean']:.3f}",
        f"({100 * m['adagc']['steps_rescaled_share']:.1f}% and "
        f"{100 * m['lora_sft']['steps_rescaled_share']:.1f}% of steps there)",
        f"{m['group_zscore']['spikes']} spikes against `aggc()`'s {m['aggc_default']['spikes']}",
    ]
    for number in numbers:
        assert number in text, number
    assert m["skip_step"]["onsets_by_seed"][0][:2] == m["adamw"]["onsets_by_seed"][0]


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
