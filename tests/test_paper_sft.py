"""The paper-in-miniature SFT study: the task, the base model, the decoder, the record.

Task generator, scoring and answer extraction are checked on hand-computed
cases; the vendored record (docs/data/paper_sft_results.json.gz) is re-analysed
here independently of ``paper_sft.analyse`` and every table row and claim of
docs/paper-miniature.md is checked against it; a ``--quick`` run checks the
pipeline end to end.
"""

from __future__ import annotations

import math
import os
import re
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
