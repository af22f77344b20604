"""The paper's GRPO experiment in miniature: GRPO from the SFT model on the generated math task.

The paper (Li, Wu, Chang 2026, Table 5 and Figures 4-5) runs GRPO with verl on
GSM8K and MATH and compares verl's default global-norm clip with the authors'
AGGC clipper. This study does the same at toy scale on part 1's generated
GSM8K-like task (``math_task.py``), starting from part 1's LoRA SFT policy,
under three clippers, every one followed by the same AdamW:

* ``global_clip``: ``optax.clip_by_global_norm(1.0)``, verl's ``actor.grad_clip``
  default (what the paper's "GRPO" rows ran);
* ``grpo_preset``: ``presets.grpo()``, the authors' verl clipper as it ran
  (its linear schedule inert, no global clip after it);
* ``aggc``: ``aggc()`` with this package's defaults.

The GRPO objective is verl's (``grpo.py``): ``G`` completions per prompt at
temperature 1, reward 1 for a correct final answer, group-normalised
advantages, the clipped-ratio loss with the dual clip, the k3 KL term to the
SFT (reference) policy with coefficient 0.001, token-mean aggregation, two
mini-batch updates per rollout batch. Every method of a seed starts from the
same SFT weights and sees the same prompts and the same sampling keys; the
seeds of one method train together (``jax.vmap``), and the methods take turns
step by step, so a run cut short leaves every method at the same step.

Writes ``results.json`` (every run), ``summary.md`` (the tables and the
findings, every sentence computed from the data) and ``paper_grpo_*.png``
(reward, test accuracy, KL and policy-loss curves) to ``--out``.
``--calibrate RATES`` runs GRPO without any clipping at each rate on the
calibration seed only (the protocol's learning-rate choice, made before any
clipper runs). ``--quick`` is a smoke test of the pipeline, not evidence.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
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

import aggc_optax
from aggc_optax import presets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import grpo
from progress import Progress
from stability import _AGGC_DEFAULTS, _floats, _ints
from train_lm import centered_mean, group_factors, group_ids

# ---------------------------------------------------------------------------
# Methods and the protocol.
# ---------------------------------------------------------------------------

Builder = Callable[[int], optax.GradientTransformation]

METHODS: dict[str, tuple[str, Builder]] = {
    "global_clip": (
        "optax.clip_by_global_norm(1.0) (verl's actor.grad_clip default)",
        lambda t: optax.clip_by_global_norm(1.0),
    ),
    "grpo_preset": (
        "presets.grpo() (the authors' verl clipper as it ran: schedule inert, no global clip)",
        lambda t: presets.grpo(),
    ),
    "aggc": (
        f"aggc() with its defaults (high_mult={_AGGC_DEFAULTS['high_mult']}, "
        f"ema_beta={_AGGC_DEFAULTS['ema_beta']}, ema_init={_AGGC_DEFAULTS['ema_init']!r})",
        lambda t: aggc_optax.aggc(),
    ),
}
# Calibration only: the learning rate is chosen with no clipper at all.
NO_CLIP = ("none", "no clipping (calibration only)")
SHORT = {
    "global_clip": "GRPO (global clip 1.0)",
    "grpo_preset": "GRPO + presets.grpo",
    "aggc": "GRPO + aggc()",
    "none": "GRPO, no clipping",
}
COLORS = {"global_clip": "#1f77b4", "grpo_preset": "#2ca02c", "aggc": "#d62728", "none": "#7f7f7f"}
RESCALED_TOL = 1e-4  # a factor further than this from 1 counts as "rescaled"
CALIBRATION_SEED = 100  # never one of the study's seeds

# The paper's Table 5 (GSM8K, MATH accuracy %) and its GRPO hyperparameters (Table 7, §4).
PAPER_TABLE5 = {
    "Qwen 2.5 3B Instruct": {"Base": (86.3, 66.1), "GRPO": (87.9, 66.9), "AGGC": (87.9, 67.2)},
    "Qwen 2.5 1.5B Instruct": {"Base": (73.8, 55.5), "GRPO": (77.6, 58.6), "AGGC": (79.8, 59.1)},
    "Llama 3.2 3B Instruct": {"Base": (78.5, 47.2), "GRPO": (81.4, 49.0), "AGGC": (82.3, 50.2)},
}
PAPER_GRPO = {"batch_size": 512, "lr": 1e-6, "weight_decay": 0.01, "ema_beta": 0.99}
PAPER_SFT_LR = 2e-5  # the paper's LoRA SFT rate (§4, Table 7)


def scaled_lr() -> float:
    """The GRPO rate: part 1's LoRA SFT rate times the paper's GRPO/SFT ratio (1e-6 / 2e-5).

    The paper fine-tunes with LoRA at 2e-5 and runs GRPO (every weight) at 1e-6;
    the miniature keeps that ratio to its own SFT rate rather than tuning one.
    """
    import paper_sft

    return float(paper_sft.PROTOCOL["lr"]) * PAPER_GRPO["lr"] / PAPER_SFT_LR


# The rate check (r0, r0/4, r0/16 without clipping, calibration seed 100) chose r0 from
# part 1's SFT policy at LoRA rate 5e-3 (docs/data/paper_grpo_calibration.json.gz); from the
# two former SFT policies (rate 1e-2, 500 and 1200 steps) it had chosen r0/4
# (paper_grpo_calibration_sft500.json.gz, paper_grpo_calibration_sft1e-2.json.gz;
# docs/paper-miniature-grpo.md, Protocol).
RATE_DIVISOR = 1


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything a run depends on besides the SFT weights (recorded with the results)."""

    steps: int  # rollout batches per run
    prompts_per_step: int
    group_size: int  # G completions per prompt
    max_new: int  # completion bytes sampled at most
    temperature: float
    lr: float  # AdamW, constant (verl's default: no warm-up, no decay)
    weight_decay: float
    b1: float
    b2: float
    adam_eps: float
    clip_ratio: float
    clip_ratio_c: float
    kl_coef: float
    mini_batches: int
    seeds: tuple[int, ...]
    test_problems: int
    eval_every: int
    test_seed: int

    def grpo_config(self) -> grpo.GRPOConfig:
        return grpo.GRPOConfig(
            clip_ratio=self.clip_ratio,
            clip_ratio_c=self.clip_ratio_c,
            kl_coef=self.kl_coef,
            mini_batches=self.mini_batches,
        )

    @property
    def optimizer_steps(self) -> int:
        return self.steps * self.mini_batches

    def eval_steps(self) -> list[int]:
        """The rollout steps after which the test set is scored (0: the SFT start)."""
        return sorted({0, *range(self.eval_every, self.steps, self.eval_every), self.steps})


