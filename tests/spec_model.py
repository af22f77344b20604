"""An independent float64 model of the reference clipper, written from the spec.

Tests compare `aggc_optax` against this model, never against the code under
test. It follows `docs/reference-behaviour.md` line by line, in plain
Python floats (float64) and NumPy, with no JAX: per-tensor sums of squares in
float32, accumulated across tensors as Python floats, Python's ``max``/``min``
(so ``max(0.0, nan) == 0.0``), and the rescale done as ``grad * float32(scale)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

EPS = 1e-12

# docs/reference-behaviour.md §2's examples (name -> label), plus its list-order rule.
SPEC_LABEL_TABLE: list[tuple[str, str | None]] = [
    ("model.layers.3.self_attn.q_proj.weight", "q_proj"),
    ("model.layers.3.self_attn.q_proj.bias", "q_proj"),
    ("model.layers.0.input_layernorm.weight", "input_layernorm"),
    ("model.norm.weight", "norm"),
    ("model.embed_tokens.weight", "embed_tokens"),
    ("lm_head.weight", "lm_head"),
    ("model.layers.0.residual_gate", None),
    ("logit_scale", None),
    ("model.layers.weight", None),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", "q_proj"),
    ("transformer.h.0.attn.c_proj.weight", "c_proj"),
    ("transformer.h.0.mlp.c_proj.weight", "c_proj"),
    ("transformer.wte.weight", "wte"),
    ("transformer.h.0.ln_1.weight", "ln_1"),
    ("model.layers.0.block_sparse_moe.experts.7.w2.weight", "w2"),
    ("model.layers.0.block_sparse_moe.gate.weight", "gate"),
    ("model.layers.0.mlp.q_proj_extra.weight", "q_proj_extra"),
    # list order wins over position in the name
    ("model.layers.0.self_attn.q_proj.up_proj.weight", "q_proj"),
]

# docs/reference-behaviour.md §9's recipes, copied from the spec's table (the reference's option
# names).
LORA = dict(
    enable=True, auto_bounds=True, ema_beta=0.95, low_mult=0.95, high_mult=0.6, min_norm=0.01,
    raise_small=False, bounds_schedule="linear", low_mult_late=0.98, high_mult_late=0.7,
    bounds_switch_ratio=0.4, bounds_transition_ratio=0.3, max_up_scale=1.1, max_down_scale=0.9,
    sync_dist=True,
)  # fmt: skip
GRPO = dict(
    enable=True, auto_bounds=True, ema_beta=0.99, low_mult=0.98, high_mult=0.7, min_norm=0.0,
    raise_small=True, bounds_schedule="linear", low_mult_late=0.98, high_mult_late=0.999,
    bounds_switch_ratio=0.6, bounds_transition_ratio=0.2, max_up_scale=1.1, max_down_scale=0.9,
    keep_global_clip=False, sync_dist=True,
)  # fmt: skip


def spec_schedule(
    t: int,
    base: float,
    late: float,
    total_steps: int | None,
    switch: float = 0.5,
    transition: float = 0.2,
    schedule: str = "linear",
) -> float:
    """docs/reference-behaviour.md §5, in float64."""
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
    """docs/reference-behaviour.md §2, written independently of aggc_optax._labels."""
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


Mult = float | Callable[[int], float]


@dataclass
class GroupModel:
    """One group's clipper state and step, in Python floats: §4, and the options beyond it.

    The reference is ``variant="reference", ema_init="zero",
    nonfinite="reference"``; the paper's variant (§6), the other EMA starts and the
    skipping of non-finite norms are written from their documentation. Per-group
    settings are modelled by building the groups with different arguments.
    """

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
        if self.ema_init == "first" and self.updates == 0 and norm <= math.sqrt(1e-16):
            # an all-zero gradient (its norm is the 1e-16 floor's): nothing to start
            # from, so the group waits for its first non-zero norm
            taken = False
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


@dataclass
class SpecClipper:
    """docs/reference-behaviour.md §4 for every group, in Python floats."""

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

    def group_step(self, label: str, norm: float, t: int) -> dict[str, float]:
        """§4 for one group: :class:`GroupModel` with the reference's settings."""
        group = GroupModel(
            ema_beta=self.ema_beta,
            low_mult=self.low_mult,
            high_mult=self.high_mult,
            min_norm=self.min_norm,
            max_norm=self.max_norm,
            auto_bounds=self.auto_bounds,
            raise_small=self.raise_small,
            max_up_scale=self.max_up_scale,
            max_down_scale=self.max_down_scale,
            nonfinite="reference",
            ema=self.ema.get(label, 0.0),
        )
        out = group.step(norm, t)
        self.ema[label] = group.ema
        return {k: out[k] for k in ("norm", "lower", "upper", "scale")}

    def step(
        self,
        grads: Mapping[str, np.ndarray],
        labels: Mapping[str, str | None],
        t: int,
        scale_only: Mapping[str, str] | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, float]]]:
        """One optimizer step on a flat ``{name: grad}`` dict; returns clipped grads and stats.

        ``scale_only`` maps names to the group they are scaled with without being
        counted in its norm (DoRA's magnitude vectors, docs/reference-behaviour.md §10);
        those names are not in ``labels``' groups.
        """
        scale_only = scale_only or {}
        sums: dict[str, float] = {}
        for name, g in grads.items():
            label = labels[name]
            if label is None or name in scale_only:
                continue
            sums[label] = sums.get(label, 0.0) + tensor_sq_sum(g)
        stats = {
            label: self.group_step(label, math.sqrt(s + 1e-16), t) for label, s in sums.items()
        }
        out = {}
        for name, g in grads.items():
            label = scale_only.get(name, labels[name])
            if label is None:
                out[name] = np.array(g)
            else:
                out[name] = np.asarray(g) * np.asarray(
                    stats[label]["scale"], dtype=np.asarray(g).dtype
                )
        return out, stats


