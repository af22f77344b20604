"""Warm-up and fault figures for docs/variants.md, from a real run of the transformations.

A synthetic gradient stream with four groups (q_proj, k_proj, up_proj, down_proj):
each group's gradient is Gaussian noise whose norm follows its own slowly
decaying level times log-normal noise; at steps 120-124 the up_proj gradient
bursts to 30x its level (the fault). Every configuration below is an actual
``optax.GradientTransformation`` run under ``jax.jit`` on that stream.

    PYTHONPATH=. python examples/plot_warmup.py --out-dir docs/img

writes ``warmup.png`` and ``fault.png`` and prints the numbers quoted in
docs/variants.md.
"""

from __future__ import annotations

import argparse
import math
import os

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

import aggc_optax
from aggc_optax import presets

matplotlib.use("Agg")
import matplotlib.pyplot as plt

NAMES = {
    "q_proj": "model.layers.0.self_attn.q_proj.weight",
    "k_proj": "model.layers.0.self_attn.k_proj.weight",
    "up_proj": "model.layers.0.mlp.up_proj.weight",
    "down_proj": "model.layers.0.mlp.down_proj.weight",
}
LEVELS = {"q_proj": 1.0, "k_proj": 0.5, "up_proj": 2.0, "down_proj": 3.0}
BURST = range(120, 125)


