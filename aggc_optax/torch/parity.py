r"""Cross-framework parity: the PyTorch reference against the JAX transformation.

Two modes, as a library and as a command::

    python -m aggc_optax.parity --device cpu|cuda [--config NAME|all|e2e] [--steps N]
        [--upstream PATH/TO/grad_clip.py]

* **Trajectories** (:func:`run_parity`): the same deterministic, adversarial
  gradient trajectory goes, step by step, through
  :class:`aggc_optax.torch_reference.PerModuleGradClipper` (by a real
  ``backward()`` on a torch module whose ``named_parameters()`` are the names
  of the JAX tree) and through :func:`aggc_optax.from_reference_options` under
  ``jax.jit``. Per configuration it reports the worst relative difference of
  the group norms, bounds, scales, EMAs and clipped gradients, and the number
  of (step, group) pairs where the two took a different branch (clip down,
  raise, untouched). With ``--upstream`` (:func:`load_upstream`) the
  authors' own ``grad_clip.py``, imported from where it lies, runs the same
  trajectories too, and a three-way table compares it with both.
* **End to end** (:func:`run_end_to_end`): a two-layer LLaMA-style transformer
  with Hugging Face parameter names, written once in PyTorch and once in JAX,
  starts from identical weights and trains on identical batches with AGGC and
  AdamW (``torch.optim.AdamW`` against ``optax.adamw``); it reports how far the
  losses and parameters drift apart.

Tolerances. The reference does its scalar math in Python floats (float64) and
the JAX transformation in float32 (unless ``jax_enable_x64`` is on). A float32
quantity carries a relative rounding error of :math:`u = 2^{-24} \approx
6\times10^{-8}` per operation; the per-tensor sums of squares are float32
reductions in both frameworks but in different orders (a few :math:`u`), and
the EMA, a contraction by :math:`\beta`, accumulates the per-step error
:math:`\delta` to at most :math:`\delta / (1 - \beta)`; its random-walk
typical value is :math:`\delta / \sqrt{1 - \beta^2}`, about
:math:`7\delta` for :math:`\beta = 0.99`. The measured worst difference per
configuration is 5e-7 to 1.3e-6 (``docs/parity.md``), so :data:`TOLERANCE` is ``2e-5``: an
order of magnitude above what float32 produces, several orders below any
real disagreement (a wrong bound, a wrong branch or a missed EMA update moves
a quantity by percents). Branch decisions must agree exactly. The end-to-end
tolerance :data:`E2E_TOLERANCE` is ``1e-4``, looser because two float32
forward and backward passes differ by more (different matmul and reduction
orders, exp and log implementations), Adam's normalised update passes those
differences on to the weights at every step, and the two trainings then see
slightly different weights: over 40 steps the measured worst differences are
about 1e-6 for the losses and 1e-5 for parameters and group norms. It is
calibrated for runs of a few dozen steps; two float32 trainings drift apart
further the longer they run.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import importlib.util
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F

from aggc_optax import presets
from aggc_optax.monitoring import group_stats
from aggc_optax.reference import from_reference_options
from aggc_optax.torch.reference import PerModuleGradClipper, PerModuleGradNormOptions, mirror_module

__all__ = [
    "BUNDLED",
    "CONFIGS",
    "E2E_CONFIGS",
    "E2E_TOLERANCE",
    "PAIRS",
    "QUANTITIES",
    "TOLERANCE",
    "UPSTREAM_INTERFACE",
    "X64_TOLERANCE",
    "EndToEndResult",
    "ParityConfig",
    "ParityResult",
    "StepRun",
    "ThreeWay",
    "TorchClipper",
    "compare_runs",
    "cuda_available",
    "load_upstream",
    "main",
    "make_trajectory",
    "parity_shapes",
    "relative_difference",
    "run_end_to_end",
    "run_jax",
    "run_parity",
    "run_reference",
]

#: Worst relative difference allowed between the reference and the JAX
#: transformation on a gradient trajectory (see the module docstring).
TOLERANCE = 2e-5
#: The same with ``x64=True`` (float64 statistics on both sides, exact sums):
#: a few float64 roundings, where XLA may fuse a multiply-add that Python rounds twice.
X64_TOLERANCE = 1e-12
#: Worst relative difference allowed in the end-to-end run, for losses,
#: parameters and AGGC statistics (see the module docstring).
E2E_TOLERANCE = 1e-4
#: What a trajectory comparison reports, in table order.
QUANTITIES = ("norm", "lower", "upper", "scale", "ema", "clipped grads")
_STATS = ("norm", "lower", "upper", "scale", "ema")

DEFAULT_STEPS = 64
DEFAULT_E2E_STEPS = 40


# -- configurations -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParityConfig:
    """One parity configuration.

    Attributes:
      name: what ``--config`` takes.
      description: one line for the table.
      options: the reference's options (spec section 1 names).
      pass_total_steps: call ``on_train_begin(steps)`` (and give the JAX side
        ``total_steps=steps``); ``False`` is the verl trainer, whose linear
        schedule stays inert.
      nonfinite: inject non-finite gradient entries: ``None``, ``"nan"``,
        ``"inf"`` or ``"both"`` (see :func:`make_trajectory`).
    """

    name: str
    description: str
    options: Mapping[str, Any]
    pass_total_steps: bool = True
    nonfinite: str | None = None


_LORA_SFT = dict(presets.LORA_SFT_OPTIONS)
_GRPO = dict(presets.GRPO_OPTIONS)
_PLAIN = {
    "enable": True,
    "auto_bounds": True,
    "ema_beta": 0.9,
    "low_mult": 0.5,
    "high_mult": 2.0,
    "min_norm": 0.0,
    "raise_small": True,
}
_STATIC = {
    "enable": True,
    "auto_bounds": False,
    "ema_beta": 0.95,
    "min_norm": 0.05,
    "max_norm": 2.0,
    "raise_small": True,
}
_AGGRESSIVE = {
    "enable": True,
    "auto_bounds": True,
    "ema_beta": 0.8,
    "low_mult": 0.9,
    "high_mult": 1.05,
    "min_norm": 0.02,
    "raise_small": True,
    "bounds_schedule": "linear",
    "low_mult_late": 0.99,
    "high_mult_late": 1.01,
    "bounds_switch_ratio": 0.3,
    "bounds_transition_ratio": 0.1,
    "max_up_scale": 1.5,
    "max_down_scale": 0.5,
}

#: The trajectory configurations, by name.
CONFIGS: dict[str, ParityConfig] = {
    c.name: c
    for c in (
        ParityConfig("lora_sft", "authors' LoRA SFT recipe (spec 9), schedule on", _LORA_SFT),
        ParityConfig("grpo", "authors' GRPO recipe (spec 9), schedule on", _GRPO),
        ParityConfig(
            "grpo_verl",
            "GRPO recipe as the verl trainer runs it: no on_train_begin, schedule inert",
            _GRPO,
            pass_total_steps=False,
        ),
        ParityConfig("plain_interval", "[0.5, 2] x EMA, beta 0.9, raise_small, no caps", _PLAIN),
        ParityConfig("static_bounds", "auto_bounds=False: fixed [0.05, 2.0], raise_small", _STATIC),
        ParityConfig(
            "aggressive", "beta 0.8, tight ramped interval, caps 1.5/0.5, min_norm", _AGGRESSIVE
        ),
        ParityConfig(
            "nan", "plain interval, a NaN entry at step 3 (spec 8.3)", _PLAIN, True, "nan"
        ),
        ParityConfig(
            "inf_nocaps", "plain interval, an inf entry at step 3, no caps", _PLAIN, True, "inf"
        ),
        ParityConfig(
            "inf_caps",
            "plain interval with caps 1.1/0.9, an inf entry at step 3",
            {**_PLAIN, "max_up_scale": 1.1, "max_down_scale": 0.9},
            True,
            "inf",
        ),
        ParityConfig(
            "lora_sft_nonfinite",
            "LoRA SFT recipe, NaN at step 3 and inf at step 5 in two groups",
            _LORA_SFT,
            True,
            "both",
        ),
    )
}

#: The end-to-end configurations: ``e2e-<name>`` trains with ``CONFIGS[name].options``.
E2E_CONFIGS: tuple[str, ...] = ("e2e-lora_sft", "e2e-grpo")


# -- the gradient trajectories -------------------------------------------------------------

_HIDDEN, _KV, _INTER, _VOCAB, _LAYERS = 16, 8, 24, 40, 2


def parity_shapes() -> dict[str, tuple[tuple[int, ...], str]]:
    """The LLaMA-shaped parameter names of the trajectories, with shapes and roles.

    Returns:
      ``{name: (shape, role)}`` in registration order; ``role`` is what the
      trajectory uses to scale and spike gradients (the module type, or
      ``"unlabelled"``). It is written here by hand, independently of both
      implementations' label rules, whose outputs the harness compares.
    """
    h, kv, inter, vocab = _HIDDEN, _KV, _INTER, _VOCAB
    out: dict[str, tuple[tuple[int, ...], str]] = {
        "logit_scale": ((), "unlabelled"),
        "model.embed_tokens.weight": ((vocab, h), "embed_tokens"),
    }
    for i in range(_LAYERS):
        p = f"model.layers.{i}."
        out[p + "residual_gate"] = ((h,), "unlabelled")
        out[p + "input_layernorm.weight"] = ((h,), "input_layernorm")
        for proj, rows in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
            out[f"{p}self_attn.{proj}.weight"] = ((rows, h), proj)
            out[f"{p}self_attn.{proj}.bias"] = ((rows,), proj)
        out[p + "self_attn.o_proj.weight"] = ((h, h), "o_proj")
        out[p + "post_attention_layernorm.weight"] = ((h,), "post_attention_layernorm")
        out[p + "mlp.gate_proj.weight"] = ((inter, h), "gate_proj")
        out[p + "mlp.up_proj.weight"] = ((inter, h), "up_proj")
        out[p + "mlp.down_proj.weight"] = ((h, inter), "down_proj")
    out["model.norm.weight"] = ((h,), "norm")
    out["lm_head.weight"] = ((vocab, h), "lm_head")
    return out


# Typical gradient size of each role: groups differ by orders of magnitude, and
# post_attention_layernorm is always tiny (below every min_norm used here).
_ROLE_SCALE = {
    "unlabelled": 0.3,
    "embed_tokens": 0.05,
    "input_layernorm": 0.02,
    "post_attention_layernorm": 1e-5,
    "q_proj": 0.1,
    "k_proj": 0.08,
    "v_proj": 0.2,
    "o_proj": 0.15,
    "gate_proj": 0.1,
    "up_proj": 0.12,
    "down_proj": 0.2,
    "norm": 0.03,
    "lm_head": 0.4,
}


def make_trajectory(
    steps: int, *, seed: int = 0, nonfinite: str | None = None, exact: bool = False
) -> list[dict[str, np.ndarray]]:
    """A deterministic, adversarial gradient trajectory over :func:`parity_shapes`.

    Every tensor gets float32 Gaussian noise at its role's scale, modulated
    slowly over time, plus these events (0-based step ``t``):

    * whole-group spikes: ``down_proj`` x40 when ``t % 7 == 5``; ``q_proj`` x15
      and ``lm_head`` x25 when ``t % 11 == 8``;
    * a spike in one tensor of a group: layer 1's ``v_proj.weight`` x30 when
      ``t % 9 == 4`` (the other ``v_proj`` tensors stay normal);
    * an always-tiny group (``post_attention_layernorm``, ~1e-5) and a tiny
      window: ``gate_proj`` x1e-4 when ``t % 24`` is 10, 11 or 12;
    * an all-zero group step: every ``k_proj`` tensor is 0 when ``t % 13 == 6``;
    * ``nonfinite="nan"`` / ``"inf"``: one entry of layer 0's ``up_proj.weight``
      is NaN / +inf at step 3; ``"both"``: that NaN, and one ``-inf`` entry of
      layer 1's ``o_proj.weight`` at step 5.

    With ``exact=True`` every tensor is rounded to a grid of at most 256
    levels (integers in ``[-128, 128]`` times a power of two), so every
    float32 sum of squares is exact whatever the summation order, and two
    implementations that both do their scalar math in float64 must agree to
    the last bit or two.

    Args:
      steps: number of steps.
      seed: NumPy seed.
      nonfinite: ``None``, ``"nan"``, ``"inf"`` or ``"both"``.
      exact: round to the exact grid described above.

    Returns:
      One ``{name: float32 array}`` per step.
    """
    if nonfinite not in (None, "nan", "inf", "both"):
        raise ValueError(f"nonfinite must be None, 'nan', 'inf' or 'both', got {nonfinite!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    rng = np.random.default_rng(seed)
    shapes = parity_shapes()
    phase = {role: rng.uniform(0, 2 * np.pi) for role in _ROLE_SCALE}
    out = []
    for t in range(steps):
        grads = {}
        for name, (shape, role) in shapes.items():
            size = _ROLE_SCALE[role] * (1.0 + 0.3 * np.sin(0.37 * t + phase[role]))
            g = rng.standard_normal(shape) * size
            if role == "down_proj" and t % 7 == 5:
                g = g * 40
            if role in ("q_proj", "lm_head") and t % 11 == 8:
                g = g * (15 if role == "q_proj" else 25)
            if name == "model.layers.1.self_attn.v_proj.weight" and t % 9 == 4:
                g = g * 30
            if role == "gate_proj" and t % 24 in (10, 11, 12):
                g = g * 1e-4
            if role == "k_proj" and t % 13 == 6:
                g = np.zeros(shape)
            if exact and np.any(g):
                # max |g| / step < 2**7: squares < 2**14, and at most 640 of
                # them sum below 2**24, the float32 mantissa.
                step = 2.0 ** (math.floor(math.log2(np.max(np.abs(g)))) - 6)
                g = np.round(g / step) * step
            grads[name] = np.asarray(g, np.float32)
        if t == 3 and nonfinite in ("nan", "inf", "both"):
            grads["model.layers.0.mlp.up_proj.weight"][0, 0] = (
                np.inf if nonfinite == "inf" else np.nan
            )
        if t == 5 and nonfinite == "both":
            grads["model.layers.1.self_attn.o_proj.weight"][1, 2] = -np.inf
        out.append(grads)
    return out


# -- running the implementations --------------------------------------------------------------


@dataclasses.dataclass
class StepRun:
    """What one implementation did along a trajectory.

    Attributes:
      labels: group labels, in the implementation's group order.
      stats: per step, ``{label: {"norm", "lower", "upper", "scale", "ema"}}``
        (``ema`` after the step), as Python floats.
      branches: per step, ``{label: "down" | "raise" | "none"}``.
      grads: per step, ``{name: clipped gradient}`` (float32 NumPy arrays);
        empty for an end-to-end run.
    """

    labels: tuple[str, ...]
    stats: list[dict[str, dict[str, float]]]
    branches: list[dict[str, str]]
    grads: list[dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class TorchClipper:
    """A PyTorch implementation of the reference clipper: its two classes.

    Attributes:
      clipper: the ``PerModuleGradClipper`` class (``clipper(options=...)``,
        ``attach``, ``on_train_begin``, ``on_before_optimizer_step(step=t)``
        returning one ``{"module", "norm", "lower", "upper", "scale"}`` dict
        per group, ``on_step_end``, ``module_ema``, ``mod2params``).
      options: the ``PerModuleGradNormOptions`` class (the reference's option
        names as keywords).
      origin: where the classes come from, for the report.
    """

    clipper: Any
    options: Any
    origin: str


#: The bundled reference, :mod:`aggc_optax.torch_reference`.
BUNDLED = TorchClipper(PerModuleGradClipper, PerModuleGradNormOptions, "aggc_optax.torch_reference")

#: What an upstream ``grad_clip.py`` must define for ``--upstream``.
UPSTREAM_INTERFACE = {
    "PerModuleGradNormOptions": (),
    "PerModuleGradClipper": ("attach", "on_train_begin", "on_before_optimizer_step", "on_step_end"),
}


def load_upstream(path: str | os.PathLike[str]) -> TorchClipper:
    """Loads the authors' ``grad_clip.py`` (or any file with its interface) from ``path``.

    The file is imported at run time from where it lies (it is never copied);
    it must define ``PerModuleGradNormOptions`` and ``PerModuleGradClipper``
    with the methods of :data:`UPSTREAM_INTERFACE`. In the authors' repository
    it is ``GRPO/verl/utils/grad_clip.py``.

    Args:
      path: the file.

    Returns:
      A :class:`TorchClipper`.

    Raises:
      FileNotFoundError: no such file.
      ImportError: the file fails to import, or lacks the interface (the
        message names what is missing).

    Example:
      >>> from aggc_optax import parity, torch_reference
      >>> parity.load_upstream(torch_reference.__file__).clipper.__name__
      'PerModuleGradClipper'
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--upstream: no file at {path!r} (give the path of grad_clip.py)")
    # one module name per file, so two upstream files can be loaded side by side
    name = f"aggc_optax_upstream_{abs(hash(os.path.realpath(path))):x}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"--upstream: {path!r} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    # registered while it runs: dataclasses look their module up in sys.modules
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise ImportError(f"--upstream: importing {path!r} failed: {err!r}") from err
    missing = []
    for name, methods in UPSTREAM_INTERFACE.items():
        cls = getattr(module, name, None)
        if not isinstance(cls, type):
            missing.append(f"class {name}")
            continue
        missing.extend(f"{name}.{m}" for m in methods if not callable(getattr(cls, m, None)))
    if missing:
        raise ImportError(
            f"--upstream: {path!r} does not have the interface of the authors' grad_clip.py "
            f"(GRPO/verl/utils/grad_clip.py): missing {', '.join(missing)}"
        )
    return TorchClipper(module.PerModuleGradClipper, module.PerModuleGradNormOptions, path)


