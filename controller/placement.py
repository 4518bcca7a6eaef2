"""Which nodes hold which experts.

A placement maps every (layer, expert) to an ordered list of nodes holding
a replica; the inference path tries them in order. A policy makes one from
the experts to place, the candidate nodes, and a :class:`PlacementContext`
describing the network as seen from home at one instant (path delays now;
battery, temperature and load later), so satellite-aware policies plug in
without changing callers::

    policy = make_policy("round-robin", k=8)
    placement = policy.place(experts, candidates, context)

Policies here:

ground       every expert at home. The static ground baseline: home runs a
             broker and an agent like a satellite and the controller reaches
             them over the same MQTT wire path on its own data-plane
             address, so the baseline pays the same serialisation and broker
             costs and differs only by the network.
round-robin  experts dealt in turn over the K satellites nearest home by
             current path delay (optionally with R replicas each, on the
             next nodes of the ring).
aware        satellite-aware: the K satellites with the smallest path delay
             from home averaged over the coming orbit (a satellite that is
             nearest now but about to pass out of reach ranks low), leaving
             out those whose battery is low or whose compute module is
             already hot; the most used experts go to the best of them.

The orbits are deterministic, so `forecast_delays_s` works out the delays
ahead from the scenario's own geometry, without touching the network.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from topology.errors import ConfigError

ExpertKey = tuple[int, int]
Placement = dict[ExpertKey, list[str]]


@dataclass(frozen=True)
class PlacementContext:
    """What a policy may know about the network when it decides.

    `path_delay_s` is the one-way propagation delay from home along the
    current route to each reachable node (a node absent from it is not
    reachable now). `node_state` carries per-node figures such as
    ``soc_fraction`` or ``temperature_c`` once the power model provides
    them; `expert_load` the expected tokens per (layer, expert).
    `delay_ahead_s` holds, per node, the one-way delay from home at the
    forecast times (the first is now; ``inf`` where the node will be out
    of reach), as :func:`forecast_delays_s` makes it. `current` is where
    the experts are now, when placing again during a run: policies keep an
    expert where it is if that node is still chosen, so only the experts
    of nodes that left the chosen set move.
    """

    home: str
    time_s: float = 0.0
    path_delay_s: Mapping[str, float] = field(default_factory=dict)
    hops: Mapping[str, int] = field(default_factory=dict)
    node_state: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    expert_load: Mapping[ExpertKey, float] = field(default_factory=dict)
    delay_ahead_s: Mapping[str, Sequence[float]] = field(default_factory=dict)
    current: Mapping[ExpertKey, Sequence[str]] = field(default_factory=dict)


class PlacementPolicy(Protocol):
    """Decides a placement; must return every expert with at least one node."""

    name: str

    def place(
        self,
        experts: Sequence[ExpertKey],
        candidates: Sequence[str],
        context: PlacementContext,
    ) -> Placement: ...


class GroundPolicy:
    """Every expert at home (the static ground baseline; see module doc)."""

    name = "ground"

    def place(
        self,
        experts: Sequence[ExpertKey],
        candidates: Sequence[str],
        context: PlacementContext,
    ) -> Placement:
        return {key: [context.home] for key in experts}


class RoundRobinPolicy:
    """Experts dealt over the `k` reachable satellites nearest home.

    Nearest means the smallest current path delay from home (ties broken
    by name, so the result is deterministic). With `replicas` r > 1 each
    expert also sits on the next r-1 nodes of the ring, the first listed
    being the one tried first.
    """

    name = "round-robin"

    def __init__(self, k: int = 8, replicas: int = 1) -> None:
        _check_k_replicas(self.name, k, replicas)
        self.k = k
        self.replicas = replicas

    def place(
        self,
        experts: Sequence[ExpertKey],
        candidates: Sequence[str],
        context: PlacementContext,
    ) -> Placement:
        reachable = [
            node
            for node in candidates
            if node != context.home and node in context.path_delay_s
        ]
        nearest = sorted(reachable, key=lambda n: (context.path_delay_s[n], n))
        nearest = nearest[: self.k]
        if len(nearest) < self.replicas:
            raise ConfigError(
                f"round-robin needs {self.replicas} reachable satellites but only "
                f"{len(nearest)} of {len(candidates)} candidates are reachable from "
                f"{context.home}; lower replicas or wait for better visibility"
            )
        return deal(sorted(experts), nearest, self.replicas, context.current)


class AwarePolicy:
    """Experts on the `k` satellites best placed over the coming orbit.

    A satellite is eligible when it is reachable from home now, its state
    of charge is at least `min_soc_fraction` and its compute module is at
    most `max_compute_temperature_c` (a node without state in the context
    is taken as fit). Eligible satellites rank by how many forecast times
    they will be out of reach, then by their mean delay from home over the
    forecast (`context.delay_ahead_s`; without a forecast, the delay now),
    then by name. Experts are dealt over the ranking as round-robin deals
    them, the most used first (`context.expert_load`), so the heaviest
    traffic has the shortest way; `replicas` as in round-robin.
    """

    name = "aware"

    def __init__(
        self,
        k: int = 8,
        replicas: int = 1,
        min_soc_fraction: float = 0.0,
        max_compute_temperature_c: float = float("inf"),
    ) -> None:
        _check_k_replicas(self.name, k, replicas)
        self.k = k
        self.replicas = replicas
        self.min_soc_fraction = min_soc_fraction
        self.max_compute_temperature_c = max_compute_temperature_c

    def fit(self, node: str, context: PlacementContext) -> bool:
        """Whether `node`'s battery and heat allow it to take experts."""
        state = context.node_state.get(node, {})
        soc = state.get("soc_fraction", 1.0)
        temperature_c = state.get("compute_temperature_c", -273.15)
        return (
            soc >= self.min_soc_fraction
            and temperature_c <= self.max_compute_temperature_c
        )

    def rank(self, candidates: Sequence[str], context: PlacementContext) -> list[str]:
        """Eligible candidates, best first (see the class docstring)."""

        def key(node: str) -> tuple[int, float, str]:
            ahead = list(context.delay_ahead_s.get(node, ()))
            if not ahead:
                return 0, context.path_delay_s[node], node
            finite = [d for d in ahead if math.isfinite(d)]
            mean = sum(finite) / len(finite) if finite else math.inf
            return len(ahead) - len(finite), mean, node

        eligible = [
            node
            for node in candidates
            if node != context.home
            and node in context.path_delay_s
            and self.fit(node, context)
        ]
        return sorted(eligible, key=key)

    def place(
        self,
        experts: Sequence[ExpertKey],
        candidates: Sequence[str],
        context: PlacementContext,
    ) -> Placement:
        best = self.rank(candidates, context)[: self.k]
        if len(best) < self.replicas:
            reachable = sum(
                1 for n in candidates if n != context.home and n in context.path_delay_s
            )
            raise ConfigError(
                f"aware placement needs {self.replicas} satellites but only "
                f"{len(best)} of the {reachable} reachable from {context.home} have "
                f"a state of charge of at least {self.min_soc_fraction} and a "
                f"compute module at most {self.max_compute_temperature_c} C; lower "
                "moe.min_soc_fraction, raise moe.max_compute_temperature_c or "
                "lower moe.replicas"
            )
        # Most used first; equal loads (or none known) in expert order.
        order = sorted(experts, key=lambda e: (-context.expert_load.get(e, 0.0), e))
        return deal(order, best, self.replicas, context.current)


