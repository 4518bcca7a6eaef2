"""Where a running scenario keeps its files.

Everything a running scenario writes outside the kernel lives under one
directory, by default ``/run/spacemoe`` (``SPACEMOE_RUN_DIR`` overrides it,
which tests use to stay apart from a user's run)::

    emulator.pid      pid of the `spacemoe up` process
    state.json        written every timestep: clock, nodes, links, routes
    scenario.json     the effective scenario, so the run can be repeated
    clock.json        epoch, wall-clock start and speed of scenario time
    brokers/NODE/     mosquitto.conf, pid and log of each satellite broker
    agents/           agent pids and logs
    prometheus/       prometheus.yml, file_sd targets, data
    results/          reports of inference runs
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_RUN_DIR = Path("/run/spacemoe")

# Every kernel object we create carries this prefix, so that `spacemoe
# clean` can find ours and only ours.
PREFIX = "smoe"


def run_dir() -> Path:
    """The run directory (not created here)."""
    return Path(os.environ.get("SPACEMOE_RUN_DIR", str(DEFAULT_RUN_DIR)))


def namespace_name(node: str) -> str:
    """The network namespace that holds `node`."""
    return f"{PREFIX}-{node}"