def cuda_available() -> bool:
    """Whether a CUDA device is visible to both PyTorch and JAX."""
    if not torch.cuda.is_available():
        return False
    try:
        return len(jax.devices("gpu")) > 0
    except RuntimeError:
        return False


def _devices(device: str) -> tuple[torch.device, Any]:
    if device == "cpu":
        return torch.device("cpu"), jax.devices("cpu")[0]
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda': PyTorch sees no CUDA device")
        try:
            jax_device = jax.devices("gpu")[0]
        except RuntimeError as err:
            raise RuntimeError(
                f"device='cuda': JAX sees no GPU (is jax[cuda] installed?): {err}"
            ) from err
        return torch.device("cuda", 0), jax_device
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


def _report_branch(row: Mapping[str, Any], options: Mapping[str, Any]) -> str:
    # For a clipper that does not say which branch it took (the authors' does
    # not): the branch that its reported norm and bounds select (spec 4.2).
    norm, lower, upper = float(row["norm"]), float(row["lower"]), float(row["upper"])
    if upper > 0 and norm > upper + 1e-12:
        return "down"
    if options.get("raise_small", False) and lower > 0 and norm < lower - 1e-12:
        return "raise"
    return "none"


def _torch_loop(
    impl: TorchClipper,
    options: Mapping[str, Any],
    module: torch.nn.Module,
    steps: int,
    *,
    total_steps: int | None,
    backward: Callable[[int], None],
    after_clip: Callable[[int], None],
) -> StepRun:
    """The training loop every PyTorch run uses, with ``impl``'s clipper on ``module``.

    Per step ``t``: gradients reset, ``backward(t)`` (the hooks see it), the
    clip, ``after_clip(t)`` (an optimizer step, or recording the gradients),
    the step's statistics and branches, ``on_step_end(t)``.
    """
    clipper = impl.clipper(options=impl.options(**options))
    clipper.attach(module)
    if total_steps:
        clipper.on_train_begin(total_steps)
    run = StepRun(tuple(clipper.mod2params), [], [], [])
    try:
        for t in range(steps):
            for p in module.parameters():
                p.grad = None
            backward(t)
            report = clipper.on_before_optimizer_step(step=t)
            if not isinstance(report, list) or any(
                not isinstance(r, Mapping) or not {"module", *_STATS[:4]} <= set(r) for r in report
            ):
                raise TypeError(
                    f"{impl.origin}: on_before_optimizer_step must return one dict per group "
                    f"with keys module, norm, lower, upper, scale; got {report!r:.200}"
                )
            after_clip(t)
            run.stats.append(
                {
                    r["module"]: {
                        **{k: float(r[k]) for k in _STATS[:4]},
                        "ema": float(clipper.module_ema[r["module"]]),
                    }
                    for r in report
                }
            )
            named = getattr(clipper, "last_branches", None)
            run.branches.append(
                dict(named)
                if named is not None
                else {r["module"]: _report_branch(r, options) for r in report}
            )
            clipper.on_step_end(t)
    finally:
        close = getattr(clipper, "close", None)
        if callable(close):
            close()
    return run


