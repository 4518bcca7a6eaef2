"""A fork server that starts one agent process per node, cheaply.

Importing torch costs about a second and a few hundred MB, so agents are not
started as fresh interpreters. One parent process, the zygote, imports torch
and the agent code once, calls ``torch.set_num_threads(1)`` before any torch
op (a forked child must not inherit an OpenMP pool it cannot use), runs one
tiny expert forward so the kernels' lazily built state exists before the
fork, freezes the garbage collector's view of the heap (so children do not
dirty shared pages just by scanning them), and then forks a child per node
on request. Children share the parent's pages copy-on-write; each child

1. sets PR_SET_PDEATHSIG, so it dies with the zygote,
2. enters its node's network namespace (ctypes setns), if one is given,
3. connects to its node's broker, loads its initial shards (hash-checked),
4. tells the zygote it is ready (or why it failed) through a pipe, and
5. serves until SIGTERM, then says "offline" and exits.

The zygote is single-threaded (forking from a threaded process is unsafe)
and is driven over a Unix socket with one JSON object per line; the
:class:`Launcher` class is its client and starts and stops it. Files live
under ``run_dir()/agents/``: ``launcher.sock``, ``launcher.pid``,
``launcher.log``, and per node ``<node>.pid`` and ``<node>.log``.

Run by hand: ``python -m containers.launcher --shard-dir DIR``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from topology.errors import EmulationError, SpaceMoeError
from topology.rundir import run_dir

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 1 << 20


def agents_dir() -> Path:
    """Where agent pid files, logs and the launcher socket live."""
    return run_dir() / "agents"


def pss_bytes(pid: int) -> int | None:
    """Proportional set size of `pid` (shared pages split among sharers)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return None


# -- the zygote (server side) -------------------------------------------------


@dataclass
class _Child:
    node: str
    pid: int
    ready_fd: int
    started_monotonic: float
    # starting | ready | failed (never got ready) | died (exited unasked)
    # | stopped (exited when asked)
    state: str = "starting"
    stopping: bool = False
    detail: str = ""
    exit_status: int | None = None
    buffer: bytes = b""
    spec: dict[str, Any] = field(default_factory=dict)