def _check_k_replicas(policy: str, k: int, replicas: int) -> None:
    if k < 1:
        raise ConfigError(f"{policy} k={k}: must be at least 1")
    if not 1 <= replicas <= k:
        raise ConfigError(f"{policy} replicas={replicas}: must be between 1 and k={k}")


def deal(
    experts: Sequence[ExpertKey],
    nodes: Sequence[str],
    replicas: int,
    current: Mapping[ExpertKey, Sequence[str]] | None = None,
) -> Placement:
    """`experts` in turn over `nodes` (best first), `replicas` nodes each.

    Without `current` the i-th expert goes to node i mod K and its replicas
    to the next nodes of the ring. With `current` (placing again during a
    run), every expert keeps the holders it has among `nodes`, and the
    replicas still missing go to the least loaded of `nodes`, best first,
    so only the experts of nodes that left the set move.
    """
    if not current:
        return {
            key: [nodes[(i + j) % len(nodes)] for j in range(replicas)]
            for i, key in enumerate(experts)
        }
    rank = {node: i for i, node in enumerate(nodes)}
    load = dict.fromkeys(nodes, 0)
    placement: Placement = {}
    for key in experts:
        kept = [n for n in current.get(key, ()) if n in rank][:replicas]
        placement[key] = kept
        for node in kept:
            load[node] += 1
    for key in experts:
        holders = placement[key]
        while len(holders) < replicas:
            node = min(
                (n for n in nodes if n not in holders), key=lambda n: (load[n], rank[n])
            )
            holders.append(node)
            load[node] += 1
    return placement


