"""A whole testbed running in this process, for the tests that need one."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from topology.scenario import Scenario


@contextmanager
def running_testbed(
    scenario: Scenario, run_directory: Path, monitoring: bool = True
) -> Iterator[Any]:
    """Bring `scenario` up with its clock running; take it down after.

    Call inside `net_sandbox`. Everything goes down also when bring-up or
    the test fails.
    """
    from controller.testbed import Testbed

    monkey = pytest.MonkeyPatch()
    monkey.setenv("SPACEMOE_RUN_DIR", str(run_directory))
    testbed = Testbed(scenario, monitoring=monitoring)
    runner = None
    try:
        testbed.up()
        runner = threading.Thread(target=testbed.run, daemon=True)
        runner.start()
        yield testbed
    finally:
        testbed._stop.set()
        if runner is not None:
            runner.join(timeout=30)
        testbed.down()
        monkey.undo()
