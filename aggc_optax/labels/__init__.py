"""Group labels: which AGGC group each leaf belongs to, and how to see the grouping.

``_rules``: the label rules (the reference's, LoRA's, regex rules, label trees)
and :func:`place`, the one function that turns a tree into groups;
``_modules``: :func:`module_labels`, labels from the model's own module names;
``_checks``: what a placement's leaves must be.
"""

from aggc_optax.labels._checks import as_array, check_placement, leaf_dtype, warn_unlabelled
from aggc_optax.labels._modules import module_labels
from aggc_optax.labels._rules import (
    REFERENCE_TOKENS,
    ParamLabels,
    Placement,
    TreeLabeler,
    check_param_labels,
    describe_groups,
    labeler_arity,
    leaf_labels,
    lora_label,
    path_name,
    place,
    reference_label,
    regex_labeler,
    tree_labeler,
)
from aggc_optax.labels._scale_only import ScaleOnly

__all__ = [
    "REFERENCE_TOKENS",
    "ParamLabels",
    "Placement",
    "ScaleOnly",
    "TreeLabeler",
    "as_array",
    "check_param_labels",
    "check_placement",
    "describe_groups",
    "labeler_arity",
    "leaf_dtype",
    "leaf_labels",
    "lora_label",
    "module_labels",
    "path_name",
    "place",
    "reference_label",
    "regex_labeler",
    "tree_labeler",
    "warn_unlabelled",
]
