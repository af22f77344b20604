"""The package's layout keeps its promises (docs/architecture.md).

- The core (``_aggc``, ``_numerics``, ``_config``, ``_state``, ``_validation``,
  ``_schedule``, ``labels/``) imports nothing from the reference layer, the
  tools or torch.
- torch is imported only under ``aggc_optax/torch/``; with torch's import
  blocked, everything else imports and runs, and the parity entry point says
  which extra to install.
- A reference quirk is set only under ``aggc_optax/reference/``, and
  ``Quirks()`` has every quirk off.
- No function of the core is longer than a screen.
- The old module paths and public names keep working.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import aggc_optax
from aggc_optax import _config

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "aggc_optax"
CORE = ["_aggc.py", "_numerics.py", "_config.py", "_state.py", "_validation.py", "_schedule.py"]
CORE_FILES = [PACKAGE / f for f in CORE] + sorted((PACKAGE / "labels").glob("*.py"))
SCREEN = 50  # lines of code in one function, docstring left out


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute, at any depth (function-level imports too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_core_imports_no_reference_tool_or_torch(path: Path) -> None:
    forbidden = (
        "aggc_optax.reference",
        "aggc_optax.torch",
        "aggc_optax.monitoring",
        "aggc_optax.presets",
        "aggc_optax.cli",
        "aggc_optax.parity",
        "aggc_optax.torch_reference",
        "torch",
    )
    bad = sorted(
        name
        for name in _imports(path)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    )
    assert not bad, f"{path.name} imports {bad}"


def test_the_import_scan_sees_imports() -> None:
    # the scan above must be able to fail: the reference layer does import the core
    found = _imports(PACKAGE / "reference" / "_options.py")
    assert "aggc_optax._aggc" in found and "aggc_optax._config" in found
    assert "torch" in _imports(PACKAGE / "torch" / "reference.py")


def test_torch_is_imported_only_in_its_folder() -> None:
    outside = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent == PACKAGE / "torch":
            continue
        if any(n == "torch" or n.startswith("torch.") for n in _imports(path)):
            outside.append(str(path.relative_to(ROOT)))
    assert not outside


def test_quirks_are_set_only_in_the_reference_layer() -> None:
    setters = []  # Quirks(...) with an argument, or dataclasses.replace(quirks, ...)
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call) or not (node.args or node.keywords):
                continue
            name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
            if name == "Quirks" or any(kw.arg == "quirks" for kw in node.keywords):
                setters.append(str(path.relative_to(PACKAGE)))
    assert setters and {s.split(os.sep)[0] for s in setters} == {"reference"}, setters
    assert all(not getattr(_config.Quirks(), f.name) for f in dataclasses.fields(_config.Quirks))


def test_aggc_has_every_quirk_off_and_the_reference_turns_them_on(monkeypatch) -> None:
    from aggc_optax import _aggc

    seen: list[_config.Quirks] = []
    real = _aggc.build

    def spy(config: _config.Config) -> object:
        seen.append(config.quirks)
        return real(config)

    monkeypatch.setattr(_aggc, "build", spy)  # aggc() and the reference layer both build here
    aggc_optax.aggc()
    aggc_optax.from_reference_options({"enable": True, "sync_dist": True})
    aggc_optax.presets.lora_sft(10)
    assert seen[0] == _config.Quirks()
    assert seen[1] == _config.Quirks(
        nonfinite_as_is=True, mean_over_devices=True, disable_without_groups=True, any_cap=True
    )
    assert seen[2] == dataclasses.replace(seen[1], nonfinite_as_is=False)  # nonfinite="skip"


def _function_lengths(path: Path) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            docstring = (
                isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            )
            first = body[1] if docstring and len(body) > 1 else body[0]
            out.append((node.name, node.end_lineno - first.lineno + 1))  # type: ignore[operator]
    return out


@pytest.mark.parametrize("name", ["_aggc.py", "_numerics.py", "_config.py", "_state.py"])
def test_no_core_function_is_longer_than_a_screen(name: str) -> None:
    lengths = _function_lengths(PACKAGE / name)
    assert lengths, name
    long = [(fn, n) for fn, n in lengths if n > SCREEN]
    assert not long, f"{name}: {long} (more than {SCREEN} lines of code)"


def test_the_update_reads_in_named_steps() -> None:
    source = (PACKAGE / "_aggc.py").read_text(encoding="utf-8")
    steps = ["# 1. place", "# 2. norms", "# 3. bounds", "# 4. scale", "# 5. EMA", "# 6. rescale"]
    positions = [source.find(step) for step in steps]
    assert -1 not in positions, dict(zip(steps, positions))
    # steps 3-5 live in _group_step; 1, 2, 6 in update_fn, in order
    assert positions[0] < positions[1] < positions[5]
    assert positions[2] < positions[3] < positions[4]


_BLOCK_TORCH = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, BlockTorch())
    """
)


