"""The emulator end to end: bring-up, RTT against geometry, rerouting, tear-down.

Uses the built-in 66-satellite scenario (three Arctic ground stations) under
its own run directory. The crash test runs in a private network and mount
namespace (``unshare``) so that ``clean()`` there sees only what that test
made, whatever else runs on the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from topology.errors import EmulationError, NodeNotFound
from topology.scenario import load_scenario

A, B = "longyearbyen", "inuvik"


def scenario():
    return replace(load_scenario(), name="test-emulator")


@pytest.fixture(scope="module")
def emulator(net_sandbox: None, tmp_path_factory: pytest.TempPathFactory):
    from topology.emulator import Emulator

    run_dir = tmp_path_factory.mktemp("run")
    saved = os.environ.get("SPACEMOE_RUN_DIR")
    os.environ["SPACEMOE_RUN_DIR"] = str(run_dir)
    emulator = Emulator(scenario())
    try:
        emulator.up()
        yield emulator
    finally:
        try:
            emulator.down()
        finally:
            if saved is None:
                os.environ.pop("SPACEMOE_RUN_DIR", None)
            else:
                os.environ["SPACEMOE_RUN_DIR"] = saved


def rtt_ms(emulator, src: str, dst: str, count: int = 10) -> float:
    """Median ping RTT between the node addresses of `src` and `dst`.

    ``-U`` times the reply on receipt in user space: the kernel's receive
    timestamp is taken before the delay line holds the packet.
    """
    source = str(emulator.plan.node_address(emulator.node_index(src)))
    target = str(emulator.plan.node_address(emulator.node_index(dst)))
    argv = ["ping", "-n", "-U", "-i", "0.05", "-W", "2", "-I", source]
    emulator.substrate.run(src, [*argv, "-c", "2", target], check=False)
    out = emulator.substrate.run(
        src, [*argv, "-c", str(count), target], check=False
    ).stdout
    times = [float(w.split("=")[1]) for w in out.split() if w.startswith("time=")]
    assert len(times) == count, out
    return float(np.median(times))


def expected_rtt_ms(emulator, src: str, dst: str) -> float:
    """Both directions' paths (they may differ under hysteresis), as shaped."""
    return 1e3 * (emulator.path_delay_s(src, dst) + emulator.path_delay_s(dst, src))


def multi_hop_time(emulator, t_s: float, limit_s: float = 3600.0) -> float:
    """Step on until A and B are joined by a path with at least one ISL."""
    while len(emulator.path(A, B)) < 4:
        t_s += 10.0
        assert t_s < limit_s, "no multi-hop path between the stations in an hour"
        emulator.step(t_s)
    return t_s


def test_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    from topology.emulator import Emulator

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(EmulationError, match="needs root"):
        Emulator(scenario())


def test_exec_in_unknown_node() -> None:
    from topology.emulator import exec_in

    with pytest.raises(NodeNotFound, match="no-such-node"):
        exec_in("no-such-node", ["true"])


@pytest.mark.root
def test_up_builds_nodes_links_and_state(emulator) -> None:
    from topology.emulator import status

    names = emulator.names
    assert len(names) == 69
    assert all((Path("/run/netns") / f"smoe-{n}").exists() for n in names)
    state = status()
    assert state is not None and state["alive"]
    assert state["shaping"] == emulator.substrate.shaping_mode
    assert len(state["nodes"]) == 69
    # All 132 +Grid candidates plus one ground link per station in view.
    isls = [link for link in state["links"] if link["kind"] == "isl"]
    assert len(isls) == len(emulator.geometry.candidates)
    out = emulator.substrate.run(
        names[0], ["ip", "-j", "route", "show", "proto", "static"]
    )
    reachable = int((emulator.router.next_hop[0, 1:] >= 0).sum())
    assert len(json.loads(out.stdout)) == reachable
    assert int(Path(os.environ["SPACEMOE_RUN_DIR"], "emulator.pid").read_text()) == (
        os.getpid()
    )


