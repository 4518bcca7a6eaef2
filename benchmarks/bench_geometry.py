"""Per-step cost of Geometry.step and Router.update at three constellation sizes.

Prints median and p95 wall time of each part, and how many routes change
per step, for an Iridium-like 6x11 shell (66), a 20x20 Walker delta (400)
and Starlink shell 1 (72x22 = 1,584 at 550 km, 53 deg, phasing 39), each
with the default scenario's three Arctic stations plus three mid-latitude
ones (the 53 deg shell never rises 25 deg above the Arctic sites). The
last row recomputes about a tenth of the destination trees per step
(Router's ``refresh_steps=10``; topology changes still act at once). The
emulator's whole step must stay under 1 s at 1,584 satellites, so geometry
plus routing should stay well under ~400 ms there.
The machine's load average is printed: other work on the cores inflates
the figures.

    .venv/bin/python benchmarks/bench_geometry.py [--steps 60] [--step-s 1]
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

import numpy as np
from constellations import LABELS, MID_LATITUDE_STATIONS, SHELLS_BY_SIZE

from topology.config import from_dict
from topology.links import Geometry
from topology.routing import Router
from topology.scenario import GroundStationConfig, ShellConfig, load_scenario

SHELLS = {LABELS[n]: shell for n, shell in SHELLS_BY_SIZE.items()}
MID_LATITUDE = MID_LATITUDE_STATIONS


def percentiles_ms(samples: list[float]) -> str:
    values = np.array(samples) * 1e3
    return (
        f"median {np.median(values):7.2f} ms  p95 {np.percentile(values, 95):7.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--step-s", type=float, default=1.0)
    args = parser.parse_args()
    base = load_scenario()
    stations = list(base.ground_stations) + [
        from_dict(GroundStationConfig, g, "station") for g in MID_LATITUDE
    ]
    runs = [(label, shell, 1) for label, shell in SHELLS.items()]
    runs.append(("starlink, refresh_steps 10", SHELLS["starlink shell 1 72x22"], 10))
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")

    for label, shell, refresh_steps in runs:
        scenario = replace(
            base,
            shells=[from_dict(ShellConfig, shell, "shell")],
            ground_stations=stations,
        )
        started = time.perf_counter()
        geometry = Geometry(scenario)
        c = geometry.constellation
        router = Router(
            c.n_nodes,
            scenario.emulation.route_hysteresis_fraction,
            scenario.emulation.route_hysteresis_s,
            refresh_steps=refresh_steps,
        )
        build_s = time.perf_counter() - started

        geometry_s, routing_s, changes, up, trees = [], [], [], [], []
        for k in range(args.steps + 1):
            t_s = k * args.step_s
            started = time.perf_counter()
            state = geometry.step(t_s)
            middle = time.perf_counter()
            route_changes = router.update(state.links)
            done = time.perf_counter()
            # Step 0 installs every route; steady state is what matters.
            if k:
                geometry_s.append(middle - started)
                routing_s.append(done - middle)
                changes.append(len(route_changes))
                up.append(int(state.links.up.sum()))
                trees.append(router.trees_computed)
        total = [g + r for g, r in zip(geometry_s, routing_s, strict=True)]
        n = c.n_nodes
        routes = n * (n - 1)
        print(
            f"{label}: {c.n_sats} sats + {c.n_ground} stations, "
            f"{len(state.links)} links ({np.mean(up):.0f} up), build {build_s:.2f} s"
        )
        print(f"  Geometry.step  {percentiles_ms(geometry_s)}")
        print(f"  Router.update  {percentiles_ms(routing_s)}")
        print(f"  both           {percentiles_ms(total)}")
        print(
            f"  route changes per step: median {np.median(changes):.0f}, "
            f"max {max(changes)} of {routes} routes "
            f"({args.steps} steps of {args.step_s:g} s); "
            f"trees recomputed per step: median {np.median(trees):.0f}"
        )
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
