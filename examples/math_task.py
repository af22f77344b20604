"""A verifiable math task in the GSM8K mould, generated: word problems with a worked solution.

Each problem is a short story (who has how many of what, what happens to
them) followed by a question; its solution is one line of arithmetic steps and
the final number after ``####``, as GSM8K writes it::

    Q: Ann has 4 bags of 6 cups. She gives 5 to Ben. How many cups now?
    A: 4*6=24. 24-5=19. #### 19

A problem is built from clauses: an *opener* that sets the count (``has 4
cups``, ``has 4 bags of 6 cups``, ...) and one or two *events* that change it
(``gets 7 more``, ``gives 5 to Ben``, ``shares them among 3
friends``, ...). A *template* is one sequence of clause kinds (an opener and
its events); names, objects, numbers and the question's wording vary inside
it. The templates are split once, by a fixed rule (:func:`template_split`):
the test split uses only templates never trained on (every clause seen in
training, never in that combination), and only number tuples that training
never uses (:func:`numbers_held_out`). Everything is deterministic given the
seed.

Scoring is exact match of the final number (:func:`extract_answer`,
:func:`score`), reported with its standard error.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import zlib
from collections.abc import Callable, Sequence

import numpy as np

NAMES = (
    ("Ann", "She"), ("Ben", "He"), ("Cara", "She"), ("Dev", "He"), ("Eva", "She"),
    ("Finn", "He"), ("Gia", "She"), ("Hugo", "He"), ("Ines", "She"), ("Jack", "He"),
    ("Kim", "She"), ("Leo", "He"), ("Mia", "She"), ("Noah", "He"), ("Omar", "He"),
    ("Pia", "She"),
)  # fmt: skip
OBJECTS = (
    "apples", "pens", "cups", "books", "coins", "eggs", "kites", "shells", "cards",
    "stamps", "marbles", "plums",
)  # fmt: skip

# An opener: (kind, wording, how many numbers it takes, how it sets the count).
# An event: (kind, wording, the operator it applies to the count).
OPENERS = ("has", "bags", "boxes", "buys")
EVENTS = ("gets", "finds", "gives", "loses")
FINAL_EVENTS = ("", "shares")  # "shares": divide equally, asked per friend

PROMPT_PREFIX = "Q: "
PROMPT_SUFFIX = "\nA: "
ANSWER_MARK = "####"
END = "\n"


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """The number ranges and clause counts problems are drawn from.

    Attributes:
      factor_max: largest factor in a product opener (factors from 2).
      count_max: largest number of an ``has``/``buys`` opener and of an event.
      max_events: clauses after the opener (1 to this many), a final share included.
      share_max: largest number of friends in a ``shares`` event (from 2).
    """

    factor_max: int = 9
    count_max: int = 20
    max_events: int = 2
    share_max: int = 5

    def __post_init__(self) -> None:
        for name, low in (("factor_max", 2), ("count_max", 2), ("max_events", 1), ("share_max", 2)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"Difficulty.{name} must be an int >= {low}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One word problem: the question, its worked solution, the answer and its template."""

    question: str
    solution: str  # "4*6=24. 24-5=19. #### 19"
    answer: int
    template: tuple[str, ...]  # (opener, event, ..., final event or "")
    numbers: tuple[int, ...]

    @property
    def prompt(self) -> str:
        return format_prompt(self.question)

    @property
    def completion(self) -> str:
        return self.solution + END


def format_prompt(question: str) -> str:
    """The text the model is given: ``"Q: <question>\\nA: "``."""
    return PROMPT_PREFIX + question + PROMPT_SUFFIX


def all_templates(difficulty: Difficulty) -> list[tuple[str, ...]]:
    """Every template (opener, events..., final event) the difficulty allows, in a fixed order."""
    out = []
    for opener in OPENERS:
        for n in range(1, difficulty.max_events + 1):
            # n clauses after the opener, the last of them a share or not
            out += [(opener, *e, "") for e in itertools.product(EVENTS, repeat=n)]
            out += [(opener, *e, "shares") for e in itertools.product(EVENTS, repeat=n - 1)]
    return out


def _template_code(template: tuple[str, ...]) -> int:
    opener, *events, final = template
    return OPENERS.index(opener) + sum(EVENTS.index(e) for e in events) + 4 * (final == "shares")


def template_split(difficulty: Difficulty) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """(train templates, test templates). A template is test-only when the sum of its
    clauses' indices (opener in :data:`OPENERS`, events in :data:`EVENTS`, 4 for a
    share) is 2 modulo 5: about a fifth of them, while every opener and event kind
    still occurs in training templates."""
    templates = all_templates(difficulty)
    test = [t for t in templates if _template_code(t) % 5 == 2]
    train = [t for t in templates if _template_code(t) % 5 != 2]
    return train, test


def numbers_held_out(numbers: Sequence[int]) -> bool:
    """Whether a tuple of problem numbers belongs to the test split (a fixed hash rule:
    a quarter of all tuples). Training never uses such a tuple."""
    return zlib.crc32(",".join(str(int(n)) for n in numbers).encode()) % 4 == 0


def _event_text(kind: str, pronoun: str, other: str, c: int) -> str:
    return {
        "gets": f"{pronoun} gets {c} more.",
        "finds": f"{pronoun} finds {c} more.",
        "gives": f"{pronoun} gives {c} to {other}.",
        "loses": f"{pronoun} loses {c}.",
    }[kind]


