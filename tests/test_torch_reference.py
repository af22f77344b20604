"""The PyTorch reference clipper against the spec's own numbers and a float64 NumPy model.

Expectations come from the spec (docs: reference semantics), from hand
computation, or from ``tests.spec_model.reference_run``: the float64 NumPy model of
docs/reference-behaviour.md §3 to 5 that every test uses, fed gradients whose
float32 sums of squares are exact (small integers times powers of two), so that
reference and model must agree to the last bits.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch  # no importorskip: CI installs torch (the `test` extra) and must run these

from aggc_optax.torch_reference import (
    CSV_FILES,
    PerModuleGradClipper,
    PerModuleGradNormOptions,
    layer_id,
    mirror_module,
    module_label,
)
from tests.spec_model import GRPO, LORA, SPEC_LABEL_TABLE, reference_run, spec_multipliers

REPO_ROOT = Path(__file__).resolve().parents[1]


# -- helpers ----------------------------------------------------------------------------------


def mirror(names_shapes: dict[str, tuple[int, ...]], dtype=torch.float32) -> torch.nn.Module:
    """A module whose named_parameters() are exactly these dotted names (zeros)."""
    return mirror_module(names_shapes, dtype=dtype)


def backward(model: torch.nn.Module, grads: dict[str, np.ndarray]) -> None:
    """One backward() whose gradient for each named parameter is exactly grads[name]."""
    params = dict(model.named_parameters())
    loss = sum(
        (params[n] * torch.as_tensor(g, dtype=params[n].dtype)).sum() for n, g in grads.items()
    )
    loss.backward()


def clipper_for(
    model: torch.nn.Module, total_steps: int | None = None, **options
) -> PerModuleGradClipper:
    clipper = PerModuleGradClipper(options=PerModuleGradNormOptions(enable=True, **options))
    clipper.attach(model)
    if total_steps:
        clipper.on_train_begin(total_steps)
    return clipper


def one_step(clipper, model, grads, step):
    for p in model.parameters():
        p.grad = None
    backward(model, grads)
    report = clipper.on_before_optimizer_step(step=step)
    clipped = {
        n: p.grad.detach().numpy().copy() for n, p in model.named_parameters() if p.grad is not None
    }
    clipper.on_step_end(step)
    return report, clipped


def by_module(report):
    return {r["module"]: r for r in report}


# -- docs/reference-behaviour.md §1: options -------------------------------------------------------

SPEC_OPTIONS = [
    ("enable", False),
    ("auto_bounds", False),
    ("min_norm", 0.0),
    ("max_norm", 1.0),
    ("norm_type", 2.0),
    ("low_mult", 1.0),
    ("high_mult", 1.0),
    ("raise_small", False),
    ("ema_beta", 0.98),
    ("sync_dist", False),
    ("bounds_schedule", "none"),
    ("low_mult_late", 0.0),
    ("high_mult_late", 0.0),
    ("bounds_switch_ratio", 0.5),
    ("bounds_transition_ratio", 0.2),
    ("max_up_scale", 0.0),
    ("max_down_scale", 0.0),
    ("output_dir", None),
    ("keep_global_clip", False),
]


def test_options_have_exactly_the_spec_fields_and_defaults():
    fields = dataclasses.fields(PerModuleGradNormOptions)
    assert {f.name for f in fields} == {k for k, _ in SPEC_OPTIONS}
    defaults = PerModuleGradNormOptions()
    for name, value in SPEC_OPTIONS:
        assert getattr(defaults, name) == value and type(getattr(defaults, name)) is type(value), (
            name
        )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("enable", 1),
        ("raise_small", "yes"),
        ("min_norm", "0.1"),
        ("ema_beta", True),
        ("bounds_schedule", 1),
    ],
)
def test_options_reject_wrong_types_naming_the_field(field, value):
    with pytest.raises(TypeError, match=field):
        PerModuleGradNormOptions(**{field: value})


def test_out_of_range_options_are_accepted_as_the_reference_does():
    opts = PerModuleGradNormOptions(
        max_down_scale=1.5, max_up_scale=0.5, low_mult=3.0, high_mult=0.1
    )
    assert opts.max_down_scale == 1.5


def test_clipper_rejects_bad_arguments():
    with pytest.raises(TypeError, match="options"):
        PerModuleGradClipper(options={"enable": True})
    with pytest.raises(TypeError, match="local_rank"):
        PerModuleGradClipper(options=PerModuleGradNormOptions(), local_rank="0")
    clipper = PerModuleGradClipper(options=PerModuleGradNormOptions(enable=True))
    with pytest.raises(TypeError, match="model"):
        clipper.attach("not a module")
    with pytest.raises(TypeError, match="total_steps"):
        clipper.on_train_begin(10.0)


# -- docs/reference-behaviour.md §2: groups --------------------------------------------------------


@pytest.mark.parametrize(("name", "label"), SPEC_LABEL_TABLE)
def test_spec_label_table(name, label):
    assert module_label(name) == label
    model = mirror({name: (2,), "model.anchor.weight": (2,)})  # an anchor keeps the clipper on
    clipper = clipper_for(model)
    param = dict(model.named_parameters())[name]
    if label is None:
        assert all(param is not p for ps in clipper.mod2params.values() for p in ps)
    else:
        assert any(param is p for p in clipper.mod2params[label])
    clipper.close()


def test_groups_span_layers_in_order_of_first_appearance_and_skip_frozen():
    model = mirror(
        {
            "transformer.h.0.attn.c_proj.weight": (2,),
            "transformer.h.0.ln_1.weight": (2,),
            "transformer.h.0.mlp.c_proj.weight": (2,),
            "transformer.h.1.attn.c_proj.weight": (2,),
            "transformer.wte.weight": (2,),
        }
    )
    model.transformer.wte.weight.requires_grad_(False)
    clipper = clipper_for(model)
    assert list(clipper.mod2params) == ["c_proj", "ln_1"]
    assert clipper.mod2names["c_proj"] == [
        "transformer.h.0.attn.c_proj.weight",
        "transformer.h.0.mlp.c_proj.weight",
        "transformer.h.1.attn.c_proj.weight",
    ]
    assert clipper.module_ema == {"c_proj": 0.0, "ln_1": 0.0}
    assert layer_id("transformer.h.1.attn.c_proj.weight") == 1
    assert layer_id("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_id("model.norm.weight") is None


def test_disabled_by_default_touches_nothing():
    model = mirror({"model.layers.0.self_attn.q_proj.weight": (2,)})
    clipper = PerModuleGradClipper(options=PerModuleGradNormOptions())
    clipper.attach(model)
    g = np.array([300.0, 400.0], np.float32)
    backward(model, {"model.layers.0.self_attn.q_proj.weight": g})
    assert clipper.enabled is False and clipper.mod2params == {}
    assert clipper.on_before_optimizer_step(step=0) == []
    np.testing.assert_array_equal(
        model.model.layers._modules["0"].self_attn.q_proj.weight.grad.numpy(), g
    )


def test_nothing_labelled_disables_itself_with_a_warning():
    model = mirror({"logit_scale": (2,), "model.layers.weight": (2,)})
    with pytest.warns(UserWarning, match="no parameter could be labelled"):
        clipper = clipper_for(model)
    assert clipper.enabled is False
    assert clipper.on_before_optimizer_step(step=0) == []


def test_a_layer_parameter_without_label_keeps_the_clipper_on_and_is_never_clipped(tmp_path):
    model = mirror({"model.layers.0.residual_gate": (2,)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clipper = clipper_for(model, output_dir=str(tmp_path), auto_bounds=False, max_norm=0.1)
    assert clipper.enabled is True and clipper.mod2params == {}
    report, clipped = one_step(
        clipper, model, {"model.layers.0.residual_gate": np.float32([3, 4])}, 0
    )
    assert report == []
    np.testing.assert_array_equal(clipped["model.layers.0.residual_gate"], [3, 4])
    rows = list(csv.reader(open(tmp_path / "grad_per_layer.csv")))
    assert rows == [["step", "layer", "norm"], ["0", "0", "5.0"]]


# -- docs/reference-behaviour.md §3: the group norm ------------------------------------------------


def test_per_tensor_sums_are_float32_and_are_added_in_float64():
    # In one tensor, 1 + 1e-8 rounds to 1 in float32; across two tensors the
    # Python-float sum keeps the 1e-8.
    big_small = {"model.a.q_proj.weight": np.float32([1.0, 1e-4])}
    model = mirror({"model.a.q_proj.weight": (2,)})
    report, _ = one_step(clipper_for(model, auto_bounds=False, max_norm=10.0), model, big_small, 0)
    assert report[0]["norm"] == 1.0

    two = {"model.a.q_proj.weight": np.float32([1.0]), "model.b.q_proj.weight": np.float32([1e-4])}
    model = mirror({"model.a.q_proj.weight": (1,), "model.b.q_proj.weight": (1,)})
    report, _ = one_step(clipper_for(model, auto_bounds=False, max_norm=10.0), model, two, 0)
    assert report[0]["norm"] == math.sqrt(1.0 + float(np.float32(1e-4) * np.float32(1e-4)) + 1e-16)
    assert report[0]["norm"] > 1.0


def test_all_zero_group_and_group_without_gradient_have_norm_1e_8():
    model = mirror(
        {"model.q_proj.weight": (3,), "model.k_proj.weight": (3,), "model.v_proj.weight": (3,)}
    )
    clipper = clipper_for(model, auto_bounds=False, max_norm=10.0)
    report, clipped = one_step(
        clipper,
        model,
        {
            "model.q_proj.weight": np.zeros(3, np.float32),
            "model.k_proj.weight": np.ones(3, np.float32),
        },
        0,
    )
    stats = by_module(report)
    assert stats["q_proj"]["norm"] == 1e-8
    assert stats["v_proj"]["norm"] == 1e-8  # no gradient at all: hooks never fired
    assert stats["k_proj"]["norm"] == math.sqrt(3.0 + 1e-16)
    assert "model.v_proj.weight" not in clipped  # .grad stays None


# -- docs/reference-behaviour.md §4: one step ------------------------------------------------------

Q = "model.layers.0.self_attn.q_proj.weight"


def run_constant(steps, grad, **options):
    model = mirror({Q: grad.shape})
    clipper = clipper_for(model, **options)
    out = []
    for t in range(steps):
        ema_before = clipper.module_ema["q_proj"]
        report, clipped = one_step(clipper, model, {Q: grad}, t)
        out.append((ema_before, report[0], clipped[Q], clipper.module_ema["q_proj"]))
    return out


def test_step_zero_and_warm_up_with_beta_0_9():
    g = np.float32([3.0, 4.0])  # norm 5
    out = run_constant(2, g, auto_bounds=True, ema_beta=0.9, low_mult=0.5, high_mult=2.0)
    (_, r0, c0, ema0), (_, r1, c1, _) = out
    assert (r0["lower"], r0["upper"], r0["scale"]) == (0.0, 0.0, 1.0)  # upper 0: nothing clipped
    np.testing.assert_array_equal(c0, g)
    assert ema0 == (1 - 0.9) * 5.0  # Python floats: 1 - 0.9 is not 0.1
    assert r1["upper"] == 2.0 * ema0 == pytest.approx(1.0, rel=1e-15)
    assert r1["scale"] == r1["upper"] / (5.0 + 1e-12)  # roughly 0.2
    assert r1["scale"] != r1["upper"] / 5.0  # the eps: never exactly upper / norm
    np.testing.assert_array_equal(c1, g * np.float32(r1["scale"]))


def test_raise_at_step_zero_below_min_norm():
    g = np.float32([3e-3, 4e-3])
    ((_, r0, _, ema0),) = run_constant(
        1, g, auto_bounds=True, min_norm=0.01, raise_small=True, ema_beta=0.9
    )
    norm = math.sqrt(float(np.sum(g * g, dtype=np.float32)) + 1e-16)
    assert r0["lower"] == 0.01 and r0["upper"] == 0.0
    assert r0["scale"] == 0.01 / (norm + 1e-12)
    assert ema0 == (1 - 0.9) * norm * r0["scale"]
    assert ema0 == pytest.approx(0.1 * 0.01, rel=1e-9)


@pytest.mark.parametrize(
    ("bound_offset", "clipped"), [(-5e-13, False), (-2e-12, True)], ids=["within_eps", "beyond_eps"]
)
def test_eps_edge_of_clip_down(bound_offset, clipped):
    # g = [1] has norm sqrt(1 + 1e-16) == 1.0 exactly; the bound sits just below it.
    ((_, r, _, _),) = run_constant(
        1, np.float32([1.0]), auto_bounds=False, max_norm=1.0 + bound_offset
    )
    assert r["norm"] == 1.0
    if clipped:
        assert r["scale"] == (1.0 - 2e-12) / (1.0 + 1e-12)
        assert r["scale"] == pytest.approx(0.999999999997, abs=1e-15)
    else:
        assert r["scale"] == 1.0


@pytest.mark.parametrize(("bound_offset", "raised"), [(5e-13, False), (2e-12, True)])
def test_eps_edge_of_raise(bound_offset, raised):
    ((_, r, _, _),) = run_constant(
        1,
        np.float32([1.0]),
        auto_bounds=False,
        max_norm=10.0,
        min_norm=1.0 + bound_offset,
        raise_small=True,
    )
    assert r["scale"] == ((1.0 + 2e-12) / (1.0 + 1e-12) if raised else 1.0)


def test_rescale_is_in_the_gradient_dtype_bit_for_bit():
    rng = np.random.default_rng(0)
    g = rng.standard_normal(4096).astype(np.float32)
    ((_, r, c, _),) = run_constant(1, g, auto_bounds=False, max_norm=1.2345678901)
    expected = g * np.float32(r["scale"])
    np.testing.assert_array_equal(c, expected)
    rounded_from_f64 = (g.astype(np.float64) * r["scale"]).astype(np.float32)
    assert np.any(rounded_from_f64 != expected)  # so the check above can tell the two apart


def test_bfloat16_gradients_are_rescaled_in_float32_then_rounded():
    model = mirror({Q: (512,)}, dtype=torch.bfloat16)
    clipper = clipper_for(model, auto_bounds=False, max_norm=1.2345678901)
    g = torch.randn(512, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    dict(model.named_parameters())[Q].grad = None
    (dict(model.named_parameters())[Q] * g).sum().backward()
    (r,) = clipper.on_before_optimizer_step(step=0)
    expected = (g.float() * torch.tensor(np.float32(r["scale"]))).to(torch.bfloat16)
    assert torch.equal(dict(model.named_parameters())[Q].grad, expected)


def test_caps_floor_and_ceiling_and_inverted_caps():
    g = np.float32([3.0, 4.0])
    ((_, r, c, _),) = run_constant(1, g, auto_bounds=False, max_norm=1.0, max_down_scale=0.9)
    assert r["scale"] == 0.9  # floor: 1/5 would be lower
    np.testing.assert_array_equal(c, g * np.float32(0.9))
    ((_, r, c, _),) = run_constant(1, g, auto_bounds=False, max_norm=1.0, max_down_scale=1.5)
    assert r["scale"] == 1.5  # out of range: "clip down" multiplies by 1.5
    ((_, r, _, _),) = run_constant(
        1, g, auto_bounds=False, max_norm=100.0, min_norm=50.0, raise_small=True, max_up_scale=1.1
    )
    assert r["scale"] == 1.1


def test_uncapped_raise_forces_tiny_and_zero_groups_up_to_min_norm():
    model = mirror({"model.q_proj.weight": (1,), "model.k_proj.weight": (2,)})
    clipper = clipper_for(model, auto_bounds=True, min_norm=0.05, raise_small=True, ema_beta=0.9)
    report, clipped = one_step(
        clipper,
        model,
        {"model.q_proj.weight": np.float32([5e-5]), "model.k_proj.weight": np.zeros(2, np.float32)},
        0,
    )
    stats = by_module(report)
    q_norm = math.sqrt(float(np.float32(5e-5) * np.float32(5e-5)) + 1e-16)
    assert stats["q_proj"]["scale"] == 0.05 / (q_norm + 1e-12)
    assert stats["q_proj"]["scale"] == pytest.approx(1000.0, rel=1e-6)
    assert stats["k_proj"]["scale"] == 0.05 / (1e-8 + 1e-12)  # about 5e6
    np.testing.assert_array_equal(clipped["model.k_proj.weight"], [0.0, 0.0])
    # The EMA is fed the intended norm, not that of the (still zero) tensors.
    assert clipper.module_ema["k_proj"] == (1 - 0.9) * 1e-8 * stats["k_proj"]["scale"]
    assert clipper.module_ema["k_proj"] == pytest.approx(0.005, rel=1e-3)


def test_inverted_interval_leaves_nothing_untouched():
    # low 2.0 > high 0.5: above upper is clipped down, at or below it is raised.
    rng = np.random.default_rng(1)
    model = mirror({Q: (4,)})
    clipper = clipper_for(
        model, auto_bounds=True, low_mult=2.0, high_mult=0.5, raise_small=True, ema_beta=0.9
    )
    seen = set()
    for t in range(30):
        g = (rng.standard_normal(4) * 10 ** rng.uniform(-2, 2)).astype(np.float32)
        report, _ = one_step(clipper, model, {Q: g}, t)
        r = report[0]
        if t > 0:
            assert r["scale"] != 1.0
            seen.add("down" if r["norm"] > r["upper"] else "raise")
    assert seen == {"down", "raise"}


def test_fixed_bounds_still_update_the_ema():
    out = run_constant(3, np.float32([3.0, 4.0]), auto_bounds=False, max_norm=2.0, ema_beta=0.5)
    for _, r, _, _ in out:
        assert (r["lower"], r["upper"]) == (0.0, 2.0)
    assert out[0][3] == 0.5 * 5.0 * (2.0 / (5.0 + 1e-12))
    assert out[2][3] > out[0][3]


# -- docs/reference-behaviour.md §5: the schedule --------------------------------------------------


def test_linear_schedule_breakpoints_through_the_reported_bounds():
    opts = dict(
        auto_bounds=True,
        low_mult=0.5,
        high_mult=2.0,
        bounds_schedule="linear",
        low_mult_late=0.8,
        high_mult_late=3.0,
        bounds_switch_ratio=0.4,
        bounds_transition_ratio=0.3,
        ema_beta=0.9,
    )
    out = run_constant(60, np.float32([3.0, 4.0]), total_steps=60, **opts)
    lows = [r["lower"] / ema for ema, r, _, _ in out[1:]]
    assert lows[24 - 1] == pytest.approx(0.5, rel=1e-12)  # step 24: prog 0.4 <= s, base
    assert lows[33 - 1] == pytest.approx(0.65, rel=1e-12)  # midway
    assert lows[42 - 1] == pytest.approx(0.8, rel=1e-12)  # step 42: prog 0.7 >= s + w, late
    assert lows[23] != lows[24]
    clipper = clipper_for(mirror({Q: (1,)}), total_steps=60, **opts)
    for t in range(70):
        assert clipper.multipliers(t) == pytest.approx(spec_multipliers(opts, t, 60), rel=1e-15)


def test_schedule_is_inert_without_total_steps_or_when_not_linear():
    opts = dict(
        low_mult=0.5, high_mult=2.0, low_mult_late=0.8, high_mult_late=3.0, bounds_switch_ratio=0.1
    )
    no_begin = clipper_for(mirror({Q: (1,)}), bounds_schedule="linear", **opts)
    other = clipper_for(mirror({Q: (1,)}), total_steps=10, bounds_schedule="cosine", **opts)
    for t in range(10):
        assert no_begin.multipliers(t) == (0.5, 2.0) == other.multipliers(t)
    late_unset = clipper_for(
        mirror({Q: (1,)}),
        total_steps=10,
        bounds_schedule="linear",
        low_mult=0.5,
        high_mult=2.0,
        low_mult_late=-1.0,
        high_mult_late=3.0,
        bounds_transition_ratio=0.0,
    )
    assert late_unset.multipliers(5) == (0.5, 2.0)  # prog 0.5 <= s: inclusive
    assert late_unset.multipliers(6) == (0.5, 3.0)  # hard switch; late <= 0 keeps the base


# -- the float64 model on random trajectories -------------------------------------------------

MODEL_NAMES = {
    "model.layers.0.self_attn.q_proj.weight": (4, 4),
    "model.layers.0.self_attn.q_proj.bias": (4,),
    "model.layers.1.self_attn.q_proj.weight": (4, 4),
    "model.layers.0.residual_gate": (4,),
    "model.layers.0.mlp.down_proj.weight": (4, 8),
    "model.layers.1.mlp.down_proj.weight": (4, 8),
    "model.norm.weight": (4,),
    "lm_head.weight": (6, 4),
}
MODEL_GROUPS = {"q_proj": 0, "down_proj": 1, "norm": 2, "lm_head": 3}

MODEL_OPTIONS = {
    # the recipes as the spec's table gives them (enable comes from clipper_for)
    "lora_sft": {k: v for k, v in LORA.items() if k != "enable"},
    "grpo": {k: v for k, v in GRPO.items() if k != "enable"},
    "plain": dict(auto_bounds=True, ema_beta=0.9, low_mult=0.5, high_mult=2.0, raise_small=True),
    "static": dict(auto_bounds=False, min_norm=0.05, max_norm=2.0, raise_small=True, ema_beta=0.7),
    "inverted_caps": dict(
        auto_bounds=True,
        ema_beta=0.8,
        low_mult=2.0,
        high_mult=0.5,
        min_norm=0.001,
        raise_small=True,
        max_up_scale=0.5,
        max_down_scale=1.5,
    ),
    "hard_switch": dict(
        auto_bounds=True,
        ema_beta=0.9,
        low_mult=0.3,
        high_mult=1.5,
        min_norm=0.02,
        raise_small=True,
        bounds_schedule="linear",
        low_mult_late=0.9,
        high_mult_late=-1.0,
        bounds_switch_ratio=0.5,
        bounds_transition_ratio=0.0,
    ),
}


def _dyadic_trajectory(steps: int, seed: int):
    """Per step, 1 or 2 micro-batches of small integers times powers of two.

    Their float32 sums of squares are exact, so the model can use float64 sums.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        exps = {g: int(rng.integers(-14, 5)) for g in MODEL_GROUPS}
        zero = rng.choice(list(MODEL_GROUPS)) if rng.random() < 0.2 else None
        micro = []
        for _ in range(int(rng.integers(1, 3))):
            grads = {}
            for name, shape in MODEL_NAMES.items():
                label = module_label(name)
                e = exps.get(label, 0)
                values = rng.integers(-8, 9, shape).astype(np.float64) * 2.0**e
                grads[name] = (
                    np.zeros(shape, np.float32) if label == zero else values.astype(np.float32)
                )
            micro.append(grads)
        out.append(micro)
    return out


