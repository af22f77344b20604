"""CSVLogger, stats_rows and read_clip_csv against the reference's per_module_clip.csv format.

Expected statistics come from an independent float64 NumPy model of spec
sections 3-4 written here; the format from docs/reference-behaviour.md §7 and the reference's
writer (``f"{step},{module},{norm},{lower},{upper},{scale}"``, header
``step,module,norm,lower,upper,scale``).
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import aggc_optax

HEADER = "step,module,norm,lower,upper,scale"


def _spec_model(grads_per_step, *, beta, low, high, min_norm, up_cap, down_cap):
    """docs/reference-behaviour.md §3-4 in float64: per step, per group (norm, lower, upper,
    scale)."""
    ema = {}
    out = []
    for groups in grads_per_step:
        rows = []
        for label, arrays in groups.items():
            s = sum(float(np.sum(np.square(np.asarray(a, np.float64)))) for a in arrays)
            norm = math.sqrt(s + 1e-16)
            e = ema.get(label, 0.0)
            lower, upper = max(min_norm, e * low), max(0.0, e * high)
            scale = 1.0
            if upper > 0 and norm > upper + 1e-12:
                scale = upper / (norm + 1e-12)
                if down_cap > 0:
                    scale = max(scale, down_cap)
            ema[label] = beta * e + (1 - beta) * norm * scale
            rows.append((label, norm, lower, upper, scale))
        out.append(rows)
    return out


def _tree_and_groups(rng):
    q0, q1 = rng.normal(size=(3, 3)), rng.normal(size=3)
    up = rng.normal(size=(3, 5)) * 4.0
    tree = {
        "model": {
            "layers": {
                "0": {"mlp": {"up_proj": {"weight": up}}, "self_attn": {"q_proj": {"weight": q0}}},
                "1": {"self_attn": {"q_proj": {"bias": q1}}},
            }
        }
    }
    # Flattening order: layers.0.mlp.up_proj, layers.0.self_attn.q_proj, layers.1...
    return tree, {"up_proj": [up], "q_proj": [q0, q1]}


def _run(steps=4):
    rng = np.random.default_rng(0)
    trees, groups = [], []
    for _ in range(steps):
        t, g = _tree_and_groups(rng)
        trees.append(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t))
        groups.append(g)
    tx = optax.chain(aggc_optax.presets.lora_sft(None), optax.sgd(0.1))  # no ramp
    state = tx.init(trees[0])
    states = []
    for t in trees:
        _, state = tx.update(t, state, t)
        states.append(state)
    return states, groups


RECIPE = {"beta": 0.95, "low": 0.95, "high": 0.6, "min_norm": 0.01, "up_cap": 1.1, "down_cap": 0.9}


def test_stats_rows_match_float64_model_in_group_order():
    states, groups = _run()
    expected = _spec_model(groups, **RECIPE)
    for step, (state, exp) in enumerate(zip(states, expected)):
        rows = aggc_optax.stats_rows(state, step)
        assert [r["module"] for r in rows] == ["up_proj", "q_proj"]
        for row, (label, norm, lower, upper, scale) in zip(rows, exp):
            assert row["step"] == step and row["module"] == label
            assert set(row) == {"step", "module", "norm", "lower", "upper", "scale"}
            assert all(isinstance(row[k], float) for k in ("norm", "lower", "upper", "scale"))
            np.testing.assert_allclose(
                [row["norm"], row["lower"], row["upper"], row["scale"]],
                [norm, lower, upper, scale],
                rtol=2e-6,
                atol=1e-9,
            )
    # The model's clip-downs really happen from step 1 on (the recipe's inverted interval).
    assert expected[1][0][4] == 0.9


def test_logger_writes_reference_format_and_reads_back(tmp_path):
    states, groups = _run()
    expected = _spec_model(groups, **RECIPE)
    path = tmp_path / "per_module_clip.csv"
    with aggc_optax.CSVLogger(path) as logger:
        for step, state in enumerate(states):
            assert logger.log(state, step) is None
    lines = path.read_text().splitlines()
    assert lines[0] == HEADER
    assert len(lines) == 1 + 4 * 2
    assert [line.split(",")[:2] for line in lines[1:3]] == [["0", "up_proj"], ["0", "q_proj"]]
    # Step 0: EMA 0, so lower = min_norm, upper = 0.0 and scale = 1.0, printed as Python does.
    assert lines[1].split(",")[3:] == ["0.01", "0.0", "1.0"]
    for line, (label, norm, lower, upper, scale) in zip(
        lines[1:], [row for step in expected for row in step]
    ):
        cells = line.split(",")
        assert cells[1] == label
        np.testing.assert_allclose(
            [float(c) for c in cells[2:]], [norm, lower, upper, scale], rtol=2e-6, atol=1e-9
        )

    data = aggc_optax.read_clip_csv(path)
    assert list(data) == ["up_proj", "q_proj"]
    np.testing.assert_array_equal(data["q_proj"]["step"], [0, 1, 2, 3])
    np.testing.assert_allclose(data["up_proj"]["scale"], [row[0][4] for row in expected], rtol=2e-6)


def test_cells_round_trip_to_the_float32_statistics(tmp_path):
    # Each cell is the shortest text that reads back (rounded to float32) as the exact
    # float32 statistic in the state.
    states, _ = _run(steps=3)
    with aggc_optax.CSVLogger(tmp_path) as logger:
        logger.log(states[2], 2)
    lines = (tmp_path / "per_module_clip.csv").read_text().splitlines()[1:]
    state = aggc_optax.find_aggc_states(states[2])[0]
    for i, line in enumerate(lines):
        cells = line.split(",")
        for j, field in enumerate(("norm", "lower", "upper", "scale")):
            exact = np.asarray(getattr(state, field))[i]
            assert np.float32(float(cells[2 + j])) == exact
            assert len(cells[2 + j]) <= 12  # not the float64 expansion of a float32


def test_reference_written_file_is_readable(tmp_path):
    # Lines as the reference's f-string writes them: Python floats, 'nan' and 'inf' included.
    text = (
        HEADER + "\n"
        "0,q_proj,0.5,0.01,0.0,1.0\n"
        "0,v_proj,nan,0.01,0.0,1.0\n"
        "1,q_proj,2.000000000001,0.0095,0.006,0.9\n"
        "1,v_proj,inf,0.01,0.0,1.0\n"
    )
    path = tmp_path / "per_module_clip.csv"
    path.write_text(text)
    data = aggc_optax.read_clip_csv(tmp_path)  # a folder means its per_module_clip.csv
    assert list(data) == ["q_proj", "v_proj"]
    np.testing.assert_array_equal(data["q_proj"]["norm"], [0.5, 2.000000000001])
    assert math.isnan(data["v_proj"]["norm"][0]) and data["v_proj"]["norm"][1] == math.inf
    assert data["q_proj"]["step"].dtype == np.int64


def test_nan_statistics_are_written_as_nan(tmp_path):
    params = {"model": {"q_proj": {"weight": jnp.ones(2)}}}
    tx = aggc_optax.presets.lora_sft(None, nonfinite="reference")
    state = tx.init(params)
    _, state = tx.update({"model": {"q_proj": {"weight": jnp.array([1.0, jnp.nan])}}}, state)
    with aggc_optax.CSVLogger(tmp_path / "x.csv") as logger:
        logger.log(state, 0)
    assert (tmp_path / "x.csv").read_text().splitlines()[1] == "0,q_proj,nan,0.01,0.0,1.0"


def test_stats_rows_from_group_stats_and_plain_dicts():
    states, _ = _run(steps=2)
    from_state = aggc_optax.stats_rows(states[1], 1)
    from_stats = aggc_optax.stats_rows(aggc_optax.group_stats(states[1]), 1)
    assert from_stats == from_state
    plain = {"attn": {"norm": 3.0, "lower": 0.5, "upper": 2.0, "scale": 2.0 / 3.0}}
    assert aggc_optax.stats_rows(plain, 7) == [
        {"step": 7, "module": "attn", "norm": 3.0, "lower": 0.5, "upper": 2.0, "scale": 2 / 3}
    ]


def test_append_and_restart(tmp_path):
    states, _ = _run(steps=2)
    path = tmp_path / "log.csv"
    with aggc_optax.CSVLogger(path) as logger:
        logger.log(states[0], 0)
    with aggc_optax.CSVLogger(path, append=True) as logger:
        logger.log(states[1], 1)
    lines = path.read_text().splitlines()
    assert lines[0] == HEADER and [line[0] for line in lines[1:]] == ["0", "0", "1", "1"]
    # Without append a new logger starts the file afresh, as the reference's attach() does.
    aggc_optax.CSVLogger(path).close()
    assert path.read_text() == HEADER + "\n"
    # append=True on a missing or empty file writes the header.
    with aggc_optax.CSVLogger(tmp_path / "new" / "log.csv", append=True) as logger:
        logger.log(states[0], 0)
    assert (tmp_path / "new" / "log.csv").read_text().startswith(HEADER + "\n0,up_proj,")


def test_partition_states_are_logged_in_order(tmp_path):
    params = {"a": {"q_proj": {"w": jnp.ones(2)}}, "b": {"v_proj": {"w": jnp.ones(3)}}}
    tx = optax.partition({"a": aggc_optax.aggc(), "b": aggc_optax.aggc()}, {"a": "a", "b": "b"})
    state = tx.init(params)
    _, state = tx.update(params, state)
    rows = aggc_optax.stats_rows(state, 0)
    assert [r["module"] for r in rows] == ["q_proj", "v_proj"]
    np.testing.assert_allclose([r["norm"] for r in rows], [math.sqrt(2), math.sqrt(3)], rtol=1e-6)


def test_flax_nnx_optimizer_state():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    model.q_proj = nnx.Linear(2, 2, rngs=nnx.Rngs(1))
    opt = nnx.Optimizer(model, optax.chain(aggc_optax.aggc(), optax.sgd(0.1)), wrt=nnx.Param)
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
    opt.update(model, grads)
    rows = aggc_optax.stats_rows(opt.opt_state, 0)
    by_module = {r["module"]: r["norm"] for r in rows}
    # The reference rule on 'bias' / 'kernel' (no dot) gives no label; q_proj.* are 'q_proj'.
    assert list(by_module) == ["q_proj"]
    assert by_module["q_proj"] == pytest.approx(math.sqrt(2 * 2 + 2), rel=1e-6)


def test_errors_name_the_problem(tmp_path):
    states, _ = _run(steps=1)
    with pytest.raises(ValueError, match="no AGGC state"):
        aggc_optax.stats_rows(optax.sgd(0.1).init({"w": jnp.ones(2)}), 0)
    with pytest.raises(ValueError, match=r"step must be >= 0.*-1"):
        aggc_optax.stats_rows(states[0], -1)
    with pytest.raises(TypeError, match="step must be an int"):
        aggc_optax.stats_rows(states[0], True)
    with pytest.raises(ValueError, match=r"stats\['g'\] lacks \['upper'"):
        aggc_optax.stats_rows({"g": {"norm": 1.0, "lower": 0.0, "scale": 1.0}}, 0)
    with pytest.raises(TypeError, match="path"):
        aggc_optax.CSVLogger(3)
    bad = tmp_path / "bad.csv"
    bad.write_text("step,layer_id,grad_l2\n0,0,1.0\n")
    with pytest.raises(ValueError, match="its header is 'step,layer_id,grad_l2'"):
        aggc_optax.CSVLogger(bad, append=True)
    with pytest.raises(ValueError, match=r"lacks the columns \['module'"):
        aggc_optax.read_clip_csv(bad)
    (tmp_path / "typo.csv").write_text(HEADER + "\n0,q_proj,1.0,x,0.0,1.0\n")
    with pytest.raises(ValueError, match="line 2"):
        aggc_optax.read_clip_csv(tmp_path / "typo.csv")
    logger = aggc_optax.CSVLogger(tmp_path / "closed.csv")
    logger.close()
    with pytest.raises(ValueError, match="closed"):
        logger.log(states[0], 0)


def test_empty_cells_read_as_nan(tmp_path):
    (tmp_path / "c.csv").write_text(HEADER + "\n3,q_proj,1.5,,,0.5\n")
    data = aggc_optax.read_clip_csv(os.fspath(tmp_path / "c.csv"))["q_proj"]
    assert data["step"].tolist() == [3] and data["norm"].tolist() == [1.5]
    assert math.isnan(data["lower"][0]) and math.isnan(data["upper"][0])
