"""lora_label against the authors' LoRA callback (tests/golden/lora_callback/, see its README).

The golden JSONs record, per parameter of a PEFT-named model, the group the
callback hooks it into (``param_hook_labels``: counted in that group's norm)
and the group whose factor it receives (``param_labels``), plus label probes on
extra names. ``intended_ga1_*`` run the callback's per-step clip once per
optimizer step, which is what ``from_reference_options`` with
``param_labels=lora_label`` does; the DoRA config checks that the magnitude
vectors are scaled with their group but not counted in its norm.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import aggc_optax
from aggc_optax import ScaleOnly, lora_label

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "lora_callback")
CONFIGS = sorted(
    name[: -len(".json")]
    for name in os.listdir(GOLDEN)
    if name.endswith(".json") and name != "index.json"
)


def _json(config: str) -> dict:
    with open(os.path.join(GOLDEN, f"{config}.json"), encoding="utf-8") as f:
        return json.load(f)


def _scaled_with(label: str | ScaleOnly | None) -> str | None:
    return label.label if isinstance(label, ScaleOnly) else label


def _counted_in(label: str | ScaleOnly | None) -> str | None:
    return None if isinstance(label, ScaleOnly) else label


def test_the_golden_configs_are_all_here() -> None:
    assert CONFIGS == [
        "hf_ga1_recipe",
        "hf_ga2_recipe",
        "hf_ga4_recipe",
        "intended_ga1_dora",
        "intended_ga1_recipe",
    ]


@pytest.mark.parametrize("config", CONFIGS)
def test_lora_label_matches_the_callbacks_labels(config: str) -> None:
    data = _json(config)
    names = data["param_names"]
    assert len(names) == len(data["param_labels"]) == len(data["param_hook_labels"])
    for name in names:
        label = lora_label(name)
        assert _scaled_with(label) == data["param_labels"][name], name
        assert _counted_in(label) == data["param_hook_labels"][name], name
    for name, probe in data["label_probes"].items():
        label = lora_label(name)
        assert (_counted_in(label), _scaled_with(label)) == (probe["hook"], probe["clip"]), name


def test_the_dora_config_has_scale_only_magnitude_vectors() -> None:
    # what makes the DoRA config a test of ScaleOnly: 24 magnitude vectors, each
    # scaled with a group and counted in none
    data = _json("intended_ga1_dora")
    magnitudes = [n for n in data["param_names"] if "lora_magnitude_vector" in n]
    assert len(magnitudes) == 3 * 7 + 1  # 7 projections of 3 layers, and the lm_head
    assert all(isinstance(lora_label(n), ScaleOnly) for n in magnitudes)
    params = {n: jnp.zeros(data["param_shapes"][n]) for n in data["trainable_param_names"]}
    info = aggc_optax.describe_groups(params, lora_label)
    assert sorted(info["groups"]) == sorted(data["module_names"])
    assert sorted(n for g in info["groups"].values() for n in g["scale_only"]) == sorted(magnitudes)
    assert info["unlabelled"] == ["base_model.model.model.norm.weight"]


@pytest.mark.parametrize("config", ["intended_ga1_recipe", "intended_ga1_dora"])
def test_the_intended_callback_trajectory_with_lora_label(config: str) -> None:
    data = _json(config)
    arrays = np.load(os.path.join(GOLDEN, f"{config}.npz"))
    modules = [str(m) for m in arrays["module_names"]]
    trainable = data["trainable_param_names"]
    tx = aggc_optax.from_reference_options(
        data["reference_options"], total_steps=data["state_max_steps"], param_labels=lora_label
    )
    state = tx.init({n: jnp.zeros(data["param_shapes"][n], jnp.float32) for n in trainable})
    update = jax.jit(tx.update)
    branches = 0
    for t in range(data["num_steps"]):
        assert arrays["event"][t] == 1  # the intended dispatch clips at every step
        grads = {n: jnp.asarray(arrays[f"raw_grad/{n}"][t]) for n in trainable}
        out, state = update(grads, state)
        for n in trainable:
            np.testing.assert_allclose(
                np.asarray(out[n]),
                arrays[f"clipped_grad/{n}"][t],
                rtol=2e-6,
                atol=1e-12,
                err_msg=f"{config} step {t} {n}",
            )
        stats = aggc_optax.group_stats(state)
        for m, module in enumerate(modules):
            got = stats[module]
            # the norm counts the adapters only: DoRA's magnitudes (whose gradients
            # are the largest in the model) would change it by far more than this
            for field in ("norm", "scale", "ema"):
                want = arrays[field][t, m]
                assert math.isclose(float(got[field]), want, rel_tol=2e-6), (t, module, field)
            branches += int(arrays["branch"][t, m] != 0)
    assert branches == data["event_counts"]["clip_down"] + data["event_counts"]["raise_up"] > 100
