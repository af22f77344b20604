"""Plots of AGGC's per-group statistics (needs matplotlib: ``pip install aggc_optax[examples]``).

Not imported by ``import aggc_optax``: import ``aggc_optax.plotting`` explicitly.
Figures are built with Matplotlib's object-oriented API on the Agg canvas, so
nothing here touches pyplot's global state or needs a display.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
except ImportError as err:  # pragma: no cover - exercised only without matplotlib
    raise ImportError(
        "aggc_optax.plotting needs matplotlib; install it with "
        "`pip install 'aggc_optax[examples]'` (or `pip install matplotlib`)"
    ) from err

from aggc_optax.monitoring.csv_log import read_clip_csv

Series = Mapping[str, Mapping[str, np.ndarray]]

_COLORS = {
    "before": "#1f77b4",
    "after": "#ff7f0e",
    "upper": "#d62728",
    "lower": "#2ca02c",
}


def _positive(x: np.ndarray) -> np.ndarray:
    # Log axes cannot show 0 (the bounds at step 0) or negative values: leave gaps.
    x = np.asarray(x, np.float64)
    return np.where(x > 0, x, np.nan)


def _load(source: Any) -> dict[str, dict[str, np.ndarray]]:
    if isinstance(source, (str, os.PathLike)):
        return read_clip_csv(source)
    if not isinstance(source, Mapping) or not source:
        raise TypeError(
            "source must be the path of a per_module_clip.csv (or its folder) or a non-empty "
            f"mapping {{module: {{'step', 'norm', 'lower', 'upper', 'scale': arrays}}}}, got "
            f"{type(source).__name__}"
        )
    out = {}
    for module, fields in source.items():
        missing = [k for k in ("step", "norm", "scale") if k not in fields]
        if missing:
            raise ValueError(f"source[{module!r}] lacks {missing}")
        out[str(module)] = {k: np.asarray(v) for k, v in fields.items()}
    return out


def _grid(n: int, ncols: int) -> tuple[int, int]:
    ncols = max(1, min(ncols, n))
    return math.ceil(n / ncols), ncols


def plot_group_norms(
    source: str | os.PathLike[str] | Series,
    *,
    groups: Sequence[str] | None = None,
    ncols: int = 4,
    log_scale: bool = True,
    title: str | None = None,
    path: str | os.PathLike[str] | None = None,
    panel_size: tuple[float, float] = (3.6, 2.4),
) -> Figure:
    r"""Per-group gradient norms before and after clipping, with AGGC's bounds.

    One small panel per group (as in the AGGC paper's figures 2 and 7): the
    pre-clip norm :math:`\|g_j\|`, the post-clip norm :math:`c_j \|g_j\|`, and
    the upper bound :math:`U_j` and lower bound :math:`L_j` of each step. A
    bound that is NaN (e.g. a run without AGGC logged in the same format) is
    not drawn; zeros (the bounds at step 0, when the EMA is still 0) leave a
    gap on a log axis.

    Args:
      source: a ``per_module_clip.csv`` (written by :class:`CSVLogger` or by the
        reference clipper) or its folder, or the mapping :func:`read_clip_csv`
        returns.
      groups: which groups to draw, in this order (default: all, in file order).
      ncols: panels per row.
      log_scale: logarithmic y axes (default), as norms span decades.
      title: the figure's title.
      path: if given, the figure is also saved there (PNG, PDF, ... by extension).
      panel_size: width and height of one panel, in inches.

    Returns:
      The ``matplotlib.figure.Figure`` (its ``axes`` follow ``groups``' order).

    Example:
      >>> import numpy as np
      >>> steps = np.arange(5)
      >>> data = {"q_proj": {"step": steps, "norm": np.full(5, 2.0), "scale": np.ones(5),
      ...                    "lower": np.full(5, 1.0), "upper": np.full(5, 3.0)}}
      >>> fig = plot_group_norms(data, title="demo")
      >>> [ax.get_title() for ax in fig.axes]
      ['q_proj']
    """
    data = _load(source)
    names = list(data) if groups is None else list(groups)
    unknown = [g for g in names if g not in data]
    if unknown:
        raise ValueError(f"groups {unknown} are not in the data; available: {list(data)}")
    if not names:
        raise ValueError("no group to plot")
    if not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"ncols must be a positive int, got {ncols!r}")
    nrows, ncols = _grid(len(names), ncols)
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
    drawn: set[str] = set()  # the bounds some panel shows: only those get a legend entry
    for i, name in enumerate(names):
        ax = axes[i // ncols][i % ncols]
        d = data[name]
        steps, norm = d["step"], np.asarray(d["norm"], np.float64)
        after = norm * np.asarray(d["scale"], np.float64)
        for key in ("upper", "lower"):
            bound = np.asarray(d.get(key, np.full(norm.shape, np.nan)), np.float64)
            if np.any(np.isfinite(bound)):
                # All zero (no lower bound: raising off) shows nothing on a log axis.
                if np.any(np.isfinite(_positive(bound))) or not log_scale:
                    drawn.add(key)
                ax.plot(
                    steps,
                    _positive(bound),
                    color=_COLORS[key],
                    lw=1.0,
                    ls="--" if key == "upper" else ":",
                )
        ax.plot(steps, _positive(norm), color=_COLORS["before"], lw=1.0, alpha=0.8)
        ax.plot(steps, _positive(after), color=_COLORS["after"], lw=1.0)
        ax.set_title(name, fontsize=10)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3, lw=0.5)
        if log_scale:
            ax.set_yscale("log")
        if i + ncols >= len(names):  # the lowest panel of its column
            ax.set_xlabel("step", fontsize=9)
    for j in range(len(names), nrows * ncols):
        fig.delaxes(axes[j // ncols][j % ncols])
    handles = [
        Line2D([], [], color=_COLORS["before"], label="norm before clipping"),
        Line2D([], [], color=_COLORS["after"], label="norm after clipping"),
    ]
    if "upper" in drawn:
        handles.append(
            Line2D([], [], color=_COLORS["upper"], ls="--", label="upper bound U (clip down above)")
        )
    if "lower" in drawn:
        handles.append(
            Line2D(
                [],
                [],
                color=_COLORS["lower"],
                ls=":",
                label="lower bound L (raise below, if raise_small)",
            )
        )
    # One legend row on wide grids, two columns on narrow ones (so it fits the width).
    legend_cols = len(handles) if ncols >= 3 else 2
    fig.legend(handles=handles, loc="outside lower center", ncol=legend_cols, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=12)
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


__all__ = ["plot_group_norms"]
