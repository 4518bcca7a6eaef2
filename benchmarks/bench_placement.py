"""How placement policies age as the constellation moves.

A placement is decided at scenario time 0 and kept; the satellites move.
For each policy this prints how far its experts are from home as time goes
on, in two parts:

forecast  (no root) the scenario's geometry alone: at each time, the mean
          one-way delay from home to the satellites holding experts, and
          a propagation bound per token: every layer waits for the farther
          of its two chosen experts (top-2 over experts dealt evenly on the
          K satellites, uniform routing assumed), there and back.
measured  (root) the scenario brought up in this process; at each time the
          emulator steps there, agents hold the experts where the policy put
          them at time 0 (for a policy named POLICY+replace: where it put
          them one step earlier, as `moe.replace_every_s` would, measured
          just before they move again), and --tokens tokens are generated
          through the emulated links. Prints the per-token p50, its lower
          bound from the geometry at that moment, and whether the tokens
          matched the single-process model.

Do not run while another scenario is up (namespace names are shared).

    .venv/bin/python benchmarks/bench_placement.py [--scenario FILE]
        [--minutes 0 10 20 30] [--policies round-robin aware aware+replace]
        [--horizon-s 1200] [--tokens 12] [--only forecast|measured]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

PROMPT = "def parse_args(argv):\n    "


def policy_config(name: str, args: argparse.Namespace) -> Any:
    from controller.inference import MoeConfig

    replace = name.endswith("+replace")
    # Placing again at every time of --minutes: look ahead to the next one.
    every_s = 60.0 * (args.minutes[1] - args.minutes[0]) if len(args.minutes) > 1 else 0
    return MoeConfig(
        home=args.home,
        placement=name.removesuffix("+replace"),
        k=args.k,
        horizon_s=every_s if replace else args.horizon_s,
    )


def held_nodes(placement: dict) -> list[str]:
    return sorted({n for holders in placement.values() for n in holders})


def token_bound_s(delays_s: list[float], n_layers: int) -> float:
    """Propagation per token: per layer, the farther of two distinct holders."""
    pairs = list(itertools.combinations(delays_s, 2)) or [(delays_s[0],) * 2]
    return n_layers * 2 * sum(max(pair) for pair in pairs) / len(pairs)


def bench_forecast(args: argparse.Namespace) -> dict[str, Any]:
    from controller.deployment import place_experts
    from controller.placement import PlacementContext, forecast_delays_s
    from topology.orbits import Constellation
    from topology.scenario import load_scenario

    scenario = load_scenario(args.scenario)
    times_s = [60.0 * m for m in args.minutes]
    experts = [(layer, e) for layer in range(args.layers) for e in range(8)]
    home = args.home
    ahead = forecast_delays_s(scenario, home, 0.0, max(times_s), len(times_s))
    names = list(ahead)
    satellites = names[: Constellation.from_scenario(scenario).n_sats]
    now = {n: d[0] for n, d in ahead.items() if n in satellites and math.isfinite(d[0])}
    context = PlacementContext(home, 0.0, now)
    out: dict[str, Any] = {"minutes": args.minutes, "policies": {}}
    print(
        f"forecast: {scenario.name}, home {home}, k={args.k}, "
        f"aware horizon {args.horizon_s:.0f} s"
    )
    header = "".join(f"{m:>9.0f}" for m in args.minutes)
    print(f"{'policy':<14}{'minutes':<22}{header}")
    for name in [p for p in args.policies if not p.endswith("+replace")]:
        placed = place_experts(
            policy_config(name, args),
            experts,
            satellites,
            names,
            context,
            scenario=scenario,
        )
        nodes = held_nodes(placed.placement)
        mean_ms, bound_ms = [], []
        for i in range(len(times_s)):
            delays = [ahead[n][i] for n in nodes]
            mean_ms.append(1e3 * sum(delays) / len(delays))
            bound_ms.append(1e3 * token_bound_s(delays, args.layers))
        print(
            f"{name:<14}{'mean delay, ms':<22}" + "".join(f"{v:9.1f}" for v in mean_ms)
        )
        print(
            f"{'':<14}{'token bound, ms':<22}" + "".join(f"{v:9.1f}" for v in bound_ms)
        )
        out["policies"][name] = {
            "nodes": nodes,
            "mean_delay_ms": mean_ms,
            "token_bound_ms": bound_ms,
        }
    return out


def place_at(emulator: Any, config: Any, experts: list, home: str) -> Any:
    """Place as `config` asks, from the emulator's routes at this moment."""
    from controller.deployment import place_experts
    from controller.latency import EmulatorPaths, propagation_delays_s
    from controller.placement import PlacementContext

    names = emulator.names
    satellites = names[: emulator.n_sats]
    delays = propagation_delays_s(EmulatorPaths(emulator), home, satellites)
    return place_experts(
        config,
        experts,
        satellites,
        names,
        PlacementContext(home, emulator.t_s, delays),
        scenario=emulator.scenario,
    )


