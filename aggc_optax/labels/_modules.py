"""``module_labels``: one group per module role, read from the parameter tree's structure.

The reference's rule (:func:`~aggc_optax.reference_label`) knows Hugging Face
LLaMA-style tokens. This labeler knows none: it finds the modules of any pytree
(the nodes that hold arrays), finds the repeated blocks they sit in (indexed
containers) and gives the same module of every block one label.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp

from aggc_optax.labels._rules import path_name, tree_labeler

# The marker that stands for "any block index" in a label.
BLOCK = "*"

# Linen names list members `attr_N` (setup lists) and auto-names compact submodules
# `ClassName_N`; a list of dicts of modules gives `attr_N_key`. The stem must end in a
# non-digit so that names like `conv_1_1` are not read as indexed.
_TRAILING = re.compile(r"^(?P<stem>.*[^\d_])_(?P<index>\d+)$")
_MIDDLE = re.compile(r"^(?P<stem>.*?[^\d_])_(?P<index>\d+)_(?P<rest>[^\d].*)$")


class _Node:
    """A node of the trie of dotted names: children by component, and whether a leaf ends here."""

    __slots__ = ("children", "is_leaf")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.is_leaf = False

    def holds_only_leaves(self) -> bool:
        return all(not child.children for child in self.children.values())


def _is_floating(leaf: Any) -> bool:
    """Whether a leaf is a parameter worth a group: floating point, or shaped without a dtype.

    Integer and boolean arrays (step counters, masks), and non-array leaves such
    as the activation functions of an unfiltered Equinox module, get no label.
    """
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None:
        try:
            return bool(jnp.issubdtype(dtype, jnp.floating))
        except TypeError:  # not a numpy-like dtype
            return False
    if isinstance(leaf, bool):
        return False
    return isinstance(leaf, float) or hasattr(leaf, "shape")


def _family_sizes(node: _Node) -> dict[tuple[str, str], int]:
    """How many distinct indices each Linen-style indexed name family has among the children.

    A family is ``(stem, rest)`` for ``stem_N_rest`` and ``(stem, "")`` for ``stem_N``.
    """
    indices: dict[tuple[str, str], set[str]] = {}
    for name in node.children:
        match = _MIDDLE.match(name)
        if match:
            key = (match["stem"], "_" + match["rest"])
        else:
            match = _TRAILING.match(name)
            if not match:
                continue
            key = (match["stem"], "")
        indices.setdefault(key, set()).add(match["index"])
    return {key: len(found) for key, found in indices.items()}


def _generalise(component: str, parent: _Node, node: _Node) -> str:
    """The component with a block index replaced by ``*`` where it marks a repeated block.

    ``parent`` is the trie node holding ``component``, ``node`` the one it names.
    An indexed node that holds only arrays is a module (eqx.nn.MLP's
    ``layers.0``, Linen's ``Dense_1``) and keeps its index; one that contains
    submodules is a block.
    """
    is_module = node.holds_only_leaves()
    if component.isdigit():
        return component if is_module else BLOCK
    match = _MIDDLE.match(component)
    if match and _family_sizes(parent).get((match["stem"], "_" + match["rest"]), 0) >= 2:
        # layers_0_q_proj, layers_1_q_proj: one module of each member of a setup list
        return f"{match['stem']}_{BLOCK}_{match['rest']}"
    match = _TRAILING.match(component)
    if match and not is_module and _family_sizes(parent).get((match["stem"], ""), 0) >= 2:
        # Block_0 ... Block_3: repeated blocks (Dense_0 next to Dense_1 holds arrays:
        # a distinct module)
        return f"{match['stem']}_{BLOCK}"
    return component


def _label(parts: list[str], root: _Node) -> str:
    # the module is the node directly above the leaf; a leaf at the root is its own
    module = parts if len(parts) <= 1 else parts[:-1]
    out = []
    node = root
    for component in module:
        parent, node = node, node.children[component]
        out.append(_generalise(component, parent, node))
    return ".".join(out) if out else "<root>"


@tree_labeler
def module_labels(params: Any) -> Any:
    """Labels every floating-point leaf by its module role across the repeated blocks of the tree.

    A labeler of the whole tree: pass it as ``param_labels=aggc_optax.module_labels``
    (or to :func:`~aggc_optax.describe_groups`), or call it on the parameters to
    get a label tree you can inspect and edit before passing it on. It looks
    only at the tree's paths (dotted as in :func:`~aggc_optax.path_name`, so a
    flat ``{"model.layers.0.q_proj.weight": w}`` dict and the nested tree give
    the same labels), never at names it knows.

    The rule:

    1. **A module** is the node directly above a leaf: its leaves form one group,
       so a bias goes with its kernel (``attn.query.kernel`` and
       ``attn.query.bias``: ``attn.query``). The leaf's own name is dropped.
       A leaf directly at the root is a module of its own (``logit_scale``);
       arrays a block holds beside its submodules (a ``residual_gate``) form
       the block's own group (``model.layers.*``).
    2. **Repeated blocks**: an integer path component above the module
       (``layers.0``, ``h.3``, ``layer.11``, ``experts.7``; an ``nnx.List`` or
       tuple index) becomes ``*``, so the same module of every block is one
       group: ``model.layers.*.self_attn.q_proj``. Linen names work the same
       way: ``Block_0`` ... ``Block_3`` (compact auto-names) and ``blocks_0``,
       ``blocks_1`` (setup lists) above the module become ``Block_*`` /
       ``blocks_*`` when at least two of the family exist; setup lists of dicts
       (``layers_0_q_proj``, ``layers_1_q_proj``) become ``layers_*_q_proj``.
    3. **Distinct modules stay apart**: an index that names the module itself is
       kept, so ``Dense_0`` and ``Dense_1`` of a block, the two ``LayerNorm_0``
       / ``LayerNorm_1`` of a block, and ``layers.0`` / ``layers.2`` of an
       ``nnx.Sequential`` or ``eqx.nn.MLP`` are different groups. Different
       modules that share a name are told apart by their path inside the
       block (BERT's ``attention.output.dense``, ``intermediate.dense`` and
       ``output.dense``).
    4. Everything outside the repeated blocks (embeddings, final norm, LM head)
       is labelled by its own module path (``model.embed_tokens``, ``lm_head``,
       ``params.Dense_0``).
    5. Scanned or stacked layers (``nn.scan``, ``nnx.scan``/``nnx.vmap``: one
       array with a leading layer axis per module) are one module each: all
       layers of that module form one group, as with rule 2.
    6. Only floating-point leaves get a label (and leaves without a dtype but
       with a shape); integer or boolean arrays and non-array leaves get
       ``None``.

    Limits: every index above a module is read as a repeated block, so a tuple
    of different sub-models (``(encoder, decoder)`` at positions 0 and 1) or two
    different auto-named Linen modules of one class (``MLP_0`` as input MLP,
    ``MLP_1`` as output MLP, each containing submodules) are merged; name them
    (or give a label tree). A flat list of single layers (``layers.0``,
    ``layers.1``, each holding its arrays directly) gives one group per layer,
    not one for all, and a list of layers that each have a submodule (NNX
    ``LoRALinear``: kernel and bias beside its ``lora`` child) is read as
    repeated blocks, so its kernels form one group. The
    labels are full paths (``model.layers.*.self_attn.q_proj``); for the
    reference's own token labels use :func:`~aggc_optax.reference_label`, for
    PEFT/NNX LoRA adapters :func:`~aggc_optax.lora_label`.

    Args:
      params: a pytree of arrays (Flax NNX ``State``, Linen variables, an
        Equinox module filtered to its arrays, nested or flat dicts).

    Returns:
      A label tree with the structure of ``params``: a label (str) or ``None``
      per leaf.

    Example:
      >>> import jax.numpy as jnp
      >>> block = lambda: {"attn": {"q": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}},
      ...                  "mlp": {"layers": [{"kernel": jnp.ones((2, 2))}] * 2}}
      >>> params = {"blocks": [block(), block()], "head": {"kernel": jnp.ones((2, 3))}}
      >>> labels = module_labels(params)
      >>> labels["blocks"][1]["attn"]["q"]
      {'bias': 'blocks.*.attn.q', 'kernel': 'blocks.*.attn.q'}
      >>> labels["blocks"][0]["mlp"]["layers"][1]["kernel"], labels["head"]["kernel"]
      ('blocks.*.mlp.layers.1', 'head')
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [path_name(path) for path, _ in flat]
    keep = [_is_floating(leaf) for _, leaf in flat]
    root = _Node()
    split = [name.split(".") if name else [] for name in names]
    for parts, kept in zip(split, keep):
        if not kept:
            continue  # only parameters shape the modules and blocks
        node = root
        for component in parts:
            node = node.children.setdefault(component, _Node())
        node.is_leaf = True
    labels = [_label(parts, root) if kept else None for parts, kept in zip(split, keep)]
    return jax.tree_util.tree_unflatten(treedef, labels)


__all__ = ["BLOCK", "module_labels"]
