"""The address plan of an emulated constellation.

Three disjoint IPv4 prefixes from the scenario's ``emulation`` section:

- ``node_prefix``: node i (satellites first, then ground stations, the
  order of :attr:`Constellation.names`) owns the stable /32
  ``node_prefix + 1 + i``, on its loopback. Applications bind and talk to
  these; they are the only routed addresses, so they survive handovers
  and link changes.
- ``link_prefix``: link id k gets the /31 ``link_prefix + 2k``; its lower
  address sits on the end at the lower node index (``a``), the upper one
  on ``b``. Routes name the next hop by its address on the shared link.
- ``management_prefix``: the out-of-band management network. The root
  namespace's bridge ``smoe-mgmt`` holds the first address, node i holds
  ``management_prefix + 2 + i``. It carries only its own connected subnet:
  control traffic (Prometheus scrapes, the CLI, agents' set-up) never
  shares a path, a queue or a delay with the data plane.

Interface names inside a node: ``d<k>`` for data-plane link k (the same
name on both ends, in two namespaces), ``mgmt0`` for management. The delay
line recognises data-plane interfaces by the ``d`` prefix. Interface
indexes of data-plane links are fixed, ``IFINDEX_BASE + k``, so a route
names its output device without asking the kernel.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import numpy as np

from topology.errors import ConfigError
from topology.scenario import EmulationConfig

DATA_IFNAME_PREFIX = "d"
MGMT_IFNAME = "mgmt0"
IFINDEX_BASE = 100_000


def data_ifname(link_id: int) -> str:
    """Interface name of data-plane link `link_id` in both its nodes."""
    return f"{DATA_IFNAME_PREFIX}{link_id}"


def data_ifindex(link_id: int) -> int:
    """Interface index of data-plane link `link_id` in both its nodes."""
    return IFINDEX_BASE + link_id


@dataclass(frozen=True)
class AddressPlan:
    """Addresses of nodes, links and the management network."""

    node_network: ipaddress.IPv4Network
    link_network: ipaddress.IPv4Network
    management_network: ipaddress.IPv4Network
    n_nodes: int

    @classmethod
    def from_config(cls, config: EmulationConfig, n_nodes: int) -> AddressPlan:
        """Check the prefixes (valid, disjoint, big enough) and build the plan."""
        networks = {}
        for field_name in ("node_prefix", "link_prefix", "management_prefix"):
            text = getattr(config, field_name)
            try:
                networks[field_name] = ipaddress.IPv4Network(text)
            except ValueError as exc:
                raise ConfigError(
                    f"emulation.{field_name}: {text!r} is not an IPv4 prefix "
                    f"({exc}); write it like '198.18.0.0/17' with no host bits"
                ) from None
        names = list(networks)
        for i, first in enumerate(names):
            for second in names[i + 1 :]:
                if networks[first].overlaps(networks[second]):
                    raise ConfigError(
                        f"emulation.{first} {networks[first]} overlaps "
                        f"emulation.{second} {networks[second]}; give them "
                        "disjoint prefixes"
                    )
        plan = cls(
            networks["node_prefix"],
            networks["link_prefix"],
            networks["management_prefix"],
            n_nodes,
        )
        for field_name, network, needed in (
            ("node_prefix", plan.node_network, n_nodes + 2),
            ("management_prefix", plan.management_network, n_nodes + 3),
        ):
            if network.num_addresses < needed:
                raise ConfigError(
                    f"emulation.{field_name}: {network} has {network.num_addresses} "
                    f"addresses but {n_nodes} nodes need {needed}; use a shorter "
                    "prefix length"
                )
        return plan

    @property
    def max_links(self) -> int:
        """How many /31 link subnets the link prefix holds."""
        return self.link_network.num_addresses // 2

    def node_address(self, node: int) -> ipaddress.IPv4Address:
        """The stable /32 of node `node` (on its loopback)."""
        return self.node_network[1 + node]

    def node_addresses_u32(self) -> np.ndarray:
        """Every node's /32 as unsigned integers, by node index."""
        base = int(self.node_network.network_address) + 1
        return base + np.arange(self.n_nodes, dtype=np.uint32)

    def management_bridge_address(self) -> ipaddress.IPv4Address:
        """The root namespace's address on the management bridge."""
        return self.management_network[1]

    def management_address(self, node: int) -> ipaddress.IPv4Address:
        """Node `node`'s address on the management network."""
        return self.management_network[2 + node]

    def link_subnet(self, link_id: int) -> ipaddress.IPv4Network:
        """The /31 of link `link_id`."""
        if not 0 <= link_id < self.max_links:
            raise ConfigError(
                f"emulation.link_prefix: {self.link_network} holds {self.max_links} "
                f"links, link id {link_id} does not fit; use a shorter prefix length"
            )
        base = int(self.link_network.network_address) + 2 * link_id
        return ipaddress.IPv4Network((base, 31))

    def link_addresses_u32(self, link_ids: np.ndarray, upper: np.ndarray) -> np.ndarray:
        """Address of each link's end: the b end where `upper`, else the a end."""
        base = int(self.link_network.network_address)
        return (base + 2 * np.asarray(link_ids, np.int64) + upper).astype(np.uint32)
