"""An independent float64 model of AGGC's options beyond the reference (issue 9).

Written from the spec (section 4 for the reference step, section 6 for the
paper's variant) and the documented meaning of each option, in plain Python
floats, with no JAX: one :class:`GroupModel` per group, each with its own
hyperparameters, so per-group settings are modelled by building the groups
with different arguments.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

EPS = 1e-12

Mult = float | Callable[[int], float]


@dataclass
class GroupModel:
    """One group's clipper state and step, in Python floats."""

    ema_beta: float = 0.9
    low_mult: Mult = 0.5
    high_mult: Mult = 2.0
    min_norm: float = 0.0
    max_norm: float = 1.0
    auto_bounds: bool = True
    raise_small: bool = True
    max_up_scale: float = 0.0
    max_down_scale: float = 0.0
    variant: str = "reference"  # or "paper"
    ema_init: str = "zero"  # or "first" or "bias_corrected"
    nonfinite: str = "skip"  # or "reference"
    ema: float = 0.0
    updates: int = 0  # how many times the EMA was updated
    clip_down_count: int = 0
    raise_count: int = 0

    @staticmethod
    def _value(m: Mult, t: int) -> float:
        return float(m(t)) if callable(m) else float(m)

    def step(self, norm: float, t: int) -> dict[str, float]:
        beta = self.ema_beta
        taken = self.nonfinite == "reference" or math.isfinite(norm)
        ema = self.ema
        if self.ema_init == "first" and self.updates == 0 and taken:
            ema = norm  # as if this norm had always been seen
        if self.variant == "paper":
            stat = beta * ema + (1 - beta) * norm if taken else ema
            n = self.updates + (1 if taken else 0)
        else:
            stat, n = ema, self.updates
        if self.ema_init == "bias_corrected" and n > 0:
            stat = stat / (1 - beta**n)
        low, high = self._value(self.low_mult, t), self._value(self.high_mult, t)
        if self.auto_bounds:
            lower, upper = max(self.min_norm, stat * low), max(0.0, stat * high)
        else:
            lower, upper = self.min_norm, self.max_norm
        scale, kind = 1.0, None
        if taken and upper > 0 and norm > upper + EPS:
            scale, kind = upper / (norm + EPS), "down"
            if self.max_down_scale > 0:
                scale = max(scale, self.max_down_scale)
        elif taken and self.raise_small and lower > 0 and norm < lower - EPS:
            scale, kind = lower / (norm + EPS), "up"
            if self.max_up_scale > 0:
                scale = min(scale, self.max_up_scale)
        if taken:
            fed = norm if self.variant == "paper" else norm * scale
            self.ema = beta * ema + (1 - beta) * fed
            self.updates += 1
        self.clip_down_count += kind == "down"
        self.raise_count += kind == "up"
        return {"norm": norm, "lower": lower, "upper": upper, "scale": scale, "ema": self.ema}
