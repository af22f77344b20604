"""module_labels (and the family-specific rules) on real model objects of every JAX family.

Each test builds a real model (Flax NNX, Flax Linen, Equinox) or the exact
parameter names of a Hugging Face checkpoint, and asserts the complete set of
groups, worked out by hand from the module tree, and that no floating-point
leaf is left out.
"""

from __future__ import annotations

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import aggc_optax
from aggc_optax import describe_groups, module_labels

D, V = 8, 16  # model width, vocabulary


def _groups(params, labels=module_labels) -> dict[str, list[str]]:
    info = describe_groups(params, labels)
    return {label: entry["leaves"] for label, entry in info["groups"].items()}


def _all_floating_leaves_labelled(params) -> None:
    info = describe_groups(params, module_labels)
    assert info["unlabelled"] == []
    counted = sum(entry["num_params"] for entry in info["groups"].values())
    assert counted == sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))


def _block_wise(prefix: str, roles: list[str]) -> set[str]:
    return {f"{prefix}.{role}" for role in roles}


# ------------------------------------------------------------------------- Flax NNX


class NNXBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.ln1 = nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=2, in_features=D, qkv_features=D, decode=False, rngs=rngs
        )
        self.ln2 = nnx.LayerNorm(D, rngs=rngs)
        self.mlp = nnx.Sequential(
            nnx.Linear(D, 4 * D, rngs=rngs), nnx.gelu, nnx.Linear(4 * D, D, rngs=rngs)
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class NNXTransformer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, num_blocks: int = 2) -> None:
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.blocks = nnx.List([NNXBlock(rngs) for _ in range(num_blocks)])
        self.ln_f = nnx.LayerNorm(D, rngs=rngs)
        self.lm_head = nnx.Linear(D, V, use_bias=False, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


NNX_BLOCK_ROLES = [
    "ln1",
    "attn.query",
    "attn.key",
    "attn.value",
    "attn.out",
    "ln2",
    "mlp.layers.0",  # the two Linears of the nnx.Sequential stay apart
    "mlp.layers.2",
]


def test_nnx_transformer_with_sequential_mlp_and_list_of_blocks() -> None:
    state = nnx.state(NNXTransformer(nnx.Rngs(0)), nnx.Param)
    groups = _groups(state)
    want = {"embed", "ln_f", "lm_head"} | _block_wise("blocks.*", NNX_BLOCK_ROLES)
    assert set(groups) == want and len(groups) == 11
    assert groups["blocks.*.attn.query"] == [
        "blocks.0.attn.query.bias",
        "blocks.0.attn.query.kernel",
        "blocks.1.attn.query.bias",
        "blocks.1.attn.query.kernel",
    ]
    assert groups["blocks.*.mlp.layers.2"] == [
        "blocks.0.mlp.layers.2.bias",
        "blocks.0.mlp.layers.2.kernel",
        "blocks.1.mlp.layers.2.bias",
        "blocks.1.mlp.layers.2.kernel",
    ]
    assert groups["embed"] == ["embed.embedding"] and groups["lm_head"] == ["lm_head.kernel"]
    _all_floating_leaves_labelled(state)


def test_nnx_default_rule_leaves_the_sequential_mlp_out_and_warns() -> None:
    # the finding, kept as a regression: the reference's rule cannot see
    # `layers.0.kernel`, and aggc() says so at init instead of skipping it silently
    state = nnx.state(NNXTransformer(nnx.Rngs(0)), nnx.Param)
    left_out = describe_groups(state)["unlabelled"]
    assert len(left_out) == 8 and all(".mlp.layers." in name for name in left_out)
    with pytest.warns(UserWarning, match=r"puts 8 floating-point leaves .* no group"):
        aggc_optax.aggc().init(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aggc_optax.aggc(param_labels=module_labels).init(state)


def test_nnx_scanned_stacked_blocks_are_one_module_each() -> None:
    num_layers = 3

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def stacked(rngs: nnx.Rngs) -> NNXBlock:
        return NNXBlock(rngs)

    class Scanned(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.embed = nnx.Embed(V, D, rngs=rngs)
            self.layers = stacked(rngs)

    state = nnx.state(Scanned(nnx.Rngs(0)), nnx.Param)
    assert state["layers"]["ln1"]["scale"].get_value().shape == (num_layers, D)
    groups = _groups(state)
    assert set(groups) == {"embed"} | _block_wise("layers", NNX_BLOCK_ROLES)
    assert groups["layers.attn.out"] == ["layers.attn.out.bias", "layers.attn.out.kernel"]
    _all_floating_leaves_labelled(state)


class NNXLoRAAttention(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.query = nnx.LoRALinear(D, D, lora_rank=2, rngs=rngs)
        self.key = nnx.Linear(D, D, rngs=rngs)
        self.value = nnx.LoRALinear(D, D, lora_rank=2, rngs=rngs)


class NNXLoRAModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.blocks = nnx.List([NNXLoRAAttention(rngs) for _ in range(2)])
        self.adapter = nnx.LoRA(D, 2, V, rngs=rngs)  # a standalone nnx.LoRA


def test_nnx_lora_linear_and_lora() -> None:
    model = NNXLoRAModel(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)  # LoRAParam is a Param: base and adapters
    assert set(_groups(params)) == {
        "adapter",  # lora_a with lora_b
        "blocks.*.query",  # the LoRALinear's own kernel and bias
        "blocks.*.query.lora",  # its adapter
        "blocks.*.key",
        "blocks.*.value",
        "blocks.*.value.lora",
    }
    _all_floating_leaves_labelled(params)

    adapters = nnx.state(model, nnx.LoRAParam)
    # the finding: the reference's rule puts every adapter in one `lora` group
    assert set(_groups(adapters, None)) == {"lora", "adapter"}
    by_lora = _groups(adapters, aggc_optax.lora_label)
    assert set(by_lora) == {"adapter", "query", "value"}
    assert by_lora["query"] == [
        "blocks.0.query.lora.lora_a",
        "blocks.0.query.lora.lora_b",
        "blocks.1.query.lora.lora_a",
        "blocks.1.query.lora.lora_b",
    ]
    assert set(_groups(adapters)) == {"adapter", "blocks.*.query.lora", "blocks.*.value.lora"}


# ------------------------------------------------------------------------ Flax Linen


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + nn.MultiHeadDotProductAttention(num_heads=2)(nn.LayerNorm()(x))
        h = nn.Dense(4 * D)(nn.LayerNorm()(x))
        return x + nn.Dense(D)(nn.gelu(h))


class LinenCompact(nn.Module):
    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = nn.Embed(V, D)(tokens)
        for _ in range(3):
            x = LinenBlock()(x)
        return nn.Dense(V)(nn.LayerNorm()(x))


LINEN_BLOCK_ROLES = [
    "LayerNorm_0",
    "LayerNorm_1",
    "MultiHeadDotProductAttention_0.query",
    "MultiHeadDotProductAttention_0.key",
    "MultiHeadDotProductAttention_0.value",
    "MultiHeadDotProductAttention_0.out",
    "Dense_0",
    "Dense_1",
]


def _tokens() -> jax.Array:
    return jnp.zeros((1, 4), jnp.int32)


def test_linen_compact_auto_names() -> None:
    params = LinenCompact().init(jax.random.key(0), _tokens())
    groups = _groups(params)
    assert set(groups) == {
        "params.Embed_0",
        "params.LayerNorm_0",
        "params.Dense_0",  # the LM head: its own group, not the blocks' first Dense
    } | _block_wise("params.LinenBlock_*", LINEN_BLOCK_ROLES)
    assert groups["params.Dense_0"] == ["params.Dense_0.bias", "params.Dense_0.kernel"]
    assert len(groups["params.LinenBlock_*.Dense_0"]) == 6  # 3 blocks x (kernel, bias)
    _all_floating_leaves_labelled(params)
    # the finding: the reference's rule merges the head with every block's Dense_0
    assert len(_groups(params, None)["Dense_0"]) == 8


class LinenSetupBlock(nn.Module):
    def setup(self) -> None:
        self.norms = [nn.LayerNorm(), nn.LayerNorm()]  # a setup list of single modules
        self.up = nn.Dense(4 * D)
        self.down = nn.Dense(D)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.down(nn.gelu(self.up(self.norms[1](self.norms[0](x)))))


class LinenSetup(nn.Module):
    def setup(self) -> None:
        self.attn = [{"q_proj": nn.Dense(D), "o_proj": nn.Dense(D)} for _ in range(2)]
        self.blocks = [LinenSetupBlock() for _ in range(2)]

    def __call__(self, x: jax.Array) -> jax.Array:
        for attn, block in zip(self.attn, self.blocks):
            x = block(attn["o_proj"](attn["q_proj"](x)))
        return x


def test_linen_setup_lists() -> None:
    params = LinenSetup().init(jax.random.key(0), jnp.ones((1, D)))
    assert "attn_0_q_proj" in params["params"] and "blocks_1" in params["params"]
    groups = _groups(params)
    assert set(groups) == {
        "params.attn_*_q_proj",  # the layers_0_q_proj case: per role, not per layer
        "params.attn_*_o_proj",
        "params.blocks_*.norms_0",  # distinct modules of a block keep their index
        "params.blocks_*.norms_1",
        "params.blocks_*.up",
        "params.blocks_*.down",
    }
    assert groups["params.attn_*_q_proj"] == [
        "params.attn_0_q_proj.bias",
        "params.attn_0_q_proj.kernel",
        "params.attn_1_q_proj.bias",
        "params.attn_1_q_proj.kernel",
    ]
    _all_floating_leaves_labelled(params)


class LinenScanBody(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, _: None) -> tuple[jax.Array, None]:
        h = nn.Dense(4 * D)(nn.LayerNorm()(x))
        return x + nn.Dense(D)(nn.gelu(h)), None


class LinenScanned(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        stack = nn.scan(
            LinenScanBody, variable_axes={"params": 0}, split_rngs={"params": True}, length=4
        )
        x, _ = stack(name="layers")(x, None)
        return nn.Dense(V, name="head")(x)


def test_linen_nn_scan_stacked_layers() -> None:
    params = LinenScanned().init(jax.random.key(0), jnp.ones((1, D)))
    assert params["params"]["layers"]["Dense_0"]["kernel"].shape == (4, D, 4 * D)
    groups = _groups(params)
    assert set(groups) == {
        "params.head",
        "params.layers.Dense_0",
        "params.layers.Dense_1",
        "params.layers.LayerNorm_0",
    }
    _all_floating_leaves_labelled(params)


# -------------------------------------------------------------------------- Equinox


def _arrays(module: eqx.Module):
    return eqx.filter(module, eqx.is_inexact_array)


def test_equinox_mlp() -> None:
    mlp = eqx.nn.MLP(D, V, 4 * D, depth=3, key=jax.random.key(0))
    groups = _groups(_arrays(mlp))
    assert groups == {f"layers.{i}": [f"layers.{i}.weight", f"layers.{i}.bias"] for i in range(4)}
    # unfiltered, the activation functions are leaves too: never labelled
    labels = module_labels(mlp)
    assert labels.activation is None and labels.layers[3].bias == "layers.3"


def test_equinox_multihead_attention() -> None:
    mha = eqx.nn.MultiheadAttention(2, D, use_query_bias=True, key=jax.random.key(0))
    groups = _groups(_arrays(mha))
    assert groups == {
        "query_proj": ["query_proj.weight", "query_proj.bias"],
        "key_proj": ["key_proj.weight"],
        "value_proj": ["value_proj.weight"],
        "output_proj": ["output_proj.weight"],
    }


class EqxBlock(eqx.Module):
    ln1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    ln2: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP

    def __init__(self, key: jax.Array) -> None:
        k1, k2 = jax.random.split(key)
        self.ln1 = eqx.nn.LayerNorm(D)
        self.attn = eqx.nn.MultiheadAttention(2, D, key=k1)
        self.ln2 = eqx.nn.LayerNorm(D)
        self.mlp = eqx.nn.MLP(D, D, 4 * D, depth=1, key=k2)


class EqxTransformer(eqx.Module):
    embed: eqx.nn.Embedding
    blocks: list[EqxBlock]
    ln_f: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, key: jax.Array, num_blocks: int = 3) -> None:
        keys = jax.random.split(key, num_blocks + 2)
        self.embed = eqx.nn.Embedding(V, D, key=keys[0])
        self.blocks = [EqxBlock(k) for k in keys[2:]]
        self.ln_f = eqx.nn.LayerNorm(D)
        self.head = eqx.nn.Linear(D, V, use_bias=False, key=keys[1])


def test_equinox_custom_transformer() -> None:
    params = _arrays(EqxTransformer(jax.random.key(0)))
    groups = _groups(params)
    roles = [
        "ln1",
        "attn.query_proj",
        "attn.key_proj",
        "attn.value_proj",
        "attn.output_proj",
        "ln2",
        "mlp.layers.0",
        "mlp.layers.1",
    ]
    assert set(groups) == {"embed", "ln_f", "head"} | _block_wise("blocks.*", roles)
    assert groups["blocks.*.ln2"] == [
        f"blocks.{i}.ln2.{leaf}" for i in range(3) for leaf in ("weight", "bias")
    ]
    assert groups["embed"] == ["embed.weight"]
    _all_floating_leaves_labelled(params)


# --------------------------------------------------- Hugging Face names (plain dicts)


def _tree(names: list[str]) -> dict:
    """A nested dict tree with one small array per dotted name, as a converted checkpoint."""
    tree: dict = {}
    for name in names:
        *parents, leaf = name.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = jnp.zeros(2)
    return tree


def _llama_names(num_layers: int = 2) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(num_layers):
        p = f"model.layers.{i}"
        names += [f"{p}.self_attn.{m}.weight" for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [f"{p}.mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")]
        names += [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"]
    return names


def test_hf_llama_names_nested_and_flat() -> None:
    names = _llama_names()
    layer = "model.layers.*"
    want = {"model.embed_tokens", "model.norm", "lm_head"} | _block_wise(
        layer,
        [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
            "input_layernorm",
            "post_attention_layernorm",
        ],
    )
    nested = _groups(_tree(names))
    flat = _groups({name: jnp.zeros(2) for name in names})
    assert set(nested) == want and len(want) == 12
    assert nested == flat  # dotted keys and nested dicts: one rule
    assert nested[f"{layer}.self_attn.q_proj"] == [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
    ]
    # the same partition as the reference's own token rule, for the names it was written for
    by_reference = _groups(_tree(names), None)
    assert sorted(map(sorted, by_reference.values())) == sorted(map(sorted, nested.values()))


def test_hf_gpt2_names_keep_attention_and_mlp_c_proj_apart() -> None:
    names = ["transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"]
    names += ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    for i in range(3):
        p = f"transformer.h.{i}"
        for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            names += [f"{p}.{m}.weight", f"{p}.{m}.bias"]
    groups = _groups(_tree(names))
    roles = ["ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"]
    assert set(groups) == {
        "transformer.wte",
        "transformer.wpe",
        "transformer.ln_f",
        "lm_head",
    } | _block_wise("transformer.h.*", roles)
    assert len(groups["transformer.h.*.mlp.c_proj"]) == 6
    # the reference's token rule merges the two c_proj of every block
    assert len(_groups(_tree(names), None)["c_proj"]) == 12


def test_hf_bert_names_keep_every_dense_and_layernorm_apart() -> None:
    e = "bert.embeddings"
    names = [f"{e}.{m}.weight" for m in ("word_embeddings", "position_embeddings")]
    names += [f"{e}.token_type_embeddings.weight", f"{e}.LayerNorm.weight", f"{e}.LayerNorm.bias"]
    roles = [
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "attention.output.LayerNorm",
        "intermediate.dense",
        "output.dense",
        "output.LayerNorm",
    ]
    for i in range(12):
        names += [f"bert.encoder.layer.{i}.{m}.{w}" for m in roles for w in ("weight", "bias")]
    names += ["bert.pooler.dense.weight", "bert.pooler.dense.bias"]
    head = "cls.predictions"
    names += [f"{head}.transform.dense.weight", f"{head}.transform.LayerNorm.weight"]
    names += [f"{head}.bias"]  # beside the `transform` submodule: the head's own group
    groups = _groups(_tree(names))
    assert set(groups) == {
        f"{e}.word_embeddings",
        f"{e}.position_embeddings",
        f"{e}.token_type_embeddings",
        f"{e}.LayerNorm",
        "bert.pooler.dense",
        f"{head}.transform.dense",
        f"{head}.transform.LayerNorm",
        head,
    } | _block_wise("bert.encoder.layer.*", roles)
    assert len(groups["bert.encoder.layer.*.intermediate.dense"]) == 24
    # the finding: the reference's rule puts four kinds of dense in one group
    assert len(_groups(_tree(names), None)["dense"]) == 12 * 3 * 2 + 2 + 1


def test_hf_mixtral_names_put_all_experts_of_a_role_together() -> None:
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(2):
        p = f"model.layers.{i}"
        names += [f"{p}.self_attn.{m}.weight" for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [f"{p}.block_sparse_moe.gate.weight"]
        for j in range(4):
            names += [f"{p}.block_sparse_moe.experts.{j}.{w}.weight" for w in ("w1", "w2", "w3")]
        names += [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"]
    groups = _groups(_tree(names))
    moe = "model.layers.*.block_sparse_moe"
    assert set(groups) == {
        "model.embed_tokens",
        "model.norm",
        "lm_head",
        f"{moe}.gate",  # the router
        f"{moe}.experts.*.w1",
        f"{moe}.experts.*.w2",
        f"{moe}.experts.*.w3",
    } | _block_wise(
        "model.layers.*",
        [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "input_layernorm",
            "post_attention_layernorm",
        ],
    )
    assert len(groups[f"{moe}.experts.*.w2"]) == 2 * 4
    # the reference's rule agrees on the experts (w2 of every expert) but gives the
    # router the group `gate`
    assert sorted(_groups(_tree(names), None)["w2"]) == sorted(groups[f"{moe}.experts.*.w2"])


# --------------------------------------------------------------- inside a training step


def test_aggc_with_module_labels_under_jit_on_an_nnx_transformer() -> None:
    model = NNXTransformer(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.chain(aggc_optax.aggc(param_labels=module_labels), optax.sgd(1e-2))
    opt_state = tx.init(params)
    tokens = jnp.arange(8, dtype=jnp.int32).reshape(2, 4) % V

    def loss_fn(p: nnx.State) -> jax.Array:
        logits = nnx.merge(graphdef, p)(tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()

    @jax.jit
    def train_step(p, s):
        grads = jax.grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, grads

    params, opt_state, grads = train_step(params, opt_state)
    (state,) = aggc_optax.find_aggc_states(opt_state)
    info = describe_groups(params, module_labels)
    assert state.labels == tuple(info["groups"])
    # each group's norm is that of its leaves' gradients together (hand computation)
    flat = {
        aggc_optax.path_name(path): np.asarray(g, np.float64)
        for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]
    }
    want = [
        np.sqrt(sum(np.sum(flat[n] ** 2) for n in entry["leaves"]))
        for entry in info["groups"].values()
    ]
    np.testing.assert_allclose(np.asarray(state.norm), want, rtol=1e-5)
    assert np.all(np.asarray(state.norm) > 0)
    params, opt_state, _ = train_step(params, opt_state)  # the second step reuses the trace
    assert int(aggc_optax.find_aggc_states(opt_state)[0].count) == 2
