"""aggc_optax: Adaptive Group Gradient Clipping (AGGC) for optax.

Li, Wu, Chang, "AGGC: Adaptive Group Gradient Clipping for Stabilizing Large
Language Model Training", Findings of ACL 2026 (arXiv 2601.11864).
"""

from aggc_optax import presets
from aggc_optax._aggc import AGGCState, GroupLabels, aggc
from aggc_optax._hf_callback import LoraCallbackAsRanState, lora_callback_as_ran
from aggc_optax._labels import (
    REFERENCE_TOKENS,
    TreeLabeler,
    describe_groups,
    lora_label,
    path_name,
    reference_label,
    regex_labeler,
    tree_labeler,
)
from aggc_optax._metrics import metrics
from aggc_optax._module_labels import module_labels
from aggc_optax._reference_options import REFERENCE_DEFAULTS, from_reference_options
from aggc_optax._scale_only import ScaleOnly
from aggc_optax._schedule import cosine_ramp, linear_bounds_schedule
from aggc_optax._stats import find_aggc_states, group_stats
from aggc_optax.csv_log import CSVLogger, read_clip_csv, stats_rows

__version__ = "0.1.0"

__all__ = [
    "REFERENCE_DEFAULTS",
    "REFERENCE_TOKENS",
    "AGGCState",
    "CSVLogger",
    "GroupLabels",
    "LoraCallbackAsRanState",
    "ScaleOnly",
    "TreeLabeler",
    "aggc",
    "cosine_ramp",
    "describe_groups",
    "find_aggc_states",
    "from_reference_options",
    "group_stats",
    "linear_bounds_schedule",
    "lora_callback_as_ran",
    "lora_label",
    "metrics",
    "module_labels",
    "path_name",
    "presets",
    "read_clip_csv",
    "reference_label",
    "regex_labeler",
    "stats_rows",
    "tree_labeler",
]
