"""The base model of the paper-in-miniature studies: pretraining, loading, LoRA, greedy decoding.

The model is the main job's LLaMA-style byte-level decoder (``train_lm.py``),
at :data:`BASE_CONFIG` (3 layers, width 96, 382k parameters: the largest whose
fine-tuning study, 13 configurations x 5 seeds with greedy-decoded evaluation,
fits an hour on the 2-core machine). It is pretrained by :func:`pretrain`, a
deterministic script, on the running Python's standard library
(``text_corpus.py``), and vendored at :data:`BASE_PATH` with its SHA-256
(:data:`BASE_SHA256`); ``python examples/paper_base.py --out PATH`` makes it
again (see ``docs/paper-miniature.md`` for the command and time).

What the studies build on it:

* :func:`load_base`: the pretrained model (``nnx`` module), checked against the
  SHA-256;
* :func:`add_lora`: ``flax.nnx.LoRA`` adapters on every linear layer of every
  decoder layer (``q k v o gate up down``; not the output head, as PEFT's
  ``target_modules`` for the MetaMath scripts), ``lora_alpha = r`` (scale 1;
  ``nnx.LoRA`` adds ``x @ A @ B`` unscaled), no dropout, ``A`` drawn as PEFT draws
  it (uniform in +-1/sqrt(d_in)) and ``B = 0``;
* :func:`lora_groups`: the adapters grouped as the authors' LoRA callback groups
  them (``aggc_optax.lora_label``: one group per module type, ``A`` and ``B``
  together, all layers);
* :func:`make_greedy_decoder`: a jitted greedy decode loop with a key/value cache;
* :func:`sft_policy`: the LoRA SFT model a GRPO run starts from
  (``paper_sft.py``'s LoRA-alone recipe at a given seed).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, serialization

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from progress import Progress
from text_corpus import VOCAB_SIZE, load_corpus, window_starts, windows
from train_lm import LlamaForCausalLM, ModelConfig, token_losses

BASE_CONFIG = ModelConfig(vocab_size=VOCAB_SIZE, d_model=96, num_layers=3, num_heads=4, mlp_dim=256)
PROJECTIONS = {
    "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}

# Pretraining recipe (the command in the module docstring runs exactly this).
PRETRAIN = {
    "seed": 0,
    "steps": 600,
    "batch_size": 32,
    "seq_len": 128,
    "lr": 3e-3,
    "warmup": 30,
    "weight_decay": 0.01,
    "clip_norm": 1.0,
}

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
BASE_PATH = os.path.join(DATA_DIR, "paper_base.msgpack")
# SHA-256 of the vendored file (see docs/paper-miniature.md for the command that made it).
BASE_SHA256 = "d2c96038e6e12eda6edc678f96436539b76f95044a3430b4670050b887be6669"


def new_model(seed: int = 0, cfg: ModelConfig = BASE_CONFIG) -> LlamaForCausalLM:
    """A freshly initialised decoder of ``cfg``."""
    return nnx.jit(lambda: LlamaForCausalLM(cfg, nnx.Rngs(seed)))()


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def save_params(model: nnx.Module, path: str) -> str:
    """Write the model's parameters (msgpack: deterministic bytes); returns their SHA-256."""
    state = nnx.state(model, nnx.Param).to_pure_dict()
    data = serialization.msgpack_serialize(jax.tree.map(np.asarray, state))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


def load_base(
    path: str = BASE_PATH, sha256: str | None = None, cfg: ModelConfig = BASE_CONFIG
) -> LlamaForCausalLM:
    """The pretrained base model.

    Args:
      path: the checkpoint (default: the vendored one).
      sha256: the digest the file must have; default :data:`BASE_SHA256` for the
        vendored file, no check for another path.
      cfg: the model's configuration.

    Raises:
      ValueError: the file's SHA-256 is not ``sha256``.
    """
    with open(path, "rb") as f:
        data = f.read()
    want = sha256 if sha256 is not None else (BASE_SHA256 if path == BASE_PATH else None)
    got = hashlib.sha256(data).hexdigest()
    if want is not None and got != want:
        raise ValueError(
            f"load_base: {path} has SHA-256 {got}, expected {want}; rebuild it with "
            "`python examples/paper_base.py` or pass sha256="
        )
    model = new_model(0, cfg)
    state = nnx.state(model, nnx.Param)
    loaded = serialization.msgpack_restore(data)
    state.replace_by_pure_dict(jax.tree.map(jnp.asarray, loaded))
    nnx.update(model, state)
    return model


