"""Group labels: which AGGC group each leaf of a parameter tree belongs to.

The reference clipper labels a parameter from its dotted PyTorch name. Here a
leaf's name is built from its pytree path, so the same rule applies to nested
dicts, flat ``{"model.layers.0...": w}`` dicts, Flax Linen ``{"params": ...}``
trees and Flax NNX states alike.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from aggc_optax.labels._scale_only import ScaleOnly

# docs/reference-behaviour.md §2, rule 1: ordered; the first token of this list that matches wins.
REFERENCE_TOKENS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "down_proj",
    "up_proj",
    "c_attn",
    "c_proj",
    "w1",
    "w2",
    "w3",
    "lm_head",
    "embed_tokens",
)

Labeler = Callable[..., "str | None"]
# None, a labeler fn(name) / fn(name, leaf), a TreeLabeler, or a pytree of labels
# matching the parameters (see leaf_labels).
ParamLabels = Any


class TreeLabeler:
    """A labeler of the whole parameter tree: ``fn(params)`` returns a label tree.

    A plain callable given as ``param_labels`` is called once per leaf with the
    leaf's name; a rule that needs the tree's structure (which paths repeat,
    which nodes hold arrays) cannot work that way. Wrap such a function with
    :func:`tree_labeler` (or ``TreeLabeler(fn)``): ``param_labels`` then calls
    it with the whole tree (the parameters at ``init``, the updates at each
    ``update``) and reads its result as a label tree, checked against the tree
    like any other. Calling the object calls ``fn``, so the label tree can be
    inspected or edited. :func:`~aggc_optax.module_labels` is one.

    ``fn`` must be a function of the tree's structure only (paths, shapes and
    dtypes, never values): it runs under ``jax.jit`` on tracers.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> by_rank = TreeLabeler(lambda t: jax.tree.map(lambda x: f"rank{x.ndim}", t))
      >>> describe_groups({"w": jnp.ones((2, 2)), "b": jnp.ones(2)}, by_rank)["groups"].keys()
      dict_keys(['rank1', 'rank2'])
    """

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        if not callable(fn):
            raise TypeError(f"TreeLabeler: fn must be callable, got {fn!r}")
        self._fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, params: Any) -> Any:
        return self._fn(params)

    def __repr__(self) -> str:
        return f"TreeLabeler({getattr(self._fn, '__qualname__', self._fn)!r})"

    # Two wrappers of one function are one labeler (optax.inject_hyperparams and
    # jit caches compare static arguments).
    def __eq__(self, other: object) -> bool:
        return isinstance(other, TreeLabeler) and other._fn is self._fn

    def __hash__(self) -> int:
        return hash(self._fn)


def tree_labeler(fn: Callable[[Any], Any]) -> TreeLabeler:
    """Marks ``fn(params) -> label tree`` as a labeler of the whole tree (see :class:`TreeLabeler`).

    Example:
      >>> @tree_labeler
      ... def by_top_key(params):
      ...     return {key: jax.tree.map(lambda _: key, sub) for key, sub in params.items()}
      >>> describe_groups({"enc": [1.0, 2.0], "dec": [3.0]}, by_top_key)["groups"]["enc"]
      {'leaves': ['enc.0', 'enc.1'], 'num_params': 2}
    """
    return TreeLabeler(fn)


_STATIC_ARGS_HINT = (
    "optax.inject_hyperparams calls every callable argument with the step count, as a "
    "schedule: list the labeler in static_args, e.g. optax.inject_hyperparams(aggc_optax.aggc, "
    'static_args=("param_labels",))(param_labels=...)'
)


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic)) or hasattr(x, "aval")


def _name_type_error(fn: str, name: Any) -> TypeError:
    """The error of a labeler given something other than a parameter name."""
    if _is_array(name):
        return TypeError(
            f"{fn}: got an array ({type(name).__name__}) where a parameter name (a str) was "
            f"expected. {_STATIC_ARGS_HINT}"
        )
    return TypeError(f"{fn}: name must be a str, got {type(name).__name__}")


def _known_token(name: str) -> str | None:
    for token in REFERENCE_TOKENS:
        if (
            f".{token}." in name
            or name.endswith(f".{token}.weight")
            or name.endswith(f".{token}.bias")
        ):
            return token
    return None


def reference_label(name: str) -> str | None:
    """The reference clipper's group label for a dotted parameter name.

    Rule 1: the first token of :data:`REFERENCE_TOKENS` (in list order, not in
    name order) that occurs as ``".token."`` in the name, or ends it as
    ``".token.weight"`` / ``".token.bias"``. Rule 2: otherwise the
    second-to-last dotted token, unless it is all digits or exactly ``layers``.
    A name without a dot has no label.

    Args:
      name: a dotted parameter name such as ``model.layers.0.self_attn.q_proj.weight``.

    Returns:
      The label, or ``None`` when the parameter belongs to no group.

    Example:
      >>> reference_label("model.layers.3.self_attn.q_proj.weight")
      'q_proj'
      >>> reference_label("lm_head.weight")
      'lm_head'
      >>> reference_label("model.layers.0.residual_gate") is None
      True
    """
    if not isinstance(name, str):
        raise _name_type_error("reference_label", name)
    token = _known_token(name)
    if token is not None:
        return token
    parts = name.split(".")
    if len(parts) < 2:
        return None
    candidate = parts[-2]
    if candidate.isdigit() or candidate == "layers":
        return None
    return candidate


# PEFT spells the adapter matrices lora_A / lora_B, Flax NNX's LoRA lora_a / lora_b.
_LORA_MATRICES = ("lora_A", "lora_B", "lora_a", "lora_b")
_DORA_MAGNITUDE = "lora_magnitude_vector"
# PEFT's adapters of an nn.Embedding: the authors' callback hooks none of them.
_EMBEDDING_ADAPTERS = ("lora_embedding_A", "lora_embedding_B")


def lora_label(name: str) -> str | ScaleOnly | None:
    """The LoRA script's label rule (docs/reference-behaviour.md §10).

    Only adapter parameters get a label, the dotted token naming the module they
    adapt:

    * a LoRA matrix (PEFT's ``lora_A``/``lora_B``, Flax NNX's ``lora_a``/``lora_b``):
      the token just before it, skipping an NNX ``LoRALinear``'s ``lora``
      submodule (``q_proj.lora_A.default.weight`` and ``query.lora.lora_a``
      give ``q_proj`` and ``query``);
    * DoRA's ``lora_magnitude_vector``: ``ScaleOnly(token before it)``, scaled
      with its projection's group but not counted in its norm, as the
      authors' callback does;
    * PEFT's embedding adapters (``lora_embedding_A``/``lora_embedding_B``): no
      label, as the callback leaves them out;
    * any other name containing ``lora_``: the first known projection token
      found as in :func:`reference_label`'s rule 1, else no label.

    Everything else (base weights, norms, embeddings) is left out of every
    group, so it is neither counted nor clipped.

    Example:
      >>> lora_label("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight")
      'q_proj'
      >>> lora_label("blocks.0.attn.query.lora.lora_b")
      'query'
      >>> lora_label("model.layers.0.self_attn.v_proj.lora_magnitude_vector.default.weight")
      ScaleOnly(label='v_proj')
      >>> lora_label("model.embed_tokens.lora_embedding_A.default") is None
      True
      >>> lora_label("model.layers.0.self_attn.q_proj.weight") is None
      True
    """
    if not isinstance(name, str):
        raise _name_type_error("lora_label", name)
    if "lora_" not in name:
        return None
    parts = name.split(".")
    if any(part in _EMBEDDING_ADAPTERS for part in parts):
        return None
    for i, part in enumerate(parts):
        if part in _LORA_MATRICES:
            # nnx.LoRALinear keeps its adapter in a submodule named `lora`
            j = i - 2 if i >= 2 and parts[i - 1] == "lora" else i - 1
            return parts[j] if j >= 0 else None
        if part == _DORA_MAGNITUDE:
            return ScaleOnly(parts[i - 1]) if i > 0 else None
    return _known_token(name)


def regex_labeler(
    rules: Sequence[tuple[str, str | None]],
    default: Labeler | None = None,
) -> Callable[[str], str | None]:
    """A labeler from an ordered list of ``(pattern, label)`` rules.

    The first pattern that :func:`re.search` finds in the dotted name decides;
    its label may use the match's groups (``r"\\1"``), and a label of ``None``
    leaves the leaf out. Names no rule matches get ``default(name)`` (``None``
    when no default is given).

    Example:
      >>> label = regex_labeler([(r"\\.(q|k|v)_proj\\.", "qkv"), (r"norm", None)])
      >>> label("model.layers.0.self_attn.k_proj.weight")
      'qkv'
    """
    compiled = []
    for i, rule in enumerate(rules):
        # a list pair too: rules read from JSON or YAML come as lists
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
            raise TypeError(f"param_labels rule {i} must be a (pattern, label) pair, got {rule!r}")
        pattern, label = rule
        if not isinstance(pattern, str) or not (label is None or isinstance(label, str)):
            raise TypeError(
                f"param_labels rule {i} must be (str pattern, str or None label), got {rule!r}"
            )
        try:
            compiled.append((re.compile(pattern), label))
        except re.error as err:
            raise ValueError(f"param_labels rule {i}: invalid pattern {pattern!r}: {err}") from err

    def label_fn(name: str) -> str | None:
        if not isinstance(name, str):
            raise _name_type_error("regex_labeler", name)
        for regex, label in compiled:
            match = regex.search(name)
            if match:
                return None if label is None else match.expand(label)
        return default(name) if default is not None else None

    return label_fn


def _key_str(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_name(path: Sequence[Any]) -> str:
    """The dotted name of a pytree key path.

    Dict keys, sequence indices, attribute names and flattened-index keys all
    become their string. A trailing ``.value`` attribute is dropped: it is how
    Flax NNX ``Variable`` and Linen ``Partitioned`` boxes expose their array, and
    it is not part of the parameter's name.

    Example:
      >>> path_name((jax.tree_util.DictKey("model"), jax.tree_util.SequenceKey(0)))
      'model.0'
    """
    keys = list(path)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return ".".join(_key_str(k) for k in keys)


def labeler_arity(fn: Callable[..., Any]) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 2
    positional = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return 2
    return 1 if len(positional) <= 1 else 2


_FORMS = (
    "param_labels must be None (the reference's rule), a callable fn(name) or fn(name, leaf), "
    "a tree-level labeler (aggc_optax.module_labels, aggc_optax.tree_labeler(fn)), "
    "aggc_optax.regex_labeler(rules) for (regex, label) rules, or a pytree of labels (str, "
    "ScaleOnly or None) shaped like the parameters"
)


def _is_label(x: Any) -> bool:
    return x is None or isinstance(x, (str, ScaleOnly))


def _looks_like_rules(obj: Any) -> bool:
    return (
        isinstance(obj, (list, tuple))
        and len(obj) > 0
        and all(isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], str) for r in obj)
    )


def check_param_labels(param_labels: ParamLabels) -> None:
    """Rejects what cannot be a ``param_labels`` value, before any parameters are seen."""
    if param_labels is None or callable(param_labels):
        return
    if isinstance(param_labels, (str, ScaleOnly)):
        raise TypeError(
            f"{_FORMS}; got the single label {param_labels!r} (if it came from "
            "optax.inject_hyperparams, it is a labeler's output: optax.inject_hyperparams "
            "calls every callable argument with the step count, as a schedule; list the "
            'labeler in static_args=("param_labels",))'
        )
    if _is_array(param_labels):
        raise TypeError(
            f"{_FORMS}; got an array ({type(param_labels).__name__}), most likely a labeler's "
            f"output. {_STATIC_ARGS_HINT}"
        )
    for path, value in jax.tree_util.tree_flatten_with_path(param_labels, is_leaf=_is_label)[0]:
        if not _is_label(value):
            name = path_name(path)
            where = f"leaf {name!r}" if name else "the root"
            raise TypeError(f"{_FORMS}; got {value!r} ({type(value).__name__}) at {where}")


def _check_label(value: Any, name: str, source: str) -> Any:
    if _is_label(value):
        return value
    raise TypeError(
        f"param_labels: the {source} returned {value!r} ({type(value).__name__}) for "
        f"leaf {name!r}; a label must be a str, a ScaleOnly or None"
    )


def _mismatch(labels_tree: Any, detail: str) -> ValueError:
    if _looks_like_rules(labels_tree):
        # rules as lists (from JSON or YAML): say what they are first
        return ValueError(
            f"param_labels: {labels_tree!r} looks like a list of (regex, label) rules, but a "
            "bare list or tuple is read as a label tree; pass rules as "
            "param_labels=aggc_optax.regex_labeler(rules) (lists of two are accepted). As a "
            f"label tree it does not match the parameters: {detail}."
        )
    return ValueError(f"param_labels: the label tree does not match the parameters: {detail}.")


def _labels_from_tree(labels_tree: Any, names: list[str], params: Any) -> list[Any]:
    # First, the label tree read with the parameters' own structure: an empty
    # node of the parameters (eqx.filter's None for a non-array field) is then
    # an empty node of the labels too, not a None label.
    try:
        matched = jax.tree_util.tree_structure(params).flatten_up_to(labels_tree)  # type: ignore[attr-defined]  # jax's stub lacks PyTreeDef methods
    except (TypeError, ValueError):
        matched = None
    if matched is not None and len(matched) == len(names) and all(map(_is_label, matched)):
        return list(matched)
    # Otherwise match by dotted name: a dict of labels for an NNX State, and the
    # errors that name the first leaf that differs.
    flat = jax.tree_util.tree_flatten_with_path(labels_tree, is_leaf=_is_label)[0]
    label_names = [path_name(p) for p, _ in flat]
    if len(label_names) != len(names):
        # labels given for the parameters' None nodes (no array there): ignored
        with_none = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: x is None)[0]
        if [path_name(p) for p, _ in with_none] == label_names:
            flat = [f for f, (_, leaf) in zip(flat, with_none) if leaf is not None]
            label_names = [path_name(p) for p, _ in flat]
    for i, (a, b) in enumerate(zip(names, label_names)):
        if a != b:
            raise _mismatch(
                labels_tree, f"leaf {i} is {a!r} in the parameters but {b!r} in param_labels"
            )
    if len(names) != len(label_names):
        longer, what = (
            (names, "parameters") if len(names) > len(label_names) else (label_names, "labels")
        )
        first = longer[min(len(names), len(label_names))]
        raise _mismatch(
            labels_tree,
            f"{len(names)} parameter leaves but {len(label_names)} labels; the first "
            f"unmatched path is {first!r} (only in the {what})",
        )
    return [_check_label(v, n, "label tree") for (_, v), n in zip(flat, names)]


def _labeler_error(err: Exception, name: str) -> Exception:
    """The labeler's own exception, of its own type where possible, naming the leaf."""
    message = f"param_labels: the labeler raised {type(err).__name__} for leaf {name!r}: {err}"
    try:
        new = type(err)(message)
    except Exception:  # an exception type whose constructor wants other arguments
        err.add_note(f"(raised by the param_labels labeler for leaf {name!r})")
        return err
    return new


