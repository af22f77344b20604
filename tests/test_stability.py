"""The stability study (examples/stability.py): its pipeline, and its claims against its data.

One ``--quick`` run (about a minute) feeds the module's tests. Every number
the summary states is recomputed here from the per-run records of
``results.json``, in float64, with the formulas written out in the test.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import inspect
import json
import math
import os
import re
import sys

import numpy as np
import pytest

import aggc_optax

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _load(name: str):
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    return importlib.import_module(name)


stability = _load("stability")
text_corpus = _load("text_corpus")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("stability")
    record = stability.main(["--quick", "--quiet", "--out", str(out)])
    with open(out / "results.json") as f:
        saved = json.load(f)
    return out, record, saved


def _runs(saved, method=None, kind=None):
    return [
        r
        for r in saved["runs"]
        if (method is None or r["method"] == method) and (kind is None or r["kind"] == kind)
    ]


def test_every_output_is_written_and_every_run_recorded(study):
    out, _, saved = study
    for name in ("results.json", "summary.md", "loss_vs_lr.png", "fault_curves.png",
                 "scale_heatmap.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    setup = saved["setup"]
    per_method = len(setup["rates"]) * len(setup["seeds"]) + 2 * len(setup["seeds"])
    assert set(saved["methods"]) == set(stability.QUICK_METHODS)
    assert len(saved["runs"]) == per_method * len(saved["methods"])
    for run in saved["runs"]:
        assert len(run["train_loss"]) == setup["steps"]
        assert run["heldout_curve"][0][0] == 0 and run["heldout_curve"][-1][0] == setup["steps"]


def test_corpus_identity_is_the_files_themselves(study):
    _, _, saved = study
    files = text_corpus.stdlib_files()
    digest = hashlib.sha256()
    total = 0
    for name in files:
        with open(name, "rb") as f:
            data = f.read()
        digest.update(data)
        total += len(data)
    corpus = saved["corpus"]
    assert corpus["num_files"] == len(files) > 100
    assert corpus["num_bytes"] == total == corpus["train_bytes"] + corpus["heldout_bytes"]
    assert corpus["sha256"] == digest.hexdigest()
    assert corpus["num_heldout_files"] == math.ceil(len(files) / 10)
    assert not any("site-packages" in f or os.sep + "test" + os.sep in f for f in files)


def test_every_method_starts_from_the_same_weights(study):
    _, _, saved = study
    at_init = {}
    for run in saved["runs"]:
        at_init.setdefault(run["seed"], set()).add(run["heldout_curve"][0][1])
    assert all(len(v) == 1 for v in at_init.values()), at_init
    assert abs(next(iter(at_init[0])) - math.log(256)) < 1.0  # about uniform over bytes


def test_training_learns_on_real_text(study):
    _, _, saved = study
    init = saved["analysis"]["loss_at_init"]
    for run in _runs(saved, kind="sweep"):
        assert run["final_heldout"] < init - 1.0, (run["method"], run["lr"], run["final_heldout"])


def _sensitivity(losses, init):
    capped = [min(x if math.isfinite(x) else math.inf, init) for x in losses]
    return sum(capped) / len(capped) - min(capped)


def test_lr_sensitivity_and_best_rate_match_the_runs(study):
    _, _, saved = study
    setup, analysis = saved["setup"], saved["analysis"]
    init = float(np.mean([r["heldout_curve"][0][1] for r in _runs(saved, "adamw", "sweep")]))
    assert analysis["loss_at_init"] == pytest.approx(init, rel=1e-6)
    for method, entry in analysis["methods"].items():
        by_rate = []
        for lr in setup["rates"]:
            finals = [r["final_heldout"] for r in _runs(saved, method, "sweep") if r["lr"] == lr]
            assert len(finals) == len(setup["seeds"])
            by_rate.append(sum(finals) / len(finals))
        assert entry["sensitivity"] == pytest.approx(_sensitivity(by_rate, init), abs=1e-6)
        best = min(range(len(by_rate)), key=lambda i: by_rate[i])
        assert entry["best_rate"] == setup["rates"][best]
        assert entry["best_loss"] == pytest.approx(by_rate[best], abs=1e-6)


def _fault_factors(saved, method):
    (start, end) = saved["setup"]["fault_window"]
    runs = _runs(saved, method, "group_fault")
    return np.stack([np.asarray(r["factors"])[start:end] for r in runs])  # [seeds, steps, G]


def test_fault_factors_match_the_summary_claims(study):
    out, _, saved = study
    labels = saved["analysis"]["labels"]
    g = labels.index(saved["setup"]["fault_group"])
    summary = (out / "summary.md").read_text()
    hard_line = next(line for line in summary.splitlines() if "below 0.2 during its fault" in line)
    for method in saved["methods"]:
        f = _fault_factors(saved, method)
        others = np.delete(f, g, axis=2)
        entry = saved["analysis"]["methods"][method]["group_fault"]
        assert entry["min_factor_by_group"][labels[g]] == pytest.approx(f[:, :, g].min(), abs=1e-5)
        assert entry["other_groups_rescaled"] == int(np.sum(np.abs(others - 1) > 1e-4))
        assert (f"{method} (" in hard_line) == (method != "adamw" and f[:, :, g].min() < 0.2)
    # AdamW alone never rescales; global clipping rescales every group by one factor.
    assert np.all(_fault_factors(saved, "adamw") == 1.0)
    glob = _fault_factors(saved, "global_clip")
    assert np.allclose(glob, glob[:, :, :1], rtol=1e-3)
    assert glob.max() < 1.0


def test_quick_run_aggc_defaults_leave_other_groups_alone_during_the_fault(study):
    # The property the defaults were chosen for, on this run's own data: the
    # faulty group is cut hard, the others keep factor 1.
    _, _, saved = study
    labels = saved["analysis"]["labels"]
    g = labels.index(saved["setup"]["fault_group"])
    f = _fault_factors(saved, "aggc_default")
    assert f[:, :, g].min() < 0.2
    assert np.all(np.delete(f, g, axis=2) == 1.0)


def test_lora_recipe_damps_nearly_every_fault_free_step(study):
    _, _, saved = study
    setup = saved["setup"]
    (run,) = [r for r in _runs(saved, "lora_sft", "sweep") if r["lr"] == setup["fault_lr"]]
    f = np.asarray(run["factors"])
    share = float(np.mean(np.abs(f - 1) > 1e-4))
    assert share == pytest.approx(saved["analysis"]["methods"]["lora_sft"]["normal_rescaled_share"])
    assert share > 0.9 and np.isclose(f[1:].min(), 0.9, atol=1e-4)


def test_report_from_rewrites_the_same_summary(study, tmp_path):
    out, _, _ = study
    stability.main(["--report-from", str(out / "results.json"), "--out", str(tmp_path), "--quiet"])
    assert (tmp_path / "summary.md").read_text() == (out / "summary.md").read_text()
    assert (tmp_path / "scale_heatmap.png").stat().st_size > 0


def test_summary_sensitivity_sentence_names_the_measured_extremes(study):
    out, _, saved = study
    m = saved["analysis"]["methods"]
    low = min(m, key=lambda k: m[k]["sensitivity"])
    high = max(m, key=lambda k: m[k]["sensitivity"])
    text = (out / "summary.md").read_text()
    assert re.search(rf"Lowest learning-rate sensitivity: {re.escape(low)} \(", text)
    assert re.search(rf"highest: {re.escape(high)} \(", text)


# --- helpers, by hand -------------------------------------------------------


def test_lr_sensitivity_by_hand():
    # rates' losses 2, 3, inf (diverged) with init 5: mean(2, 3, 5) - 2 = 4/3.
    assert stability.lr_sensitivity([2.0, 3.0, math.inf], 5.0) == pytest.approx(4 / 3)
    assert stability.lr_sensitivity([2.0, 9.0, math.nan], 5.0) == pytest.approx(2.0)


def test_centered_mean_does_not_shift_a_spike():
    x = np.zeros(11)
    x[5] = 9.0
    smooth = stability.centered_mean(x, 3)
    assert np.sum(smooth * np.arange(11)) / np.sum(smooth) == pytest.approx(5.0)  # centre kept
    np.testing.assert_allclose(smooth[4:7], [3.0, 3.0, 3.0])
    assert smooth[0] == 0.0 and smooth[3] == 0.0


def test_steps_to_recover_by_hand():
    gap = np.zeros(40)
    gap[10:20] = 1.0  # a gap that closes 10 steps after the fault end at 10
    assert stability.steps_to_recover(gap, 10, tol=0.5, width=1) == 10
    assert stability.steps_to_recover(np.zeros(40), 10, tol=0.5) == 0
    still_open = np.ones(40)
    assert stability.steps_to_recover(still_open, 10, tol=0.5) is None


def test_other_corpus_and_flag_errors(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(12):
        (folder / f"{i:02d}.txt").write_text(f"file {i}: " + "the quick brown fox. " * 60)
    corpus = text_corpus.load_corpus(str(folder))
    assert corpus.num_files == 12 and corpus.num_heldout_files == 2
    assert corpus.num_bytes == sum(p.stat().st_size for p in folder.iterdir())
    with pytest.raises(SystemExit, match="too small"):
        (tmp_path / "tiny.txt").write_text("abc")
        text_corpus.load_corpus(str(tmp_path / "tiny.txt"))
    with pytest.raises(SystemExit):
        stability.parse_args(["--quick", "--fault-lr", "0.5"])  # not one of the rates
    with pytest.raises(SystemExit):
        stability.parse_args(["--methods", "adamw,nope"])


# --- docs/stability.md against the run it reports ------------------------------

DOCS = os.path.join(os.path.dirname(EXAMPLES), "docs")


def _record(name):
    with gzip.open(os.path.join(DOCS, "data", name), "rt") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def vendored():
    return _record("stability_results.json.gz")


@pytest.fixture(scope="module")
def followup():
    return _record("stability_followup.json.gz")


@pytest.fixture(scope="module")
def earlier():
    """The same full study, run with the study script of commit 89db3ba (default high_mult=2)."""
    return _record("stability_results_89db3ba.json.gz")


def _doc_block(name):
    doc = open(os.path.join(DOCS, "stability.md")).read()
    return doc.split(f"<!-- {name}:start -->")[1].split(f"<!-- {name}:end -->")[0]


def _as_subsections(summary):
    return "\n".join(("#" + x if x.startswith("#") else x) for x in summary.splitlines()[1:])


def test_docs_tables_are_the_vendored_runs_summary(vendored):
    summary = stability.summary_md(vendored["analysis"], stability.setup_of(vendored), vendored)
    assert _doc_block("stability-summary").strip() == _as_subsections(summary).strip()


def test_docs_followup_tables_are_the_vendored_followup(followup, vendored):
    summary = stability.summary_md(followup["analysis"], stability.setup_of(followup), followup)
    assert _doc_block("stability-followup").strip() == _as_subsections(summary).strip()
    pooled = stability.pooled_md([vendored, followup], list(followup["analysis"]["methods"]))
    assert _doc_block("stability-pooled").strip() == pooled.strip()


def test_pooled_sweep_refuses_records_of_another_setup(vendored, followup):
    other = json.loads(json.dumps(followup))
    other["setup"]["steps"] = 100
    with pytest.raises(ValueError, match="cannot be pooled"):
        stability.pooled_sweep([vendored, other])
    clash = json.loads(json.dumps(vendored))
    run = next(r for r in clash["runs"] if r["kind"] == "sweep")
    run["final_heldout"] += 1.0
    with pytest.raises(ValueError, match="differs between records"):
        stability.pooled_sweep([vendored, clash])


def test_docs_prose_claims_hold_in_the_vendored_run(vendored):
    m = vendored["analysis"]["methods"]
    init = vendored["analysis"]["loss_at_init"]
    setup = vendored["setup"]
    assert vendored["methods"]["aggc_default"].startswith("aggc() with its defaults (high_mult=3.0")
    assert len(setup["seeds"]) >= 3 and max(setup["rates"]) / min(setup["rates"]) >= 100
    # "best rate 1e-2 for every method", between ema_zero's and grpo's
    assert {v["best_rate"] for v in m.values()} == {0.01}
    best = {k: v["best_loss"] for k, v in m.items()}
    assert min(best, key=best.get) == "aggc_ema_zero" and max(best, key=best.get) == "grpo"
    # "Unclipped AdamW does not diverge here."
    assert m["adamw"]["diverged_rates"] == [] and max(m["adamw"]["mean_by_rate"]) < init
    # "aggc() stays within 0.07 of AdamW alone at every rate"; its worst at 0.3 and 3
    gaps = np.array(m["aggc_default"]["mean_by_rate"]) - np.array(m["adamw"]["mean_by_rate"])
    assert np.max(np.abs(gaps)) < 0.07
    assert sorted(np.argsort(-gaps)[:2]) == [setup["rates"].index(0.3), setup["rates"].index(3.0)]
    # high_mult=2 and the zero-started EMA: far worse at lr 3; ema_zero the most sensitive;
    # the recipes the least
    sens = {k: v["sensitivity"] for k, v in m.items()}
    assert max(sens, key=sens.get) == "aggc_ema_zero"
    assert sorted(sens, key=sens.get)[:2] == ["lora_sft", "grpo"]
    for k in ("aggc_high2", "aggc_ema_zero"):
        assert m[k]["mean_by_rate"][-1] > m["aggc_default"]["mean_by_rate"][-1] + 1.0
    assert abs(sens["aggc_default"] - sens["adamw"]) < 0.02
    fault = {k: v["group_fault"] for k, v in m.items()}
    # "cut v_proj to as little as 0.068x and rescaled the other groups on 2 of 660 pairs"
    assert fault["aggc_default"]["min_factor_by_group"]["v_proj"] == pytest.approx(0.068, abs=5e-4)
    assert fault["aggc_default"]["other_groups_rescaled"] == 2
    assert fault["aggc_default"]["other_groups_pairs"] == 660
    assert fault["aggc_high2"]["other_groups_rescaled"] == 3
    assert round(fault["aggc_default"]["final_gap"], 3) == round(
        fault["aggc_high2"]["final_gap"], 3
    )
    # "Global clipping shrank every group on every fault step ... had not recovered"
    assert (
        fault["global_clip"]["other_groups_rescaled"] == fault["global_clip"]["other_groups_pairs"]
    )
    assert fault["global_clip"]["steps_to_recover"] == [None, None, None]
    assert fault["global_clip"]["final_gap"] > 10 * fault["aggc_default"]["final_gap"]
    # "The authors' recipes multiplied every group by 0.9"
    for k in ("lora_sft", "grpo"):
        assert fault[k]["min_factor_by_group"]["v_proj"] == pytest.approx(0.9, abs=1e-4)
    # "A bad batch: global clipping helps most"; aggc() lost as much as AdamW alone
    bad = {k: v["bad_batch"]["final_gap"] for k, v in m.items()}
    assert bad["global_clip"] <= min(bad.values()) + 5e-4
    assert round(bad["aggc_default"], 3) == round(bad["adamw"], 3)
    # "Normal steps are left alone": aggc() below 0.1%, the recipes above 95%.
    assert m["aggc_default"]["normal_rescaled_share"] < 0.001
    assert m["aggc_default"]["normal_rescaled_share"] < m["aggc_high2"]["normal_rescaled_share"]
    for k in ("lora_sft", "grpo"):
        assert m[k]["normal_rescaled_share"] > 0.95


def test_docs_knife_edge_claim_holds_against_the_earlier_run(vendored, earlier):
    now, then = vendored["analysis"]["methods"], earlier["analysis"]["methods"]
    rates = vendored["setup"]["rates"]
    assert rates == earlier["setup"]["rates"]
    # the earlier run's names: its aggc_default was high_mult=2, its aggc_high3 is today's default
    same = {
        "adamw": "adamw",
        "global_clip": "global_clip",
        "aggc_high2": "aggc_default",
        "aggc_default": "aggc_high3",
        "aggc_high1.5": "aggc_high1.5",
        "lora_sft": "lora_sft",
        "grpo": "grpo",
        "adagc": "adagc",
    }
    assert earlier["methods"]["aggc_default"] == "aggc() with its defaults"  # high_mult=2 then
    for k in ("adamw", "global_clip"):  # untouched by AGGC's code: identical
        assert now[k]["final_heldout"] == then[k]["final_heldout"]
    for new, old in same.items():
        for lr, a, b in zip(rates, now[new]["mean_by_rate"], then[old]["mean_by_rate"]):
            if lr <= 0.03:
                assert abs(a - b) < 0.005, (new, lr)
    moved = {new: abs(now[new]["mean_by_rate"][-1] - then[old]["mean_by_rate"][-1])
             for new, old in same.items()}  # fmt: skip
    assert moved["aggc_high2"] > 1.0 and moved["aggc_high1.5"] > 1.0
    assert moved["aggc_default"] < 0.06 and moved["lora_sft"] < 0.03


def test_docs_followup_and_default_claims_hold(vendored, followup):
    pooled = stability.pooled_sweep([vendored, followup])

    def mean(method, lr):
        return float(np.mean(list(pooled[(method, lr)].values())))

    assert all(
        len(pooled[(m, lr)]) == 8 for m in followup["analysis"]["methods"] for lr in (0.3, 1.0, 3.0)
    )
    # "At lr 3 high_mult=3 beats high_mult=2 on every seed"; the other way round at 0.3 and 1
    assert stability.seeds_below(pooled, "aggc_default", "aggc_high2", 3.0) == (8, 8)
    for lr in (0.3, 1.0):
        assert stability.seeds_below(pooled, "aggc_high2", "aggc_default", lr) == (6, 8)
        assert round(mean("aggc_default", lr) - mean("aggc_high2", lr), 3) == 0.024
    # "AdamW alone is best at high rates": below aggc() on 7, 5 and 7 of 8 seeds
    got = [stability.seeds_below(pooled, "adamw", "aggc_default", lr) for lr in (0.3, 1.0, 3.0)]
    assert got == [(7, 8), (5, 8), (7, 8)]
    assert mean("adamw", 3.0) < mean("aggc_default", 3.0) < mean("global_clip", 3.0)
    pooled_methods = ("adamw", "global_clip", "aggc_default", "aggc_high2")
    lowest = [min(pooled_methods, key=lambda k: mean(k, lr)) for lr in (0.3, 1.0, 3.0)]
    assert lowest == ["adamw", "global_clip", "adamw"]
    # "aggc() at any high_mult tried does not improve the best loss or the sensitivity
    # over AdamW alone; the recipes' sensitivity 0.02 below AdamW's"
    full = vendored["analysis"]["methods"]
    for k in ("aggc_default", "aggc_high1.5", "aggc_high2"):
        assert full[k]["best_loss"] > full["adamw"]["best_loss"]
        assert full[k]["sensitivity"] > full["adamw"]["sensitivity"]
    for k in ("lora_sft", "grpo"):
        assert 0.015 < full["adamw"]["sensitivity"] - full[k]["sensitivity"] < 0.03
    m = followup["analysis"]["methods"]
    fault = {k: v["group_fault"] for k, v in m.items()}
    assert fault["aggc_default"]["min_factor_by_group"]["v_proj"] > 0.7
    assert fault["aggc_high2"]["min_factor_by_group"]["v_proj"] < 0.3
    assert (
        fault["aggc_high2"]["final_gap"]
        < fault["aggc_default"]["final_gap"]
        < fault["adamw"]["final_gap"]
    )
    # "the bad batch at lr 0.3: every clipping method ended below AdamW alone"
    bad = {k: v["bad_batch"]["final_gap"] for k, v in m.items()}
    assert all(bad[k] < 0 < bad["adamw"] for k in bad if k != "adamw")
    share = {k: v["normal_rescaled_share"] for k, v in m.items()}
    assert share["aggc_default"] < share["aggc_high2"] < share["global_clip"]
    # "Why the defaults": high_mult=3 moved little between code versions is checked in
    # test_docs_knife_edge_claim_holds_against_the_earlier_run; here the library default itself
    assert inspect.signature(aggc_optax.aggc).parameters["high_mult"].default == 3.0


def test_readme_and_docstring_numbers_are_the_vendored_runs(vendored):
    m = vendored["analysis"]["methods"]["aggc_default"]
    g = vendored["analysis"]["methods"]["global_clip"]["group_fault"]
    numbers = [
        f"{100 * m['normal_rescaled_share']:.2f}%",
        f"{m['group_fault']['min_factor_by_group']['v_proj']:.3f}x",
        f"{m['group_fault']['other_groups_rescaled']} of {m['group_fault']['other_groups_pairs']}",
        f"{m['group_fault']['final_gap']:+.3f}",
        f"{g['final_gap']:+.3f}",
    ]
    readme = open(os.path.join(os.path.dirname(DOCS), "README.md")).read()
    doc = " ".join(aggc_optax.aggc.__doc__.split())
    hyper = " ".join(open(os.path.join(DOCS, "hyperparameters.md")).read().split())
    for text in numbers:
        assert text in " ".join(readme.split()), text
        assert text in doc, text
        assert text in hyper, text


def test_within_claim_holds_on_every_record_it_speaks_for(vendored, followup):
    # "within 0.07 of AdamW alone at every learning rate of the 3-seed sweep (1e-3 to 3)"
    # speaks for the full run; "0.27 above it at lr 3 over 8 seeds (3.345 against 3.076)"
    # for the full run's seeds 0-2 pooled with the follow-up's 3-7.
    m = vendored["analysis"]["methods"]
    assert len(vendored["setup"]["seeds"]) == 3
    assert vendored["setup"]["rates"][0] == 0.001 and vendored["setup"]["rates"][-1] == 3.0
    gaps = np.array(m["aggc_default"]["mean_by_rate"]) - np.array(m["adamw"]["mean_by_rate"])
    assert np.max(np.abs(gaps)) < 0.07
    high2 = np.array(m["aggc_high2"]["mean_by_rate"]) - np.array(m["adamw"]["mean_by_rate"])
    assert np.max(np.abs(high2)) > 0.07  # "where high_mult=2.0 did not"
    pooled = stability.pooled_sweep([vendored, followup])

    def mean(method, lr):
        seeds = pooled[(method, lr)]
        assert len(seeds) == 8, (method, lr)
        return float(np.mean(list(seeds.values())))

    assert f"{mean('aggc_default', 3.0):.3f}" == "3.345" and f"{mean('adamw', 3.0):.3f}" == "3.076"
    assert round(mean("aggc_default", 3.0) - mean("adamw", 3.0), 2) == 0.27
    # ... and not within 0.07 there: the 3-seed claim must not be read as one about 8 seeds
    assert mean("aggc_default", 3.0) - mean("adamw", 3.0) > 0.07
    # Every place that makes the claim says which run it speaks for and gives the 8-seed
    # exception in the same breath.
    readme = open(os.path.join(os.path.dirname(DOCS), "README.md")).read()
    texts = {
        "README.md": readme,
        "aggc() docstring": aggc_optax.aggc.__doc__,
        "docs/stability.md": open(os.path.join(DOCS, "stability.md")).read(),
        "docs/hyperparameters.md": open(os.path.join(DOCS, "hyperparameters.md")).read(),
    }
    for where, text in texts.items():
        flat = " ".join(text.split())
        found = [i for i in range(len(flat)) if flat.lower().startswith("within 0.07", i)]
        assert found, where
        for i in found:
            window = flat[max(0, i - 120) : i + 260]
            assert "3-seed" in window or "3 seeds" in window, (where, window)
            assert "8 seeds" in window and ("0.27 above" in window), (where, window)
    assert "up to 3." not in " ".join(readme.split())


def test_readme_says_where_the_study_numbers_come_from(vendored):
    readme = " ".join(open(os.path.join(os.path.dirname(DOCS), "README.md")).read().split())
    paragraph = readme[: readme.index("0.068x")]
    paragraph = paragraph[paragraph.rindex("With its defaults") :]
    # the numbers are the stability study's, not the main command's
    assert (
        "examples/stability.py" in paragraph and "separate run from the main command" in paragraph
    )
    m = vendored["analysis"]["methods"]["aggc_default"]
    assert f"{100 * m['normal_rescaled_share']:.2f}%" in readme