# ---------------------------------------------------------------------------
# Task and policy: part 1's interface.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Policy:
    """The SFT policy GRPO starts from, and the task it was trained on."""

    graphdef: Any
    params: Any
    task: Any  # a module with generate/score/encode/decode/END (math_task's interface)
    identity: dict[str, Any]


class TaskView:
    """``math_task`` at one difficulty: ``generate(split, num, seed)`` and the scoring."""

    def __init__(self, module: Any, difficulty: Any = None):
        self.module, self.difficulty = module, difficulty
        self.END, self.encode, self.decode = module.END, module.encode, module.decode
        self.score = module.score

    def generate(self, split: str, num: int, seed: int) -> list[Any]:
        if self.difficulty is None:
            return self.module.generate(split, num, seed)
        return self.module.generate(split, num, seed, self.difficulty)


def merge_lora(graphdef: Any, adapters: Any, frozen: Any) -> tuple[Any, Any]:
    """``(graphdef, params)`` of a plain decoder whose kernels are ``W + A @ B``.

    GRPO in the paper trains every weight of the SFT model (verl's actor, no
    adapters), so the SFT adapters are merged into the base weights first
    (``nnx.LoRA`` adds ``x @ A @ B`` unscaled: ``lora_alpha = r``).
    """
    model = nnx.merge(graphdef, adapters, frozen)
    for layer in model.model.layers:
        for block in (layer.self_attn, layer.mlp):
            for name, sub in list(vars(block).items()):
                if isinstance(sub, nnx.LoRA):
                    base = sub.base_module
                    base.kernel[...] = base.kernel[...] + sub.lora_a[...] @ sub.lora_b[...]
                    setattr(block, name, base)
    return nnx.split(model, nnx.Param)


SFT_SEED = 0  # part 1's LoRA-alone SFT run GRPO starts from (the same start for every seed)


def load_policy(args: argparse.Namespace) -> Policy:
    """Part 1's LoRA-alone SFT policy (``paper_base.sft_policy``), adapters merged.

    With ``--corpus`` the base model is first pretrained on that text by part
    1's deterministic recipe (``paper_base.pretrain``), then fine-tuned the same way.
    """
    import math_task
    import paper_base
    import paper_sft

    p = dict(paper_sft.PROTOCOL)
    difficulty = math_task.Difficulty(**p["difficulty"])
    task = TaskView(math_task, difficulty)
    if args.quick:  # a smoke test: the base model itself, no SFT (saves its training)
        graphdef, params = nnx.split(paper_base.load_base(), nnx.Param)
        identity = {"source": "part 1's base model without SFT (quick: not evidence)"}
        return Policy(graphdef, params, task, identity | {"base_sha256": paper_base.BASE_SHA256})
    identity: dict[str, Any] = {
        "source": f"part 1's LoRA-alone SFT policy (paper_sft.PROTOCOL, seed {SFT_SEED}), "
        "adapters merged",
        "sft_protocol": p,
        "base_sha256": paper_base.BASE_SHA256,
    }
    if args.corpus is None:
        base = paper_base.load_base()
    else:
        path = os.path.join(args.out, "base.msgpack")
        pre = paper_base.pretrain(path, args.corpus, quiet=args.quiet)
        base = paper_base.load_base(path, sha256=pre["sha256"])
        identity |= {"base_sha256": pre["sha256"], "corpus": pre["corpus"]}
    cache = args.sft_cache
    if cache is not None and os.path.exists(cache + ".json"):
        with open(cache + ".json") as f:
            saved = json.load(f)
        if (
            saved["identity"]["sft_protocol"] == json.loads(json.dumps(p))
            and saved["identity"]["base_sha256"] == identity["base_sha256"]
        ):
            graphdef, params = nnx.split(paper_base.load_base(), nnx.Param)
            with open(cache, "rb") as f:
                loaded = serialization.msgpack_restore(f.read())
            params.replace_by_pure_dict(jax.tree.map(jnp.asarray, loaded))
            if params_sha256(params) != saved["sha256"]:
                raise ValueError(
                    f"--sft-cache {cache}: the weights' SHA-256 differs from {cache}.json"
                )
            return Policy(graphdef, params, task, saved["identity"])
    data = paper_sft.make_data(p)
    out = paper_sft.train_runs("lora", p["ranks"][0], [SFT_SEED], p, data, base)
    adapters = jax.tree.map(lambda x: x[0], out["trained"])
    graphdef, params = merge_lora(out["graphdef"], adapters, out["frozen"])
    identity["sft_test_accuracy"] = float(np.mean(out["correct"][0]))
    if cache is not None:  # the calibration check and the study start from the same weights
        with open(cache, "wb") as f:
            pure = jax.tree.map(np.asarray, params.to_pure_dict())
            f.write(serialization.msgpack_serialize(pure))
        with open(cache + ".json", "w") as f:
            json.dump({"identity": identity, "sha256": params_sha256(params)}, f)
    return Policy(graphdef, params, task, identity)