class Zygote:
    """The fork server's state and loop (runs in its own process)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.children: dict[str, _Child] = {}
        self.selector = selectors.DefaultSelector()
        self.running = True

    def preload(self) -> None:
        """Import torch and the agent once, before any fork."""
        import torch

        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)

        from containers.agent import Agent  # noqa: F401  (imported to be shared)
        from moe.model import expert_forward

        with torch.inference_mode():
            w = {
                "w1": torch.zeros(4, 8),
                "w2": torch.zeros(8, 4),
                "w3": torch.zeros(4, 8),
            }
            expert_forward(w, torch.zeros(2, 8))
        gc.collect()
        gc.freeze()

    def serve(self, sock_path: Path) -> None:
        sock_path.unlink(missing_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(sock_path))
        server.listen(16)
        self.server = server
        self.selector.register(server, selectors.EVENT_READ, ("accept", None))
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "running", False))
        signal.signal(signal.SIGINT, lambda *_: setattr(self, "running", False))
        log.info("launcher %s serving on %s", os.getpid(), sock_path)
        try:
            while self.running:
                for key, _ in self.selector.select(timeout=0.2):
                    kind, data = key.data
                    if kind == "accept":
                        conn, _ = server.accept()
                        conn.setblocking(True)
                        self.selector.register(
                            conn, selectors.EVENT_READ, ("conn", b"")
                        )
                    elif kind == "conn":
                        self._on_conn(key.fileobj)  # type: ignore[arg-type]
                    elif kind == "ready":
                        self._on_ready(data)
                self._reap()
        finally:
            self.stop_all()
            server.close()
            sock_path.unlink(missing_ok=True)
            log.info("launcher %s exiting", os.getpid())

    def _on_conn(self, conn: socket.socket) -> None:
        key = self.selector.get_key(conn)
        chunk = conn.recv(65536)
        if not chunk:
            self.selector.unregister(conn)
            conn.close()
            return
        buffer = key.data[1] + chunk
        if len(buffer) > MAX_LINE_BYTES:
            self.selector.unregister(conn)
            conn.close()
            return
        *lines, rest = buffer.split(b"\n")
        self.selector.modify(conn, selectors.EVENT_READ, ("conn", rest))
        for line in lines:
            try:
                reply = self._handle(json.loads(line))
            except SpaceMoeError as exc:
                reply = {"ok": False, "error": str(exc)}
            except (ValueError, KeyError, TypeError) as exc:
                reply = {"ok": False, "error": f"bad launcher command: {exc!r}"}
            conn.sendall(json.dumps(reply).encode() + b"\n")

    def _handle(self, command: dict[str, Any]) -> dict[str, Any]:
        op = command["op"]
        if op == "spawn":
            return {"ok": True, "pid": self.spawn(command)}
        if op == "stop":
            return {"ok": True, "exit_status": self.stop_child(command["node"])}
        if op == "status":
            return {"ok": True, "children": self.status()}
        if op == "shutdown":
            self.running = False
            return {"ok": True}
        raise KeyError(f"op {op!r}; expected spawn, stop, status or shutdown")

    def status(self) -> dict[str, Any]:
        self._reap()
        return {
            node: {
                "pid": child.pid,
                "state": child.state,
                "detail": child.detail,
                "exit_status": child.exit_status,
                "pss_bytes": None
                if child.exit_status is not None
                else pss_bytes(child.pid),
            }
            for node, child in self.children.items()
        } | {"_launcher": {"pid": os.getpid(), "pss_bytes": pss_bytes(os.getpid())}}

    def spawn(self, spec: dict[str, Any]) -> int:
        node = str(spec["node"])
        old = self.children.get(node)
        if old is not None and old.exit_status is None:
            raise EmulationError(
                f"an agent for {node} already runs as pid {old.pid}; stop it first"
            )
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _child_main(spec, write_fd, self.directory, self.server)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        child = _Child(node, pid, read_fd, time.monotonic(), spec=spec)
        self.children[node] = child
        self.selector.register(read_fd, selectors.EVENT_READ, ("ready", child))
        (self.directory / f"{node}.pid").write_text(f"{pid}\n")
        log.info("forked agent %s as pid %s", node, pid)
        return pid

    def _on_ready(self, child: _Child) -> None:
        try:
            chunk = os.read(child.ready_fd, 4096)
        except BlockingIOError:
            return
        if chunk:
            child.buffer += chunk
            if child.buffer.startswith(b"ready"):
                child.state = "ready"
            elif b"\n" in child.buffer:
                child.state = "failed"
                child.detail = child.buffer.decode(errors="replace").strip()
            return
        self.selector.unregister(child.ready_fd)
        os.close(child.ready_fd)
        child.ready_fd = -1

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for child in self.children.values():
                if child.pid != pid:
                    continue
                child.exit_status = os.waitstatus_to_exitcode(status)
                if child.stopping:
                    child.state = "stopped"
                elif child.state == "ready":
                    child.state = "died"
                    log.warning(
                        "agent %s (pid %s) died with status %s",
                        child.node,
                        pid,
                        child.exit_status,
                    )
                elif child.state == "starting":
                    child.state = "failed"
                    child.detail = child.detail or "exited before it was ready"
                (self.directory / f"{child.node}.pid").unlink(missing_ok=True)

    def stop_child(self, node: str, timeout_s: float = 5.0) -> int | None:
        child = self.children.get(node)
        if child is None:
            raise EmulationError(f"no agent for node {node!r} in this launcher")
        child.stopping = True
        if child.exit_status is None:
            try:
                os.kill(child.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout_s
            while child.exit_status is None and time.monotonic() < deadline:
                self._reap()
                time.sleep(0.005)
            if child.exit_status is None:
                log.warning("agent %s ignored SIGTERM; killing pid %s", node, child.pid)
                os.kill(child.pid, signal.SIGKILL)
                while child.exit_status is None:
                    self._reap()
                    time.sleep(0.005)
        return child.exit_status

    def stop_all(self) -> None:
        live = [c for c in self.children.values() if c.exit_status is None]
        for child in live:
            child.stopping = True
            try:
                os.kill(child.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for child in live:
            self.stop_child(child.node)


def _child_main(
    spec: dict[str, Any], ready_fd: int, directory: Path, server: socket.socket
) -> None:
    """Body of a forked agent; never returns."""
    code = 1
    try:
        server.close()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        from containers.netns import enter_namespace, set_parent_death_signal

        set_parent_death_signal(signal.SIGTERM)
        node = str(spec["node"])
        _child_logging(directory / f"{node}.log")
        code = _serve_agent(spec, ready_fd, enter_namespace)
    except BaseException as exc:  # report anything, then leave without unwinding
        try:
            os.write(ready_fd, f"error {exc}\n".encode())
        except OSError:
            pass
    finally:
        os._exit(code)


def _child_logging(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    )
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def _serve_agent(spec: dict[str, Any], ready_fd: int, enter_namespace: Any) -> int:
    from containers.agent import Agent

    if spec.get("namespace"):
        enter_namespace(spec["namespace"])
    metrics = None
    if spec.get("metrics_addr"):
        # Served on the node's management address, never on the data plane.
        from prometheus_client import CollectorRegistry

        from monitoring.metrics import AGENT_METRICS_PORT, SatelliteMetrics, serve

        registry = CollectorRegistry()
        metrics = SatelliteMetrics(registry, spec["node"])
        serve(
            registry,
            spec["metrics_addr"],
            int(spec.get("metrics_port") or AGENT_METRICS_PORT),
        )
    on_busy = throttle = None
    if spec.get("power_share"):
        # The power model in `spacemoe up` charges this work and may slow it.
        from containers.powershare import PowerShare

        share = PowerShare(Path(spec["power_share"]), int(spec["power_nodes"]))
        row = int(spec["power_row"])
        on_busy = lambda started, busy_s: share.add_busy(row, busy_s)  # noqa: E731
        throttle = lambda: share.throttle(row)  # noqa: E731
    agent = Agent(
        spec["node"],
        spec["host"],
        int(spec["port"]),
        spec["shard_dir"],
        on_ready=lambda: _tell(ready_fd, b"ready\n"),
        metrics=metrics,
        on_busy=on_busy,
        throttle=throttle,
    )
    for layer, expert, path in spec.get("shards", []):
        agent.load(int(layer), int(expert), str(path))
    signal.signal(signal.SIGTERM, lambda *_: agent.request_stop())
    agent.serve_forever(float(spec.get("connect_timeout_s", 10.0)))
    return 0


def _tell(fd: int, message: bytes) -> None:
    try:
        os.write(fd, message)
    except OSError:
        pass  # the zygote is gone; PR_SET_PDEATHSIG ends us shortly


# -- the client side ---------------------------------------------------------


class Launcher:
    """Starts the zygote process and asks it to fork, stop and report agents."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or agents_dir()
        self.sock_path = self.directory / "launcher.sock"
        self.pid_path = self.directory / "launcher.pid"
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._buffer = b""

    def start(self, timeout_s: float = 60.0) -> Launcher:
        """Start the zygote and wait until its socket answers."""
        self.directory.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable,
            "-m",
            "containers.launcher",
            "--dir",
            str(self.directory),
        ]
        log_file = open(self.directory / "launcher.log", "ab")
        with log_file:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file
            )
        self.pid_path.write_text(f"{self._proc.pid}\n")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise EmulationError(
                    f"agent launcher exited with {self._proc.returncode} while "
                    f"starting; log tail:\n{self._log_tail()}"
                )
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(str(self.sock_path))
                self._sock = sock
                return self
            except OSError:
                sock.close()
                time.sleep(0.05)
        self.stop()
        raise EmulationError(
            f"agent launcher did not open {self.sock_path} within {timeout_s} s; "
            f"log tail:\n{self._log_tail()}"
        )

    def _call(self, command: dict[str, Any], timeout_s: float = 30.0) -> dict[str, Any]:
        if self._sock is None:
            raise EmulationError(
                "the agent launcher is not running; call start() first"
            )
        self._sock.settimeout(timeout_s)
        self._sock.sendall(json.dumps(command).encode() + b"\n")
        while b"\n" not in self._buffer:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise EmulationError(
                    "agent launcher closed the connection; log tail:\n"
                    + self._log_tail()
                )
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise EmulationError(
                f"agent launcher refused {command['op']}: {reply['error']}"
            )
        return reply

    def spawn(
        self,
        node: str,
        host: str,
        port: int,
        shard_dir: str | Path,
        namespace: str | None = None,
        shards: list[tuple[int, int, str]] | None = None,
        metrics_addr: str | None = None,
        metrics_port: int | None = None,
        power: tuple[Path, int, int] | None = None,
    ) -> int:
        """Fork an agent for `node`; returns its pid (see wait_ready).

        With `metrics_addr` the agent serves Prometheus metrics there
        (monitoring.metrics.SatelliteMetrics; port default AGENT_METRICS_PORT).
        `power` = (share file, row, rows) connects the agent to the power
        model through a :class:`~containers.powershare.PowerShare`.
        """
        spec = {
            "op": "spawn",
            "node": node,
            "host": host,
            "port": port,
            "shard_dir": str(shard_dir),
            "namespace": namespace,
            "shards": [list(s) for s in shards or []],
            "metrics_addr": metrics_addr,
            "metrics_port": metrics_port,
        }
        if power is not None:
            spec["power_share"], spec["power_row"], spec["power_nodes"] = (
                str(power[0]),
                power[1],
                power[2],
            )
        pid: int = self._call(spec)["pid"]
        return pid

    def wait_ready(self, nodes: list[str], timeout_s: float = 30.0) -> None:
        """Wait until every agent in `nodes` is connected and has its shards.

        Raises EmulationError naming the first agent that failed (with the
        tail of its log) or the ones still starting at the deadline.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            children = self.status()
            waiting = []
            for node in nodes:
                info = children.get(node)
                if info is None:
                    raise EmulationError(f"no agent was spawned for {node!r}")
                if info["state"] in ("failed", "died", "stopped"):
                    why = info["detail"] or f"exit status {info['exit_status']}"
                    raise EmulationError(
                        f"agent {node} {info['state']} ({why}); "
                        f"log tail:\n{self.agent_log_tail(node)}"
                    )
                if info["state"] != "ready":
                    waiting.append(node)
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise EmulationError(
                    f"agents {waiting} not ready within {timeout_s} s; log tail of "
                    f"{waiting[0]}:\n{self.agent_log_tail(waiting[0])}"
                )
            time.sleep(0.02)

    def status(self) -> dict[str, Any]:
        """Per node: pid, state, detail, exit status and PSS bytes.

        States: starting, ready, failed (never got ready), died (exited
        unasked), stopped. The key "_launcher" describes the zygote.
        """
        children: dict[str, Any] = self._call({"op": "status"})["children"]
        return children

    def stop_agent(self, node: str) -> int | None:
        """Stop one agent (SIGTERM, then SIGKILL); returns its exit status."""
        status: int | None = self._call({"op": "stop", "node": node})["exit_status"]
        return status

    def memory(self) -> dict[str, int]:
        """PSS bytes of the zygote and every live agent, and their total."""
        children = self.status()
        figures = {
            node: int(info["pss_bytes"])
            for node, info in children.items()
            if info.get("pss_bytes") is not None
        }
        figures["total"] = sum(figures.values())
        return figures

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop every agent and the zygote; kill the zygote if it hangs."""
        if self._sock is not None:
            try:
                self._call({"op": "shutdown"}, timeout_s)
            except (OSError, EmulationError) as exc:
                log.warning("launcher shutdown request failed: %s", exc)
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("launcher %s did not exit; killing it", self._proc.pid)
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        self.pid_path.unlink(missing_ok=True)

    def agent_log_tail(self, node: str, lines: int = 15) -> str:
        try:
            text = (self.directory / f"{node}.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.directory / "launcher.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Launcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dir", type=Path, default=None, help="default run_dir()/agents"
    )
    args = parser.parse_args(argv)
    directory = args.dir or agents_dir()
    directory.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )
    from containers.netns import set_parent_death_signal

    # The zygote lives as long as whoever started it; its children die with it.
    set_parent_death_signal(signal.SIGTERM)
    zygote = Zygote(directory)
    zygote.preload()
    zygote.serve(directory / "launcher.sock")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def stop_recorded_agents(
    directory: Path | None = None, timeout_s: float = 5.0
) -> list[int]:
    """Stop a launcher and its agents found through their pid files.

    For clean-up after a crash: only processes whose command line is our
    launcher's for this `directory` (forked agents share it) are signalled.
    Returns the pids that were signalled.
    """
    directory = directory or agents_dir()
    marker = str(directory).encode()

    def ours(pid: int) -> bool:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return b"containers.launcher" in argv and marker in argv

    pids = []
    for pid_path in sorted(directory.glob("*.pid")):
        try:
            pid = int(pid_path.read_text().strip())
        except (OSError, ValueError):
            continue
        if ours(pid):
            os.kill(pid, signal.SIGTERM)
            pids.append(pid)
        pid_path.unlink(missing_ok=True)
    deadline = time.monotonic() + timeout_s
    while any(ours(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in pids:
        if ours(pid):
            os.kill(pid, signal.SIGKILL)
    return pids