def _run_without_torch(code: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-c", _BLOCK_TORCH + textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_everything_but_the_torch_folder_works_without_torch() -> None:
    proc = _run_without_torch(
        """
        import jax.numpy as jnp, optax
        import aggc_optax
        from aggc_optax import cli, csv_log, labels, monitoring, presets, reference

        params = {"model": {"layers": {"0": {"q_proj": {"weight": jnp.ones((2, 2))}}}}}
        for tx in (aggc_optax.aggc(), presets.lora_sft(10), presets.global_norm(1.0),
                   presets.adagc(), aggc_optax.from_reference_options({"enable": True})):
            updates, _ = tx.update(params, tx.init(params))
        assert "torch" not in sys.modules
        try:
            import aggc_optax.parity
        except ImportError as err:
            print("PARITY:", err)
        try:
            import aggc_optax.torch_reference
        except ImportError as err:
            print("REFERENCE:", err)
        print("OK")
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[-1] == "OK", proc.stdout
    for tag in ("PARITY:", "REFERENCE:"):
        [line] = [line for line in lines if line.startswith(tag)]
        assert "pip install 'aggc_optax[torch]'" in line, line


def test_parity_entry_point_without_torch_names_the_extra() -> None:
    proc = _run_without_torch(
        """
        import runpy
        runpy.run_module("aggc_optax.parity", run_name="__main__")
        """
    )
    assert proc.returncode != 0
    assert "aggc_optax[torch]" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_old_module_paths_are_the_moved_modules() -> None:
    import aggc_optax.csv_log
    import aggc_optax.parity
    import aggc_optax.plotting
    import aggc_optax.torch_reference
    from aggc_optax.monitoring import csv_log, plotting
    from aggc_optax.torch import parity, reference

    assert aggc_optax.parity is parity
    assert aggc_optax.torch_reference is reference
    assert aggc_optax.csv_log is csv_log
    assert aggc_optax.plotting is plotting
    assert aggc_optax.torch_reference.PerModuleGradClipper is reference.PerModuleGradClipper


def test_public_names_keep_working() -> None:
    import inspect

    import jax.numpy as jnp

    from aggc_optax import presets

    assert presets.LORA_SFT_OPTIONS["ema_beta"] == 0.95
    assert aggc_optax.REFERENCE_DEFAULTS["ema_beta"] == 0.98
    params = {"model": {"layers": {"0": {"q_proj": {"weight": jnp.ones((2, 2))}}}}}
    signature = inspect.signature(aggc_optax.from_reference_options)
    assert {"total_steps", "param_labels"} <= set(signature.parameters)
    for labeler in (lambda name: "g", lambda name, leaf: f"g{leaf.ndim}"):
        tx = aggc_optax.aggc(param_labels=labeler)
        state = tx.init(params)
        assert len(aggc_optax.group_stats(state)) == 1
    tx = presets.lora_sft(100, ema_beta=0.9)
    state = tx.init(params)
    _, state = tx.update(params, state)
    [found] = aggc_optax.find_aggc_states(state)
    assert found.ema.shape == found.scale.shape == (1,)
    assert aggc_optax.check_state(state) is state
    assert aggc_optax.describe_groups(params)["groups"]["q_proj"]["num_params"] == 4
    assert callable(aggc_optax.module_labels) and callable(aggc_optax.lora_callback_as_ran)
