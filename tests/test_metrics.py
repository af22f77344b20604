"""aggc_optax.metrics: the flat dict for loggers, against hand-computed values."""

from __future__ import annotations

import math
import re
import warnings

import jax
import jax.numpy as jnp
import optax
import pytest

import aggc_optax
from aggc_optax.monitoring import _metrics

FIELDS = _metrics.GROUP_KEYS


def _grads(q: float, v: float) -> dict:
    return {"q_proj": {"weight": jnp.full(4, q)}, "v_proj": {"weight": jnp.full(4, v)}}


def _two_steps(**kwargs):
    """Step 1: every entry 1 (norms 2, the EMA starts at 2, upper bound 4).

    Step 2: q_proj entries 3 (norm 6 > 4: scale 4/6, EMA 0.99*2 + 0.01*4 = 2.02)
    and v_proj entries ``v`` from kwargs.
    """
    v = kwargs.pop("v", 1.0)
    kwargs.setdefault("high_mult", 2.0)  # the hand computation's bound: 2 x EMA
    tx = optax.chain(aggc_optax.aggc(**kwargs), optax.sgd(0.1))
    state = tx.init(_grads(1.0, 1.0))
    step = jax.jit(tx.update)
    _, state = step(_grads(1.0, 1.0), state)
    _, state = step(_grads(3.0, v), state)
    return state


def test_values_by_hand():
    m = aggc_optax.metrics(_two_steps())
    expected = {
        "aggc/q_proj/norm": 6.0,
        "aggc/q_proj/scale": 4.0 / 6.0,
        "aggc/q_proj/lower": 0.0,
        "aggc/q_proj/upper": 4.0,
        "aggc/q_proj/ema": 2.02,
        "aggc/q_proj/clipped": 1.0,
        "aggc/q_proj/raised": 0.0,
        "aggc/q_proj/clip_down_count": 1.0,
        "aggc/q_proj/raise_count": 0.0,
        "aggc/v_proj/norm": 2.0,
        "aggc/v_proj/scale": 1.0,
        "aggc/v_proj/lower": 0.0,
        "aggc/v_proj/upper": 4.0,
        "aggc/v_proj/ema": 2.0,
        "aggc/v_proj/clipped": 0.0,
        "aggc/v_proj/raised": 0.0,
        "aggc/v_proj/clip_down_count": 0.0,
        "aggc/v_proj/raise_count": 0.0,
        "aggc/global_norm_before": math.sqrt(36.0 + 4.0),
        "aggc/global_norm_after": math.sqrt(16.0 + 4.0),
        "aggc/fraction_clipped": 0.5,
        "aggc/fraction_raised": 0.0,
    }
    assert list(m) == list(expected)
    assert all(type(x) is float for x in m.values())
    for key, want in expected.items():
        assert m[key] == pytest.approx(want, rel=1e-6), key


def test_raised_group_and_prefix():
    # low_mult 0.5: lower bound 0.5 * 2 = 1; v_proj entries 0.25 give norm 0.5,
    # raised by 1 / 0.5 = 2.
    m = aggc_optax.metrics(_two_steps(low_mult=0.5, v=0.25), prefix="clip")
    assert m["clip/v_proj/lower"] == pytest.approx(1.0)
    assert m["clip/v_proj/scale"] == pytest.approx(2.0)
    assert m["clip/v_proj/raised"] == 1.0 and m["clip/v_proj/clipped"] == 0.0
    assert m["clip/v_proj/raise_count"] == 1.0
    assert m["clip/fraction_raised"] == 0.5 and m["clip/fraction_clipped"] == 0.5
    assert m["clip/global_norm_after"] == pytest.approx(math.sqrt(16.0 + 1.0), rel=1e-6)
    assert not any(k.startswith("aggc/") for k in m)


def test_before_first_step():
    tx = optax.chain(aggc_optax.aggc(), optax.sgd(0.1))
    m = aggc_optax.metrics(tx.init(_grads(1.0, 1.0)))
    assert m["aggc/q_proj/norm"] == 0.0 and m["aggc/q_proj/scale"] == 1.0
    assert m["aggc/global_norm_before"] == 0.0 and m["aggc/fraction_clipped"] == 0.0


def test_one_transfer_and_no_retrace(monkeypatch):
    state = _two_steps()
    aggc_optax.metrics(state)
    size = _metrics._stack._cache_size()
    calls = []
    real = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: calls.append(x) or real(x))
    aggc_optax.metrics(state)
    assert len(calls) == 1
    assert len(jax.tree_util.tree_leaves(calls[0])) == 1  # one stacked array
    assert _metrics._stack._cache_size() == size


def test_agrees_with_group_stats():
    state = _two_steps()
    m = aggc_optax.metrics(state)
    for label, stats in aggc_optax.group_stats(state).items():
        for field, value in stats.items():
            assert m[f"aggc/{label}/{field}"] == float(value)


