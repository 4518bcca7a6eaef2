"""One scenario spread over several hosts: who runs which node, and tunnels.

With ``emulation.partitions`` listing the underlay IPv4 address of each
host, every host runs ``spacemoe up --partition I`` on the same scenario
file. Geometry and routing are deterministic, so every host computes the
same links and the same routes for all nodes; each one only builds its own
share:

- **ownership** (:func:`assign_nodes`): satellites go to hosts in
  contiguous blocks of whole orbital planes (plane-major order, so only the
  ISLs between two blocks, and ground links, cross hosts); TLE satellites,
  whose planes are unknown, in contiguous blocks of their index. Ground
  station i goes to ``ground_stations[i].partition``, or else host
  ``i mod hosts``.
- **link ids** (:func:`fixed_link_ids`): both hosts of a crossing link must
  give it the same /31, interface name and VXLAN id without talking to each
  other, so ids come from the link's identity instead of the order links
  appeared in: ISL id = its index among the +Grid candidates; the ground
  link of station g to satellite s = candidates + g * satellites + s.
- **tunnels** (:class:`Tunnel`): a link with one local end becomes a VXLAN
  device ``d<k>`` in that node (VNI ``VNI_BASE + k``, UDP port
  ``emulation.vxlan_port``, unicast to the other host), shaped and delayed
  exactly as a veth end. Links with no local end are not built.

Caveat: hosts agree only while they step through the same scenario times.
Sticky handover and route hysteresis remember the past, so a host that
skips a step (late, see :meth:`topology.emulator.Emulator.run`) may pick
another satellite or route than its peers until the next handover.
"""

from __future__ import annotations

import ipaddress

import numpy as np

from topology.errors import ConfigError
from topology.links import GSL
from topology.orbits import Constellation
from topology.scenario import Scenario
from topology.substrate import Tunnel

# VNIs below this are left to whatever else the underlay carries.
VNI_BASE = 4096
VNI_MAX = (1 << 24) - 1
# The data plane keeps a 1,500-byte MTU on every link; the underlay then
# carries 1,550-byte packets (VXLAN adds 50), fragmenting them if its own
# MTU is smaller. Give the underlay an MTU of at least 1,550 for speed.
TUNNEL_MTU = 1500


def assign_nodes(constellation: Constellation, scenario: Scenario) -> np.ndarray:
    """The host index of every node (satellites first, then stations)."""
    hosts = max(len(scenario.emulation.partitions), 1)
    n_sats = constellation.n_sats
    owner = np.zeros(constellation.n_nodes, np.int32)
    if hosts == 1:
        return owner

    # Whole planes, numbered across shells in node order; satellites
    # without a plane (TLE) count as one-satellite "planes" of their own.
    plane = constellation.plane[:n_sats].astype(np.int64)
    shell = constellation.shell[:n_sats].astype(np.int64)
    key = np.where(plane >= 0, shell * 1_000_000 + plane, -1 - np.arange(n_sats))
    _, first, group = np.unique(key, return_index=True, return_inverse=True)
    # Number groups in the order they first appear, so blocks follow node order.
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    group = rank[group]
    owner[:n_sats] = group * hosts // max(len(first), 1)

    for g, station in enumerate(scenario.ground_stations):
        owner[n_sats + g] = (
            station.partition if station.partition is not None else g % hosts
        )
    return owner


def fixed_link_ids(
    a: np.ndarray,
    b: np.ndarray,
    kind: np.ndarray,
    rows: np.ndarray,
    n_isl: int,
    n_sats: int,
) -> np.ndarray:
    """Link ids from identity (see the module docstring), for links[rows].

    ISL rows are the candidates in order, so an ISL's row is its index.
    """
    rows = np.asarray(rows, np.int64)
    gsl = kind[rows] == GSL
    station = b[rows].astype(np.int64) - n_sats
    satellite = a[rows].astype(np.int64)
    return np.where(gsl, n_isl + station * n_sats + satellite, rows).astype(np.int32)


def max_fixed_link_id(n_isl: int, n_sats: int, n_ground: int) -> int:
    """One above the largest id :func:`fixed_link_ids` can give."""
    return n_isl + n_ground * n_sats


class Partitioning:
    """This host's share of a partitioned scenario."""

    def __init__(
        self, scenario: Scenario, constellation: Constellation, index: int | None
    ) -> None:
        config = scenario.emulation
        self.hosts = [ipaddress.IPv4Address(h) for h in config.partitions]
        self.index = config.partition_index if index is None else index
        count = max(len(self.hosts), 1)
        if not 0 <= self.index < count:
            raise ConfigError(
                f"partition index {self.index} is out of range: the scenario lists "
                f"{len(self.hosts)} hosts in emulation.partitions; use 0 to "
                f"{count - 1}"
            )
        self.port = config.vxlan_port
        self.owner = assign_nodes(constellation, scenario)
        self.local = self.owner == self.index

    @property
    def enabled(self) -> bool:
        """Whether the scenario is spread over more than one host."""
        return len(self.hosts) > 1

    def tunnel(self, link_id: int, a: int, b: int) -> Tunnel | None:
        """The VXLAN of link `link_id` (a-b) if exactly one end is here."""
        if self.local[a] == self.local[b]:
            return None
        remote = int(self.owner[b] if self.local[a] else self.owner[a])
        vni = VNI_BASE + link_id
        if vni > VNI_MAX:
            raise ConfigError(
                f"link id {link_id} gives VXLAN id {vni}, above the 24-bit limit "
                f"{VNI_MAX}; use fewer ground stations or satellites per partition"
            )
        return Tunnel(
            vni, self.hosts[self.index], self.hosts[remote], self.port, TUNNEL_MTU
        )
