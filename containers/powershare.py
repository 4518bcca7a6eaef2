"""Busy time and throttle shared between agents and the power model.

The power model runs once for the whole constellation in the `spacemoe up`
process (vectorised; see containers/power.py), but the work it charges for
happens in the forked agents, and the throttling it decides must slow those
agents down. Both directions go through one small file-backed array in the
run directory, mapped by every party::

    row = node index in the scenario
    column 0: busy seconds of expert work, cumulative (written by the agent)
    column 1: throttle factor, 1 = full speed, 0 = off (written by up)

Each cell has one writer, and aligned 8-byte stores are atomic on the
platforms we run on, so no lock is needed. Messaging over MQTT would have
put this bookkeeping on the emulated links, where it does not belong.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from topology.errors import EmulationError

BUSY, THROTTLE = 0, 1
_COLUMNS = 2


class PowerShare:
    """A (nodes, 2) float64 array mapped from `path`."""

    def __init__(self, path: Path, n_nodes: int, create: bool = False) -> None:
        self.path = Path(path)
        size = n_nodes * _COLUMNS * 8
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "wb") as f:
                f.truncate(size)
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError as exc:
            raise EmulationError(
                f"cannot open the power share {self.path}: {exc.strerror}; is "
                "`spacemoe up` running?"
            ) from None
        try:
            if os.fstat(fd).st_size != size:
                raise EmulationError(
                    f"power share {self.path} holds {os.fstat(fd).st_size} bytes, "
                    f"expected {size} for {n_nodes} nodes; it belongs to another run"
                )
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.array = np.ndarray((n_nodes, _COLUMNS), np.float64, self._map)
        if create:
            self.array[:, THROTTLE] = 1.0

    def add_busy(self, row: int, busy_s: float) -> None:
        """Charge `busy_s` seconds of expert work to node `row`."""
        self.array[row, BUSY] += busy_s

    def throttle(self, row: int) -> float:
        """The speed node `row` may compute at (1 full, 0 off)."""
        return float(self.array[row, THROTTLE])

    def busy_totals_s(self) -> np.ndarray:
        """Cumulative busy seconds of every node (a copy)."""
        return self.array[:, BUSY].copy()

    def set_throttle(self, factors: np.ndarray) -> None:
        """Publish the throttle factor of the first len(factors) nodes."""
        self.array[: len(factors), THROTTLE] = factors
