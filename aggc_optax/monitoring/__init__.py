"""Watching AGGC train: its statistics read out of an optax state, as metrics, CSV and plots.

``_stats``: :func:`find_aggc_states` and :func:`group_stats` (any optax
state, restored ones included); ``_metrics``: :func:`metrics`, flat scalars
for a logger; ``csv_log``: the reference's ``per_module_clip.csv``;
``plotting`` (matplotlib, imported on demand): the reference's plots.
"""

from aggc_optax.monitoring._metrics import metrics
from aggc_optax.monitoring._stats import find_aggc_states, group_stats
from aggc_optax.monitoring.csv_log import CSVLogger, read_clip_csv, stats_rows

__all__ = ["CSVLogger", "find_aggc_states", "group_stats", "metrics", "read_clip_csv", "stats_rows"]