def leaf_labels(params: Any, param_labels: ParamLabels = None) -> tuple[list[str], list[Any]]:
    """Dotted names and labels of every leaf of ``params``: the one ``param_labels`` dispatcher.

    Args:
      params: a pytree of arrays (or of anything with a shape: only paths and,
        for a callable labeler, the leaves themselves are looked at).
      param_labels: ``None`` (:func:`reference_label` on each dotted name), a
        callable ``fn(name)`` or ``fn(name, leaf)``, a :class:`TreeLabeler`
        (called with ``params``; its label tree is then read as below, e.g.
        :func:`~aggc_optax.module_labels`), or a pytree of labels with
        the structure of ``params``. A label is a str, a
        :class:`~aggc_optax.ScaleOnly` or ``None``. (regex, label) rules go
        through :func:`regex_labeler`, which makes them a callable: a bare list
        or tuple is always a label tree, so ``(("a", "b"),)`` labels the
        parameters ``((x, y),)``.

    Returns:
      ``(names, labels)``, both in ``jax.tree_util`` flattening order.
    """
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    names = [path_name(p) for p, _ in flat]
    if param_labels is None:
        return names, [reference_label(n) for n in names]
    if isinstance(param_labels, TreeLabeler):
        return names, _labels_from_tree(param_labels(params), names, params)
    if callable(param_labels) and not isinstance(param_labels, Mapping):
        arity = labeler_arity(param_labels)
        out = []
        for n, (_, leaf) in zip(names, flat):
            try:
                value = param_labels(n) if arity == 1 else param_labels(n, leaf)
            except Exception as err:
                raise _labeler_error(err, n) from err
            out.append(_check_label(value, n, "labeler"))
        return names, out
    return names, _labels_from_tree(param_labels, names, params)


