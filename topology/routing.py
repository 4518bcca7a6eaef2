"""Delay-weighted shortest-path routes over the links that are up.

:class:`Router` keeps one next hop per (node, destination) pair, computed
centrally (as Celestial and xeoverse do, rather than running a routing
daemon per satellite): Dijkstra from `scipy.sparse.csgraph` over the up
links, weighted by propagation delay. The graph is undirected, so the tree
rooted at destination d gives every node's next hop towards d:
``next_hop[s, d] = predecessors[d, s]``.

Hysteresis keeps routes from flapping between near-equal paths: node s
keeps its current next hop h towards d while the link s-h is still up and

    delay(s, h) + dist(h, d) <= best + max(fraction * best, hysteresis_s)
    and dist(h, d) < dist(s, d)

where best = dist(s, d). The second condition is the feasibility condition
of DUAL (EIGRP): every next hop is strictly closer to the destination than
the node itself, so following next hops can never loop, whatever mix of
kept and fresh routes the nodes hold. The path actually used may be longer
than `dist_s` by at most the hysteresis margin per hop.

Two things keep the cost down at thousands of nodes (all-pairs Dijkstra is
O(N E log N), ~0.2-0.4 s at 1,584 satellites on one core):

- Leaves (nodes with one link to a node that has several: ground stations
  with their single GSL) are taken out of the Dijkstra graph. A leaf's
  routes all go to its anchor, and routes towards a leaf follow the routes
  towards its anchor; both are filled in from the anchor's. So a GSL
  handover never forces a new shortest-path computation.
- ``refresh_steps = k > 1`` recomputes only about 1/k of the destination
  trees per update, round-robin, plus every tree that a topology change
  touches: a tree that forwards over a link that went down, a tree to
  which a new link offers a shorter path, the tree of a node that stopped
  being a leaf. Topology changes therefore take effect in the same update;
  only slow delay drift is seen up to k updates late, and `dist_s` columns
  may be that old. k = 1 (the default) recomputes everything every update.
"""

from __future__ import annotations

