"""aggc_optax.cli: the flags a training script adds, and the transformation they build."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aggc_optax import aggc, from_reference_options, group_stats, presets
from aggc_optax.cli import HelpFormatter, add_aggc_arguments, aggc_from_args, cosine_ramp
from tests.test_presets import GRPO, LORA, _assert_same_trajectory, _run, _trajectory


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)  # a script's own flag
    add_aggc_arguments(parser)
    return parser.parse_args(list(argv))


def test_no_flags_is_aggc_defaults_and_lora_sft_is_the_recipe_exactly() -> None:
    traj = _trajectory(16)
    args = _parse()
    assert args.aggc_preset == "default" and args.steps == 10
    _assert_same_trajectory(_run(aggc_from_args(args, total_steps=16), traj), _run(aggc(), traj))
    got = _run(aggc_from_args(_parse("--aggc-preset", "lora_sft"), total_steps=16), traj)
    want = from_reference_options(LORA, total_steps=16, nonfinite="skip")  # presets.lora_sft's
    _assert_same_trajectory(got, _run(want, traj))


def test_help_gives_every_flag_a_text_and_its_unset_value() -> None:
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    group = add_aggc_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert "(default: None)" not in text and "(default: default)" in text
    for action in group._group_actions:
        assert action.help, action.option_strings
    # Each numeric flag names its value under every preset, taken from the code.
    assert "--ema-beta X decay beta" in text
    assert "Unset: default 0.99, lora_sft 0.95, grpo 0.99, adagc 0.98." in text
    assert "--high-mult X alpha_high" in text
    assert "Unset: default 3, lora_sft 0.6, grpo 0.7, adagc 1.05." in text
    assert "Unset: default off, lora_sft 0.9, grpo 0.9." in text  # --max-down-scale


def test_each_option_flag_reaches_the_transformation() -> None:
    traj = _trajectory(12)
    gh = {"q_proj": {"high_mult": 0.5}}
    args = _parse(
        "--aggc-preset", "grpo", "--ema-init", "first", "--variant", "paper",
        "--nonfinite", "reference", "--group-hparams", json.dumps(gh), "--ema-beta", "0.9",
        "--no-raise-small",
    )  # fmt: skip
    got = _run(aggc_from_args(args, total_steps=12), traj)
    # grpo's default schedule is "constant": the recipe as the authors ran it
    want = from_reference_options(
        dict(GRPO, ema_beta=0.9, raise_small=False), total_steps=None, ema_init="first",
        variant="paper", nonfinite="reference", group_hyperparams=gh,
    )  # fmt: skip
    _assert_same_trajectory(got, _run(want, traj))
    args = _parse("--aggc-preset", "lora_sft", "--ema-init", "bias_corrected",
                  "--max-down-scale", "0")  # fmt: skip
    got = _run(aggc_from_args(args, total_steps=12), traj)
    want = from_reference_options(dict(LORA, max_down_scale=0.0), total_steps=12,
                                  ema_init="bias_corrected", nonfinite="skip")  # fmt: skip
    _assert_same_trajectory(got, _run(want, traj))
    args = _parse("--aggc-preset", "default", "--low-mult", "0.5", "--max-down-scale", "0.8",
                  "--ema-init", "zero", "--variant", "paper")  # fmt: skip
    got = _run(aggc_from_args(args, total_steps=12), traj)
    want = aggc(low_mult=0.5, max_down_scale=0.8, ema_init="zero", variant="paper")
    _assert_same_trajectory(got, _run(want, traj))


def test_default_preset_is_aggc_defaults_and_adagc_preset_is_presets_adagc() -> None:
    traj = _trajectory(10)
    _assert_same_trajectory(
        _run(aggc_from_args(_parse("--aggc-preset", "default"), None), traj), _run(aggc(), traj)
    )
    args = _parse("--aggc-preset", "adagc", "--high-mult", "1.1", "--ema-beta", "0.9")
    _assert_same_trajectory(
        _run(aggc_from_args(args, None), traj), _run(presets.adagc(1.1, 0.9), traj)
    )
    with pytest.raises(ValueError, match="--low-mult, --variant cannot be used with"):
        aggc_from_args(_parse("--aggc-preset", "adagc", "--low-mult", "1", "--variant", "paper"), 5)


def _multipliers_used(stats: list[dict], label: str) -> tuple[list[float], list[float]]:
    """high(t) = upper_t / EMA after step t-1; low(t) likewise (when above min_norm)."""
    highs, lows = [], []
    for t in range(1, len(stats)):
        ema = float(stats[t - 1][label]["ema"])
        highs.append(float(stats[t][label]["upper"]) / ema)
        lows.append(float(stats[t][label]["lower"]) / ema)
    return lows, highs


def _hand_cosine(t: int, base: float, late: float, start: int, length: int) -> float:
    if t < start:
        return base
    return late + (base - late) * 0.5 * (1 + math.cos(math.pi * min(t - start, length) / length))


def test_cosine_multiplier_schedule_by_hand() -> None:
    # lora_sft, T = 20: base until round(0.4 * 20) = 8, cosine over round(0.3 * 20) = 6
    traj = _trajectory(20)
    args = _parse("--aggc-preset", "lora_sft", "--multiplier-schedule", "cosine")
    _, stats = _run(aggc_from_args(args, total_steps=20), traj)
    lows, highs = _multipliers_used(stats, "up_proj")
    for t in range(1, 20):
        assert highs[t - 1] == pytest.approx(_hand_cosine(t, 0.6, 0.7, 8, 6), rel=1e-5), t
        assert lows[t - 1] == pytest.approx(_hand_cosine(t, 0.95, 0.98, 8, 6), rel=1e-5), t
    assert highs[10] == pytest.approx(0.65, rel=1e-5)  # t = 11, half-way


def test_linear_and_constant_schedules_by_hand() -> None:
    traj = _trajectory(20)
    # default preset + linear: the reference ramp from aggc()'s 3.0 to 4.0, T = 20,
    # s = 0.4, w = 0.3: base for t <= 8, late for t >= 14, t = 11: a = 0.15 / 0.3 = 0.5
    args = _parse(
        "--aggc-preset", "default", "--multiplier-schedule", "linear", "--high-mult-late", "4",
        "--bounds-switch-ratio", "0.4", "--bounds-transition-ratio", "0.3",
    )  # fmt: skip
    _, stats = _run(aggc_from_args(args, total_steps=20), traj)
    _, highs = _multipliers_used(stats, "up_proj")
    assert highs[8 - 1] == pytest.approx(3.0, rel=1e-5)
    assert highs[11 - 1] == pytest.approx(3.5, rel=1e-5)
    assert highs[14 - 1] == pytest.approx(4.0, rel=1e-5)
    args = _parse("--aggc-preset", "lora_sft", "--multiplier-schedule", "constant",
                  "--high-mult", "0.8")  # fmt: skip
    _, stats = _run(aggc_from_args(args, total_steps=20), traj)
    _, highs = _multipliers_used(stats, "up_proj")
    assert highs == pytest.approx([0.8] * 19, rel=1e-5)


def test_cosine_ramp_matches_the_hand_formula() -> None:
    sched = cosine_ramp(0.6, 0.7, total_steps=50, switch_ratio=0.5, transition_ratio=0.1)
    for t in range(60):
        assert float(sched(t)) == pytest.approx(_hand_cosine(t, 0.6, 0.7, 25, 5), rel=1e-6)
    assert float(cosine_ramp(0.6, 0.0, total_steps=10)(9)) == pytest.approx(0.6)  # late<=0
    with pytest.raises(ValueError, match="total_steps must be > 0"):
        cosine_ramp(0.6, 0.7, total_steps=0)
    with pytest.raises(ValueError, match="cosine needs the run's length"):
        aggc_from_args(_parse("--multiplier-schedule", "cosine"), total_steps=None)


def test_group_hparams_from_a_file_and_bad_json(tmp_path, capsys) -> None:
    path = tmp_path / "gh.json"
    path.write_text(json.dumps({"[qkv]_proj": {"high_mult": 0.4}}))
    args = _parse("--group-hparams", f"@{path}")
    assert args.group_hparams == {"[qkv]_proj": {"high_mult": 0.4}}
    for bad, message in (
        ("{not json", "is not valid JSON"),
        ('{"q_proj": 0.5}', "expected a JSON object"),
        (f"@{tmp_path / 'missing.json'}", "cannot read"),
    ):
        with pytest.raises(SystemExit):
            _parse("--group-hparams", bad)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse("--variant", "papers")
    with pytest.raises(ValueError, match=r"group_hyperparams\['q_proj'\]: unknown"):
        aggc_from_args(_parse("--group-hparams", '{"q_proj": {"beta": 1}}'), 10)


def test_an_invalid_combination_fails_with_the_parameter_name() -> None:
    message = "--nonfinite reference cannot be used with --aggc-preset default"
    with pytest.raises(ValueError, match=message):
        aggc_from_args(_parse("--aggc-preset", "default", "--nonfinite", "reference"), 10)
    with pytest.raises(ValueError, match="max_up_scale caps an upward scale"):
        aggc_from_args(_parse("--aggc-preset", "default", "--max-up-scale", "1.1"), 10)


def test_lora_labels_flag() -> None:
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    g = {name: jnp.ones(3), "model.layers.0.self_attn.q_proj.weight": jnp.ones(3)}
    tx = aggc_from_args(_parse("--aggc-labels", "lora"), 10)
    state = tx.init(g)
    _, state = jax.jit(tx.update)(g, state)
    assert list(group_stats(state)) == ["q_proj"]
    np.testing.assert_allclose(float(group_stats(state)["q_proj"]["norm"]), math.sqrt(3), 1e-6)


def test_importing_the_package_does_not_import_the_cli() -> None:
    code = "import sys, aggc_optax; print('aggc_optax.cli' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert out.stdout.strip() == "False"
