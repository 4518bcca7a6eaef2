"""A real Mosquitto broker per node, bound to that node's data-plane address.

Each satellite (and the home station) runs its own ``/usr/sbin/mosquitto``
inside its network namespace, listening on one address only: the node's
stable data-plane /32 (never the unshaped management network), so every
byte to or from it crosses the emulated links. Its files live under
``run_dir()/brokers/<node>/``: ``mosquitto.conf``, ``pid`` and
``mosquitto.log``.

Access: ``allow_anonymous true`` on that single listener. The listener is
reachable only inside our emulated network (addresses from the node prefix,
routed between our namespaces, nothing leaves the machine), so there is
nothing to authenticate against; a deployment over real links would add
TLS and a password file here.

Choices that matter for latency: ``set_tcp_nodelay true`` (otherwise Nagle
holds back the tail of a multi-segment reply for a round trip) and
persistence off (nothing to write per message).

The same class runs a broker on loopback without namespaces (tests pass
``namespace=None`` and a free port).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

from containers import wire
from containers.netns import call_in_namespace
from topology.errors import EmulationError
from topology.rundir import namespace_name, run_dir

log = logging.getLogger(__name__)

MOSQUITTO = "/usr/sbin/mosquitto"
MQTT_PORT = 1883

# Mosquitto applies this to packets it receives; it must hold the largest
# wire message plus MQTT headers.
MAX_PACKET_BYTES = wire.MAX_PAYLOAD_BYTES + 64 * 1024


def broker_dir(node: str) -> Path:
    """Where the broker of `node` keeps its config, pid and log."""
    return run_dir() / "brokers" / node


class Broker:
    """One Mosquitto process for one node.

    `namespace` is the network namespace to run in (default: the node's,
    ``smoe-<node>``); pass None to run in the caller's namespace, e.g. on
    127.0.0.1 in tests.
    """

    def __init__(
        self,
        node: str,
        address: str,
        port: int = MQTT_PORT,
        namespace: str | None = "",
        directory: Path | None = None,
    ) -> None:
        self.node = node
        self.address = address
        self.port = port
        self.namespace = namespace_name(node) if namespace == "" else namespace
        self.directory = directory or broker_dir(node)
        self.conf_path = self.directory / "mosquitto.conf"
        self.pid_path = self.directory / "pid"
        self.log_path = self.directory / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        where = self.namespace or "current namespace"
        return f"Broker({self.node!r}, {self.address}:{self.port}, {where})"

    @property
    def pid(self) -> int | None:
        """The recorded pid, if a pid file exists."""
        try:
            return int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None

    def config_text(self) -> str:
        """The mosquitto.conf this broker runs with."""
        return "\n".join(
            [
                f"# Written by spacemoe for node {self.node}; rewritten on start.",
                f"listener {self.port} {self.address}",
                "protocol mqtt",
                "# Anonymous on purpose: the listener is only reachable inside the",
                "# emulated network (see containers/broker.py).",
                "allow_anonymous true",
                "persistence false",
                "set_tcp_nodelay true",
                f"max_packet_size {MAX_PACKET_BYTES}",
                "max_queued_messages 10000",
                "log_dest stderr",
                "log_type error",
                "log_type warning",
                "log_type notice",
                "log_type information",
                "log_timestamp_format %Y-%m-%dT%H:%M:%S",
                "",
            ]
        )

    def start(self, timeout_s: float = 5.0) -> Broker:
        """Start mosquitto and wait until it answers an MQTT CONNECT.

        Raises EmulationError with the broker's log tail if it exits or does
        not answer within `timeout_s`.
        """
        if self.is_running():
            raise EmulationError(
                f"{self!r} is already running as pid {self.pid}; stop it first "
                "(`spacemoe down` or Broker.stop())"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(self.config_text())

        argv = [MOSQUITTO, "-c", str(self.conf_path)]
        if self.namespace is not None:
            # `ip netns exec` enters the namespace and execs mosquitto, so the
            # pid we record is mosquitto's own.
            argv = ["ip", "netns", "exec", self.namespace, *argv]
        log.debug("start broker: %s", " ".join(argv))
        with open(self.log_path, "ab") as log_file:
            try:
                self._proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                    start_new_session=True,
                )
            except OSError as exc:
                raise EmulationError(
                    f"cannot run {argv[0]!r} ({exc.strerror}); install the Debian "
                    "package 'mosquitto' (and 'iproute2' for namespaces)"
                ) from None
        self.pid_path.write_text(f"{self._proc.pid}\n")

        deadline = time.monotonic() + timeout_s
        last_error = "no attempt"
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                self.pid_path.unlink(missing_ok=True)
                raise EmulationError(
                    f"{self!r} exited with status {code} while starting; "
                    f"log tail:\n{self.log_tail()}"
                )
            try:
                call_in_namespace(self.namespace, self._probe)
                log.info("broker of %s up on %s:%s", self.node, self.address, self.port)
                return self
            except OSError as exc:
                last_error = str(exc)
            time.sleep(0.02)
        self.stop()
        raise EmulationError(
            f"{self!r} did not answer an MQTT CONNECT within {timeout_s} s "
            f"(last error: {last_error}); log tail:\n{self.log_tail()}"
        )

    def _probe(self) -> None:
        """One MQTT 5 CONNECT/CONNACK exchange; OSError if it fails."""
        client_id = b"smoe-probe"
        variable = b"\x00\x04MQTT" + bytes([5, 0x02]) + struct.pack(">H", 10) + b"\x00"
        body = variable + struct.pack(">H", len(client_id)) + client_id
        packet = bytes([0x10, len(body)]) + body
        with socket.create_connection((self.address, self.port), timeout=1.0) as sock:
            sock.sendall(packet)
            head = sock.recv(2)
            if len(head) < 2 or head[0] != 0x20:
                raise OSError(f"expected CONNACK, got {head!r}")
            sock.sendall(b"\xe0\x00")

    def is_running(self) -> bool:
        """Whether the recorded pid is alive and is this broker's mosquitto."""
        pid = self.pid
        return pid is not None and self._owns(pid)

    def _owns(self, pid: int) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return any(arg.endswith(b"mosquitto") for arg in cmdline) and (
            str(self.conf_path).encode() in cmdline
        )

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the broker by its recorded pid (SIGTERM, then SIGKILL)."""
        pid = self.pid
        if pid is None:
            return
        if not self._owns(pid):
            # The pid is stale or reused by someone else's process: leave it.
            log.info("broker of %s: pid %s is not ours any more", self.node, pid)
            self.pid_path.unlink(missing_ok=True)
            self._reap(pid, block=False)
            return
        os.kill(pid, signal.SIGTERM)
        if not self._wait_gone(pid, timeout_s):
            log.warning("broker of %s ignored SIGTERM; killing pid %s", self.node, pid)
            os.kill(pid, signal.SIGKILL)
            self._wait_gone(pid, timeout_s)
        # It may have turned zombie between the two checks in _wait_gone:
        # collect it now, so no trace of it stays in the process table.
        self._reap(pid, block=True)
        self.pid_path.unlink(missing_ok=True)
        log.info("broker of %s stopped", self.node)

    def _wait_gone(self, pid: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            # A zombie has an empty cmdline, so it no longer counts as ours.
            if self._reap(pid, block=False) or not self._owns(pid):
                return True
            time.sleep(0.01)
        return False

    def _reap(self, pid: int, block: bool) -> bool:
        """Collect our child's exit status; True if it has exited."""
        if self._proc is not None and self._proc.pid == pid:
            if block:
                self._proc.wait()
                return True
            return self._proc.poll() is not None
        return False

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the broker's log ('' if none yet)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def stop_recorded_brokers(root: Path | None = None) -> list[str]:
    """Stop every broker with a pid file under `root` (default run_dir()/brokers).

    Used by clean-up; returns the nodes whose brokers were running.
    """
    root = root or run_dir() / "brokers"
    stopped = []
    for pid_path in sorted(root.glob("*/pid")):
        broker = Broker(pid_path.parent.name, "0.0.0.0", directory=pid_path.parent)
        if broker.is_running():
            stopped.append(broker.node)
        broker.stop()
    return stopped