@pytest.mark.parametrize("name", sorted(MODEL_OPTIONS))
def test_reference_matches_float64_model_on_random_trajectories(name):
    opts = MODEL_OPTIONS[name]
    steps, total = 40, 40
    trajectory = _dyadic_trajectory(steps, seed=len(name))
    model = mirror(MODEL_NAMES)
    clipper = clipper_for(model, total_steps=total, **opts)
    assert list(clipper.mod2params) == list(MODEL_GROUPS)
    sums = np.zeros((steps, len(MODEL_GROUPS)))
    got = {
        k: np.zeros((steps, len(MODEL_GROUPS))) for k in ("norm", "lower", "upper", "scale", "ema")
    }
    for t, micro in enumerate(trajectory):
        for p in model.parameters():
            p.grad = None
        for grads in micro:
            backward(model, grads)
            for n, g in grads.items():
                label = module_label(n)
                if label in MODEL_GROUPS:
                    sums[t, MODEL_GROUPS[label]] += float(np.sum(g.astype(np.float64) ** 2))
        before = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
        report = clipper.on_before_optimizer_step(step=t)
        for j, r in enumerate(report):
            assert r["module"] == list(MODEL_GROUPS)[j]
            for k in ("norm", "lower", "upper", "scale"):
                got[k][t, j] = r[k]
            got["ema"][t, j] = clipper.module_ema[r["module"]]
            for n in clipper.mod2names[r["module"]]:
                np.testing.assert_array_equal(
                    dict(model.named_parameters())[n].grad.numpy(),
                    before[n] * np.float32(r["scale"]),
                )
        np.testing.assert_array_equal(
            dict(model.named_parameters())["model.layers.0.residual_gate"].grad.numpy(),
            before["model.layers.0.residual_gate"],
        )
        clipper.on_step_end(t)
    expected = reference_run(opts, sums, total)
    for k in ("norm", "lower", "upper", "scale", "ema"):
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-13, atol=0, err_msg=k)
    scales = expected["scale"][1:]
    assert np.any(scales < 1) and (np.any(scales > 1) or not opts.get("raise_small"))


