"""The file through which agents and the power model meet."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from containers.powershare import PowerShare
from topology.errors import EmulationError


def test_a_child_process_charges_busy_time_and_reads_the_throttle(
    tmp_path: Path,
) -> None:
    share = PowerShare(tmp_path / "power.share", 4, create=True)
    assert np.all(share.array[:, 1] == 1.0)  # full speed until told otherwise
    share.set_throttle(np.array([1.0, 0.5]))

    pid = os.fork()
    if pid == 0:  # an agent: its own mapping of the same file
        child = PowerShare(tmp_path / "power.share", 4)
        ok = child.throttle(1) == 0.5 and child.throttle(3) == 1.0
        child.add_busy(1, 0.25)
        child.add_busy(1, 0.5)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert share.busy_totals_s().tolist() == [0.0, 0.75, 0.0, 0.0]


def test_a_share_of_another_size_is_refused(tmp_path: Path) -> None:
    PowerShare(tmp_path / "power.share", 4, create=True)
    with pytest.raises(EmulationError, match="another run"):
        PowerShare(tmp_path / "power.share", 5)
    with pytest.raises(EmulationError, match="spacemoe up"):
        PowerShare(tmp_path / "missing.share", 4)