def gradient_stream(steps: int, seed: int = 0) -> list[dict[str, jax.Array]]:
    """Per-group gradients with norm level * (1 + exp(-t / 50)) * lognormal(0, 0.15)."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(steps):
        g = {}
        for label, name in NAMES.items():
            x = rng.normal(size=(16, 16))
            level = LEVELS[label] * (1 + math.exp(-t / 50)) * math.exp(0.15 * rng.normal())
            if label == "up_proj" and t in BURST:
                level *= 30.0
            g[name] = jnp.asarray(x / np.linalg.norm(x) * level, jnp.float32)
        out.append(g)
    return out


def _group(stats: dict, label: str) -> dict:
    # per-tensor presets label a group by the tensor's full name
    return stats[label] if label in stats else stats[NAMES[label]]


def run(tx: optax.GradientTransformation, stream) -> dict[str, np.ndarray]:
    """Pre-clip norms, post-clip norms and bounds per group, for every step."""
    state = tx.init(stream[0])
    update = jax.jit(tx.update)
    rows: dict[str, list] = {k: [] for k in ("pre", "post", "upper", "lower")}
    for g in stream:
        out, state = update(g, state)
        rows["pre"].append([float(jnp.linalg.norm(g[n])) for n in NAMES.values()])
        rows["post"].append([float(jnp.linalg.norm(out[n])) for n in NAMES.values()])
        try:
            stats = aggc_optax.group_stats(state)
            rows["upper"].append([float(_group(stats, k)["upper"]) for k in NAMES])
            rows["lower"].append([float(_group(stats, k)["lower"]) for k in NAMES])
        except ValueError:  # no AGGC state (plain optax clipping)
            rows["upper"].append([math.nan] * len(NAMES))
            rows["lower"].append([math.nan] * len(NAMES))
    result = {k: np.asarray(v) for k, v in rows.items()}
    try:
        stats = aggc_optax.group_stats(state)
        result["downs"] = [int(_group(stats, k)["clip_down_count"]) for k in NAMES]
        result["raises"] = [int(_group(stats, k)["raise_count"]) for k in NAMES]
    except ValueError:
        pass
    return result


# a plain interval, no caps: [0.5, 2] x EMA, beta 0.95
PLAIN = dict(ema_beta=0.95, low_mult=0.5, high_mult=2.0, min_norm=0.0, ema_init="zero")


def _plain(**kw):
    """aggc() with PLAIN, ``kw`` overriding it."""
    return aggc_optax.aggc(**{**PLAIN, **kw})


WARMUP_VARIANTS = {
    "reference (zero start)": {},
    "ema_init='first'": {"ema_init": "first"},
    "ema_init='bias_corrected'": {"ema_init": "bias_corrected"},
    "variant='paper'": {"variant": "paper"},
    "paper + first": {"variant": "paper", "ema_init": "first"},
}


def plot_warmup(stream, steps: int, path: str) -> None:
    q = list(NAMES).index("q_proj")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for row, (title, build) in enumerate(
        (
            ("[0.5, 2] x EMA, beta 0.95, no caps", lambda kw: _plain(**kw)),
            ("LoRA SFT recipe (presets.lora_sft)", lambda kw: presets.lora_sft(steps, **kw)),
        )
    ):
        print(f"\nwarm-up, {title}: q_proj scale at steps 0..4 and steps clipped in 0..59")
        for name, kw in WARMUP_VARIANTS.items():
            r = run(build(kw), stream[:60])
            scale = r["post"][:, q] / r["pre"][:, q]
            (line,) = axes[row, 1].plot(scale, label=name, lw=1.4)
            upper = np.where(r["upper"][:, q] > 0, r["upper"][:, q], np.nan)  # 0: no bound
            axes[row, 0].plot(upper, color=line.get_color(), lw=1.4, label=name)
            clipped = int(np.sum(scale < 1 - 1e-6))
            print(f"  {name:24s} {np.round(scale[:5], 3)}  clipped down {clipped:2d}/60")
        axes[row, 0].plot(r["pre"][:, q], color="black", lw=1, ls="--", label="pre-clip norm")
        axes[row, 0].set_yscale("log")
        axes[row, 0].set_ylabel("q_proj upper bound")
        axes[row, 0].set_title(title, fontsize=10)
        axes[row, 1].set_yscale("log" if row == 0 else "linear")
        axes[row, 1].set_ylabel("q_proj scale (post / pre)")
        axes[row, 1].set_title(title, fontsize=10)
    axes[0, 0].legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.suptitle("EMA warm-up: the zero start clips every group to tiny bounds at first")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fault(stream, steps: int, path: str) -> None:
    mlp_tight = {"(up|down)_proj": {"high_mult": 1.2}}
    first = {"ema_init": "first"}
    configs = {  # name: (transformation, plotted)
        "no clipping": (optax.identity(), True),
        "global norm 6.0": (optax.clip_by_global_norm(6.0), True),
        "lora_sft (as published)": (presets.lora_sft(steps), True),
        "lora_sft, max_down_scale=0": (presets.lora_sft(steps, max_down_scale=0.0), False),
        "[0.5, 2] x EMA (reference)": (_plain(), True),
        "[0.5, 2] x EMA, first": (_plain(**first), True),
        "[0.5, 2] x EMA, paper+first": (_plain(**first, variant="paper"), True),
        "[0.5, 2], MLP 1.2": (_plain(group_hyperparams=mlp_tight), False),
        "[0.5, 2], MLP 1.2, first": (
            _plain(**first, group_hyperparams=mlp_tight),
            True,
        ),
        "adagc (per tensor)": (presets.adagc(), True),
    }
    up, q = list(NAMES).index("up_proj"), list(NAMES).index("q_proj")
    window = slice(100, 160)
    fig, axes = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    print("\nfault (up_proj x30 at steps 120-124): post-clip norms")
    print(f"  {'config':26s} {'up_proj@120':>11s} {'up_proj@124':>11s} {'q_proj min scale':>17s}")
    for name, (tx, plotted) in configs.items():
        r = run(tx, stream)
        steps_axis = np.arange(len(stream))[window]
        if plotted:
            axes[0].plot(steps_axis, r["post"][window, up], label=name, lw=1.3)
            scale = r["post"][window, q] / r["pre"][window, q]
            axes[1].plot(steps_axis, scale, label=name, lw=1.3)
        shrink = np.min(
            r["post"][BURST.start : BURST.stop, q] / r["pre"][BURST.start : BURST.stop, q]
        )
        print(f"  {name:26s} {r['post'][120, up]:11.3f} {r['post'][124, up]:11.3f} {shrink:17.3f}")
        if "downs" in r:
            print(f"  {'':26s} clip-down events {dict(zip(NAMES, r['downs']))}")
            print(f"  {'':26s} raise events     {dict(zip(NAMES, r['raises']))}")
    pre = run(optax.identity(), stream)["pre"]
    axes[0].plot(np.arange(len(stream))[window], pre[window, up], "k--", lw=1, label="pre-clip")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("up_proj post-clip norm")
    axes[0].set_title("the burst group", fontsize=10)
    axes[1].set_ylabel("q_proj scale (post / pre)")
    axes[1].set_title("a stable group: global clipping spills over, AGGC does not", fontsize=10)
    axes[1].set_xlabel("step")
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("Fault: up_proj bursts to 30x its level at steps 120-124")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="docs/img")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    stream = gradient_stream(args.steps)
    plot_warmup(stream, args.steps, os.path.join(args.out_dir, "warmup.png"))
    plot_fault(stream, args.steps, os.path.join(args.out_dir, "fault.png"))
    print(f"\nwrote {args.out_dir}/warmup.png and {args.out_dir}/fault.png")


if __name__ == "__main__":
    main()