def run_reference(
    options: Mapping[str, Any],
    trajectory: Sequence[Mapping[str, np.ndarray]],
    *,
    total_steps: int | None,
    device: str = "cpu",
    impl: TorchClipper = BUNDLED,
) -> StepRun:
    """Runs a trajectory through a PyTorch reference (by default the bundled one).

    Each step's gradients come from a real ``backward()`` of
    :math:`\\sum_i \\langle p_i, G_i \\rangle`, whose gradient is exactly
    :math:`G_i` (non-finite entries included), so the reference's hooks see
    them as they would in training.

    Args:
      options: the reference's options.
      trajectory: one ``{name: gradient}`` per step.
      total_steps: for ``on_train_begin`` (``None``: not called).
      device: ``"cpu"`` or ``"cuda"``.
      impl: the clipper to run (:data:`BUNDLED`, or :func:`load_upstream`'s).
    """
    torch_device, _ = _devices(device)
    module = mirror_module({n: g.shape for n, g in trajectory[0].items()}, device=torch_device)
    params = dict(module.named_parameters())
    grads: list[dict[str, np.ndarray]] = []

    def backward(t: int) -> None:
        targets = {n: torch.as_tensor(g, device=torch_device) for n, g in trajectory[t].items()}
        sum((params[n] * targets[n]).sum() for n in params).backward()  # type: ignore[union-attr]  # a sum over a non-empty dict is a Tensor

    def record(t: int) -> None:
        grads.append({n: p.grad.detach().cpu().numpy().copy() for n, p in params.items()})  # type: ignore[union-attr]  # backward() set every grad

    run = _torch_loop(
        impl,
        options,
        module,
        len(trajectory),
        total_steps=total_steps,
        backward=backward,
        after_clip=record,
    )
    run.grads = grads
    return run


