"""Every ```python block of docs/*.md and of the README runs.

Each file runs in a fresh namespace, its blocks in order (a later block sees
what earlier ones defined), with the working directory set to a temporary
folder so nothing lands in the checkout.
"""

import glob
import linecache
import os
import re

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
    ):
        assert page in names


def test_fence_parser_finds_only_python_blocks():
    text = (
        "a\n```python\nx = 1\n```\n```bash\nrm -rf /\n```\n"
        "```text\nno\n```\n```python\ny = 2\n```\n"
    )
    assert FENCE.findall(text) == ["x = 1\n", "y = 2\n"]


@pytest.mark.parametrize(
    "path",
    [*DOCS, os.path.join(ROOT, "README.md")],
    ids=lambda p: os.path.relpath(p, ROOT),
)
def test_python_blocks_run(path, tmp_path, monkeypatch):
    blocks = python_blocks(path)
    if os.path.basename(path) == "README.md":
        assert blocks, "the README's usage example is a ```python block"
    monkeypatch.chdir(tmp_path)
    name = os.path.relpath(path, ROOT)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    # Tracebacks then quote the Markdown file's own lines, numbered as in the file.
    linecache.cache[name] = (len(text), None, text.splitlines(True), name)
    namespace = {"__name__": "__docs__"}
    for line, source in blocks:
        exec(compile("\n" * (line - 1) + source, name, "exec"), namespace)
