"""Run a pytest module in a child process with its own environment, report per test.

JAX reads ``XLA_FLAGS`` once, when its backend starts, so a check that needs 8
simulated devices cannot share a process with the rest of the suite. The parent
test module runs the child module once (a module-scoped fixture), reads its JUnit
XML, and asserts each child test by name, so a failure names the check that failed
and shows its message.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ChildRun:
    returncode: int
    output: str
    results: dict[str, tuple[str, str]]  # test id -> (outcome, message)


def child_test_names(module: Path) -> list[str]:
    """The ``test_*`` functions defined at the top level of ``module`` (read, not imported)."""
    tree = ast.parse(module.read_text())
    return [
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    ]


def run_child_suite(
    module: Path, junit: Path, extra_env: dict[str, str], timeout_s: float
) -> ChildRun:
    env = dict(os.environ)
    env.update(extra_env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",
        f"--junitxml={junit}",
        str(module),
    ]
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired as err:  # subprocess.run kills the child
        out = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else err.stdout
        return ChildRun(-1, f"timed out after {timeout_s}s\n{out or ''}", {})
    results: dict[str, tuple[str, str]] = {}
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome = tag
                    message = (node.get("message") or "") + "\n" + (node.text or "")
                    break
            results[case.get("name", "")] = (outcome, message)
    return ChildRun(proc.returncode, proc.stdout + proc.stderr, results)


def assert_child_test_passed(run: ChildRun, function: str) -> None:
    """Every case of ``function`` (all its parametrizations) ran in the child and passed."""
    cases = {
        name: res
        for name, res in run.results.items()
        if name == function or name.startswith(function + "[")
    }
    assert cases, (
        f"{function} did not run in the child process (exit status {run.returncode}):\n"
        f"{run.output[-4000:]}"
    )
    bad = {name: res for name, res in cases.items() if res[0] != "passed"}
    assert not bad, "\n\n".join(f"{name}: {outcome}\n{msg}" for name, (outcome, msg) in bad.items())
