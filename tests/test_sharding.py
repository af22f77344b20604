"""AGGC on 8 simulated CPU devices: SPMD sharding, shard_map/pmap, sharded restore.

The checks live in ``tests/_sharded_suite.py``; this module runs them in a child
process whose ``XLA_FLAGS`` ask for 8 host devices (JAX reads the flag once per
process, so setting it here would change the device count of every other test),
then asserts each child test by name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests._subprocess_suite import (
    ChildRun,
    assert_child_test_passed,
    child_test_names,
    run_child_suite,
)

SUITE = Path(__file__).with_name("_sharded_suite.py")
CHILD_TIMEOUT_S = 420.0


@pytest.fixture(scope="module")
def child_run(tmp_path_factory: Any) -> ChildRun:
    junit = tmp_path_factory.mktemp("sharded") / "junit.xml"
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    return run_child_suite(
        SUITE, junit, {"XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"}, CHILD_TIMEOUT_S
    )


def test_child_suite_exit_status(child_run: ChildRun) -> None:
    assert child_run.returncode == 0, child_run.output[-6000:]


@pytest.mark.parametrize("function", child_test_names(SUITE))
def test_sharded(child_run: ChildRun, function: str) -> None:
    assert_child_test_passed(child_run, function)
