"""Crashes and unclear errors, from docs/reliability.md's executed tables.

The table ``error-table-3`` (errors that need optax or a mapped axis) and the table
``accepted-table`` (inputs that used to fail and are now accepted) live in
``docs/reliability.md`` and run here row by row; the rest checks by hand what a
row cannot show.
"""

from __future__ import annotations

import math
import pathlib
import re
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

import aggc_optax
from aggc_optax import aggc, presets
from tests.test_validation import _namespace as validation_namespace

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
_ERROR_ROW = re.compile(r"^\| `(?P<expr>[^`]+)` \| `(?P<exc>\w+)` \| `(?P<msg>[^`]+)` \|$")
_ACCEPTED_ROW = re.compile(r"^\| `(?P<expr>[^`]+)` \| (?P<what>.+) \|$")


def _table(name: str, row: re.Pattern[str]) -> list[dict[str, str]]:
    text = DOC.read_text()
    start, end = text.index(f"<!-- {name}:start -->"), text.index(f"<!-- {name}:end -->")
    rows = []
    for line in text[start:end].splitlines():
        if line.startswith("| `"):
            match = row.match(line)
            assert match is not None, f"malformed {name} row: {line}"
            rows.append(match.groupdict())
    return rows


ERRORS = _table("error-table-3", _ERROR_ROW)
ACCEPTED = _table("accepted-table", _ACCEPTED_ROW)


def q(x: Any) -> dict[str, Any]:
    return {"model": {"layers": {"0": {"self_attn": {"q_proj": {"weight": x}}}}}}


def _namespace() -> dict[str, Any]:
    # the error table's names (tests/test_validation.py), plus what these rows use
    return {
        **validation_namespace(),
        "aggc_optax": aggc_optax,
        "presets": presets,
        "optax": optax,
        "jax": jax,
        "P": PartitionSpec,
        "mesh": jax.make_mesh((1,), ("d",)),
        "q": q,
        "big": {"a": jnp.array([1e20, 1e20]), "b": jnp.array([1.0, 2.0])},
        "math": math,
    }


def test_tables_have_rows() -> None:
    assert len(ERRORS) >= 6 and len(ACCEPTED) >= 9


@pytest.mark.parametrize("row", ERRORS, ids=[r["expr"][:60] for r in ERRORS])
def test_error_row(row: dict[str, str]) -> None:
    expected = {"ValueError": ValueError, "TypeError": TypeError}[row["exc"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as info:
            eval(row["expr"], _namespace())
    assert type(info.value) is expected, f"{type(info.value).__name__}: {info.value}"
    assert row["msg"] in str(info.value), str(info.value)


@pytest.mark.parametrize("row", ACCEPTED, ids=[r["expr"][:60] for r in ACCEPTED])
def test_accepted_row(row: dict[str, str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert eval(row["expr"], _namespace()) is True


# ---------------------------------------------------------------------------
# By hand.


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_float8_group_is_clipped_in_float32(jit: bool) -> None:
    tx = aggc(param_labels=lambda name: "g", auto_bounds=False, max_norm=1.0)
    g = {"w": jnp.full((4,), 2.0, jnp.float8_e4m3fn)}
    out, state = (jax.jit(tx.update) if jit else tx.update)(g, tx.init(g))
    assert out["w"].dtype == jnp.float8_e4m3fn
    assert float(state.norm[0]) == pytest.approx(4.0, rel=1e-6)  # sqrt(4 * 2**2)
    # 2 * 1 / 4 = 0.5, exact in float8
    np.testing.assert_array_equal(np.asarray(out["w"], np.float32), 0.5)


def test_injected_labeler_with_static_args_works() -> None:
    # the fix the hint names
    tx = optax.inject_hyperparams(aggc, static_args=("param_labels",))(
        param_labels=aggc_optax.lora_label
    )
    p = {"m": {"q_proj": {"lora_A": jnp.ones(2)}}}
    _, state = jax.jit(tx.update)(p, tx.init(p))
    assert state.inner_state.labels == ("q_proj",)


def test_counters_saturate_at_int32_max_under_jit() -> None:
    top = 2**31 - 1
    tx = aggc(low_mult=0.9)
    state = tx.init(q(jnp.ones(4)))
    state = state._replace(
        count=jnp.asarray(top, jnp.int32),
        ema=jnp.full(1, 100.0),
        ema_count=jnp.full(1, top, jnp.int32),
        raise_count=jnp.full(1, top, jnp.int32),
    )
    _, state = jax.jit(tx.update)(q(jnp.ones(4)), state)  # norm 2 < 90: raised
    assert int(state.count) == top
    assert int(state.ema_count[0]) == top and int(state.raise_count[0]) == top


def test_labeler_error_keeps_its_type_and_names_the_leaf() -> None:
    def labeler(name: str) -> str:
        return {"x": "g"}[name]

    with pytest.raises(KeyError, match=r"for leaf 'model\.norm\.weight'") as err:
        aggc(param_labels=labeler).init({"model": {"norm": {"weight": jnp.ones(2)}}})
    assert isinstance(err.value.__cause__, KeyError)


def test_exact_label_that_is_not_a_pattern_gets_its_hyperparameters() -> None:
    # high_mult 0.5 for the group "a[b": the first step (norm 2, EMA 2) is clipped to 1
    tx = aggc(param_labels=lambda name: "a[b", group_hyperparams={"a[b": {"high_mult": 0.5}})
    g = q(jnp.ones(4))
    _, state = tx.update(g, tx.init(g))
    assert float(state.scale[0]) == pytest.approx(0.5, rel=1e-6)


def test_not_a_pattern_and_matching_nothing_still_warns() -> None:
    with pytest.warns(UserWarning, match="'a\\[b' matches no group label"):
        aggc(group_hyperparams={"a[b": {"high_mult": 0.5}}).init(q(jnp.ones(2)))


def test_none_param_with_a_label_updates() -> None:
    tx = aggc(param_labels={"a": "g", "b": "g"})
    p = {"a": jnp.array([3.0, 4.0]), "b": None}
    out, state = jax.jit(tx.update)(p, tx.init(p))
    assert out["b"] is None and float(state.norm[0]) == pytest.approx(5.0)


def test_max_down_scale_one_injected_under_jit_is_a_fault() -> None:
    # a floor of 1 never clips: at run time it is out of range, so the step is skipped
    tx = optax.inject_hyperparams(aggc)(max_down_scale=0.5)
    state = tx.init(q(jnp.ones(4)))
    _, state = jax.jit(tx.update)(q(jnp.ones(4)), state)
    state.hyperparams["max_down_scale"] = jnp.asarray(1.0)
    out, state = jax.jit(tx.update)(q(jnp.full(4, 50.0)), state)
    inner = state.inner_state
    assert int(inner.clip_down_count[0]) == 0 and int(inner.ema_count[0]) == 1
    leaf = out["model"]["layers"]["0"]["self_attn"]["q_proj"]["weight"]
    np.testing.assert_array_equal(np.asarray(leaf), 50.0)