@pytest.mark.root
def test_rtt_follows_the_path_before_and_after_it_changes(emulator) -> None:
    t_s = multi_hop_time(emulator, emulator.t_s)
    first = emulator.path(A, B)
    measured, expected = rtt_ms(emulator, A, B), expected_rtt_ms(emulator, A, B)
    assert abs(measured - expected) <= max(1.0, 0.02 * expected), (first, measured)

    while emulator.path(A, B) == first or len(emulator.path(A, B)) < 4:
        t_s += 10.0
        assert t_s < emulator.t_s + 3600, "the path never changed"
        emulator.step(t_s)
    second = emulator.path(A, B)
    measured, expected = rtt_ms(emulator, A, B), expected_rtt_ms(emulator, A, B)
    assert abs(measured - expected) <= max(1.0, 0.02 * expected), (second, measured)


@pytest.mark.root
def test_a_link_taken_down_reroutes_within_one_step(emulator) -> None:
    t_s = multi_hop_time(emulator, emulator.t_s)
    path = [emulator.node_index(n) for n in emulator.path(A, B)]
    isl = next(
        (u, v)
        for u, v in zip(path, path[1:], strict=False)
        if u < emulator.n_sats and v < emulator.n_sats
    )
    a, b = min(isl), max(isl)

    original = emulator.geometry.step

    def without_link(t: float):
        state = original(t)
        links = state.links
        up = links.up.copy()
        up[(links.a == a) & (links.b == b)] = False
        return replace(state, links=replace(links, up=up))

    source = str(emulator.plan.node_address(emulator.node_index(A)))
    target = str(emulator.plan.node_address(emulator.node_index(B)))
    pinger = emulator.substrate.popen(
        A,
        ["ping", "-n", "-c", "60", "-i", "0.05", "-W", "1", "-I", source, target],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.0)
        emulator.geometry.step = without_link  # type: ignore[method-assign]
        report = emulator.step(t_s + 1.0)
        out, _ = pinger.communicate(timeout=30)
    finally:
        emulator.geometry.step = original  # type: ignore[method-assign]
        if pinger.poll() is None:
            pinger.kill()
    assert report.links_down >= 1 and report.route_changes > 0
    new_path = [emulator.node_index(n) for n in emulator.path(A, B)]
    assert (a, b) not in set(zip(new_path, new_path[1:], strict=False))
    assert (b, a) not in set(zip(new_path, new_path[1:], strict=False))
    seqs = {int(w.split("=")[1]) for w in out.split() if w.startswith("icmp_seq=")}
    # Routes move before the link goes down, so little is lost (what sat in
    # its queue, or a transient while nodes update one after another on a
    # busy machine), and the last second's pings all arrive by the new path.
    assert len(seqs) >= 50, out
    assert set(range(41, 61)) <= seqs, out
    emulator.step(t_s + 2.0)


@pytest.mark.root
def test_run_follows_the_clock_and_stops(emulator) -> None:
    import threading

    from topology.emulator import status

    fast = replace(
        emulator.scenario,
        time=replace(emulator.scenario.time, speed=20.0, step_s=1.0, duration_s=None),
    )
    saved, emulator.scenario = emulator.scenario, fast
    stop = threading.Event()
    steps_before, t_before = emulator.counters.steps, emulator.t_s
    timer = threading.Timer(1.0, stop.set)
    timer.start()
    try:
        started = time.monotonic()
        emulator.run(stop)
        elapsed = time.monotonic() - started
    finally:
        timer.cancel()
        emulator.scenario = saved
    steps = emulator.counters.steps - steps_before
    # 1 s of wall time at 20x with 1 s steps: scenario time keeps to the
    # clock (about 20 s on), and a slow step skips ahead, never replays.
    assert 1.0 <= elapsed < 2.5
    assert 1 <= steps <= 22
    assert emulator.t_s - t_before == pytest.approx(20.0, abs=3.0)
    assert status()["t_s"] == emulator.t_s


@pytest.mark.root
def test_sockets_in_a_node_are_answered_across_hops(emulator) -> None:
    # No -I: the kernel picks the source from the route (RTA_PREFSRC), which
    # must be the node's /32 for replies to find their way back.
    multi_hop_time(emulator, emulator.t_s)
    target = str(emulator.plan.node_address(emulator.node_index(B)))
    out = emulator.substrate.run(
        A, ["ping", "-n", "-c", "3", "-i", "0.1", "-W", "2", target], check=False
    ).stdout
    assert " 0% packet loss" in out, out
