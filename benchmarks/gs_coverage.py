"""How often the scenario's ground stations can reach each other via satellites.

Steps the geometry and router over a time span and prints, for every
station, the fraction of steps with a ground link, and for every pair of
stations the fraction of steps with a path between them plus the median
number of ISL hops on it. Used to choose the default scenario's stations.

    .venv/bin/python benchmarks/gs_coverage.py [scenario.yaml] \
        [--duration-s 3600] [--step-s 10]
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np

from topology.links import Geometry
from topology.routing import Router
from topology.scenario import load_scenario


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", nargs="?", help="scenario YAML (default: built-in)")
    parser.add_argument("--duration-s", type=float, default=3600.0)
    parser.add_argument("--step-s", type=float, default=10.0)
    args = parser.parse_args()

    scenario = load_scenario(args.scenario)
    geometry = Geometry(scenario)
    c = geometry.constellation
    router = Router(c.n_nodes, 0.05, 2e-4)
    stations = list(range(c.n_sats, c.n_nodes))
    pairs = list(itertools.combinations(stations, 2))
    served = np.zeros(len(stations))
    hops: dict[tuple[int, int], list[int]] = {p: [] for p in pairs}
    any_pair = 0
    times = np.arange(0.0, args.duration_s, args.step_s)

    for t_s in times:
        state = geometry.step(float(t_s))
        router.update(state.links)
        served += np.isin(stations, state.links.b[state.links.kind == 1])
        connected = False
        for src, dst in pairs:
            path = router.path(src, dst)
            hops[(src, dst)].append(len(path) - 1 if path else -1)
            connected |= bool(path)
        any_pair += connected

    print(
        f"{scenario.name}: {c.n_sats} satellites, {len(times)} steps of "
        f"{args.step_s:g} s from {scenario.time.start_utc}, min elevation "
        f"{scenario.gsl.min_elevation_deg:g} deg"
    )
    for g, fraction in zip(stations, served / len(times), strict=True):
        print(f"  {c.names[g]:>14}: ground link {fraction:6.1%} of steps")
    for (src, dst), h in hops.items():
        h_arr = np.array(h)
        ok = h_arr > 0
        # A station-to-station path has two GSL hops; the rest are ISLs.
        isl = np.median(h_arr[ok] - 2) if ok.any() else float("nan")
        print(
            f"  {c.names[src]:>14} - {c.names[dst]:<14} path {ok.mean():6.1%}, "
            f"median ISL hops {isl:g}"
        )
    print(f"  at least one pair connected: {any_pair / len(times):6.1%} of steps")


if __name__ == "__main__":
    main()
