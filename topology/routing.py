"""Delay-weighted shortest-path routes over the links that are up.

:class:`Router` keeps one next hop per (node, destination) pair, computed
centrally (as Celestial and xeoverse do, rather than running a routing
daemon per satellite): all-pairs Dijkstra from `scipy.sparse.csgraph` over
the up links, weighted by propagation delay. The graph is undirected, so
the tree rooted at destination d gives every node's next hop towards d:
``next_hop[s, d] = predecessors[d, s]``.

Hysteresis keeps routes from flapping between near-equal paths: node s
keeps its current next hop h towards d while the link s-h is still up and

    delay(s, h) + dist(h, d) <= best + max(fraction * best, hysteresis_s)
    and dist(h, d) < dist(s, d)

where best = dist(s, d). The second condition is the feasibility condition
of DUAL (EIGRP): every next hop is strictly closer to the destination than
the node itself, so following next hops can never loop, whatever mix of
kept and fresh routes the nodes hold. `dist_s` is always the true shortest
delay; the path actually used may be longer by at most the hysteresis
margin per hop.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import dijkstra

from topology.errors import ConfigError, SpaceMoeError
from topology.links import LinkState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouteChanges:
    """Routes that changed in one update: node's route to dest now via next_hop.

    ``next_hop == -1`` means the destination became unreachable: delete
    the route.
    """

    node: np.ndarray  # int32
    dest: np.ndarray  # int32
    next_hop: np.ndarray  # int32

    def __len__(self) -> int:
        return len(self.node)


class Router:
    """Next hops for every node pair, updated from each step's links.

    `destinations` limits the work to routes towards those nodes (every
    node can still reach them); columns of other destinations stay -1 and
    inf. All-pairs Dijkstra costs O(N E log N): ~0.2 s at 1,584 satellites
    on one core, so an emulator that only carries traffic to a few nodes
    can save most of it.
    """

    def __init__(
        self,
        n_nodes: int,
        hysteresis_fraction: float,
        hysteresis_s: float,
        destinations: Sequence[int] | None = None,
    ) -> None:
        if n_nodes < 1:
            raise ConfigError(f"router: n_nodes must be at least 1, got {n_nodes}")
        if hysteresis_fraction < 0 or hysteresis_s < 0:
            raise ConfigError(
                "router: hysteresis must not be negative, got fraction "
                f"{hysteresis_fraction} and {hysteresis_s} s"
            )
        self.n_nodes = n_nodes
        self.destinations = self._check_destinations(n_nodes, destinations)
        self.hysteresis_fraction = hysteresis_fraction
        self.hysteresis_s = hysteresis_s
        self.next_hop = np.full((n_nodes, n_nodes), -1, dtype=np.int32)
        self.dist_s = np.full((n_nodes, n_nodes), np.inf)
        np.fill_diagonal(self.dist_s, 0.0)
        # Dense delay of every up link (inf elsewhere), kept between updates
        # and patched rather than reallocated.
        self._link_delay_s = np.full((n_nodes, n_nodes), np.inf)
        self._up_a = np.zeros(0, dtype=np.int64)
        self._up_b = np.zeros(0, dtype=np.int64)

    def update(self, links: LinkState) -> RouteChanges:
        """Recompute routes for this step's links; return only what changed."""
        n = self.n_nodes
        up = np.asarray(links.up, dtype=bool)
        a = np.asarray(links.a[up], dtype=np.int64)
        b = np.asarray(links.b[up], dtype=np.int64)
        delay = np.asarray(links.delay_s[up], dtype=float)
        if len(a) and (a.max() >= n or b.max() >= n or a.min() < 0 or b.min() < 0):
            raise ConfigError(
                f"router: a link names node {max(a.max(), b.max())} but the router "
                f"was built for {n} nodes; build it with the constellation's size"
            )
        if np.any(delay <= 0):
            raise ConfigError(
                "router: link delays must be positive (a zero-length link?)"
            )

        self._link_delay_s[self._up_a, self._up_b] = np.inf
        self._link_delay_s[self._up_b, self._up_a] = np.inf
        self._link_delay_s[a, b] = delay
        self._link_delay_s[b, a] = delay
        self._up_a, self._up_b = a, b

        graph = csr_matrix((delay, (a, b)), shape=(n, n))
        dest = self.destinations
        if dest is None:
            cols: slice | np.ndarray = slice(None)
            dist_rows, pred_rows = dijkstra(
                graph, directed=False, return_predecessors=True
            )
        else:
            cols = dest
            dist_rows, pred_rows = dijkstra(
                graph, directed=False, indices=dest, return_predecessors=True
            )
        # Row k of the Dijkstra output is the tree rooted at destination k;
        # transposed, column k holds every node's distance and next hop to it.
        # All-pairs distances are symmetric, so they need no transposing.
        dist = dist_rows if dest is None else dist_rows.T
        best = pred_rows.T.astype(np.int32)
        best[best < 0] = -1

        old = self.next_hop[:, cols]
        new = self._with_hysteresis(old, best, dist)
        node, col = np.nonzero(new != old)
        dest_index = col if dest is None else dest[col]
        changes = RouteChanges(
            node.astype(np.int32), dest_index.astype(np.int32), new[node, col]
        )
        if dest is None:
            self.next_hop, self.dist_s = new, dist
        else:
            self.next_hop[:, cols] = new
            self.dist_s[:, cols] = dist
        log.debug("routes: %d changes over %d up links", len(changes), len(a))
        return changes

    def _with_hysteresis(
        self, old: np.ndarray, best: np.ndarray, dist: np.ndarray
    ) -> np.ndarray:
        """Best next hops, except where the old one is still good enough.

        All arrays are (nodes, destination columns); `dist` column k holds
        every node's shortest delay to destination column k.
        """
        s, k = np.nonzero((old >= 0) & (best >= 0) & (old != best))
        if not len(s):
            return best
        h = old[s, k].astype(np.int64)
        shortest = dist[s, k]
        via_h = dist[h, k]
        cost = self._link_delay_s[s, h] + via_h
        margin = np.maximum(self.hysteresis_fraction * shortest, self.hysteresis_s)
        keep = np.isfinite(cost) & (via_h < shortest) & (cost <= shortest + margin)
        best[s[keep], k[keep]] = h[keep]
        return best

    @staticmethod
    def _check_destinations(
        n_nodes: int, destinations: Sequence[int] | None
    ) -> np.ndarray | None:
        if destinations is None:
            return None
        dest = np.unique(np.asarray(list(destinations), dtype=np.int64))
        if not len(dest) or dest[0] < 0 or dest[-1] >= n_nodes:
            raise ConfigError(
                f"router: destinations must be node indices in 0..{n_nodes - 1}, "
                f"got {list(destinations)[:10]}"
            )
        return dest

    def path(self, src: int, dst: int) -> list[int]:
        """Nodes from `src` to `dst` along the current next hops; [] if none."""
        if src == dst:
            return [src]
        hops = [src]
        node = src
        while node != dst:
            node = int(self.next_hop[node, dst])
            if node < 0:
                return []
            hops.append(node)
            if len(hops) > self.n_nodes:
                raise SpaceMoeError(f"routing loop from {src} to {dst}: {hops[:20]}")
        return hops

    def path_delay_s(self, src: int, dst: int) -> float:
        """Delay of the path actually used (may exceed dist_s by hysteresis)."""
        hops = self.path(src, dst)
        if not hops:
            return float("inf")
        return float(
            sum(self._link_delay_s[u, v] for u, v in zip(hops, hops[1:], strict=False))
        )
