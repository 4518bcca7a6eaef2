"""Remove what a crashed run left behind, found by our own naming only.

What counts as ours, and how each is found:

- processes recorded in pid files under ``run_dir()`` (``*.pid`` and
  brokers' ``pid``): the emulator, the delay line, brokers, agents,
  Prometheus. A recorded pid is only signalled if that process started
  before its pid file was written and its command line names one of the
  programs we run, so a recycled pid is never touched;
- processes whose network namespace is one of ours (what ``ip netns pids``
  shows);
- network namespaces ``smoe-*`` under /run/netns (their links, qdiscs,
  routes and delay-line rules go with them);
- root-namespace links ``smoe*`` (the management bridge and its ports);
- with ``nodes: docker``: containers labelled ``org.spacemoe.node`` in our
  own dockerd, then that dockerd, found by its own pid file.

Nothing is killed by process name machine-wide, and nothing outside these
names is touched. ``emulator.down()`` is the orderly path; this is for
after ``kill -9``.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import time
from pathlib import Path

from topology import rtnl
from topology.errors import EmulationError
from topology.netns import NETNS_DIR, list_named, remove_named
from topology.rundir import PREFIX, run_dir
from topology.substrate import _exists, _kill_processes_in

log = logging.getLogger(__name__)

# Programs the testbed starts; a pid file's process must run one of them.
OUR_PROGRAMS = ("python", "spacemoe", "mosquitto", "prometheus")
RUN_FILES = ("state.json", "clock.json", "docker.json")


def clean(grace_s: float = 3.0) -> list[str]:
    """Remove our leftovers; return a line per thing removed."""
    if os.geteuid() != 0:
        raise EmulationError("spacemoe clean needs root (namespaces, links); use sudo")
    removed: list[str] = []

    removed += _stop_recorded_processes(run_dir(), grace_s)
    removed += _stop_docker_nodes()

    namespaces = list_named(f"{PREFIX}-")
    inodes = {}
    for name in namespaces:
        try:
            inodes[os.stat(NETNS_DIR / name).st_ino] = name
        except OSError:
            pass
    for pid in _kill_processes_in(inodes, grace_s):
        removed.append(f"process {pid} inside one of our namespaces")

    for name in namespaces:
        remove_named(name)
        removed.append(f"network namespace {name}")

    removed += _remove_root_links()

    for name in RUN_FILES:
        path = run_dir() / name
        if path.exists():
            path.unlink()
            removed.append(f"stale {path}")
    for line in removed:
        log.info("clean: removed %s", line)
    return removed


def _stop_docker_nodes() -> list[str]:
    """Our containers and our dockerd (``nodes: docker``), if any are left.

    Only the daemon in our own pid file, and in it only containers labelled
    ours, are touched; the host's Docker never is.
    """
    from containers.docker import docker_root, stop_leftover
    from topology.dockernodes import recorded

    record = recorded()
    root = Path(record["root"]) if record else docker_root()
    return stop_leftover(root)


def _pid_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    files = [p for p in directory.rglob("*.pid") if p.is_file()]
    files += [p for p in directory.rglob("pid") if p.is_file()]
    # The emulator first, so it cannot start anything new while we clean.
    return sorted(files, key=lambda p: (p.name != "emulator.pid", str(p)))


def _stop_recorded_processes(directory: Path, grace_s: float) -> list[str]:
    removed = []
    for path in _pid_files(directory):
        try:
            pids = [int(line) for line in path.read_text().split() if line.strip()]
            written = path.stat().st_mtime
        except (OSError, ValueError) as exc:
            log.warning("clean: ignoring unreadable pid file %s: %s", path, exc)
            continue
        stopped = []
        for pid in pids:
            if pid == os.getpid():
                log.warning("clean: %s names this very process; not stopping it", path)
                continue
            if is_ours(pid, written):
                os.kill(pid, signal.SIGTERM)
                stopped.append(pid)
        deadline = time.monotonic() + grace_s
        while stopped and time.monotonic() < deadline:
            stopped_alive = [pid for pid in stopped if _exists(pid)]
            if not stopped_alive:
                break
            time.sleep(0.05)
        for pid in stopped:
            if _exists(pid):
                log.warning("clean: pid %d ignored SIGTERM; killing it", pid)
                os.kill(pid, signal.SIGKILL)
            removed.append(f"process {pid} ({path.relative_to(directory)})")
        path.unlink(missing_ok=True)
    return removed


def is_ours(pid: int, pid_file_written: float) -> bool:
    """Whether `pid` is still the process a pid file written then recorded."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot_s = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, StopIteration):
        return False
    start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
    started = boot_s + start_ticks / os.sysconf("SC_CLK_TCK")
    if started > pid_file_written + 2.0:
        return False
    program = cmdline.decode(errors="replace")
    return any(name in program for name in OUR_PROGRAMS)


def _remove_root_links() -> list[str]:
    """Delete root-namespace links whose names start with our prefix."""
    # Asked over netlink, so the answer is this namespace's links even where
    # /sys belongs to another one.
    names = sorted(n for _, n in socket.if_nameindex() if n.startswith(PREFIX))
    if not names:
        return []
    # Ports before the bridge, though deleting the bridge frees them too.
    names.sort(key=lambda n: n == f"{PREFIX}-mgmt")
    channel = rtnl.NetlinkChannel()
    try:
        failures = channel.transact([rtnl.link_del(name=n) for n in names])
    finally:
        channel.close()
    gone = {f.index for f in failures if f.errno in (errno.ENODEV, errno.ENOENT)}
    bad = [f for f in failures if f.index not in gone]
    if bad:
        raise EmulationError(
            f"clean: could not delete link {names[bad[0].index]}: {bad[0].describe()}"
        )
    return [f"link {n}" for i, n in enumerate(names) if i not in gone]
