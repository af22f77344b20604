r"""A PyTorch reference of the authors' AGGC clipper, written from the spec.

This module reproduces, in PyTorch, the per-module gradient clipper that the
AGGC authors ran (``PerModuleGradClipper`` configured by
``PerModuleGradNormOptions``), quirks included, so that a PyTorch recipe can be
checked against :func:`aggc_optax.from_reference_options` and benchmarks can
compare against the way the authors run AGGC. It was written from the
project's behavioural contract of that clipper (its sections are cited as
"spec N"), not copied from the authors' code, and it shares no code with the
JAX transformation: the parity harness (:mod:`aggc_optax.parity`) compares two
independent implementations.

For group :math:`j` at the 0-based optimizer step :math:`t`, with
:math:`S_j` the sum over the group's tensors of their float32 sums of squares
(accumulated in Python floats by gradient hooks during ``backward()``),
:math:`\|g_j\| = \sqrt{S_j + 10^{-16}}` and :math:`m_j` the group's EMA before
the step:

.. math::
  L_j = \max(\text{min\_norm}, \alpha_\text{low}(t) m_j), \quad
  U_j = \max(0, \alpha_\text{high}(t) m_j)

(or ``[min_norm, max_norm]`` without ``auto_bounds``); the group is clipped
down to :math:`U_j` when :math:`U_j > 0` and :math:`\|g_j\| > U_j + \epsilon`,
raised to :math:`L_j` when ``raise_small``, :math:`L_j > 0` and
:math:`\|g_j\| < L_j - \epsilon` (:math:`\epsilon = 10^{-12}`, caps
applied), and :math:`m_j \leftarrow \beta m_j + (1 - \beta) \|g_j\| c_j`.

Importing this module imports torch; ``import aggc_optax`` does not.

Example:
  >>> import torch
  >>> from aggc_optax.torch_reference import PerModuleGradClipper, PerModuleGradNormOptions
  >>> model = torch.nn.Module()
  >>> model.q_proj = torch.nn.Linear(4, 4)
  >>> clipper = PerModuleGradClipper(
  ...     options=PerModuleGradNormOptions(enable=True, auto_bounds=True, low_mult=0.5,
  ...                                      high_mult=2.0, ema_beta=0.9))
  >>> clipper.attach(model)
  >>> sorted(clipper.mod2params)
  ['q_proj']
  >>> model.q_proj(torch.ones(2, 4)).sum().backward()
  >>> [(r["module"], r["upper"], r["scale"]) for r in clipper.on_before_optimizer_step(step=0)]
  [('q_proj', 0.0, 1.0)]
  >>> clipper.on_step_end(0)
  >>> clipper.close()

References:
  Li, Wu, Chang, `AGGC: Adaptive Group Gradient Clipping for Stabilizing
  Large Language Model Training <https://arxiv.org/abs/2601.11864>`_,
  Findings of ACL 2026.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import numbers
import os
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from aggc_optax.labels import REFERENCE_TOKENS

__all__ = [
    "CSV_FILES",
    "LABEL_TOKENS",
    "PerModuleGradClipper",
    "PerModuleGradNormOptions",
    "layer_id",
    "mirror_module",
    "module_label",
]

EPS = 1e-12  # the branch and division epsilon (spec 4)
NORM_FLOOR = 1e-16  # added to the sum of squares (spec 3)

#: Spec 2, rule 1: tried in this order; the first that matches is the label (one list,
#: shared with the JAX side: it is data of the spec).
LABEL_TOKENS: tuple[str, ...] = REFERENCE_TOKENS

_LAYER_PATTERNS = (re.compile(r"model\.layers\.(\d+)\."), re.compile(r"transformer\.h\.(\d+)\."))

#: Spec 7: the CSV files written to ``output_dir`` and their columns.
CSV_FILES: dict[str, tuple[str, ...]] = {
    "per_module_clip.csv": ("step", "module", "norm", "lower", "upper", "scale"),
    "grad_per_module.csv": ("step", "module", "norm"),
    "grad_per_layer.csv": ("step", "layer", "norm"),
}


def module_label(name: str) -> str | None:
    """The group label of a dotted parameter name (spec 2).

    Args:
      name: a name as ``named_parameters()`` gives it.

    Returns:
      The label, or ``None`` for a parameter in no group.

    Example:
      >>> module_label("model.layers.0.self_attn.q_proj.up_proj.weight")
      'q_proj'
      >>> module_label("transformer.h.0.ln_1.weight"), module_label("logit_scale")
      ('ln_1', None)
    """
    for token in LABEL_TOKENS:
        dotted = "." + token
        if dotted + "." in name or name.endswith((dotted + ".weight", dotted + ".bias")):
            return token
    parts = name.split(".")
    if len(parts) < 2:
        return None
    candidate = parts[-2]
    if candidate.isdigit() or candidate == "layers":
        return None
    return candidate


def layer_id(name: str) -> int | None:
    """The layer index used by the per-layer log (spec 7), or ``None``.

    Example:
      >>> layer_id("base_model.model.model.layers.12.mlp.up_proj.weight")
      12
    """
    for pattern in _LAYER_PATTERNS:
        match = pattern.search(name)
        if match:
            return int(match.group(1))
    return None


_BOOL_FIELDS = ("enable", "auto_bounds", "raise_small", "sync_dist", "keep_global_clip")
_NUMBER_FIELDS = (
    "min_norm",
    "max_norm",
    "norm_type",
    "low_mult",
    "high_mult",
    "ema_beta",
    "low_mult_late",
    "high_mult_late",
    "bounds_switch_ratio",
    "bounds_transition_ratio",
    "max_up_scale",
    "max_down_scale",
)


@dataclasses.dataclass
class PerModuleGradNormOptions:
    """The clipper's options, with the reference's defaults (spec 1).

    Values are type-checked but not range-checked: the reference accepts
    out-of-range caps (``max_down_scale=1.5`` inverts its meaning, spec 4) and
    so does this stand-in.

    Attributes:
      enable: off by default; with ``False`` nothing is hooked or clipped.
      auto_bounds: bounds from the EMA (``True``) or fixed ``[min_norm, max_norm]``.
      min_norm: floor of the lower bound (the whole lower bound without ``auto_bounds``).
      max_norm: the upper bound without ``auto_bounds``.
      norm_type: has no effect; the norm is always L2 (spec 8.4).
      low_mult: alpha_low, the base lower multiplier.
      high_mult: alpha_high, the base upper multiplier.
      raise_small: allow scaling up groups below the lower bound.
      ema_beta: EMA decay.
      sync_dist: all-reduce the per-group sums of squares and divide by the world size.
      bounds_schedule: ``"linear"`` enables the schedule (spec 5); anything else is none.
      low_mult_late: late lower multiplier; ``<= 0`` means ``low_mult``.
      high_mult_late: late upper multiplier; ``<= 0`` means ``high_mult``.
      bounds_switch_ratio: progress at which the transition starts.
      bounds_transition_ratio: transition length as a fraction of the run.
      max_up_scale: ``> 0``: ceiling on an upward scale.
      max_down_scale: ``> 0``: floor on a downward scale.
      output_dir: where the CSV logs go (``None``: no logs).
      keep_global_clip: for the trainer only (keep its global-norm clip too).
    """

    enable: bool = False
    auto_bounds: bool = False
    min_norm: float = 0.0
    max_norm: float = 1.0
    norm_type: float = 2.0
    low_mult: float = 1.0
    high_mult: float = 1.0
    raise_small: bool = False
    ema_beta: float = 0.98
    sync_dist: bool = False
    bounds_schedule: str = "none"
    low_mult_late: float = 0.0
    high_mult_late: float = 0.0
    bounds_switch_ratio: float = 0.5
    bounds_transition_ratio: float = 0.2
    max_up_scale: float = 0.0
    max_down_scale: float = 0.0
    output_dir: str | None = None
    keep_global_clip: bool = False

    def __post_init__(self) -> None:
        for name in _BOOL_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"PerModuleGradNormOptions.{name} must be a bool, got {value!r}")
        for name in _NUMBER_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(
                    f"PerModuleGradNormOptions.{name} must be a real number, got {value!r}"
                )
        if not isinstance(self.bounds_schedule, str):
            raise TypeError(
                "PerModuleGradNormOptions.bounds_schedule must be a str ('linear', or anything "
                f"else for none), got {self.bounds_schedule!r}"
            )
        if self.output_dir is not None and not isinstance(self.output_dir, (str, os.PathLike)):
            raise TypeError(
                f"PerModuleGradNormOptions.output_dir must be a path or None, got "
                f"{self.output_dir!r}"
            )


def mirror_module(
    names_shapes: Mapping[str, tuple[int, ...]],
    *,
    dtype: torch.dtype = torch.float32,
    device: Any = None,
    init: Callable[[tuple[int, ...]], torch.Tensor] | None = None,
) -> torch.nn.Module:
    """A ``torch.nn.Module`` whose ``named_parameters()`` are exactly the given dotted names.

    Lets a flat ``{name: array}`` tree (a JAX tree keyed by dotted names) be
    clipped by the reference: the submodules are plain ``torch.nn.Module``
    containers, created in the order the names first need them, and the
    parameters are registered in the order given; ``named_parameters()``
    yields them module by module, as torch does (the given order when the
    names of each module are consecutive).

    Args:
      names_shapes: ``{dotted name: shape}``.
      dtype: the parameters' dtype.
      device: where the parameters live (``None``: torch's default device).
      init: ``init(shape)`` gives each parameter's initial value (called in
        order; cast to ``dtype`` and moved to ``device``); ``None``: zeros.

    Returns:
      The module.

    Example:
      >>> m = mirror_module({"model.layers.0.q_proj.weight": (2, 3), "lm_head.weight": (4, 3)})
      >>> [(n, tuple(p.shape)) for n, p in m.named_parameters()]
      [('model.layers.0.q_proj.weight', (2, 3)), ('lm_head.weight', (4, 3))]
    """
    root = torch.nn.Module()
    for name, shape in names_shapes.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            child = module._modules.get(part)
            if child is None:
                child = torch.nn.Module()
                module.add_module(part, child)
            module = child
        shape = tuple(shape)
        value = torch.zeros(shape) if init is None else init(shape)
        module.register_parameter(leaf, torch.nn.Parameter(value.to(dtype=dtype, device=device)))
    got = {n for n, _ in root.named_parameters()}
    if got != set(names_shapes):
        raise ValueError(
            "mirror_module: these names cannot all be parameters of one module: "
            f"{sorted(got ^ set(names_shapes))}"
        )
    return root


def _float32_sum_of_squares(grad: torch.Tensor) -> float:
    # Spec 3: the per-tensor sum is a float32 reduction of the float32 cast;
    # only the sum across tensors is done in Python floats.
    return float(grad.detach().to(torch.float32).square().sum().item())


class PerModuleGradClipper:
    """The authors' per-module (AGGC) gradient clipper, as specified.

    Use it around a PyTorch training step::

        clipper = PerModuleGradClipper(options=PerModuleGradNormOptions(enable=True, ...))
        clipper.attach(model)
        clipper.on_train_begin(total_steps)          # optional; enables the schedule
        for t in range(total_steps):
            loss(model, batch).backward()             # hooks accumulate the sums
            clipper.on_before_optimizer_step(step=t)  # clips .grad in place
            optimizer.step(); optimizer.zero_grad()
            clipper.on_step_end(t)                    # logs, resets the sums
        clipper.close()

    Attributes:
      options: the :class:`PerModuleGradNormOptions`.
      local_rank: only rank 0 writes the CSV logs.
      enabled: whether the clipper acts; ``False`` when ``options.enable`` is
        ``False`` or, after :meth:`attach`, when no parameter got a label and
        none has a layer id.
      module_ema: group label -> its EMA (a Python float, 0.0 at first).
      mod2params: group label -> the group's parameters, in group order (order
        of first appearance in ``named_parameters()``).
      total_steps: as given to :meth:`on_train_begin` (0 until then).
      last_branches: group label -> the branch the last
        :meth:`on_before_optimizer_step` took for it: ``"down"`` (clipped
        down), ``"raise"`` (raised) or ``"none"`` (untouched); empty before the
        first step and while disabled. The authors' clipper does not report
        this; tests and the parity harness read it here instead of deriving
        the branch from the bounds again.
    """

    def __init__(self, *, options: PerModuleGradNormOptions, local_rank: int = 0) -> None:
        if not isinstance(options, PerModuleGradNormOptions):
            raise TypeError(
                "PerModuleGradClipper: options must be a PerModuleGradNormOptions, got "
                f"{type(options).__name__}"
            )
        if isinstance(local_rank, bool) or not isinstance(local_rank, int):
            raise TypeError(f"PerModuleGradClipper: local_rank must be an int, got {local_rank!r}")
        self.options = options
        self.local_rank = local_rank
        self.enabled = bool(options.enable)
        self.module_ema: dict[str, float] = {}
        self.mod2params: dict[str, list[torch.nn.Parameter]] = {}
        self.mod2names: dict[str, list[str]] = {}
        self.total_steps = 0
        self._layers: list[int] = []
        self._group_sq: dict[str, float] = {}
        self._layer_sq: dict[int, float] = {}
        self._handles: list[Any] = []
        self._attached = False
        # What the last on_before_optimizer_step saw, for the logs and the harness.
        self._last_step: int | None = None
        self._last_report: list[dict[str, Any]] = []
        self.last_branches: dict[str, str] = {}
        self._last_norms: dict[str, float] = {}
        self._last_layer_norms: dict[int, float] = {}

    # -- setup -----------------------------------------------------------------

    def attach(self, model: torch.nn.Module) -> None:
        """Groups ``model``'s parameters and registers the gradient hooks.

        Parameters with ``requires_grad=False`` are ignored; a parameter with a
        label is hooked and clipped; one with a layer id but no label is hooked
        for the per-layer log only. If nothing can be labelled or logged, the
        clipper disables itself (with a warning).

        Args:
          model: the ``torch.nn.Module`` whose ``named_parameters()`` are grouped.
        """
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"PerModuleGradClipper.attach: model must be a torch.nn.Module, got "
                f"{type(model).__name__}"
            )
        if self._attached:
            raise RuntimeError(
                "PerModuleGradClipper.attach: already attached; call close() before attaching again"
            )
        self.enabled = bool(self.options.enable)
        self.module_ema, self.mod2params, self.mod2names = {}, {}, {}
        self._layers, self._group_sq, self._layer_sq = [], {}, {}
        if not self.enabled:
            return
        hooked = []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            label, layer = module_label(name), layer_id(name)
            if label is None and layer is None:
                continue
            if label is not None:
                if label not in self.mod2params:
                    self.mod2params[label] = []
                    self.mod2names[label] = []
                    self.module_ema[label] = 0.0
                    self._group_sq[label] = 0.0
                self.mod2params[label].append(param)
                self.mod2names[label].append(name)
            if layer is not None and layer not in self._layer_sq:
                self._layers.append(layer)
                self._layer_sq[layer] = 0.0
            hooked.append((param, label, layer))
        if not hooked:
            self.enabled = False
            warnings.warn(
                "PerModuleGradClipper: no parameter could be labelled; clipping is disabled.",
                stacklevel=2,
            )
            return
        for param, label, layer in hooked:
            self._handles.append(param.register_hook(self._make_hook(label, layer)))
        self._attached = True

    def _make_hook(self, label: str | None, layer: int | None) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            # Fires once per backward() with this backward's gradient only, so
            # micro-batches add their squared norms (spec 8.5); returning None
            # leaves the gradient as it is.
            if grad is None:
                return
            sq = _float32_sum_of_squares(grad)
            if label is not None:
                self._group_sq[label] += sq
            if layer is not None:
                self._layer_sq[layer] += sq

        return hook

    def on_train_begin(self, total_steps: int) -> None:
        """Records the run's length, which the ``linear`` schedule needs (spec 5)."""
        if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral):
            raise TypeError(
                f"on_train_begin: total_steps must be an int, got {total_steps!r} "
                f"({type(total_steps).__name__})"
            )
        self.total_steps = int(total_steps)

    # -- the step ----------------------------------------------------------------

    def multipliers(self, step: int) -> tuple[float, float]:
        """``(alpha_low, alpha_high)`` at the 0-based ``step`` (spec 5), in float64."""
        opts = self.options
        low, high = float(opts.low_mult), float(opts.high_mult)
        if opts.bounds_schedule != "linear" or self.total_steps <= 0:
            return low, high
        late_low = float(opts.low_mult_late) if opts.low_mult_late > 0 else low
        late_high = float(opts.high_mult_late) if opts.high_mult_late > 0 else high
        prog = min(max(step / max(1, self.total_steps), 0.0), 1.0)
        switch = float(opts.bounds_switch_ratio)
        window = max(1e-6, float(opts.bounds_transition_ratio))
        if prog <= switch:
            return low, high
        if prog >= switch + window:
            return late_low, late_high
        a = (prog - switch) / window
        return low * (1 - a) + late_low * a, high * (1 - a) + late_high * a

    def _reduce(self, values: list[float]) -> list[float]:
        # sync_dist (spec 8.7): sum over ranks, then divide by the world size.
        if not (self.options.sync_dist and values and dist.is_available()):
            return values
        if not dist.is_initialized():
            return values
        world = dist.get_world_size()
        if world <= 1:
            return values
        device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        buf = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return [v / world for v in buf.cpu().tolist()]

    def _norms(self) -> tuple[dict[str, float], dict[int, float]]:
        labels = list(self.mod2params)
        sums = self._reduce(
            [self._group_sq[k] for k in labels] + [self._layer_sq[k] for k in self._layers]
        )
        group = {k: math.sqrt(s + NORM_FLOOR) for k, s in zip(labels, sums)}
        layer = {k: math.sqrt(s + NORM_FLOOR) for k, s in zip(self._layers, sums[len(labels) :])}
        return group, layer

    def on_before_optimizer_step(self, step: int) -> list[dict[str, Any]]:
        """Clips every group's ``.grad`` in place and updates the EMAs (spec 4).

        Args:
          step: the 0-based optimizer step.

        Returns:
          One dict per group, in group order, with keys ``module`` (the label),
          ``norm`` (pre-clip), ``lower``, ``upper`` and ``scale`` (Python floats).
          Empty when the clipper is disabled.
        """
        if not self.enabled:
            return []
        opts = self.options
        low_t, high_t = self.multipliers(step)
        beta = float(opts.ema_beta)
        norms, layer_norms = self._norms()
        report, branches = [], {}
        for label, params in self.mod2params.items():
            norm = norms[label]
            ema = self.module_ema[label]
            if opts.auto_bounds:
                # Python's max keeps its first argument unless the second is
                # larger, so a NaN EMA gives lower = min_norm, upper = 0 (spec 8.3).
                lower = max(float(opts.min_norm), ema * low_t)
                upper = max(0.0, ema * high_t)
            else:
                lower, upper = float(opts.min_norm), float(opts.max_norm)
            if upper > 0 and norm > upper + EPS:
                branch, scale = "down", upper / (norm + EPS)
                if opts.max_down_scale > 0:
                    scale = max(scale, float(opts.max_down_scale))
            elif opts.raise_small and lower > 0 and norm < lower - EPS:
                branch, scale = "raise", lower / (norm + EPS)
                if opts.max_up_scale > 0:
                    scale = min(scale, float(opts.max_up_scale))
            else:
                branch, scale = "none", 1.0
            if branch != "none":
                with torch.no_grad():
                    for param in params:
                        if param.grad is not None:
                            # A Python-float scalar: torch multiplies float32 (and
                            # half) gradients by float32(scale), as spec 4.3 requires.
                            param.grad.mul_(scale)
            self.module_ema[label] = beta * ema + (1 - beta) * norm * scale
            branches[label] = branch
            report.append(
                {"module": label, "norm": norm, "lower": lower, "upper": upper, "scale": scale}
            )
        self._last_step = step
        self._last_report = report
        self.last_branches = branches
        self._last_norms = norms
        self._last_layer_norms = layer_norms
        return report

    def on_step_end(self, step: int) -> None:
        """Writes the CSV logs (rank 0, with ``output_dir``) and resets the sums."""
        if not self.enabled:
            return
        if self.options.output_dir is not None and self.local_rank == 0:
            if self._last_step == step:
                norms, layer_norms, report = (
                    self._last_norms,
                    self._last_layer_norms,
                    self._last_report,
                )
            else:
                norms, layer_norms = self._norms()
                report = []
            self._log(step, report, norms, layer_norms)
        for label in self._group_sq:
            self._group_sq[label] = 0.0
        for layer in self._layer_sq:
            self._layer_sq[layer] = 0.0
        self._last_step = None

    def _log(
        self,
        step: int,
        report: list[dict[str, Any]],
        norms: dict[str, float],
        layer_norms: dict[int, float],
    ) -> None:
        rows = {
            "per_module_clip.csv": [
                [step, r["module"], r["norm"], r["lower"], r["upper"], r["scale"]] for r in report
            ],
            "grad_per_module.csv": [[step, k, norms[k]] for k in sorted(norms)],
            "grad_per_layer.csv": [[step, k, layer_norms[k]] for k in sorted(layer_norms)],
        }
        directory = os.fspath(self.options.output_dir)  # type: ignore[arg-type]  # output_dir is set on this path
        os.makedirs(directory, exist_ok=True)
        for filename, columns in CSV_FILES.items():
            if not rows[filename]:
                continue
            path = os.path.join(directory, filename)
            new = not os.path.exists(path) or os.path.getsize(path) == 0
            with open(path, "a", newline="") as f:
                writer = csv.writer(f)
                if new:
                    writer.writerow(columns)
                writer.writerows(rows[filename])

    def close(self) -> None:
        """Removes the hooks; the clipper can then be attached again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._attached = False