def _jax_step_record(opt_state: Any, run: StepRun, counts: dict[str, tuple[int, int]]) -> None:
    # The step's statistics, and its branch from the counters' increments.
    stats = jax.device_get(group_stats(opt_state))
    run.stats.append({k: {f: float(stats[k][f]) for f in _STATS} for k in run.labels})
    branches = {}
    for k in run.labels:
        down, up = int(stats[k]["clip_down_count"]), int(stats[k]["raise_count"])
        before = counts.get(k, (0, 0))
        branches[k] = "down" if down > before[0] else "raise" if up > before[1] else "none"
        counts[k] = (down, up)
    run.branches.append(branches)


def run_jax(
    options: Mapping[str, Any],
    trajectory: Sequence[Mapping[str, np.ndarray]],
    *,
    total_steps: int | None,
    device: str = "cpu",
    x64: bool = False,
) -> StepRun:
    """Runs a trajectory through :func:`aggc_optax.from_reference_options` under ``jax.jit``.

    The tree is a flat dict keyed by the dotted names, which gives the leaves
    the same names as the torch parameters. With ``x64=True`` the run has
    ``jax_enable_x64`` on, so the transformation keeps its statistics in
    float64 like the reference's Python floats (gradients stay float32).
    """
    _, jax_device = _devices(device)
    with jax.enable_x64(x64), jax.default_device(jax_device):
        params = {n: jnp.zeros(g.shape, jnp.float32) for n, g in trajectory[0].items()}
        tx = from_reference_options(dict(options), total_steps=total_steps)
        # Committed to the device like the jitted outputs, so there is one compile.
        params = jax.device_put(params, jax_device)
        state = jax.device_put(tx.init(params), jax_device)
        update = jax.jit(tx.update)
        run = StepRun(tuple(group_stats(state)), [], [], [])
        counts: dict[str, tuple[int, int]] = {}
        for grads in trajectory:
            device_grads = {n: jax.device_put(g, jax_device) for n, g in grads.items()}
            updates, state = update(device_grads, state, params)
            _jax_step_record(state, run, counts)
            run.grads.append({n: np.asarray(u) for n, u in jax.device_get(updates).items()})
    return run


