"""The emulation substrate: nodes, links, shaping and routes in the kernel.

Layers, from the interface down::

    Substrate            what the emulator needs (abstract)
    └── KernelSubstrate  works on any network namespace it is handed:
        │                veths, addresses, qdiscs, delay line, routes,
        │                management network, exec
        └── NamespaceSubstrate
            │            nodes are named namespaces ``smoe-<node>`` made
            │            here (the kind of host Mininet makes)
            └── DockerSubstrate
                         nodes are containers of our own dockerd, their
                         namespaces named ``smoe-<node>`` like ours
                         (:mod:`topology.dockernodes`)

A backend only says how a node's namespace comes to be
(:meth:`KernelSubstrate._open_node`: for Docker, start the container, then
name its namespace, as ``ip netns attach`` does, so the delay line finds
it by name) and goes away (:meth:`KernelSubstrate._discard_node`).

Kernel objects of a running emulation, all named so that
:mod:`topology.cleanup` finds exactly ours:

- per node: namespace ``smoe-<node>``; node /32 on ``lo``; ``mgmt0``
  (management); ``d<k>`` for each data-plane link k (a veth whose other end,
  also ``d<k>``, is in the neighbour's namespace); a root qdisc on every
  ``d<k>`` (tbf or netem, see :mod:`topology.shaping`); host routes to the
  other nodes' /32s; ip_forward on, rp_filter off, IPv6 off. A link whose
  other end runs on another host (:mod:`topology.partitions`) is a VXLAN
  device ``d<k>`` instead of a veth end, its UDP socket in the root
  namespace.
- in the root namespace: the bridge ``smoe-mgmt`` and the root ends
  ``smoe-m<i>`` of the management veths; the delay-line process (tbf mode).

All changes after bring-up go over the persistent netlink socket of each
namespace, in batches (:mod:`topology.rtnl`).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import resource
import signal
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from topology import rtnl
from topology.addressing import MGMT_IFNAME, data_ifindex, data_ifname
from topology.commands import run as run_command
from topology.errors import EmulationError, NodeNotFound
from topology.netns import Namespace, create_named, remove_named
from topology.rundir import PREFIX, namespace_name
from topology.shaping import (
    Shape,
    ShapingMode,
    check_rate,
    egress_message,
    egress_needs_change,
    probe_netem,
    resolve_mode,
)

log = logging.getLogger(__name__)

MGMT_BRIDGE = f"{PREFIX}-mgmt"
# A Linux bridge takes at most 1,024 ports (BR_MAX_PORTS); beyond that the
# management network continues on further bridges, each joined to the
# first by a veth trunk (a star, so no loops and no STP).
PORTS_PER_BRIDGE = 1000
MGMT_IFINDEX = 99_999
Direction = Literal["ab", "ba"]

# Every node namespace: forward packets; no reverse-path filter (a reply may
# come back over another link than the request left by); no IPv6 (nothing
# uses it, and link-local addresses would send router and neighbour
# solicitations over every veth at bring-up).
NODE_SYSCTLS = {
    "ipv4/ip_forward": "1",
    "ipv4/conf/all/rp_filter": "0",
    "ipv4/conf/default/rp_filter": "0",
    "ipv4/conf/lo/rp_filter": "0",
    "ipv6/conf/all/disable_ipv6": "1",
    "ipv6/conf/default/disable_ipv6": "1",
}


@dataclass(frozen=True)
class NodeSpec:
    """A node to create: its name, /32 and management address (if any)."""

    name: str
    address: ipaddress.IPv4Address
    management: ipaddress.IPv4Interface | None = None


@dataclass(frozen=True)
class Tunnel:
    """A cross-host link's VXLAN parameters, seen from the local host.

    `local` and `remote` are the two hosts' underlay addresses; `mtu` is
    the device's (the data plane's), not the underlay's.
    """

    vni: int
    local: ipaddress.IPv4Address
    remote: ipaddress.IPv4Address
    port: int
    mtu: int = 1500


@dataclass(frozen=True)
class LinkSpec:
    """A point-to-point link between nodes `a` and `b` (a /31 `subnet`).

    The lower address of `subnet` goes on a's end. `shape` applies to both
    directions until :meth:`Substrate.set_shaping` says otherwise. With a
    `tunnel`, only one end is a node of this substrate: that end is a VXLAN
    device and the other end is built by another host.
    """

    link_id: int
    a: str
    b: str
    subnet: ipaddress.IPv4Network
    shape: Shape
    up: bool = True
    tunnel: Tunnel | None = None


@dataclass(frozen=True)
class ShapingChange:
    """New shape for one direction ('ab': packets from a to b) of a link."""

    link_id: int
    direction: Direction
    shape: Shape


@dataclass(frozen=True)
class RouteBatch:
    """Host routes of one node, as arrays.

    `dest` and `via` are IPv4 addresses as unsigned 32-bit integers; `via`
    is the next hop's address on link `link_id`. ``via == 0`` deletes the
    route to `dest`.
    """

    dest: np.ndarray
    via: np.ndarray
    link_id: np.ndarray

    def __len__(self) -> int:
        return len(self.dest)

    @classmethod
    def from_tuples(
        cls, routes: Sequence[tuple[str, str | None, int | None]]
    ) -> RouteBatch:
        """From (dest, via or None to delete, link id or None) tuples."""
        dest = [int(ipaddress.IPv4Address(d.split("/")[0])) for d, _, _ in routes]
        via = [int(ipaddress.IPv4Address(v)) if v else 0 for _, v, _ in routes]
        link = [k if k is not None else -1 for _, _, k in routes]
        return cls(np.array(dest, np.uint32), np.array(via, np.uint32), np.array(link))


@dataclass
class _Link:
    spec: LinkSpec
    up: bool
    shapes: dict[str, Shape] = field(default_factory=dict)


class Substrate(ABC):
    """What the emulator needs from whatever holds its nodes and links."""

    shaping_mode: ShapingMode

    @abstractmethod
    def start(self, management: ipaddress.IPv4Interface | None) -> None:
        """Prepare shared state: shaping mode, delay line, management bridge."""

    @abstractmethod
    def add_nodes(self, nodes: Sequence[NodeSpec]) -> None:
        """Create nodes: /32 on lo, forwarding on, rp_filter off, mgmt0."""

    def add_node(self, node: NodeSpec) -> None:
        """Create one node (see :meth:`add_nodes`)."""
        self.add_nodes([node])

    @abstractmethod
    def add_links(self, links: Sequence[LinkSpec]) -> None:
        """Create veth pairs, one end per node, /31 each side, shaped."""

    def add_link(self, link: LinkSpec) -> None:
        """Create one link (see :meth:`add_links`)."""
        self.add_links([link])

    @abstractmethod
    def set_links_up(self, link_ids: Sequence[int], up: bool) -> None:
        """Set links administratively up or down (both ends)."""

    def set_link_up(self, link_id: int, up: bool) -> None:
        """Set one link up or down."""
        self.set_links_up([link_id], up)

    @abstractmethod
    def set_shaping(self, changes: Sequence[ShapingChange]) -> None:
        """Change delay, rate and loss of link directions; unchanged are skipped."""

    @abstractmethod
    def remove_links(self, link_ids: Sequence[int]) -> None:
        """Delete links (their routes go with them)."""

    def remove_link(self, link_id: int) -> None:
        """Delete one link."""
        self.remove_links([link_id])

    @abstractmethod
    def apply_routes(self, node: str, routes: RouteBatch) -> None:
        """Install, replace or delete host routes of `node`, batched."""

    @abstractmethod
    def node_netns_path(self, node: str) -> Path:
        """The namespace file of `node` (for nsenter --net=...)."""

    def popen(self, node: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """Start `argv` inside `node`'s network namespace."""
        path = self.node_netns_path(node)
        return subprocess.Popen(["nsenter", f"--net={path}", "--", *argv], **kwargs)

    def run(
        self,
        node: str,
        argv: Sequence[str],
        timeout_s: float = 60.0,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside `node`; raise CommandError if it fails and `check`."""
        path = self.node_netns_path(node)
        return run_command(
            ["nsenter", f"--net={path}", "--", *argv], timeout_s=timeout_s, check=check
        )

    @abstractmethod
    def link_bytes(self, node: str) -> dict[int, tuple[int, int, int, int]]:
        """Link id -> (rx bytes, tx bytes, rx dropped, tx dropped) at `node`."""

    @abstractmethod
    def helper_pids(self) -> list[int]:
        """Processes the substrate started (the delay line), for pidfiles."""

    @abstractmethod
    def teardown(self) -> None:
        """Remove every node, link and process this substrate made."""


class KernelSubstrate(Substrate):
    """Nodes are network namespaces; links are veth pairs between them."""

    node_kind = "namespace"

    def __init__(self, shaping: str = "auto", delayline_workers: int = 1) -> None:
        if os.geteuid() != 0:
            raise EmulationError(
                "the emulator needs root (network namespaces, veths, qdiscs); "
                "run it with sudo"
            )
        self.requested_shaping = shaping
        self.delayline_workers = delayline_workers
        self.shaping_mode: ShapingMode = "tbf+delayline"
        self.nodes: dict[str, Namespace] = {}
        self.node_address: dict[str, int] = {}
        self.links: dict[int, _Link] = {}
        self.root: Namespace | None = None
        self.delayline: Any = None
        self.bridge_index: int | None = None
        self._bridges: list[tuple[str, int]] = []
        self._bridge_ports = 0
        self._mgmt_ports: list[str] = []
        self._node_count = 0

    # --- how nodes come and go (backend-specific) ---------------------

    @abstractmethod
    def _open_node(self, name: str) -> Namespace:
        """Make (or find) node `name`'s namespace and open it."""

    @abstractmethod
    def _discard_node(self, name: str, namespace: Namespace) -> None:
        """Close `namespace` and make it go away."""

    # --- shared state --------------------------------------------------

    def start(self, management: ipaddress.IPv4Interface | None) -> None:
        _raise_fd_limit()
        self.root = Namespace("/proc/thread-self/ns/net", "root")
        self.shaping_mode = resolve_mode(self.requested_shaping, probe_netem())
        if self.shaping_mode == "tbf+delayline":
            from topology.delayline import DelayLine

            # IPv4 only: the nodes run without IPv6, and each address family
            # costs an iptables-restore per namespace at attach.
            self.delayline = DelayLine(self.delayline_workers, ipv6=False)
            self.delayline.start()
        if management is not None:
            self._make_bridge(management)
        log.info("substrate ready: shaping %s", self.shaping_mode)

    def _make_bridge(self, address: ipaddress.IPv4Interface) -> None:
        assert self.root is not None
        self.bridge_index = self._new_bridge(MGMT_BRIDGE)
        self.root.send(
            [
                rtnl.addr_add(
                    self.bridge_index, int(address.ip), address.network.prefixlen
                ),
                rtnl.link_set(self.bridge_index, up=True),
            ],
            [f"address {address} on {MGMT_BRIDGE}", f"set {MGMT_BRIDGE} up"],
        )

    def _new_bridge(self, name: str) -> int:
        assert self.root is not None
        self.root.send([rtnl.bridge_add(name)], [f"create bridge {name}"])
        index = _ifindex(name)
        self._bridges.append((name, index))
        self._bridge_ports = 0
        _disable_ipv6_root(name)
        return index

    def _bridge_with_room(self) -> int:
        """The bridge that takes the next management port (a new one if full)."""
        assert self.root is not None and self.bridge_index is not None
        if self._bridge_ports < PORTS_PER_BRIDGE:
            return self._bridges[-1][1]
        number = len(self._bridges)
        index = self._new_bridge(f"{MGMT_BRIDGE}{number}")
        trunk, far = f"{PREFIX}-mt{number}a", f"{PREFIX}-mt{number}b"
        self.root.send(
            [rtnl.veth_add(trunk, 0, None, far, 0, None)],
            [f"create management trunk {trunk}"],
        )
        self._mgmt_ports.append(trunk)
        for name in (trunk, far):
            _disable_ipv6_root(name)
        self.root.send(
            [
                rtnl.link_set(name=trunk, up=True, master=self.bridge_index),
                rtnl.link_set(name=far, up=True, master=index),
                rtnl.link_set(index, up=True),
            ],
            [f"attach {trunk}", f"attach {far}", "set bridge up"],
        )
        return index

    def helper_pids(self) -> list[int]:
        return list(self.delayline.pids) if self.delayline is not None else []

    def node_netns_path(self, node: str) -> Path:
        return self._node(node).path

    def _node(self, name: str) -> Namespace:
        try:
            return self.nodes[name]
        except KeyError:
            raise NodeNotFound(
                f"no node {name!r} in this emulation; known nodes include "
                f"{', '.join(list(self.nodes)[:5])}"
            ) from None

    # --- nodes -----------------------------------------------------------

    def add_nodes(self, nodes: Sequence[NodeSpec]) -> None:
        assert self.root is not None, "call start() first"
        for node in nodes:
            if node.name in self.nodes:
                raise EmulationError(f"node {node.name!r} exists already")
            namespace = self._open_node(node.name)
            self.nodes[node.name] = namespace
            self.node_address[node.name] = int(node.address)
            namespace.sysctl(NODE_SYSCTLS)
            namespace.send(
                [
                    rtnl.addr_add(1, int(node.address), 32),
                    rtnl.link_set(1, up=True),
                ],
                [f"address {node.address}/32 on lo", "set lo up"],
            )
            if node.management is not None:
                self._add_mgmt_port(node, namespace)
        if self.delayline is not None:
            # One call for the batch: the delay line installs its rules in
            # parallel (an iptables-restore per namespace).
            spaces = [self.nodes[n.name] for n in nodes]
            self.delayline.attach_many(
                [ns.label for ns in spaces], {ns.label: ns.path for ns in spaces}
            )

    def _add_mgmt_port(self, node: NodeSpec, namespace: Namespace) -> None:
        assert self.root is not None and node.management is not None
        if self.bridge_index is None:
            raise EmulationError(
                f"node {node.name} has a management address but the substrate was "
                "started without a management network"
            )
        port = f"{PREFIX}-m{self._node_count}"
        self._node_count += 1
        self.root.send(
            # The kernel takes a fixed peer index only if the first end has
            # one too, so mgmt0 comes first; the root end's index is free.
            [
                rtnl.veth_add(
                    MGMT_IFNAME, MGMT_IFINDEX, namespace.fd, port, 0, self.root.fd
                )
            ],
            [f"create management veth {port} <-> {node.name}:{MGMT_IFNAME}"],
        )
        self._mgmt_ports.append(port)
        _disable_ipv6_root(port)
        bridge = self._bridge_with_room()
        self.root.send(
            [rtnl.link_set(name=port, up=True, master=bridge)],
            [f"attach {port} to the management bridge"],
        )
        self._bridge_ports += 1
        address = node.management
        namespace.send(
            [
                rtnl.addr_add(MGMT_IFINDEX, int(address.ip), address.network.prefixlen),
                rtnl.link_set(MGMT_IFINDEX, up=True),
            ],
            [f"address {address} on {MGMT_IFNAME}", f"set {MGMT_IFNAME} up"],
        )

    # --- links ---------------------------------------------------------

    def add_links(self, links: Sequence[LinkSpec]) -> None:
        assert self.root is not None, "call start() first"
        creates = []
        for link in links:
            if link.link_id in self.links:
                raise EmulationError(f"link {link.link_id} exists already")
            check_rate(link.shape.rate_bps, f"link {link.a}-{link.b}")
            index = data_ifindex(link.link_id)
            name = data_ifname(link.link_id)
            if link.tunnel is not None:
                creates.append(self._vxlan_message(link, name, index))
                continue
            creates.append(
                rtnl.veth_add(
                    name,
                    index,
                    self._node(link.a).fd,
                    name,
                    index,
                    self._node(link.b).fd,
                )
            )
        self.root.send(
            creates,
            [
                f"create {'vxlan' if s.tunnel else 'veth'} {s.a}<->{s.b} "
                f"({data_ifname(s.link_id)})"
                for s in links
            ],
        )
        for link in links:
            self.links[link.link_id] = _Link(
                link, link.up, {"ab": link.shape, "ba": link.shape}
            )

        # Delay first, so no packet crosses a link before its delay is known.
        if self.delayline is not None:
            entries = []
            for link in links:
                name = data_ifname(link.link_id)
                shape = link.shape
                for receiver in self._local_ends(link, (link.b, link.a)):
                    entries.append(
                        (
                            self.nodes[receiver].label,
                            name,
                            shape.delay_s,
                            shape.loss_fraction,
                        )
                    )
            self.delayline.set_links(entries)

        messages: dict[str, list[bytes]] = defaultdict(list)
        labels: dict[str, list[str]] = defaultdict(list)
        for link in links:
            index = data_ifindex(link.link_id)
            hosts = list(link.subnet)
            if len(hosts) != 2:
                raise EmulationError(f"link {link.link_id}: {link.subnet} is not a /31")
            for node, address in ((link.a, hosts[0]), (link.b, hosts[1])):
                if node not in self.nodes:
                    continue
                messages[node] += [
                    rtnl.addr_add(index, int(address), 31),
                    egress_message(self.shaping_mode, index, link.shape, create=True),
                    rtnl.link_set(index, up=link.up),
                ]
                what = f"{data_ifname(link.link_id)} ({link.a}-{link.b})"
                labels[node] += [
                    f"address {address}/31 on {what}",
                    f"root qdisc on {what}",
                    f"set {what} up/down",
                ]
        for node, batch in messages.items():
            self.nodes[node].send(batch, labels[node])

    def set_links_up(self, link_ids: Sequence[int], up: bool) -> None:
        messages: dict[str, list[bytes]] = defaultdict(list)
        labels: dict[str, list[str]] = defaultdict(list)
        for link_id in link_ids:
            link = self._link(link_id)
            link.up = up
            for node in self._local_ends(link.spec, (link.spec.a, link.spec.b)):
                messages[node].append(rtnl.link_set(data_ifindex(link_id), up=up))
                labels[node].append(
                    f"set {data_ifname(link_id)} {'up' if up else 'down'}"
                )
        for node, batch in messages.items():
            self.nodes[node].send(batch, labels[node])

    def set_shaping(self, changes: Sequence[ShapingChange]) -> None:
        messages: dict[str, list[bytes]] = defaultdict(list)
        labels: dict[str, list[str]] = defaultdict(list)
        delays = []
        for change in changes:
            link = self._link(change.link_id)
            old = link.shapes[change.direction]
            new = change.shape
            if old == new:
                continue
            check_rate(new.rate_bps, f"link {link.spec.a}-{link.spec.b}")
            sender, receiver = (
                (link.spec.a, link.spec.b)
                if change.direction == "ab"
                else (link.spec.b, link.spec.a)
            )
            index = data_ifindex(change.link_id)
            if sender in self.nodes and egress_needs_change(
                self.shaping_mode, old, new
            ):
                messages[sender].append(
                    egress_message(self.shaping_mode, index, new, create=False)
                )
                labels[sender].append(f"change qdisc on {data_ifname(change.link_id)}")
            if (
                self.delayline is not None
                and receiver in self.nodes
                and (
                    old.delay_s != new.delay_s or old.loss_fraction != new.loss_fraction
                )
            ):
                delays.append(
                    (
                        self.nodes[receiver].label,
                        data_ifname(change.link_id),
                        new.delay_s,
                        new.loss_fraction,
                    )
                )
            link.shapes[change.direction] = new
        if delays:
            self.delayline.set_links(delays)
        for node, batch in messages.items():
            self.nodes[node].send(batch, labels[node])

    def remove_links(self, link_ids: Sequence[int]) -> None:
        messages: dict[str, list[bytes]] = defaultdict(list)
        labels: dict[str, list[str]] = defaultdict(list)
        for link_id in link_ids:
            link = self._link(link_id)
            # Deleting one end of a veth deletes its peer too; a tunnel has
            # only the one end here.
            spec = link.spec
            ends = (spec.a,) if spec.tunnel is None else (spec.a, spec.b)
            (end,) = self._local_ends(spec, ends)
            messages[end].append(rtnl.link_del(data_ifindex(link_id)))
            labels[end].append(f"delete {data_ifname(link_id)}")
        for node, batch in messages.items():
            self.nodes[node].send(batch, labels[node])
        forgotten = []
        for link_id in link_ids:
            link = self.links.pop(link_id)
            for node in self._local_ends(link.spec, (link.spec.a, link.spec.b)):
                forgotten.append((self.nodes[node].label, data_ifname(link_id)))
        if self.delayline is not None:
            self.delayline.forget_links(forgotten)

    def _local_ends(self, link: LinkSpec, ends: Sequence[str]) -> list[str]:
        """Those of `ends` that are nodes here (both, unless `link` tunnels)."""
        if link.tunnel is None:
            return list(ends)
        return [node for node in ends if node in self.nodes]

    def _vxlan_message(self, link: LinkSpec, name: str, index: int) -> bytes:
        tunnel = link.tunnel
        assert tunnel is not None
        ends = [node for node in (link.a, link.b) if node in self.nodes]
        if len(ends) != 1:
            raise EmulationError(
                f"link {link.a}-{link.b} is a cross-host tunnel but {len(ends)} of "
                "its ends are nodes of this host; exactly one must be"
            )
        return rtnl.vxlan_add(
            name,
            index,
            self.nodes[ends[0]].fd,
            tunnel.vni,
            int(tunnel.local),
            int(tunnel.remote),
            tunnel.port,
            tunnel.mtu,
        )

    def _link(self, link_id: int) -> _Link:
        try:
            return self.links[link_id]
        except KeyError:
            raise EmulationError(f"no link with id {link_id}") from None

    # --- routes ----------------------------------------------------------

    def apply_routes(self, node: str, routes: RouteBatch) -> None:
        if not len(routes):
            return
        namespace = self._node(node)
        via = np.asarray(routes.via, np.uint32)
        oif = np.where(via == 0, 0, data_ifindex(0) + np.asarray(routes.link_id))
        records = rtnl.route_records(
            routes.dest, via, oif.astype(np.uint32), self.node_address[node]
        )
        failures = namespace.send_records(records)
        # A route through a link that went down was flushed by the kernel
        # already; deleting it again is not an error.
        bad = [
            f for f in failures if not (via[f.index] == 0 and f.errno == errno.ESRCH)
        ]
        if bad:
            shown = "; ".join(
                f"to {ipaddress.IPv4Address(int(routes.dest[f.index]))} via "
                f"{ipaddress.IPv4Address(int(via[f.index]))}: {f.describe()}"
                for f in bad[:5]
            )
            raise EmulationError(
                f"{node}: the kernel refused {len(bad)} of {len(routes)} route "
                f"changes: {shown}"
            )

    # --- counters ------------------------------------------------------

    def link_bytes(self, node: str) -> dict[int, tuple[int, int, int, int]]:
        """Data-plane link id -> (rx, tx, rx dropped, tx dropped) at `node`."""
        stats = self._node(node).channel.link_stats()
        base = data_ifindex(0)
        return {index - base: c for index, c in stats.items() if index >= base}

    # --- teardown --------------------------------------------------------

    def teardown(self) -> None:
        """Kill what runs in our namespaces, then remove namespaces and links.

        Carries on past errors (each is logged) so one failure does not
        leave the rest behind; raises the first at the end.
        """
        errors: list[BaseException] = []
        started = time.monotonic()
        inodes = {}
        for namespace in self.nodes.values():
            try:
                inodes[os.stat(namespace.path).st_ino] = namespace.label
            except OSError:
                pass
        _kill_processes_in(inodes)

        # Tunnel ends hold a UDP socket in the root namespace until the
        # kernel frees their node's namespace; delete them now, so none
        # outlives down().
        tunnels: dict[str, list[bytes]] = defaultdict(list)
        for link_id, link in self.links.items():
            if link.spec.tunnel is not None:
                for node in self._local_ends(link.spec, (link.spec.a, link.spec.b)):
                    tunnels[node].append(rtnl.link_del(data_ifindex(link_id)))
        for node, batch in tunnels.items():
            for failure in self.nodes[node].channel.transact(batch):
                if failure.errno not in (errno.ENODEV, errno.ENOENT):
                    errors.append(EmulationError(f"{node}: {failure.describe()}"))

        for name, namespace in list(self.nodes.items()):
            try:
                self._discard_node(name, namespace)
            except Exception as exc:  # keep tearing down the others
                log.error("removing node %s: %s", name, exc)
                errors.append(exc)
            del self.nodes[name]
        self.links.clear()

        if self.delayline is not None:
            try:
                self.delayline.stop()
            except Exception as exc:
                log.error("stopping the delay line: %s", exc)
                errors.append(exc)
            self.delayline = None

        if self.root is not None:
            # The root ends of the management veths vanish with their
            # namespaces, but only once the kernel frees those; delete them
            # now so no smoe link outlives down().
            doomed = [rtnl.link_del(name=p) for p in self._mgmt_ports]
            doomed += [rtnl.link_del(index) for _, index in self._bridges]
            failures = self.root.channel.transact(doomed)
            for failure in failures:
                if failure.errno not in (errno.ENODEV, errno.ENOENT):
                    errors.append(EmulationError(f"root links: {failure.describe()}"))
            self._mgmt_ports.clear()
            self._bridges.clear()
            self.bridge_index = None
            self.root.close()
            self.root = None
        log.info("substrate torn down in %.1f s", time.monotonic() - started)
        if errors:
            raise errors[0]


class NamespaceSubstrate(KernelSubstrate):
    """Each node is a named network namespace ``smoe-<node>`` made here."""

    def _open_node(self, name: str) -> Namespace:
        label = namespace_name(name)
        return open_named(label, create_named(label))

    def _discard_node(self, name: str, namespace: Namespace) -> None:
        namespace.close()
        remove_named(namespace.label)


def open_named(label: str, path: Path) -> Namespace:
    """Open the namespace just named `label` at `path`; unname it on failure."""
    try:
        return Namespace(path, label)
    except BaseException:
        remove_named(label)
        raise


def ensure_neighbour_capacity(entries: int) -> None:
    """Raise the host's ARP table thresholds to hold `entries` neighbours.

    The IPv4 neighbour table is one for all namespaces, and its default
    hard limit (gc_thresh3 = 1024) is below what a few hundred nodes use;
    beyond it the kernel drops packets ("neighbour table overflow"). Only
    ever raised, and left raised: other users of the host lose nothing.
    """
    base = Path("/proc/sys/net/ipv4/neigh/default")
    wanted = {
        "gc_thresh1": entries,
        "gc_thresh2": 2 * entries,
        "gc_thresh3": 4 * entries,
    }
    if not base.exists():
        # Only the initial namespace has these knobs (they are host-wide);
        # inside a container there is nothing to raise.
        log.debug("no %s here; neighbour thresholds left to the host", base)
        return
    for key, value in wanted.items():
        path = base / key
        current = int(path.read_text())
        if current < value:
            path.write_text(str(value))
            log.info(
                "raised net.ipv4.neigh.default.%s from %d to %d", key, current, value
            )


def _ifindex(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise EmulationError(
            f"interface {name!r} vanished right after creation"
        ) from None


def _disable_ipv6_root(ifname: str) -> None:
    path = Path(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6")
    if path.exists():
        path.write_text("1")


def _raise_fd_limit() -> None:
    """Each node holds two descriptors (namespace and netlink socket)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _kill_processes_in(inodes: dict[int, str], grace_s: float = 3.0) -> list[int]:
    """Stop every process whose network namespace is one of `inodes`.

    This is what `ip netns pids` finds: the namespace file's inode against
    each process's /proc/PID/ns/net. TERM first, KILL after `grace_s`.
    """
    victims = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            inode = os.stat(f"/proc/{entry}/ns/net").st_ino
        except OSError:
            continue
        if inode in inodes:
            victims.append(int(entry))
            log.info("stopping process %s left in %s", entry, inodes[inode])
    for pid in victims:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    alive = list(victims)
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [pid for pid in alive if _exists(pid)]
    for pid in alive:
        log.warning("process %d ignored SIGTERM; killing it", pid)
        _signal(pid, signal.SIGKILL)
    return victims


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False
