"""The paper-in-miniature SFT study: the task, the base model, the decoder, the record.

Task generator, scoring and answer extraction are checked on hand-computed
cases; the vendored record (docs/data/paper_sft_results.json.gz) is re-analysed
here independently of ``paper_sft.analyse`` and every table row and claim of
docs/paper-miniature.md is checked against it; a ``--quick`` run checks the
pipeline end to end.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

import math_task  # noqa: E402

RECORD = os.path.join(ROOT, "docs", "data", "paper_sft_results.json.gz")
PAGE = os.path.join(ROOT, "docs", "paper-miniature.md")


# ---------------------------------------------------------------------------
# The task: generator, split, extraction, scoring.
# ---------------------------------------------------------------------------


class ScriptedRng:
    """Stands in for numpy's Generator: returns scripted draws in order."""

    def __init__(self, draws: list) -> None:
        self.draws = list(draws)

    def integers(self, low, high=None, size=None):
        value = self.draws.pop(0)
        return np.asarray(value) if size is not None else value

    def choice(self, n, size, replace=True):
        return np.asarray(self.draws.pop(0))


def test_problem_by_hand() -> None:
    d = math_task.Difficulty()
    # names Ann (0) and Ben (1), object "cups" (2), 4 bags of 6, gives 5, then gets 7
    rng = ScriptedRng([[0, 1], 2, [4, 6], 5, 7])
    p = math_task.make_problem(("bags", "gives", "gets", ""), rng, d)
    assert p is not None
    assert p.question == (
        "Ann has 4 bags of 6 cups. She gives 5 to Ben. She gets 7 more. How many cups now?"
    )
    assert p.solution == "4*6=24. 24-5=19. 19+7=26. #### 26"
    assert p.answer == 26 and p.numbers == (4, 6, 5, 7)
    assert p.prompt == "Q: " + p.question + "\nA: "
    assert p.completion == p.solution + "\n"


def test_share_by_hand_and_rejections() -> None:
    d = math_task.Difficulty()
    # Ben (1), Cara (2), "pens" (1): buys 9 then 3 more (12), shares among 4: 3 each
    p = math_task.make_problem(("buys", "shares"), ScriptedRng([[1, 2], 1, [9, 3], 4]), d)
    assert p is not None and p.answer == 3
    assert p.question == (
        "Ben buys 9 pens, then 3 more. He shares them among 4 friends. How many pens does each get?"
    )
    assert p.solution == "9+3=12. 12/4=3. #### 3"
    # 12 among 5 is not whole; 3 - 5 is negative: no problem, the caller draws again
    assert (
        math_task.make_problem(("buys", "shares"), ScriptedRng([[1, 2], 1, [9, 3], 5]), d) is None
    )
    assert math_task.make_problem(("has", "loses", ""), ScriptedRng([[1, 2], 1, 3, 5]), d) is None


def _check_solution(p: math_task.Problem) -> None:
    # Recompute every step from its text, independently of the generator.
    *steps, final = p.solution.split(". ")
    value = None
    for step in steps:
        m = re.fullmatch(r"(\d+)([-+*/])(\d+)=(\d+)", step)
        assert m, step
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        if value is not None:
            assert a == value  # each step starts from the previous result
        exact = {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]
        assert exact == c and c >= 0
        value = c
    assert final == f"#### {value}" and p.answer == value
    assert math_task.extract_answer(p.completion) == p.answer


def test_generated_problems_are_consistent_and_split() -> None:
    d = math_task.Difficulty()
    train = math_task.generate("train", 400, 0, d)
    test = math_task.generate("test", 200, 0, d)
    for p in train + test:
        _check_solution(p)
    train_t, test_t = math_task.template_split(d)
    assert set(train_t).isdisjoint(test_t) and len(train_t) + len(test_t) == len(
        math_task.all_templates(d)
    )
    assert {p.template for p in test} <= set(test_t)
    assert {p.template for p in train} <= set(train_t)
    # every clause of a test template is trained on, in other combinations
    assert {c for t in test_t for c in t} <= {c for t in train_t for c in t}
    # held-out numbers: no number tuple is shared between the splits
    assert all(math_task.numbers_held_out(p.numbers) for p in test)
    assert not any(math_task.numbers_held_out(p.numbers) for p in train)
    # names, objects and templates vary
    assert len({p.question.split()[0] for p in train}) >= 10
    assert len({p.template for p in train}) >= 0.9 * len(train_t)
    # deterministic by seed
    assert math_task.generate("test", 20, 0, d) == test[:20]
    assert math_task.generate("test", 20, 1, d) != test[:20]


