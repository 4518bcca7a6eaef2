"""One partition of a scenario inside a pseudo-host, driven over stdin/stdout.

Started by ``test_partitions.py`` as ``python partition_host.py CONFIG``
(CONFIG is JSON: ``netns``, the pseudo-host's namespace file; ``run_dir``;
``index``; ``hosts``, the underlay addresses; ``name``; ``stations``, the
partition of named ground stations). The process moves
into its own mount namespace (own tmpfs /run/netns and sysfs, so the
``smoe-*`` names of the two partitions do not collide) and into the
pseudo-host's network namespace, which is then its "root" namespace: the
management bridge and the VXLAN sockets live there. It builds
``Emulator(scenario, partition=index)`` and answers one JSON request per
line until ``down`` or end of input, either of which tears everything down.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_REC = 16384
MS_PRIVATE = 1 << 18


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def enter_pseudo_host(netns_path: str) -> None:
    """Own mount namespace with empty /run/netns; the pseudo-host's network."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fd = os.open(netns_path, os.O_RDONLY)
    _check(libc.unshare(CLONE_NEWNS), "unshare mount namespace")
    _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "private /")
    _check(libc.mount(b"tmpfs", b"/run/netns", b"tmpfs", 0, None), "/run/netns")
    _check(libc.setns(fd, CLONE_NEWNET), "setns into the pseudo-host")
    os.close(fd)
    _check(libc.mount(b"sysfs", b"/sys", b"sysfs", 0, None), "/sys")


def answer(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main() -> int:
    config = json.loads(sys.argv[1])
    enter_pseudo_host(config["netns"])
    os.environ["SPACEMOE_RUN_DIR"] = config["run_dir"]

    from topology.emulator import Emulator
    from topology.netns import list_named
    from topology.scenario import load_scenario

    base = load_scenario()
    stations = config.get("stations", {})
    scenario = replace(
        base,
        name=config["name"],
        ground_stations=[
            replace(g, partition=stations.get(g.name, g.partition))
            for g in base.ground_stations
        ],
        emulation=replace(
            base.emulation, partitions=config["hosts"], partition_index=0
        ),
    )
    emulator = Emulator(scenario, partition=config["index"])
    children: dict[int, subprocess.Popen] = {}
    try:
        emulator.up()
        answer({"ready": True, "helpers": emulator.substrate.helper_pids()})
        for line in sys.stdin:
            request = json.loads(line)
            op = request["op"]
            if op == "down":
                break
            if op == "step":
                emulator.step(float(request["t_s"]))
                answer({"t_s": emulator.t_s})
            elif op == "path":
                src, dst = request["src"], request["dst"]
                answer(
                    {
                        "path": emulator.path(src, dst),
                        "back": emulator.path(dst, src),
                        "delay_s": emulator.path_delay_s(src, dst)
                        + emulator.path_delay_s(dst, src),
                    }
                )
            elif op == "state":
                answer(emulator.state())
            elif op == "run":
                done = emulator.substrate.run(
                    request["node"],
                    request["argv"],
                    timeout_s=float(request.get("timeout_s", 60)),
                    check=False,
                )
                answer({"rc": done.returncode, "out": done.stdout, "err": done.stderr})
            elif op == "clock":
                # Run on the shared clock for a while; report when each
                # step began.
                stop = threading.Event()
                timer = threading.Timer(float(request["for_s"]), stop.set)
                steps: list[tuple[float, float]] = []

                def began(report: Any, steps: list = steps) -> None:
                    steps.append((report.t_s, time.time() - report.total_s))

                timer.start()
                try:
                    emulator.run(
                        stop,
                        on_step=began,
                        start_at_unix_s=float(request["start_at_unix_s"]),
                    )
                finally:
                    timer.cancel()
                answer({"steps": steps})
            elif op == "spawn":
                child = emulator.substrate.popen(
                    request["node"],
                    request["argv"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                children[child.pid] = child
                answer({"pid": child.pid})
            else:
                answer({"error": f"unknown op {op!r}"})
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
            child.wait()
        emulator.down()
    links = subprocess.run(
        ["ip", "-d", "-j", "link", "show"], capture_output=True, text=True, check=True
    ).stdout
    sockets = subprocess.run(
        ["ss", "-H", "-u", "-a", "-n"], capture_output=True, text=True, check=True
    ).stdout
    answer(
        {
            "namespaces": list_named("smoe"),
            "links": json.loads(links),
            "udp": sockets.splitlines(),
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
