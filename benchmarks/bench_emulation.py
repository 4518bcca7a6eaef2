"""Bring-up time, memory and per-step cost of the emulated network.

For an Iridium-like 6x11 shell (66), a 20x20 Walker delta (400) and
Starlink shell 1 (72x22 = 1,584 at 550 km, 53 deg, phasing 39), each with
three mid-latitude ground stations, this brings the whole network up in
the kernel (namespaces, veths, shaping, delay line, routes to every node),
runs timesteps back to back (not waiting for the clock) and tears it down.
Each size runs in a fresh process so memory figures do not mix.

Printed per size: bring-up time (and its phases), memory (MemAvailable
drop: kernel plus processes; RSS of the emulator and of the delay line),
median and p95 of the whole step and of its phases, link and route changes
per step, and tear-down time. Targets on the 2-core machine: 1,584 up in
<= 90 s and <= 4 GiB; a step <= 1 s median at 1,584, <= 100 ms at 66.

Needs root. Each size runs in private network and mount namespaces (with
its own /run/netns and run directory), so a scenario that is up on the
machine is neither disturbed nor counted; the kernel and its memory are
shared, so other work still shows in the figures (the load average is
printed).

    .venv/bin/python benchmarks/bench_emulation.py [--sizes 66 400 1584]
        [--steps 60] [--step-s 1]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from typing import Any

import numpy as np
from constellations import MID_LATITUDE_STATIONS, SHELLS_BY_SIZE

SHELLS = SHELLS_BY_SIZE
STATIONS = MID_LATITUDE_STATIONS


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def enter_sandbox() -> None:
    """Move this process into private network and mount namespaces."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    clone_newns, clone_newnet = 0x00020000, 0x40000000
    ms_rec, ms_private = 16384, 1 << 18
    steps = (
        (libc.unshare, (clone_newns | clone_newnet,)),
        (libc.mount, (b"none", b"/", None, ms_rec | ms_private, None)),
        (libc.mount, (b"tmpfs", b"/run/netns", b"tmpfs", 0, None)),
    )
    os.makedirs("/run/netns", exist_ok=True)
    for call, args in steps:
        if call(*args) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"sandbox: {os.strerror(code)}")


def one_size(n_sats: int, steps: int, step_s: float) -> dict:
    """Bring one size up, step it, tear it down; return the figures."""
    from topology.config import from_dict
    from topology.emulator import Emulator
    from topology.scenario import GroundStationConfig, ShellConfig, load_scenario

    base = load_scenario()
    scenario = replace(
        base,
        name=f"bench-{n_sats}",
        shells=[from_dict(ShellConfig, SHELLS[n_sats], "shell")],
        ground_stations=[from_dict(GroundStationConfig, g, "gs") for g in STATIONS],
    )
    phases: dict[str, float] = {}
    last: dict[str, Any] = {"phase": None, "t": time.perf_counter()}

    def progress(phase: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if last["phase"] is not None and phase != last["phase"]:
            last["t"] = now
        phases[phase] = phases.get(phase, 0.0) + now - last["t"]
        last["phase"], last["t"] = phase, now

    available_before = mem_available_bytes()
    rss_before = rss_bytes(os.getpid())
    emulator = Emulator(scenario)
    started = time.perf_counter()
    result: dict = {"n_sats": n_sats, "n_nodes": len(emulator.names)}
    try:
        emulator.up(progress=progress)
        result["up_s"] = time.perf_counter() - started
        result["up_phases_s"] = phases
        helpers = emulator.substrate.helper_pids()
        result["mem_available_drop_bytes"] = available_before - mem_available_bytes()
        result["rss_bytes"] = rss_bytes(os.getpid()) - rss_before
        result["helper_rss_bytes"] = sum(rss_bytes(p) for p in helpers)
        result["links"] = int(emulator.link_active.sum())
        result["routes"] = len(emulator.names) * (len(emulator.names) - 1)

        reports = [emulator.step((k + 1) * step_s) for k in range(steps)]
        for key in (
            "total_s",
            "geometry_s",
            "links_s",
            "routing_s",
            "routes_s",
            "teardown_s",
            "state_s",
        ):
            values = np.array([getattr(r, key) for r in reports])
            result[key] = [float(np.median(values)), float(np.percentile(values, 95))]
        for key in ("link_changes", "route_changes"):
            values = np.array([getattr(r, key) for r in reports])
            result[key] = [float(np.median(values)), int(values.max())]
        result["mem_available_drop_after_steps_bytes"] = (
            available_before - mem_available_bytes()
        )
    finally:
        started = time.perf_counter()
        emulator.down()
        result["down_s"] = time.perf_counter() - started
    return result


def report(r: dict, steps: int, step_s: float) -> None:
    mib = 1 << 20
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in r["up_phases_s"].items())
    print(
        f"{r['n_sats']} satellites ({r['n_nodes']} nodes, {r['links']} links, "
        f"{r['routes']} routes)"
    )
    print(
        f"  bring-up      {r['up_s']:.1f} s ({phases}); tear-down {r['down_s']:.1f} s"
    )
    print(
        f"  memory        MemAvailable -{r['mem_available_drop_bytes'] / mib:.0f} MiB "
        f"after up, -{r['mem_available_drop_after_steps_bytes'] / mib:.0f} MiB after "
        f"steps; emulator RSS +{r['rss_bytes'] / mib:.0f} MiB, delay line RSS "
        f"{r['helper_rss_bytes'] / mib:.0f} MiB"
    )
    for key in ("total_s", "geometry_s", "links_s", "routing_s", "routes_s", "state_s"):
        median, p95 = r[key]
        print(f"  {key:<13} median {median * 1e3:8.1f} ms  p95 {p95 * 1e3:8.1f} ms")
    print(
        f"  per step      link changes median {r['link_changes'][0]:.0f} "
        f"(max {r['link_changes'][1]}), route changes median "
        f"{r['route_changes'][0]:.0f} (max {r['route_changes'][1]}) over "
        f"{steps} steps of {step_s:g} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[66, 400, 1584])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--step-s", type=float, default=1.0)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        enter_sandbox()
        print(json.dumps(one_size(args.one, args.steps, args.step_s)))
        return

    for size in args.sizes:
        if size not in SHELLS:
            parser.error(f"--sizes: {size} is not one of {sorted(SHELLS)}")
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="smoe-bench-") as run_dir:
        env = dict(os.environ, SPACEMOE_RUN_DIR=run_dir)
        for size in args.sizes:
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    str(size),
                    "--steps",
                    str(args.steps),
                    "--step-s",
                    str(args.step_s),
                ],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                print(f"{size} satellites: failed\n{proc.stderr[-3000:]}")
                continue
            report(json.loads(proc.stdout.splitlines()[-1]), args.steps, args.step_s)
            # Namespaces are freed by the kernel in the background.
            time.sleep(5)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
