"""Cross-framework parity: the PyTorch reference against from_reference_options, on CPU.

Every configuration of the harness runs here (short trajectories, so CI stays
fast); the CUDA variants are marked ``cuda`` and run where both PyTorch and JAX
see a CUDA device.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import aggc_optax
from aggc_optax import parity, torch_reference

REPO_ROOT = Path(__file__).resolve().parents[1]
CI_STEPS = 20  # every event of the trajectory happens in 20 steps (the last first at step 12)

# Written by hand from the names of parity_shapes() and spec section 2.
EXPECTED_GROUPS = {
    "embed_tokens",
    "input_layernorm",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "post_attention_layernorm",
    "gate_proj",
    "up_proj",
    "down_proj",
    "norm",
    "lm_head",
}


@pytest.mark.parametrize("name", sorted(parity.CONFIGS))
def test_every_configuration_agrees_on_cpu(name):
    result = parity.run_parity(name, steps=CI_STEPS, device="cpu")
    print(result.table())
    assert set(result.labels) == EXPECTED_GROUPS
    assert not result.problems
    assert result.branch_mismatches == []
    for quantity, (value, step, where) in result.worst.items():
        assert value <= parity.TOLERANCE, (quantity, value, step, where)
    assert result.ok
    # Float32 against float64: not bit-identical, so the comparison is really made.
    assert 0 < result.worst["norm"][0] < 1e-5
    assert result.branch_counts.get("down", 0) > 0
    config = parity.CONFIGS[name]
    if config.options.get("raise_small"):
        assert result.branch_counts.get("raise", 0) > 0
    if config.nonfinite:
        assert result.nonfinite > 0
    else:
        assert result.nonfinite == 0


@pytest.mark.parametrize("name", sorted(parity.CONFIGS))
def test_every_configuration_agrees_to_float64_rounding_with_x64(name):
    # Exact-sum trajectory, JAX statistics in float64: only float64 rounding is left.
    result = parity.run_parity(name, steps=CI_STEPS, device="cpu", x64=True)
    print(result.table())
    assert result.tolerance == parity.X64_TOLERANCE == 1e-12
    assert result.ok, result.table()
    assert result.worst["clipped grads"][0] == 0.0  # both multiply by float32(scale)


Q = "model.layers.0.self_attn.q_proj.weight"
STATIC = {"enable": True, "auto_bounds": False, "max_norm": 10.0}


@pytest.mark.parametrize(
    ("options", "grad", "branch", "scale"),
    [
        ({**STATIC, "max_norm": 1.0 - 5e-13}, [1.0], "none", 1.0),
        ({**STATIC, "max_norm": 1.0 - 2e-12}, [1.0], "down", (1.0 - 2e-12) / (1.0 + 1e-12)),
        ({**STATIC, "min_norm": 1.0 + 5e-13, "raise_small": True}, [1.0], "none", 1.0),
        (
            {**STATIC, "min_norm": 1.0 + 2e-12, "raise_small": True},
            [1.0],
            "raise",
            (1.0 + 2e-12) / (1.0 + 1e-12),
        ),
        ({**STATIC, "max_norm": 1.0, "max_down_scale": 1.5}, [3.0, 4.0], "down", 1.5),
        (
            {**STATIC, "min_norm": 50.0, "raise_small": True, "max_up_scale": 0.5},
            [3.0],
            "raise",
            0.5,
        ),
        (
            {"enable": True, "auto_bounds": True, "min_norm": 0.05, "raise_small": True},
            [0.0, 0.0],
            "raise",
            0.05 / (1e-8 + 1e-12),
        ),
    ],
    ids=[
        "eps_keep",
        "eps_clip",
        "eps_no_raise",
        "eps_raise",
        "inverted_floor",
        "inverted_ceiling",
        "zero_raised",
    ],
)
def test_x64_edges_agree_exactly(options, grad, branch, scale):
    # Spec 4's edges sit 1e-12 apart: only float64 statistics can resolve them.
    trajectory = [{Q: np.float32(grad)}] * 2
    ref = parity.run_reference(options, trajectory, total_steps=None)
    jx = parity.run_jax(options, trajectory, total_steps=None, x64=True)
    assert ref.branches[0][Q.split(".")[-2]] == branch
    assert ref.stats[0]["q_proj"]["scale"] == scale
    assert ref.branches == jx.branches
    for rs, js in zip(ref.stats, jx.stats):
        for f in ("norm", "lower", "upper", "scale", "ema"):
            assert parity.relative_difference(rs["q_proj"][f], js["q_proj"][f]) <= 1e-15, f
    for rg, jg in zip(ref.grads, jx.grads):
        np.testing.assert_array_equal(rg[Q], jg[Q])


_TOKENS = [
    "model",
    "layers",
    "0",
    "12",
    "self_attn",
    "q_proj",
    "k_proj",
    "up_proj",
    "c_proj",
    "w2",
    "lm_head",
    "embed_tokens",
    "norm",
    "weight",
    "bias",
    "lora_A",
    "q_proj_extra",
    "h",
]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_TOKENS), min_size=1, max_size=7))
def test_both_implementations_label_names_alike(parts):
    name = ".".join(parts)
    assert torch_reference.module_label(name) == aggc_optax.reference_label(name)


def test_nan_group_is_disabled_on_both_sides():
    trajectory = parity.make_trajectory(8, nonfinite="nan")
    config = parity.CONFIGS["nan"]
    ref = parity.run_reference(config.options, trajectory, total_steps=8)
    jx = parity.run_jax(config.options, trajectory, total_steps=8)
    for run in (ref, jx):
        assert math.isnan(run.stats[3]["up_proj"]["norm"])
        for t in range(3, 8):
            assert math.isnan(run.stats[t]["up_proj"]["ema"])
        for t in range(4, 8):
            assert run.stats[t]["up_proj"]["upper"] == 0.0
            assert run.branches[t]["up_proj"] == "none"
        assert np.isnan(run.grads[3]["model.layers.0.mlp.up_proj.weight"][0, 0])


def test_the_harness_catches_a_numerical_disagreement():
    options = dict(parity.CONFIGS["plain_interval"].options)
    result = parity.run_parity("plain_interval", steps=8, jax_options={**options, "ema_beta": 0.91})
    assert not result.ok
    assert result.worst["ema"][0] > 1e-3


def test_the_harness_catches_a_branch_disagreement():
    options = dict(parity.CONFIGS["static_bounds"].options)
    result = parity.run_parity(
        "static_bounds", steps=8, jax_options={**options, "raise_small": False}
    )
    assert not result.ok
    assert result.branch_mismatches
    assert {b for _, _, b, _ in result.branch_mismatches} == {"raise"}
    assert "FAIL" in result.table()


def test_trajectory_is_deterministic_and_adversarial():
    a = parity.make_trajectory(20, nonfinite="both")
    b = parity.make_trajectory(20, nonfinite="both")
    shapes = parity.parity_shapes()
    for ga, gb in zip(a, b):
        assert set(ga) == set(shapes)
        for n in ga:
            assert ga[n].dtype == np.float32 and ga[n].shape == shapes[n][0]
            np.testing.assert_array_equal(ga[n], gb[n])

    def group_norm(t, role):
        return math.sqrt(
            sum(float(np.sum(a[t][n] ** 2)) for n, (_, r) in shapes.items() if r == role)
        )

    assert group_norm(5, "down_proj") > 10 * group_norm(4, "down_proj")  # whole-group spike
    v1 = "model.layers.1.self_attn.v_proj.weight"
    v0 = "model.layers.0.self_attn.v_proj.weight"
    assert np.abs(a[4][v1]).max() > 10 * np.abs(a[4][v0]).max()  # one tensor of a group
    assert group_norm(11, "gate_proj") < 1e-3 * group_norm(9, "gate_proj")  # tiny window
    assert all(group_norm(t, "post_attention_layernorm") < 1e-3 for t in range(20))  # always tiny
    assert group_norm(6, "k_proj") == 0.0  # all-zero group step
    assert np.isnan(a[3]["model.layers.0.mlp.up_proj.weight"][0, 0])
    assert a[5]["model.layers.1.self_attn.o_proj.weight"][1, 2] == -np.inf
    assert {r for _, r in shapes.values()} >= {"unlabelled"}
    assert "logit_scale" in shapes and "model.layers.0.residual_gate" in shapes
    assert "model.layers.0.self_attn.q_proj.bias" in shapes
    with pytest.raises(ValueError, match="nonfinite"):
        parity.make_trajectory(3, nonfinite="nope")
    with pytest.raises(ValueError, match="steps"):
        parity.make_trajectory(0)


def test_relative_difference_is_nan_aware():
    got = parity.relative_difference(
        [1.0, np.nan, np.inf, -np.inf, 0.0, 2.0, np.nan],
        [1.0, np.nan, np.inf, np.inf, 0.0, 1.0, 3.0],
    )
    np.testing.assert_array_equal(got, [0.0, 0.0, 0.0, np.inf, 0.0, 0.5, np.inf])


@pytest.mark.parametrize("config", parity.E2E_CONFIGS)
def test_end_to_end_training_stays_within_float32_noise(config):
    result = parity.run_end_to_end(config.removeprefix("e2e-"), steps=20, device="cpu")
    print(result.table())
    assert result.ok
    assert result.worst_loss <= parity.E2E_TOLERANCE
    assert result.worst_param[0] <= parity.E2E_TOLERANCE
    assert result.branch_mismatches == []
    assert result.branch_counts.get("down", 0) > 0  # AGGC really clipped
    assert 0 < result.worst_loss  # two frameworks: not bit-identical
    assert result.losses_torch[-1] < result.losses_torch[0]  # it trained


def test_main_prints_tables_and_exits_zero(capsys):
    assert parity.main(["--device", "cpu", "--config", "static_bounds", "--steps", "6"]) == 0
    out = capsys.readouterr().out
    assert "static_bounds" in out and "PASS" in out and "1/1 configurations pass" in out
    for quantity in parity.QUANTITIES:
        assert quantity in out


def test_main_exits_one_when_a_configuration_fails(monkeypatch, capsys):
    real = parity.run_jax

    def perturbed(options, trajectory, **kwargs):
        return real({**options, "high_mult": options["high_mult"] * 1.01}, trajectory, **kwargs)

    monkeypatch.setattr(parity, "run_jax", perturbed)
    assert parity.main(["--config", "plain_interval", "--steps", "6"]) == 1
    assert "FAILED: plain_interval" in capsys.readouterr().out


def test_main_usage_errors(capsys):
    assert parity.main(["--config", "nope"]) == 2
    assert "unknown --config 'nope'" in capsys.readouterr().err
    assert parity.main(["--config", "nan", "--steps", "0"]) == 2
    if not parity.cuda_available():
        assert parity.main(["--device", "cuda", "--config", "nan"]) == 2
        assert "CUDA" in capsys.readouterr().err


def test_python_dash_m_runs():
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "JAX_PLATFORMS": "cpu",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "aggc_optax.parity", "--config", "inf_caps", "--steps", "5"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "== inf_caps" in proc.stdout and "PASS" in proc.stdout


def test_import_aggc_optax_does_not_import_torch():
    code = "import sys, aggc_optax; print('torch' in sys.modules)"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO_ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# -- CUDA: run where both frameworks see a CUDA device ------------------------------------------

needs_cuda = pytest.mark.skipif(
    not parity.cuda_available(), reason="no CUDA device visible to both PyTorch and JAX"
)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("name", sorted(parity.CONFIGS))
def test_every_configuration_agrees_on_cuda(name):
    result = parity.run_parity(name, steps=CI_STEPS, device="cuda")
    print(result.table())
    assert result.ok


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("config", parity.E2E_CONFIGS)
def test_end_to_end_on_cuda(config):
    result = parity.run_end_to_end(config.removeprefix("e2e-"), steps=20, device="cuda")
    print(result.table())
    assert result.ok


# -- the authors' own numbers: tests/golden/grad_clip/ (see its README) -------------------------

GOLDEN = REPO_ROOT / "tests" / "golden" / "grad_clip"
GOLDEN_CONFIGS = ("lora_sft", "grpo", "paper_interval", "static_bounds", "tight_sched")
_BRANCH_CODE = {"down": -1, "raise": 1, "none": 0}


def _golden(config):
    data = json.loads((GOLDEN / f"{config}.json").read_text(encoding="utf-8"))
    arrays = np.load(GOLDEN / f"{config}.npz")
    modules = [str(m) for m in arrays["module_names"]]
    return data, arrays, modules


def _golden_run(config, runner):
    # the authors' raw gradients through one side of the harness
    data, arrays, modules = _golden(config)
    names = data["param_names"]
    trajectory = [{n: arrays[f"raw_grad/{n}"][t] for n in names} for t in range(data["num_steps"])]
    run = runner(data["options"], trajectory, total_steps=data["on_train_begin_total_steps"])
    return data, arrays, modules, run


def _check_against_golden(run, arrays, modules, rtol):
    worst = 0.0
    for t in range(len(run.stats)):
        for m, module in enumerate(modules):
            assert _BRANCH_CODE[run.branches[t][module]] == arrays["branch"][t, m], (t, module)
            for field in ("norm", "lower", "upper", "scale", "ema"):
                diff = float(
                    parity.relative_difference(run.stats[t][module][field], arrays[field][t, m])
                )
                worst = max(worst, diff)
    assert worst <= rtol, worst
    return worst


@pytest.mark.parametrize("config", GOLDEN_CONFIGS)
def test_the_bundled_reference_reproduces_the_authors_clipper(config):
    data, arrays, modules, run = _golden_run(config, parity.run_reference)
    names = data["param_names"]
    assert list(run.labels) == modules
    _check_against_golden(run, arrays, modules, rtol=1e-12)
    for t, grads in enumerate(run.grads):
        for n in names:
            np.testing.assert_array_equal(grads[n], arrays[f"clipped_grad/{n}"][t], err_msg=n)
    assert sum(arrays["branch"].ravel() != 0) > 100  # the trajectory really clips


@pytest.mark.parametrize("config", GOLDEN_CONFIGS)
def test_the_jax_port_reproduces_the_authors_clipper_in_float32(config):
    data, arrays, modules, run = _golden_run(config, parity.run_jax)
    names = data["param_names"]
    assert set(run.labels) == set(modules)
    worst = _check_against_golden(run, arrays, modules, rtol=2e-6)
    assert worst > 0  # float32 against the reference's float64: a real comparison
    for t, grads in enumerate(run.grads):
        for n in names:
            want = arrays[f"clipped_grad/{n}"][t]
            np.testing.assert_allclose(grads[n], want, rtol=2e-6, atol=0, err_msg=n)


@pytest.mark.parametrize("config", GOLDEN_CONFIGS)
def test_the_jax_port_reproduces_the_authors_step_math_under_x64(config):
    # The per-tensor float32 sums of squares of XLA and torch are reduced in
    # different orders (about 1e-7 apart), so under x64 the port is given each
    # group's sum as the authors' hooks added it (hook_sumsq): one scalar leaf
    # per group, named like a parameter of that group, equal to the sum's root.
    # What is left is the port's float64 step math against the authors'.
    data, arrays, modules = _golden(config)
    first = {}
    for name, label in data["param_labels"].items():
        if label is not None:
            first.setdefault(label, name)
    trajectory = [
        {first[m]: np.sqrt(arrays["hook_sumsq"][t, j]) for j, m in enumerate(modules)}
        for t in range(data["num_steps"])
    ]
    run = parity.run_jax(
        data["options"], trajectory, total_steps=data["on_train_begin_total_steps"], x64=True
    )
    _check_against_golden(run, arrays, modules, rtol=parity.X64_TOLERANCE)
