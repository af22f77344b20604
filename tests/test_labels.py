"""Group labels: docs/reference-behaviour.md §2 and the ways users give labels."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import aggc_optax
from aggc_optax import (
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
from tests.spec_model import SPEC_LABEL_TABLE, spec_label


@pytest.mark.parametrize(("name", "label"), SPEC_LABEL_TABLE)
def test_reference_label_spec_table(name: str, label: str | None) -> None:
    assert reference_label(name) == label
    assert spec_label(name) == label  # the test's own model agrees with the table


def test_reference_label_rejects_non_str() -> None:
    with pytest.raises(TypeError, match="name must be a str"):
        reference_label(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", "q_proj"),
        ("base_model.model.model.layers.5.mlp.down_proj.lora_B.default.weight", "down_proj"),
        ("model.layers.0.self_attn.q_proj.weight", None),  # not an adapter
        ("model.norm.weight", None),
        # DoRA: scaled with its projection's group, not counted in its norm
        ("model.layers.1.self_attn.v_proj.lora_magnitude_vector.weight", ScaleOnly("v_proj")),
        ("base_model.model.lm_head.lora_magnitude_vector.default.weight", ScaleOnly("lm_head")),
        # PEFT's embedding adapters: left out, as the authors' callback leaves them
        ("base_model.model.model.embed_tokens.lora_embedding_A.default", None),
        ("base_model.model.model.embed_tokens.lora_embedding_B.default", None),
        # Flax NNX: nnx.LoRA's lora_a/lora_b, inside an nnx.LoRALinear's `lora` submodule
        ("blocks.0.attn.query.lora.lora_a", "query"),
        ("layers.3.value.lora.lora_b", "value"),
        ("adapter.lora_a", "adapter"),  # a standalone nnx.LoRA
        ("model.layers.0.self_attn.q_proj.lora_a", "q_proj"),
        ("lora_A.weight", None),  # nothing before the adapter
        # contains lora_ but no adapter token: first known projection token, else nothing
        ("model.layers.0.mlp.up_proj.lora_extra.weight", "up_proj"),
        ("model.lora_scale", None),
    ],
)
def test_lora_label(name: str, label: str | ScaleOnly | None) -> None:
    assert lora_label(name) == label


def _q_weight() -> jax.Array:
    return jnp.arange(16.0).reshape(4, 4)


def test_nested_flat_linen_and_nnx_trees_land_in_the_same_group() -> None:
    w = _q_weight()
    nested = {"model": {"layers": {"0": {"self_attn": {"q_proj": {"weight": w}}}}}}
    flat = {"model.layers.0.self_attn.q_proj.weight": w}
    linen = {"params": {"layers_0": {"self_attn": {"q_proj": {"kernel": w}}}}}
    listy = {"model": {"layers": [{"self_attn": {"q_proj": {"weight": w}}}]}}
    for tree in (nested, flat, linen, listy):
        info = describe_groups(tree)
        assert list(info["groups"]) == ["q_proj"], tree
        assert info["unlabelled"] == []

    class Attn(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.q_proj = nnx.Linear(4, 4, rngs=rngs)
            self.input_layernorm = nnx.RMSNorm(4, rngs=rngs)

    state = nnx.state(Attn(nnx.Rngs(0)), nnx.Param)
    info = describe_groups(state)
    # NNX paths end in a `.value` attribute; it is not part of the name.
    assert sorted(info["groups"]) == ["input_layernorm", "q_proj"]
    assert info["groups"]["q_proj"]["num_params"] == 4 * 4 + 4


def test_linen_module_params_get_module_labels() -> None:
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            x = nn.Dense(4, name="up_proj")(x)
            return nn.Dense(4, name="down_proj")(x)

    params = Block().init(jax.random.key(0), jnp.ones((1, 4)))
    assert sorted(describe_groups(params)["groups"]) == ["down_proj", "up_proj"]


def test_path_name_joins_every_key_kind() -> None:
    keys = (
        jax.tree_util.DictKey("model"),
        jax.tree_util.SequenceKey(3),
        jax.tree_util.GetAttrKey("mlp"),
        jax.tree_util.FlattenedIndexKey(1),
    )
    assert path_name(keys) == "model.3.mlp.1"
    assert path_name((*keys, jax.tree_util.GetAttrKey("value"))) == "model.3.mlp.1"
    # a dict entry called "value" is a real name and stays
    assert path_name((jax.tree_util.DictKey("value"),)) == "value"


def _tree() -> dict[str, jax.Array]:
    return {
        "model.layers.0.self_attn.q_proj.weight": jnp.full((2, 2), 1.0),
        "model.layers.0.self_attn.k_proj.weight": jnp.full((2, 2), 2.0),
        "model.layers.0.mlp.up_proj.weight": jnp.full((2, 3), 3.0),
        "model.norm.weight": jnp.full((2,), 4.0),
    }


def test_callable_labelers_with_one_or_two_arguments() -> None:
    tree = _tree()
    by_name = describe_groups(tree, lambda name: "attn" if "_attn" in name else None)
    assert list(by_name["groups"]) == ["attn"]
    assert sorted(by_name["unlabelled"]) == [
        "model.layers.0.mlp.up_proj.weight",
        "model.norm.weight",
    ]

    by_shape = describe_groups(tree, lambda name, leaf: "matrix" if leaf.ndim == 2 else "vector")
    assert by_shape["groups"]["matrix"]["num_params"] == 4 + 4 + 6
    assert by_shape["groups"]["vector"]["leaves"] == ["model.norm.weight"]


def test_regex_rules_first_match_wins_and_backrefs_expand() -> None:
    rules = [(r"\.(q|k)_proj\.", r"attn_\1"), (r"norm", None), (r"proj", "other")]
    info = describe_groups(_tree(), regex_labeler(rules))
    assert sorted(info["groups"]) == ["attn_k", "attn_q", "other"]
    assert info["unlabelled"] == ["model.norm.weight"]
    fallback = regex_labeler([(r"q_proj", "q")], default=reference_label)
    assert fallback("model.layers.0.mlp.up_proj.weight") == "up_proj"


def test_label_tree_and_its_mismatch_error() -> None:
    tree = {"a": {"w": jnp.ones(2)}, "b": jnp.ones(3)}
    info = describe_groups(tree, {"a": {"w": "g1"}, "b": None})
    assert info["groups"]["g1"]["leaves"] == ["a.w"]
    assert info["unlabelled"] == ["b"]
    with pytest.raises(ValueError, match=r"'a\.w' in the parameters but 'a\.v'"):
        describe_groups(tree, {"a": {"v": "g1"}, "b": None})
    with pytest.raises(ValueError, match="2 parameter leaves but 1 labels"):
        describe_groups(tree, {"a": {"w": "g1"}})


def test_labeler_returning_a_non_string_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"returned 3 \(int\) for leaf 'b'"):
        describe_groups({"b": jnp.ones(2)}, lambda name: 3)


def test_invalid_rules_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="invalid pattern"):
        aggc_optax.aggc(param_labels=regex_labeler([("(unclosed", "x")]))
    with pytest.raises(TypeError, match="param_labels must be None"):
        aggc_optax.aggc(param_labels="q_proj")


def test_unlabelled_leaves_pass_through_bit_identical() -> None:
    rng = np.random.default_rng(0)
    grads = {
        "model.layers.0.self_attn.q_proj.weight": jnp.asarray(
            rng.normal(size=(3, 3)) * 50, jnp.float32
        ),
        "model.layers.0.residual_gate": jnp.asarray(rng.normal(size=(5,)) * 1e6, jnp.float32),
        "logit_scale": jnp.asarray(np.float32(np.nan)),
    }
    tx = aggc_optax.aggc(ema_beta=0.5, low_mult=0.5, high_mult=0.5, ema_init="zero")
    state = tx.init(grads)
    for _ in range(3):
        out, state = jax.jit(tx.update)(grads, state)
        for name in ("model.layers.0.residual_gate", "logit_scale"):
            np.testing.assert_array_equal(np.asarray(out[name]), np.asarray(grads[name]))
    assert list(aggc_optax.group_stats(state)) == ["q_proj"]
    # ...and the labelled leaf really was clipped, so the pass-through is not vacuous
    assert float(aggc_optax.group_stats(state)["q_proj"]["scale"]) < 1.0


def test_group_order_is_first_appearance_in_flattening_order() -> None:
    tree = {"b": {"up_proj": {"weight": jnp.ones(2)}}, "a": {"q_proj": {"weight": jnp.ones(2)}}}
    tx = aggc_optax.aggc()
    state = tx.init(tree)
    # jax flattens dicts in sorted key order: "a" before "b"
    assert state.labels == ("q_proj", "up_proj")
    assert optax.tree.get(state, "ema").shape == (2,)


# --------------------------------------------------------------- tree-level labelers


def _two_blocks() -> dict:
    block = {"q": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "gate": jnp.ones(())}
    return {"blocks": [block, dict(block)], "head": {"kernel": jnp.ones((2, 3))}}


def test_a_tree_labeler_gets_the_whole_tree_and_other_forms_still_work() -> None:
    params = _two_blocks()
    seen = []

    @tree_labeler
    def by_top_key(tree):
        seen.append(tree)
        return {key: jax.tree.map(lambda _, k=key: k, sub) for key, sub in tree.items()}

    assert isinstance(by_top_key, TreeLabeler) and by_top_key.__name__ == "by_top_key"
    state = aggc_optax.aggc(param_labels=by_top_key).init(params)
    assert state.labels == ("blocks", "head") and seen[0] is params
    # fn(name), fn(name, leaf), label trees and lora_label are untouched by the new form
    by_name = describe_groups(params, lambda name: name.split(".")[0])
    by_leaf = describe_groups(params, lambda name, leaf: f"rank{leaf.ndim}")
    tree = describe_groups(params, by_top_key(params))
    assert list(by_name["groups"]) == list(tree["groups"]) == ["blocks", "head"]
    assert sorted(by_leaf["groups"]) == ["rank0", "rank1", "rank2"]


def test_a_tree_labeler_whose_tree_does_not_fit_names_the_leaf() -> None:
    params = _two_blocks()
    wrong = TreeLabeler(lambda tree: {"blocks": "x", "head": {"kernel": "h"}})
    with pytest.raises(ValueError, match=r"does not match the parameters: leaf 0 is 'blocks.0"):
        describe_groups(params, wrong)
    with pytest.raises(TypeError, match="fn must be callable"):
        TreeLabeler("module_labels")  # type: ignore[arg-type]


def test_module_labels_rule_on_a_small_tree() -> None:
    labels = module_labels(_two_blocks())
    # the bias goes with its kernel; the block index becomes *; a leaf held by the
    # block itself (beside its submodules) is the block's own group
    assert labels["blocks"][1]["q"] == {"kernel": "blocks.*.q", "bias": "blocks.*.q"}
    assert labels["blocks"][0]["gate"] == "blocks.*"
    assert labels["head"]["kernel"] == "head"
    # the labels are a function of the paths: flat dotted keys give the same
    flat = {"blocks.0.q.kernel": 1.0, "blocks.1.q.kernel": 1.0, "head.kernel": 1.0}
    assert module_labels(flat) == {
        "blocks.0.q.kernel": "blocks.*.q",
        "blocks.1.q.kernel": "blocks.*.q",
        "head.kernel": "head",
    }


def test_module_labels_leaves_non_float_leaves_out_quietly() -> None:
    params = {
        "layers": [{"w": jnp.ones(2)}, {"w": jnp.ones(2)}],
        "step": jnp.zeros((), jnp.int32),
        "mask": jnp.ones(2, bool),
        "logit_scale": jnp.ones(()),
    }
    labels = module_labels(params)
    assert labels["step"] is None and labels["mask"] is None
    # a list of single arrays-holding layers: one group per layer; a root leaf: its own
    assert [labels["layers"][i]["w"] for i in range(2)] == ["layers.0", "layers.1"]
    assert labels["logit_scale"] == "logit_scale"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = aggc_optax.aggc(param_labels=module_labels).init(params)
    assert state.labels == ("layers.0", "layers.1", "logit_scale")


@pytest.mark.parametrize(
    ("names", "want"),
    [
        # Linen auto-names: a family of blocks (two or more) merges, modules keep their index
        (
            ["Block_0.Dense_0.kernel", "Block_1.Dense_0.kernel", "Block_1.Dense_1.kernel"],
            ["Block_*.Dense_0", "Block_*.Dense_0", "Block_*.Dense_1"],
        ),
        # a single auto-named wrapper keeps its name
        (
            ["Encoder_0.Dense_0.kernel", "Encoder_0.Dense_1.kernel"],
            ["Encoder_0.Dense_0", "Encoder_0.Dense_1"],
        ),
        # setup lists of dicts: layers_N_key
        (
            ["layers_0_q_proj.kernel", "layers_1_q_proj.kernel", "layers_1_o_proj.kernel"],
            ["layers_*_q_proj", "layers_*_q_proj", "layers_1_o_proj"],
        ),
        # names that only look indexed: conv_1_1 is no list member
        (
            ["conv_1_1.kernel", "conv_1_2.kernel", "conv_2_1.kernel"],
            ["conv_1_1", "conv_1_2", "conv_2_1"],
        ),
        # nested repeated blocks: both indices become *
        (
            ["stages.0.blocks.0.conv.w", "stages.1.blocks.2.conv.w"],
            ["stages.*.blocks.*.conv", "stages.*.blocks.*.conv"],
        ),
    ],
)
def test_module_labels_index_forms(names: list[str], want: list[str]) -> None:
    labels = module_labels({name: jnp.ones(1) for name in names})
    assert [labels[name] for name in names] == want