def test_extract_answer_and_score_by_hand() -> None:
    assert math_task.extract_answer("4*6=24. 24-5=19. #### 19") == 19
    assert math_task.extract_answer("####7") == 7
    assert math_task.extract_answer("#### -3 and then #### 5") == -3
    assert math_task.extract_answer("4*6=24. 24") is None
    assert math_task.extract_answer("no answer\n#### 19") is None  # first line only
    problems = math_task.generate("test", 4, 0)
    texts = [f"#### {p.answer}" for p in problems]
    texts[1] = f"#### {problems[1].answer + 1}"
    texts[2] = ""
    assert math_task.score(texts, problems).tolist() == [1.0, 0.0, 0.0, 1.0]
    acc, se = math_task.accuracy(np.array([1, 0, 1, 1]))
    assert acc == 0.75 and se == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    with pytest.raises(ValueError, match="completions"):
        math_task.score(texts[:3], problems)
    with pytest.raises(ValueError, match="split"):
        math_task.generate("dev", 3, 0)
    with pytest.raises(ValueError, match="factor_max"):
        math_task.Difficulty(factor_max=1)


def test_sft_arrays_mask_the_completion_only() -> None:
    p = math_task.generate("train", 1, 0)[0]
    tokens, mask = math_task.sft_arrays([p], 200)
    text = (p.prompt + p.completion).encode()
    assert bytes(tokens[0, : len(text)].tolist()) == text and not tokens[0, len(text) :].any()
    # targets tokens[1:]: the mask is 1 exactly at the completion's bytes
    targets = np.flatnonzero(mask[0]) + 1
    assert bytes(tokens[0, targets].tolist()).decode() == p.completion
    with pytest.raises(ValueError, match="sequence length"):
        math_task.sft_arrays([p], 20)


# ---------------------------------------------------------------------------
# The base model, LoRA and the decoder.
# ---------------------------------------------------------------------------


def test_base_checkpoint_lora_groups_and_cached_decoder() -> None:
    import jax
    import jax.numpy as jnp
    import paper_base
    from flax import nnx

    assert paper_base.file_sha256(paper_base.BASE_PATH) == paper_base.BASE_SHA256
    assert os.path.getsize(paper_base.BASE_PATH) <= 10 * 2**20
    base = paper_base.load_base()
    with pytest.raises(ValueError, match="SHA-256"):
        paper_base.load_base(paper_base.BASE_PATH, sha256="0" * 64)
    graphdef, adapters, frozen = paper_base.lora_model(4, seed=3, base=base)
    groups = paper_base.lora_groups(adapters)
    layers = paper_base.BASE_CONFIG.num_layers
    assert sorted(groups) == sorted(n for ns in paper_base.PROJECTIONS.values() for n in ns)
    for entry in groups.values():  # A and B of every layer together
        assert len(entry["leaves"]) == 2 * layers
    tokens = jnp.asarray([list(b"Q: Ann has 3 pens.\nA: ")])
    wrapped = nnx.merge(graphdef, adapters, frozen)
    # B = 0: the wrapped model computes what the base does
    np.testing.assert_allclose(np.asarray(wrapped(tokens)), np.asarray(base(tokens)), atol=1e-5)
    # the cached greedy loop equals greedy decoding by recomputing the whole prefix
    adapters = jax.tree.map(
        lambda x: x + 0.05 * jnp.sign(jnp.sin(jnp.arange(x.size))).reshape(x.shape), adapters
    )
    model = nnx.merge(graphdef, adapters, frozen)
    problems = math_task.generate("test", 2, 0)
    prompts, lengths = math_task.prompt_arrays(problems, max(len(p.prompt) for p in problems) + 6)
    out = np.asarray(
        paper_base.make_greedy_decoder(graphdef)(adapters, (frozen,), prompts, lengths)
    )
    want = prompts.copy()
    for i in range(len(problems)):
        for pos in range(int(lengths[i]), want.shape[1]):
            logits = model(jnp.asarray(want[i : i + 1, :pos]))
            want[i, pos] = int(jnp.argmax(logits[0, -1]))
    np.testing.assert_array_equal(out, want)


# ---------------------------------------------------------------------------
# The vendored record, re-analysed here, and the page's claims.
# ---------------------------------------------------------------------------


def _record() -> dict:
    with gzip.open(RECORD, "rt") as f:
        return json.load(f)


def _accuracies(run: dict) -> np.ndarray:
    return np.asarray(run["correct"], float).mean(axis=1)


