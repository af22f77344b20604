"""examples/benchmark.py --quick runs and writes well-formed JSON and Markdown.

No timing is asserted here (speed claims come from the benchmark's own
same-run ratios, see docs/performance.md); only that every measurement is
present, finite and positive, that the goals are evaluated, and that the
Markdown tables agree with the JSON.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import statistics
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "benchmark.py"
GOAL_STATUSES = {"met", "MISSED", "not measured"}


def _run_benchmark(*flags: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, str]:
    out = tmp_path_factory.mktemp("benchmark")
    proc = _run_benchmark("--quick", "--out-dir", str(out))
    result = json.loads((out / "benchmark.json").read_text())
    markdown = (out / "benchmark.md").read_text()
    return result, markdown, proc.stdout


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_json_has_every_measurement(quick_run):
    result, _, _ = quick_run
    assert result["device"]["kind"] == "cpu"
    assert _positive(result["bandwidth"]["bytes_per_s"])
    (size,) = result["sizes"]  # --quick runs one size
    assert size["size"] == "7m" and size["leaves"] == 39 and size["groups"] == 12
    for method in ("adamw", "global", "global_fused", "aggc"):
        u = size["updates"][method]
        assert len(u["step_s"]) == result["settings"]["repeats"]
        assert all(_positive(t) for t in u["step_s"])
        assert _positive(u["compile_best_s"]) and _positive(u["lower_best_s"])
        assert u["memory"]["temp_bytes"] >= 0
    assert size["step_ratio"] == pytest.approx(
        size["updates"]["aggc"]["step_median_s"] / size["updates"]["global"]["step_median_s"]
    )
    assert size["temp_excess_bytes"] == (size["temp_bytes"]["aggc"] - size["temp_bytes"]["global"])


def test_no_gradient_sized_temporary(quick_run):
    # Not a timing: XLA's static buffer assignment. The clip must fuse into
    # AdamW's update, so AGGC allocates nothing near the size of a gradient.
    result, _, _ = quick_run
    (size,) = result["sizes"]
    assert size["temp_bytes"]["aggc"] < 0.01 * size["grad_bytes"]


def test_scaling_runs_cover_leaves_and_groups(quick_run):
    result, _, _ = quick_run
    leaves = result["leaf_scaling"]
    assert [r["leaves"] for r in leaves] == [21, 48]
    for r in leaves:
        assert _positive(r["step_median_s"]["aggc"]) and _positive(r["compile_best_s"]["aggc"])
    groups = result["group_scaling"]
    assert groups["leaves"] == 48
    assert [r["groups"] for r in groups["rows"]] == [1, 12, 48]
    assert result["leaf_fits"]["aggc step"]["r2"] <= 1.0


def test_torch_comparison_ran_or_says_why(quick_run):
    result, markdown, stdout = quick_run
    torch_part = result["sizes"][0]["torch"]
    if "skipped" in torch_part:
        assert torch_part["skipped"] and "skipped" in stdout
        assert "skipped" in markdown
    else:
        assert torch_part["groups"] in (12, None)  # None: the clipper does not say
        assert _positive(torch_part["aggc_update_median_s"])
        assert _positive(torch_part["backward_median_s"])
        assert torch_part["speedup"] == pytest.approx(
            torch_part["reference_cost_s"] / torch_part["aggc_update_median_s"]
        )
        in_step = torch_part["speedup_in_step"]
        assert in_step is None or in_step == pytest.approx(
            torch_part["reference_cost_s"] / result["sizes"][0]["aggc_cost_s"]
        )


def test_goals_are_evaluated(quick_run):
    result, _, _ = quick_run
    goals = {g["goal"]: g for g in result["goals"]}
    assert len(goals) >= 6
    assert {g["status"] for g in goals.values()} <= GOAL_STATUSES
    floor = next(g for name, g in goals.items() if name.startswith("clip cost"))
    assert floor["status"] == "not measured"  # a GPU goal, and this is a CPU run


def _tables(markdown: str) -> list[list[list[str]]]:
    tables, current = [], []
    for line in markdown.splitlines():
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def test_markdown_tables_are_well_formed_and_match_the_json(quick_run):
    result, markdown, _ = quick_run
    for heading in (
        "## Step time",
        "## Compile time",
        "## Scaling with the number of leaves",
        "## Scaling with the number of groups",
        "## Goals",
    ):
        assert heading in markdown
    tables = _tables(markdown)
    assert len(tables) >= 5
    for table in tables:
        header, rule, *rows = table
        assert all(re.fullmatch(r"-+", c) for c in rule)
        assert rows and all(len(row) == len(header) for row in [rule, *rows])
    step_table = tables[0]
    row = dict(zip(step_table[0], step_table[2]))
    updates = result["sizes"][0]["updates"]
    assert row["size"] == "7m"
    assert row["aggc+adamw ms"] == f"{1e3 * updates['aggc']['step_median_s']:.2f}"
    assert row["global+adamw ms"] == f"{1e3 * updates['global']['step_median_s']:.2f}"
    goal_table = tables[-1]
    assert len(goal_table) - 2 == len(result["goals"])


def test_many_leaves_mode_prints_per_round_ratios_from_its_own_samples(tmp_path) -> None:
    proc = _run_benchmark("--quick", "--many-leaves", "28", "--out-dir", str(tmp_path))
    result = json.loads((tmp_path / "many_leaves.json").read_text())
    small = result["small_leaves"]
    assert small["leaves"] == 28 and small["params"] == 4 * (
        2304 + 6144 + 6144 + 48 + 96 + 256 + 256
    )
    assert small["variants"]["per_leaf"]["groups"] == 28
    assert small["variants"]["12_groups"]["groups"] == 4  # 4 blocks of 7 leaves: g0..g3
    for name, row in small["variants"].items():
        compile_ratios = [a / b for a, b in zip(row["compile_s"], small["global"]["compile_s"])]
        assert row["compile"]["per_round"] == pytest.approx(compile_ratios)
        assert row["compile"]["median"] == pytest.approx(statistics.median(compile_ratios))
        assert len(row["update"]["per_round"]) == 5  # --quick: 5 timed rounds
        assert all(_positive(r) for r in row["update"]["per_round"])
        line = f"{'one group per leaf' if name == 'per_leaf' else '12 groups':>18} compile"
        assert f"{line}: {row['compile']['median']:.2f}x" in proc.stdout
    large = result["large_tree"]
    assert large["size"] == "7m" and _positive(large["step"]["median"])
    assert large["temp_excess_bytes"] == large["temp_bytes"]["aggc"] - large["temp_bytes"]["global"]
    assert f"step   : {large['step']['median']:.3f}x" in proc.stdout
