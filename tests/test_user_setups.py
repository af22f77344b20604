"""Issue 23: real users' setups that used to go silently wrong, written as a user writes them.

Each test builds the setup with the public API only (Flax NNX and Linen models in
their examples' style, optax combinators, Orbax) and checks what happens now. The
shard_map cases run on 8 simulated devices in a child process
(``tests/_user_setups_sharded.py``, through ``test_sharded`` below).
Expectations are hand computations or a float64 recomputation written here.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import aggc_optax
from tests._subprocess_suite import (
    ChildRun,
    assert_child_test_passed,
    child_test_names,
    run_child_suite,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# Orbax abandons pending reads of a failed restore; their coroutines complain when collected.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


# ------------------------------------------------------------------ a small NNX model


class Attention(nnx.Module):
    def __init__(self, d: int, rngs: nnx.Rngs) -> None:
        self.q_proj = nnx.Linear(d, d, rngs=rngs)
        self.v_proj = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + jnp.tanh(self.q_proj(x)) * self.v_proj(x)


class Block(nnx.Module):
    def __init__(self, d: int, rngs: nnx.Rngs) -> None:
        self.self_attn = Attention(d, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.self_attn(x)


class Model(nnx.Module):
    def __init__(self, d: int, rngs: nnx.Rngs) -> None:
        self.layers = nnx.List([Block(d, rngs) for _ in range(2)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return x


D = 4


def _batch(t: int) -> tuple[jax.Array, jax.Array]:
    key = jax.random.fold_in(jax.random.key(7), t)
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (8, D)), jax.random.normal(ky, (8, D))


@nnx.jit
def _train_step(model: Model, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array, k: float):
    def loss_fn(m: Model) -> jax.Array:
        return jnp.mean((m(x) - y) ** 2)

    grads = nnx.grad(loss_fn)(model)
    grads = jax.tree.map(lambda g: k * g, grads)  # k = 100: a spike
    optimizer.update(model, grads)


def _build(param_labels: Any = None) -> tuple[Model, nnx.Optimizer]:
    model = Model(D, nnx.Rngs(0))
    tx = optax.chain(aggc_optax.aggc(param_labels=param_labels), optax.adamw(1e-2))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def _aggc_state(optimizer: nnx.Optimizer) -> aggc_optax.AGGCState:
    (state,) = aggc_optax.find_aggc_states(optimizer.opt_state)
    return state


# ------------------------------------------------ 1. restore into other labels


def _save_default_rule_run(path: Path) -> None:
    model, optimizer = _build()
    for t in range(4):
        _train_step(model, optimizer, *_batch(t), 1.0)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, {"model": nnx.state(model), "optimizer": nnx.state(optimizer)})
    checkpointer.wait_until_finished()
    checkpointer.close()


def _restore_with_module_labels(path: Path) -> tuple[Model, nnx.Optimizer, Any]:
    # what the unlabelled-leaf warning suggests: param_labels=aggc_optax.module_labels
    model, optimizer = _build(aggc_optax.module_labels)
    target = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
    checkpointer = ocp.StandardCheckpointer()
    restored = checkpointer.restore(path, target)  # Orbax: the same shapes, not a word
    checkpointer.close()
    nnx.update(model, restored["model"])
    nnx.update(optimizer, restored["optimizer"])
    return model, optimizer, restored


def test_restore_into_other_labels_restarts_every_group_under_jit(tmp_path: Path) -> None:
    _save_default_rule_run(tmp_path / "ckpt")
    model, optimizer, _ = _restore_with_module_labels(tmp_path / "ckpt")
    state = _aggc_state(optimizer)
    assert list(state.labels) == ["layers.*.self_attn.q_proj", "layers.*.self_attn.v_proj"]
    # the saved arrays belong to 'q_proj' and 'v_proj': no saved group matches a label
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(4, 8):  # jitted steps (nnx.jit), no eager update anywhere
            _train_step(model, optimizer, *_batch(t), 1.0)
        _train_step(model, optimizer, *_batch(8), 100.0)  # a x100 spike
    assert not [w for w in caught if "aggc" in str(w.message)]  # compiled code cannot speak
    stats = aggc_optax.group_stats(optimizer.opt_state)
    state = _aggc_state(optimizer)
    for label, s in stats.items():
        # each group started afresh at the first step after the restore (as at init:
        # EMA from its first norm, counters from 0) and clipped the spike
        assert int(s["restart_count"]) == 1, label
        assert float(s["norm"]) > float(s["upper"]) > 0, label  # the spike ...
        assert float(s["scale"]) == pytest.approx(float(s["upper"] / s["norm"]), rel=1e-5)
        assert int(s["clip_down_count"]) == 1, label  # ... clipped, and only it
    np.testing.assert_array_equal(np.asarray(state.ema_count), [5, 5])
    # the restart is in the metrics too, and said once in words there
    with pytest.warns(UserWarning, match=r"layers\.\*\.self_attn\.q_proj.*started afresh"):
        m = aggc_optax.metrics(optimizer.opt_state)
    assert m["aggc/layers.*.self_attn.q_proj/restart_count"] == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aggc_optax.metrics(optimizer.opt_state)  # once


def test_restore_into_other_labels_is_said_by_check_state_and_eager_update(
    tmp_path: Path,
) -> None:
    _save_default_rule_run(tmp_path / "ckpt")
    _, optimizer, restored = _restore_with_module_labels(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"no saved group.*layers\.\*\.self_attn\.q_proj"):
        aggc_optax.check_state(optimizer.opt_state)
    # an eager update: the same restart as under jit, said once in words
    tx = optax.chain(aggc_optax.aggc(param_labels=aggc_optax.module_labels), optax.sgd(0.1))
    params = nnx.state(Model(D, nnx.Rngs(0)), nnx.Param)
    opt_state = tx.init(params)
    saved = _aggc_state(optimizer)
    state = opt_state[0]._replace(
        **{f: jnp.asarray(getattr(saved, f)) for f in state_array_fields(opt_state[0])}
    )
    grads = jax.tree.map(jnp.ones_like, params)
    with pytest.warns(UserWarning, match=r"no saved group.*q_proj.*started afresh"):
        _, new = tx.update(grads, (state, opt_state[1]), params)
    np.testing.assert_array_equal(np.asarray(new[0].restart_count), [1, 1])
    np.testing.assert_array_equal(np.asarray(new[0].ema_count), [1, 1])
    del restored


def state_array_fields(state: aggc_optax.AGGCState) -> list[str]:
    return [f for f in state._fields if f != "labels"]


def test_groups_in_another_order_are_matched_by_label_under_jit() -> None:
    # the same labels, a group moved (a leaf added earlier in the tree): under jit the
    # EMAs follow their labels, as check_state(reorder=True) would have put them
    q, norm = "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"
    tx = aggc_optax.aggc(ema_beta=0.5)
    state = tx.init({q: jnp.ones(3), norm: jnp.ones(2)})  # groups ['q_proj', 'norm']
    _, state = tx.update({q: jnp.full(3, 2.0), norm: jnp.ones(2)}, state)
    moved_first = "model.a_norm.weight"  # sorts first: 'norm' is now group 0
    labels = lambda name: "norm" if "norm" in name else "q_proj"  # noqa: E731
    tx2 = aggc_optax.aggc(ema_beta=0.5, param_labels=labels)
    params2 = {moved_first: jnp.ones(2), q: jnp.ones(3)}
    target = tx2.init(params2)
    assert list(target.labels) == ["norm", "q_proj"]
    moved = target._replace(**{f: getattr(state, f) for f in state_array_fields(state)})
    g2 = {moved_first: jnp.ones(2), q: jnp.full(3, 2.0)}
    _, jitted = jax.jit(tx2.update)(g2, moved)
    _, by_check = tx2.update(g2, aggc_optax.check_state(moved, reorder=True))
    np.testing.assert_array_equal(np.asarray(jitted.ema), np.asarray(by_check.ema))
    np.testing.assert_array_equal(np.asarray(jitted.restart_count), [0, 0])
    # the EMAs kept their history: norm's first norm was sqrt(2), q_proj's sqrt(12)
    np.testing.assert_allclose(np.asarray(jitted.ema), [np.sqrt(2.0), np.sqrt(12.0)], rtol=1e-6)


# ------------------------------------------------ 2. inject_hyperparams and labelers


def _hf_params() -> dict[str, Any]:
    return {"model": {"layers": {"0": {"self_attn": {"q_proj": {"weight": jnp.ones((2, 2))}}}}}}


def _peft_params() -> dict[str, Any]:
    return {"model.layers.0.self_attn.q_proj.lora_A.default.weight": jnp.ones((2, 2))}


def test_inject_hyperparams_honours_module_labels_without_static_args() -> None:
    params = _hf_params()
    tx = optax.inject_hyperparams(aggc_optax.aggc)(
        param_labels=aggc_optax.module_labels, ema_beta=0.9
    )
    state = tx.init(params)
    assert list(state.inner_state.labels) == ["model.layers.*.self_attn.q_proj"]
    state.hyperparams["ema_beta"] = jnp.asarray(0.5)
    _, state = jax.jit(tx.update)(jax.tree.map(lambda x: 2 * x, params), state)
    assert list(aggc_optax.group_stats(state)) == ["model.layers.*.self_attn.q_proj"]
    assert float(aggc_optax.group_stats(state)["model.layers.*.self_attn.q_proj"]["ema"]) == 4.0
    # a tree_labeler of one's own too
    by_rank = aggc_optax.tree_labeler(lambda t: jax.tree.map(lambda x: f"rank{x.ndim}", t))
    state = optax.inject_hyperparams(aggc_optax.aggc)(param_labels=by_rank).init(params)
    assert list(state.inner_state.labels) == ["rank2"]


@pytest.mark.parametrize(
    "labeler",
    [
        aggc_optax.reference_label,
        aggc_optax.lora_label,
        aggc_optax.regex_labeler([("q_proj", "q")]),
    ],
)
def test_inject_hyperparams_with_a_name_labeler_names_static_args(labeler: Any) -> None:
    tx = optax.inject_hyperparams(aggc_optax.aggc)(param_labels=labeler)
    with pytest.raises(TypeError, match="static_args"):
        tx.init(_peft_params())
    fixed = optax.inject_hyperparams(aggc_optax.aggc, static_args=("param_labels",))
    state = fixed(param_labels=labeler).init(_peft_params())
    assert list(state.inner_state.labels) in (["q_proj"], ["q"])


# ------------------------------------------------ 5. Linen auto-names merged by the default rule


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.LayerNorm()(x)
        return x + nn.Dense(x.shape[-1])(h)


class LinenLM(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for _ in range(2):
            x = LinenBlock()(x)
        x = nn.LayerNorm()(x)
        return nn.Dense(10)(x)  # the LM head: Dense_0 at the top level


def test_default_rule_warns_when_it_merges_linen_modules_of_different_positions() -> None:
    variables = LinenLM().init(jax.random.key(0), jnp.ones((1, 4)))
    groups = aggc_optax.describe_groups(variables)["groups"]
    assert "params.Dense_0.kernel" in groups["Dense_0"]["leaves"]
    assert "params.LinenBlock_0.Dense_0.kernel" in groups["Dense_0"]["leaves"]
    with pytest.warns(UserWarning) as caught:
        aggc_optax.aggc().init(variables)
    text = " ".join(str(w.message) for w in caught)
    assert re.search(r"'Dense_0'.*params\.Dense_0.*params\.LinenBlock_\*\.Dense_0", text), text
    assert "'LayerNorm_0'" in text and "module_labels" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aggc_optax.aggc(param_labels=aggc_optax.module_labels).init(variables)
        # choosing the reference's rule on purpose keeps its grouping without a word
        aggc_optax.aggc(param_labels=aggc_optax.reference_label).init(variables)


def test_default_rule_stays_quiet_on_hugging_face_llama_names() -> None:
    params = {
        "model": {
            "embed_tokens": {"embedding": jnp.ones((5, 2))},
            "layers": {
                str(i): {
                    "self_attn": {"q_proj": {"kernel": jnp.ones((2, 2))}},
                    "mlp": {"down_proj": {"kernel": jnp.ones((2, 2))}},
                    "input_layernorm": {"weight": jnp.ones(2)},
                }
                for i in range(2)
            },
            "norm": {"weight": jnp.ones(2)},
        },
        "lm_head": {"kernel": jnp.ones((2, 5))},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aggc_optax.aggc().init(params)


# ------------------------------------------------ 6. describe_groups and nnx.Optimizer(wrt=)


class ConvNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.linear = nnx.Linear(3, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(nnx.relu(self.bn(self.linear(x))))


def test_describe_groups_follows_what_the_nnx_optimizer_sees() -> None:
    model = ConvNet(nnx.Rngs(0))
    labels = lambda name: name.split(".")[0]  # noqa: E731  # one group per submodule
    optimizer = nnx.Optimizer(model, aggc_optax.aggc(param_labels=labels), wrt=nnx.Param)
    seen = list(_aggc_state(optimizer).labels)
    assert seen == ["bn", "head", "linear"]
    want = {"bn": ["bn.bias", "bn.scale"]}
    # the module itself, or its state with wrt=: only what nnx.Optimizer(wrt=nnx.Param) passes
    for info in (
        aggc_optax.describe_groups(model, labels),
        aggc_optax.describe_groups(nnx.state(model), labels, wrt=nnx.Param),
        aggc_optax.describe_groups(nnx.state(model, nnx.Param), labels),
    ):
        assert list(info["groups"]) == seen
        assert info["groups"]["bn"]["leaves"] == want["bn"]
    # the whole state (BatchNorm's running statistics included) says what it holds
    with pytest.warns(UserWarning, match=r"BatchStat.*wrt=nnx\.Param"):
        info = aggc_optax.describe_groups(nnx.state(model), labels)
    assert "bn.mean" in info["groups"]["bn"]["leaves"]


# ------------------------------------------------ 7. what a newcomer trips over


def test_cli_module_prints_help_and_checks_flags() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "aggc_optax.cli", *a],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    helped = run("--help")
    assert helped.returncode == 0
    for flag in ("--aggc-preset", "--high-mult", "--ema-beta", "--total-steps"):
        assert flag in helped.stdout
    ok = run("--aggc-preset", "grpo", "--ema-beta", "0.9")
    assert ok.returncode == 0 and "valid AGGC transformation" in ok.stdout
    bad = run("--aggc-preset", "adagc", "--low-mult", "0.5")
    assert (
        bad.returncode == 2 and "--low-mult cannot be used with --aggc-preset adagc" in bad.stderr
    )


def test_readme_usage_comment_states_the_default_multiplier() -> None:
    readme = (ROOT / "README.md").read_text()
    (comment,) = re.findall(r"^# defaults: .*$", readme, re.MULTILINE)
    (mult,) = re.findall(r"clipped to (\d+(?:\.\d+)?)x its EMA", comment)
    default = inspect.signature(aggc_optax.aggc).parameters["high_mult"].default
    assert float(mult) == default == 3.0


def test_every_lora_example_option_has_help() -> None:
    sys.path.insert(0, str(EXAMPLES))
    try:
        import lora_example
    finally:
        sys.path.remove(str(EXAMPLES))
    captured: dict[str, argparse.ArgumentParser] = {}
    original = argparse.ArgumentParser.parse_args

    def grab(self: argparse.ArgumentParser, *a: Any, **k: Any) -> Any:
        captured["parser"] = self
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = grab  # type: ignore[method-assign]
    try:
        with pytest.raises(SystemExit):
            lora_example.main([])
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
    actions = [a for a in captured["parser"]._actions if a.option_strings]
    assert len(actions) == 12  # -h and the 11 options
    for action in actions:
        assert action.help and action.help.strip(), action.option_strings


def test_pytest_ignores_only_paths_that_exist() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    (addopts,) = re.findall(r'^addopts = "([^"]*)"', text, re.MULTILINE)
    for opt in addopts.split():
        if opt.startswith("--ignore="):
            assert (ROOT / opt.split("=", 1)[1]).exists(), opt


def test_progress_estimate_leaves_out_the_compiling_first_step(capsys: Any) -> None:
    sys.path.insert(0, str(EXAMPLES))
    try:
        import progress
    finally:
        sys.path.remove(str(EXAMPLES))
    now = [0.0]
    bar = progress.Progress(100, "training", lines=100, clock=lambda: now[0])
    bar._bar = None  # the plain-line form: the same estimate, printed
    now[0] = 60.0  # the first step compiles for a minute
    bar.update(1)
    assert "after the first steps" in bar.left()
    for _ in range(9):
        now[0] += 1.0  # then one second per step
        bar.update(1)
    # 90 steps left at 1 s each: 1:30, not (69 s / 10 steps) x 90 = 10:21
    assert bar.left() == "~1:30 left"
    assert "~1:30 left" in capsys.readouterr().out


# ------------------------------------------------ 3 and 4: shard_map on 8 devices

SUITE = Path(__file__).with_name("_user_setups_sharded.py")


@pytest.fixture(scope="module")
def child_run(tmp_path_factory: Any) -> ChildRun:
    junit = tmp_path_factory.mktemp("user_setups_sharded") / "junit.xml"
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    return run_child_suite(
        SUITE, junit, {"XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"}, 300.0
    )


def test_sharded_child_suite_exit_status(child_run: ChildRun) -> None:
    assert child_run.returncode == 0, child_run.output[-6000:]


@pytest.mark.parametrize("function", child_test_names(SUITE))
def test_sharded(child_run: ChildRun, function: str) -> None:
    assert_child_test_passed(child_run, function)


def test_reliability_doc_table_names_tests_that_exist() -> None:
    text = (ROOT / "docs" / "reliability.md").read_text()
    block = text.split("<!-- user-setups-table:start -->")[1].split(
        "<!-- user-setups-table:end -->"
    )[0]
    named = re.findall(r"\| `(test_\w+)` \|$", block, re.MULTILINE)
    rows = [line for line in block.splitlines() if line.startswith("| ") and "`test_" in line]
    assert len(named) == len(rows) >= 12
    here = set(globals())
    child = set(child_test_names(SUITE))
    for name in named:
        assert name in here or name in child, name