# -- docs/reference-behaviour.md §8: edge cases ----------------------------------------------------

NAN_OPTIONS = dict(auto_bounds=True, ema_beta=0.9, low_mult=0.5, high_mult=2.0, raise_small=True)


def _bad_run(bad: float, **caps):
    g = np.float32([[3.0, 4.0], [0.0, 0.0]])  # norm 5
    model = mirror({Q: g.shape})
    clipper = clipper_for(model, **NAN_OPTIONS, **caps)
    out = []
    for t in range(7):
        grad = g.copy()
        if t == 3:
            grad[1, 1] = bad
        report, clipped = one_step(clipper, model, {Q: grad}, t)
        out.append((report[0], clipped[Q], clipper.module_ema["q_proj"], grad))
    return out


def test_spec_8_3_nan_disables_the_group_for_good():
    out = _bad_run(np.nan)
    r3, c3, ema3, g3 = out[3]
    assert math.isnan(r3["norm"]) and r3["scale"] == 1.0 and math.isnan(ema3)
    np.testing.assert_array_equal(c3, g3)  # NaN passes through, the rest untouched
    for r, c, ema, g in out[4:]:
        assert (r["lower"], r["upper"], r["scale"]) == (0.0, 0.0, 1.0)  # max(0.0, nan) == 0.0
        assert math.isnan(ema)
        np.testing.assert_array_equal(c, g)


