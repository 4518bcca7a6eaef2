"""Brokers and agents for a set of nodes, holding the shards of a placement.

:class:`Deployment` starts one Mosquitto broker per node (in the node's
namespace, on its data-plane address; or on 127.0.0.1 with a port per node
for namespace-free runs), one zygote launcher, and one forked agent per
node with the node's initial shards, and waits until every agent has
subscribed. ``stop()`` ends all of it, also after a failed start.

Home takes part like any node when the placement puts experts there (the
ground baseline), so it has a broker and an agent too.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

from containers.broker import Broker
from containers.launcher import Launcher
from controller.inference import Endpoint
from controller.placement import ExpertKey, node_shards
from moe.shards import shard_file_name
from topology.rundir import namespace_name

log = logging.getLogger(__name__)


def free_loopback_ports(count: int) -> list[int]:
    """`count` TCP ports free on 127.0.0.1 right now (for namespace-free runs)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def loopback_endpoints(nodes: Sequence[str]) -> dict[str, Endpoint]:
    """One 127.0.0.1 endpoint with its own port per node."""
    ports = free_loopback_ports(len(nodes))
    return {
        node: Endpoint(node, "127.0.0.1", port)
        for node, port in zip(nodes, ports, strict=True)
    }


class Deployment:
    """Brokers plus agents (see the module docstring).

    `namespaces`: run each node's broker and agent inside ``smoe-<node>``
    (needs the emulation up); False runs them in the caller's namespace.
    """

    def __init__(
        self,
        endpoints: Mapping[str, Endpoint],
        shard_dir: str | Path,
        namespaces: bool = True,
    ) -> None:
        self.endpoints = dict(endpoints)
        self.shard_dir = Path(shard_dir)
        self.namespaces = namespaces
        self.brokers: dict[str, Broker] = {}
        self.launcher: Launcher | None = None

    def start(
        self,
        placement: Mapping[ExpertKey, Sequence[str]],
        nodes: Sequence[str] | None = None,
        timeout_s: float = 30.0,
    ) -> Deployment:
        """Start brokers and agents on `nodes` (default: those in `placement`)."""
        held = node_shards(placement)
        nodes = sorted(set(nodes) if nodes is not None else set(held))
        try:
            for node in nodes:
                endpoint = self.endpoints[node]
                broker = Broker(
                    node,
                    endpoint.host,
                    endpoint.port,
                    namespace=namespace_name(node) if self.namespaces else None,
                )
                self.brokers[node] = broker
                broker.start()
            self.launcher = Launcher().start()
            for node in nodes:
                endpoint = self.endpoints[node]
                shards = [
                    (layer, expert, shard_file_name(layer, expert))
                    for layer, expert in held.get(node, [])
                ]
                self.launcher.spawn(
                    node,
                    endpoint.host,
                    endpoint.port,
                    self.shard_dir,
                    namespace=namespace_name(node) if self.namespaces else None,
                    shards=shards,
                )
            self.launcher.wait_ready(list(nodes), timeout_s)
        except BaseException:
            self.stop()
            raise
        log.info(
            "deployed %d agents with %d shards",
            len(nodes),
            sum(len(v) for v in held.values()),
        )
        return self

    def agent_pid(self, node: str) -> int:
        """The pid of `node`'s agent (for fault injection in tests)."""
        assert self.launcher is not None
        pid: int = self.launcher.status()[node]["pid"]
        return pid

    def stop(self) -> None:
        """Stop agents, then brokers; safe to call twice or after a failed start."""
        if self.launcher is not None:
            self.launcher.stop()
            self.launcher = None
        for broker in self.brokers.values():
            broker.stop()
        self.brokers.clear()

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
