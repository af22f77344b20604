"""Every ```python block of docs/*.md and of the README runs on its own.

Each block runs alone in a fresh namespace (as a reader copying that one block
would), with the working directory set to a temporary folder so nothing lands
in the checkout. The API reference site (Sphinx, docs/conf.py) builds with
warnings as errors.
"""

import glob
import linecache
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```\s*$", re.DOTALL | re.MULTILINE)
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def python_blocks(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    # Line numbers, so a failure points at the block in the Markdown file.
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCE.finditer(text)]


def test_the_docs_exist():
    names = {os.path.basename(p) for p in DOCS}
    for page in (
        "index.md",
        "getting-started.md",
        "grouping.md",
        "hyperparameters.md",
        "porting.md",
        "differences.md",
        "plots.md",
        "architecture.md",
    ):
        assert page in names


def test_fence_parser_finds_only_python_blocks():
    text = (
        "a\n```python\nx = 1\n```\n```bash\nrm -rf /\n```\n"
        "```text\nno\n```\n```python\ny = 2\n```\n"
    )
    assert FENCE.findall(text) == ["x = 1\n", "y = 2\n"]


def _all_blocks():
    for path in [*DOCS, os.path.join(ROOT, "README.md")]:
        for line, source in python_blocks(path):
            yield pytest.param(path, line, source, id=f"{os.path.relpath(path, ROOT)}:{line}")


def test_the_readme_has_a_usage_block():
    assert python_blocks(os.path.join(ROOT, "README.md")), "the README's usage example"


@pytest.mark.parametrize(("path", "line", "source"), list(_all_blocks()))
def test_python_block_runs_alone(path, line, source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = os.path.relpath(path, ROOT)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    # Tracebacks then quote the Markdown file's own lines, numbered as in the file.
    linecache.cache[name] = (len(text), None, text.splitlines(True), name)
    namespace = {"__name__": "__docs__"}
    exec(compile("\n" * (line - 1) + source, name, "exec"), namespace)


def test_every_public_name_is_in_the_api_reference():
    import aggc_optax

    with open(os.path.join(ROOT, "docs", "api", "reference.rst"), encoding="utf-8") as f:
        reference = f.read()
    documented = set(re.findall(r"^\.\. auto\w+:: (\w+)", reference, re.MULTILINE))
    assert set(aggc_optax.__all__) - {"presets"} <= documented
    with open(os.path.join(ROOT, "docs", "api", "modules.rst"), encoding="utf-8") as f:
        modules = set(re.findall(r"^\.\. automodule:: aggc_optax\.([\w.]+)", f.read(), re.M))
    assert modules == {
        "presets",
        "monitoring.csv_log",
        "monitoring.plotting",
        "cli",
        "torch.parity",
        "torch.reference",
    }


def test_api_site_builds_without_warnings(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")
    result = subprocess.run(
        [
            *(sys.executable, "-m", "sphinx", "-b", "html", "-q", "-W", "--keep-going", "-E"),
            *("-d", str(tmp_path / "doctrees"), os.path.join(ROOT, "docs"), str(tmp_path / "html")),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    with open(tmp_path / "html" / "api" / "reference.html", encoding="utf-8") as f:
        page = f.read()
    assert "aggc_optax.metrics" in page and "Adaptive Group Gradient Clipping" in page
