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
"""

from __future__ import annotations

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
    """

    home: str
    time_s: float = 0.0
    path_delay_s: Mapping[str, float] = field(default_factory=dict)
    hops: Mapping[str, int] = field(default_factory=dict)
    node_state: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    expert_load: Mapping[ExpertKey, float] = field(default_factory=dict)


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
        if k < 1:
            raise ConfigError(f"round-robin k={k}: must be at least 1")
        if not 1 <= replicas <= k:
            raise ConfigError(
                f"round-robin replicas={replicas}: must be between 1 and k={k}"
            )
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
        return {
            key: [nearest[(i + j) % len(nearest)] for j in range(self.replicas)]
            for i, key in enumerate(sorted(experts))
        }


POLICIES: dict[str, type] = {"ground": GroundPolicy, "round-robin": RoundRobinPolicy}


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