def test_spec_8_3_inf_without_caps_zeroes_the_group_and_poisons_the_ema():
    out = _bad_run(np.inf)
    assert out[1][0]["scale"] < 1 and out[2][0]["scale"] < 1  # clipped during warm-up
    r3, c3, ema3, _ = out[3]
    assert r3["norm"] == math.inf and r3["upper"] > 0 and r3["scale"] == 0.0
    assert math.isnan(c3[1, 1]) and np.all(c3.ravel()[:3] == 0.0)
    assert math.isnan(ema3)
    for r, _, ema, _ in out[4:]:
        assert (r["upper"], r["scale"]) == (0.0, 1.0) and math.isnan(ema)


def test_spec_8_3_inf_with_caps_raises_the_group_by_1_1_forever():
    out = _bad_run(np.inf, max_down_scale=0.9, max_up_scale=1.1)
    r3, c3, ema3, g3 = out[3]
    assert r3["scale"] == 0.9 and ema3 == math.inf
    assert c3[1, 1] == np.inf
    np.testing.assert_array_equal(c3.ravel()[:3], g3.ravel()[:3] * np.float32(0.9))
    for r, c, ema, g in out[4:]:
        assert r["lower"] == r["upper"] == math.inf
        assert r["scale"] == 1.1 and ema == math.inf
        np.testing.assert_array_equal(c, g * np.float32(1.1))


