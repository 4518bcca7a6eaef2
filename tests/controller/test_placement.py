"""Placement policies: the ground baseline, round-robin and satellite-aware."""

from __future__ import annotations

import math

import pytest

from controller.placement import (
    AwarePolicy,
    GroundPolicy,
    PlacementContext,
    RoundRobinPolicy,
    check_placement,
    deal,
    forecast_delays_s,
    make_policy,
    node_shards,
    placement_moves,
    placement_to_json,
)
from topology.errors import ConfigError
from topology.links import Geometry
from topology.routing import Router
from topology.scenario import load_scenario

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


# --- satellite-aware -------------------------------------------------------

INF = math.inf
# s1 is nearest now but sets within the horizon; s3 starts a little farther
# and stays close; s2 is far throughout; s0 is reachable only now.
AHEAD = {
    "s0": [0.030, INF, INF],
    "s1": [0.004, 0.020, 0.040],
    "s2": [0.012, 0.012, 0.012],
    "s3": [0.005, 0.006, 0.007],
    "gs": [0.0, 0.0, 0.0],
}
AWARE_CONTEXT = PlacementContext(
    home="gs",
    path_delay_s={"s0": 0.030, "s1": 0.004, "s2": 0.012, "s3": 0.005, "gs": 0.0},
    delay_ahead_s=AHEAD,
)


def test_aware_ranks_by_the_delay_over_the_horizon() -> None:
    policy = AwarePolicy(k=3)
    # s3 (mean 6 ms) before s2 (12 ms) before s1 (21 ms); s0 falls out of
    # reach, so it ranks last whatever its mean.
    assert policy.rank(NODES, AWARE_CONTEXT) == ["s3", "s2", "s1", "s0"]
    nearest_now = RoundRobinPolicy(k=1).place(EXPERTS, NODES, AWARE_CONTEXT)
    assert {n for v in nearest_now.values() for n in v} == {"s1"}
    placement = AwarePolicy(k=1).place(EXPERTS, NODES, AWARE_CONTEXT)
    assert {n for v in placement.values() for n in v} == {"s3"}


def test_aware_leaves_out_low_battery_and_hot_satellites() -> None:
    context = PlacementContext(
        home="gs",
        path_delay_s=AWARE_CONTEXT.path_delay_s,
        delay_ahead_s=AHEAD,
        node_state={
            "s3": {"soc_fraction": 0.25, "compute_temperature_c": 30.0},
            "s2": {"soc_fraction": 0.90, "compute_temperature_c": 86.0},
            "s1": {"soc_fraction": 0.90, "compute_temperature_c": 40.0},
        },
    )
    policy = AwarePolicy(k=3, min_soc_fraction=0.4, max_compute_temperature_c=85)
    assert policy.rank(NODES, context) == ["s1", "s0"]
    placement = policy.place(EXPERTS, NODES, context)
    check_placement(placement, EXPERTS, NODES)
    assert {n for v in placement.values() for n in v} == {"s1", "s0"}


def test_aware_with_nothing_fit_names_the_limits() -> None:
    context = PlacementContext(
        home="gs",
        path_delay_s={"s1": 0.004},
        node_state={"s1": {"soc_fraction": 0.1}},
    )
    with pytest.raises(ConfigError, match=r"0 of the 1 reachable .* at least 0\.4"):
        AwarePolicy(k=2, min_soc_fraction=0.4).place(EXPERTS, NODES, context)


def test_aware_gives_the_most_used_experts_the_best_satellites() -> None:
    load = {(1, 3): 50.0, (0, 2): 40.0, (1, 0): 30.0}
    context = PlacementContext(
        home="gs",
        path_delay_s=AWARE_CONTEXT.path_delay_s,
        delay_ahead_s=AHEAD,
        expert_load=load,
    )
    placement = AwarePolicy(k=3).place(EXPERTS, NODES, context)
    assert placement[(1, 3)] == ["s3"]
    assert placement[(0, 2)] == ["s2"]
    assert placement[(1, 0)] == ["s1"]
    # Unknown load: dealt in expert order after the known ones.
    assert placement[(0, 0)] == ["s3"]


def test_aware_without_a_forecast_places_as_round_robin() -> None:
    for k, replicas in ((3, 1), (4, 2)):
        aware = AwarePolicy(k=k, replicas=replicas).place(EXPERTS, NODES, CONTEXT)
        assert aware == RoundRobinPolicy(k=k, replicas=replicas).place(
            EXPERTS, NODES, CONTEXT
        )
    assert make_policy("aware", k=2, min_soc_fraction=0.5).name == "aware"