def relative_difference(a: Any, b: Any) -> np.ndarray:
    """Elementwise ``|a - b| / max(|a|, |b|)``, NaN-aware.

    Equal values (equal infinities and two NaNs included) differ by 0; a NaN
    or an infinity against anything else differs by ``inf``.

    Example:
      >>> relative_difference([2.0, np.nan, np.inf, 0.0, np.nan], [1.0, np.nan, 1.0, 0.0, 1.0])
      array([0.5, 0. , inf, 0. , inf])
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    with np.errstate(all="ignore"):
        diff = np.abs(a - b) / np.maximum(np.abs(a), np.abs(b))
    diff = np.where(np.isnan(diff), np.inf, diff)
    return np.where(same, 0.0, diff)


def _absolute_difference(a: Any, b: Any) -> np.ndarray:
    # |a - b|, 0 for equal values (equal infinities, two NaNs), inf otherwise when non-finite
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    with np.errstate(all="ignore"):
        diff = np.abs(a - b)
    return np.where(same, 0.0, np.where(np.isnan(diff), np.inf, diff))


# -- comparing -------------------------------------------------------------------------------


@dataclasses.dataclass
class ParityResult:
    """The comparison of two implementations on one configuration.

    Attributes:
      name: the configuration.
      description: its one-line description.
      device: ``"cpu"`` or ``"cuda"``.
      steps: trajectory length.
      labels: the groups (reference order).
      tolerance: the relative tolerance applied.
      worst: per quantity of :data:`QUANTITIES`, ``(worst relative difference,
        step, group label or parameter name)``.
      branch_counts: how often the reference took each branch.
      branch_mismatches: ``(step, label, reference branch, other branch)`` for every disagreement.
      problems: structural disagreements (different labels), empty when none.
      nonfinite: how many reference statistics (norm, bounds, scale, EMA) and
        clipped gradient entries were NaN or infinite; each must match exactly.
      seconds: wall time of the run.
      worst_abs: per quantity of :data:`QUANTITIES`, the worst absolute difference.
      upstream: with ``upstream=`` in :func:`run_parity`, the three-way comparison.
    """

    name: str
    description: str
    device: str
    steps: int
    labels: tuple[str, ...]
    tolerance: float
    worst: dict[str, tuple[float, int, str]]
    branch_counts: dict[str, int]
    branch_mismatches: list[tuple[int, str, str, str]]
    problems: list[str]
    nonfinite: int = 0
    seconds: float = 0.0
    worst_abs: dict[str, float] = dataclasses.field(default_factory=dict)
    upstream: ThreeWay | None = None

    @property
    def ok(self) -> bool:
        """No branch mismatch, no structural problem, every difference within tolerance.

        With a three-way comparison, every pair must pass too.
        """
        return (
            not self.problems
            and not self.branch_mismatches
            and all(v <= self.tolerance for v, _, _ in self.worst.values())
            and (self.upstream is None or self.upstream.ok)
        )

    def table(self) -> str:
        """The result as a plain-text table (and the three-way table, if any)."""
        lines = [
            f"== {self.name}: {self.description}",
            f"   device {self.device} | {self.steps} steps | {len(self.labels)} groups | "
            f"tolerance {self.tolerance:.0e} | {self.seconds:.1f} s",
            f"   {'quantity':<15} {'worst rel diff':>14}  at",
        ]
        for q in QUANTITIES:
            value, step, where = self.worst[q]
            lines.append(f"   {q:<15} {value:>14.2e}  step {step}, {where}")
        total = sum(self.branch_counts.values())
        counts = ", ".join(f"{k} {self.branch_counts.get(k, 0)}" for k in ("down", "raise", "none"))
        lines.append(
            f"   {'branches':<15} {len(self.branch_mismatches):>14d}  mismatches of {total} "
            f"(reference: {counts})"
        )
        if self.nonfinite:
            lines.append(
                f"   {'non-finite':<15} {self.nonfinite:>14d}  NaN/inf values, all matched "
                "exactly unless a difference above is inf"
            )
        for step, label, ref, jx in self.branch_mismatches[:5]:
            lines.append(f"     step {step} {label}: reference {ref}, jax {jx}")
        lines.extend(f"   problem: {p}" for p in self.problems)
        if self.upstream is not None:
            lines.append(self.upstream.table())
        lines.append(f"   {'result':<15} {'PASS' if self.ok else 'FAIL':>14}")
        return "\n".join(lines)


def compare_runs(
    reference: StepRun,
    other: StepRun,
    *,
    name: str = "",
    description: str = "",
    device: str = "cpu",
    tolerance: float = TOLERANCE,
) -> ParityResult:
    """Compares two :class:`StepRun` of the same steps, group by group (by label).

    Clipped gradients are compared where ``reference`` recorded them.
    """
    worst = {q: (0.0, 0, "-") for q in QUANTITIES}
    worst_abs = dict.fromkeys(QUANTITIES, 0.0)
    problems = []
    if set(reference.labels) != set(other.labels):
        problems.append(
            f"groups differ: reference {list(reference.labels)}, other {list(other.labels)}"
        )
    labels = [k for k in reference.labels if k in other.labels]
    mismatches, counts = [], collections.Counter[str]()
    nonfinite = 0

    def note(quantity: str, a: Any, b: Any, step: int, where: str) -> None:
        diff = relative_difference(a, b)
        value = float(np.max(diff)) if diff.size else 0.0
        if value > worst[quantity][0]:
            worst[quantity] = (value, step, where)
        absolute = _absolute_difference(a, b)
        worst_abs[quantity] = max(worst_abs[quantity], float(np.max(absolute, initial=0.0)))

    for t, (rs, os_) in enumerate(zip(reference.stats, other.stats)):
        for k in labels:
            for f in _STATS:
                note(f, rs[k][f], os_[k][f], t, k)
                nonfinite += not math.isfinite(rs[k][f])
            ref_branch, other_branch = reference.branches[t][k], other.branches[t][k]
            counts[ref_branch] += 1
            if ref_branch != other_branch:
                mismatches.append((t, k, ref_branch, other_branch))
    for t, (rg, og) in enumerate(zip(reference.grads, other.grads)):
        for n, g in rg.items():
            if n not in og:
                problems.append(f"step {t}: leaf {n} missing on the other side")
                continue
            note("clipped grads", g, og[n], t, n)
            nonfinite += int(np.count_nonzero(~np.isfinite(g)))
    return ParityResult(
        name=name,
        description=description,
        device=device,
        steps=len(reference.stats),
        labels=tuple(reference.labels),
        tolerance=tolerance,
        worst=worst,
        branch_counts=dict(counts),
        branch_mismatches=mismatches,
        problems=problems,
        nonfinite=nonfinite,
        worst_abs=worst_abs,
    )


#: The pairs of the three-way table, in order.
PAIRS = (("bundled", "jax"), ("upstream", "bundled"), ("upstream", "jax"))


@dataclasses.dataclass
class ThreeWay:
    """The authors' clipper, the bundled reference and the JAX port, pairwise.

    Attributes:
      origin: the upstream file.
      pairs: per pair of :data:`PAIRS`, the :class:`ParityResult` of the first
        against the second.
    """

    origin: str
    pairs: dict[tuple[str, str], ParityResult]

    @property
    def ok(self) -> bool:
        """Every pair passes."""
        return all(r.ok for r in self.pairs.values())

    def table(self) -> str:
        """The three-way table: worst absolute and relative difference over every
        quantity, and the branch agreement, per pair."""
        lines = [
            f"   three-way (upstream: {self.origin})",
            f"   {'pair':<20} {'max abs diff':>12} {'max rel diff':>12}  branches agree",
        ]
        for (a, b), r in self.pairs.items():
            total = sum(r.branch_counts.values())
            lines.append(
                f"   {a + ' vs ' + b:<20} {max(r.worst_abs.values()):>12.2e} "
                f"{max(v for v, _, _ in r.worst.values()):>12.2e}  "
                f"{total - len(r.branch_mismatches)}/{total}" + ("" if r.ok else "  FAIL")
            )
        return "\n".join(lines)


def run_parity(
    config: str | ParityConfig,
    *,
    steps: int = DEFAULT_STEPS,
    device: str = "cpu",
    seed: int = 0,
    tolerance: float | None = None,
    jax_options: Mapping[str, Any] | None = None,
    x64: bool = False,
    upstream: TorchClipper | None = None,
) -> ParityResult:
    """Runs one configuration through the implementations and compares them.

    Args:
      config: a name of :data:`CONFIGS` or a :class:`ParityConfig`.
      steps: trajectory length.
      device: ``"cpu"`` or ``"cuda"`` (both frameworks on that device).
      seed: the trajectory's seed.
      tolerance: the relative tolerance (default :data:`TOLERANCE`, or
        :data:`X64_TOLERANCE` with ``x64``).
      jax_options: options for the JAX side only (default: the same as the
        reference); for checking that the harness catches a disagreement.
      x64: run the JAX side with float64 statistics on an exact trajectory
        (``make_trajectory(exact=True)``): the two must then agree to
        :data:`X64_TOLERANCE`, which shows that float32 rounding is the only
        difference in the default mode.
      upstream: the authors' clipper (:func:`load_upstream`), run on the same
        trajectory; the result then carries a :class:`ThreeWay` comparison,
        and each pair must agree to ``tolerance`` with identical branches.

    Returns:
      A :class:`ParityResult` (bundled reference against JAX); ``result.ok``
      and ``print(result.table())``.
    """
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"unknown parity config {config!r}; known: {sorted(CONFIGS)}")
        config = CONFIGS[config]
    start = time.perf_counter()
    if tolerance is None:
        tolerance = X64_TOLERANCE if x64 else TOLERANCE
    trajectory = make_trajectory(steps, seed=seed, nonfinite=config.nonfinite, exact=x64)
    total = steps if config.pass_total_steps else None
    runs = {"bundled": run_reference(config.options, trajectory, total_steps=total, device=device)}
    runs["jax"] = run_jax(
        config.options if jax_options is None else jax_options,
        trajectory,
        total_steps=total,
        device=device,
        x64=x64,
    )
    if upstream is not None:
        runs["upstream"] = run_reference(
            config.options, trajectory, total_steps=total, device=device, impl=upstream
        )
    name = config.name + (" (x64)" if x64 else "")
    pairs = {
        (a, b): compare_runs(
            runs[a],
            runs[b],
            name=name,
            description=config.description,
            device=device,
            tolerance=tolerance,
        )
        for a, b in PAIRS
        if a in runs and b in runs
    }
    # a copy: the three-way table holds the pair itself, without a table of its own
    result = dataclasses.replace(pairs[PAIRS[0]])
    if upstream is not None:
        result.upstream = ThreeWay(upstream.origin, pairs)
    result.seconds = time.perf_counter() - start
    return result


# -- end to end: a tiny LLaMA-style model in both frameworks ----------------------------------

_E2E = {"vocab": 32, "hidden": 16, "heads": 2, "inter": 32, "layers": 2, "seq": 8, "batch": 4}
_RMS_EPS = 1e-6
_ADAMW = {"lr": 3e-3, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.01}


def _e2e_init(seed: int) -> dict[str, np.ndarray]:
    """Initial weights: HF LLaMA names, q/v biases, torch ``[out, in]`` layout."""
    rng = np.random.default_rng(seed)
    v, h, inter = _E2E["vocab"], _E2E["hidden"], _E2E["inter"]

    def normal(*shape: int, std: float) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    w = {"model.embed_tokens.weight": normal(v, h, std=1.0)}
    for i in range(_E2E["layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = np.ones(h, np.float32)
        for proj in ("q_proj", "k_proj", "v_proj"):
            w[f"{p}self_attn.{proj}.weight"] = normal(h, h, std=h**-0.5)
        # No k_proj bias: it shifts every score of a query by the same amount,
        # which the softmax ignores, so its true gradient is 0 and its float
        # gradient is rounding noise; Adam would turn that noise into lr-sized
        # steps that no two implementations can agree on.
        for proj in ("q_proj", "v_proj"):
            w[f"{p}self_attn.{proj}.bias"] = normal(h, std=0.02)
        w[p + "self_attn.o_proj.weight"] = normal(h, h, std=h**-0.5)
        w[p + "post_attention_layernorm.weight"] = np.ones(h, np.float32)
        w[p + "mlp.gate_proj.weight"] = normal(inter, h, std=h**-0.5)
        w[p + "mlp.up_proj.weight"] = normal(inter, h, std=h**-0.5)
        w[p + "mlp.down_proj.weight"] = normal(h, inter, std=inter**-0.5)
    w["model.norm.weight"] = np.ones(h, np.float32)
    w["lm_head.weight"] = normal(v, h, std=h**-0.5)
    return w


def _e2e_batches(steps: int, seed: int) -> list[tuple[np.ndarray, float]]:
    """Token batches following ``x' = 3x + 1 mod V`` with 10% noise, and a loss weight.

    Every tenth step (``t % 10 == 7``) is a "bad batch": its loss is weighted
    x30, a gradient spike for AGGC to clip.
    """
    rng = np.random.default_rng(seed + 1)
    v, b, s = _E2E["vocab"], _E2E["batch"], _E2E["seq"]
    out = []
    for t in range(steps):
        tokens = np.empty((b, s), np.int64)
        tokens[:, 0] = rng.integers(0, v, b)
        for j in range(1, s):
            tokens[:, j] = (3 * tokens[:, j - 1] + 1) % v
        noise = rng.random((b, s)) < 0.1
        tokens[noise] = rng.integers(0, v, int(noise.sum()))
        out.append((tokens, 30.0 if t % 10 == 7 else 1.0))
    return out


class _TorchRMSNorm(torch.nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + _RMS_EPS) * self.weight


class _TorchAttention(torch.nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(h, h, bias=True)
        self.k_proj = torch.nn.Linear(h, h, bias=False)
        self.v_proj = torch.nn.Linear(h, h, bias=True)
        self.o_proj = torch.nn.Linear(h, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        heads = _E2E["heads"]

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, s, heads, h // heads).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(h // heads)
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, -1e9)
        out = torch.softmax(scores, dim=-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, s, h))


class _TorchMLP(torch.nn.Module):
    def __init__(self, h: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = torch.nn.Linear(h, inter, bias=False)
        self.up_proj = torch.nn.Linear(h, inter, bias=False)
        self.down_proj = torch.nn.Linear(inter, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _TorchLayer(torch.nn.Module):
    def __init__(self, h: int, inter: int) -> None:
        super().__init__()
        self.input_layernorm = _TorchRMSNorm(h)
        self.self_attn = _TorchAttention(h)
        self.post_attention_layernorm = _TorchRMSNorm(h)
        self.mlp = _TorchMLP(h, inter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class _TorchLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        v, h, inter = _E2E["vocab"], _E2E["hidden"], _E2E["inter"]
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(v, h)
        self.model.layers = torch.nn.ModuleList(
            [_TorchLayer(h, inter) for _ in range(_E2E["layers"])]
        )
        self.model.norm = _TorchRMSNorm(h)
        self.lm_head = torch.nn.Linear(h, v, bias=False)

    def forward(self, tokens: torch.Tensor, weight: float) -> torch.Tensor:
        x = self.model.embed_tokens(tokens[:, :-1])  # type: ignore[operator]  # submodules set on a bare Module
        for layer in self.model.layers:  # type: ignore[union-attr]  # submodules set on a bare Module
            x = layer(x)
        logits = self.lm_head(self.model.norm(x))  # type: ignore[operator]  # submodules set on a bare Module
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        return loss * weight


def _jax_rmsnorm(x: jax.Array, w: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + _RMS_EPS) * w


def _jax_loss(params: Mapping[str, jax.Array], tokens: jax.Array, weight: jax.Array) -> jax.Array:
    """The same model as ``_TorchLM``, on a flat dict of HF-named weights."""
    h, heads = _E2E["hidden"], _E2E["heads"]

    def linear(x: jax.Array, name: str) -> jax.Array:
        y = x @ params[name + ".weight"].T
        bias = params.get(name + ".bias")
        return y if bias is None else y + bias

    x = params["model.embed_tokens.weight"][tokens[:, :-1]]
    b, s, _ = x.shape
    causal = jnp.tril(jnp.ones((s, s), bool))
    for i in range(_E2E["layers"]):
        p = f"model.layers.{i}."
        y = _jax_rmsnorm(x, params[p + "input_layernorm.weight"])

        def split(z: jax.Array) -> jax.Array:
            return z.reshape(b, s, heads, h // heads).transpose(0, 2, 1, 3)

        q = split(linear(y, p + "self_attn.q_proj"))
        k = split(linear(y, p + "self_attn.k_proj"))
        v = split(linear(y, p + "self_attn.v_proj"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(h // heads)
        scores = jnp.where(causal, scores, -1e9)
        attn = (jax.nn.softmax(scores, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(b, s, h)
        x = x + linear(attn, p + "self_attn.o_proj")
        y = _jax_rmsnorm(x, params[p + "post_attention_layernorm.weight"])
        gate = jax.nn.silu(linear(y, p + "mlp.gate_proj"))
        x = x + linear(gate * linear(y, p + "mlp.up_proj"), p + "mlp.down_proj")
    logits = linear(_jax_rmsnorm(x, params["model.norm.weight"]), "lm_head")
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return jnp.mean(losses) * weight


@contextlib.contextmanager
def _full_float32_matmuls() -> Iterator[None]:
    # On recent GPUs JAX multiplies float32 matrices in TF32 by default and
    # PyTorch does not; parity needs both in full float32.
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with jax.default_matmul_precision("highest"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@dataclasses.dataclass
class EndToEndResult:
    """The divergence of the two trainings.

    Attributes:
      name: ``e2e-<config>``.
      device: ``"cpu"`` or ``"cuda"``.
      steps: training steps.
      losses_torch / losses_jax: per-step losses.
      worst_loss: the largest per-step relative loss difference.
      worst_param: ``(relative difference, name)``: the largest over parameters
        and steps of ``max |p_torch - p_jax| / max |p_torch|``.
      worst_stats: per AGGC statistic (norm, lower, upper, scale, ema), the
        largest relative difference over steps and groups.
      branch_counts / branch_mismatches: as in :class:`ParityResult`.
      tolerance: the relative tolerance applied to all of the above.
      seconds: wall time.
    """

    name: str
    device: str
    steps: int
    losses_torch: list[float]
    losses_jax: list[float]
    worst_loss: float
    worst_param: tuple[float, str]
    worst_stats: dict[str, float]
    branch_counts: dict[str, int]
    branch_mismatches: list[tuple[int, str, str, str]]
    tolerance: float
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Losses, parameters and statistics within tolerance, branches identical."""
        return (
            not self.branch_mismatches
            and self.worst_loss <= self.tolerance
            and self.worst_param[0] <= self.tolerance
            and all(v <= self.tolerance for v in self.worst_stats.values())
        )

    def table(self) -> str:
        """The result as a plain-text table."""
        total = sum(self.branch_counts.values())
        counts = ", ".join(f"{k} {self.branch_counts.get(k, 0)}" for k in ("down", "raise", "none"))
        lines = [
            f"== {self.name}: 2-layer LLaMA-style model, AGGC + AdamW, PyTorch vs JAX",
            f"   device {self.device} | {self.steps} steps | tolerance {self.tolerance:.0e} | "
            f"{self.seconds:.1f} s",
            f"   loss: first {self.losses_torch[0]:.6f} (torch) {self.losses_jax[0]:.6f} (jax), "
            f"last {self.losses_torch[-1]:.6f} (torch) {self.losses_jax[-1]:.6f} (jax)",
            f"   {'quantity':<15} {'worst rel diff':>14}",
            f"   {'loss':<15} {self.worst_loss:>14.2e}",
            f"   {'parameters':<15} {self.worst_param[0]:>14.2e}  {self.worst_param[1]}",
        ]
        lines.extend(f"   {k:<15} {v:>14.2e}" for k, v in self.worst_stats.items())
        lines.append(
            f"   {'branches':<15} {len(self.branch_mismatches):>14d}  mismatches of {total} "
            f"(reference: {counts})"
        )
        lines.append(f"   {'result':<15} {'PASS' if self.ok else 'FAIL':>14}")
        return "\n".join(lines)