@pytest.mark.parametrize("norm_type", [1.0, 3.0, math.inf])
def test_spec_8_4_norm_type_has_no_effect(norm_type):
    rng = np.random.default_rng(3)
    grads = [
        rng.standard_normal((3, 3)).astype(np.float32) * 10 ** rng.uniform(-1, 1) for _ in range(8)
    ]

    def run(nt):
        model = mirror({Q: (3, 3)})
        clipper = clipper_for(model, norm_type=nt, **NAN_OPTIONS)
        return [one_step(clipper, model, {Q: g}, t)[0] for t, g in enumerate(grads)]

    assert run(norm_type) == run(2.0)


def test_spec_8_5_micro_batches_add_squared_norms():
    g = np.float32([3.0, 4.0])
    model = mirror({Q: (2,)})
    clipper = clipper_for(model, auto_bounds=False, max_norm=100.0)
    backward(model, {Q: g})
    backward(model, {Q: -g})
    (r,) = clipper.on_before_optimizer_step(step=0)
    assert r["norm"] == math.sqrt(50.0 + 1e-16)  # sqrt(2) |g|, although .grad is 0
    np.testing.assert_array_equal(dict(model.named_parameters())[Q].grad.numpy(), [0.0, 0.0])


def test_spec_8_6_grad_edits_unseen_and_skipped_reset_carries_sums():
    g = np.float32([3.0, 4.0])
    model = mirror({Q: (2,)})
    clipper = clipper_for(model, auto_bounds=False, max_norm=100.0)
    backward(model, {Q: g})
    dict(model.named_parameters())[Q].grad.mul_(1000.0)  # e.g. loss-scale unscaling
    (r0,) = clipper.on_before_optimizer_step(step=0)
    assert r0["norm"] == 5.0
    backward(model, {Q: g})  # no on_step_end in between
    (r1,) = clipper.on_before_optimizer_step(step=1)
    assert r1["norm"] == math.sqrt(50.0 + 1e-16)
    clipper.on_step_end(1)
    backward(model, {Q: g})
    (r2,) = clipper.on_before_optimizer_step(step=2)
    assert r2["norm"] == 5.0


