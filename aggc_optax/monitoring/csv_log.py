"""AGGC statistics as CSV, in the reference clipper's ``per_module_clip.csv`` format.

The authors' PyTorch clipper writes one row per group and optimizer step,
``step,module,norm,lower,upper,scale``, groups in group order, numbers as
Python writes floats (docs/reference-behaviour.md §7). :class:`CSVLogger` writes the same file
from an optax state, so runs of this port can be compared with runs of the
reference (and with its plotting scripts) line by line.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping
from typing import Any, TextIO

import jax
import numpy as np

from aggc_optax.monitoring._stats import find_aggc_states, unbox

#: The reference's column order.
CSV_COLUMNS: tuple[str, ...] = ("step", "module", "norm", "lower", "upper", "scale")
#: The reference's file name inside its ``output_dir``.
CSV_FILENAME = "per_module_clip.csv"

_VALUE_COLUMNS = CSV_COLUMNS[2:]


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be an int (the 0-based optimizer step), got {step!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0 (the 0-based optimizer step), got {step}")
    return int(step)


Row = tuple[str, tuple[np.floating, ...]]


def _scalar(x: Any) -> np.floating:
    # Keep the value's own float dtype: a float32 statistic is written as the
    # shortest string that gives back that float32 ('0.01', not '0.0099999997...').
    value = np.asarray(x)
    if not np.issubdtype(value.dtype, np.floating):
        value = value.astype(np.float64)
    return value[()]  # type: ignore[return-value]  # a 0-d array indexed by () is a scalar


def _rows_from_state(opt_state: Any) -> list[Row] | None:
    states = find_aggc_states(opt_state)
    if not states:
        return None
    out, seen = [], set()
    for state in states:
        # One transfer per state, not one per group and field.
        vectors = jax.device_get([unbox(getattr(state, f)) for f in _VALUE_COLUMNS])
        for i, label in enumerate(state.labels):
            if label in seen:
                raise ValueError(
                    f"stats_rows: the label {label!r} appears in two AGGC states; log each "
                    "sub-state separately"
                )
            seen.add(label)
            out.append((label, tuple(_scalar(v[i]) for v in vectors)))
    return out


def _rows_from_stats(stats: Mapping[str, Any]) -> list[Row]:
    # A list, not the dict itself: jax flattening would sort the labels out of group order.
    labels = list(stats)
    out = []
    for label, fields in zip(labels, jax.device_get([stats[k] for k in labels])):
        if not isinstance(fields, Mapping):
            raise TypeError(
                f"stats_rows: stats[{label!r}] must be a mapping with keys {_VALUE_COLUMNS}, "
                f"got {type(fields).__name__}"
            )
        missing = [f for f in _VALUE_COLUMNS if f not in fields]
        if missing:
            raise ValueError(
                f"stats_rows: stats[{label!r}] lacks {missing}; each group needs "
                f"{_VALUE_COLUMNS} (as group_stats returns)"
            )
        out.append((str(label), tuple(_scalar(fields[f]) for f in _VALUE_COLUMNS)))
    return out


def _collect(state_or_stats: Any) -> list[Row]:
    if isinstance(state_or_stats, Mapping) and not find_aggc_states(state_or_stats):
        return _rows_from_stats(state_or_stats)
    rows = _rows_from_state(state_or_stats)
    if rows is None:
        raise ValueError(
            "stats_rows: no AGGC state found (pass an optax state containing aggc(), or "
            "the dict group_stats returns)"
        )
    return rows


def stats_rows(state_or_stats: Any, step: int) -> list[dict[str, Any]]:
    """One row per AGGC group: ``{step, module, norm, lower, upper, scale}``.

    Args:
      state_or_stats: an optax state holding one or more :class:`AGGCState`
        (inside ``optax.chain``, ``MultiSteps``, ``partition``, a Flax NNX
        optimizer, ...), or a mapping ``{label: {"norm": ..., "lower": ...,
        "upper": ..., "scale": ...}}`` such as :func:`group_stats` returns.
      step: the 0-based optimizer step the statistics belong to (the reference
        logs the step it was passed, counted from 0).

    Returns:
      A list of dicts in group order, values as Python floats: the pre-clip
      ``norm``, the ``lower`` and ``upper`` bounds and the ``scale`` applied.

    Raises:
      ValueError: no AGGC state is found, or a stats entry lacks a field.

    Example:
      >>> import jax.numpy as jnp, optax, aggc_optax
      >>> params = {"model": {"norm": {"weight": jnp.ones(3)}}}
      >>> tx = optax.chain(aggc_optax.aggc(), optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> _, state = tx.update({"model": {"norm": {"weight": jnp.full(3, 2.0)}}}, state)
      >>> row = aggc_optax.stats_rows(state, step=0)[0]
      >>> row["module"], round(row["norm"], 4), round(row["upper"], 4), row["scale"]
      ('norm', 3.4641, 10.3923, 1.0)

      The first step's EMA is its own norm (``ema_init="first"``), so the upper
      bound is ``2 x 3.4641`` and nothing is clipped.
    """
    step = _check_step(step)
    return [
        {"step": step, "module": label, **{c: float(v) for c, v in zip(_VALUE_COLUMNS, values)}}
        for label, values in _collect(state_or_stats)
    ]


class CSVLogger:
    """Appends AGGC's per-group statistics to a CSV in the reference's format.

    Every :meth:`log` call writes one line per group,
    ``step,module,norm,lower,upper,scale``, groups in group order, floats as
    Python prints them: the file the reference writes as
    ``<output_dir>/per_module_clip.csv``. Like the reference, a new logger
    starts the file afresh (header only) unless ``append=True`` and the file
    already has content.

    Args:
      path: the CSV file, or an existing directory, in which
        ``per_module_clip.csv`` is written (the reference's ``output_dir``).
      append: keep an existing file's rows and add to them (a resumed run).

    Example:
      >>> import os, tempfile, jax, jax.numpy as jnp, optax, aggc_optax
      >>> params = {"model": {"layers": {"0": {"q_proj": {"weight": jnp.ones(4)}}}}}
      >>> tx = optax.chain(aggc_optax.aggc(), optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> folder = tempfile.mkdtemp()
      >>> with aggc_optax.CSVLogger(folder) as logger:
      ...     for step, size in enumerate([1.0, 5.0]):
      ...         grads = jax.tree.map(lambda p: size * p, params)
      ...         _, state = tx.update(grads, state)
      ...         logger.log(state, step)
      >>> print(open(os.path.join(folder, "per_module_clip.csv")).read().strip())
      step,module,norm,lower,upper,scale
      0,q_proj,2.0,0.0,6.0,1.0
      1,q_proj,10.0,0.0,6.0,0.6...

      Step 1's norm 10 leaves the interval ``[0, 2 x EMA] = [0, 4]`` and is
      scaled down to 4.
    """

    def __init__(self, path: str | os.PathLike[str], *, append: bool = False):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"CSVLogger: path must be a file or directory path, got {path!r}")
        if not isinstance(append, bool):
            raise TypeError(f"CSVLogger: append must be a bool, got {append!r}")
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, CSV_FILENAME)
        self.path = path
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        keep = append and os.path.exists(path) and os.path.getsize(path) > 0
        if keep:
            with open(path, encoding="utf-8") as f:
                header = f.readline().strip()
            if header != ",".join(CSV_COLUMNS):
                raise ValueError(
                    f"CSVLogger: cannot append to {path!r}: its header is {header!r}, "
                    f"expected {','.join(CSV_COLUMNS)!r}"
                )
        self._file: TextIO | None = open(path, "a" if keep else "w", encoding="utf-8")
        if not keep:
            self._file.write(",".join(CSV_COLUMNS) + "\n")
            self._file.flush()

    def log(self, state_or_stats: Any, step: int) -> None:
        """Write the groups' statistics for ``step``.

        Args:
          state_or_stats: as for :func:`stats_rows`.
          step: the 0-based optimizer step.
        """
        if self._file is None:
            raise ValueError(f"CSVLogger: {self.path!r} is closed")
        step = _check_step(step)
        # str() of a NumPy float is its shortest round-trip form, as str() of a
        # Python float is in the reference's f-string: '0.5', 'nan', 'inf'.
        lines = (
            f"{step},{label}," + ",".join(str(v) for v in values) + "\n"
            for label, values in _collect(state_or_stats)
        )
        self._file.write("".join(lines))
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> CSVLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_clip_csv(path: str | os.PathLike[str]) -> dict[str, dict[str, np.ndarray]]:
    """Read a ``per_module_clip.csv`` (this package's or the reference's).

    Args:
      path: the CSV file, or a directory holding ``per_module_clip.csv``.

    Returns:
      ``{module: {column: array}}``: ``"step"`` as ints, ``"norm"``, ``"lower"``,
      ``"upper"`` and ``"scale"`` as floats; modules in order of first
      appearance, rows in file order. Empty cells read as NaN.

    Example:
      >>> import tempfile, os
      >>> p = os.path.join(tempfile.mkdtemp(), "c.csv")
      >>> text = "step,module,norm,lower,upper,scale\\n0,q_proj,2.0,0.01,0.0,1.0\\n"
      >>> _ = open(p, "w").write(text)
      >>> read_clip_csv(p)["q_proj"]["norm"]
      array([2.])
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, CSV_FILENAME)
    columns: dict[str, dict[str, list[float]]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"read_clip_csv: {path!r} lacks the columns {missing}; expected the header "
                f"{','.join(CSV_COLUMNS)!r}"
            )
        for line, row in enumerate(reader, start=2):
            entry = columns.setdefault(row["module"], {c: [] for c in ("step", *_VALUE_COLUMNS)})
            try:
                entry["step"].append(int(row["step"]))
                for c in _VALUE_COLUMNS:
                    entry[c].append(float(row[c]) if row[c] not in ("", None) else math.nan)
            except ValueError as err:
                raise ValueError(f"read_clip_csv: {path!r} line {line}: {err}") from err
    return {
        module: {
            c: np.asarray(values, np.int64 if c == "step" else np.float64)
            for c, values in entry.items()
        }
        for module, entry in columns.items()
    }


__all__ = ["CSV_COLUMNS", "CSV_FILENAME", "CSVLogger", "read_clip_csv", "stats_rows"]
