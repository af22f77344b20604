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


def test_paper_sentence_is_the_vendored_sft_and_grpo_runs() -> None:
    sft = _record("paper_sft_results")
    assert len(sft["seeds"]) == 5 and sft["protocol"]["steps"] == 1200
    correct = _sft(sft)
    acc = {m: 100 * c.mean(axis=1) for m, c in correct.items()}
    text = {m: f"{a.mean():.1f}% ± {a.std(ddof=1):.1f}" for m, a in acc.items()}
    assert f"lifted LoRA alone's {text['lora']}" in README
    assert f"`clip_by_global_norm(1.0)` most: {text['lora_global_clip']}" in README
    # "every clipper lifted LoRA alone", "global clipping most"
    clippers = [m for m in acc if m not in ("lora", "full_ft")]
    assert all(acc[m].mean() > acc["lora"].mean() for m in clippers)
    assert max(clippers, key=lambda m: acc[m].mean()) == "lora_global_clip"
    gap = acc["lora_global_clip"].mean() - acc["lora_aggc"].mean()
    assert f"{gap:.1f} points above `aggc()`'s {text['lora_aggc']}" in README
    # the interval is the study's own (paper_sft.paired_bootstrap) ...
    sys.path.insert(0, str(ROOT / "examples"))
    import paper_sft

    diff = correct["lora_global_clip"] - correct["lora_aggc"]
    low, high = paper_sft.paired_bootstrap(diff)
    assert f"(paired bootstrap interval {100 * low:+.1f} to {100 * high:+.1f})" in README
    # ... and an independent resampling (tests/test_paper_sft.py's) also puts it above zero
    sys.path.insert(0, str(ROOT / "tests"))
    from test_paper_sft import _bootstrap

    low2, high2 = _bootstrap(diff)
    assert low2 > 0 and abs(low2 - low) < 0.02 and abs(high2 - high) < 0.02
    grpo = _record("paper_grpo_results")
    seeds, last = grpo["setup"]["seeds"], str(grpo["setup"]["steps"])
    assert len(seeds) == 3
    runs = {(r["method"], r["seed"]): r for r in grpo["runs"]}

    def accuracy(bits: str) -> float:  # the record keeps one "0"/"1" per test problem
        return bits.count("1") / len(bits)

    start = accuracy(runs[("global_clip", seeds[0])]["eval"]["0"])
    assert f"from its {100 * start:.1f}% start" in README
    # "lowered accuracy ... on every seed under every clipper"
    for (method, seed), run in runs.items():
        assert accuracy(run["eval"][last]) < start, (method, seed)
    final = {
        m: np.mean([accuracy(runs[(m, s)]["eval"][last]) for s in seeds]) for m in grpo["methods"]
    }
    assert f"(`aggc()` {100 * final['aggc']:.1f}%, verl's global clip " in README
    assert f"verl's global clip {100 * final['global_clip']:.1f}%, 3 seeds" in README


def test_hyperparameters_fine_tuning_advice_is_the_vendored_runs() -> None:
    text = " ".join((ROOT / "docs" / "hyperparameters.md").read_text().split())
    section = text.split("### Fine-tuning: LoRA SFT and GRPO")[1].split("## Every option")[0]
    sft = _record("paper_sft_results")
    correct = _sft(sft)
    acc = {m: 100 * c.mean(axis=1).mean() for m, c in correct.items()}
    assert f"Every clipper lifted LoRA alone ({acc['lora']:.1f}%)" in section
    assert f"global clipping most ({acc['lora_global_clip']:.1f}%)" in section
    aggc_variants = ("lora_sft_preset", "as_ran_k2", "as_ran_k4", "lora_aggc")
    low, high = min(acc[m] for m in aggc_variants), max(acc[m] for m in aggc_variants)
    assert f"reached {low:.1f}% to {high:.1f}%" in section
    assert all(acc[m] > acc["lora"] for m in aggc_variants)
    gap = acc["lora_global_clip"] - acc["lora_aggc"]
    sys.path.insert(0, str(ROOT / "examples"))
    import paper_sft

    lo, hi = paper_sft.paired_bootstrap(correct["lora_aggc"] - correct["lora_global_clip"])
    assert hi < 0 and f"ended {gap:.1f} points below global clipping" in section
    assert f"(paired bootstrap interval {100 * lo:.1f} to {100 * hi:.1f})" in section
    # rank 32: both configurations far below the constant answer ("failed")
    r32 = {
        r["method"]: 100 * np.asarray(r["correct"], float).mean()
        for r in sft["runs"]
        if r["rank"] == 32
    }
    assert set(r32) == {"lora", "lora_sft_preset"} and max(r32.values()) < 1.0
    assert f"({r32['lora']:.1f}% and {r32['lora_sft_preset']:.1f}%)" in section
    grpo = _record("paper_grpo_results")
    seeds, last = grpo["setup"]["seeds"], str(grpo["setup"]["steps"])
    runs = {(r["method"], r["seed"]): r for r in grpo["runs"]}

    def accuracy(bits: str) -> float:
        return 100 * bits.count("1") / len(bits)

    final = {
        m: np.array([accuracy(runs[(m, s)]["eval"][last]) for s in seeds]) for m in grpo["methods"]
    }
    preset = final["grpo_preset"] - final["global_clip"]
    assert f"ended {preset.mean():.1f} points above verl's global clip" in section
    assert f"(higher on {int(np.sum(preset > 0))} of 3 seeds;" in section and np.all(preset > 0)
    aggc = final["aggc"] - final["global_clip"]
    assert f"`aggc()` {aggc.mean():.1f} points above it" in section
    start = accuracy(runs[("global_clip", seeds[0])]["eval"]["0"])
    assert all(accuracy(r["eval"][last]) < start for r in grpo["runs"])  # "every run ended below"