_DIST_SCRIPT = r"""
import json, sys
import torch, torch.distributed as dist
from aggc_optax.torch_reference import PerModuleGradClipper, PerModuleGradNormOptions
rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
model = torch.nn.Module()
model.q_proj = torch.nn.Linear(2, 1, bias=False)
result = {}
clippers = {}
for sync in (True, False):
    opts = PerModuleGradNormOptions(enable=True, sync_dist=sync, auto_bounds=False, max_norm=100.0)
    clippers[sync] = PerModuleGradClipper(options=opts, local_rank=rank)
    clippers[sync].attach(model)
g = torch.tensor([[3.0, 4.0]]) if rank == 0 else torch.zeros(1, 2)
(model.q_proj.weight * g).sum().backward()
for sync, clipper in clippers.items():
    result[str(sync)] = clipper.on_before_optimizer_step(step=0)[0]["norm"]
with open(out, "w") as f:
    json.dump(result, f)
dist.destroy_process_group()
"""


def test_spec_8_7_sync_dist_averages_squared_norms_over_ranks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "rank.py"
    script.write_text(_DIST_SCRIPT)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), str(port), str(tmp_path / f"r{rank}.json")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in (0, 1)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=180)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(outputs)
    r0 = json.loads((tmp_path / "r0.json").read_text())
    r1 = json.loads((tmp_path / "r1.json").read_text())
    # Shards of norm 5 and 0: sqrt((25 + 0) / 2) = 3.5355, not 5, on both ranks.
    assert r0["True"] == r1["True"] == math.sqrt(12.5 + 1e-16)
    assert round(r0["True"], 4) == 3.5355
    assert (r0["False"], r1["False"]) == (5.0, 1e-8)


