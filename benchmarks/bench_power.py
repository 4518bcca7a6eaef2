"""Cost of the power model per step, of its ageing updates, and fast-forward speed.

Run from the repository root::

    .venv/bin/python benchmarks/bench_power.py             # everything
    .venv/bin/python benchmarks/bench_power.py step        # one section
    .venv/bin/python benchmarks/bench_power.py forward --days 5

Sections:

- ``step``: one :meth:`PowerModel.step` for S = 1 (an agent, every second),
  66 and 1,584 satellites (the emulator stepping all at once): best and
  median of repeated runs, microseconds per step. Targets: S = 1 below
  ~100 us, S = 1,584 below 2 ms.
- ``ageing``: one ageing update (rainflow over an hour of samples for every
  satellite), which lands on one step an hour at 1 s steps.
- ``forward``: fast-forward of the default scenario (66 satellites, SGP4
  geometry) at 30 s steps: scenario days per wall second, and the key
  figures of the run (SoC swing, cycle depth, temperatures, fade).

Prints one JSON object per section.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from containers.fastforward import fast_forward
from containers.power import PowerConfig, PowerModel
from topology.scenario import load_scenario


def bench_step(sizes: tuple[int, ...] = (1, 66, 1584)) -> dict[str, object]:
    out: dict[str, object] = {}
    for n in sizes:
        model = PowerModel(PowerConfig(), n)
        rng = np.random.default_rng(0)
        busy = rng.uniform(0, 1, n)
        bits = rng.uniform(0, 1e8, n)
        steps = 4000 if n == 1 else 1000
        runs, cpu = [], []
        for rep in range(7):
            sunlit = np.full(n, rep % 2 == 0)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                model.step(1.0, sunlit, None, busy, bits, bits, 780.0)
            runs.append((time.perf_counter() - t0) / steps * 1e6)
            cpu.append((time.process_time() - c0) / steps * 1e6)
        # CPU time as well: on a shared machine wall time includes waiting.
        out[f"S={n}"] = {
            "best_us": round(min(runs), 1),
            "median_us": round(statistics.median(runs), 1),
            "cpu_median_us": round(statistics.median(cpu), 1),
        }
    return {"section": "step", **out}


def bench_ageing(n: int = 1584) -> dict[str, object]:
    model = PowerModel(PowerConfig(), n)
    rng = np.random.default_rng(0)
    per_update = model.config.ageing_update_samples
    times = []
    for _ in range(5):
        # An hour of orbit-like samples: falling then rising SoC.
        for k in range(per_update):
            soc = 0.9 - 0.1 * np.sin(np.pi * k / per_update) + rng.normal(0, 1e-3, n)
            if k < per_update - 1:
                model.ageing.record(soc, np.full(n, 20.0), 60.0)
        t0 = time.perf_counter()
        model.ageing.record(soc, np.full(n, 20.0), 60.0)
        times.append((time.perf_counter() - t0) * 1e3)
    return {
        "section": "ageing",
        "satellites": n,
        "update_ms_median": round(statistics.median(times), 2),
        "update_ms_max": round(max(times), 2),
    }


def bench_forward(days: float, load: float) -> dict[str, object]:
    scenario = load_scenario()
    result = fast_forward(scenario, days, step_s=30.0, load=load)
    return {"section": "forward", "load": load, **result.summary()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*", default=["step", "ageing", "forward"])
    parser.add_argument("--days", type=float, default=2.0)
    parser.add_argument("--load", type=float, default=0.5)
    args = parser.parse_args()
    for section in args.sections:
        if section == "step":
            report = bench_step()
        elif section == "ageing":
            report = bench_ageing()
        elif section == "forward":
            report = bench_forward(args.days, args.load)
        else:
            parser.error(f"unknown section {section!r}")
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