def bench_measured(args: argparse.Namespace) -> dict[str, Any]:
    from controller.deployment import ensure_shards, run_inference
    from moe.shards import load_manifest
    from topology.emulator import Emulator
    from topology.scenario import load_scenario

    if os.geteuid() != 0:
        print("measured: skipped (needs root to build the emulated network)")
        return {}
    scenario = load_scenario(args.scenario)
    shard_dir = ensure_shards(None)
    experts = [(e.layer, e.expert) for e in load_manifest(shard_dir).shards]
    out: dict[str, Any] = {}
    for name in args.policies:
        emulator = Emulator(scenario)
        emulator.up()
        rows = []
        try:
            replace = name.endswith("+replace")
            config = policy_config(name, args)

            placed = place_at(emulator, config, experts, args.home)
            print(f"\nmeasured: {name} on {', '.join(held_nodes(placed.placement))}")
            for minutes in args.minutes:
                if minutes > 0:
                    emulator.step(60.0 * minutes)
                # Placing again every step: measure the placement made one
                # step ago, just before it is replaced (its worst moment).
                report = run_inference(
                    PROMPT,
                    args.tokens,
                    config,
                    emulator=emulator,
                    shard_dir=shard_dir,
                    placement=placed.placement,
                )
                if replace:
                    placed = place_at(emulator, config, experts, args.home)
                summary = report["summary"]
                row = {
                    "minutes": minutes,
                    "total_ms_p50": 1e3 * summary["total_s_p50"],
                    "bound_ms_p50": 1e3 * summary["bound_s_p50"],
                    "ratio_p50": summary["ratio_p50"],
                    "tokens_identical": report["reference"]["tokens_identical"],
                }
                rows.append(row)
                print(
                    f"  t = {minutes:4.0f} min: per token p50 "
                    f"{row['total_ms_p50']:7.1f} ms, bound {row['bound_ms_p50']:7.1f} "
                    f"ms, ratio {row['ratio_p50']:.2f}, tokens identical "
                    f"{row['tokens_identical']}"
                )
        finally:
            emulator.down()
        out[name] = rows
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", default=None, help="default: built-in")
    parser.add_argument("--home", default="longyearbyen")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4, help="for the bound")
    parser.add_argument("--horizon-s", type=float, default=1200.0)
    parser.add_argument("--minutes", type=float, nargs="+", default=[0, 10, 20, 30])
    parser.add_argument(
        "--policies",
        nargs="+",
        default=["round-robin", "aware", "round-robin+replace", "aware+replace"],
    )
    parser.add_argument("--tokens", type=int, default=12)
    parser.add_argument("--only", choices=["forecast", "measured"], default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.minutes[0] != 0:
        parser.error("--minutes must start at 0 (when the placement is decided)")
    steps = [b - a for a, b in itertools.pairwise(args.minutes)]
    if any(not math.isclose(step, steps[0]) or step <= 0 for step in steps):
        parser.error(f"--minutes {args.minutes}: give evenly spaced times: 0 10 20")

    os.environ.setdefault(
        "SPACEMOE_RUN_DIR", tempfile.mkdtemp(prefix="smoe-bench-placement-")
    )
    out: dict[str, Any] = {}
    if args.only in (None, "forecast"):
        out["forecast"] = bench_forecast(args)
    if args.only in (None, "measured"):
        import torch

        torch.set_num_threads(1)
        out["measured"] = bench_measured(args)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