def python_max(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise Python ``max(a, b)``: ``a`` unless ``b > a`` (so ``max(0.0, nan) == 0.0``)."""
    return np.where(b > a, b, a)


def python_min(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise Python ``min(a, b)``: ``a`` unless ``b < a``."""
    return np.where(b < a, b, a)


def tensor_sq_sums(g: np.ndarray) -> np.ndarray:
    """Per-step float32 sum of squares of a stack of tensors ``[T, ...]``, as float64 ``[T]``."""
    g32 = np.asarray(g, dtype=np.float32)
    axes = tuple(range(1, g32.ndim))
    return np.sum(g32 * g32, axis=axes, dtype=np.float32).astype(np.float64)


def spec_trajectory(
    sq_sums: np.ndarray,
    *,
    ema_beta: float,
    low_mult: float | np.ndarray,
    high_mult: float | np.ndarray,
    min_norm: float = 0.0,
    max_norm: float = 1.0,
    auto_bounds: bool = True,
    raise_small: bool = False,
    max_up_scale: float = 0.0,
    max_down_scale: float = 0.0,
    observed_scale: np.ndarray | None = None,
    tie_tol: float = 0.0,
) -> dict[str, np.ndarray]:
    """docs/reference-behaviour.md §4 over a whole run, vectorised over groups, in float64.

    The same math as :meth:`SpecClipper.group_step`, for long runs: ``sq_sums``
    is ``[T, G]`` (each group's sum of per-tensor float32 sums of squares at each
    step); ``low_mult``/``high_mult`` are numbers or per-step values ``[T]``.

    Ties: with an inverted interval (``lower > upper``) and ``raise_small``, the
    scale jumps at ``norm == upper`` (just above: clipped down by ~1; at or
    below: raised toward ``lower``). When the norm is within ``tie_tol``
    (relative) of ``upper`` there, float32 rounding decides the branch, so a
    float32 run may legitimately take the other one. If ``observed_scale``
    (``[T, G]``, the float32 run's scales) is given, such a tie takes the
    branch whose scale is closer to the observed one; ``"ties"`` counts them.
    Nowhere else is the observation used.

    Returns:
      ``{"norm", "lower", "upper", "scale", "ema"}``, each ``[T, G]`` (``ema`` is
      the EMA *after* each step), and ``"ties"``, the number of ties resolved.
    """
    sq_sums = np.asarray(sq_sums, dtype=np.float64)
    steps, groups = sq_sums.shape
    low = np.broadcast_to(np.asarray(low_mult, np.float64), (steps,))
    high = np.broadcast_to(np.asarray(high_mult, np.float64), (steps,))
    norms = np.sqrt(sq_sums + 1e-16)
    out = {k: np.empty((steps, groups)) for k in ("norm", "lower", "upper", "scale", "ema")}
    ema = np.zeros(groups)
    zero = np.zeros(groups)
    ties = 0
    for t in range(steps):
        norm = norms[t]
        if auto_bounds:
            lower = python_max(np.full(groups, min_norm), ema * low[t])
            upper = python_max(zero, ema * high[t])
        else:
            lower, upper = np.full(groups, min_norm), np.full(groups, max_norm)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            down = (upper > 0) & (norm > upper + EPS)
            up = ~down & raise_small & (lower > 0) & (norm < lower - EPS)
            down_scale = upper / (norm + EPS)
            if max_down_scale > 0:
                down_scale = python_max(down_scale, np.full(groups, max_down_scale))
            up_scale = lower / (norm + EPS)
            if max_up_scale > 0:
                up_scale = python_min(up_scale, np.full(groups, max_up_scale))
            scale = np.where(down, down_scale, np.where(up, up_scale, 1.0))
            if observed_scale is not None and raise_small:
                tie = (lower > upper) & (upper > 0) & (np.abs(norm / upper - 1) < tie_tol)
                if np.any(tie):
                    raise_scale = np.where(lower > 0, up_scale, 1.0)
                    pick_raise = np.abs(raise_scale - observed_scale[t]) < np.abs(
                        down_scale - observed_scale[t]
                    )
                    alternative = np.where(down, raise_scale, down_scale)
                    chosen = np.where(pick_raise, raise_scale, down_scale)
                    ties += int(np.sum(tie & (chosen == alternative)))
                    scale = np.where(tie, chosen, scale)
            ema = ema_beta * ema + (1 - ema_beta) * norm * scale
        out["norm"][t], out["lower"][t], out["upper"][t] = norm, lower, upper
        out["scale"][t], out["ema"][t] = scale, ema
    out["ties"] = np.asarray(ties)
    return out


def aggc_options(**aggc_kwargs: Any) -> dict[str, Any]:
    """``aggc(**aggc_kwargs)``'s documented meaning, in the reference's options.

    From ``aggc()``'s docstring: raising is on exactly when ``low_mult`` or
    ``min_norm`` is given, a value not given is 0 (so a cap not given is off),
    ``max_norm`` is the fixed upper bound of ``auto_bounds=False``; the defaults
    are ``high_mult=2.0, ema_beta=0.99``. The result feeds :class:`SpecClipper`,
    :func:`spec_trajectory` or :class:`GroupModel` (which also take ``ema_init``,
    ``variant`` and ``nonfinite``; ``aggc()`` always skips non-finite norms).
    """
    kw = dict(aggc_kwargs)
    kw.pop("unlabelled", None)  # what init says about left-out leaves, not the math
    given = {k: kw.pop(k, None) for k in ("low_mult", "min_norm", "max_up_scale",
                                         "max_down_scale", "max_norm")}  # fmt: skip
    options = {k: 0.0 if v is None else v for k, v in given.items()}
    options["max_norm"] = 1.0 if given["max_norm"] is None else given["max_norm"]
    options["raise_small"] = given["low_mult"] is not None or given["min_norm"] is not None
    options["ema_beta"] = kw.pop("ema_beta", 0.99)
    options["high_mult"] = kw.pop("high_mult", 2.0)
    options["auto_bounds"] = kw.pop("auto_bounds", True)
    options.update(kw)
    return options


def spec_multipliers(options: Mapping[str, Any], t: int, total_steps: int) -> tuple[float, float]:
    """``(low_t, high_t)`` of §5 for the reference's option dict (missing keys: §1 defaults)."""
    schedule = options.get("bounds_schedule", "none")
    args = (
        total_steps,
        options.get("bounds_switch_ratio", 0.5),
        options.get("bounds_transition_ratio", 0.2),
        schedule,
    )
    low = spec_schedule(t, options.get("low_mult", 1.0), options.get("low_mult_late", 0.0), *args)
    high = spec_schedule(
        t, options.get("high_mult", 1.0), options.get("high_mult_late", 0.0), *args
    )
    return low, high


def reference_run(
    options: Mapping[str, Any], sq_sums: np.ndarray, total_steps: int = 0
) -> dict[str, np.ndarray]:
    """§4 over a run for the reference's option dict: ``sq_sums[t, j]`` is group ``j``'s
    sum of squares at step ``t``; returns :func:`spec_trajectory`'s ``[T, G]`` arrays."""
    steps = np.asarray(sq_sums).shape[0]
    lows, highs = zip(*(spec_multipliers(options, t, total_steps) for t in range(steps)))
    return spec_trajectory(
        sq_sums,
        ema_beta=options.get("ema_beta", 0.98),
        low_mult=np.asarray(lows),
        high_mult=np.asarray(highs),
        min_norm=options.get("min_norm", 0.0),
        max_norm=options.get("max_norm", 1.0),
        auto_bounds=options.get("auto_bounds", False),
        raise_small=options.get("raise_small", False),
        max_up_scale=options.get("max_up_scale", 0.0),
        max_down_scale=options.get("max_down_scale", 0.0),
    )