class Placement(NamedTuple):
    """Where each leaf of a tree goes: recomputed from the paths, never stored in a state.

    Attributes:
      labels: the group labels, in order of first appearance in the flattened tree.
      names: every leaf's dotted name.
      groups: per leaf, its index into ``labels``, or -1 for a leaf in no group.
      counted: per leaf, whether it counts in its group's norm (a
        :class:`~aggc_optax.ScaleOnly` leaf is only scaled).
    """

    labels: tuple[str, ...]
    names: tuple[str, ...]
    groups: tuple[int, ...]
    counted: tuple[bool, ...]


def place(tree: Any, param_labels: ParamLabels = None) -> Placement:
    """The :class:`Placement` of ``tree``'s leaves under ``param_labels``."""
    names, labels = leaf_labels(tree, param_labels)
    order: dict[str, int] = {}
    groups, counted = [], []
    for label in labels:
        if label is None:
            groups.append(-1)
            counted.append(False)
            continue
        key = label.label if isinstance(label, ScaleOnly) else label
        groups.append(order.setdefault(key, len(order)))
        counted.append(not isinstance(label, ScaleOnly))
    norm_less = set(order) - {lab for lab, c in zip(labels, counted) if c}
    if norm_less:
        raise ValueError(
            f"param_labels: the group(s) {sorted(norm_less)} have only ScaleOnly leaves, so "
            "they have no norm to clip by; give at least one leaf of each the plain label"
        )
    return Placement(tuple(order), tuple(names), tuple(groups), tuple(counted))


