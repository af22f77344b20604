"""The README's paragraph on the spike study and the paper in miniature, and the fine-tuning
advice in docs/hyperparameters.md, checked against the vendored records (docs/data/*.json.gz)
they speak for."""

from __future__ import annotations

import gzip
import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = " ".join((ROOT / "README.md").read_text().split())
T_975_4DF = 2.7764  # Student's t, 97.5th percentile, 4 degrees of freedom (5 paired seeds)


def _record(name: str) -> dict:
    with gzip.open(ROOT / "docs" / "data" / f"{name}.json.gz", "rt") as f:
        return json.load(f)


def _mean_std(values) -> str:
    values = np.asarray(values, float)
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"


def test_spike_sentence_is_the_vendored_spike_study() -> None:
    record = _record("spikes_results")
    p = record["protocol"]
    assert record["num_params"] == 230_976 and p["lr"] == 0.15 and p["final_lr_ratio"] == 1.0
    seeds = p["seeds"]
    assert len(seeds) == 5 and "(a 231k-parameter model at a constant lr 0.15, 5 paired" in README
    sys.path.insert(0, str(ROOT / "tests"))
    from test_spikes import spikes_by_hand  # the spike rule written out by hand

    by = {(r["method"], r["seed"]): r for r in record["runs"]}
    methods = list(record["methods"])
    count = {m: [len(spikes_by_hand(by[(m, s)]["probe_loss"])[0]) for s in seeds] for m in methods}
    final = {m: np.array([by[(m, s)]["final_heldout"] for s in seeds]) for m in methods}
    # "AdamW alone spiked on every seed, 9 times in all; aggc() spiked 12 times"
    assert all(n > 0 for n in count["adamw"]) and sum(count["adamw"]) == 9
    assert sum(count["aggc_default"]) == 12 and "`aggc()` spiked 12 times" in README
    text = (
        f"ended at {_mean_std(final['aggc_default'])} held-out loss against AdamW's "
        f"{_mean_std(final['adamw'])} (lower on 4 of 5 seeds, within seed noise)"
    )
    assert text in README, text
    diff = final["aggc_default"] - final["adamw"]
    assert np.sum(diff < -1e-3) == 4
    # within seed noise: the paired 95% t-interval of the difference includes zero
    assert abs(diff.mean()) < T_975_4DF * diff.std(ddof=1) / np.sqrt(len(diff))
    # "no stabiliser removed spikes or beat AdamW alone on every seed"
    for m in methods:
        if m != "adamw":
            assert sum(count[m]) > 0, m
            assert not np.all(final[m] < final["adamw"] - 1e-3), m


def _sft(record: dict) -> dict[str, np.ndarray]:
    """config -> [seeds, problems] correctness (rank 8 and full fine-tuning)."""
    return {
        r["method"]: np.asarray(r["correct"], float)
        for r in record["runs"]
        if r["rank"] in (8, None)
    }