def test_record_is_complete_and_paired() -> None:
    record = _record()
    p = record["protocol"]
    seeds = record["seeds"]
    assert len(seeds) >= 5
    configs = {(r["method"], r["rank"]) for r in record["runs"]}
    lora_methods = {"lora", "lora_global_clip", "lora_sft_preset", "as_ran_k2", "as_ran_k4",
                    "lora_aggc"}  # fmt: skip
    for rank in p["ranks"]:
        assert {(m, rank) for m in lora_methods} <= configs
    assert ("full_ft", None) in configs
    for r in record["runs"]:
        assert r["seeds"] == seeds
        correct = np.asarray(r["correct"])
        assert correct.shape == (len(seeds), p["test_problems"])
        assert set(np.unique(correct)) <= {0, 1}
        assert np.asarray(r["loss"]).shape == (len(seeds), p["steps"])
    assert len(record["test_answers"]) == p["test_problems"]
    # the test answers are those of the generated test split
    d = math_task.Difficulty(**p["difficulty"])
    test = math_task.generate("test", p["test_problems"], p["data_seed"], d)
    assert [q.answer for q in test] == record["test_answers"]
    # the callback as ran clips only at accumulation > 1; the preset every step
    for r in record["runs"]:
        if r["method"] in ("as_ran_k2", "as_ran_k4", "lora_sft_preset", "lora_aggc"):
            assert r["clip_down_count"], r["method"]
        else:
            assert r["clip_down_count"] is None


def _bootstrap(diff: np.ndarray, num: int = 4000, seed: int = 7) -> tuple[float, float]:
    # Independent of paper_sft.paired_bootstrap: explicit index resampling, other seed.
    rng = np.random.default_rng(seed)
    s, q = diff.shape
    means = np.empty(num)
    for b in range(num):
        rows = rng.integers(0, s, s)
        cols = rng.integers(0, q, q)
        means[b] = diff[rows][:, cols].mean()
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def _page_rows() -> dict[str, list[str]]:
    with open(PAGE) as f:
        text = f.read()
    section = text.split("<!-- sft-table -->")[1]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 6:
            rows[cells[0].strip("`")] = cells
    return rows


def test_page_table_and_claims_match_the_record() -> None:
    record = _record()
    runs = {(r["method"], r["rank"]): r for r in record["runs"]}
    first = record["protocol"]["ranks"][0]
    rows = _page_rows()
    assert len(rows) == len(runs)
    intervals = {}
    for (method, rank), run in runs.items():
        name = method if rank is None else f"{method}@r{rank}"
        acc = _accuracies(run)
        cells = rows[name]
        # accuracy mean +- std, in percent, one decimal
        assert cells[2] == f"{100 * acc.mean():.1f} +- {100 * acc.std(ddof=1):.1f}"
        if method == "lora":
            continue
        ref = runs[("lora", rank if rank is not None else first)]
        d = acc - _accuracies(ref)
        assert cells[3] == f"{100 * d.mean():+.1f}"
        assert cells[5] == f"{int(np.sum(d > 0))} / {int(np.sum(d == 0))} / {int(np.sum(d < 0))}"
        low, high = (float(x) / 100 for x in cells[4].strip("[]").split(","))
        mine = _bootstrap(np.asarray(run["correct"], float) - np.asarray(ref["correct"], float))
        # two bootstraps of the same data: their bounds agree to within a point
        assert abs(low - mine[0]) < 0.012 and abs(high - mine[1]) < 0.012
        intervals[name] = (low, high, method)
    with open(PAGE) as f:
        text = f.read()
    claims = text.split("<!-- sft-claims -->")[1].split("<!-- /sft-claims -->")[0]
    clipper_ci = {k: v for k, v in intervals.items() if v[2] != "full_ft"}
    excludes = [k for k, (lo, hi, _) in clipper_ci.items() if lo > 0 or hi < 0]
    if not excludes:
        assert "No clipper's accuracy differs from LoRA alone" in claims
    else:
        for k in excludes:
            assert k in claims
    # LoRA alone landed in the calibrated band on the study's seeds, as the page says
    lora = _accuracies(runs[("lora", first)])
    assert 0.2 <= lora.mean() <= 0.8 or "outside the calibrated band" in text


# ---------------------------------------------------------------------------
# The pipeline, end to end.
# ---------------------------------------------------------------------------


def test_quick_run_writes_a_consistent_record(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "quick"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "paper_sft.py"), "--quick", "--seeds", "3",
         "--out", str(out), "--quiet"],
        check=True, env=env, cwd=ROOT, timeout=240,
    )  # fmt: skip
    with open(out / "results.json") as f:
        record = json.load(f)
    import paper_sft

    assert record["seeds"] == [3]
    assert {r["method"] for r in record["runs"]} == set(paper_sft.METHODS)
    for r in record["runs"]:
        assert np.asarray(r["correct"]).shape == (1, paper_sft.QUICK["test_problems"])
        assert np.isfinite(np.asarray(r["loss"])).all()
    # the callback as ran clipped on some steps only; the preset on every step it could
    k2 = next(r for r in record["runs"] if r["method"] == "as_ran_k2")["clip_down_count"]
    steps = paper_sft.QUICK["steps"]
    assert all(0 <= c[0] <= steps // 2 for c in k2.values())
    summary = (out / "summary.md").read_text()
    assert summary == paper_sft.summary_md(record) + summary[len(paper_sft.summary_md(record)) :]
    assert (out / "paper_sft_accuracy.png").stat().st_size > 0