def describe_groups(params: Any, param_labels: ParamLabels = None) -> dict[str, Any]:
    """How AGGC will group ``params``: each group's leaves and sizes, and the leaves left out.

    Call this before training to check the labels.

    Returns:
      A dict with ``"groups"`` (label -> ``{"leaves": [names], "num_params": int}``,
      in group order: what the group's norm counts, plus ``"scale_only": [names]``
      for a group with :class:`~aggc_optax.ScaleOnly` leaves, scaled with it but
      not counted) and
      ``"unlabelled"`` (names of leaves in no group, which AGGC passes through
      untouched).

    Example:
      >>> import jax.numpy as jnp
      >>> tree = {"model": {"layers": {"0": {"q_proj": {"weight": jnp.ones((4, 4))}}}},
      ...         "logit_scale": jnp.ones(())}
      >>> info = describe_groups(tree)
      >>> info["groups"]["q_proj"]["num_params"], info["unlabelled"]
      (16, ['logit_scale'])
    """
    placement = place(params, param_labels)
    groups: dict[str, dict[str, Any]] = {
        label: {"leaves": [], "num_params": 0} for label in placement.labels
    }
    unlabelled = []
    leaves = jax.tree_util.tree_leaves(params)
    for name, group, counted, leaf in zip(
        placement.names, placement.groups, placement.counted, leaves
    ):
        if group < 0:
            unlabelled.append(name)
            continue
        entry = groups[placement.labels[group]]
        if counted:
            entry["leaves"].append(name)
            entry["num_params"] += int(np.prod(np.shape(leaf), dtype=np.int64))
        else:
            entry.setdefault("scale_only", []).append(name)
    return {"groups": groups, "unlabelled": unlabelled}


__all__ = [
    "REFERENCE_TOKENS",
    "Placement",
    "TreeLabeler",
    "describe_groups",
    "leaf_labels",
    "lora_label",
    "path_name",
    "place",
    "reference_label",
    "regex_labeler",
    "tree_labeler",
]
