"""One scenario split over two hosts, joined by VXLAN over an underlay.

The geometry-only tests check ownership, link ids and configuration. The
root test builds two pseudo-hosts on this machine: two network namespaces
joined by an underlay veth pair, each running one partition of the
built-in scenario in a child process (``partition_host.py``) with its own
mount namespace and run directory. The parent steps both on the same
scenario times, then measures across the partition boundary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.topology.underlay import underlay
from topology.errors import ConfigError
from topology.scenario import load_scenario

HOSTS = ["10.77.0.1", "10.77.0.2"]
PSEUDO = ["smoetest-ha", "smoetest-hb"]
A, B = "longyearbyen", "inuvik"
RUNNER = Path(__file__).with_name("partition_host.py")
REPO = Path(__file__).resolve().parents[2]


def partitioned(hosts: list[str] = HOSTS, index: int = 0):
    base = load_scenario()
    return replace(
        base,
        emulation=replace(base.emulation, partitions=hosts, partition_index=index),
    )


# --- without root -------------------------------------------------------


def test_ownership_blocks_planes_and_spreads_stations() -> None:
    from topology.links import Geometry
    from topology.partitions import assign_nodes

    scenario = partitioned()
    constellation = Geometry(scenario).constellation
    owner = assign_nodes(constellation, scenario)
    n_sats = constellation.n_sats
    plane = constellation.plane[:n_sats]
    # Six planes: 0-2 on host 0, 3-5 on host 1; whole planes only.
    assert set(owner[:n_sats][plane < 3]) == {0}
    assert set(owner[:n_sats][plane >= 3]) == {1}
    assert owner[n_sats:].tolist() == [i % 2 for i in range(constellation.n_ground)]
    single = assign_nodes(constellation, load_scenario())
    assert not single.any()


def test_link_ids_come_from_identity_not_history() -> None:
    from topology.links import Geometry
    from topology.partitions import fixed_link_ids

    geometry = Geometry(partitioned())
    n_isl, n_sats = len(geometry.candidates), geometry.constellation.n_sats
    ids = {}
    for t_s in (0.0, 600.0, 1200.0):
        links = geometry.step(t_s).links
        rows = np.arange(len(links.a))
        for a, b, k in zip(
            links.a,
            links.b,
            fixed_link_ids(links.a, links.b, links.kind, rows, n_isl, n_sats),
            strict=True,
        ):
            assert ids.setdefault((int(a), int(b)), int(k)) == k
    values = list(ids.values())
    assert len(set(values)) == len(values)


def test_partition_settings_are_checked() -> None:
    from topology.config import from_dict
    from topology.scenario import Scenario

    data = load_scenario().to_dict()
    for bad, match in (
        ({"partitions": ["10.0.0.1", "nonsense"]}, "not an IPv4 address"),
        ({"partitions": ["10.0.0.1", "10.0.0.1"]}, "appears twice"),
        ({"partitions": HOSTS, "partition_index": 2}, "out of range"),
        ({"partitions": [], "partition_index": 1}, "out of range"),
    ):
        broken = json.loads(json.dumps(data))
        broken["emulation"].update(bad)
        with pytest.raises(ConfigError, match=match):
            from_dict(Scenario, broken)
    broken = json.loads(json.dumps(data))
    broken["emulation"]["partitions"] = HOSTS
    broken["ground_stations"][0]["partition"] = 5
    with pytest.raises(ConfigError, match="ground_stations"):
        from_dict(Scenario, broken)


def test_cli_partition_out_of_range_is_refused() -> None:
    from topology.links import Geometry
    from topology.partitions import Partitioning

    scenario = partitioned()
    with pytest.raises(ConfigError, match="partition index 3"):
        Partitioning(scenario, Geometry(scenario).constellation, 3)


# --- two pseudo-hosts ---------------------------------------------------


class PseudoHost:
    """A partition_host.py child and its line protocol."""

    def __init__(self, index: int, run_dir: Path) -> None:
        config = {
            "netns": f"/run/netns/{PSEUDO[index]}",
            "run_dir": str(run_dir),
            "index": index,
            "hosts": HOSTS,
            "name": "test-partitions",
            # The two stations far apart, on different hosts.
            "stations": {A: 0, B: 1},
        }
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [sys.executable, str(RUNNER), json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.ready: dict[str, Any] | None = None

    def receive(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"pseudo-host exited with {self.proc.wait()}"
        return json.loads(line)

    def send(self, **request: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()

    def ask(self, **request: Any) -> dict[str, Any]:
        self.send(**request)
        return self.receive()

    def down(self) -> dict[str, Any] | None:
        """Tear down; the leftovers the child saw afterwards."""
        if self.proc.poll() is not None:
            return None
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"op": "down"}) + "\n")
            self.proc.stdin.close()
            leftovers = self.receive()
        finally:
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return leftovers


@pytest.fixture(scope="module")
def two_hosts(net_sandbox: None, tmp_path_factory: pytest.TempPathFactory):
    """Two pseudo-hosts joined by an underlay, one partition in each."""
    with underlay(PSEUDO, HOSTS):
        hosts: list[PseudoHost] = []
        try:
            for index in range(2):
                hosts.append(PseudoHost(index, tmp_path_factory.mktemp(f"run{index}")))
            for host in hosts:
                host.ready = host.receive()
            yield hosts
        finally:
            for host in hosts:
                try:
                    host.down()
                except Exception:
                    host.proc.kill()


def step_both(hosts: list[PseudoHost], t_s: float) -> None:
    for host in hosts:
        host.ask(op="step", t_s=t_s)


def crossing_path(hosts: list[PseudoHost], t_s: float) -> tuple[float, dict]:
    """Step both hosts until A and B are joined through at least one ISL."""
    while True:
        found = hosts[0].ask(op="path", src=A, dst=B)
        if len(found["path"]) >= 4:
            return t_s, found
        t_s += 10.0
        assert t_s < 3600, "no multi-hop path between the stations in an hour"
        step_both(hosts, t_s)


def node_address(state: dict, name: str) -> str:
    return next(n["address"] for n in state["nodes"] if n["name"] == name)


@pytest.mark.root
def test_ping_crosses_the_partition_with_the_path_delay(two_hosts) -> None:
    t_s, found = crossing_path(two_hosts, 0.0)
    state = two_hosts[0].ask(op="state")
    owner = {n["name"]: n["partition"] for n in state["nodes"]}
    assert owner[A] == 0 and owner[B] == 1
    assert {owner[n] for n in found["path"]} == {0, 1}
    source, target = node_address(state, A), node_address(state, B)
    argv = ["ping", "-n", "-U", "-i", "0.05", "-W", "2", "-I", source]
    two_hosts[0].ask(op="run", node=A, argv=[*argv, "-c", "2", target])
    out = two_hosts[0].ask(op="run", node=A, argv=[*argv, "-c", "10", target])["out"]
    times = [float(w.split("=")[1]) for w in out.split() if w.startswith("time=")]
    assert len(times) == 10, out
    measured, expected = float(np.median(times)), 1e3 * found["delay_s"]
    assert abs(measured - expected) <= max(1.0, 0.02 * expected), (
        found["path"],
        measured,
        expected,
    )


@pytest.mark.root
def test_tcp_through_a_cross_host_link_reaches_its_rate(two_hosts) -> None:
    state = two_hosts[0].ask(op="state")
    owner = {n["name"]: n["partition"] for n in state["nodes"]}
    link = next(
        k
        for k in state["links"]
        if k["kind"] == "isl" and k["up"] and owner[k["a"]] != owner[k["b"]]
    )
    sender, receiver = (
        (link["a"], link["b"]) if owner[link["a"]] == 0 else (link["b"], link["a"])
    )
    target = node_address(state, receiver)
    server = two_hosts[1].ask(
        op="spawn", node=receiver, argv=["iperf3", "-s", "-1", "-B", target]
    )
    assert "pid" in server
    time.sleep(0.5)
    result = two_hosts[0].ask(
        op="run",
        node=sender,
        argv=["iperf3", "-c", target, "-t", "4", "-O", "1", "-J"],
        timeout_s=30,
    )
    assert result["rc"] == 0, result
    received_bps = json.loads(result["out"])["end"]["sum_received"]["bits_per_second"]
    assert received_bps >= 0.9 * link["rate_bps"], (link, received_bps)
    # The link really is a VXLAN device at this host's end.
    details = two_hosts[0].ask(
        op="run", node=sender, argv=["ip", "-d", "-j", "link", "show", link["ifname"]]
    )
    info = json.loads(details["out"])[0]["linkinfo"]
    assert info["info_kind"] == "vxlan"
    assert info["info_data"]["id"] == 4096 + link["id"]


@pytest.mark.root
def test_hosts_step_together_on_a_shared_start_time(two_hosts) -> None:
    # Scenario time 0 was 600 s ago: both hosts (now near t = 300 s) join
    # the shared clock at about t = 600 s and take each step at its moment.
    start_at_unix_s = time.time() - 600.0
    for host in two_hosts:
        host.send(op="clock", start_at_unix_s=start_at_unix_s, for_s=3.2)
    steps = [dict(host.receive()["steps"]) for host in two_hosts]
    common = sorted(set(steps[0]) & set(steps[1]))
    assert len(common) >= 2, steps
    assert 599.0 <= common[0] <= 602.0, common
    speed = load_scenario().time.speed
    for t_s in common:
        due = start_at_unix_s + t_s / speed
        began = [s[t_s] for s in steps]
        # Each host began step t_s at its due time, so within a few
        # scheduling delays of the other.
        assert all(abs(b - due) < 0.1 for b in began), (t_s, began, due)


@pytest.mark.root
def test_teardown_leaves_nothing_on_either_host(two_hosts) -> None:
    helpers = [pid for host in two_hosts for pid in host.ready["helpers"]]
    assert helpers
    leftovers = [host.down() for host in two_hosts]
    for seen in leftovers:
        assert seen is not None
        assert seen["namespaces"] == []
        names = {link["ifname"] for link in seen["links"]}
        assert names == {"lo", "ul0"}, names
        assert not any(
            link.get("linkinfo", {}).get("info_kind") == "vxlan"
            for link in seen["links"]
        )
        assert not any(":4789" in line for line in seen["udp"]), seen["udp"]
    for host in two_hosts:
        assert host.proc.returncode == 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(
        Path(f"/proc/{pid}").exists() for pid in helpers
    ):
        time.sleep(0.1)
    assert not [pid for pid in helpers if Path(f"/proc/{pid}").exists()]
