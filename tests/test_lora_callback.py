"""lora_callback_as_ran against the authors' LoRA callback as it ran (tests/golden/lora_callback/).

``hf_ga{1,2,4}_recipe`` drive the callback exactly as the Hugging Face Trainer
does at gradient accumulation 1, 2 and 4. Each micro-batch's gradient
(``micro_grad``) goes through the transformation; with ``optax.identity()`` as
the inner optimizer, what it returns at the last micro-batch of a step is
what the Trainer handed ``optimizer.step()`` (``clipped_grad``).
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aggc_optax

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "lora_callback")


def _load(config: str) -> tuple[dict, np.lib.npyio.NpzFile]:
    with open(os.path.join(GOLDEN, f"{config}.json"), encoding="utf-8") as f:
        data = json.load(f)
    return data, np.load(os.path.join(GOLDEN, f"{config}.npz"))


@pytest.mark.parametrize("config", ["hf_ga1_recipe", "hf_ga2_recipe", "hf_ga4_recipe"])
def test_every_step_group_and_gradient_as_the_trainer_ran_it(config: str) -> None:
    data, arrays = _load(config)
    k = data["gradient_accumulation_steps"]
    trainable = data["trainable_param_names"]
    modules = [str(m) for m in arrays["module_names"]]
    tx = aggc_optax.lora_callback_as_ran(
        optax.identity(),
        accumulation_steps=k,
        total_steps=data["state_max_steps"],
        options=data["reference_options"],
    )
    state = tx.init({n: jnp.zeros(data["param_shapes"][n], jnp.float32) for n in trainable})
    update = jax.jit(tx.update)
    clips = downs = 0
    for t in range(data["num_steps"]):
        before = aggc_optax.group_stats(state.clip_state)
        for j in range(k):
            out, state = update(
                {n: jnp.asarray(arrays[f"micro_grad/{n}"][t, j]) for n in trainable}, state
            )
            if j < k - 1:
                assert all(not np.any(np.asarray(v)) for v in out.values())
        assert int(state.step) == t + 1 and int(state.micro_step) == 0
        for n in trainable:
            want = arrays[f"clipped_grad/{n}"][t]
            # scale * g0 + g1 can cancel in an entry: the factor's float32
            # rounding is bounded by the tensor's size, not the entry's
            np.testing.assert_allclose(
                np.asarray(out[n]), want, rtol=2e-6, atol=2e-6 * float(np.max(np.abs(want))),
                err_msg=f"{config} step {t} {n}",
            )  # fmt: skip
        stats = aggc_optax.group_stats(state.clip_state)
        clipped = int(arrays["event"][t]) == 1
        clips += clipped
        for m, module in enumerate(modules):
            got = {f: float(v) for f, v in stats[module].items()}
            assert math.isclose(got["ema"], arrays["ema"][t, m], rel_tol=2e-6, abs_tol=1e-30)
            down = got["clip_down_count"] - float(before[module]["clip_down_count"])
            up = got["raise_count"] - float(before[module]["raise_count"])
            assert (down, up) == (float(arrays["branch"][t, m] == -1), 0.0), (t, module)
            downs += int(down)
            if clipped:
                for field in ("norm", "lower", "upper", "scale"):
                    want = arrays[field][t, m]
                    assert math.isclose(got[field], want, rel_tol=2e-6), (t, module, field)
    counts = data["event_counts"]
    assert (clips, downs) == (counts["clip_events"], counts["clip_down"])


def test_accumulation_one_is_the_inner_optimizer_untouched() -> None:
    # the recipe at k = 1 as it ran: gradients pass as they are, the EMA stays 0
    params = {"model.layers.0.self_attn.q_proj.lora_A.default.weight": jnp.ones((2, 3))}
    tx = aggc_optax.lora_callback_as_ran(optax.sgd(0.5), accumulation_steps=1, total_steps=4)
    state = tx.init(params)
    grads = {k: jnp.full((2, 3), 7.0) for k in params}
    for _ in range(3):
        out, state = tx.update(grads, state, params)
        np.testing.assert_array_equal(out[next(iter(params))], np.full((2, 3), -3.5))
    assert float(aggc_optax.group_stats(state.clip_state)["q_proj"]["ema"]) == 0.0


def test_bad_arguments_name_the_parameter() -> None:
    with pytest.raises(ValueError, match="accumulation_steps"):
        aggc_optax.lora_callback_as_ran(optax.identity(), 0, 10)
    with pytest.raises(TypeError, match="accumulation_steps"):
        aggc_optax.lora_callback_as_ran(optax.identity(), 2.0, 10)
    with pytest.raises(ValueError, match="total_steps"):
        aggc_optax.lora_callback_as_ran(optax.identity(), 2, 0)
    with pytest.raises(ValueError, match="param_labels"):
        aggc_optax.lora_callback_as_ran(optax.identity(), 2, 10, param_labels={"a": "q"})
    tx = aggc_optax.lora_callback_as_ran(optax.identity(), 2, 10, options={"enable": False})
    with pytest.raises(ValueError, match="enable"):
        tx.init({"a.q_proj.weight": jnp.ones(2)})


# -- the numbers the docs give about the runs -------------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = {
    "1": "hf_ga1_recipe",
    "2": "hf_ga2_recipe",
    "4": "hf_ga4_recipe",
    "as meant": "intended_ga1_recipe",
}


def _expected_row(key: str) -> list[str]:
    data, arrays = _load(ROWS[key])
    k = data["gradient_accumulation_steps"]
    event = arrays["event"] == 1
    steps = np.flatnonzero(event)
    events, total, groups = int(event.sum()), len(event), arrays["branch"].shape[1]
    clipped = f"{events} of {total}"
    if events and np.array_equal(steps, np.arange(1, total, 2)):
        clipped += " (every other step)"
    micro = sorted(set(arrays["event_micro"][event].tolist()))
    if not events:
        when = "never"
    elif micro == [k]:
        when = "the last (the whole step)"
    else:
        per = {int(np.sum(arrays["event_micro"][event] == m)) for m in micro}
        names = (
            ", ".join(map(str, micro[:-1])) + " or " + str(micro[-1])
            if len(micro) > 1
            else str(micro[0])
        )
        when = f"{names} of {k}" + (
            f" ({per.pop()} steps each)" if len(micro) > 1 and len(per) == 1 else ""
        )
    down = int(np.sum(arrays["branch"] == -1))
    assert not np.any(arrays["branch"] == 1)  # the recipe never raises
    checked = "none checked" if not events else f"{down} of {events * groups} checked"
    script = os.path.basename(os.path.dirname(data["recipe_script"])).split("_")[0]
    scripts = {"metamath": "metamath", "conveision": "conversation, code"}[script]
    if key == "as meant":
        scripts = ""
    elif data["recipe_script_gradient_accumulation_steps"] != k:
        scripts = "none"
    return [key, scripts, clipped, when, checked]


def _tables(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("| ") and line.endswith("|"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


@pytest.mark.parametrize(
    "where", ["docs/differences.md", "docs/porting.md", "aggc_optax.presets.lora_sft"]
)
def test_the_docs_numbers_are_the_golden_datas(where: str) -> None:
    if where.startswith("docs/"):
        with open(os.path.join(REPO, where), encoding="utf-8") as f:
            text = f.read()
    else:
        text = aggc_optax.presets.lora_sft.__doc__
    rows = [r for r in _tables(text) if r[0] in ROWS]
    assert [r[0] for r in rows] == list(ROWS), where
    for row in rows:
        assert row == _expected_row(row[0]), where
    assert "with Hugging Face's accumulation that is the same gradient" not in text


def test_at_accumulation_one_the_run_left_everything_untouched() -> None:
    # what the docs say of k = 1 beyond the table: EMA 0, gradients as they came
    data, arrays = _load("hf_ga1_recipe")
    assert np.all(arrays["ema"] == 0)
    for n in data["trainable_param_names"]:
        np.testing.assert_array_equal(arrays[f"clipped_grad/{n}"], arrays[f"raw_grad/{n}"])
