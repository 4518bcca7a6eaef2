"""Shortest-path routing, hysteresis and loop freedom."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import floyd_warshall

from topology.config import from_dict
from topology.errors import ConfigError
from topology.links import Geometry, LinkState
from topology.routing import Router
from topology.scenario import Scenario


def links(
    edges: list[tuple[int, int, float]], up: list[bool] | None = None
) -> LinkState:
    n = len(edges)
    a = np.array([min(e[0], e[1]) for e in edges], dtype=np.int32)
    b = np.array([max(e[0], e[1]) for e in edges], dtype=np.int32)
    delay = np.array([e[2] for e in edges], dtype=float)
    return LinkState(
        a=a,
        b=b,
        kind=np.zeros(n, np.int8),
        up=np.array(up if up is not None else [True] * n),
        range_km=delay * 299792.458,
        delay_s=delay,
        rate_bps=np.full(n, 1e8),
        loss_fraction=np.zeros(n),
    )


def test_line_graph_next_hops_and_paths() -> None:
    router = Router(4, 0.0, 0.0)
    changes = router.update(links([(0, 1, 0.001), (1, 2, 0.002), (2, 3, 0.003)]))
    assert len(changes) == 12  # every ordered pair is new
    assert router.path(0, 3) == [0, 1, 2, 3]
    assert router.path(3, 0) == [3, 2, 1, 0]
    assert router.next_hop[0, 3] == 1 and router.next_hop[3, 0] == 2
    assert router.dist_s[0, 3] == pytest.approx(0.006)
    assert router.next_hop[2, 2] == -1
    assert router.path_delay_s(0, 3) == pytest.approx(0.006)


def test_unreachable_is_minus_one() -> None:
    router = Router(4, 0.05, 2e-4)
    router.update(links([(0, 1, 0.001), (2, 3, 0.001)]))
    assert router.next_hop[0, 2] == -1 and router.next_hop[3, 1] == -1
    assert router.path(0, 3) == []
    assert np.isinf(router.dist_s[0, 3])


def test_second_identical_update_reports_nothing() -> None:
    router = Router(3, 0.05, 2e-4)
    edges = [(0, 1, 0.001), (1, 2, 0.001), (0, 2, 0.003)]
    router.update(links(edges))
    assert len(router.update(links(edges))) == 0


def square(left_s: float, right_s: float) -> LinkState:
    # 0 reaches 3 via 1 (left) or via 2 (right).
    return links([(0, 1, left_s), (1, 3, 0.010), (0, 2, right_s), (2, 3, 0.010)])


def test_hysteresis_prevents_flapping() -> None:
    wobble = [(0.0101, 0.0100), (0.0100, 0.0101)] * 5
    steady = Router(4, 0.05, 2e-4)
    flappy = Router(4, 0.0, 0.0)
    steady.update(square(0.0100, 0.0101))
    flappy.update(square(0.0100, 0.0101))
    assert steady.next_hop[0, 3] == flappy.next_hop[0, 3] == 1
    steady_changes = flappy_changes = 0
    for left, right in wobble:
        steady_changes += len(steady.update(square(left, right)))
        flappy_changes += len(flappy.update(square(left, right)))
    assert steady_changes == 0 and steady.next_hop[0, 3] == 1
    assert flappy_changes >= 10


def test_hysteresis_gives_way_to_a_clearly_better_path() -> None:
    router = Router(4, 0.05, 2e-4)
    router.update(square(0.010, 0.011))
    assert router.next_hop[0, 3] == 1
    router.update(square(0.015, 0.011))  # left now 25 % longer
    assert router.next_hop[0, 3] == 2


def test_link_down_changes_routes_within_one_update() -> None:
    router = Router(4, 0.5, 0.1)  # generous hysteresis must not keep a dead link
    router.update(square(0.010, 0.011))
    assert router.next_hop[0, 3] == 1
    down = square(0.010, 0.011)
    down = LinkState(**{**down.__dict__, "up": np.array([False, True, True, True])})
    changes = router.update(down)
    assert router.next_hop[0, 3] == 2 and router.next_hop[0, 1] == 2
    moved = {
        (int(n), int(d)): int(h)
        for n, d, h in zip(*changes.__dict__.values(), strict=True)
    }
    assert moved[(0, 3)] == 2 and moved[(1, 0)] == 3


def test_route_to_vanished_node_is_deleted() -> None:
    router = Router(3, 0.05, 2e-4)
    router.update(links([(0, 1, 0.001), (1, 2, 0.001)]))
    changes = router.update(links([(0, 1, 0.001), (1, 2, 0.001)], up=[True, False]))
    deleted = {
        (int(n), int(d))
        for n, d, h in zip(changes.node, changes.dest, changes.next_hop, strict=True)
        if h == -1
    }
    assert deleted == {(0, 2), (1, 2), (2, 0), (2, 1)}


def test_distances_match_floyd_warshall_on_a_constellation() -> None:
    scenario = from_dict(Scenario, {"shells": [{"kind": "walker-star"}]})
    state = Geometry(scenario).step(0.0)
    router = Router(66, 0.05, 2e-4)
    router.update(state.links)
    up = state.links.up
    graph = csr_matrix(
        (state.links.delay_s[up], (state.links.a[up], state.links.b[up])),
        shape=(66, 66),
    )
    reference = floyd_warshall(graph, directed=False)
    assert np.allclose(router.dist_s, reference)
    # Every next hop is a neighbour on a shortest path.
    for s, d in [(0, 40), (12, 65), (30, 3)]:
        h = router.next_hop[s, d]
        assert reference[s, h] + reference[h, d] == pytest.approx(reference[s, d])


@pytest.mark.parametrize("refresh_steps", [1, 3])
def test_no_loops_under_hysteresis_with_random_delays(refresh_steps: int) -> None:
    # Random jitter on a ring with chords keeps many near-equal paths alive;
    # the feasibility condition must keep every path loop-free.
    rng = np.random.default_rng(7)
    n = 30
    pairs = [(i, (i + 1) % n) for i in range(n)] + [(i, (i + 7) % n) for i in range(n)]
    router = Router(n, 0.5, 3e-3, refresh_steps=refresh_steps)
    plain = Router(n, 0.0, 0.0)
    kept = 0
    for _ in range(40):
        delay = rng.uniform(0.001, 0.002, len(pairs))
        up = list(rng.random(len(pairs)) > 0.1)
        state = links([(a, b, w) for (a, b), w in zip(pairs, delay, strict=True)], up)
        router.update(state)
        plain.update(state)
        kept += int((router.next_hop != plain.next_hop).sum())
        for s in range(n):
            for d in range(n):
                path = router.path(s, d)  # raises on a loop
                if s != d and np.isfinite(plain.dist_s[s, d]):
                    assert path[-1] == d
    assert kept > 100  # hysteresis really held routes that were not shortest


STATIONS = [
    {"name": "longyearbyen", "lat_deg": 78.23, "lon_deg": 15.41, "alt_m": 500},
    {"name": "tromso", "lat_deg": 69.66, "lon_deg": 18.94, "alt_m": 100},
    {"name": "inuvik", "lat_deg": 68.32, "lon_deg": -133.55, "alt_m": 90},
]


def busy_geometry() -> Geometry:
    # Polar cut-off and stations make links come and go every few steps.
    scenario = from_dict(
        Scenario,
        {
            "shells": [{"kind": "walker-star"}],
            "ground_stations": STATIONS,
            "isl": {"max_latitude_deg": 70.0},
            "gsl": {"handover": "nearest"},
        },
    )
    return Geometry(scenario)


def test_stations_as_leaves_match_floyd_warshall() -> None:
    geometry = busy_geometry()
    router = Router(69, 0.0, 0.0)
    for t_s in (0.0, 700.0, 1400.0):
        state = geometry.step(t_s)
        router.update(state.links)
        up = state.links.up
        graph = csr_matrix(
            (state.links.delay_s[up], (state.links.a[up], state.links.b[up])),
            shape=(69, 69),
        )
        reference = floyd_warshall(graph, directed=False)
        assert np.allclose(router.dist_s, reference)
        served = state.links.b[state.links.kind == 1]
        assert len(served) >= 1
        for g in served:
            for d in range(69):
                if d != g and np.isfinite(reference[g, d]):
                    path = router.path(int(g), d)
                    assert sum(
                        reference[u, v] for u, v in zip(path, path[1:], strict=False)
                    ) == pytest.approx(reference[g, d])
                    back = router.path(d, int(g))
                    assert back[-2] == router.path(int(g), d)[1]


def test_refresh_steps_keep_routes_valid_and_topology_changes_immediate() -> None:
    geometry = busy_geometry()
    exact = Router(69, 0.05, 2e-4)
    lazy = Router(69, 0.05, 2e-4, refresh_steps=6)
    computed = []
    for t_s in range(0, 3000, 10):
        state = geometry.step(float(t_s))
        exact.update(state.links)
        lazy.update(state.links)
        computed.append(lazy.trees_computed)
        # Reachability is never stale: same unreachable pairs as exact.
        assert np.array_equal(lazy.next_hop < 0, exact.next_hop < 0)
        # Every route uses up links only and reaches its destination.
        up = state.links.up
        usable = set(
            zip(state.links.a[up].tolist(), state.links.b[up].tolist(), strict=True)
        )
        hop = lazy.next_hop
        s, d = np.nonzero(hop >= 0)
        pairs = zip(
            np.minimum(s, hop[s, d]).tolist(),
            np.maximum(s, hop[s, d]).tolist(),
            strict=True,
        )
        assert all(p in usable for p in pairs)
        for src, dst in [(66, 67), (66, 68), (67, 68), (0, 40), (12, 66)]:
            path = lazy.path(src, dst)
            if path:
                assert (
                    lazy.path_delay_s(src, dst) <= exact.dist_s[src, dst] * 1.3 + 1e-3
                )
    assert np.median(computed[1:]) < 0.5 * 66


def test_rejects_bad_input() -> None:
    with pytest.raises(ConfigError):
        Router(0, 0.05, 2e-4)
    with pytest.raises(ConfigError, match="built for 2 nodes"):
        Router(2, 0.05, 2e-4).update(links([(0, 5, 0.001)]))
    with pytest.raises(ConfigError, match="refresh_steps"):
        Router(3, 0.05, 2e-4, refresh_steps=0)
