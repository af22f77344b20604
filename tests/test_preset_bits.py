"""Bit-identity guard: today's code against the recording of commit 2bee2aa's code.

``tests/data/preset_bits.npz`` holds the updates and state of each case below as
commit 2bee2aa computed them (``tests/data/record_preset_bits.py``). A refactor of
the core must not change a single bit of them. The recording is a regression guard
only; the behaviour itself is checked against ``tests/spec_model.py``.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import numpy as np
import optax
import pytest

from tests.data.record_preset_bits import OLD_CASES, STATE_FIELDS, run, trajectory

DATA = np.load(pathlib.Path(__file__).parent / "data" / "preset_bits.npz")

CASES: dict[str, Callable[[], optax.GradientTransformation]] = dict(OLD_CASES)


@pytest.fixture(scope="module")
def traj() -> list:
    return trajectory()


@pytest.mark.parametrize("case", sorted(CASES))
def test_bit_identical_to_the_recording(case: str, traj: list) -> None:
    got = run(CASES[case](), traj)
    assert sorted(got) == sorted(["updates"] + [f"state/{f}" for f in STATE_FIELDS])
    for key, value in got.items():
        want = DATA[f"{case}/{key}"]
        assert value.dtype == want.dtype and value.shape == want.shape, (case, key)
        # compared as bits: -0.0 is not 0.0, and a NaN must be the same NaN
        bits = f"u{value.dtype.itemsize}"
        np.testing.assert_array_equal(
            value.view(bits), want.view(bits), err_msg=f"{case}: {key} ({value} vs {want})"
        )


def test_the_recording_covers_every_branch() -> None:
    def total(field: str) -> int:
        return sum(int(DATA[f"{c}/state/{field}"][-1].sum()) for c in CASES)

    assert total("clip_down_count") > 0 and total("raise_count") > 0
    assert any(np.isnan(DATA[f"{c}/state/norm"]).any() for c in CASES)
