"""``python -m aggc_optax.parity --upstream PATH``: the authors' grad_clip.py beside both ports.

The authors' file is not in the repository (it has no license), so these tests
point ``--upstream`` at files with its interface: the bundled reference's own
file (``aggc_optax/torch/reference.py`` defines ``PerModuleGradClipper`` and
``PerModuleGradNormOptions``), a copy of that clipper that does not say which
branch it took (as the authors' does not), and one with a deliberate error.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest

from aggc_optax import parity, torch_reference

BUNDLED_FILE = torch_reference.__file__
STEPS = 20  # every event of the trajectories happens within 20 steps

# The bundled clipper, but with no last_branches: the harness must then read the
# branch from the reported norm and bounds, as it does for the authors' clipper.
SILENT = """
from aggc_optax.torch_reference import PerModuleGradNormOptions
from aggc_optax.torch_reference import PerModuleGradClipper as _Bundled


class PerModuleGradClipper(_Bundled):
    def __getattribute__(self, name):
        if name == "last_branches":
            raise AttributeError(name)
        return super().__getattribute__(name)
"""

# A clipper whose upper multiplier is 1% off: the three-way table must catch it.
OFF = """
from aggc_optax.torch_reference import PerModuleGradNormOptions
from aggc_optax.torch_reference import PerModuleGradClipper as _Bundled


class PerModuleGradClipper(_Bundled):
    def multipliers(self, step):
        low, high = super().multipliers(step)
        return low, high * 1.01
"""


def _write(tmp_path: Path, name: str, code: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(code), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("config", ["lora_sft", "static_bounds", "inf_caps"])
def test_three_way_with_the_bundled_file_as_upstream(config):
    upstream = parity.load_upstream(BUNDLED_FILE)
    result = parity.run_parity(config, steps=STEPS, upstream=upstream)
    print(result.table())
    assert result.ok and result.upstream is not None and result.upstream.ok
    pairs = result.upstream.pairs
    assert list(pairs) == list(parity.PAIRS)
    same = pairs[("upstream", "bundled")]
    # the same code on the same trajectory: identical to the bit, branch by branch
    assert all(v == 0.0 for v, _, _ in same.worst.values())
    assert all(v == 0.0 for v in same.worst_abs.values())
    assert same.branch_mismatches == [] and sum(same.branch_counts.values()) == STEPS * 12
    # against JAX: the float32 differences of the default report, not zero
    for pair in (("bundled", "jax"), ("upstream", "jax")):
        assert 0 < pairs[pair].worst["norm"][0] <= parity.TOLERANCE
        assert pairs[pair].worst == result.worst
        # absolute differences scale with the values (a raised all-zero group's
        # factor is about min_norm / 1e-8), so only their presence is checked
        assert 0 < max(pairs[pair].worst_abs.values()) < math.inf
    assert result.branch_counts.get("down", 0) > 0


@pytest.mark.parametrize("config", ["static_bounds", "aggressive", "nan", "inf_caps"])
def test_a_clipper_that_reports_no_branch_gets_it_from_its_bounds(tmp_path, config):
    upstream = parity.load_upstream(_write(tmp_path, "grad_clip.py", SILENT))
    result = parity.run_parity(config, steps=STEPS, upstream=upstream)
    same = result.upstream.pairs[("upstream", "bundled")]
    assert same.ok and same.branch_mismatches == []
    assert same.branch_counts == result.branch_counts
    if config == "static_bounds":
        assert same.branch_counts["raise"] > 0 and same.branch_counts["down"] > 0


def test_the_three_way_table_catches_an_upstream_disagreement(tmp_path):
    upstream = parity.load_upstream(_write(tmp_path, "grad_clip.py", OFF))
    result = parity.run_parity("plain_interval", steps=8, upstream=upstream)
    pairs = result.upstream.pairs
    assert pairs[("bundled", "jax")].ok  # the ports still agree
    assert not pairs[("upstream", "bundled")].ok and not pairs[("upstream", "jax")].ok
    assert not result.ok
    table = result.table()
    assert "upstream vs bundled" in table and "FAIL" in table


def test_main_prints_the_three_way_table(capsys):
    argv = ["--config", "grpo", "--steps", "6", "--upstream", BUNDLED_FILE]
    assert parity.main(argv) == 0
    out = capsys.readouterr().out
    assert "three-way (upstream: " + BUNDLED_FILE in out
    for a, b in parity.PAIRS:
        assert f"{a} vs {b}" in out
    assert "1/1 configurations pass" in out


def test_a_file_without_the_interface_is_a_clear_error(tmp_path, capsys):
    bad = _write(tmp_path, "not_it.py", "class PerModuleGradNormOptions:\n    pass\n")
    with pytest.raises(ImportError, match="missing class PerModuleGradClipper"):
        parity.load_upstream(bad)
    methods = _write(
        tmp_path,
        "half.py",
        "class PerModuleGradNormOptions:\n    pass\n\n"
        "class PerModuleGradClipper:\n    def attach(self, model):\n        pass\n",
    )
    with pytest.raises(ImportError, match=r"PerModuleGradClipper\.on_before_optimizer_step"):
        parity.load_upstream(methods)
    broken = _write(tmp_path, "broken.py", "import a_module_that_does_not_exist\n")
    with pytest.raises(ImportError, match=r"importing .* failed"):
        parity.load_upstream(broken)
    with pytest.raises(FileNotFoundError, match="no file"):
        parity.load_upstream(tmp_path / "missing.py")
    assert parity.main(["--config", "nan", "--upstream", bad]) == 2
    assert "does not have the interface" in capsys.readouterr().err


def test_the_three_way_table_in_docs_parity_md_is_what_the_command_prints():
    text = (Path(__file__).resolve().parents[1] / "docs" / "parity.md").read_text(encoding="utf-8")
    documented = [
        line.strip()
        for line in text.splitlines()
        if line.strip().startswith(("bundled vs jax", "upstream vs"))
    ]
    upstream = parity.load_upstream(BUNDLED_FILE)
    result = parity.run_parity("lora_sft", steps=parity.DEFAULT_STEPS, upstream=upstream)
    printed = [
        line.strip()
        for line in result.upstream.table().splitlines()
        if line.strip().startswith(("bundled vs jax", "upstream vs"))
    ]

    # Pairs, branch agreement and the exact zeros must match; the diffs' last digits
    # vary with the host CPU (docs/parity.md), so they are matched within a factor of 2.
    def parse(lines):
        rows = {}
        for line in lines:
            *pair, abs_diff, rel_diff, agree = line.split()
            rows[" ".join(pair)] = (float(abs_diff), float(rel_diff), agree)
        return rows

    want, got = parse(documented), parse(printed)
    assert list(want) == list(got) == ["bundled vs jax", "upstream vs bundled", "upstream vs jax"]
    assert got["upstream vs bundled"] == want["upstream vs bundled"] == (0.0, 0.0, "768/768")
    for pair, (abs_diff, rel_diff, agree) in want.items():
        assert got[pair][2] == agree, pair
        for documented_value, printed_value in zip((abs_diff, rel_diff), got[pair][:2]):
            assert documented_value / 2 <= printed_value <= documented_value * 2, pair