import logging
import math
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

    ``next_hop[s, d]`` is the neighbour of s towards d (-1 when d is
    unreachable or s == d) and ``dist_s[s, d]`` the shortest delay; both
    are dense (N, N) arrays (int32 and float64: ~30 MB at 1,590 nodes).
    `refresh_steps` trades freshness against cost, see the module notes;
    `trees_computed` tells how many Dijkstra trees the last update ran.
    """

    def __init__(
        self,
        n_nodes: int,
        hysteresis_fraction: float,
        hysteresis_s: float,
        refresh_steps: int = 1,
    ) -> None:
        if n_nodes < 1:
            raise ConfigError(f"router: n_nodes must be at least 1, got {n_nodes}")
        if hysteresis_fraction < 0 or hysteresis_s < 0:
            raise ConfigError(
                "router: hysteresis must not be negative, got fraction "
                f"{hysteresis_fraction} and {hysteresis_s} s"
            )
        if refresh_steps < 1:
            raise ConfigError(
                f"router: refresh_steps must be at least 1, got {refresh_steps}; "
                "use 1 to recompute every route at every update"
            )
        self.n_nodes = n_nodes
        self.hysteresis_fraction = hysteresis_fraction
        self.hysteresis_s = hysteresis_s
        self.refresh_steps = refresh_steps
        self.next_hop = np.full((n_nodes, n_nodes), -1, dtype=np.int32)
        self.dist_s = np.full((n_nodes, n_nodes), np.inf)
        np.fill_diagonal(self.dist_s, 0.0)
        # Number of destination trees recomputed by the last update.
        self.trees_computed = 0

        # Dense delay of every up link (inf elsewhere), kept between updates
        # and patched rather than reallocated.
        self._link_delay_s = np.full((n_nodes, n_nodes), np.inf)
        self._up_a = np.zeros(0, dtype=np.int64)
        self._up_b = np.zeros(0, dtype=np.int64)
        self._leaf = np.zeros(n_nodes, dtype=bool)
        self._cursor = 0
        self._first = True

    def update(self, links: LinkState) -> RouteChanges:
        """Recompute routes for this step's links; return only what changed."""
        a, b, delay = self._up_links(links)
        old_a, old_b = self._up_a, self._up_b
        self._patch_delays(a, b, delay)

        leaf, anchor, degree = self._leaves(a, b)
        core = ~leaf[a] & ~leaf[b]
        cols = self._columns_to_refresh(
            a, b, a[core], b[core], delay[core], old_a, old_b, leaf, degree
        )
        # A full refresh replaces the arrays; a partial one edits them.
        everything = len(cols) == self.n_nodes
        previous_hop = self.next_hop if everything else self.next_hop.copy()
        self._refresh_columns(cols, a[core], b[core], delay[core], leaf, anchor)
        self._fill_leaves(leaf, anchor)
        self._leaf = leaf

        # A node without links reaches nothing and nothing reaches it; said
        # here so that columns not recomputed this update cannot lag.
        alone = np.flatnonzero(degree == 0)
        if len(alone):
            self.next_hop[alone, :] = -1
            self.next_hop[:, alone] = -1
            self.dist_s[alone, :] = np.inf
            self.dist_s[:, alone] = np.inf
            self.dist_s[alone, alone] = 0.0

        node, dest = np.nonzero(self.next_hop != previous_hop)
        changes = RouteChanges(
            node.astype(np.int32),
            dest.astype(np.int32),
            self.next_hop[node, dest].astype(np.int32),
        )
        log.debug(
            "routes: %d changes, %d trees recomputed, %d up links",
            len(changes),
            self.trees_computed,
            len(a),
        )
        return changes

    def _up_links(self, links: LinkState) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = self.n_nodes
        up = np.asarray(links.up, dtype=bool)
        a = np.asarray(links.a[up], dtype=np.int64)
        b = np.asarray(links.b[up], dtype=np.int64)
        delay = np.asarray(links.delay_s[up], dtype=float)
        if len(a) and (min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= n):
            raise ConfigError(
                f"router: a link names node {max(a.max(), b.max())} but the router "
                f"was built for {n} nodes; build it with the constellation's size"
            )
        if np.any(delay <= 0):
            raise ConfigError(
                "router: link delays must be positive (a zero-length link?)"
            )
        keys = np.minimum(a, b) * n + np.maximum(a, b)
        if len(np.unique(keys)) != len(keys):
            raise ConfigError(
                "router: the same node pair appears twice among the up links; "
                "a link's identity is its pair (a, b)"
            )
        return a, b, delay

    def _patch_delays(self, a: np.ndarray, b: np.ndarray, delay: np.ndarray) -> None:
        w = self._link_delay_s
        w[self._up_a, self._up_b] = np.inf
        w[self._up_b, self._up_a] = np.inf
        w[a, b] = delay
        w[b, a] = delay
        self._up_a, self._up_b = a, b

    def _leaves(
        self, a: np.ndarray, b: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Leaves (one link, to a node with several), their anchors, degrees."""
        n = self.n_nodes
        degree = np.bincount(np.concatenate([a, b]), minlength=n)
        anchor = np.full(n, -1, dtype=np.int64)
        anchor[a[degree[a] == 1]] = b[degree[a] == 1]
        anchor[b[degree[b] == 1]] = a[degree[b] == 1]
        leaf = (degree == 1) & (degree[np.maximum(anchor, 0)] >= 2)
        anchor[~leaf] = -1
        return leaf, anchor, degree

    def _columns_to_refresh(
        self,
        up_a: np.ndarray,
        up_b: np.ndarray,
        a: np.ndarray,
        b: np.ndarray,
        delay: np.ndarray,
        old_a: np.ndarray,
        old_b: np.ndarray,
        leaf: np.ndarray,
        degree: np.ndarray,
    ) -> np.ndarray:
        """Destination trees to recompute: core nodes, see the module notes.

        `up_a`, `up_b` are all up links; `a`, `b`, `delay` the core ones.
        Returns every node index when everything is to be recomputed.
        """
        n = self.n_nodes
        if self.refresh_steps == 1 or self._first:
            self._first = False
            return np.arange(n)
        force = np.zeros(n, dtype=bool)
        hop = self.next_hop
        dist = self.dist_s
        was_leaf = self._leaf

        # Links gone since the last update: trees that forwarded over them.
        # A node that was a leaf carried no transit traffic; its own row is
        # rebuilt if it is still a leaf and cleared if it has no links left.
        # If it has gained other links and lost its anchor (rare), its whole
        # row is stale: recompute everything.
        old_keys = old_a * n + old_b
        gone = ~np.isin(old_keys, up_a * n + up_b)
        for u, v in zip(old_a[gone], old_b[gone], strict=True):
            for x, y in ((u, v), (v, u)):
                if not was_leaf[x]:
                    force |= hop[x] == y
                elif not leaf[x] and degree[x] > 0:
                    return np.arange(n)

        # New core links: trees to which they offer a shorter path. A link
        # that shortens neither endpoint's distance shortens no path at all.
        fresh = ~np.isin(a * n + b, old_keys)
        for u, v, w in zip(a[fresh], b[fresh], delay[fresh], strict=True):
            force |= (w + dist[v] < dist[u]) | (w + dist[u] < dist[v])

        # Nodes that stopped being leaves had their columns copied from an
        # anchor; give them trees of their own.
        force |= was_leaf & ~leaf

        core_nodes = np.flatnonzero(~leaf)
        quota = math.ceil(len(core_nodes) / self.refresh_steps)
        start = self._cursor % max(len(core_nodes), 1)
        force[np.roll(core_nodes, -start)[:quota]] = True
        self._cursor = start + quota
        force &= ~leaf
        return np.flatnonzero(force)

    def _refresh_columns(
        self,
        cols: np.ndarray,
        a: np.ndarray,
        b: np.ndarray,
        delay: np.ndarray,
        leaf: np.ndarray,
        anchor: np.ndarray,
    ) -> None:
        """Shortest paths towards `cols` over the core graph, with hysteresis."""
        n = self.n_nodes
        every = len(cols) == n
        self.trees_computed = int((~leaf).sum()) if every else len(cols)
        if not len(cols):
            return
        # Leaves have no links in this graph: their trees cost nothing, and
        # their rows and columns are filled in from their anchors.
        graph = csr_matrix((delay, (a, b)), shape=(n, n))
        dist_rows, pred_rows = dijkstra(
            graph,
            directed=False,
            indices=None if every else cols,
            return_predecessors=True,
        )
        # Row k of the Dijkstra output is the tree rooted at column k;
        # transposed, column k holds every node's distance and next hop to
        # it. All-pairs distances are symmetric and need no transposing.
        dist = dist_rows if every else np.ascontiguousarray(dist_rows.T)
        best = pred_rows.T.astype(np.int32)
        best[best < 0] = -1

        # Leaves are outside the Dijkstra graph: they reach everything
        # through their anchor.
        lv = np.flatnonzero(leaf)
        if len(lv):
            via = anchor[lv]
            dist[lv] = self._link_delay_s[lv, via][:, None] + dist[via]
            best[lv] = np.where(np.isfinite(dist[lv]), via[:, None], -1)

        old = self.next_hop if every else self.next_hop[:, cols]
        new = self._with_hysteresis(old, best, dist)
        if every:
            self.next_hop, self.dist_s = new, dist
        else:
            self.next_hop[:, cols] = new
            self.dist_s[:, cols] = dist

    def _fill_leaves(self, leaf: np.ndarray, anchor: np.ndarray) -> None:
        """Leaf rows in every column, then leaf columns from their anchors."""
        lv = np.flatnonzero(leaf)
        if not len(lv):
            return
        via = anchor[lv]
        w = self._link_delay_s[lv, via]
        dist = self.dist_s
        hop = self.next_hop
        dist[lv] = w[:, None] + dist[via]
        hop[lv] = np.where(np.isfinite(dist[lv]), via[:, None], -1).astype(np.int32)

        dist[:, lv] = dist[:, via] + w[None, :]
        hop[:, lv] = hop[:, via]
        hop[via, lv] = lv
        hop[lv, lv] = -1
        dist[lv, lv] = 0.0

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
