"""Placement policies: the ground baseline and round-robin over the nearest."""

from __future__ import annotations

import pytest

from controller.placement import (
    GroundPolicy,
    PlacementContext,
    RoundRobinPolicy,
    check_placement,
    make_policy,
    node_shards,
    placement_moves,
    placement_to_json,
)
from topology.errors import ConfigError

EXPERTS = [(layer, expert) for layer in range(2) for expert in range(4)]
NODES = ["s0", "s1", "s2", "s3", "s4", "gs"]
CONTEXT = PlacementContext(
    home="gs",
    path_delay_s={"s0": 0.030, "s1": 0.004, "s2": 0.012, "s3": 0.004, "gs": 0.0},
)


def test_ground_puts_every_expert_at_home() -> None:
    placement = GroundPolicy().place(EXPERTS, NODES, CONTEXT)
    assert placement == {key: ["gs"] for key in EXPERTS}


def test_round_robin_deals_over_the_k_nearest_reachable() -> None:
    placement = RoundRobinPolicy(k=3).place(EXPERTS, NODES, CONTEXT)
    # Nearest three: s1 and s3 tie at 4 ms (name breaks it), then s2; s4 is
    # unreachable and home is never a candidate.
    assert [placement[key][0] for key in EXPERTS] == [
        "s1", "s3", "s2", "s1", "s3", "s2", "s1", "s3"
    ]  # fmt: skip
    check_placement(placement, EXPERTS, NODES)


def test_round_robin_replicas_use_the_next_nodes_of_the_ring() -> None:
    placement = RoundRobinPolicy(k=3, replicas=2).place(EXPERTS, NODES, CONTEXT)
    assert placement[(0, 0)] == ["s1", "s3"]
    assert placement[(0, 2)] == ["s2", "s1"]
    assert all(len(set(nodes)) == 2 for nodes in placement.values())


def test_round_robin_with_too_few_reachable_nodes_says_so() -> None:
    context = PlacementContext(home="gs", path_delay_s={"s0": 0.01})
    with pytest.raises(ConfigError, match="only 1 of 6 candidates are reachable"):
        RoundRobinPolicy(k=4, replicas=2).place(EXPERTS, NODES, context)


def test_bad_policy_names_and_options_are_named() -> None:
    with pytest.raises(ConfigError, match="'nearest' unknown"):
        make_policy("nearest")
    with pytest.raises(ConfigError, match="bad options"):
        make_policy("ground", k=3)
    with pytest.raises(ConfigError, match="replicas=5"):
        make_policy("round-robin", k=3, replicas=5)
    assert make_policy("round-robin", k=2).name == "round-robin"


def test_check_placement_names_what_is_missing_or_unknown() -> None:
    good = GroundPolicy().place(EXPERTS, NODES, CONTEXT)
    with pytest.raises(ConfigError, match="no node for layer 1 expert 3"):
        check_placement({k: v for k, v in good.items() if k != (1, 3)}, EXPERTS, NODES)
    with pytest.raises(ConfigError, match="unknown nodes \\['s9'\\]"):
        check_placement({**good, (0, 0): ["s9"]}, EXPERTS, NODES)
    with pytest.raises(ConfigError, match="twice"):
        check_placement({**good, (0, 0): ["s1", "s1"]}, EXPERTS, NODES)


def test_moves_shards_per_node_and_json() -> None:
    old = {(0, 0): ["s1"], (0, 1): ["s2", "s3"]}
    new = {(0, 0): ["s4"], (0, 1): ["s3"]}
    assert placement_moves(old, new) == (
        [((0, 0), "s4")],
        [((0, 0), "s1"), ((0, 1), "s2")],
    )
    assert node_shards(old) == {"s1": [(0, 0)], "s2": [(0, 1)], "s3": [(0, 1)]}
    assert placement_to_json(new) == {"0/0": ["s4"], "0/1": ["s3"]}
