"""describe_groups: which leaves form which group, their sizes, and what is left out.

Expected groups are written out by hand from docs/reference-behaviour.md §2 (and section 10 for
LoRA); group order is the order of first appearance in jax's flattening order
(dict keys sorted), which the expectations spell out.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import aggc_optax


def test_nested_llama_tree_groups_leaves_and_sizes():
    params = {
        "model": {
            "embed_tokens": {"weight": jnp.zeros((10, 4))},
            "layers": {
                "0": {
                    "self_attn": {
                        "q_proj": {"weight": jnp.zeros((4, 4)), "bias": jnp.zeros(4)},
                        "v_proj": {"weight": jnp.zeros((4, 4))},
                    },
                    "input_layernorm": {"weight": jnp.zeros(4)},
                    "residual_gate": jnp.zeros(()),
                },
                "1": {
                    "self_attn": {
                        "q_proj": {"weight": jnp.zeros((4, 4)), "bias": jnp.zeros(4)},
                        "v_proj": {"weight": jnp.zeros((4, 4))},
                    },
                    "input_layernorm": {"weight": jnp.zeros(4)},
                    "residual_gate": jnp.zeros(()),
                },
            },
            "norm": {"weight": jnp.zeros(4)},
        },
        "lm_head": {"weight": jnp.zeros((4, 10))},
        "logit_scale": jnp.zeros(()),
    }
    info = aggc_optax.describe_groups(params)
    # Flattening order: lm_head, logit_scale, model.embed_tokens, model.layers.0.(input_layernorm,
    # residual_gate, self_attn.q_proj.(bias, weight), self_attn.v_proj), model.layers.1..., norm.
    assert list(info["groups"]) == [
        "lm_head",
        "embed_tokens",
        "input_layernorm",
        "q_proj",
        "v_proj",
        "norm",
    ]
    assert info["groups"]["q_proj"] == {
        "leaves": [
            "model.layers.0.self_attn.q_proj.bias",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.self_attn.q_proj.bias",
            "model.layers.1.self_attn.q_proj.weight",
        ],
        "num_params": 2 * (16 + 4),
    }
    assert info["groups"]["lm_head"] == {"leaves": ["lm_head.weight"], "num_params": 40}
    assert info["groups"]["embed_tokens"]["num_params"] == 40
    assert info["groups"]["input_layernorm"]["num_params"] == 8
    assert info["groups"]["v_proj"]["num_params"] == 32
    assert info["groups"]["norm"] == {"leaves": ["model.norm.weight"], "num_params": 4}
    # `logit_scale` has no dot; `residual_gate`'s second-to-last token is a layer index.
    assert info["unlabelled"] == [
        "logit_scale",
        "model.layers.0.residual_gate",
        "model.layers.1.residual_gate",
    ]


def test_flat_torch_names_match_named_parameters_rules():
    params = {
        "transformer.h.0.attn.c_proj.weight": np.zeros((3, 3)),
        "transformer.h.0.mlp.c_proj.weight": np.zeros((3, 5)),
        "transformer.wte.weight": np.zeros((7, 3)),
        "model.layers.0.block_sparse_moe.experts.7.w2.weight": np.zeros((2, 2)),
        "model.layers.0.block_sparse_moe.experts.3.w2.weight": np.zeros((2, 2)),
        "model.layers.weight": np.zeros(2),
    }
    info = aggc_optax.describe_groups(params)
    # Sorted keys: model.layers.0...experts.3, ...experts.7, model.layers.weight,
    # transformer.h.0.attn..., transformer.h.0.mlp..., transformer.wte.weight.
    assert list(info["groups"]) == ["w2", "c_proj", "wte"]
    assert info["groups"]["w2"]["num_params"] == 8
    assert info["groups"]["c_proj"]["leaves"] == [
        "transformer.h.0.attn.c_proj.weight",
        "transformer.h.0.mlp.c_proj.weight",
    ]
    assert info["groups"]["c_proj"]["num_params"] == 9 + 15
    assert info["unlabelled"] == ["model.layers.weight"]


def test_sizes_of_scalar_and_empty_leaves():
    info = aggc_optax.describe_groups(
        {"a": {"scale": jnp.zeros(())}, "b": {"empty": jnp.zeros((0, 3))}}
    )
    assert info["groups"]["a"]["num_params"] == 1
    assert info["groups"]["b"]["num_params"] == 0


def test_empty_tree():
    assert aggc_optax.describe_groups({}) == {"groups": {}, "unlabelled": []}


def test_custom_labels_callable_rules_and_tree():
    params = {
        "layers": {
            "0": {"attn": {"wq": jnp.zeros((2, 2)), "wk": jnp.zeros((2, 2))}},
            "1": {"attn": {"wq": jnp.zeros((2, 2)), "wk": jnp.zeros((2, 2))}},
        },
        "head": jnp.zeros((2, 3)),
    }

    def by_last_token(name):
        return None if name == "head" else name.rsplit(".", 1)[-1]

    info = aggc_optax.describe_groups(params, by_last_token)
    assert list(info["groups"]) == ["wk", "wq"]
    assert info["groups"]["wq"]["leaves"] == ["layers.0.attn.wq", "layers.1.attn.wq"]
    assert info["unlabelled"] == ["head"]

    # A two-argument labeler also sees the leaf (here: group by rank).
    info = aggc_optax.describe_groups(params, lambda name, leaf: f"rank{np.ndim(leaf)}")
    assert info["groups"]["rank2"]["num_params"] == 4 * 4 + 6

    rules = [(r"\.w(q|k)$", r"attn_\1"), (r"^head$", None)]
    info = aggc_optax.describe_groups(params, aggc_optax.regex_labeler(rules))
    assert list(info["groups"]) == ["attn_k", "attn_q"]
    assert info["unlabelled"] == ["head"]

    tree = {
        "layers": {
            "0": {"attn": {"wq": "attn", "wk": "attn"}},
            "1": {"attn": {"wq": "attn", "wk": None}},
        },
        "head": "head",
    }
    info = aggc_optax.describe_groups(params, tree)
    assert list(info["groups"]) == ["head", "attn"]
    assert info["groups"]["attn"]["num_params"] == 12
    assert info["unlabelled"] == ["layers.1.attn.wk"]


def test_label_tree_that_does_not_match_names_the_leaf():
    params = {"a": {"w": jnp.zeros(2)}, "b": {"w": jnp.zeros(2)}}
    with pytest.raises(ValueError, match=r"'b\.w'"):
        aggc_optax.describe_groups(params, {"a": {"w": "x"}, "c": {"w": "y"}})
    with pytest.raises(ValueError, match="2 parameter leaves but 1 labels"):
        aggc_optax.describe_groups(params, {"a": {"w": "x"}})
    with pytest.raises(TypeError, match="must be a str, a ScaleOnly or None"):
        aggc_optax.describe_groups(params, lambda name: 3)


def test_lora_rule_keeps_only_adapters():
    prefix = "base_model.model.model.layers"
    params = {
        f"{prefix}.0.self_attn.q_proj.base_layer.weight": np.zeros((8, 8)),
        f"{prefix}.0.self_attn.q_proj.lora_A.default.weight": np.zeros((2, 8)),
        f"{prefix}.0.self_attn.q_proj.lora_B.default.weight": np.zeros((8, 2)),
        f"{prefix}.1.self_attn.q_proj.lora_A.default.weight": np.zeros((2, 8)),
        f"{prefix}.0.mlp.up_proj.lora_A.default.weight": np.zeros((2, 8)),
        f"{prefix}.0.input_layernorm.weight": np.zeros(8),
    }
    info = aggc_optax.describe_groups(params, aggc_optax.lora_label)
    assert list(info["groups"]) == ["up_proj", "q_proj"]
    assert info["groups"]["q_proj"]["num_params"] == 16 + 16 + 16
    assert sorted(info["unlabelled"]) == [
        f"{prefix}.0.input_layernorm.weight",
        f"{prefix}.0.self_attn.q_proj.base_layer.weight",
    ]


class _Block(nnx.Module):
    def __init__(self, rngs):
        self.q_proj = nnx.Linear(4, 4, rngs=rngs)
        self.input_layernorm = nnx.RMSNorm(4, rngs=rngs)


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([_Block(rngs), _Block(rngs)])
        self.lm_head = nnx.Linear(4, 3, use_bias=False, rngs=rngs)


def test_flax_nnx_state_names_drop_value_attribute():
    _, params = nnx.split(_Net(nnx.Rngs(0)), nnx.Param)
    info = aggc_optax.describe_groups(params)
    assert info["groups"]["q_proj"]["leaves"] == [
        "layers.0.q_proj.bias",
        "layers.0.q_proj.kernel",
        "layers.1.q_proj.bias",
        "layers.1.q_proj.kernel",
    ]
    assert info["groups"]["q_proj"]["num_params"] == 2 * (16 + 4)
    assert info["groups"]["input_layernorm"]["num_params"] == 8
    assert info["groups"]["lm_head"] == {"leaves": ["lm_head.kernel"], "num_params": 12}
    assert info["unlabelled"] == []


def test_flax_linen_params():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(4, name="up_proj")(x)
            return nn.Dense(2, name="down_proj")(x)

    variables = Block().init(jax.random.key(0), jnp.zeros((1, 3)))
    info = aggc_optax.describe_groups(variables)
    assert list(info["groups"]) == ["down_proj", "up_proj"]
    assert info["groups"]["up_proj"] == {
        "leaves": ["params.up_proj.bias", "params.up_proj.kernel"],
        "num_params": 4 + 12,
    }
    assert info["groups"]["down_proj"]["num_params"] == 2 + 8


def test_group_order_matches_the_transformation_state():
    # What describe_groups shows is what aggc() will use: same groups, same order.
    params = {
        "model": {
            "layers": {"0": {"mlp": {"up_proj": {"weight": jnp.ones((2, 2))}}}},
            "embed_tokens": {"weight": jnp.ones((3, 2))},
        },
        "lm_head": {"weight": jnp.ones((2, 3))},
    }
    state = aggc_optax.aggc().init(params)
    assert tuple(aggc_optax.describe_groups(params)["groups"]) == state.labels
    rules = aggc_optax.regex_labeler([(r"proj", "proj"), (r".*", "rest")])
    state = optax.chain(aggc_optax.aggc(param_labels=rules)).init(params)
    assert tuple(aggc_optax.describe_groups(params, rules)["groups"]) == (
        aggc_optax.find_aggc_states(state)[0].labels
    )