# ---------------------------------------------------------------------------
# LoRA.
# ---------------------------------------------------------------------------


def _peft_a_init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    # PEFT draws A with kaiming_uniform(a=sqrt(5)): uniform in +-1/sqrt(fan_in).
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def add_lora(model: LlamaForCausalLM, rank: int, seed: int) -> LlamaForCausalLM:
    """Wrap every projection of every decoder layer in ``nnx.LoRA`` (in place; returns it).

    ``lora_alpha = rank`` (PEFT's scale ``alpha / r = 1``), no dropout, ``B = 0`` so
    the wrapped model computes exactly what the base did. ``seed`` draws the ``A``
    matrices. The adapters are ``nnx.LoRAParam`` variables, the base weights stay
    ``nnx.Param``: split them with :func:`split_lora`.
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"add_lora: rank must be an int >= 1, got {rank!r}")
    rngs = nnx.Rngs(seed)
    for layer in model.model.layers:
        for block_name, names in PROJECTIONS.items():
            block = getattr(layer, block_name)
            for name in names:
                base = getattr(block, name)
                d_in, d_out = base.kernel.shape
                lora = nnx.LoRA(
                    d_in, rank, d_out, base_module=base, a_initializer=_peft_a_init, rngs=rngs
                )
                setattr(block, name, lora)
    return model


def lora_model(rank: int, seed: int, base: LlamaForCausalLM | None = None) -> Any:
    """``(graphdef, adapters, frozen)`` of the base model with fresh adapters of ``seed``.

    ``adapters`` holds the ``lora_a``/``lora_b`` matrices (what trains), ``frozen`` the
    base weights; ``nnx.merge(graphdef, adapters, frozen)`` is the model.
    """
    model = load_base() if base is None else nnx.clone(base)
    add_lora(model, rank, seed)
    return split_lora(model)


def split_lora(model: nnx.Module) -> tuple[Any, Any, Any]:
    return nnx.split(model, nnx.LoRAParam, nnx.Param)


def lora_groups(adapters: Any) -> dict[str, Any]:
    """The adapters' AGGC groups as the authors' callback forms them (``lora_label``)."""
    import aggc_optax

    return aggc_optax.describe_groups(adapters, aggc_optax.lora_label)["groups"]


# ---------------------------------------------------------------------------
# Greedy decoding with a key/value cache.
# ---------------------------------------------------------------------------


def _rope_at(x: jax.Array, pos: jax.Array, base: float) -> jax.Array:
    # train_lm._rope at a single position: x [n, heads, head_dim].
    half = x.shape[-1] // 2
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = pos.astype(jnp.float32) * freqs
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def step_logits(model: LlamaForCausalLM, token: jax.Array, pos: jax.Array, cache: Any) -> Any:
    """Logits ``[n, vocab]`` after ``token`` [n] at position ``pos``, and the extended cache
    (per layer ``(keys, values)``, each ``[n, T, heads, head_dim]``)."""
    x = model.model.embed_tokens(token)  # [n, d]
    n, d = x.shape
    new_cache = []
    for layer, (ck, cv) in zip(model.model.layers, cache):
        attn = layer.self_attn
        h = attn.num_heads
        y = layer.input_layernorm(x)
        q = _rope_at(attn.q_proj(y).reshape(n, h, d // h), pos, attn.rope_base)
        k = _rope_at(attn.k_proj(y).reshape(n, h, d // h), pos, attn.rope_base)
        v = attn.v_proj(y).reshape(n, h, d // h)
        ck = jax.lax.dynamic_update_slice_in_dim(ck, k[:, None], pos, axis=1)
        cv = jax.lax.dynamic_update_slice_in_dim(cv, v[:, None], pos, axis=1)
        logits = jnp.einsum("nhd,nthd->nht", q, ck) / math.sqrt(d // h)
        visible = jnp.arange(ck.shape[1]) <= pos
        weights = jax.nn.softmax(jnp.where(visible, logits, -1e9), axis=-1)
        x = x + attn.o_proj(jnp.einsum("nht,nthd->nhd", weights, cv).reshape(n, d))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        new_cache.append((ck, cv))
    return model.lm_head(model.model.norm(x)), new_cache


def greedy_decode(model: LlamaForCausalLM, prompts: jax.Array, lengths: jax.Array) -> jax.Array:
    """Greedy continuation of left-aligned prompts (traceable; jit it or use the factory).

    Args:
      model: the decoder (base or LoRA-wrapped).
      prompts: ``[n, T]`` prompt ids, left-aligned, anything after each prompt.
      lengths: ``[n]`` prompt lengths (>= 1).

    Returns:
      ``[n, T]``: each prompt followed by the greedy tokens up to position T - 1.
    """
    return sample_decode(model, prompts, lengths, None)


def sample_decode(
    model: LlamaForCausalLM,
    prompts: jax.Array,
    lengths: jax.Array,
    key: jax.Array | None,
    temperature: float = 1.0,
) -> jax.Array:
    """Like :func:`greedy_decode`, but sampling at ``temperature`` with ``key`` (greedy when
    ``key`` is ``None``). One pass over positions 0..T-2 with a key/value cache: inside
    a prompt the next prompt byte is kept, after it the chosen byte is written."""
    n, t = prompts.shape
    d, h = model.model.embed_tokens.embedding.shape[1], model.model.layers[0].self_attn.num_heads
    cache = [
        (jnp.zeros((n, t, h, d // h)), jnp.zeros((n, t, h, d // h))) for _ in model.model.layers
    ]

    def body(pos: jax.Array, carry: Any) -> Any:
        buf, cache = carry
        logits, cache = step_logits(model, buf[:, pos], pos, cache)
        if key is None:
            nxt = jnp.argmax(logits, axis=-1)
        else:
            nxt = jax.random.categorical(jax.random.fold_in(key, pos), logits / temperature)
        keep = pos + 1 < lengths  # still inside the prompt
        col = jnp.where(keep, buf[:, pos + 1], nxt.astype(buf.dtype))
        return jax.lax.dynamic_update_slice_in_dim(buf, col[:, None], pos + 1, axis=1), cache

    buf, _ = jax.lax.fori_loop(0, t - 1, body, (prompts, cache))
    return buf


def make_greedy_decoder(graphdef: Any, *, batched: bool = False) -> Callable[..., jax.Array]:
    """A jitted ``decode(states, prompts, lengths)`` for models ``nnx.merge(graphdef, *states)``.

    With ``batched=True`` the first state carries a leading run axis (``jax.vmap`` over
    runs, e.g. one adapter set per seed) and the others are shared.
    """

    def one(first: Any, rest: Sequence[Any], prompts: jax.Array, lengths: jax.Array) -> jax.Array:
        return greedy_decode(nnx.merge(graphdef, first, *rest), prompts, lengths)

    if batched:
        return jax.jit(jax.vmap(one, in_axes=(0, None, None, None)))
    return jax.jit(one)


def completions(out: np.ndarray, lengths: np.ndarray) -> list[str]:
    """The decoded text after each prompt, cut at the first newline (kept out)."""
    from math_task import END, decode

    texts = []
    for row, n in zip(np.asarray(out), np.asarray(lengths)):
        texts.append(decode(row[int(n) :]).split(END, 1)[0])
    return texts


# ---------------------------------------------------------------------------
# The SFT policy a GRPO run starts from.
# ---------------------------------------------------------------------------


def sft_policy(seed: int = 0, rank: int | None = None, **overrides: Any) -> tuple[Any, Any, Any]:
    """``(graphdef, adapters, frozen)``: the base model after LoRA-alone SFT (the
    fixed protocol of ``paper_sft.py``, :data:`paper_sft.PROTOCOL`) at ``seed``.

    ``rank`` defaults to the protocol's first rank; ``overrides`` change protocol
    entries (e.g. ``steps=20`` for a quick run). Takes about a minute on 2 cores.
    """
    import paper_sft

    return paper_sft.train_one("lora", seed, rank=rank, **overrides)


# ---------------------------------------------------------------------------
# Pretraining.
# ---------------------------------------------------------------------------


def pretrain(
    out: str, corpus: str | None = None, recipe: dict[str, Any] | None = None, quiet: bool = False
) -> dict[str, Any]:
    """Pretrain :data:`BASE_CONFIG` on the corpus (default: the stdlib) and save it to ``out``.

    AdamW (weight decay 0.01), linear warm-up then cosine decay to a tenth, global
    clip 1.0 (pretraining only; the fine-tuning studies choose their own clipping),
    random windows of ``seq_len + 1`` bytes drawn from a fixed seed. Returns the
    record: recipe, corpus identity, held-out loss, seconds, SHA-256.
    """
    r = {**PRETRAIN, **(recipe or {})}
    data = load_corpus(corpus)
    model = new_model(r["seed"])
    graphdef, params = nnx.split(model, nnx.Param)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, r["lr"], min(r["warmup"], r["steps"] // 2), max(2, r["steps"]), end_value=r["lr"] / 10
    )
    tx = optax.chain(
        optax.clip_by_global_norm(r["clip_norm"]),
        optax.adamw(schedule, weight_decay=r["weight_decay"]),
    )
    opt_state = tx.init(params)

    def loss_fn(p: Any, tokens: jax.Array) -> jax.Array:
        return jnp.mean(token_losses(nnx.merge(graphdef, p), tokens))

    @jax.jit
    def step(p: Any, s: Any, tokens: jax.Array) -> Any:
        loss, grads = jax.value_and_grad(loss_fn)(p, tokens)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    evaluate = jax.jit(loss_fn)
    length = r["seq_len"] + 1
    rng = np.random.default_rng(r["seed"])
    heldout = jnp.asarray(
        windows(
            data.heldout, window_starts(data.heldout, 64, length, np.random.default_rng(1)), length
        )
    )
    start = time.perf_counter()
    bar = Progress(r["steps"], "pretraining", quiet=quiet)
    for t in range(r["steps"]):
        tokens = windows(
            data.train, window_starts(data.train, r["batch_size"], length, rng), length
        )
        params, opt_state, loss = step(params, opt_state, jnp.asarray(tokens))
        bar.update(1, f"loss {float(loss):.3f}" if (t + 1) % 20 == 0 else "")
    bar.close()
    nnx.update(model, params)
    seconds = time.perf_counter() - start
    digest = save_params(model, out)
    return {
        "recipe": r,
        "config": {k: getattr(BASE_CONFIG, k) for k in BASE_CONFIG.__dataclass_fields__},
        "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
        "corpus": data.describe(),
        "heldout_loss": float(evaluate(params, heldout)),
        "final_train_loss": float(loss),
        "seconds": seconds,
        "sha256": digest,
        "path": out,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=BASE_PATH, help="where to write the checkpoint")
    parser.add_argument("--corpus", default=None, help="text file or folder (default: the stdlib)")
    parser.add_argument("--steps", type=int, default=PRETRAIN["steps"], help="pretraining steps")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    record = pretrain(args.out, args.corpus, {"steps": args.steps}, quiet=args.quiet)
    for key in ("num_params", "heldout_loss", "final_train_loss", "seconds", "sha256", "path"):
        print(f"{key}: {record[key]}")
    return record


if __name__ == "__main__":
    main()
