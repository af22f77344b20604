"""Bit-identity guard: today's code against the recording of commit 2bee2aa's code.

``tests/data/preset_bits.npz`` holds the updates and state of each case below as
commit 2bee2aa computed them (``tests/data/record_preset_bits.py``). A refactor of
the core must not change them: integers, NaN bits and signs exactly, every other
float to within ``ULP_TOLERANCE`` units in the last place. Not bit for bit, because
XLA's CPU code depends on the host's vector instructions: on an AMD EPYC host the
same code and versions give 1-3 ulp differences from the recording (made on another
CPU). The recording is a regression guard only; the behaviour itself is checked
against ``tests/spec_model.py``.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import numpy as np
import optax
import pytest

import aggc_optax
from aggc_optax import presets
from tests.data.record_preset_bits import OLD_CASES, STATE_FIELDS, STEPS, run, trajectory

DATA = np.load(pathlib.Path(__file__).parent / "data" / "preset_bits.npz")

RAISE = dict(ema_beta=0.9, low_mult=0.7, high_mult=1.5, min_norm=0.02, ema_init="zero")
REF = "reference"

# The cases of the recording, in today's API. Two deliberate changes are not part
# of the guard: the recipes' default NaN policy is now "skip" (so they are compared
# with nonfinite="reference", the recording's policy), and global_norm's EMA (which
# it does not use) now follows aggc()'s defaults, so its ema fields are not compared.
CASES: dict[str, Callable[[], optax.GradientTransformation]] = {
    "lora_sft": lambda: presets.lora_sft(STEPS, nonfinite=REF),
    "lora_sft_lora_label": lambda: presets.lora_sft(
        STEPS, param_labels=aggc_optax.lora_label, nonfinite=REF
    ),
    "grpo": lambda: presets.grpo(nonfinite=REF),
    "grpo_ramp": lambda: presets.grpo(STEPS, nonfinite=REF),
    "global_norm": lambda: presets.global_norm(1.5),
    "adagc": lambda: presets.adagc(),
    "ref_defaults": OLD_CASES["ref_defaults"],
    "ref_inverted_caps": OLD_CASES["ref_inverted_caps"],
    "ref_fixed_raise": OLD_CASES["ref_fixed_raise"],
    "aggc_clip_only": lambda: aggc_optax.aggc(ema_beta=0.9, high_mult=1.5, ema_init="zero"),
    "aggc_raise_caps": lambda: aggc_optax.aggc(**RAISE, max_up_scale=1.2, max_down_scale=0.5),
    "aggc_first_paper": lambda: aggc_optax.aggc(**{**RAISE, "ema_init": "first"}, variant="paper"),
    "aggc_bias_corrected": lambda: aggc_optax.aggc(**{**RAISE, "ema_init": "bias_corrected"}),
    "aggc_group_hyperparams": lambda: aggc_optax.aggc(
        **{**RAISE, "ema_init": "first"},
        group_hyperparams={
            "q_proj": {"high_mult": 1.1, "ema_beta": 0.5},
            ".*_proj": {"low_mult": 0.3},
        },
    ),
    "aggc_fixed_bounds": lambda: aggc_optax.aggc(
        auto_bounds=False, max_norm=2.0, ema_beta=0.95, ema_init="zero"
    ),
}
NOT_COMPARED = {"global_norm": ("state/ema", "state/ema_residual")}


ULP_TOLERANCE = 4


def _ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Units in the last place between two same-signed float bit patterns (signed ints)."""
    return np.abs(a.astype(np.int64) - b.astype(np.int64))


def test_ulps_by_hand() -> None:
    one = np.array([1.0], np.float32).view(np.int32)
    assert _ulps(np.nextafter(np.float32(1), np.float32(2)).reshape(1).view(np.int32), one) == 1
    neg = np.array([-1.0], np.float32).view(np.int32)
    assert _ulps(np.nextafter(np.float32(-1), np.float32(-2)).reshape(1).view(np.int32), neg) == 1
    assert _ulps(one, one) == 0


@pytest.fixture(scope="module")
def traj() -> list:
    return trajectory()


@pytest.mark.parametrize("case", sorted(CASES))
def test_bit_identical_to_the_recording(case: str, traj: list) -> None:
    got = run(CASES[case](), traj)
    assert sorted(got) == sorted(["updates"] + [f"state/{f}" for f in STATE_FIELDS])
    for key, value in got.items():
        if key in NOT_COMPARED.get(case, ()):
            continue
        want = DATA[f"{case}/{key}"]
        assert value.dtype == want.dtype and value.shape == want.shape, (case, key)
        message = f"{case}: {key} ({value} vs {want})"
        if value.dtype.kind in "iub":
            np.testing.assert_array_equal(value, want, err_msg=message)
            continue
        if key == "state/ema_residual":
            # The EMA's TwoSum compensation: its bits are rounding errors, so a 1-ulp
            # change in the EMA changes them entirely; it is bounded by the EMA's ulp.
            ema = DATA[f"{case}/state/ema"]
            finite = np.isfinite(ema)
            limit = ULP_TOLERANCE * np.spacing(np.abs(np.where(finite, ema, 0))).astype(np.float64)
            close = np.abs(value.astype(np.float64) - want) <= limit
            same = value.view(np.int32) == want.view(np.int32)  # a NaN or inf EMA: bit for bit
            assert np.all(np.where(finite, close, same)), message
            continue
        # compared as bits: -0.0 is not 0.0, and a NaN must be the same NaN
        bits = f"i{value.dtype.itemsize}"
        got_bits, want_bits = value.view(bits), want.view(bits)
        nan = np.isnan(want.astype(np.float32))
        np.testing.assert_array_equal(np.isnan(value.astype(np.float32)), nan, err_msg=message)
        np.testing.assert_array_equal(got_bits[nan], want_bits[nan], err_msg=message)
        np.testing.assert_array_equal(np.signbit(value), np.signbit(want), err_msg=message)
        assert np.max(_ulps(got_bits, want_bits), initial=0) <= ULP_TOLERANCE, message


def test_every_recorded_case_is_checked() -> None:
    assert sorted(CASES) == sorted(OLD_CASES)


def test_the_recording_covers_every_branch() -> None:
    def total(field: str) -> int:
        return sum(int(DATA[f"{c}/state/{field}"][-1].sum()) for c in CASES)

    assert total("clip_down_count") > 0 and total("raise_count") > 0
    assert any(np.isnan(DATA[f"{c}/state/norm"]).any() for c in CASES)
