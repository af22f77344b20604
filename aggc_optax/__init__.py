"""aggc_optax: Adaptive Group Gradient Clipping (AGGC) for optax.

Li, Wu, Chang, "AGGC: Adaptive Group Gradient Clipping for Stabilizing Large
Language Model Training", Findings of ACL 2026 (arXiv 2601.11864).

The public API is re-exported here; the layout (``docs/architecture.md``):
``_aggc`` (the transformation), ``_numerics``, ``_config``, ``_state`` (the
core), ``labels/``, ``monitoring/``, ``presets``, ``reference/`` (the authors'
clipper reproduced: the only place a quirk is set), ``torch/`` (the only place
torch is imported), ``cli``.
"""

from aggc_optax import presets
from aggc_optax._aggc import AGGCState, GroupLabels, aggc, check_state
from aggc_optax._schedule import cosine_ramp, linear_bounds_schedule
from aggc_optax.labels import (
    REFERENCE_TOKENS,
    ScaleOnly,
    TreeLabeler,
    describe_groups,
    lora_label,
    module_labels,
    path_name,
    reference_label,
    regex_labeler,
    tree_labeler,
)
from aggc_optax.monitoring import (
    CSVLogger,
    find_aggc_states,
    group_stats,
    metrics,
    read_clip_csv,
    stats_rows,
)
from aggc_optax.reference import (
    REFERENCE_DEFAULTS,
    LoraCallbackAsRanState,
    from_reference_options,
    lora_callback_as_ran,
)

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
    "check_state",
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
