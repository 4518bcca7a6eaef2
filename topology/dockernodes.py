"""Nodes as Docker containers: the substrate backend for ``nodes: docker``.

Each satellite and ground station is a container ``smoe-<node>`` of our
own dockerd (:mod:`containers.docker`), started with ``--network none``
from the node image, holding its own file system, process table, host
name and, if the scenario asks, CPU and memory limits. Its network
namespace is named ``/run/netns/smoe-<node>`` like one of ours (what
``ip netns attach`` does), so the rest of the emulator works on it
unchanged: veths, addresses, shaping, the delay line, routes, the
management port, brokers and agents all find the node by that name.

What runs in the container's own file system is what a user starts there
(``spacemoe exec NODE`` is ``docker exec``); the testbed's brokers and
expert agents join the node's network namespace from the host, as they do
with plain namespaces, so that the forked agents keep sharing the one
copy of torch.

The containers are recorded in ``run_dir()/docker.json`` for ``spacemoe
exec`` and ``spacemoe clean``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from containers.docker import IMAGE, NODE_LABEL, Dockerd, docker_root
from topology.errors import EmulationError
from topology.netns import Namespace, attach_named
from topology.rundir import namespace_name, run_dir
from topology.substrate import NamespaceSubstrate, NodeSpec, open_named

log = logging.getLogger(__name__)

# `docker run` is mostly waiting on the daemon; a few at once keep it busy
# without queueing hundreds of requests.
PARALLEL_RUNS = 6
RECORD = "docker.json"


class DockerSubstrate(NamespaceSubstrate):
    """Each node is a container of our own dockerd, wired by the emulator."""

    node_kind = "docker"

    def __init__(
        self,
        shaping: str = "auto",
        cpus: float | None = None,
        memory_bytes: int | None = None,
        image: str = IMAGE,
        root: Path | None = None,
    ) -> None:
        super().__init__(shaping=shaping)
        self.cpus = cpus
        self.memory_bytes = memory_bytes
        self.image = image
        self.daemon = Dockerd(root or docker_root())
        self.containers: dict[str, str] = {}
        self.pids: dict[str, int] = {}

    def start(self, management) -> None:  # type: ignore[no-untyped-def]
        super().start(management)
        started = time.monotonic()
        self.daemon.start()
        # Everything in this daemon is ours; a container left from a run that
        # died with the daemon would block its name.
        stale = self.daemon.our_containers()
        if stale:
            log.info("removing %d containers left from an earlier run", len(stale))
            self.daemon.remove(stale)
        self.daemon.ensure_image(self.image)
        self._write_record()
        log.info(
            "docker nodes ready in %.1f s (image %s)",
            time.monotonic() - started,
            self.image,
        )

    def add_nodes(self, nodes: Sequence[NodeSpec]) -> None:
        # Start the containers together, then wire them one by one.
        new = [n.name for n in nodes if n.name not in self.containers]
        with ThreadPoolExecutor(PARALLEL_RUNS) as pool:
            pids = list(pool.map(self._run_container, new))
        for name, pid in zip(new, pids, strict=True):
            self.containers[name] = namespace_name(name)
            self.pids[name] = pid
        self._write_record()
        super().add_nodes(nodes)

    def _run_container(self, name: str) -> int:
        container = namespace_name(name)
        argv = [
            "run", "--detach", "--name", container, "--hostname", name,
            "--network", "none", "--label", f"{NODE_LABEL}={name}",
            "--cap-add", "NET_ADMIN", "--cap-add", "NET_RAW",
        ]  # fmt: skip
        if self.cpus is not None:
            argv += ["--cpus", f"{self.cpus:g}"]
        if self.memory_bytes is not None:
            argv += ["--memory", str(self.memory_bytes)]
        self.daemon.cli(*argv, self.image, "sleep", "infinity")
        pid = int(
            self.daemon.cli(
                "inspect", "--format", "{{.State.Pid}}", container
            ).stdout.strip()
        )
        if pid <= 0:
            raise EmulationError(f"container {container} started but is not running")
        return pid

    def _open_node(self, name: str) -> Namespace:
        pid = self.pids.get(name)
        if pid is None:
            raise EmulationError(
                f"node {name!r} has no container; add_nodes makes them"
            )
        label = namespace_name(name)
        return open_named(label, attach_named(label, pid))

    def teardown(self) -> None:
        errors: list[BaseException] = []
        # Containers first: their first process ignores SIGTERM from outside
        # (it is its PID namespace's init), and `docker rm -f` kills it at once.
        # Every labelled container in our daemon, also those a failed
        # add_nodes started but did not record.
        if self.daemon.responding():
            try:
                self.daemon.remove(self.daemon.our_containers())
            except Exception as exc:  # tear down the rest regardless
                log.error("removing containers: %s", exc)
                errors.append(exc)
        try:
            super().teardown()
        except Exception as exc:
            errors.append(exc)
        self.containers.clear()
        self.pids.clear()
        try:
            self.daemon.stop()
        except Exception as exc:
            log.error("stopping our dockerd: %s", exc)
            errors.append(exc)
        (run_dir() / RECORD).unlink(missing_ok=True)
        if errors:
            raise errors[0]

    def _write_record(self) -> None:
        directory = run_dir()
        directory.mkdir(parents=True, exist_ok=True)
        record = {
            "root": str(self.daemon.root),
            "socket": str(self.daemon.socket),
            "image": self.image,
            "containers": self.containers,
        }
        (directory / RECORD).write_text(json.dumps(record, indent=1) + "\n")


def recorded() -> dict | None:
    """The running scenario's Docker record, if its nodes are containers."""
    try:
        return json.loads((run_dir() / RECORD).read_text())
    except (OSError, ValueError):
        return None