# -- docs/reference-behaviour.md §7: logs, and close() ---------------------------------------------


def test_csv_logs(tmp_path):
    names = {
        "model.embed_tokens.weight": (2,),
        "model.layers.0.self_attn.q_proj.weight": (2,),
        "model.layers.0.residual_gate": (2,),
        "model.layers.1.self_attn.q_proj.weight": (2,),
        "model.norm.weight": (2,),
        "lm_head.weight": (2,),
    }
    grads = {n: np.float32([i + 1, 2 * i]) for i, n in enumerate(names)}
    model = mirror(names)
    clipper = clipper_for(model, output_dir=str(tmp_path / "logs"), auto_bounds=False, max_norm=4.0)
    silent = PerModuleGradClipper(
        options=PerModuleGradNormOptions(enable=True, output_dir=str(tmp_path / "rank1")),
        local_rank=1,
    )
    silent.attach(model)
    reports = [one_step(clipper, model, grads, t)[0] for t in range(2)]
    silent.on_before_optimizer_step(step=1)
    silent.on_step_end(1)
    assert not (tmp_path / "rank1").exists()
    assert sorted(os.listdir(tmp_path / "logs")) == sorted(CSV_FILES)

    def read(name):
        rows = list(csv.reader(open(tmp_path / "logs" / name)))
        assert tuple(rows[0]) == CSV_FILES[name]
        return rows[1:]

    assert tuple(CSV_FILES["per_module_clip.csv"]) == (
        "step",
        "module",
        "norm",
        "lower",
        "upper",
        "scale",
    )
    clip_rows = read("per_module_clip.csv")
    assert [r[1] for r in clip_rows] == [
        "embed_tokens",
        "q_proj",
        "norm",
        "lm_head",
    ] * 2  # group order
    for row, r in zip(clip_rows, reports[0] + reports[1]):
        assert [float(x) for x in row[2:]] == [r["norm"], r["lower"], r["upper"], r["scale"]]
    module_rows = read("grad_per_module.csv")
    assert [r[1] for r in module_rows] == [
        "embed_tokens",
        "lm_head",
        "norm",
        "q_proj",
    ] * 2  # sorted

    def sq(n):
        return float(np.sum(grads[n] ** 2))

    layer_rows = read("grad_per_layer.csv")
    layer0 = math.sqrt(
        sq("model.layers.0.self_attn.q_proj.weight") + sq("model.layers.0.residual_gate") + 1e-16
    )
    layer1 = math.sqrt(sq("model.layers.1.self_attn.q_proj.weight") + 1e-16)
    assert layer_rows == [
        ["0", "0", repr(layer0)],
        ["0", "1", repr(layer1)],
        ["1", "0", repr(layer0)],
        ["1", "1", repr(layer1)],
    ]


