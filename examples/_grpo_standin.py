"""STAND-IN for part 1's math task and SFT policy, used only until branch ``paper`` lands.

Problems mimic ``math_task``'s format (``"Q: ...\\nA: "``, a worked solution
ending ``#### N``); the "SFT policy" is the ``train_lm`` decoder trained for a
few hundred steps on their solutions. Nothing produced with it is a result.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_lm

END = "\n"


@dataclasses.dataclass(frozen=True)
class Problem:
    question: str
    solution: str
    answer: int

    @property
    def prompt(self) -> str:
        return "Q: " + self.question + "\nA: "

    @property
    def completion(self) -> str:
        return self.solution + END


def generate(split: str, num: int, seed: int) -> list[Problem]:
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    out = []
    for _ in range(num):
        a, b, c = (int(x) for x in rng.integers(2, 20, size=3))
        name = train_lm.NAMES[rng.integers(len(train_lm.NAMES))]
        q = f"{name} has {a} pens and gets {b} more, then {c} more. How many now?"
        out.append(
            Problem(q, f"{a}+{b}={a + b}. {a + b}+{c}={a + b + c}. #### {a + b + c}", a + b + c)
        )
    return out


_ANSWER = re.compile(r"####\s*(-?\d+)")


def extract_answer(completion: str) -> int | None:
    m = _ANSWER.search(completion.split(END, 1)[0])
    return int(m.group(1)) if m else None


def score(completions: Sequence[str], problems: Sequence[Problem]) -> np.ndarray:
    return np.asarray([float(extract_answer(c) == p.answer) for c, p in zip(completions, problems)])


def encode(text: str) -> list[int]:
    return list(text.encode())


def decode(ids: Sequence[int]) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def sft_policy(steps: int = 300, seed: int = 0) -> tuple[Any, Any, train_lm.ModelConfig]:
    cfg = train_lm.ModelConfig(vocab_size=256, d_model=64, num_layers=2, num_heads=4, mlp_dim=172)
    model = nnx.jit(lambda: train_lm.LlamaForCausalLM(cfg, nnx.Rngs(seed)))()
    graphdef, params = nnx.split(model, nnx.Param)
    probs = generate("train", 4000, seed)
    rows = [encode(p.prompt + p.completion) for p in probs]
    length = max(map(len, rows))
    toks = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        toks[i, : len(r)] = r
    tx = optax.adamw(3e-3)
    state = tx.init(params)

    @jax.jit
    def step(params: Any, state: Any, t: jax.Array) -> Any:
        loss, g = jax.value_and_grad(
            lambda p: jnp.mean(train_lm.token_losses(nnx.merge(graphdef, p), t))
        )(params)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state, loss

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        params, state, _ = step(params, state, jnp.asarray(toks[rng.integers(len(toks), size=32)]))
    return graphdef, params, cfg