def make_problem(
    template: tuple[str, ...], rng: np.random.Generator, difficulty: Difficulty
) -> Problem | None:
    """One problem of ``template``; ``None`` if the drawn numbers do not fit (the caller
    draws again): a count would go negative or a share would not be whole."""
    d = difficulty
    (name, pronoun), (other, _) = (NAMES[i] for i in rng.choice(len(NAMES), 2, replace=False))
    obj = OBJECTS[rng.integers(len(OBJECTS))]
    opener, *events, final = template
    steps: list[str] = []
    numbers: list[int] = []
    if opener in ("bags", "boxes"):
        a, b = (int(x) for x in rng.integers(2, d.factor_max + 1, size=2))
        holder = "bags" if opener == "bags" else "boxes"
        text = [f"{name} has {a} {holder} of {b} {obj}."]
        value = a * b
        steps.append(f"{a}*{b}={value}")
        numbers += [a, b]
    elif opener == "buys":
        a, b = (int(x) for x in rng.integers(1, d.count_max + 1, size=2))
        text = [f"{name} buys {a} {obj}, then {b} more."]
        value = a + b
        steps.append(f"{a}+{b}={value}")
        numbers += [a, b]
    else:
        a = int(rng.integers(2, d.count_max + 1))
        text = [f"{name} has {a} {obj}."]
        value = a
        numbers.append(a)
    for kind in events:
        c = int(rng.integers(1, d.count_max + 1))
        new = value + c if kind in ("gets", "finds") else value - c
        if new < 0:
            return None
        op = "+" if kind in ("gets", "finds") else "-"
        steps.append(f"{value}{op}{c}={new}")
        text.append(_event_text(kind, pronoun, other, c))
        value = new
        numbers.append(c)
    if final == "shares":
        c = int(rng.integers(2, d.share_max + 1))
        if value == 0 or value % c:
            return None
        text.append(f"{pronoun} shares them among {c} friends.")
        text.append(f"How many {obj} does each get?")
        steps.append(f"{value}/{c}={value // c}")
        value //= c
        numbers.append(c)
    else:
        text.append(f"How many {obj} now?")
    solution = ". ".join(steps) + f". {ANSWER_MARK} {value}"
    return Problem(" ".join(text), solution, value, tuple(template), tuple(numbers))


def generate(
    split: str, num: int, seed: int, difficulty: Difficulty = Difficulty()
) -> list[Problem]:
    """``num`` problems of ``split`` (``"train"`` or ``"test"``), deterministic given ``seed``.

    Train problems use the train templates and number tuples outside the held-out set;
    test problems use only test templates and held-out number tuples.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be an int >= 1, got {num!r}")
    train, test = template_split(difficulty)
    templates = train if split == "train" else test
    want_held_out = split == "test"
    # Different streams for the two splits even under the same seed.
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    out: list[Problem] = []
    while len(out) < num:
        problem = make_problem(templates[rng.integers(len(templates))], rng, difficulty)
        if problem is not None and numbers_held_out(problem.numbers) == want_held_out:
            out.append(problem)
    return out


_ANSWER = re.compile(re.escape(ANSWER_MARK) + r"\s*(-?\d+)")


def extract_answer(completion: str) -> int | None:
    """The final number of a completion: the integer after the first ``####`` on its first
    line; ``None`` if there is none."""
    match = _ANSWER.search(completion.split(END, 1)[0])
    return int(match.group(1)) if match else None


def score(completions: Sequence[str], problems: Sequence[Problem]) -> np.ndarray:
    """Per problem, 1.0 if the completion's final number equals the answer, else 0.0."""
    if len(completions) != len(problems):
        raise ValueError(
            f"score: {len(completions)} completions for {len(problems)} problems; need one each"
        )
    return np.asarray([float(extract_answer(c) == p.answer) for c, p in zip(completions, problems)])


def accuracy(correct: np.ndarray) -> tuple[float, float]:
    """Exact-match accuracy and its standard error ``sqrt(p (1 - p) / n)``."""
    correct = np.asarray(correct, float)
    if correct.size == 0:
        raise ValueError("accuracy: no scored problems")
    p = float(correct.mean())
    return p, math.sqrt(p * (1 - p) / correct.size)


# ---------------------------------------------------------------------------
# Bytes: how problems become token ids for the byte-level model.
# ---------------------------------------------------------------------------


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(ids: Sequence[int]) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def sft_arrays(problems: Sequence[Problem], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids ``[n, length + 1]`` (prompt, completion, zero padding) and a loss mask
    ``[n, length]`` that is 1 where the *target* is a completion byte: the prompt is
    not trained on, as in the MetaMath SFT scripts."""
    tokens = np.zeros((len(problems), length + 1), np.int32)
    mask = np.zeros((len(problems), length), np.float32)
    for i, p in enumerate(problems):
        prompt, completion = encode(p.prompt), encode(p.completion)
        ids = prompt + completion
        if len(ids) > length + 1:
            raise ValueError(
                f"problem {i} has {len(ids)} bytes, more than length + 1 = {length + 1}: "
                "raise the sequence length"
            )
        tokens[i, : len(ids)] = ids
        mask[i, len(prompt) - 1 : len(ids) - 1] = 1.0
    return tokens, mask


def prompt_arrays(problems: Sequence[Problem], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompt ids left-aligned in ``[n, length]`` (zeros after) and each prompt's length."""
    ids = [encode(p.prompt) for p in problems]
    if max(map(len, ids)) >= length:
        raise ValueError(f"a prompt has {max(map(len, ids))} bytes; length {length} is too short")
    out = np.zeros((len(ids), length), np.int32)
    for i, row in enumerate(ids):
        out[i, : len(row)] = row
    return out, np.asarray([len(r) for r in ids], np.int32)


Scorer = Callable[[Sequence[str], Sequence[Problem]], np.ndarray]