def test_forecast_agrees_with_the_emulator_router_at_each_time() -> None:
    """The forecast is the geometry and shortest paths the emulator will use."""
    scenario = load_scenario(None)
    home = "longyearbyen"
    ahead = forecast_delays_s(scenario, home, 0.0, 1200.0, 3)
    assert all(len(v) == 3 for v in ahead.values())
    assert ahead[home] == [0.0, 0.0, 0.0]

    # The router the emulator runs, stepped through the same times.
    geometry = Geometry(scenario)
    names = geometry.names
    router = Router(len(names), 0.0, 0.0)
    for i, t_s in enumerate((0.0, 600.0, 1200.0)):
        router.update(geometry.step(t_s).links)
        row = router.dist_s[names.index(home)]
        for name, delay_s in zip(names, row, strict=True):
            assert ahead[name][i] == pytest.approx(delay_s, rel=1e-9, abs=1e-12)
    # Something in the constellation moved out of reach or away.
    assert any(v[0] != v[2] for v in ahead.values())


def test_forecast_refuses_bad_arguments() -> None:
    scenario = load_scenario(None)
    with pytest.raises(ConfigError, match="'nowhere' is not a node"):
        forecast_delays_s(scenario, "nowhere", 0.0, 60.0, 2)
    with pytest.raises(ConfigError, match="samples must be at least 1"):
        forecast_delays_s(scenario, "tromso", 0.0, 60.0, 0)


def test_aware_beats_nearest_now_over_its_horizon_in_the_default_scenario() -> None:
    """On the default constellation, the satellites nearest home now drift
    away within minutes; the aware choice keeps a lower mean delay over the
    horizon it was given (though it may start a little higher)."""
    scenario = load_scenario(None)
    home = "longyearbyen"
    ahead = forecast_delays_s(scenario, home, 0.0, 1200.0, 5)
    satellites = [n for n in ahead if n.startswith("s")]
    now = {n: ahead[n][0] for n in satellites if math.isfinite(ahead[n][0])}
    context = PlacementContext(home, 0.0, now, delay_ahead_s=ahead)

    def mean_delay_s(placement: dict) -> float:
        nodes = {n for v in placement.values() for n in v}
        return sum(sum(ahead[n]) / len(ahead[n]) for n in nodes) / len(nodes)

    experts = [(layer, e) for layer in range(4) for e in range(8)]
    nearest = RoundRobinPolicy(k=8).place(experts, satellites, context)
    aware = AwarePolicy(k=8).place(experts, satellites, context)
    assert mean_delay_s(aware) < 0.9 * mean_delay_s(nearest)


def test_deal_without_current_is_the_ring() -> None:
    nodes = ["a", "b", "c"]
    assert deal(EXPERTS, nodes, 2) == {
        key: [nodes[i % 3], nodes[(i + 1) % 3]] for i, key in enumerate(EXPERTS)
    }


def test_deal_again_moves_only_the_experts_of_nodes_that_left() -> None:
    before = deal(EXPERTS, ["a", "b", "c", "d"], 1)
    # d left the chosen set and e joined it, best first.
    after = deal(EXPERTS, ["e", "a", "b", "c"], 1, current=before)
    moved = [key for key in EXPERTS if after[key] != before[key]]
    assert moved == [key for key in EXPERTS if before[key] == ["d"]]
    assert all(after[key] == ["e"] for key in moved)
    loads = [sum(1 for v in after.values() if n in v) for n in "eabc"]
    assert max(loads) - min(loads) <= 1


def test_deal_again_fills_missing_replicas_on_the_least_loaded() -> None:
    before = deal(EXPERTS, ["a", "b", "c"], 2)
    after = deal(EXPERTS, ["a", "b", "x"], 2, current=before)
    for key in EXPERTS:
        kept = [n for n in before[key] if n != "c"]
        assert after[key][: len(kept)] == kept
        assert len(set(after[key])) == 2 and "c" not in after[key]
    loads = {n: sum(1 for v in after.values() if n in v) for n in "abx"}
    assert max(loads.values()) - min(loads.values()) <= 1


def test_replacing_in_a_partitioned_run_is_refused_before_anything_starts(
    tmp_path,
) -> None:
    from controller.testbed import Testbed

    path = tmp_path / "p.yaml"
    path.write_text(
        "emulation:\n  partitions: [192.0.2.1, 192.0.2.2]\n"
        "moe:\n  replace_every_s: 300\n"
    )
    with pytest.raises(ConfigError, match=r"moe\.replace_every_s: 300.*partitioned"):
        Testbed(load_scenario(path))