POLICIES: dict[str, type] = {
    "ground": GroundPolicy,
    "round-robin": RoundRobinPolicy,
    "aware": AwarePolicy,
}


def make_policy(name: str, **options: Any) -> PlacementPolicy:
    """A policy by name, with its options (e.g. ``k=8, replicas=2``)."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ConfigError(
            f"placement policy {name!r} unknown; choose one of {sorted(POLICIES)}"
        ) from None
    try:
        policy: PlacementPolicy = cls(**options)
    except TypeError as exc:
        raise ConfigError(f"placement policy {name!r}: bad options: {exc}") from None
    return policy


def check_placement(
    placement: Mapping[ExpertKey, Sequence[str]],
    experts: Sequence[ExpertKey],
    nodes: Sequence[str],
) -> None:
    """Raise ConfigError unless every expert has replicas on known nodes."""
    known = set(nodes)
    for key in experts:
        replicas = placement.get(key)
        if not replicas:
            raise ConfigError(
                f"placement has no node for layer {key[0]} expert {key[1]}; "
                "every expert needs at least one replica"
            )
        unknown = [node for node in replicas if node not in known]
        if unknown:
            raise ConfigError(
                f"placement puts layer {key[0]} expert {key[1]} on unknown nodes "
                f"{unknown}; known nodes: {sorted(known)[:10]}..."
            )
        if len(set(replicas)) != len(replicas):
            raise ConfigError(
                f"placement lists a node twice for layer {key[0]} expert {key[1]}: "
                f"{list(replicas)}"
            )


def node_shards(
    placement: Mapping[ExpertKey, Sequence[str]],
) -> dict[str, list[ExpertKey]]:
    """The experts each node holds under `placement`."""
    held: dict[str, list[ExpertKey]] = {}
    for key, replicas in sorted(placement.items()):
        for node in replicas:
            held.setdefault(node, []).append(key)
    return held


def placement_moves(
    old: Mapping[ExpertKey, Sequence[str]], new: Mapping[ExpertKey, Sequence[str]]
) -> tuple[list[tuple[ExpertKey, str]], list[tuple[ExpertKey, str]]]:
    """(shards to add, shards to drop) to go from `old` to `new`."""
    adds = [
        (key, node)
        for key, nodes in sorted(new.items())
        for node in nodes
        if node not in old.get(key, ())
    ]
    drops = [
        (key, node)
        for key, nodes in sorted(old.items())
        for node in nodes
        if node not in new.get(key, ())
    ]
    return adds, drops


def placement_to_json(
    placement: Mapping[ExpertKey, Sequence[str]],
) -> dict[str, list[str]]:
    """JSON-able form: ``{"L/E": [nodes]}``."""
    return {
        f"{layer}/{expert}": list(nodes)
        for (layer, expert), nodes in sorted(placement.items())
    }


def forecast_delays_s(
    scenario: Any, home: str, t_s: float, horizon_s: float, samples: int
) -> dict[str, list[float]]:
    """One-way delay from `home` to every node at `samples` times ahead.

    The times are `t_s`, then evenly on to `t_s + horizon_s`. Each is a
    shortest path over that time's up links, from a geometry of its own
    (stepped in order, so sticky handover carries from one time to the
    next as it would in the emulator); the emulator's route hysteresis is
    left out, so a forecast may be a few microseconds shorter than the
    path the kernel will use. ``inf`` marks a node out of reach.
    """
    # Here, not at the top: agents import this module and need none of it.
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import dijkstra

    from topology.links import Geometry

    if samples < 1:
        raise ConfigError(f"forecast: samples must be at least 1, got {samples}")
    if horizon_s < 0:
        raise ConfigError(f"forecast: horizon_s must not be negative, got {horizon_s}")
    geometry = Geometry(scenario)
    names = geometry.names
    if home not in names:
        raise ConfigError(f"forecast: home {home!r} is not a node of the scenario")
    source = names.index(home)
    n = len(names)
    times = np.linspace(t_s, t_s + horizon_s, samples) if samples > 1 else [t_s]
    ahead: dict[str, list[float]] = {name: [] for name in names}
    for when in times:
        links = geometry.step(float(when)).links
        up = np.asarray(links.up, dtype=bool)
        graph = coo_matrix(
            (links.delay_s[up], (links.a[up], links.b[up])), shape=(n, n)
        ).tocsr()
        dist = dijkstra(graph, directed=False, indices=source)
        for name, delay_s in zip(names, dist, strict=True):
            ahead[name].append(float(delay_s))
    return ahead
