"""examples/nnx_checkpoint.py: an NNX run resumed from an Orbax checkpoint is bit-identical."""

from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("orbax.checkpoint")
pytest.importorskip("flax.nnx")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import nnx_checkpoint


def test_resume_is_bit_identical(tmp_path, capsys):
    result = nnx_checkpoint.main(["--steps", "3", "--dir", str(tmp_path)])
    assert result["same_params"] and result["same_state"]
    assert os.path.isdir(tmp_path / "step_3")
    # the restored statistics are those of the saved run (3 steps: EMAs are set)
    stats = result["stats"]
    assert sorted(stats) == ["q_proj", "v_proj"]
    assert all(int(s["clip_down_count"]) >= 0 and float(s["ema"]) > 0 for s in stats.values())
    out = capsys.readouterr().out
    assert "parameters bit-identical, optimizer state bit-identical" in out


def test_a_different_start_is_detected():
    # the check can fail: the two models start from other weights
    from flax import nnx

    ma, _ = nnx_checkpoint.build(0)
    mb, _ = nnx_checkpoint.build(1)
    assert nnx_checkpoint._bits(nnx.state(ma)) != nnx_checkpoint._bits(nnx.state(mb))