def test_several_states_get_an_index():
    grads = _grads(3.0, 1.0)
    tx = optax.partition(
        {"a": aggc_optax.aggc(), "b": aggc_optax.aggc(high_mult=1.0)},
        {"q_proj": {"weight": "a"}, "v_proj": {"weight": "b"}},
    )
    state = tx.init(grads)
    _, state = tx.update(grads, state)
    m = aggc_optax.metrics(state)
    assert m["aggc/0/q_proj/norm"] == pytest.approx(6.0)
    assert m["aggc/1/v_proj/norm"] == pytest.approx(2.0)
    assert m["aggc/0/global_norm_before"] == pytest.approx(6.0)
    assert m["aggc/1/global_norm_before"] == pytest.approx(2.0)
    assert not any(k.startswith("aggc/q_proj") for k in m)


def test_no_state():
    with pytest.raises(ValueError, match="no AGGC state"):
        aggc_optax.metrics(optax.sgd(0.1).init({"w": jnp.ones(2)}))


def test_state_dict_keeps_labels():
    serialization = pytest.importorskip("flax.serialization")
    state = _two_steps()
    as_dict = serialization.to_state_dict(state)
    assert aggc_optax.metrics(as_dict) == aggc_optax.metrics(state)


def test_nnx_state_and_optimizer():
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.q_proj = nnx.Linear(2, 2, rngs=rngs)
            self.v_proj = nnx.Linear(2, 2, rngs=rngs)

    model = Model(nnx.Rngs(0))
    tx = optax.chain(aggc_optax.aggc(param_labels=lambda name: name.split(".")[0]), optax.sgd(0.1))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    grads = jax.tree_util.tree_map(lambda p: jnp.ones_like(p), nnx.state(model, nnx.Param))
    optimizer.update(model, grads)
    # each group: a 2x2 kernel and a bias of ones, norm sqrt(6)
    want = aggc_optax.metrics(optimizer.opt_state)
    assert want["aggc/q_proj/norm"] == pytest.approx(math.sqrt(6.0))
    state = nnx.state(optimizer)
    assert aggc_optax.metrics(state, labels=optimizer.opt_state) == want
    assert aggc_optax.metrics(state, labels=["q_proj", "v_proj"]) == want
    assert aggc_optax.metrics(optimizer) == want
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        by_index = aggc_optax.metrics(state)
        stats = aggc_optax.group_stats(state)
    assert any("named by index" in str(w.message) for w in caught)
    assert by_index["aggc/0/norm"] == want["aggc/q_proj/norm"]
    assert sorted(stats) == ["0", "1"]
    assert float(stats["1"]["norm"]) == pytest.approx(math.sqrt(6.0))
    with pytest.raises(ValueError, match="3 entries but the AGGC state has 2 groups"):
        aggc_optax.metrics(state, labels=["a", "b", "c"])


def test_cached_search_reads_the_new_state():
    # the search is cached per tree structure: a later state of the same structure
    # must give its own values
    first = _two_steps()
    second = _two_steps(v=0.5)
    assert aggc_optax.metrics(first)["aggc/v_proj/norm"] == pytest.approx(2.0)
    assert aggc_optax.metrics(second)["aggc/v_proj/norm"] == pytest.approx(1.0)
    assert float(aggc_optax.group_stats(first)["v_proj"]["norm"]) == pytest.approx(2.0)


def _read_events(path) -> list:
    """The events of a TensorBoard event file, from its TFRecord framing.

    Each record: an 8-byte little-endian length, a 4-byte CRC of it, the data,
    a 4-byte CRC of the data (CRCs not checked here; the parse would fail).
    """
    import struct

    from tensorboardX.proto import event_pb2

    events = []
    with open(path, "rb") as f:
        while header := f.read(12):
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            f.read(4)
            events.append(event_pb2.Event.FromString(data))
    return events


def test_tensorboard_example_writes_the_scalars(tmp_path):
    pytest.importorskip("tensorboardX")
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    import tensorboard_logging

    logged = tensorboard_logging.main(
        ["--logdir", str(tmp_path), "--steps", "6", "--spike-step", "4"]
    )
    (event_file,) = tmp_path.iterdir()
    found: dict[int, dict[str, float]] = {}
    for event in _read_events(event_file):
        for value in event.summary.value:
            found.setdefault(event.step, {})[value.tag] = value.simple_value
    assert sorted(found) == list(range(6))
    for step, scalars in found.items():
        # TensorBoard tags allow [-/\w.]: tensorboardX writes module_labels'
        # "layers.*.up_proj" as "layers._.up_proj"
        want = {re.sub(r"[^-/\w.]", "_", k): v for k, v in logged[step].items()}
        assert set(scalars) == set(want)
        for tag, value in scalars.items():
            assert value == pytest.approx(want[tag], rel=1e-6, abs=1e-30), tag
    labels = {k.split("/")[1] for k in found[0] if k.count("/") == 2}
    assert labels == {"layers._.up_proj", "layers._.down_proj", "lm_head"}
    # the file's own numbers hang together: the global norm from its group norms,
    # and the x100 targets of step 4 clipped every group
    norms = [v for k, v in found[4].items() if k.endswith("/norm")]
    assert found[4]["aggc/global_norm_before"] == pytest.approx(
        math.sqrt(sum(n * n for n in norms)), rel=1e-5
    )
    assert found[4]["aggc/fraction_clipped"] == 1.0
    assert found[0]["aggc/fraction_clipped"] == 0.0  # the first step sets the EMAs