def _torch_training(
    options: Mapping[str, Any],
    init: Mapping[str, np.ndarray],
    batches: Sequence[tuple[np.ndarray, float]],
    torch_device: torch.device,
) -> tuple[StepRun, list[float], list[dict[str, np.ndarray]]]:
    """PyTorch with the bundled reference, as a training loop would use it."""
    model = _TorchLM().to(torch_device)
    tparams = dict(model.named_parameters())
    if set(tparams) != set(init):
        raise AssertionError(f"torch model names differ: {sorted(set(tparams) ^ set(init))}")
    with torch.no_grad():
        # its random init is overwritten by the shared weights
        for n, p in tparams.items():
            p.copy_(torch.as_tensor(init[n]))
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=_ADAMW["lr"],
        betas=(_ADAMW["b1"], _ADAMW["b2"]),
        eps=_ADAMW["eps"],
        weight_decay=_ADAMW["weight_decay"],
    )
    losses: list[float] = []
    params: list[dict[str, np.ndarray]] = []

    def backward(t: int) -> None:
        tokens, weight = batches[t]
        loss = model(torch.as_tensor(tokens, device=torch_device), weight)
        loss.backward()
        losses.append(float(loss.item()))

    def optimizer_step(t: int) -> None:
        opt.step()
        params.append({n: p.detach().cpu().numpy().copy() for n, p in tparams.items()})

    run = _torch_loop(
        BUNDLED,
        options,
        model,
        len(batches),
        total_steps=len(batches),
        backward=backward,
        after_clip=optimizer_step,
    )
    return run, losses, params


