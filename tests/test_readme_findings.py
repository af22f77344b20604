"""The README's paragraph on the spike study and the paper in miniature, checked
against the vendored records (docs/data/*.json.gz) it speaks for."""

from __future__ import annotations

import collections
import gzip
import json
import pathlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = " ".join((ROOT / "README.md").read_text().split())


def _record(name: str) -> dict:
    with gzip.open(ROOT / "docs" / "data" / f"{name}.json.gz", "rt") as f:
        return json.load(f)


def test_spike_sentence_is_the_vendored_spike_study() -> None:
    record = _record("spikes_results")
    methods = record["analysis"]["methods"]
    assert record["num_params"] == 230_976 and record["protocol"]["lr"] == 0.15
    assert len(record["protocol"]["seeds"]) == 5
    assert "231k-parameter model at lr 0.15, 5 paired seeds" in README
    adamw, aggc = methods["adamw"], methods["aggc_default"]
    # "spiked only twice, both on one seed"
    assert sum(adamw["spikes_by_seed"]) == 2
    assert sum(n > 0 for n in adamw["spikes_by_seed"]) == 1
    assert sum(aggc["spikes_by_seed"]) == 4
    for name, stats in (("aggc_default", aggc), ("adamw", adamw)):
        final = np.asarray(stats["final_by_seed"])
        text = f"{final.mean():.3f} ± {final.std(ddof=1):.3f}"
        assert text in README, (name, text)
    # "no stabiliser removed spikes or beat AdamW alone on every seed"
    adamw_final = np.asarray(adamw["final_by_seed"])
    for name, stats in methods.items():
        if name == "adamw":
            continue
        assert sum(stats["spikes_by_seed"]) > 0, name
        assert not np.all(np.asarray(stats["final_by_seed"]) < adamw_final - 0.001), name


def _sft_accuracy(record: dict, method: str) -> np.ndarray:
    (run,) = [r for r in record["runs"] if r["method"] == method]
    return np.asarray(run["correct"], float).mean(axis=1)


def test_paper_sentence_is_the_vendored_sft_and_grpo_runs() -> None:
    sft = _record("paper_sft_results")
    assert len(sft["seeds"]) == 5
    for method, text in (("lora_aggc", "9.1% ± 4.6"), ("lora", "6.5% ± 1.5")):
        acc = _sft_accuracy(sft, method) * 100
        assert f"{acc.mean():.1f}% ± {acc.std(ddof=1):.1f}" == text
        assert text in README
    answers = collections.Counter(sft["test_answers"])
    constant = answers.most_common(1)[0][1] / len(sft["test_answers"])
    assert f"{100 * constant:.1f}%" == "11.3%" and "below the 11.3% of always answering" in README
    # "every configuration's mean accuracy below" that baseline, SFT and GRPO
    for run in sft["runs"]:
        assert np.asarray(run["correct"], float).mean() < constant, run["method"]
    grpo = _record("paper_grpo_results")
    finals = {m: np.mean(list(v["final"].values())) for m, v in grpo["analysis"]["methods"].items()}
    assert len(grpo["analysis"]["methods"]["aggc"]["final"]) == 3
    assert f"{100 * finals['aggc']:.1f}% against {100 * finals['global_clip']:.1f}%" in README
    assert "8.0% against 7.9%" in README
    for method, final in finals.items():
        assert final < constant, method
