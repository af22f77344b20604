"""Checks on the leaves a placement puts in groups: arrays of a floating dtype, and
under the default rule, a word on the float leaves it leaves out."""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aggc_optax.labels._rules import ParamLabels, Placement


def leaf_dtype(name: str, leaf: Any) -> Any:
    """The dtype of a leaf, or a TypeError naming it when it is not an array or a number."""
    if not isinstance(leaf, (str, bytes)):
        try:
            return jnp.result_type(leaf)
        except TypeError:
            pass
    raise TypeError(
        f"aggc: leaf {name!r} is {leaf!r} ({type(leaf).__name__}), not an array or a number; "
        "give it the label None to pass it through, or keep it out of the tree"
    )


def as_array(leaf: Any) -> Any:
    # a Python or NumPy scalar leaf (eager use) becomes an array; arrays and tracers stay
    return leaf if hasattr(leaf, "astype") and hasattr(leaf, "dtype") else jnp.asarray(leaf)


def _checkleaf_dtype(name: str, leaf: Any) -> None:
    dtype = leaf_dtype(name, leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"aggc: leaf {name!r} has a group label but dtype {dtype}; only floating-point "
            "gradients can be clipped (give it the label None to pass it through)"
        )


def check_placement(placement: Placement, leaves: list[Any], labels: tuple[str, ...]) -> None:
    for name, group, leaf in zip(placement.names, placement.groups, leaves):
        if group >= 0:
            _checkleaf_dtype(name, leaf)
    if placement.labels != tuple(labels):
        raise ValueError(
            "aggc: the updates do not have the groups of the parameters AGGC was initialised "
            f"with: {list(placement.labels)} in the updates, {list(labels)} at init"
        )


def _is_float_leaf(leaf: Any) -> bool:
    try:
        return jnp.issubdtype(leaf_dtype("", leaf), jnp.floating)
    except TypeError:  # a str or other non-array leaf left out of every group
        return False


def warn_unlabelled(
    params: Any, placement: Placement, param_labels: ParamLabels, mode: str
) -> None:
    """Under the default rule, say how much of the model is left out of every group."""
    if param_labels is not None or mode == "ignore":
        return
    leaves = jax.tree_util.tree_leaves(params)
    sizes = [int(np.prod(np.shape(leaf), dtype=np.int64)) for leaf in leaves]
    left_out = [
        (name, size)
        for name, group, leaf, size in zip(placement.names, placement.groups, leaves, sizes)
        if group < 0 and _is_float_leaf(leaf)
    ]
    if not left_out or not placement.labels:
        return
    share = sum(size for _, size in left_out) / max(1, sum(sizes))
    first = ", ".join(repr(name) for name, _ in left_out[:5])
    message = (
        f"aggc: the default label rule (aggc_optax.reference_label) puts {len(left_out)} "
        f"floating-point {'leaf' if len(left_out) == 1 else 'leaves'} ({share:.1%} of all "
        "parameters) in no group, so they are never "
        f"clipped: {first}{', ...' if len(left_out) > 5 else ''}. See "
        "aggc_optax.describe_groups(params); label them with param_labels (e.g. "
        "aggc_optax.module_labels), or pass unlabelled='ignore' if that is intended."
    )
    if mode == "error":
        raise ValueError(message)
    warnings.warn(message, stacklevel=4)
