"""Statistics of the package's other clippers (ZClip, skip-step, group z-score) for ``metrics``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from aggc_optax.clippers.group_zscore import GroupZScoreState, group_zscore_metrics
from aggc_optax.clippers.skip_step import SkipStepState, skip_step_metrics
from aggc_optax.clippers.zclip import ZClipState, zclip_metrics

# state type -> (key component, reader)
_READERS: dict[type, tuple[str, Callable[[Any, str], dict[str, float]]]] = {
    ZClipState: ("zclip", zclip_metrics),
    SkipStepState: ("skip_step", skip_step_metrics),
    GroupZScoreState: ("group_zscore", group_zscore_metrics),
}


def _is_clipper_state(x: Any) -> bool:
    return type(x) in _READERS


def clipper_metrics(opt_state: Any, prefix: str) -> dict[str, float]:
    """``{f"{prefix}/{kind}/...": float}`` for every ZClip, skip-step and group z-score state.

    ``kind`` is ``zclip``, ``skip_step`` or ``group_zscore``; a second state of
    the same kind gets its index: ``f"{prefix}/zclip/1/norm"``.
    """
    found = [
        x
        for x in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_clipper_state)
        if _is_clipper_state(x)
    ]
    out: dict[str, float] = {}
    seen: dict[str, int] = {}
    for state in found:
        kind, read = _READERS[type(state)]
        i = seen.get(kind, 0)
        seen[kind] = i + 1
        out.update(read(state, f"{prefix}/{kind}" if i == 0 else f"{prefix}/{kind}/{i}"))
    return out
