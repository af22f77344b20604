"""An independent float64 model of the reference clipper, written from the spec.

Tests compare `aggc_optax` against this model, never against the code under
test. It follows `shared/spec/reference-semantics.md` line by line, in plain
Python floats (float64) and NumPy, with no JAX: per-tensor sums of squares in
float32, accumulated across tensors as Python floats, Python's ``max``/``min``
(so ``max(0.0, nan) == 0.0``), and the rescale done as ``grad * float32(scale)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

EPS = 1e-12


def spec_schedule(
    t: int,
    base: float,
    late: float,
    total_steps: int | None,
    switch: float = 0.5,
    transition: float = 0.2,
    schedule: str = "linear",
) -> float:
    """Spec section 5, in float64."""
    if schedule != "linear" or not total_steps or total_steps <= 0:
        return base
    late = late if late > 0 else base
    prog = min(max(t / max(1, total_steps), 0.0), 1.0)
    w = max(1e-6, transition)
    if prog <= switch:
        return base
    if prog >= switch + w:
        return late
    a = (prog - switch) / w
    return base * (1 - a) + late * a


def spec_label(name: str) -> str | None:
    """Spec section 2, written independently of aggc_optax._labels."""
    tokens = [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj",
        "c_attn", "c_proj", "w1", "w2", "w3", "lm_head", "embed_tokens",
    ]  # fmt: skip
    for tok in tokens:
        if "." + tok + "." in name:
            return tok
        if name.endswith("." + tok + ".weight") or name.endswith("." + tok + ".bias"):
            return tok
    if "." not in name:
        return None
    second_last = name.split(".")[-2]
    if second_last.isdigit() or second_last == "layers":
        return None
    return second_last


def tensor_sq_sum(g: np.ndarray) -> float:
    """Per-tensor sum of squares in float32, returned as a Python float."""
    g32 = np.asarray(g, dtype=np.float32)
    return float(np.sum(g32 * g32, dtype=np.float32))


@dataclass
class SpecClipper:
    """Spec section 4 for every group, in Python floats."""

    ema_beta: float = 0.98
    low_mult: float | Callable[[int], float] = 1.0
    high_mult: float | Callable[[int], float] = 1.0
    min_norm: float = 0.0
    max_norm: float = 1.0
    auto_bounds: bool = False
    raise_small: bool = False
    max_up_scale: float = 0.0
    max_down_scale: float = 0.0
    ema: dict[str, float] = field(default_factory=dict)

    def _mult(self, value: float | Callable[[int], float], t: int) -> float:
        return float(value(t)) if callable(value) else float(value)

    def group_step(self, label: str, norm: float, t: int) -> dict[str, float]:
        ema = self.ema.get(label, 0.0)
        low, high = self._mult(self.low_mult, t), self._mult(self.high_mult, t)
        if self.auto_bounds:
            lower = max(self.min_norm, ema * low)
            upper = max(0.0, ema * high)
        else:
            lower, upper = self.min_norm, self.max_norm
        if upper > 0 and norm > upper + EPS:
            scale = upper / (norm + EPS)
            if self.max_down_scale > 0:
                scale = max(scale, self.max_down_scale)
        elif self.raise_small and lower > 0 and norm < lower - EPS:
            scale = lower / (norm + EPS)
            if self.max_up_scale > 0:
                scale = min(scale, self.max_up_scale)
        else:
            scale = 1.0
        self.ema[label] = self.ema_beta * ema + (1 - self.ema_beta) * norm * scale
        return {"norm": norm, "lower": lower, "upper": upper, "scale": scale}

    def step(
        self, grads: Mapping[str, np.ndarray], labels: Mapping[str, str | None], t: int
    ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, float]]]:
        """One optimizer step on a flat ``{name: grad}`` dict; returns clipped grads and stats."""
        sums: dict[str, float] = {}
        for name, g in grads.items():
            label = labels[name]
            if label is None:
                continue
            sums[label] = sums.get(label, 0.0) + tensor_sq_sum(g)
        stats = {
            label: self.group_step(label, math.sqrt(s + 1e-16), t) for label, s in sums.items()
        }
        out = {}
        for name, g in grads.items():
            label = labels[name]
            if label is None:
                out[name] = np.array(g)
            else:
                out[name] = np.asarray(g) * np.asarray(
                    stats[label]["scale"], dtype=np.asarray(g).dtype
                )
        return out, stats