def params_sha256(params: Any) -> str:
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(params):
        h.update(np.asarray(leaf, np.float32).tobytes())
    return h.hexdigest()


def left_pad(rows: Sequence[Sequence[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids right-aligned in ``[n, length]`` and the mask of real tokens."""
    ids = np.zeros((len(rows), length), np.int32)
    valid = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        if len(row) > length:
            raise ValueError(f"prompt {i} has {len(row)} tokens, more than {length}")
        ids[i, length - len(row) :] = row
        valid[i, length - len(row) :] = True
    return ids, valid


def completion_texts(task: Any, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
    return [task.decode(row[m]) for row, m in zip(tokens, mask.astype(bool))]


@dataclasses.dataclass
class Data:
    """Every seed's prompts (drawn once: the same for every method) and the test set."""

    train: dict[int, list[Any]]  # seed -> steps * prompts_per_step problems
    test: list[Any]
    prompt_len: int


def make_data(task: Any, setup: Setup) -> Data:
    n = setup.steps * setup.prompts_per_step
    train = {s: task.generate("train", n, seed=20_000 + s) for s in setup.seeds}
    test = task.generate("test", setup.test_problems, seed=setup.test_seed)
    longest = max(len(task.encode(p.prompt)) for ps in [*train.values(), test] for p in ps)
    return Data(train, test, longest)


# ---------------------------------------------------------------------------
# Training: every method, its seeds vmapped, the methods taking turns.
# ---------------------------------------------------------------------------


def groups_of(params: Any) -> tuple[list[str], list[int]]:
    labels = list(aggc_optax.describe_groups(params)["groups"])
    return labels, group_ids(params, labels)


class Runner:
    """The compiled functions of one study (one model, one setup)."""

    def __init__(self, policy: Policy, setup: Setup, data: Data):
        self.policy, self.setup, self.data = policy, setup, data
        task, graphdef = policy.task, policy.graphdef
        eos = task.encode(task.END)
        if len(eos) != 1:
            raise ValueError(f"the task's END {task.END!r} must be one token")
        gen = dict(max_new=setup.max_new, eos_id=eos[0], pad_id=0)

        def sample(params: Any, prompts: Any, valid: Any, key: Any) -> Any:
            model = nnx.merge(graphdef, params)
            return grpo.generate(model, prompts, valid, key, temperature=setup.temperature, **gen)

        def greedy(params: Any, prompts: Any, valid: Any) -> Any:
            model = nnx.merge(graphdef, params)
            key = jax.random.PRNGKey(0)  # unused at temperature 0
            return grpo.generate(model, prompts, valid, key, temperature=0.0, **gen)

        self.sample = jax.jit(jax.vmap(sample))
        self.greedy = jax.jit(jax.vmap(greedy, in_axes=(0, None, None)))
        self.labels, self.ids = groups_of(policy.params)
        test_ids = [task.encode(p.prompt) for p in data.test]
        self.test_prompts, self.test_valid = left_pad(test_ids, data.prompt_len)

    def make_update(self, clipper: optax.GradientTransformation) -> Any:
        s = self.setup
        adam = grpo.adamw_direction(s.b1, s.b2, s.adam_eps, s.weight_decay)
        update = grpo.make_update(
            self.policy.graphdef,
            clipper,
            adam,
            s.grpo_config(),
            s.group_size,
            self.ids,
            len(self.labels),
        )
        init = jax.jit(jax.vmap(lambda p: (clipper.init(p), adam.init(p))))
        return init, jax.jit(jax.vmap(update, in_axes=(0, 0, None, 0, 0)), donate_argnums=(0, 1))

    def rollout_prompts(self, seeds: Sequence[int], step: int) -> tuple[list[list[Any]], Any]:
        s = self.setup
        lo, hi = step * s.prompts_per_step, (step + 1) * s.prompts_per_step
        problems = [
            [p for p in self.data.train[seed][lo:hi] for _ in range(s.group_size)] for seed in seeds
        ]
        arrays = [
            left_pad([self.policy.task.encode(p.prompt) for p in ps], self.data.prompt_len)
            for ps in problems
        ]
        return problems, tuple(np.stack(a) for a in zip(*arrays))

    def test_accuracy(self, params: Any, chunk: int = 256) -> np.ndarray:
        """``[runs, problems]``: 1 where greedy decoding gets the final answer right."""
        rows = []
        for lo in range(0, len(self.data.test), chunk):
            hi = lo + chunk
            toks, mask = jax.device_get(
                self.greedy(params, self.test_prompts[lo:hi], self.test_valid[lo:hi])
            )
            rows.append(
                [
                    self.policy.task.score(
                        completion_texts(self.policy.task, t, m), self.data.test[lo:hi]
                    )
                    for t, m in zip(toks, mask)
                ]
            )
        return np.concatenate([np.asarray(r) for r in rows], axis=1)


@dataclasses.dataclass(frozen=True)
class Run:
    method: str
    seed: int
    lr: float


def train(
    runner: Runner, methods: Sequence[str], runs: Sequence[Run], bar: Progress
) -> dict[str, dict[str, Any]]:
    """Every method's runs; returns per method the curves of each of its runs."""
    setup, policy = runner.setup, runner.policy
    seeds = [r.seed for r in runs]
    keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
    lrs = jnp.asarray([r.lr for r in runs], jnp.float32)
    state: dict[str, Any] = {}
    for m in methods:
        clipper = optax.identity() if m == NO_CLIP[0] else METHODS[m][1](setup.optimizer_steps)
        init, update = runner.make_update(clipper)
        params = jax.tree.map(lambda x: jnp.stack([x] * len(runs)), policy.params)
        state[m] = {
            "params": params,
            "opt": init(params),
            "update": update,
            "reward": [],
            "length": [],
            "metrics": [],
            "eval": {},
        }
    eval_at = set(setup.eval_steps())

    def evaluate(step: int) -> None:
        for m in methods:
            state[m]["eval"][step] = runner.test_accuracy(state[m]["params"])

    # Every run starts from the same weights: the start is scored once.
    first = jax.tree.map(lambda x: x[:1], state[methods[0]]["params"])
    start = np.repeat(runner.test_accuracy(first), len(runs), axis=0)
    for m in methods:
        state[m]["eval"][0] = start
    for step in range(setup.steps):
        problems, (prompts, valid) = runner.rollout_prompts(seeds, step)
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
        status = []
        for m in methods:
            st = state[m]
            toks, mask = jax.device_get(runner.sample(st["params"], prompts, valid, step_keys))
            rewards = np.stack(
                [
                    policy.task.score(completion_texts(policy.task, t, k), ps)
                    for t, k, ps in zip(toks, mask, problems)
                ]
            ).astype(np.float32)
            batch = {
                "prompts": jnp.asarray(prompts),
                "prompt_valid": jnp.asarray(valid),
                "completions": jnp.asarray(toks),
                "mask": jnp.asarray(mask),
                "rewards": jnp.asarray(rewards),
            }
            st["params"], st["opt"], metrics = st["update"](
                st["params"], st["opt"], policy.params, batch, lrs
            )
            st["reward"].append(rewards.mean(axis=1))
            st["length"].append(mask.sum(axis=2).mean(axis=1))
            st["metrics"].append(metrics)
            status.append(f"{m} r={rewards.mean():.2f}")
        if step + 1 in eval_at:
            evaluate(step + 1)
        bar.update(len(methods), " ".join(status))

    out = {}
    for m in methods:
        st = state[m]
        metrics = jax.device_get(st["metrics"])  # steps x {name: [runs, mini_batches, ...]}
        cat = {
            k: np.concatenate([np.asarray(x[k]) for x in metrics], axis=1) for k in metrics[0]
        }  # [runs, optimizer steps, ...]
        out[m] = {
            "reward": np.asarray(st["reward"]).T,  # [runs, steps]
            "length": np.asarray(st["length"]).T,
            **cat,
            "eval": {k: v for k, v in sorted(st["eval"].items())},  # step -> [runs, problems]
        }
    return out


# ---------------------------------------------------------------------------
# Records and analysis: every number of the summary, from the recorded runs.
# ---------------------------------------------------------------------------


def run_records(results: dict[str, dict[str, Any]], runs: Sequence[Run]) -> list[dict[str, Any]]:
    records = []
    for m, r in results.items():
        for i, run in enumerate(runs):
            before, after = r["norms_before"][i], r["norms_after"][i]  # [opt steps, groups]
            factors = group_factors(before, after)
            rescaled = np.abs(factors - 1.0) > RESCALED_TOL
            records.append(
                {
                    "method": m,
                    "seed": run.seed,
                    "lr": run.lr,
                    "reward": [round(float(x), 5) for x in r["reward"][i]],
                    "response_length": [round(float(x), 3) for x in r["length"][i]],
                    "pg_loss": [round(float(x), 6) for x in r["pg_loss"][i]],
                    "kl": [float(f"{x:.6g}") for x in r["kl"][i]],
                    "clipfrac": [round(float(x), 6) for x in r["clipfrac"][i]],
                    "grad_norm": [float(f"{x:.6g}") for x in np.sqrt((before**2).sum(-1))],
                    "clipped_norm": [float(f"{x:.6g}") for x in np.sqrt((after**2).sum(-1))],
                    "rescaled_fraction": [round(float(x), 6) for x in rescaled.mean(0)],
                    "mean_factor": [round(float(x), 6) for x in factors.mean(0)],
                    "eval": {
                        str(step): "".join("1" if c else "0" for c in v[i] > 0.5)
                        for step, v in r["eval"].items()
                    },
                }
            )
    return records


def accuracy_of(bits: str) -> float:
    return bits.count("1") / len(bits)


def standard_error(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


BOOTSTRAP = 2000


VANISHING = 1e-6  # a first gradient norm below this times the run's median: vanishing
STALLED = 0.01  # a run whose clipper left less than this of the norm on most steps


def vanishing_first(run: dict[str, Any]) -> bool:
    """Whether the run's first gradient norm is below VANISHING times its median."""
    norms = np.asarray(run["grad_norm"], float)
    return bool(norms[0] < VANISHING * np.median(norms))


def kept_median(runs: Sequence[dict[str, Any]]) -> float:
    """Median over the runs' optimizer steps (with a nonzero gradient) of the fraction of
    the gradient's global norm left after the clipper."""
    before = np.concatenate([np.asarray(r["grad_norm"], float) for r in runs])
    after = np.concatenate([np.asarray(r["clipped_norm"], float) for r in runs])
    live = before > 0
    return float(np.median(after[live] / before[live])) if live.any() else float("nan")


def problem_bootstrap(a: Sequence[str], b: Sequence[str], num: int = BOOTSTRAP) -> list[float]:
    """95% percentile interval of the seed-mean accuracy difference ``a - b``, resampling
    test problems (the same problems for every seed): the test set's sampling error only,
    not the seeds'."""
    diff = np.array([[int(x) - int(y) for x, y in zip(ra, rb)] for ra, rb in zip(a, b)], float)
    per_problem = diff.mean(axis=0)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, per_problem.size, size=(num, per_problem.size))
    means = per_problem[idx].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def analyse(record: dict[str, Any]) -> dict[str, Any]:
    """The summary's numbers, from ``record["runs"]`` alone."""
    setup = record["setup"]
    seeds, last = setup["seeds"], str(setup["steps"])
    methods = [m for m in record["methods"]]
    by = {(r["method"], r["seed"]): r for r in record["runs"]}
    base = {s: accuracy_of(by[(methods[0], s)]["eval"]["0"]) for s in seeds}
    n_test = len(by[(methods[0], seeds[0])]["eval"]["0"])
    half = setup["steps"] * setup["mini_batches"] // 2
    tail = max(1, setup["steps"] // 10)
    out: dict[str, Any] = {"base": base, "n_test": n_test, "methods": {}}
    for m in methods:
        final = {s: accuracy_of(by[(m, s)]["eval"][last]) for s in seeds}
        kl = np.array([by[(m, s)]["kl"] for s in seeds])
        pg = np.array([by[(m, s)]["pg_loss"] for s in seeds])
        reward = np.array([by[(m, s)]["reward"] for s in seeds])
        acc = np.array(list(final.values()))
        out["methods"][m] = {
            "final": final,
            "mean": float(acc.mean()),
            "std": float(acc.std(ddof=1)) if acc.size > 1 else 0.0,
            "gain_over_base": {s: final[s] - base[s] for s in seeds},
            "reward_first": float(reward[:, :tail].mean()),
            "reward_last": float(reward[:, -tail:].mean()),
            "kl_first_half": float(kl[:, :half].mean()),
            "kl_second_half": float(kl[:, half:].mean()),
            "kl_final": float(kl[:, -tail * setup["mini_batches"] :].mean()),
            "pg_loss_mean": float(pg.mean()),
            "rescaled_fraction": float(
                np.mean([np.mean(by[(m, s)]["rescaled_fraction"]) for s in seeds])
            ),
            # at step 1 params == reference: the k3 gradient is 0, and so is the whole
            # gradient when every group's rewards are uniform (zero advantages)
            "vanishing_first_gradient": [s for s in seeds if vanishing_first(by[(m, s)])],
            "stalled": [s for s in seeds if kept_median([by[(m, s)]]) < STALLED],
            "kl_last10": {s: float(np.mean(by[(m, s)]["kl"][-10:])) for s in seeds},
            "kept_norm_median": kept_median([by[(m, s)] for s in seeds]),
        }
    ref = "global_clip"
    if ref in out["methods"]:
        for m in methods:
            if m == ref:
                continue
            d = {s: out["methods"][m]["final"][s] - out["methods"][ref]["final"][s] for s in seeds}
            out["methods"][m]["diff_vs_global"] = d
            out["methods"][m]["wins_vs_global"] = sum(v > 0 for v in d.values())
            out["methods"][m]["ties_vs_global"] = sum(v == 0 for v in d.values())
            out["methods"][m]["bootstrap_vs_global"] = problem_bootstrap(
                [by[(m, s)]["eval"][last] for s in seeds],
                [by[(ref, s)]["eval"][last] for s in seeds],
            )
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def table_md(analysis: dict[str, Any], setup: dict[str, Any]) -> str:
    """The paper's Table 5 form: strategy and accuracy, beside the paper's Qwen2.5-1.5B numbers."""
    n = analysis["n_test"]
    base = np.array(list(analysis["base"].values()))
    paper = PAPER_TABLE5["Qwen 2.5 1.5B Instruct"]
    lines = [
        f"| strategy | test accuracy % (mean ± std over {len(setup['seeds'])} seeds) | "
        "per seed | paper, Qwen2.5-1.5B GSM8K | paper, MATH |",
        "|---|---|---|---|---|",
        f"| Base (the SFT policy, greedy) | {_pct(base.mean())} "
        f"(± {_pct(standard_error(base.mean(), n))} s.e., n={n}) | "
        f"{', '.join(_pct(x) for x in base)} | {paper['Base'][0]} | {paper['Base'][1]} |",
    ]
    rows = {"global_clip": "GRPO", "grpo_preset": "AGGC", "aggc": None}
    for m, a in analysis["methods"].items():
        p = rows.get(m)
        cells = f"{paper[p][0]} | {paper[p][1]}" if p else "— | —"
        lines.append(
            f"| {SHORT[m]} | {_pct(a['mean'])} ± {_pct(a['std'])} | "
            f"{', '.join(_pct(x) for x in a['final'].values())} | {cells} |"
        )
    return "\n".join(lines) + "\n"


def findings(analysis: dict[str, Any], setup: dict[str, Any]) -> list[str]:
    """The summary's sentences, each computed from ``analysis``."""
    seeds, n = setup["seeds"], analysis["n_test"]
    se = max(standard_error(a["mean"], n) for a in analysis["methods"].values())
    out = []
    base = float(np.mean(list(analysis["base"].values())))
    for m, a in analysis["methods"].items():
        up = sum(v > 0 for v in a["gain_over_base"].values())
        out.append(
            f"{SHORT[m]}: test accuracy {_pct(a['mean'])}% (the SFT start {_pct(base)}%), "
            f"above the SFT start on {up} of {len(seeds)} seeds; mean training reward "
            f"{a['reward_first']:.3f} in the first tenth of the steps, "
            f"{a['reward_last']:.3f} in the last."
        )
    for m, a in analysis["methods"].items():
        if "diff_vs_global" not in a:
            continue
        d = np.array(list(a["diff_vs_global"].values()))
        size = "within" if abs(d.mean()) <= se else "beyond"
        lo, hi = a["bootstrap_vs_global"]
        zero = "includes" if lo <= 0 <= hi else "excludes"
        out.append(
            f"{SHORT[m]} against the global clip: mean paired difference {100 * d.mean():+.1f} "
            f"points (per seed {', '.join(f'{100 * x:+.1f}' for x in d)}), higher on "
            f"{a['wins_vs_global']} of {len(seeds)} seeds; the mean difference is {size} one "
            f"standard error of a single run's accuracy ({100 * se:.1f} points, n={n}), and "
            f"its 95% interval over resampled test problems, [{100 * lo:+.1f}, {100 * hi:+.1f}], "
            f"{zero} 0."
        )
    g = analysis["methods"].get("global_clip")
    if g is not None:
        for m, a in analysis["methods"].items():
            if m == "global_clip":
                continue
            early = "above" if a["kl_first_half"] > g["kl_first_half"] else "not above"
            late = "below" if a["kl_second_half"] < g["kl_second_half"] else "not below"
            pg = "below" if a["pg_loss_mean"] < g["pg_loss_mean"] else "not below"
            holds = early == "above" and late == "below" and pg == "below"
            out.append(
                f"Figure 4's pattern for {SHORT[m]}: KL {early} the global clip's in the first "
                f"half ({a['kl_first_half']:.2e} against {g['kl_first_half']:.2e}), {late} it in "
                f"the second ({a['kl_second_half']:.2e} against {g['kl_second_half']:.2e}); mean "
                f"policy loss {pg} it ({a['pg_loss_mean']:+.4f} against {g['pg_loss_mean']:+.4f}): "
                f"the paper's pattern {'holds' if holds else 'does not hold'} here."
            )
    for m, a in analysis["methods"].items():
        out.append(
            f"{SHORT[m]} rescaled {100 * a['rescaled_fraction']:.1f}% of its "
            f"(optimizer step, group) pairs."
        )
    vanish = {m: a["vanishing_first_gradient"] for m, a in analysis["methods"].items()}
    if any(vanish.values()):
        seeds_v = sorted({x for v in vanish.values() for x in v})
        out.append(
            f"The first gradient vanished (norm below {VANISHING:g} of the run's median) on "
            f"seed(s) {seeds_v} for "
            + ", ".join(SHORT[m] for m, v in vanish.items() if v)
            + " (the policy gradient is zero when every group of a mini-batch gets uniform "
            "rewards, and the KL term's gradient is zero up to rounding while the policy "
            "equals the reference)."
        )
    for m, a in analysis["methods"].items():
        if a["stalled"]:
            kl = ", ".join(f"{a['kl_last10'][s]:.1e}" for s in a["stalled"])
            out.append(
                f"{SHORT[m]} left less than {STALLED:g} of the gradient's norm on most steps "
                f"of seed(s) {a['stalled']} (mean KL over the last 10 steps {kl}): "
                "that run barely trained."
                + (
                    " It is the vanishing-first-gradient seed: aggc()'s default "
                    "ema_init='first' starts each group's EMA at that first norm, and bounds "
                    "3 times a near-zero EMA clip every later step to near zero."
                    if m == "aggc" and set(a["stalled"]) <= set(a["vanishing_first_gradient"])
                    else ""
                )
            )
    out.append(
        "Median fraction of the gradient's norm left after the clipper (optimizer steps with "
        "a nonzero gradient, all seeds): "
        + ", ".join(
            f"{SHORT[m]} {a['kept_norm_median']:.3g}" for m, a in analysis["methods"].items()
        )
        + "."
    )
    return out


def results_md(record: dict[str, Any], img: str = "img") -> str:
    """The Results section of ``docs/paper-miniature-grpo.md``: table, figures, findings."""
    setup, analysis = record["setup"], record["analysis"]
    n_runs, opt_steps = len(setup["seeds"]), setup["steps"] * setup["mini_batches"]
    return "\n".join(
        [
            f"Test accuracy after {setup['steps']} rollout steps ({opt_steps} "
            f"optimizer steps), greedy decoding on {analysis['n_test']} held-out problems, "
            f"{n_runs} seeds; beside the paper's Table 5 (Qwen2.5-1.5B Instruct):",
            "",
            table_md(analysis, setup),
            f"![Training reward and test accuracy]({img}/paper_grpo_reward.png)",
            "",
            "Left: mean reward of the sampled completions per rollout step (the paper's "
            "Figure 5); right: test accuracy at the evaluation steps. Thin lines: single seeds.",
            "",
            f"![KL and policy loss]({img}/paper_grpo_kl_pg.png)",
            "",
            "The paper's Figure 4: the k3 KL estimate to the reference (SFT) policy and the "
            "clipped-ratio policy loss, per optimizer step.",
            "",
            *[f"- {x}" for x in findings(analysis, setup)],
            "",
        ]
    )


def summary_md(record: dict[str, Any]) -> str:
    setup, analysis = record["setup"], record["analysis"]
    lines = [
        "# GRPO in miniature: global clip vs presets.grpo vs aggc()",
        "",
        f"Policy: {record['policy']['source']}. "
        + ("**Quick run: a smoke test of the pipeline, not evidence.**" if record["quick"] else ""),
        "",
        table_md(analysis, setup),
        "## Findings",
        "",
        *[f"- {s}" for s in findings(analysis, setup)],
        "",
        "## Protocol",
        "",
        *[f"- `{k}`: {v}" for k, v in setup.items()],
        f"- methods: {json.dumps(record['methods'])}",
        f"- wall time: {record['seconds']:.0f} s",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Figures.
# ---------------------------------------------------------------------------


def _curves(record: dict[str, Any], key: str) -> dict[str, np.ndarray]:
    out: dict[str, list[list[float]]] = {}
    for r in record["runs"]:
        out.setdefault(r["method"], []).append(r[key])
    return {m: np.asarray(v, float) for m, v in out.items()}


def _save(fig: Any, out: str, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = os.path.join(out, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(record: dict[str, Any], out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setup, written = record["setup"], []
    seeds = len(setup["seeds"])
    width = max(3, setup["steps"] // 15) | 1

    def band(ax: Any, x: np.ndarray, v: np.ndarray, m: str, smooth: int) -> None:
        mean = v.mean(0)
        ax.plot(
            x, centered_mean(mean, smooth) if smooth > 1 else mean, color=COLORS[m], label=SHORT[m]
        )
        for row in v:
            ax.plot(
                x,
                centered_mean(row, smooth) if smooth > 1 else row,
                color=COLORS[m],
                alpha=0.25,
                lw=0.8,
            )

    # Figure 5 form: reward during training; with test accuracy at the evaluation steps.
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for m, v in _curves(record, "reward").items():
        band(ax1, np.arange(1, v.shape[1] + 1), v, m, width)
    ax1.set(
        xlabel="rollout step",
        ylabel="mean reward (fraction correct, sampled)",
        title=f"Training reward (centred mean of {width} steps; thin: {seeds} seeds)",
    )
    ax1.legend()
    for m in record["methods"]:
        steps = sorted(int(s) for s in record["runs"][0]["eval"])
        acc = np.array(
            [
                [accuracy_of(r["eval"][str(s)]) for s in steps]
                for r in record["runs"]
                if r["method"] == m
            ]
        )
        band(ax2, np.asarray(steps), 100 * acc, m, 1)
    ax2.set(
        xlabel="rollout step",
        ylabel="test accuracy % (greedy)",
        title=f"Held-out accuracy (n={record['analysis']['n_test']} problems)",
    )
    written.append(_save(fig, out, "paper_grpo_reward.png"))

    # Figure 4 form: KL to the reference and the policy-gradient loss.
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    w2 = max(3, setup["steps"] * setup["mini_batches"] // 15) | 1
    for m, v in _curves(record, "kl").items():
        band(ax1, np.arange(1, v.shape[1] + 1), v, m, w2)
    for m, v in _curves(record, "pg_loss").items():
        band(ax2, np.arange(1, v.shape[1] + 1), v, m, w2)
    ax1.set(
        xlabel="optimizer step",
        ylabel="k3 KL to the SFT policy (token mean)",
        title=f"KL divergence (centred mean of {w2} steps)",
    )
    ax2.set(
        xlabel="optimizer step",
        ylabel="clipped-ratio policy loss (token mean)",
        title=f"PG loss (centred mean of {w2} steps)",
    )
    ax1.legend()
    written.append(_save(fig, out, "paper_grpo_kl_pg.png"))
    return written


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------


# The protocol (fixed before any clipper ran; see docs/paper-miniature-grpo.md).
DEFAULTS = dict(
    steps=40,
    prompts_per_step=4,
    group_size=8,
    max_new=48,
    temperature=1.0,
    lr=None,  # scaled_lr() / RATE_DIVISOR, resolved at run time
    weight_decay=0.01,
    b1=0.9,
    b2=0.999,
    adam_eps=1e-8,
    clip_ratio=0.2,
    clip_ratio_c=3.0,
    kl_coef=0.001,
    mini_batches=2,
    seeds=(0, 1, 2),
    test_problems=300,
    eval_every=20,
    test_seed=0,
)
QUICK = dict(steps=4, prompts_per_step=2, group_size=4, seeds=(0,), test_problems=16, eval_every=2)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", default=os.path.join("runs", "paper_grpo"), help="output folder")
    p.add_argument("--seeds", type=_ints, default=None, help=f"seeds (default {DEFAULTS['seeds']})")
    p.add_argument(
        "--corpus",
        default=None,
        help="the base model's pretraining text, passed to part 1's loader",
    )
    p.add_argument(
        "--quick", action="store_true", help="a smoke test of the pipeline (not evidence)"
    )
    p.add_argument("--steps", type=int, default=None, help="rollout steps per run")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="AdamW learning rate (default: part 1's SFT rate x 1e-6 / 2e-5, the paper's ratio)",
    )
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {', '.join(METHODS)}",
    )
    p.add_argument(
        "--calibrate",
        type=_floats,
        default=None,
        metavar="RATES",
        help="GRPO without clipping at these rates on the calibration seed only",
    )
    p.add_argument(
        "--sft-cache",
        default=None,
        metavar="PATH",
        help="keep the SFT policy here (reused when part 1's protocol and base are unchanged)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument(
        "--report-from",
        default=None,
        metavar="RESULTS_JSON",
        help="only rewrite summary.md and the PNGs from an earlier results.json",
    )
    args = p.parse_args(argv)
    args.methods = tuple(x for x in args.methods.split(",") if x)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; allowed: {', '.join(METHODS)}")
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds must be distinct, got {args.seeds}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.lr is not None and not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    return args


KL_CEILING = 0.1  # the amended check's bound on the mean KL of the last 10 optimizer steps


def calibration_verdict(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The rate checks of docs/paper-miniature-grpo.md (Protocol), from the no-clip runs.

    ``first_rule`` (written before the check ran): a rate diverges when its mean KL
    over the last 10 optimizer steps exceeds 1 or its mean reward over the last
    third of the steps is below half that of the first third. It rejected every
    rate: the runs share one prompt sequence, so the thirds compare prompts, not
    rates. ``kl_rule`` (amended after that, before any clipper ran): the largest
    rate whose mean KL over the last 10 optimizer steps stays below
    :data:`KL_CEILING`.
    """
    first: dict[str, bool] = {}
    kl_last: dict[str, float] = {}
    for r in runs:
        reward = np.asarray(r["reward"], float)
        third = max(1, reward.size // 3)
        kl = float(np.mean(r["kl"][-10:]))
        kl_last[f"{r['lr']:g}"] = kl
        first[f"{r['lr']:g}"] = bool(
            kl > 1.0 or reward[-third:].mean() < 0.5 * reward[:third].mean()
        )
    fine = [r["lr"] for r in runs if not first[f"{r['lr']:g}"]]
    under = [r["lr"] for r in runs if kl_last[f"{r['lr']:g}"] < KL_CEILING]
    return {
        "first_rule": {"diverged": first, "chosen_lr": max(fine) if fine else None},
        "kl_rule": {"kl_last10": kl_last, "chosen_lr": max(under) if under else None},
        "chosen_lr": max(under) if under else None,
    }


def setup_from_args(args: argparse.Namespace) -> Setup:
    fields = dict(DEFAULTS)
    if args.quick:
        fields.update(QUICK)
    if args.seeds is not None:
        fields["seeds"] = args.seeds
    if args.steps is not None:
        fields["steps"] = args.steps
        fields["eval_every"] = min(fields["eval_every"], args.steps)
    fields["lr"] = args.lr if args.lr is not None else scaled_lr() / RATE_DIVISOR
    if args.calibrate is not None:
        fields["seeds"] = (CALIBRATION_SEED,)
    return Setup(**fields)


def write_reports(record: dict[str, Any], out: str, quiet: bool = False) -> None:
    summary = summary_md(record)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary)
    plot_curves(record, out)
    if not quiet:
        print(summary)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.report_from is not None:
        opener = gzip.open if args.report_from.endswith(".gz") else open
        with opener(args.report_from, "rt") as f:
            record = json.load(f)
        record["analysis"] = analyse(record)  # derived from the runs, never trusted as stored
        write_reports(record, args.out, args.quiet)
        return record
    setup = setup_from_args(args)
    t0 = time.perf_counter()
    policy = load_policy(args)
    data = make_data(policy.task, setup)
    runner = Runner(policy, setup, data)
    if args.calibrate is not None:
        methods = (NO_CLIP[0],)
        runs = [Run(NO_CLIP[0], CALIBRATION_SEED, lr) for lr in args.calibrate]
    else:
        methods = args.methods
        runs = [Run("", s, setup.lr) for s in setup.seeds]
    bar = Progress(setup.steps * len(methods), "grpo", quiet=args.quiet)
    results = train(runner, methods, runs, bar)
    bar.close()
    record = {
        "policy": policy.identity | {"sha256": params_sha256(policy.params)},
        "setup": dataclasses.asdict(setup),
        "methods": {m: (NO_CLIP[1] if m == NO_CLIP[0] else METHODS[m][0]) for m in methods},
        "quick": args.quick,
        "calibration": args.calibrate is not None,
        "labels": runner.labels,
        "prompt_len": data.prompt_len,
        "jax": jax.__version__,
        "optax": optax.__version__,
        "runs": run_records(results, runs),
    }
    record["seconds"] = time.perf_counter() - t0
    record = json.loads(json.dumps(record))  # analysed as the file holds it
    if args.calibrate is None:
        record["analysis"] = analyse(record)
    else:
        record["calibration_verdict"] = calibration_verdict(record["runs"])
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(record, f)
    if args.calibrate is None:
        write_reports(record, args.out, args.quiet)
    elif not args.quiet:
        print(json.dumps(record["calibration_verdict"]))
        for r in record["runs"]:
            rw = np.asarray(r["reward"])
            print(
                f"lr {r['lr']:g}: reward first third {rw[: len(rw) // 3].mean():.3f}, "
                f"last third {rw[-len(rw) // 3 :].mean():.3f}, final kl {r['kl'][-1]:.3g}, "
                f"test acc {accuracy_of(r['eval'][str(setup.steps)]):.3f}"
            )
    return record


if __name__ == "__main__":
    main()