def _jax_training(
    options: Mapping[str, Any],
    init: Mapping[str, np.ndarray],
    batches: Sequence[tuple[np.ndarray, float]],
    jax_device: Any,
) -> tuple[StepRun, list[float], list[dict[str, np.ndarray]]]:
    """JAX with aggc_optax, the same model, weights and batches."""
    with jax.default_device(jax_device):
        tx = optax.chain(
            from_reference_options(dict(options), total_steps=len(batches)),
            optax.adamw(
                _ADAMW["lr"],
                b1=_ADAMW["b1"],
                b2=_ADAMW["b2"],
                eps=_ADAMW["eps"],
                weight_decay=_ADAMW["weight_decay"],
            ),
        )
        params = {n: jax.device_put(w, jax_device) for n, w in init.items()}
        # Committed to the device like the jitted outputs, so there is one compile.
        opt_state = jax.device_put(tx.init(params), jax_device)

        @jax.jit
        def train_step(params, opt_state, tokens, weight):
            loss, grads = jax.value_and_grad(_jax_loss)(params, tokens, weight)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        run = StepRun(tuple(group_stats(opt_state)), [], [], [])
        losses, history = [], []
        counts: dict[str, tuple[int, int]] = {}
        for tokens, weight in batches:
            params, opt_state, loss = train_step(
                params,
                opt_state,
                jax.device_put(tokens.astype(np.int32), jax_device),
                jax.device_put(np.float32(weight), jax_device),
            )
            losses.append(float(loss))
            _jax_step_record(opt_state, run, counts)
            history.append({n: np.asarray(w) for n, w in jax.device_get(params).items()})
    return run, losses, history


