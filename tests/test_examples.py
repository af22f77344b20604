"""The examples run end to end (tiny settings, in a subprocess) and do what they claim."""

import csv
import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
PROJECTIONS = ["down_proj", "gate_proj", "up_proj", "k_proj", "o_proj", "q_proj", "v_proj"]


def _run(script, *args, timeout=300):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _load_train_lm():
    spec = importlib.util.spec_from_file_location("train_lm", os.path.join(EXAMPLES, "train_lm.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_lm"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


TRAIN_LM_TINY = [
    "--steps", "30", "--d-model", "32", "--layers", "1", "--mlp-dim", "64",
    "--batch-size", "8", "--seq-len", "32", "--problems", "400", "--eval-batch", "16",
    "--fault-steps", "12:15",
]  # fmt: skip


@pytest.fixture(scope="module")
def train_lm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_lm")
    proc = _run("train_lm.py", *TRAIN_LM_TINY, "--out", str(out))
    return out, proc


def test_train_lm_writes_every_output(train_lm_run):
    out, proc = train_lm_run
    for name in ("loss.png", "group_norms.png", "clip_scales.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    # The progress bar (tqdm, on stderr) ran to the last step.
    assert "training" in proc.stderr and "30/30" in proc.stderr
    assert "AGGC groups (aggc_optax.describe_groups):" in proc.stdout
    summary = (out / "summary.md").read_text()
    assert summary in proc.stdout
    for title in ("AdamW, no clipping", "AdamW + global-norm clip", "AdamW + AGGC"):
        assert f"| {title} |" in summary
    assert "| v_proj |" in summary and "v_proj gradients x100 at steps 12-14" in summary


def test_train_lm_loss_falls_for_every_run(train_lm_run):
    out, _ = train_lm_run
    rows = _read_csv(out / "losses.csv")
    assert len(rows) == 30
    for run in ("adamw", "global_clip", "aggc"):
        losses = np.array([float(r[run]) for r in rows])
        # Character-level cross-entropy starts near log(70) = 4.25.
        assert losses[0] > 3.5
        assert losses[-5:].mean() < 0.8 * losses[0], (run, losses)


def test_train_lm_reference_csv_agrees_with_the_runs_own_norms(train_lm_run):
    out, _ = train_lm_run
    clip = _read_csv(out / "per_module_clip.csv")
    with open(out / "per_module_clip.csv") as f:
        assert f.readline().strip() == "step,module,norm,lower,upper,scale"
    groups = [r["module"] for r in clip[:12]]
    # NNX state order: lm_head, model.embed_tokens, model.layers.0.(...sorted), model.norm.
    assert groups == [
        "lm_head", "embed_tokens", "input_layernorm", "down_proj", "gate_proj", "up_proj",
        "post_attention_layernorm", "k_proj", "o_proj", "q_proj", "v_proj", "norm",
    ]  # fmt: skip
    assert len(clip) == 30 * 12
    assert [int(r["step"]) for r in clip[::12]] == list(range(30))
    # The example measures each group's norm itself; AGGC's own statistic must match it.
    norms = [r for r in _read_csv(out / "group_norms.csv") if r["run"] == "aggc"]
    assert [(r["step"], r["module"]) for r in norms] == [(r["step"], r["module"]) for r in clip]
    np.testing.assert_allclose(
        [float(r["norm"]) for r in clip], [float(r["norm_before"]) for r in norms], rtol=1e-5
    )
    np.testing.assert_allclose(
        [float(r["scale"]) for r in clip], [float(r["scale"]) for r in norms], rtol=1e-5
    )


def test_train_lm_fault_spills_over_under_global_clipping_only(train_lm_run):
    out, _ = train_lm_run
    rows = _read_csv(out / "group_norms.csv")

    def series(run, module, field):
        return np.array(
            [float(r[field]) for r in rows if r["run"] == run and r["module"] == module]
        )

    v_before = series("adamw", "v_proj", "norm_before")
    assert v_before[12:15].min() > 20 * v_before[9:12].max()  # the x100 burst
    for module in ("q_proj", "down_proj", "lm_head"):
        global_scale = series("global_clip", module, "scale")
        aggc_scale = series("aggc", module, "scale")
        assert global_scale[12:15].max() < 0.5  # everyone shrunk to make room for v_proj
        assert aggc_scale.min() >= 0.9 - 1e-6  # the recipe's floor; others never squeezed
        np.testing.assert_allclose(series("adamw", module, "scale"), 1.0)


def test_train_lm_helpers():
    train_lm = _load_train_lm()
    rng = np.random.default_rng(3)
    for kind in ("add", "sub", "mul"):
        for _ in range(20):
            text, start = train_lm.make_problem(rng, kind)
            a, op, b, answer = re.search(r" (\d+)([+*-])(\d+)=(\d+)\.\n$", text).groups()
            expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert int(answer) == expected and op == {"add": "+", "sub": "-", "mul": "*"}[kind]
            assert text[start:-2] == answer
    ids, mask = train_lm.make_corpus(3, seed=0)
    text = "".join(train_lm.VOCAB[i] for i in ids)
    assert "".join(c for c, m in zip(text, mask) if m) == "".join(
        line.rsplit("=", 1)[1].rstrip(".") for line in text.splitlines()
    )
    assert train_lm.parse_fault_steps("auto", 300) == (30, 60)
    assert train_lm.parse_fault_steps("none", 300) is None
    assert train_lm.parse_fault_steps("5:9", 300) == (5, 9)
    with pytest.raises(SystemExit, match="START:END"):
        train_lm.parse_fault_steps("5", 300)
    with pytest.raises(SystemExit, match="0 <= START < END"):
        train_lm.parse_fault_steps("9:5", 300)
    with pytest.raises(SystemExit, match=r"START must be below --steps \(300\)"):
        train_lm.parse_fault_steps("300:310", 300)
    assert train_lm.parse_fault_steps("295:310", 300) == (295, 300)


def test_train_lm_rejects_unknown_fault_group(tmp_path):
    train_lm = _load_train_lm()
    args = ["--steps", "1", "--d-model", "16", "--layers", "1", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match=r"--fault-group 'wq' is not a group; groups: .*v_proj"):
        train_lm.main([*args, "--fault-group", "wq"])
    for bad in (["--d-model", "30"], ["--steps", "0"], ["--heads", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            train_lm.main(bad)
        assert exit_info.value.code == 2  # argparse's usage error, before any training


def test_linen_example_learns():
    proc = _run("linen_example.py", "--steps", "80", "--print-every", "40")
    first, last = map(float, re.search(r"all data: ([\d.]+) -> ([\d.]+)", proc.stdout).groups())
    assert last < 0.3 * first
    # Linen paths give one group per module type across both blocks.
    assert re.search(r"group up_proj .*'params\.layers_0\.up_proj\.bias'", proc.stdout)
    assert re.search(r"up_proj +norm .* clipped \d+x", proc.stdout)


def test_lora_example_trains_only_adapters(tmp_path):
    proc = _run(
        "lora_example.py", "--pretrain-steps", "20", "--steps", "30", "--d-model", "32",
        "--layers", "1", "--problems", "300", "--out", str(tmp_path),
    )  # fmt: skip
    before, after = map(
        float, re.search(r"multiplication problems: ([\d.]+) -> ([\d.]+)", proc.stdout).groups()
    )
    assert after < 0.8 * before
    assert "largest change of a frozen weight: 0.0\n" in proc.stdout
    clip = _read_csv(tmp_path / "per_module_clip.csv")
    assert [r["module"] for r in clip[:7]] == PROJECTIONS
    assert len(clip) == 30 * 7


def test_train_lm_switches_aggc_variants_from_the_command_line(tmp_path):
    # --ema-init first with --variant paper and no caps: the EMA starts at the
    # first norm, so step 0 already has bounds [0.5, 2] x norm_0 around the norm
    # (nothing clipped), unlike the recipe, whose zero EMA gives upper = 0.
    out = tmp_path / "variant"
    proc = _run(
        "train_lm.py", *TRAIN_LM_TINY, "--out", str(out), "--quiet",
        "--aggc-preset", "default", "--ema-init", "first", "--variant", "paper",
        "--low-mult", "0.5", "--high-mult", "2.0",
    )  # fmt: skip
    assert "--variant paper" in proc.stdout and "--ema-init first" in proc.stdout
    rows = [r for r in _read_csv(out / "per_module_clip.csv") if r["step"] == "0"]
    assert rows, "no step-0 rows"
    for r in rows:
        norm = float(r["norm"])
        assert float(r["upper"]) == pytest.approx(2.0 * norm, rel=1e-5)
        assert float(r["lower"]) == pytest.approx(max(0.01, 0.5 * norm), rel=1e-5)
        assert float(r["scale"]) == 1.0


def test_train_lm_fault_caption_states_what_the_csv_shows(train_lm_run):
    # The summary's fault sentence is computed from the run; recompute it from
    # group_norms.csv here so a caption cannot drift from the data again.
    out, _ = train_lm_run
    rows = _read_csv(out / "group_norms.csv")
    summary = (out / "summary.md").read_text()
    sentence = summary.split("Smallest factors during the fault: ")[1].split("\n")[0]
    for run, name in (("global_clip", "global-norm clip"), ("aggc", "AGGC")):
        scale = {}
        for r in rows:
            if r["run"] == run and 12 <= int(r["step"]) < 15:
                scale.setdefault(r["module"], []).append(float(r["scale"]))
        faulty = min(scale.pop("v_proj"))
        others = min(min(v) for v in scale.values())
        clause = next(c for c in sentence.rstrip(".").split("; ") if c.startswith(name))
        assert f"v_proj x{faulty:.2g}" in clause, (clause, faulty)
        if others >= 1 - 1e-6:
            assert "other groups untouched" in clause
        else:
            assert f"other groups down to x{others:.2g}" in clause, (clause, others)