def test_close_removes_the_hooks():
    model = mirror({Q: (2,)})
    clipper = clipper_for(model, auto_bounds=False, max_norm=100.0)
    clipper.close()
    backward(model, {Q: np.float32([3.0, 4.0])})
    (r,) = clipper.on_before_optimizer_step(step=0)
    assert r["norm"] == 1e-8
    clipper.attach(model)  # can attach again after close
    backward(model, {Q: np.float32([3.0, 4.0])})
    assert clipper.on_before_optimizer_step(step=0)[0]["norm"] == 5.0
    with pytest.raises(RuntimeError, match="already attached"):
        clipper.attach(model)


# -- the public helpers: last_branches, mirror_module -------------------------------------------


def test_last_branches_name_each_groups_branch_of_the_last_step():
    model = mirror({"a.q_proj.weight": (2,), "a.k_proj.weight": (2,), "a.v_proj.weight": (2,)})
    clipper = clipper_for(model, auto_bounds=False, min_norm=1.0, max_norm=2.0, raise_small=True)
    assert clipper.last_branches == {}
    # norms 5 (above max_norm), 0.5 (below min_norm), 1.5 (inside)
    grads = {
        "a.q_proj.weight": [3.0, 4.0],
        "a.k_proj.weight": [0.3, 0.4],
        "a.v_proj.weight": [0.9, 1.2],
    }
    report, _ = one_step(clipper, model, grads, 0)
    assert clipper.last_branches == {"q_proj": "down", "k_proj": "raise", "v_proj": "none"}
    assert [r["scale"] < 1 for r in report] == [True, False, False]
    clipper.close()


def test_mirror_module_keeps_names_order_and_initial_values():
    values = iter([torch.full((2,), 3.0), torch.full((1, 2), -1.0)])
    m = mirror_module(
        {"model.layers.0.mlp.up_proj.weight": (2,), "lm_head.weight": [1, 2]},
        dtype=torch.float64,
        init=lambda shape: next(values),
    )
    got = [
        (n, tuple(p.shape), p.dtype, p.detach().flatten().tolist()) for n, p in m.named_parameters()
    ]
    assert got == [
        ("model.layers.0.mlp.up_proj.weight", (2,), torch.float64, [3.0, 3.0]),
        ("lm_head.weight", (1, 2), torch.float64, [-1.0, -1.0]),
    ]
    assert mirror_module({"a.b": (3,)}).a.b.detach().tolist() == [0.0, 0.0, 0.0]
    with pytest.raises((KeyError, ValueError)):
        mirror_module({"a.b": (1,), "a.b.c": (1,)})
