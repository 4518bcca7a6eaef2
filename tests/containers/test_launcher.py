"""The fork server: agents start ready, deaths are reported, nothing is left."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from containers.broker import Broker
from containers.launcher import Launcher, stop_recorded_agents
from moe.model import MoeLM
from moe.shards import shard_file_name
from tests.containers.support import free_port
from topology.errors import EmulationError


def alive(pid: int) -> bool:
    try:
        return bool(Path(f"/proc/{pid}/cmdline").read_bytes())
    except OSError:
        return False


def test_spawn_report_death_and_stop(tiny_shards: tuple[MoeLM, Path]) -> None:
    _, shard_dir = tiny_shards
    port = free_port()
    broker = Broker("hub", "127.0.0.1", port, namespace=None).start()
    launcher = Launcher()
    try:
        launcher.start()
        nodes = ["a0", "a1", "a2"]
        for i, node in enumerate(nodes):
            launcher.spawn(
                node,
                "127.0.0.1",
                port,
                shard_dir,
                shards=[(0, i, shard_file_name(0, i))],
            )
        launcher.wait_ready(nodes, timeout_s=30)
        status = launcher.status()
        pids = {node: status[node]["pid"] for node in nodes}
        assert all(status[n]["state"] == "ready" for n in nodes)
        assert len(set(pids.values())) == 3 and os.getpid() not in pids.values()

        os.kill(pids["a1"], signal.SIGKILL)
        deadline = time.monotonic() + 5
        while launcher.status()["a1"]["state"] != "died":
            assert time.monotonic() < deadline, "the death of a1 was not reported"
            time.sleep(0.02)
        assert launcher.status()["a1"]["exit_status"] == -signal.SIGKILL
        with pytest.raises(EmulationError, match="agent a1 died"):
            launcher.wait_ready(nodes, timeout_s=1)

        assert launcher.stop_agent("a0") == 0
        assert launcher.status()["a0"]["state"] == "stopped"

        memory = launcher.memory()
        assert memory["total"] >= memory["_launcher"] + memory["a2"] > 0
    finally:
        launcher.stop()
        broker.stop()
    for pid in pids.values():
        assert not alive(pid)


def test_an_agent_that_cannot_load_its_shard_fails_with_its_reason(
    tiny_shards: tuple[MoeLM, Path],
) -> None:
    _, shard_dir = tiny_shards
    launcher = Launcher()
    try:
        launcher.start()
        launcher.spawn("bad", "127.0.0.1", free_port(), shard_dir, shards=[(0, 0, "x")])
        with pytest.raises(EmulationError, match="agent bad failed .*not the manifest"):
            launcher.wait_ready(["bad"], timeout_s=10)
    finally:
        launcher.stop()


def test_recorded_agents_are_stopped_after_their_controller_is_gone(
    tiny_shards: tuple[MoeLM, Path],
) -> None:
    _, shard_dir = tiny_shards
    port = free_port()
    broker = Broker("hub", "127.0.0.1", port, namespace=None).start()
    launcher = Launcher()
    try:
        launcher.start()
        launcher.spawn("a0", "127.0.0.1", port, shard_dir)
        launcher.wait_ready(["a0"])
        pids = [launcher.status()["a0"]["pid"], launcher.status()["_launcher"]["pid"]]
        # As `spacemoe clean` would, from the pid files alone.
        assert sorted(stop_recorded_agents()) == sorted(pids)
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in pids):
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        launcher.stop()
        broker.stop()
