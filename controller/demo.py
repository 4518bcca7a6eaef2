"""`spacemoe demo`: the main job on a scenario, start to finish.

1. brings the scenario up in the background (`spacemoe up --detach`);
2. measures the round-trip time between two ground stations across the
   constellation with ``ping -U`` and sets it beside the delay that the
   geometry predicts for the path the emulator routes;
3. generates text through the experts on the satellites and checks the
   tokens against the single-process model;
4. tears everything down, also when a step fails.

It exits non-zero when a measured check misses its bound, so it doubles
as an end-to-end smoke test.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from topology.commands import run
from topology.errors import EmulationError
from topology.rundir import namespace_name, run_dir

# The fidelity bound: within 1 ms or 2 %, whichever is larger.
RTT_TOLERANCE_S = 1e-3
RTT_TOLERANCE_FRACTION = 0.02


def run_demo(
    scenario_path: str | None,
    prompt: str,
    tokens: int,
    progress: Callable[[str], None] | None = None,
) -> int:
    from controller.testbed import (
        detach_and_wait,
        format_status,
        infer_on_running,
        read_status,
        require_root,
        stop_running,
    )

    require_root()
    argv = [sys.executable, "-m", "controller.cli", "up"]
    if scenario_path:
        argv.append(scenario_path)
    print("== bringing the scenario up")
    started = time.monotonic()
    detach_and_wait(argv)
    failures = 0
    try:
        print(f"   up in {time.monotonic() - started:.1f} s")
        print(format_status(read_status()))

        print("\n== round-trip time between ground stations")
        failures += _rtt_check()

        print(f"\n== inference through the constellation: {prompt!r}, {tokens} tokens")
        report, table = infer_on_running(prompt, tokens)
        print(table)
        reference = report.get("reference", {})
        identical = reference.get("tokens_identical", False)
        diff = reference.get("max_abs_logit_diff", float("nan"))
        print(
            f"   tokens identical to the single-process model: {identical}; "
            f"largest logit difference {diff:.2e} (bound 1e-5)"
        )
        if not identical or not diff <= 1e-5:
            failures += 1
        path = run_dir() / "results" / "demo-infer.json"
        path.write_text(json.dumps(report, indent=1) + "\n")
        print(f"   full report: {path}")
    finally:
        print("\n== tearing down")
        print("   " + stop_running())
    print("\n== demo " + ("passed" if failures == 0 else f"FAILED {failures} check(s)"))
    return 0 if failures == 0 else 1


def _rtt_check(wait_s: float = 120.0) -> int:
    """Ping between the first pair of stations joined over an ISL; 0 if OK."""
    from controller.testbed import read_status

    deadline = time.monotonic() + wait_s
    while True:
        state = read_status()
        pair = _station_pair(state)
        if pair is not None:
            break
        if time.monotonic() > deadline:
            print(f"   no two stations were joined across satellites in {wait_s} s")
            return 1
        time.sleep(1.0)

    src, dst, forward = pair
    addresses = {n["name"]: n["address"].split("/")[0] for n in state["nodes"]}
    rtts_s = ping_rtts_s(src, addresses[src], addresses[dst], count=20)
    after = read_status()
    predicted = [_predicted_rtt_s(s, src, dst) for s in (state, after)]
    measured = statistics.median(rtts_s)
    known = [p for p in predicted if p is not None]
    if not known:
        print("   the path broke while pinging; no prediction to compare with")
        return 1
    # The route may change while pinging: the path before or after counts.
    expected = min(known, key=lambda p: abs(measured - p))
    bound = max(RTT_TOLERANCE_S, RTT_TOLERANCE_FRACTION * expected)
    ok = abs(measured - expected) <= bound
    print(f"   path {' > '.join(forward)} ({len(forward) - 1} links)")
    print(
        f"   predicted RTT {expected * 1e3:.2f} ms (geometry: 2 x path delay)\n"
        f"   measured  RTT {measured * 1e3:.2f} ms (median of {len(rtts_s)} "
        f"ping -U, min {min(rtts_s) * 1e3:.2f}, max {max(rtts_s) * 1e3:.2f})\n"
        f"   difference {abs(measured - expected) * 1e3:.2f} ms, bound "
        f"{bound * 1e3:.2f} ms: {'OK' if ok else 'MISSED'}"
    )
    return 0 if ok else 1


def _station_pair(state: dict[str, Any]) -> tuple[str, str, list[str]] | None:
    """Two ground stations whose route crosses at least one ISL."""
    stations = [n["name"] for n in state["nodes"] if n["kind"] != "satellite"]
    paths = state.get("paths", {})
    for i, a in enumerate(stations):
        for b in stations[i + 1 :]:
            path = paths.get(a, {}).get(b) or []
            if len(path) >= 4:
                return a, b, path
    return None


def _predicted_rtt_s(state: dict[str, Any], a: str, b: str) -> float | None:
    """Sum of link delays along a->b plus b->a, as the emulator routes them."""
    delay = {}
    for link in state["links"]:
        if link["up"]:
            delay[(link["a"], link["b"])] = delay[(link["b"], link["a"])] = link[
                "delay_s"
            ]
    total = 0.0
    for src, dst in ((a, b), (b, a)):
        path = state.get("paths", {}).get(src, {}).get(dst) or []
        if len(path) < 2:
            return None
        for u, v in zip(path, path[1:], strict=False):
            if (u, v) not in delay:
                return None
            total += delay[(u, v)]
    return total


def ping_rtts_s(node: str, source: str, target: str, count: int = 20) -> list[float]:
    """RTTs of `count` pings from `node` (source address) to `target`, seconds.

    ``-U`` times the reply when ping reads it: the kernel's own receive
    timestamp is taken before the delay line releases the packet.
    """
    argv = ["ip", "netns", "exec", namespace_name(node), "ping", "-n", "-U"]
    argv += ["-i", "0.1", "-W", "3", "-I", source, "-c", str(count), target]
    out = run(argv, check=False, timeout_s=count * 0.1 + 30).stdout
    rtts = [float(w.split("=")[1]) / 1e3 for w in out.split() if w.startswith("time=")]
    if not rtts:
        raise EmulationError(
            f"no ping reply from {target} to {node} ({source}); output:\n{out}"
        )
    return rtts
