"""Benchmark: AGGC against global-norm clipping, plain AdamW and the PyTorch reference.

One command measures, on LLaMA-shaped parameter trees with Hugging Face names:

1. the step time of one jitted training update (``optax.chain(aggc, optax.adamw)``,
   ``optax.chain(optax.clip_by_global_norm, optax.adamw)``, plain ``optax.adamw``
   and, as a stricter baseline, a global clip written as one scalar factor,
   :func:`fused_global_clip`), run alternately (the order rotates every round)
   after a warm-up, params and optimizer state donated; medians, the ratio of the
   clipped updates and the median of the per-round ratios, all from the same run;
2. the XLA compile time of each update (cold: JAX's caches are cleared before
   every compile) and XLA's compiled temporary memory (``memory_analysis()``);
3. the bundled PyTorch reference clipper (its gradient hooks during
   ``backward()`` plus ``on_before_optimizer_step`` and ``on_step_end``) on a
   module with the same parameter shapes and names, on the same device, against
   the jitted ``aggc_optax`` update alone;
4. scaling: AGGC's step and compile time as the number of leaves grows and as
   the number of groups grows (one group, the reference's labels, one group per
   leaf).

It prints the tables, checks the performance goals of ``docs/performance.md``
and writes ``benchmark.json`` and ``benchmark.md`` to ``--out-dir``.

Usage::

    python examples/benchmark.py --quick            # < 1 minute, small shapes
    python examples/benchmark.py                    # the full CPU run
    python examples/benchmark.py --device gpu       # on a visible CUDA GPU

The updates share one set of parameters and one AdamW state: each call
consumes (donates) them and hands the results to the next call, so memory holds
one model, not four. Each call is still exactly one full update of its own
optimizer; only the numbers it starts from differ, which does not change its cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import aggc_optax

METHODS = ("adamw", "global", "global_fused", "aggc")

# The authors' LoRA SFT recipe (docs/reference-behaviour.md §9), in the reference's option names:
# the torch comparison runs the reference and aggc_optax with exactly these.
REFERENCE_OPTIONS = {
    k: v for k, v in aggc_optax.presets.LORA_SFT_OPTIONS.items() if k != "sync_dist"
}
TOTAL_STEPS = 10_000  # for the recipe's schedule; any value > 0 works

# Goal thresholds (see docs/performance.md).
STEP_RATIO_GOAL = 1.02
TEMP_SLACK_BYTES = 1 << 20
COMPILE_RATIO_GOAL = 1.3
TORCH_SPEEDUP_GOAL = {"cpu": 3.0, "gpu": 20.0}
FLOOR_RATIO_GOAL = 1.10

MIB = float(1 << 20)


# --------------------------------------------------------------------------- shapes


@dataclasses.dataclass(frozen=True)
class LlamaShape:
    """A LLaMA-style decoder's parameter shapes, named as in Hugging Face.

    Attributes:
      hidden: model width.
      layers: number of decoder layers.
      intermediate: MLP width.
      vocab: vocabulary size (untied input and output embeddings).
      kv_dim: width of the k/v projections (grouped-query attention); ``hidden`` if 0.
    """

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    kv_dim: int = 0

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """``(name, shape)`` in ``named_parameters()`` order of ``LlamaForCausalLM``."""
        h, f, kv = self.hidden, self.intermediate, self.kv_dim or self.hidden
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            pre = f"model.layers.{i}."
            out += [
                (pre + "self_attn.q_proj.weight", (h, h)),
                (pre + "self_attn.k_proj.weight", (kv, h)),
                (pre + "self_attn.v_proj.weight", (kv, h)),
                (pre + "self_attn.o_proj.weight", (h, h)),
                (pre + "mlp.gate_proj.weight", (f, h)),
                (pre + "mlp.up_proj.weight", (f, h)),
                (pre + "mlp.down_proj.weight", (h, f)),
                (pre + "input_layernorm.weight", (h,)),
                (pre + "post_attention_layernorm.weight", (h,)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    def num_params(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors())

    def num_leaves(self) -> int:
        return 9 * self.layers + 3


@dataclasses.dataclass(frozen=True)
class LoraShape:
    """The LoRA adapters of a LLaMA-style model, named as PEFT names them.

    Every ``q/k/v/o/gate/up/down_proj`` of every layer gets ``lora_A``
    (``[rank, in]``) and ``lora_B`` (``[out, rank]``): the parameters the
    authors' LoRA recipe trains and clips.
    """

    base: LlamaShape
    rank: int

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        out = []
        for name, shape in self.base.tensors():
            if len(shape) != 2 or "proj" not in name:
                continue
            stem = "base_model.model." + name.removesuffix(".weight")
            rows, cols = shape
            out += [
                (stem + ".lora_A.default.weight", (self.rank, cols)),
                (stem + ".lora_B.default.weight", (rows, self.rank)),
            ]
        return out

    def num_params(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors())

    def num_leaves(self) -> int:
        return len(self.tensors())


_LLAMA2_7B = LlamaShape(hidden=4096, layers=32, intermediate=11008, vocab=32000)
SIZES: dict[str, LlamaShape | LoraShape] = {
    "7m": LlamaShape(hidden=256, layers=4, intermediate=688, vocab=8192),
    "42m": LlamaShape(hidden=512, layers=8, intermediate=1376, vocab=16384),
    "134m": LlamaShape(hidden=768, layers=12, intermediate=2048, vocab=32000),
    # TinyLlama-1.1B and LLaMA-2-7B.
    "1.1b": LlamaShape(hidden=2048, layers=22, intermediate=5632, vocab=32000, kv_dim=256),
    "7b": _LLAMA2_7B,
    # LoRA on a 7B model, as in the paper's experiments (ranks 1-128; here 16):
    # 448 small leaves.
    "lora-7b": LoraShape(base=_LLAMA2_7B, rank=16),
}
DEFAULT_SIZES = {
    "cpu": ("7m", "42m", "134m", "lora-7b"),
    "gpu": ("7m", "134m", "1.1b", "7b", "lora-7b"),
}
QUICK_SIZES = ("7m",)
# The leaf-scaling trees: tiny tensors, so the per-leaf cost dominates.
SCALING_HIDDEN, SCALING_INTERMEDIATE, SCALING_VOCAB = 64, 172, 512


def scaling_shape(leaves: int) -> LlamaShape:
    """A LLaMA-shaped tree with about ``leaves`` leaves (9 per layer, plus 3)."""
    return LlamaShape(
        hidden=SCALING_HIDDEN,
        layers=max(1, round((leaves - 3) / 9)),
        intermediate=SCALING_INTERMEDIATE,
        vocab=SCALING_VOCAB,
    )


def _human(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


# --------------------------------------------------------------------------- timing


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _block(tree: Any) -> None:
    jax.block_until_ready(tree)


def measure_copy_bandwidth(nbytes: int, repeats: int) -> dict[str, float]:
    """The device's streaming bandwidth, from a jitted in-place ``x + 1`` over ``nbytes``.

    The buffer is donated, so each call reads and writes the same ``nbytes``
    (no fresh allocation); the bandwidth counts both, so ``bytes / bandwidth``
    is the time of one read of ``bytes`` at that rate.
    """
    n = max(1, nbytes // 4)
    add = jax.jit(lambda v: v + 1.0, donate_argnums=0)
    x = add(jnp.zeros((n,), jnp.float32))
    _block(x)
    times = []
    for _ in range(max(3, repeats)):
        t0 = time.perf_counter()
        x = add(x)
        _block(x)
        times.append(time.perf_counter() - t0)
    t = _median(times)
    return {"buffer_bytes": 4 * n, "median_s": t, "bytes_per_s": 2 * 4 * n / t}


# --------------------------------------------------------------------------- updates


def fused_global_clip(max_norm: float) -> optax.GradientTransformation:
    """Global-norm clipping as one scalar factor: ``g * max_norm / max(norm, max_norm)``.

    ``optax.clip_by_global_norm`` selects, element by element, between ``g``
    and ``g / norm * max_norm``; XLA does not copy that division into both of
    AdamW's moment kernels, so it writes the clipped gradients to a temporary
    buffer and reads them back. A multiplication by one precomputed scalar (the
    form optax's own source notes as faster, and the form AGGC uses per group)
    fuses into AdamW. This is the stricter baseline: the cheapest global clip.
    """

    def update_fn(updates: Any, state: Any, params: Any = None) -> Any:
        del params
        norm = optax.global_norm(updates)
        factor = max_norm / jnp.maximum(norm, max_norm)
        return jax.tree.map(lambda g: (g * factor.astype(g.dtype)).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _make_tx(method: str, aggc_kwargs: dict[str, Any] | None = None) -> Any:
    adam = optax.adamw(1e-4, weight_decay=0.01)
    if method == "adamw":
        return adam
    if method == "global":
        return optax.chain(optax.clip_by_global_norm(1.0), adam)
    if method == "global_fused":
        return optax.chain(fused_global_clip(1.0), adam)
    if method == "aggc":
        return optax.chain(aggc_optax.aggc(**(aggc_kwargs or {})), adam)
    raise ValueError(f"unknown method {method!r}; allowed: {METHODS}")


def _make_step(method: str, tx: Any) -> Callable[..., Any]:
    """``step(params, adam_state, clip_state, grads)``: one full update of ``tx``.

    The AdamW state is passed apart from the clipper's so that all methods can
    share (and donate) one parameter tree and one AdamW state.
    """

    def step(params: Any, adam_state: Any, clip_state: Any, grads: Any) -> Any:
        state = adam_state if method == "adamw" else (clip_state, adam_state)
        updates, new_state = tx.update(grads, state, params)
        if method == "adamw":
            new_adam, new_clip = new_state, clip_state
        else:
            new_clip, new_adam = new_state
        return optax.apply_updates(params, updates), new_adam, new_clip

    return step


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _normal(key: jax.Array, shape: tuple[int, ...], dtype: Any, std: float) -> jax.Array:
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _random_tree(
    tensors: Sequence[tuple[str, tuple[int, ...]]], dtype: Any, seed: int, std: float
) -> dict[str, jax.Array]:
    keys = jax.random.split(jax.random.PRNGKey(seed), len(tensors))
    return {name: _normal(k, shape, dtype, std) for k, (name, shape) in zip(keys, tensors)}


def _fresh(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _compile(
    step: Callable[..., Any], args: tuple[Any, ...], donate: tuple[int, ...]
) -> tuple[Any, float, float, float]:
    """Cold trace+lower and XLA compile of ``step``.

    Returns:
      ``(compiled, lower_s, compile_s, compile_cpu_s)``: wall-clock seconds of
      tracing and lowering, of the XLA compile, and the CPU seconds (all
      threads) of the compile, which other processes on a busy machine disturb less.
    """
    jax.clear_caches()
    t0 = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=donate).lower(*args)
    t1 = time.perf_counter()
    c0 = time.process_time()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, t1 - t0, t2 - t1, time.process_time() - c0


def _memory(compiled: Any) -> dict[str, int]:
    try:
        m = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return {}
    if m is None:
        return {}
    return {
        "temp_bytes": int(m.temp_size_in_bytes),
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
    }


def run_updates(
    tensors: Sequence[tuple[str, tuple[int, ...]]],
    dtype: Any,
    *,
    variants: dict[str, tuple[str, dict[str, Any] | None]],
    repeats: int,
    warmup: int,
    compile_repeats: int,
) -> dict[str, Any]:
    """Compiles and times several full updates on one shared parameter tree.

    Args:
      tensors: ``(name, shape)`` of every leaf.
      dtype: parameter and gradient dtype.
      variants: key -> ``(method, aggc kwargs)``.
      repeats: timed rounds; every round runs every variant once, in an order
        that rotates from round to round.
      warmup: untimed rounds first.
      compile_repeats: cold compiles per variant (the best is reported).

    Returns:
      Per variant: step times, compile times, memory; and the group count.
    """
    params = _random_tree(tensors, dtype, seed=0, std=0.02)
    grads = _random_tree(tensors, dtype, seed=1, std=1e-3)
    _block((params, grads))
    keys = list(variants)
    txs = {k: _make_tx(*variants[k]) for k in keys}
    # Fresh copies, so that no two state leaves can share a buffer: a buffer
    # cannot be donated twice in one call.
    adam_state = _fresh(_make_tx("adamw").init(params))
    clip_states: dict[str, Any] = {}
    for k in keys:
        method = variants[k][0]
        clip_states[k] = () if method == "adamw" else _fresh(txs[k].init(params)[0])
    steps = {k: _make_step(variants[k][0], txs[k]) for k in keys}

    lower_s: dict[str, list[float]] = {k: [] for k in keys}
    compile_s: dict[str, list[float]] = {k: [] for k in keys}
    compile_cpu_s: dict[str, list[float]] = {k: [] for k in keys}
    compiled: dict[str, Any] = {}
    for r in range(max(1, compile_repeats)):
        order = keys[r % len(keys) :] + keys[: r % len(keys)]
        for k in order:
            args = (params, adam_state, clip_states[k], grads)
            compiled[k], lo, co, cpu = _compile(steps[k], args, donate=(0, 1, 2))
            lower_s[k].append(lo)
            compile_s[k].append(co)
            compile_cpu_s[k].append(cpu)
    memory = {k: _memory(compiled[k]) for k in keys}

    times: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(warmup + repeats):
        order = keys[r % len(keys) :] + keys[: r % len(keys)]
        for k in order:
            t0 = time.perf_counter()
            params, adam_state, clip_states[k] = compiled[k](
                params, adam_state, clip_states[k], grads
            )
            _block((params, adam_state, clip_states[k]))
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)

    groups = {}
    for k in keys:
        if variants[k][0] == "aggc":
            groups[k] = len(clip_states[k].labels)
    out = {
        k: {
            "method": variants[k][0],
            "step_s": times[k],
            "step_median_s": _median(times[k]),
            "lower_s": lower_s[k],
            "compile_s": compile_s[k],
            # Best of the cold compiles: other processes only ever add time.
            "compile_best_s": min(compile_s[k]),
            "compile_cpu_s": compile_cpu_s[k],
            "compile_cpu_best_s": min(compile_cpu_s[k]),
            "lower_best_s": min(lower_s[k]),
            "memory": memory[k],
            "groups": groups.get(k),
        }
        for k in keys
    }
    del params, grads, adam_state, clip_states, compiled
    gc.collect()
    return out


def _paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    return _median([x / y for x, y in zip(a, b)])


# --------------------------------------------------------------------------- torch


def _torch_module(tensors: Sequence[tuple[str, tuple[int, ...]]], dtype: Any, device: Any) -> Any:
    import torch

    from aggc_optax.torch_reference import mirror_module

    gen = torch.Generator(device="cpu").manual_seed(0)
    return mirror_module(
        dict(tensors),
        dtype=dtype,
        device=device,
        init=lambda shape: 0.02 * torch.randn(shape, generator=gen),
    )


def run_torch(
    tensors: Sequence[tuple[str, tuple[int, ...]]],
    dtype_name: str,
    device_kind: str,
    *,
    repeats: int,
    warmup: int,
    settle_s: float,
) -> dict[str, Any]:
    """The PyTorch reference clipper against the jitted ``aggc_optax`` update alone.

    Per round, alternately: (a) ``torch.autograd.backward(params, fixed_grads)``
    on a module without the clipper (autograd copies each gradient into
    ``.grad``); (b) the same on a module of identical shapes with the reference
    attached (its tensor hooks fire inside ``backward()``), then
    ``on_before_optimizer_step`` (which clips ``.grad`` in place) and
    ``on_step_end``; (c) the jitted AGGC update alone on the same gradients, with
    the same options (the LoRA SFT recipe), on the same device. The reference's
    cost is (b) - (a); (b)'s step calls are also timed on their own.

    Args:
      tensors: ``(name, shape)`` of every parameter.
      dtype_name: ``"float32"`` or ``"bfloat16"``.
      device_kind: ``"cpu"`` or ``"gpu"``.
      repeats: timed rounds.
      warmup: untimed rounds first.
      settle_s: pause whenever the rounds switch between torch and JAX.

    Returns:
      The timings, or ``{"skipped": reason}`` when torch or the reference is missing.
    """
    try:
        import torch

        from aggc_optax import torch_reference
    except Exception as err:  # ImportError, or a broken install
        return {"skipped": f"could not import the PyTorch reference: {err!r}"}
    if device_kind == "gpu" and not torch.cuda.is_available():
        return {"skipped": "torch cannot see a CUDA device (this torch build is CPU-only?)"}
    device = torch.device("cuda" if device_kind == "gpu" else "cpu")
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    base = _torch_module(tensors, tdtype, device)
    ref = _torch_module(tensors, tdtype, device)
    gen = torch.Generator(device="cpu").manual_seed(1)
    fixed = [(1e-3 * torch.randn(s, generator=gen)).to(tdtype).to(device) for _, s in tensors]
    options = torch_reference.PerModuleGradNormOptions(**REFERENCE_OPTIONS)
    clipper = torch_reference.PerModuleGradClipper(options=options)
    clipper.attach(ref)
    clipper.on_train_begin(TOTAL_STEPS)

    base_params, ref_params = list(base.parameters()), list(ref.parameters())

    def backward(params: list[Any]) -> None:
        # backward() straight into the leaves: autograd copies each fixed
        # gradient into .grad (we keep a reference, so it cannot steal it) and
        # the reference's tensor hooks fire on the way, as in a real backward.
        for p in params:
            p.grad = None
        torch.autograd.backward(params, grad_tensors=fixed)

    backward(base_params)  # the module without hooks: the clipper's sums stay clean
    if any(p.grad.data_ptr() == g.data_ptr() for p, g in zip(base_params, fixed)):
        raise RuntimeError("torch reused a fixed gradient as .grad; the clipper would edit it")

    # The JAX side: the same gradients, as a flat dict with the same names.
    grads = {
        name: jnp.asarray(g.float().cpu().numpy(), dtype=jdtype)
        for (name, _), g in zip(tensors, fixed)
    }
    tx = aggc_optax.from_reference_options(REFERENCE_OPTIONS, total_steps=TOTAL_STEPS)
    jstate = _fresh(tx.init(grads))
    jax.clear_caches()
    # Gradients donated: like the reference, which scales .grad in place, the
    # update then writes into the gradients' own buffers. Each round hands it
    # a fresh copy (made outside the timing), as a backward() would.
    jupdate = jax.jit(tx.update, donate_argnums=(0, 1)).lower(grads, jstate).compile()

    t_base, t_ref, t_ref_step, t_jax = [], [], [], []
    step = 0
    previous = None
    for r in range(warmup + repeats):
        order = ("base", "ref", "jax") if r % 2 == 0 else ("jax", "ref", "base")
        for which in order:
            framework = "jax" if which == "jax" else "torch"
            if previous not in (None, framework):
                # XLA's and torch's CPU worker threads spin for a while after
                # each call; on a small machine they starve the other
                # framework's threads (torch ran 40x slower right after a JAX
                # call on 2 cores), so let them go idle before switching.
                time.sleep(settle_s)
            previous = framework
            if which == "base":
                t0 = time.perf_counter()
                backward(base_params)
                sync()
                dt = time.perf_counter() - t0
                if r >= warmup:
                    t_base.append(dt)
            elif which == "ref":
                t0 = time.perf_counter()
                backward(ref_params)
                sync()
                t1 = time.perf_counter()
                clipper.on_before_optimizer_step(step=step)
                clipper.on_step_end(step)
                sync()
                t2 = time.perf_counter()
                step += 1
                if r >= warmup:
                    t_ref.append(t2 - t0)
                    t_ref_step.append(t2 - t1)
            else:
                fresh = _fresh(grads)
                _block(fresh)
                t0 = time.perf_counter()
                updates, jstate = jupdate(fresh, jstate)
                _block((updates, jstate))
                dt = time.perf_counter() - t0
                del updates, fresh
                if r >= warmup:
                    t_jax.append(dt)
    clipper.close()
    reference_cost = _median(t_ref) - _median(t_base)
    paired_cost = _median([a - b for a, b in zip(t_ref, t_base)])
    out = {
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "groups": len(getattr(clipper, "mod2params", {})) or None,
        "backward_median_s": _median(t_base),
        "backward_with_reference_median_s": _median(t_ref),
        "reference_step_calls_median_s": _median(t_ref_step),
        "reference_cost_s": reference_cost,
        "reference_cost_paired_s": paired_cost,
        "aggc_update_median_s": _median(t_jax),
        "speedup": reference_cost / _median(t_jax),
        "speedup_paired": paired_cost / _median(t_jax),
        "speedup_step_calls_only": _median(t_ref_step) / _median(t_jax),
        # Best of the rounds: the intrinsic costs, which other processes on a
        # busy machine can only inflate.
        "reference_cost_best_s": min(t_ref) - min(t_base),
        "aggc_update_best_s": min(t_jax),
        "speedup_best": (min(t_ref) - min(t_base)) / min(t_jax),
        "samples": {"backward": t_base, "with_reference": t_ref, "aggc": t_jax},
    }
    return out


# --------------------------------------------------------------------------- runs


def _fits(n_params: int, itemsize: int, device_kind: str) -> tuple[bool, str]:
    # params + grads + mu + nu, and room for one gradient-sized temporary.
    need = 5 * n_params * itemsize
    if device_kind == "gpu":
        stats = jax.devices()[0].memory_stats() or {}
        have = stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)
    else:
        have = 0
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        have = int(line.split()[1]) * 1024
        except OSError:
            return True, "free memory unknown"
    if have and need > 0.9 * have:
        return False, f"needs about {need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB free"
    return True, ""


def _dtype_for(size: str, args: argparse.Namespace) -> str:
    if args.dtype != "auto":
        return args.dtype
    # LLaMA-2-7B in float32 (params, grads, two Adam moments, one global-clip
    # temporary) needs ~135 GB: on a GPU it runs in bfloat16.
    return "bfloat16" if (args.device == "gpu" and size == "7b") else "float32"


def bench_sizes(args: argparse.Namespace, bandwidth: float) -> list[dict[str, Any]]:
    rows = []
    for size in args.sizes:
        shape = SIZES[size]
        tensors = shape.tensors()
        dtype_name = _dtype_for(size, args)
        itemsize = 2 if dtype_name == "bfloat16" else 4
        n = shape.num_params()
        ok, why = _fits(n, itemsize, args.device)
        row: dict[str, Any] = {
            "size": size,
            "params": n,
            "leaves": len(tensors),
            "dtype": dtype_name,
            "grad_bytes": n * itemsize,
        }
        if not ok:
            row["skipped"] = why
            print(f"[size {size}] skipped: {why}", flush=True)
            rows.append(row)
            continue
        print(f"[size {size}] {_human(n)} params, {len(tensors)} leaves, {dtype_name}", flush=True)
        t0 = time.perf_counter()
        res = run_updates(
            tensors,
            jnp.dtype(dtype_name),
            variants={m: (m, None) for m in METHODS},
            repeats=args.repeats,
            warmup=args.warmup,
            compile_repeats=args.compile_repeats,
        )
        row["updates"] = res
        row["groups"] = res["aggc"]["groups"]
        _summarise_size(row, bandwidth)
        row["wall_s"] = time.perf_counter() - t0
        _print_size(row)
        if size in args.torch_sizes:
            print(f"[size {size}] torch reference ...", flush=True)
            row["torch"] = run_torch(
                tensors,
                dtype_name,
                args.device,
                repeats=args.torch_repeats,
                warmup=args.warmup,
                settle_s=args.settle,
            )
            gc.collect()  # free the torch modules before the next size
            if "skipped" not in row["torch"]:
                # Inside a training step AGGC's rescale fuses into AdamW: what it
                # adds is (aggc+adamw) - adamw, measured above on the same shapes.
                # (None when noise makes that difference of medians <= 0.)
                row["torch"]["speedup_in_step"] = (
                    row["torch"]["reference_cost_s"] / row["aggc_cost_s"]
                    if row["aggc_cost_s"] > 0
                    else None
                )
            _print_torch(row)
        rows.append(row)
    return rows


def _summarise_size(row: dict[str, Any], bandwidth: float) -> None:
    u = row["updates"]
    med = {k: u[k]["step_median_s"] for k in u}
    row["step_ratio"] = med["aggc"] / med["global"]
    row["step_ratio_paired"] = _paired_ratio(u["aggc"]["step_s"], u["global"]["step_s"])
    row["step_ratio_fused"] = med["aggc"] / med["global_fused"]
    row["step_ratio_fused_paired"] = _paired_ratio(u["aggc"]["step_s"], u["global_fused"]["step_s"])
    row["compile_ratio"] = u["aggc"]["compile_best_s"] / u["global"]["compile_best_s"]
    row["compile_cpu_ratio"] = u["aggc"]["compile_cpu_best_s"] / u["global"]["compile_cpu_best_s"]
    temps = {k: u[k]["memory"].get("temp_bytes") for k in u}
    row["temp_bytes"] = temps
    if temps["aggc"] is not None and temps["global"] is not None:
        row["temp_excess_bytes"] = temps["aggc"] - temps["global"]
    row["aggc_cost_s"] = med["aggc"] - med["adamw"]
    row["global_cost_s"] = med["global"] - med["adamw"]
    row["global_fused_cost_s"] = med["global_fused"] - med["adamw"]
    row["grad_read_s"] = row["grad_bytes"] / bandwidth
    row["aggc_cost_over_read"] = row["aggc_cost_s"] / row["grad_read_s"]


def bench_leaf_scaling(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for target in args.scaling_leaves:
        shape = scaling_shape(target)
        tensors = shape.tensors()
        print(f"[leaves {len(tensors)}] ...", flush=True)
        t0 = time.perf_counter()
        res = run_updates(
            tensors,
            jnp.float32,
            variants={m: (m, None) for m in ("global", "aggc")},
            repeats=args.scaling_repeats,
            warmup=args.warmup,
            compile_repeats=args.scaling_compile_repeats,
        )
        u = res
        row = {
            "leaves": len(tensors),
            "params": shape.num_params(),
            "groups": u["aggc"]["groups"],
            "step_median_s": {k: u[k]["step_median_s"] for k in u},
            "compile_best_s": {k: u[k]["compile_best_s"] for k in u},
            "compile_cpu_best_s": {k: u[k]["compile_cpu_best_s"] for k in u},
            "lower_best_s": {k: u[k]["lower_best_s"] for k in u},
            "temp_bytes": {k: u[k]["memory"].get("temp_bytes") for k in u},
            "step_ratio": u["aggc"]["step_median_s"] / u["global"]["step_median_s"],
            "step_ratio_paired": _paired_ratio(u["aggc"]["step_s"], u["global"]["step_s"]),
            "compile_ratio": u["aggc"]["compile_best_s"] / u["global"]["compile_best_s"],
            "compile_cpu_ratio": u["aggc"]["compile_cpu_best_s"]
            / u["global"]["compile_cpu_best_s"],
            "samples": {k: u[k]["step_s"] for k in u},
            "wall_s": time.perf_counter() - t0,
        }
        rows.append(row)
        print(
            f"  step ms: global {1e3 * row['step_median_s']['global']:.2f}  aggc "
            f"{1e3 * row['step_median_s']['aggc']:.2f}  ratio {row['step_ratio']:.3f}; "
            f"compile s: global {row['compile_best_s']['global']:.2f}  aggc "
            f"{row['compile_best_s']['aggc']:.2f}  ratio {row['compile_ratio']:.3f}",
            flush=True,
        )
    return rows


def _linear_fit(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    xa, ya = np.asarray(x, float), np.asarray(y, float)
    if len(xa) < 2:
        return {}
    slope, intercept = np.polyfit(xa, ya, 1)
    pred = slope * xa + intercept
    ss_res = float(np.sum((ya - pred) ** 2))
    ss_tot = float(np.sum((ya - ya.mean()) ** 2))
    return {
        "slope": float(slope),
        "intercept": float(intercept),
        "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0,
    }


def _one_group(name: str) -> str:
    return "all"


def _per_leaf(name: str) -> str:
    return name


def _run_small_tree(
    tensors: Sequence[tuple[str, tuple[int, ...]]],
    variants: dict[str, tuple[str, dict[str, Any] | None]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """:func:`run_updates` in float32 with the scaling runs' repeats."""
    return run_updates(
        tensors,
        jnp.float32,
        variants=variants,
        repeats=args.scaling_repeats,
        warmup=args.warmup,
        compile_repeats=args.scaling_compile_repeats,
    )


def bench_group_scaling(args: argparse.Namespace) -> dict[str, Any]:
    shape = scaling_shape(args.group_leaves)
    tensors = shape.tensors()
    print(f"[groups, {len(tensors)} leaves] ...", flush=True)
    variants = {
        "global": ("global", None),
        "aggc_1": ("aggc", {"param_labels": _one_group}),
        "aggc_reference": ("aggc", {}),
        "aggc_per_leaf": ("aggc", {"param_labels": _per_leaf}),
    }
    t0 = time.perf_counter()
    u = _run_small_tree(tensors, variants, args)
    g = u["global"]
    rows = []
    for k, title in (
        ("aggc_1", "one group"),
        ("aggc_reference", "reference labels"),
        ("aggc_per_leaf", "one group per leaf"),
    ):
        rows.append(
            {
                "labels": title,
                "groups": u[k]["groups"],
                "step_median_s": u[k]["step_median_s"],
                "step_ratio": u[k]["step_median_s"] / g["step_median_s"],
                "step_ratio_paired": _paired_ratio(u[k]["step_s"], g["step_s"]),
                "compile_best_s": u[k]["compile_best_s"],
                "compile_ratio": u[k]["compile_best_s"] / g["compile_best_s"],
                "compile_cpu_best_s": u[k]["compile_cpu_best_s"],
                "compile_cpu_ratio": u[k]["compile_cpu_best_s"] / g["compile_cpu_best_s"],
                "temp_bytes": u[k]["memory"].get("temp_bytes"),
            }
        )
    out = {
        "leaves": len(tensors),
        "params": shape.num_params(),
        "global_step_median_s": g["step_median_s"],
        "global_compile_best_s": g["compile_best_s"],
        "global_compile_cpu_best_s": g["compile_cpu_best_s"],
        "global_temp_bytes": g["memory"].get("temp_bytes"),
        "rows": rows,
        "wall_s": time.perf_counter() - t0,
    }
    for r in rows:
        print(
            f"  {r['labels']:>20} ({r['groups']} groups): step {1e3 * r['step_median_s']:.2f} ms"
            f" ({r['step_ratio']:.3f}x global), compile {r['compile_best_s']:.2f} s"
            f" ({r['compile_ratio']:.3f}x)",
            flush=True,
        )
    return out


# --------------------------------------------------------------------------- many small leaves

#: The many-leaves tree: seven small shapes in turn (about 2,180 entries a leaf,
#: so 1,000 leaves hold about 2.2M parameters), where per-leaf work dominates.
MANY_LEAF_SHAPES: tuple[tuple[int, ...], ...] = (
    (48, 48),
    (48, 128),
    (128, 48),
    (48,),
    (96,),
    (16, 16),
    (256,),
)
MANY_LEAF_GROUPS = 12
#: The ceilings issue 22 sets against optax.clip_by_global_norm (+ AdamW).
MANY_LEAF_GOALS = {
    "per_leaf": {"compile": 2.0, "update": 1.5},
    "12_groups": {"compile": 1.3, "update": 1.3},
}


def many_leaf_tensors(leaves: int) -> list[tuple[str, tuple[int, ...]]]:
    """``leaves`` leaves named like a model's, cycling through :data:`MANY_LEAF_SHAPES`."""
    n = len(MANY_LEAF_SHAPES)
    return [(f"model.blocks.{i // n}.w{i % n}", MANY_LEAF_SHAPES[i % n]) for i in range(leaves)]


def _twelve_groups(name: str) -> str:
    return f"g{int(name.split('.')[2]) % MANY_LEAF_GROUPS}"


def _per_round(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    ratios = [x / y for x, y in zip(a, b)]
    return {"per_round": ratios, "median": _median(ratios), "min": min(ratios), "max": max(ratios)}


def bench_many_leaves(args: argparse.Namespace) -> dict[str, Any]:
    """Compile and update of many small leaves, and the large tree's step and memory.

    Every ratio is aggc_optax over ``optax.clip_by_global_norm``, both chained
    with AdamW, taken per round (the variants run in turn, the order rotating)
    and summarised by its median: the machine's load changes between rounds,
    much less within one.
    """
    tensors = many_leaf_tensors(args.many_leaves)
    n_params = sum(math.prod(s) for _, s in tensors)
    print(
        f"[many leaves] {len(tensors)} leaves, {len(MANY_LEAF_SHAPES)} shapes, "
        f"{_human(n_params)} params",
        flush=True,
    )
    variants = {
        "global": ("global", None),
        "per_leaf": ("aggc", {"param_labels": _per_leaf}),
        "12_groups": ("aggc", {"param_labels": _twelve_groups}),
    }
    u = _run_small_tree(tensors, variants, args)
    small: dict[str, Any] = {"leaves": len(tensors), "params": n_params, "variants": {}}
    for k in ("per_leaf", "12_groups"):
        small["variants"][k] = {
            "groups": u[k]["groups"],
            "compile": _per_round(u[k]["compile_s"], u["global"]["compile_s"]),
            "update": _per_round(u[k]["step_s"], u["global"]["step_s"]),
            "compile_s": u[k]["compile_s"],
            "step_median_s": u[k]["step_median_s"],
        }
    small["global"] = {
        "compile_s": u["global"]["compile_s"],
        "step_median_s": u["global"]["step_median_s"],
    }
    large_name = args.sizes[0]
    shape = SIZES[large_name]
    print(f"[many leaves] large tree {large_name}: {_human(shape.num_params())} params", flush=True)
    v = run_updates(
        shape.tensors(),
        jnp.float32,
        variants={"global": ("global", None), "aggc": ("aggc", None)},
        repeats=args.repeats,
        warmup=args.warmup,
        compile_repeats=1,
    )
    temp = {k: v[k]["memory"].get("temp_bytes") for k in v}
    large = {
        "size": large_name,
        "params": shape.num_params(),
        "step": _per_round(v["aggc"]["step_s"], v["global"]["step_s"]),
        "temp_bytes": temp,
        "temp_excess_bytes": None if None in temp.values() else temp["aggc"] - temp["global"],
    }
    return {"small_leaves": small, "large_tree": large}


def print_many_leaves(result: dict[str, Any]) -> None:
    small, large = result["small_leaves"], result["large_tree"]
    print(
        f"\naggc_optax / optax.clip_by_global_norm (both + AdamW), median of per-round "
        f"ratios [min-max], {small['leaves']} leaves of {len(MANY_LEAF_SHAPES)} shapes, "
        f"{_human(small['params'])} params:"
    )
    for k, title in (("per_leaf", "one group per leaf"), ("12_groups", "12 groups")):
        row = small["variants"][k]
        goal = MANY_LEAF_GOALS[k]
        for what in ("compile", "update"):
            r = row[what]
            print(
                f"  {title:>18} {what:>7}: {r['median']:.2f}x [{r['min']:.2f}-{r['max']:.2f}]"
                f" (goal <= {goal[what]}x: {'met' if r['median'] <= goal[what] else 'MISSED'})"
            )
    step = large["step"]
    print(
        f"  {large['size']:>18} step   : {step['median']:.3f}x "
        f"[{step['min']:.3f}-{step['max']:.3f}]"
    )
    t = large["temp_bytes"]
    if large["temp_excess_bytes"] is not None:
        print(
            f"  {large['size']:>18} temp   : aggc {t['aggc'] / MIB:.1f} MiB, global "
            f"{t['global'] / MIB:.1f} MiB ({large['temp_excess_bytes'] / MIB:+.1f} MiB)"
        )


# --------------------------------------------------------------------------- goals


def _goal(name: str, measured: str, threshold: str, met: bool | None, detail: str = "") -> dict:
    status = "not measured" if met is None else ("met" if met else "MISSED")
    return {
        "goal": name,
        "measured": measured,
        "threshold": threshold,
        "status": status,
        "detail": detail,
    }


def _bound_goal(
    name: str,
    items: Sequence[tuple[str, float, str]],
    limit: float,
    *,
    at_least: bool = False,
    fmt: str = "{:.3f}",
    note: str = "",
) -> dict:
    """A goal met when every ``(label, value, remark)`` item is within ``limit``."""
    measured = ", ".join(f"{label}: {fmt.format(v)}{remark}" for label, v, remark in items)
    met = None
    if items:
        met = all((v >= limit) if at_least else (v <= limit) for _, v, _ in items)
    threshold = f">= {fmt.format(limit)}" if at_least else f"<= {limit}"
    return _goal(name, measured or "-", threshold, met, note)


def evaluate_goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    device = result["device"]["kind"]
    sizes = [r for r in result["sizes"] if "updates" in r]
    leaves = result.get("leaf_scaling") or []
    goals = []

    def paired(r: dict[str, Any], key: str) -> str:
        return f" (paired {r[key]:.3f})"

    worst = max(sizes, key=lambda r: r["step_ratio"])["size"] if sizes else "-"
    goals.append(
        _bound_goal(
            "step time: aggc+adamw / global+adamw, every size",
            [(r["size"], r["step_ratio"], paired(r, "step_ratio_paired")) for r in sizes],
            STEP_RATIO_GOAL,
            note=f"worst: {worst}",
        )
    )
    goals.append(
        _bound_goal(
            "(stricter, not in the issue) aggc+adamw / fused global clip+adamw",
            [
                (r["size"], r["step_ratio_fused"], paired(r, "step_ratio_fused_paired"))
                for r in sizes
            ],
            STEP_RATIO_GOAL,
        )
    )
    temp_rows = [r for r in sizes if "temp_excess_bytes" in r]
    goals.append(
        _bound_goal(
            "compiled temporary memory: aggc - global, MiB",
            [(r["size"], r["temp_excess_bytes"] / MIB, "") for r in temp_rows],
            TEMP_SLACK_BYTES / MIB,
            fmt="{:+.3f}",
        )
    )
    goals.append(
        _bound_goal(
            "compile time: aggc / global",
            [(r["size"], r["compile_ratio"], "") for r in sizes]
            + [(f"{r['leaves']} leaves", r["compile_ratio"], "") for r in leaves],
            COMPILE_RATIO_GOAL,
            note="" if any(r["leaves"] >= 2000 for r in leaves) else "no run at 2,000 leaves",
        )
    )

    torch_rows = [r for r in sizes if "torch" in r and "skipped" not in r["torch"]]
    skipped = [r["torch"]["skipped"] for r in sizes if "skipped" in r.get("torch", {})]
    want = TORCH_SPEEDUP_GOAL[device]
    goals.append(
        _bound_goal(
            f"speed-up over the PyTorch reference clipper, aggc_optax update alone ({device})",
            [(r["size"], r["torch"]["speedup"], "") for r in torch_rows],
            want,
            at_least=True,
            fmt="{:.1f}x",
            note=skipped[0] if skipped and not torch_rows else "",
        )
    )
    in_step = [r for r in torch_rows if r["torch"].get("speedup_in_step") is not None]
    goals.append(
        _bound_goal(
            "(in a training step) speed-up over the reference: its cost / AGGC's cost "
            f"inside aggc+adamw ({device})",
            [(r["size"], r["torch"]["speedup_in_step"], "") for r in in_step],
            want,
            at_least=True,
            fmt="{:.1f}x",
            note=""
            if len(in_step) == len(torch_rows)
            else "AGGC's cost in the step was lost in noise",
        )
    )

    floor = _bound_goal(
        "clip cost (aggc+adamw - adamw) / one read of the gradients",
        [(r["size"], r["aggc_cost_over_read"], "") for r in sizes],
        FLOOR_RATIO_GOAL,
        fmt="{:.2f}",
    )
    if device != "gpu":  # the goal is about a GPU's bandwidth
        floor.update(status="not measured", detail="a GPU goal; CPU values are for information")
    goals.append(floor)

    if len(leaves) >= 2:
        fit = _linear_fit(
            [r["leaves"] for r in leaves], [r["step_median_s"]["aggc"] for r in leaves]
        )
        goal = _bound_goal(
            f"step time linear in leaves (R^2 {fit['r2']:.4f} >= 0.98) and aggc/global flat",
            [(f"{r['leaves']} leaves", r["step_ratio"], "") for r in leaves],
            STEP_RATIO_GOAL,
        )
        if fit["r2"] < 0.98:
            goal["status"] = "MISSED"
        goals.append(goal)
    groups = result.get("group_scaling")
    if groups:
        rows = groups["rows"]
        goals.append(
            _bound_goal(
                "step time flat in groups: aggc+adamw / global+adamw per label set",
                [(f"{r['groups']} groups", r["step_ratio"], "") for r in rows],
                STEP_RATIO_GOAL,
            )
        )
        goals.append(
            _bound_goal(
                "compile time flat in groups: aggc / global per label set",
                [
                    (
                        f"{r['groups']} groups",
                        r["compile_ratio"],
                        f" (CPU {r['compile_cpu_ratio']:.3f})",
                    )
                    for r in rows
                ],
                COMPILE_RATIO_GOAL,
            )
        )
    return goals


# --------------------------------------------------------------------------- output


def _ms(s: float | None) -> str:
    return "-" if s is None or not math.isfinite(s) else f"{1e3 * s:.2f}"


def _times(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}x"


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / MIB:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _print_size(row: dict[str, Any]) -> None:
    u = row["updates"]
    print(
        "  step ms: "
        + "  ".join(f"{k} {_ms(u[k]['step_median_s'])}" for k in METHODS)
        + f"  aggc/global {row['step_ratio']:.3f} (paired {row['step_ratio_paired']:.3f})"
        + f"  aggc/fused global {row['step_ratio_fused']:.3f}",
        flush=True,
    )
    print(
        "  compile s: "
        + "  ".join(f"{k} {u[k]['compile_best_s']:.2f}" for k in METHODS)
        + f"  aggc/global {row['compile_ratio']:.3f};  temp MiB: "
        + "  ".join(f"{k} {_mib(row['temp_bytes'][k])}" for k in METHODS),
        flush=True,
    )


def _print_torch(row: dict[str, Any]) -> None:
    t = row["torch"]
    if "skipped" in t:
        print(f"  torch comparison skipped: {t['skipped']}", flush=True)
        return
    print(
        f"  torch: backward {_ms(t['backward_median_s'])} ms, with reference "
        f"{_ms(t['backward_with_reference_median_s'])} ms -> reference cost "
        f"{_ms(t['reference_cost_s'])} ms; aggc_optax update {_ms(t['aggc_update_median_s'])} ms;"
        f" speed-up {t['speedup']:.1f}x (inside an AdamW step {_times(t['speedup_in_step'])})",
        flush=True,
    )


def to_markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    dev = result["device"]
    out = [
        "# AGGC benchmark",
        "",
        f"- command: `{result['command']}`",
        f"- date: {result['date']}; wall time {result['wall_s']:.0f} s",
        f"- device: {dev['kind']} ({dev['description']}); CPU: {env['cpu_model']}, "
        f"{env['cpu_count']} logical cores",
        f"- versions: python {env['python']}, jax {env['jax']}, jaxlib {env['jaxlib']}, "
        f"optax {env['optax']}, numpy {env['numpy']}, torch {env.get('torch', '-')}",
        f"- copy bandwidth (jitted x + 1 over {_mib(result['bandwidth']['buffer_bytes'])} MiB, "
        f"read + write): {result['bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s",
        f"- repeats: {result['settings']['repeats']} timed rounds after "
        f"{result['settings']['warmup']} warm-up rounds; medians; methods alternate",
        "",
    ]
    sizes = [r for r in result["sizes"] if "updates" in r]
    skipped = [r for r in result["sizes"] if "skipped" in r]
    if sizes:
        out += [
            "## Step time (one jitted update, params and state donated)",
            "",
            _table(
                [
                    "size",
                    "params",
                    "leaves",
                    "groups",
                    "dtype",
                    "adamw ms",
                    "global+adamw ms",
                    "fused global+adamw ms",
                    "aggc+adamw ms",
                    "aggc/global (paired)",
                    "aggc/fused global (paired)",
                    "clip cost ms: aggc",
                    "global",
                    "fused global",
                    "1 grad read ms",
                ],
                [
                    [
                        r["size"],
                        _human(r["params"]),
                        r["leaves"],
                        r["groups"],
                        r["dtype"],
                        _ms(r["updates"]["adamw"]["step_median_s"]),
                        _ms(r["updates"]["global"]["step_median_s"]),
                        _ms(r["updates"]["global_fused"]["step_median_s"]),
                        _ms(r["updates"]["aggc"]["step_median_s"]),
                        f"{r['step_ratio']:.3f} ({r['step_ratio_paired']:.3f})",
                        f"{r['step_ratio_fused']:.3f} ({r['step_ratio_fused_paired']:.3f})",
                        _ms(r["aggc_cost_s"]),
                        _ms(r["global_cost_s"]),
                        _ms(r["global_fused_cost_s"]),
                        _ms(r["grad_read_s"]),
                    ]
                    for r in sizes
                ],
            ),
            "",
            "Medians over the timed rounds; (paired) = median of the per-round ratios; "
            "global = `optax.clip_by_global_norm`; fused global = the same clip as one "
            "scalar factor (`fused_global_clip` in the script); clip cost = method - adamw; "
            "1 grad read = gradient bytes / copy bandwidth.",
            "",
            "## Compile time and compiled temporary memory",
            "",
            f"Cold compiles (JAX's caches cleared first), best of "
            f"{result['settings']['compile_repeats']}; compile CPU s = the process's CPU "
            "time during the compile; temp = `compiled.memory_analysis().temp_size_in_bytes`.",
            "",
            _table(
                [
                    "size",
                    "compile s adamw",
                    "global",
                    "fused global",
                    "aggc",
                    "aggc/global",
                    "compile CPU s aggc/global",
                    "trace+lower s global",
                    "aggc",
                    "temp MiB adamw",
                    "global",
                    "fused global",
                    "aggc",
                    "aggc - global MiB",
                ],
                [
                    [
                        r["size"],
                        f"{r['updates']['adamw']['compile_best_s']:.2f}",
                        f"{r['updates']['global']['compile_best_s']:.2f}",
                        f"{r['updates']['global_fused']['compile_best_s']:.2f}",
                        f"{r['updates']['aggc']['compile_best_s']:.2f}",
                        f"{r['compile_ratio']:.3f}",
                        f"{r['compile_cpu_ratio']:.3f}",
                        f"{r['updates']['global']['lower_best_s']:.2f}",
                        f"{r['updates']['aggc']['lower_best_s']:.2f}",
                        _mib(r["temp_bytes"]["adamw"]),
                        _mib(r["temp_bytes"]["global"]),
                        _mib(r["temp_bytes"]["global_fused"]),
                        _mib(r["temp_bytes"]["aggc"]),
                        "-"
                        if "temp_excess_bytes" not in r
                        else f"{r['temp_excess_bytes'] / MIB:+.3f}",
                    ]
                    for r in sizes
                ],
            ),
            "",
        ]
    for r in skipped:
        out += [f"- size {r['size']} skipped: {r['skipped']}", ""]
    torch_rows = [r for r in sizes if "torch" in r]
    if torch_rows:
        done = [r for r in torch_rows if "skipped" not in r["torch"]]
        out += ["## Against the PyTorch reference clipper", ""]
        if done:
            out += [
                _table(
                    [
                        "size",
                        "backward ms",
                        "backward + reference ms",
                        "reference cost ms",
                        "its step calls ms",
                        "aggc_optax update ms",
                        "speed-up",
                        "paired",
                        "best-of",
                        "aggc cost in aggc+adamw ms",
                        "speed-up in a step",
                    ],
                    [
                        [
                            r["size"],
                            _ms(r["torch"]["backward_median_s"]),
                            _ms(r["torch"]["backward_with_reference_median_s"]),
                            _ms(r["torch"]["reference_cost_s"]),
                            _ms(r["torch"]["reference_step_calls_median_s"]),
                            _ms(r["torch"]["aggc_update_median_s"]),
                            f"{r['torch']['speedup']:.1f}x",
                            f"{r['torch']['speedup_paired']:.1f}x",
                            f"{r['torch']['speedup_best']:.1f}x",
                            _ms(r["aggc_cost_s"]),
                            _times(r["torch"]["speedup_in_step"]),
                        ]
                        for r in done
                    ],
                ),
                "",
                "reference cost = (backward with the reference's hooks + "
                "on_before_optimizer_step + on_step_end) - (the same backward without it); "
                "its step calls = on_before_optimizer_step + on_step_end alone; the "
                "aggc_optax update is the jitted `from_reference_options(...)` update alone, "
                "gradients donated (same options, same gradients, same device); speed-up = "
                "reference cost / aggc_optax update, from medians; paired = from the median "
                "of the per-round differences; best-of = from the fastest round of each; "
                "speed-up in a step = reference cost / AGGC's cost inside the fused "
                "aggc+adamw update (its clip cost in the step-time table).",
                "",
            ]
        for r in torch_rows:
            if "skipped" in r["torch"]:
                out += [f"- {r['size']}: skipped: {r['torch']['skipped']}", ""]
    leaves = result.get("leaf_scaling") or []
    if leaves:
        out += [
            "## Scaling with the number of leaves",
            "",
            _table(
                [
                    "leaves",
                    "groups",
                    "params",
                    "global+adamw ms",
                    "aggc+adamw ms",
                    "aggc/global",
                    "paired",
                    "aggc us/leaf",
                    "compile s global",
                    "aggc",
                    "aggc/global",
                    "compile CPU s global",
                    "aggc",
                    "aggc/global",
                    "temp MiB global",
                    "aggc",
                ],
                [
                    [
                        r["leaves"],
                        r["groups"],
                        _human(r["params"]),
                        _ms(r["step_median_s"]["global"]),
                        _ms(r["step_median_s"]["aggc"]),
                        f"{r['step_ratio']:.3f}",
                        f"{r['step_ratio_paired']:.3f}",
                        f"{1e6 * r['step_median_s']['aggc'] / r['leaves']:.1f}",
                        f"{r['compile_best_s']['global']:.2f}",
                        f"{r['compile_best_s']['aggc']:.2f}",
                        f"{r['compile_ratio']:.3f}",
                        f"{r['compile_cpu_best_s']['global']:.2f}",
                        f"{r['compile_cpu_best_s']['aggc']:.2f}",
                        f"{r['compile_cpu_ratio']:.3f}",
                        _mib(r["temp_bytes"]["global"]),
                        _mib(r["temp_bytes"]["aggc"]),
                    ]
                    for r in leaves
                ],
            ),
            "",
        ]
        fits = result.get("leaf_fits", {})
        if fits:
            out += [
                "Linear fits against the number of leaves: "
                + "; ".join(
                    f"{k}: {v['slope'] * 1e6:.2f} us/leaf, R^2 {v['r2']:.4f}"
                    for k, v in fits.items()
                    if v
                ),
                "",
            ]
    groups = result.get("group_scaling")
    if groups:
        out += [
            f"## Scaling with the number of groups ({groups['leaves']} leaves)",
            "",
            _table(
                [
                    "labels",
                    "groups",
                    "aggc+adamw ms",
                    "aggc/global",
                    "paired",
                    "compile s",
                    "aggc/global",
                    "compile CPU s",
                    "aggc/global",
                    "temp MiB",
                ],
                [
                    [
                        r["labels"],
                        r["groups"],
                        _ms(r["step_median_s"]),
                        f"{r['step_ratio']:.3f}",
                        f"{r['step_ratio_paired']:.3f}",
                        f"{r['compile_best_s']:.2f}",
                        f"{r['compile_ratio']:.3f}",
                        f"{r['compile_cpu_best_s']:.2f}",
                        f"{r['compile_cpu_ratio']:.3f}",
                        _mib(r["temp_bytes"]),
                    ]
                    for r in groups["rows"]
                ],
            ),
            "",
            f"global+adamw on the same tree: {_ms(groups['global_step_median_s'])} ms, "
            f"compile {groups['global_compile_best_s']:.2f} s, temp "
            f"{_mib(groups['global_temp_bytes'])} MiB.",
            "",
        ]
    out += [
        "## Goals",
        "",
        _table(
            ["goal", "measured", "threshold", "status", "note"],
            [
                [g["goal"], g["measured"], g["threshold"], g["status"], g["detail"]]
                for g in result["goals"]
            ],
        ),
        "",
    ]
    return "\n".join(out)


def _jsonable(obj: Any) -> Any:
    """``obj`` with NaN and inf as ``None`` and numpy scalars as Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _environment() -> dict[str, Any]:
    import jaxlib

    env = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "aggc_optax": aggc_optax.__version__,
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import torch

        env["torch"] = torch.__version__
    except Exception:
        env["torch"] = None
    return env


# --------------------------------------------------------------------------- main


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        return [kind(x) for x in text.split(",") if x.strip()]

    return parse


# --- metrics() for loggers (issue 16) ------------------------------------------------
METRICS_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "input_layernorm",
    "post_attention_layernorm",
    "embed_tokens",
    "lm_head",
    "norm",
)


def _naive_metrics(state: Any) -> dict[str, float]:
    # What a user writes without metrics(): one float() (one transfer) per scalar.
    return {
        f"aggc/{label}/{field}": float(value)
        for label, stats in aggc_optax.group_stats(state).items()
        for field, value in stats.items()
    }


def bench_metrics(args: argparse.Namespace) -> dict[str, Any]:
    """Per-call time of ``aggc_optax.metrics`` for 12 groups against the naive flattening."""
    params = {
        "layers": {
            str(i): {m: {"weight": jnp.ones((8, 8))} for m in METRICS_MODULES} for i in range(2)
        }
    }
    tx = optax.chain(
        aggc_optax.aggc(param_labels=lambda name: name.split(".")[2]), optax.adamw(1e-3)
    )
    state = tx.init(params)
    _, state = jax.jit(tx.update)(params, state, params)
    jax.block_until_ready(state)
    calls = {"metrics": aggc_optax.metrics, "naive": _naive_metrics}
    n = args.metrics_repeats
    times: dict[str, list[float]] = {name: [] for name in calls}
    for fn in calls.values():
        fn(state)  # compile
    for _ in range(5):  # alternate, so both see the same machine load
        for name, fn in calls.items():
            t0 = time.perf_counter()
            for _ in range(n):
                fn(state)
            times[name].append((time.perf_counter() - t0) / n)
    best = {name: min(ts) for name, ts in times.items()}
    row = {
        "groups": len(METRICS_MODULES),
        "scalars": len(aggc_optax.metrics(state)),
        "calls_per_round": n,
        "metrics_s": best["metrics"],
        "naive_s": best["naive"],
        "ratio": best["naive"] / best["metrics"],
    }
    print(
        f"metrics(): {row['groups']} groups, {row['scalars']} scalars: "
        f"{row['metrics_s'] * 1e3:.3f} ms per call; naive float() per scalar of group_stats: "
        f"{row['naive_s'] * 1e3:.3f} ms ({row['ratio']:.0f}x slower; best of 5 rounds of {n})",
        flush=True,
    )
    return row


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats (< 1 minute)")
    p.add_argument(
        "--sizes",
        type=_csv(str),
        default=None,
        help=f"comma-separated model sizes out of {', '.join(SIZES)} "
        "(default: 7m,42m,134m on CPU, 7m,134m,1.1b,7b on GPU)",
    )
    p.add_argument(
        "--torch-sizes",
        type=_csv(str),
        default=None,
        help="sizes that also run the PyTorch comparison (default: all CPU sizes; "
        "on GPU those up to 1.1b); 'none' for none",
    )
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per size (30)")
    p.add_argument("--torch-repeats", type=int, default=None, help="timed torch rounds (20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds (3)")
    p.add_argument("--compile-repeats", type=int, default=None, help="cold compiles, best kept (5)")
    p.add_argument(
        "--scaling-leaves",
        type=_csv(str),
        default=None,
        help="leaf counts of the scaling trees (100,500,1000,2000); 'none' to skip",
    )
    p.add_argument(
        "--group-leaves", type=int, default=None, help="tree of the group scaling (500; 0 skips)"
    )
    p.add_argument("--scaling-repeats", type=int, default=None, help="timed rounds (30)")
    p.add_argument(
        "--scaling-compile-repeats", type=int, default=None, help="cold compiles, best kept (2)"
    )
    p.add_argument(
        "--bandwidth-mib", type=int, default=None, help="copy buffer (256 CPU, 4096 GPU)"
    )
    p.add_argument("--out-dir", default="runs/benchmark", help="where the JSON and Markdown go")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    p.add_argument(
        "--metrics-repeats", type=int, default=None, help="metrics() calls per round (1000)"
    )
    p.add_argument(
        "--metrics-only", action="store_true", help="only time aggc_optax.metrics() and exit"
    )
    p.add_argument(
        "--many-leaves",
        type=int,
        default=None,
        metavar="N",
        help="only the many-small-leaves check: N leaves (issue 22: 1000) against "
        "clip_by_global_norm, and the first --sizes tree (134m) step and memory",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=None,
        help="seconds to wait when the torch comparison switches between torch and JAX "
        "(0.3 on CPU, 0 on GPU)",
    )
    args = p.parse_args(argv)

    quick = args.quick
    defaults = {
        "repeats": 5 if quick else 30,
        "torch_repeats": 5 if quick else 20,
        "warmup": 2 if quick else 3,
        "compile_repeats": 1 if quick else 5,
        "scaling_repeats": 5 if quick else 30,
        "scaling_compile_repeats": 1 if quick else 2,
        "group_leaves": 48 if quick else 500,
        "metrics_repeats": 100 if quick else 1000,
        "bandwidth_mib": 64 if quick else (4096 if args.device == "gpu" else 256),
    }
    defaults["settle"] = 0.3 if args.device == "cpu" else 0.0
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.sizes is None:
        args.sizes = list(QUICK_SIZES if quick else DEFAULT_SIZES[args.device])
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown:
        p.error(f"--sizes: unknown size(s) {unknown}; allowed: {list(SIZES)}")
    if args.torch_sizes is None:
        if args.device == "gpu":
            args.torch_sizes = [s for s in args.sizes if SIZES[s].num_params() < 2e9]
        else:
            args.torch_sizes = list(args.sizes)
    elif args.torch_sizes == ["none"]:
        args.torch_sizes = []
    if args.no_torch:
        args.torch_sizes = []
    if args.scaling_leaves is None:
        args.scaling_leaves = [21, 48] if quick else [100, 500, 1000, 2000]
    elif args.scaling_leaves == ["none"]:
        args.scaling_leaves = []
    else:
        try:
            args.scaling_leaves = [int(n) for n in args.scaling_leaves]
        except ValueError:
            p.error(f"--scaling-leaves: expected integers or 'none', got {args.scaling_leaves}")
    for name in ("repeats", "torch_repeats", "scaling_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def _setup_device(kind: str) -> dict[str, Any]:
    if kind == "gpu":
        # Allocate on demand: the torch comparison shares the GPU with JAX.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        jax.config.update("jax_platforms", "cuda")
    else:
        jax.config.update("jax_platforms", "cpu")
    try:
        devices = jax.devices()
    except (RuntimeError, AssertionError) as err:  # jax raises either, by version
        hint = (
            " (a CUDA build of jaxlib is needed, see JAX's install guide)" if kind == "gpu" else ""
        )
        raise SystemExit(
            f"benchmark: --device {kind}, but JAX sees no such device{hint}: {err!r}"
        ) from None
    d = devices[0]
    return {"kind": kind, "description": f"{d.platform}: {d.device_kind}", "count": len(devices)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _parse_args(argv)
    start = time.perf_counter()
    device = _setup_device(args.device)
    env = _environment()
    print(
        f"device {device['description']}; {env['cpu_model']} ({env['cpu_count']} cores); "
        f"jax {env['jax']}, optax {env['optax']}, torch {env['torch']}",
        flush=True,
    )
    if args.metrics_only:
        return {"metrics_logging": bench_metrics(args)}
    if args.many_leaves is not None:
        if args.many_leaves < 1:
            raise SystemExit(f"--many-leaves must be >= 1, got {args.many_leaves}")
        if args.sizes == list(DEFAULT_SIZES[args.device]):
            args.sizes = ["7m" if args.quick else "134m"]
        many = bench_many_leaves(args)
        many["command"] = " ".join(
            ["python", "examples/benchmark.py", *(sys.argv[1:] if argv is None else list(argv))]
        )
        many["environment"] = env
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "many_leaves.json"), "w") as f:
            json.dump(_jsonable(many), f, indent=1, allow_nan=False)
        print_many_leaves(many)
        return many
    bw = measure_copy_bandwidth(args.bandwidth_mib << 20, repeats=10)
    print(f"copy bandwidth: {bw['bytes_per_s'] / 1e9:.1f} GB/s", flush=True)

    result: dict[str, Any] = {
        "command": " ".join(
            ["python", "examples/benchmark.py", *(sys.argv[1:] if argv is None else list(argv))]
        ),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "environment": env,
        "bandwidth": bw,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out_dir",)},
    }
    result["sizes"] = bench_sizes(args, bw["bytes_per_s"])
    result["leaf_scaling"] = bench_leaf_scaling(args) if args.scaling_leaves else []
    if result["leaf_scaling"]:
        ls = result["leaf_scaling"]
        result["leaf_fits"] = {
            f"{m} step": _linear_fit([r["leaves"] for r in ls], [r["step_median_s"][m] for r in ls])
            for m in ("global", "aggc")
        }
    result["group_scaling"] = bench_group_scaling(args) if args.group_leaves > 0 else None
    result["metrics_logging"] = bench_metrics(args)
    result["goals"] = evaluate_goals(result)
    result["wall_s"] = time.perf_counter() - start

    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "benchmark.json"), "w") as f:
        json.dump(_jsonable(result), f, indent=1, allow_nan=False)
    markdown = to_markdown(result)
    with open(os.path.join(args.out_dir, "benchmark.md"), "w") as f:
        f.write(markdown + "\n")
    print()
    print(markdown)
    print(f"\nwrote {args.out_dir}/benchmark.json and benchmark.md ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
