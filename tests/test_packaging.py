"""Packaging: one version, the type check, the wheel in a fresh venv."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys

import pytest

import aggc_optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_one_version_source():
    project = _pyproject()
    assert "version" not in project["project"]
    assert project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "aggc_optax.__version__"}
    assert importlib.metadata.version("aggc_optax") == aggc_optax.__version__


def test_license_typed_and_changelog_ship():
    with open(os.path.join(ROOT, "LICENSE"), encoding="utf-8") as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert _pyproject()["project"]["license"] == "Apache-2.0"
    assert os.path.exists(os.path.join(ROOT, "aggc_optax", "py.typed"))
    with open(os.path.join(ROOT, "CHANGELOG.md"), encoding="utf-8") as f:
        changelog = f.read()
    assert "## Unreleased" in changelog and f"## {aggc_optax.__version__}" in changelog


def test_mypy_clean():
    pytest.importorskip("mypy")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "pyproject.toml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


SMOKE = """
import importlib.metadata, importlib.resources, sys
import jax, jax.numpy as jnp, optax, aggc_optax
assert "site-packages" in aggc_optax.__file__, aggc_optax.__file__
assert importlib.resources.files("aggc_optax").joinpath("py.typed").is_file()
assert importlib.metadata.version("aggc_optax") == aggc_optax.__version__ == sys.argv[1]
params = {"q_proj": {"weight": jnp.ones(4)}, "v_proj": {"weight": jnp.ones(4)}}
tx = optax.chain(aggc_optax.aggc(high_mult=2.0), optax.sgd(0.1))
step = jax.jit(tx.update)
state = tx.init(params)
_, state = step(params, state)
updates, state = step({"q_proj": {"weight": jnp.full(4, 3.0)}, "v_proj": params["v_proj"]}, state)
m = aggc_optax.metrics(state)
assert abs(m["aggc/q_proj/scale"] - 4 / 6) < 1e-6, m
assert abs(float(updates["q_proj"]["weight"][0]) + 0.2) < 1e-6
try:
    import torch
except ImportError:
    pass
else:
    raise AssertionError("the wheel's dependencies pulled in torch")
print("smoke ok")
"""


@pytest.mark.slow
def test_wheel_installs_in_a_fresh_venv(tmp_path):
    pytest.importorskip("build")
    dist, venv = tmp_path / "dist", tmp_path / "venv"
    # a copy of the sources, so the build's egg-info never lands in the checkout
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(".git", "runs", "*.egg-info", "build", "__pycache__"),
    )
    # --no-isolation: setuptools from this environment, no download
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "-o", str(dist), str(src)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = dist.glob("aggc_optax-*.whl")
    assert wheel.name.startswith(f"aggc_optax-{aggc_optax.__version__}-")
    # the fresh venv must not see this checkout (PYTHONPATH) or its packages
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # no pip in the venv (ensurepip takes seconds): this pip installs into it
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    python = str(venv / "bin" / "python")
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "--python", python, "install", "-q"),
            # no .pyc compilation of jax's thousands of files: half the install time
            *("--no-compile", "--disable-pip-version-check", str(wheel)),
        ],
        check=True,
        timeout=300,
        env=env,
    )
    result = subprocess.run(
        [python, "-c", SMOKE, aggc_optax.__version__],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0 and "smoke ok" in result.stdout, result.stderr