def _grpo_final(grpo: dict) -> tuple[float, dict[str, np.ndarray]]:
    """The GRPO record's start accuracy and each method's per-seed final accuracy, in %
    (tests/test_paper_grpo.py's reading of the record)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_paper_grpo import _acc, _final

    start = 100 * _acc(grpo["runs"][0]["eval"]["0"])
    assert all(100 * _acc(r["eval"]["0"]) == start for r in grpo["runs"])  # one start
    return start, {m: 100 * a for m, a in _final(grpo).items()}


def _interval(correct: dict[str, np.ndarray], method: str, ref: str = "lora") -> tuple:
    sys.path.insert(0, str(ROOT / "examples"))
    import paper_sft

    low, high = paper_sft.paired_bootstrap(correct[method] - correct[ref])
    return 100 * low, 100 * high


def test_paper_sentence_is_the_vendored_sft_and_grpo_runs() -> None:
    sft = _record("paper_sft_results")
    p = sft["protocol"]
    assert len(sft["seeds"]) == 5 and p["steps"] == 1200 and p["lr"] == 5e-3
    assert "at a calibrated lr 5e-3" in README
    correct = _sft(sft)
    acc = {m: 100 * c.mean(axis=1) for m, c in correct.items()}
    text = {m: f"{a.mean():.1f}% ± {a.std(ddof=1):.1f}" for m, a in acc.items()}
    assert f"once LoRA alone trained ({text['lora']} at" in README
    assert 20 <= acc["lora"].mean() <= 80  # "trained": inside the calibrated band
    assert f"`aggc()` reached {text['lora_aggc']}" in README
    assert f"`clip_by_global_norm(1.0)` {text['lora_global_clip']}" in README
    assert f"the authors' recipe {text['lora_sft_preset']}" in README
    # "no clipper moved accuracy beyond seed noise": every interval contains zero, by the
    # study's bootstrap and by tests/test_paper_sft.py's independent one
    sys.path.insert(0, str(ROOT / "tests"))
    from test_paper_sft import _bootstrap

    for m in ("lora_global_clip", "lora_sft_preset", "as_ran_k2", "as_ran_k4", "lora_aggc"):
        low, high = _interval(correct, m)
        low2, high2 = _bootstrap(correct[m] - correct["lora"])
        assert low < 0 < high and low2 < 0 < high2, m
    d = (acc["lora_aggc"] - acc["lora"]).mean()
    low, high = _interval(correct, "lora_aggc")
    assert f"(+{d:.1f} points, paired bootstrap interval {low:.1f} to {high:+.1f})" in README
    # the lr 1e-2 run: LoRA alone failed, every clipper lifted it, none above the 5e-3 LoRA
    old = _sft(_record("paper_sft_results_lr1e-2"))
    old_acc = {m: 100 * c.mean() for m, c in old.items()}
    assert f"too high for LoRA alone ({old_acc['lora']:.1f}%)" in README
    clippers = [m for m in old_acc if m not in ("lora", "full_ft")]
    assert all(old_acc["lora"] < old_acc[m] < acc["lora"].mean() for m in clippers)
    start, final = _grpo_final(_record("paper_grpo_results"))
    assert f"from its {start:.1f}% start" in README
    assert all(np.all(f < start) for f in final.values())  # every seed, every clipper
    assert f"(`aggc()` {final['aggc'].mean():.1f}%, verl's global clip " in README
    assert f"verl's global clip {final['global_clip'].mean():.1f}%, 3 seeds" in README


def test_hyperparameters_fine_tuning_advice_is_the_vendored_runs() -> None:
    text = " ".join((ROOT / "docs" / "hyperparameters.md").read_text().split())
    section = text.split("### Fine-tuning: LoRA SFT and GRPO")[1].split("## Every option")[0]
    sft = _record("paper_sft_results")
    correct = _sft(sft)
    acc = {m: 100 * c.mean(axis=1).mean() for m, c in correct.items()}
    assert "LoRA on a generated math task at lr 5e-3" in section and sft["protocol"]["lr"] == 5e-3
    assert (
        f"LoRA alone reached {acc['lora']:.1f}%, global clipping {acc['lora_global_clip']:.1f}%"
        in section
    )
    aggc_variants = ("lora_sft_preset", "as_ran_k2", "as_ran_k4", "lora_aggc")
    low, high = min(acc[m] for m in aggc_variants), max(acc[m] for m in aggc_variants)
    assert f"`aggc()`) {low:.1f}% to {high:.1f}%" in section
    for m in ("lora_global_clip", *aggc_variants):  # "every interval contains zero"
        lo, hi = _interval(correct, m)
        assert lo < 0 < hi, m
    lo, hi = _interval(correct, "lora_aggc")
    d = acc["lora_aggc"] - acc["lora"]
    assert f"(`aggc()` +{d:.1f} points, paired bootstrap interval {lo:.1f} to {hi:+.1f})" in section
    old = {m: 100 * c.mean() for m, c in _sft(_record("paper_sft_results_lr1e-2")).items()}
    assert f"at lr 1e-2 LoRA alone reached {old['lora']:.1f}%" in section
    assert (
        f"(global clipping to {old['lora_global_clip']:.1f}%, `aggc()` to {old['lora_aggc']:.1f}%)"
        in section
    )
    assert all(old["lora"] < old[m] < acc["lora"] for m in ("lora_global_clip", *aggc_variants))
    r32 = {r["method"]: r for r in sft["runs"] if r["rank"] == 32}
    r32_acc = {m: 100 * np.asarray(r["correct"], float).mean() for m, r in r32.items()}
    assert (
        f"LoRA alone {r32_acc['lora']:.1f}%, with `presets.lora_sft` "
        f"{r32_acc['lora_sft_preset']:.1f}%" in section
    )
    r32_correct = {m: np.asarray(r["correct"], float) for m, r in r32.items()}
    lo, hi = _interval(r32_correct, "lora_sft_preset")
    assert lo < 0 < hi and f"(interval {lo:.1f} to {hi:+.1f})" in section
    grpo = _record("paper_grpo_results")
    start, final = _grpo_final(grpo)
    preset = final["grpo_preset"] - final["global_clip"]
    assert f"ended {preset.mean():.1f} points above verl's global clip" in section
    assert f"(higher on {int(np.sum(preset > 0))} of 3 seeds)" in section
    aggc = final["aggc"] - final["global_clip"]
    assert f"`aggc()` {aggc.mean():.1f} points above it" in section
    assert all(np.all(f < start) for f in final.values())  # "every run ended below"
    import paper_grpo  # "both intervals containing zero", recomputed from the runs

    analysis = paper_grpo.analyse(grpo)
    for m in ("grpo_preset", "aggc"):
        lo, hi = analysis["methods"][m]["bootstrap_vs_global"]
        assert lo < 0 < hi, m
