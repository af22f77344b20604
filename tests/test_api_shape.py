"""The narrowed API (issue 17): one param_labels dispatcher, ScaleOnly, the unlabelled
warning, a state of arrays and labels only (flax.serialization), the presets' NaN policy.

Expectations are hand computations or tests/spec_model.py's float64 model.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

import aggc_optax
from aggc_optax import ScaleOnly, aggc, from_reference_options, presets, regex_labeler
from tests.spec_model import SpecClipper, aggc_options

Q = "model.layers.0.self_attn.q_proj.weight"
MAG = "model.layers.0.self_attn.q_proj.lora_magnitude_vector"
UP = "model.layers.0.mlp.up_proj.weight"


# --------------------------------------------------------------- param_labels forms


def test_a_tuple_label_tree_is_read_as_a_label_tree() -> None:
    # the bug of issue 17: (("a", "b"),) was taken for a list of regex rules
    params = ((jnp.ones(2), jnp.full(3, 2.0)),)
    tx = aggc(param_labels=(("a", "b"),))
    state = tx.init(params)
    assert state.labels == ("a", "b")
    _, state = tx.update(params, state)
    np.testing.assert_allclose(state.norm, [math.sqrt(2), math.sqrt(12)], rtol=1e-6)
    info = aggc_optax.describe_groups(params, (("a", "b"),))
    assert info["groups"]["a"]["leaves"] == ["0.0"] and info["groups"]["b"]["leaves"] == ["0.1"]


@pytest.mark.parametrize("rules", [[("q_proj", "q")], [["q_proj", "q"]]], ids=["tuples", "json"])
def test_bare_rule_lists_get_the_regex_labeler_error(rules: list) -> None:
    params = {Q: jnp.ones(2)}
    with pytest.raises(ValueError, match=r"looks like a list of \(regex, label\) rules.*"):
        aggc(param_labels=rules).init(params)
    # the explicit form works, for rules loaded from JSON/YAML too (as tuples)
    state = aggc(param_labels=regex_labeler([tuple(r) for r in rules])).init(params)
    assert state.labels == ("q",)


def test_callable_forms_and_label_trees_all_dispatch_once() -> None:
    params = {Q: jnp.ones((2, 2)), UP: jnp.ones(3)}
    by_name = aggc(param_labels=lambda name: name.split(".")[-2]).init(params)
    by_leaf = aggc(param_labels=lambda name, leaf: "m" if leaf.ndim == 2 else "v").init(params)
    tree = aggc(param_labels={Q: "x", UP: None}).init(params)
    lora = aggc(param_labels=aggc_optax.lora_label, unlabelled="error").init(
        {"base_model.q_proj.lora_A.weight": jnp.ones(2), Q: jnp.ones(2)}
    )
    assert by_name.labels == ("up_proj", "q_proj")  # sorted dict keys: mlp before self_attn
    assert by_leaf.labels == ("v", "m")
    assert tree.labels == ("x",)
    assert lora.labels == ("q_proj",)


# --------------------------------------------------------------- the unlabelled warning


def _left_out_params() -> dict:
    return {
        "model": {"layers": {"0": {"self_attn": {"q_proj": {"weight": jnp.ones((3, 3))}}}}},
        "logit_scale": jnp.ones(()),  # no dot: no label
        "step": jnp.zeros((), jnp.int32),  # not floating point: never reported
    }


def test_the_default_rule_warns_about_left_out_float_leaves() -> None:
    with pytest.warns(UserWarning) as caught:
        aggc().init(_left_out_params())
    (message,) = [str(w.message) for w in caught]
    # 1 float leaf of 1 entry out of 11 entries in all
    assert "puts 1 floating-point leaf (9.1% of all parameters) in no group" in message
    assert "'logit_scale'" in message and "'step'" not in message
    assert "aggc_optax.describe_groups" in message and "aggc_optax.module_labels" in message
    with pytest.raises(ValueError, match="puts 1 floating-point leaf "):
        aggc(unlabelled="error").init(_left_out_params())


def test_chosen_exclusions_and_the_reference_stay_quiet() -> None:
    params = _left_out_params()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aggc(unlabelled="ignore").init(params)
        aggc(param_labels=aggc_optax.reference_label).init(params)  # a labeler: on purpose
        tree = {"model": jax.tree.map(lambda _: "q", params["model"]), "logit_scale": None}
        aggc(param_labels={**tree, "step": None}).init(params)
        from_reference_options({"enable": True, "auto_bounds": True}).init(params)
        presets.lora_sft(10, param_labels=aggc_optax.reference_label).init(params)


# --------------------------------------------------------------- ScaleOnly


def test_scale_only_leaves_are_scaled_but_not_counted_against_the_model() -> None:
    # DoRA-style: the magnitude vector follows q_proj's factor, its norm is not counted
    # float32 gradients, as the reference sees them; the model does the rest in float64
    rng = np.random.default_rng(5)
    shapes = {Q: (4, 3), MAG: (4,), UP: (5,)}
    labels = {Q: "q_proj", MAG: "q_proj", UP: "up_proj"}
    kwargs = dict(ema_beta=0.8, low_mult=0.5, high_mult=1.5, min_norm=0.0, ema_init="zero")

    def labeler(name: str) -> str | ScaleOnly:
        return ScaleOnly("q_proj") if name == MAG else labels[name]

    tx = aggc(param_labels=labeler, **kwargs)
    options = aggc_options(**kwargs)
    del options["ema_init"]
    model = SpecClipper(**options)
    state = tx.init({n: jnp.zeros(s, jnp.float32) for n, s in shapes.items()})
    update = jax.jit(tx.update)
    scaled = 0
    for t in range(12):
        level = {Q: 1.0, MAG: 1e3, UP: 2.0}  # a huge magnitude gradient, not counted
        if t in (4, 9):
            level[Q] = 40.0
        grads = {n: (rng.normal(size=s) * level[n]).astype(np.float32) for n, s in shapes.items()}
        out, state = update({n: jnp.asarray(g) for n, g in grads.items()}, state)
        want, stats = model.step(grads, labels, t, scale_only={MAG: "q_proj"})
        for name in shapes:
            np.testing.assert_allclose(np.asarray(out[name]), want[name], rtol=2e-6)
        got = aggc_optax.group_stats(state)["q_proj"]
        np.testing.assert_allclose(float(got["norm"]), stats["q_proj"]["norm"], rtol=2e-6)
        scaled += stats["q_proj"]["scale"] != 1.0
    assert scaled >= 3
    info = aggc_optax.describe_groups({n: jnp.zeros(s) for n, s in shapes.items()}, labeler)
    assert info["groups"]["q_proj"] == {"leaves": [Q], "num_params": 12, "scale_only": [MAG]}


def test_a_group_of_only_scale_only_leaves_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"\['q'\] have only ScaleOnly leaves"):
        aggc(param_labels=lambda name: ScaleOnly("q")).init({Q: jnp.ones(2)})
    with pytest.raises(TypeError, match="non-empty str"):
        ScaleOnly("")


# --------------------------------------------------------------- the state


def _stepped_state():
    params = {Q: jnp.ones((2, 2)), UP: jnp.full(3, 2.0)}
    tx = optax.chain(aggc(low_mult=0.5), optax.adam(1e-3))
    state = tx.init(params)
    for _ in range(2):
        _, state = tx.update(params, state, params)
    return tx, params, state


def test_the_state_is_arrays_and_the_group_labels() -> None:
    _, _, state = _stepped_state()
    (inner,) = aggc_optax.find_aggc_states(state)
    assert isinstance(inner.labels, aggc_optax.GroupLabels) and inner.labels == (
        "up_proj",
        "q_proj",
    )
    shapes = {x.shape for x in jax.tree.leaves(inner)}
    assert shapes == {(), (2,)}  # the count and [G] vectors: no per-leaf anything


def test_flax_serialization_round_trips_the_state() -> None:
    tx, params, state = _stepped_state()
    restored = serialization.from_bytes(tx.init(params), serialization.to_bytes(state))
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    (inner,) = aggc_optax.find_aggc_states(restored)
    assert inner.labels == ("up_proj", "q_proj")
    as_dict = serialization.to_state_dict(state)
    assert as_dict["0"]["labels"] == {"0": "up_proj", "1": "q_proj"}
    again = serialization.from_state_dict(tx.init(params), as_dict)
    jax.tree.map(np.testing.assert_array_equal, again, state)
    # a target with other groups is refused, not silently relabelled
    other = optax.chain(aggc(param_labels=lambda n: "all"), optax.adam(1e-3)).init(params)
    other_dict = serialization.to_state_dict(other)
    with pytest.raises(ValueError, match=r"saved state has the groups \['all'\]"):
        serialization.from_state_dict(tx.init(params), other_dict)


# --------------------------------------------------------------- the presets' NaN policy


def test_presets_skip_a_nan_by_default_and_reproduce_the_reference_on_request() -> None:
    params = {Q: jnp.zeros(2)}
    steps = [jnp.array([3.0, 4.0]), jnp.array([jnp.nan, 1.0]), jnp.array([30.0, 40.0])]
    results = {}
    for policy in ("default", "reference"):
        tx = presets.lora_sft(10) if policy == "default" else presets.lora_sft(10, nonfinite=policy)
        state = tx.init(params)
        for g in steps:
            _, state = tx.update({Q: g}, state)
        results[policy] = state
    # skip, by hand: EMA 0.05 * 5 = 0.25 kept through the NaN; then 50 > 0.6 * 0.25: the
    # 0.9 floor. reference: the EMA is NaN, upper = max(0, nan) = 0: never clipped again
    assert float(results["default"].ema[0]) == pytest.approx(0.95 * 0.25 + 0.05 * 45, rel=1e-6)
    assert float(results["default"].scale[0]) == pytest.approx(0.9)
    assert math.isnan(float(results["reference"].ema[0]))
    assert float(results["reference"].scale[0]) == 1.0
    assert float(results["reference"].upper[0]) == 0.0