def _worst_param(
    torch_params: Sequence[Mapping[str, np.ndarray]], jax_params: Sequence[Mapping[str, np.ndarray]]
) -> tuple[float, str]:
    # max |p_torch - p_jax| / max |p_torch| over steps, and the parameter where it is
    worst = (0.0, "-")
    for pt, pj in zip(torch_params, jax_params):
        for n, w in pt.items():
            scale = float(np.max(np.abs(w)))
            diff = float(np.max(np.abs(w.astype(np.float64) - pj[n]))) / max(scale, 1e-30)
            if not diff <= worst[0]:
                worst = (diff if math.isfinite(diff) else math.inf, n)
    return worst


def run_end_to_end(
    config: str = "lora_sft",
    *,
    steps: int = DEFAULT_E2E_STEPS,
    device: str = "cpu",
    seed: int = 0,
    tolerance: float = E2E_TOLERANCE,
) -> EndToEndResult:
    """Trains the same small model in PyTorch (reference AGGC) and JAX (``aggc_optax``).

    Both start from the same weights (:func:`_e2e_init`) and see the same
    batches; the optimizer is AGGC with ``CONFIGS[config].options`` (and
    ``total_steps=steps``) followed by AdamW with identical hyperparameters
    (``torch.optim.AdamW`` and ``optax.adamw``). Matmuls run in full float32 on
    both sides.

    Args:
      config: a name of :data:`CONFIGS` whose options AGGC uses.
      steps: training steps.
      device: ``"cpu"`` or ``"cuda"``.
      seed: weights and data seed.
      tolerance: the relative tolerance (default :data:`E2E_TOLERANCE`).

    Returns:
      An :class:`EndToEndResult`.
    """
    if config not in CONFIGS:
        raise ValueError(f"unknown parity config {config!r}; known: {sorted(CONFIGS)}")
    options = CONFIGS[config].options
    torch_device, jax_device = _devices(device)
    start = time.perf_counter()
    init = _e2e_init(seed)
    batches = _e2e_batches(steps, seed)
    with _full_float32_matmuls():
        run_t, losses_t, params_t = _torch_training(options, init, batches, torch_device)
        run_j, losses_j, params_j = _jax_training(options, init, batches, jax_device)
    stats = compare_runs(run_t, run_j, tolerance=tolerance)
    return EndToEndResult(
        name=f"e2e-{config}",
        device=device,
        steps=steps,
        losses_torch=losses_t,
        losses_jax=losses_j,
        worst_loss=float(np.max(relative_difference(losses_t, losses_j))),
        worst_param=_worst_param(params_t, params_j),
        # a group missing on one side is an infinite difference
        worst_stats={f: math.inf if stats.problems else stats.worst[f][0] for f in _STATS},
        branch_counts=stats.branch_counts,
        branch_mismatches=stats.branch_mismatches,
        tolerance=tolerance,
        seconds=time.perf_counter() - start,
    )


# -- the command -------------------------------------------------------------------------------


def _selected(config: str) -> list[str]:
    if config == "all":
        return [*CONFIGS, *E2E_CONFIGS]
    if config == "e2e":
        return list(E2E_CONFIGS)
    if config in CONFIGS or config in E2E_CONFIGS:
        return [config]
    raise ValueError(
        f"unknown --config {config!r}; choose 'all', 'e2e', one of {sorted(CONFIGS)} or "
        f"one of {list(E2E_CONFIGS)}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """The ``python -m aggc_optax.parity`` command.

    Returns:
      0 when every configuration passes, 1 when any fails (a branch mismatch or
      a difference above tolerance), 2 on a usage error (unknown config, no
      CUDA device, an ``--upstream`` file that is missing or lacks the interface).
    """
    parser = argparse.ArgumentParser(
        prog="python -m aggc_optax.parity",
        description="Compare the PyTorch AGGC reference with aggc_optax, step by step.",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--config",
        default="all",
        help=f"'all', 'e2e', one of {', '.join(CONFIGS)}, or one of {', '.join(E2E_CONFIGS)}",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"steps per run (default {DEFAULT_STEPS}; end to end {DEFAULT_E2E_STEPS})",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--upstream",
        metavar="PATH",
        default=None,
        help="the authors' grad_clip.py (GRPO/verl/utils/grad_clip.py in their repository): "
        "trajectories also run through it, with a three-way table",
    )
    parser.add_argument(
        "--x64",
        action="store_true",
        help="trajectories only: JAX statistics in float64 on exact-sum trajectories "
        f"(tolerance {X64_TOLERANCE:.0e})",
    )
    args = parser.parse_args(argv)
    try:
        names = _selected(args.config)
    except ValueError as err:
        parser.print_usage(sys.stderr)
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.steps is not None and args.steps < 1:
        print(f"error: --steps must be a positive integer, got {args.steps}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not cuda_available():
        print(
            "error: --device cuda needs a CUDA device visible to both PyTorch "
            f"(torch.cuda.is_available() = {torch.cuda.is_available()}) and JAX "
            "(jax.devices('gpu'))",
            file=sys.stderr,
        )
        return 2

    upstream = None
    if args.upstream is not None:
        try:
            upstream = load_upstream(args.upstream)
        except (OSError, ImportError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    print(
        f"aggc_optax parity | torch {torch.__version__} | jax {jax.__version__} | "
        f"jax backend {jax.default_backend()} | jax statistics in "
        f"{'float64 (--x64)' if args.x64 or jax.config.jax_enable_x64 else 'float32'}"  # type: ignore[attr-defined]  # jax.config flags are set at run time
    )
    if args.device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(0)} | jax {jax.devices('gpu')[0].device_kind}")
    failed = []
    for name in names:
        if name in CONFIGS:
            result: Any = run_parity(
                name,
                steps=args.steps or DEFAULT_STEPS,
                device=args.device,
                seed=args.seed,
                x64=args.x64,
                upstream=upstream,
            )
        else:
            result = run_end_to_end(
                name.removeprefix("e2e-"),
                steps=args.steps or DEFAULT_E2E_STEPS,
                device=args.device,
                seed=args.seed,
            )
        print(result.table(), flush=True)
        if not result.ok:
            failed.append(name)
    print(
        f"\n{len(names) - len(failed)}/{len(names)} configurations pass"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
