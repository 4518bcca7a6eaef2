"""Real exporters fed with plausible, changing values, for monitoring tests.

Until the emulator, agents and controller run in a test scenario, this
drives the real exporter classes of `monitoring.metrics` the way they will:
six satellites in one polar plane move on a circular orbit (sped up so a
test of seconds sees them travel), two of them run agents that export power
and expert serving, the emulator exports links and positions, and the
controller exports tokens and a placement that changes every few seconds.
The values are made up; the exporters, HTTP servers, Prometheus and queries
are the real ones.
"""

from __future__ import annotations

import math
import random
import threading
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from monitoring.metrics import (
    LATENCY_COMPONENTS,
    EmulatorMetrics,
    Exporter,
    InferenceMetrics,
    SatelliteMetrics,
    serve,
)

SATELLITES = [f"s0-{i}" for i in range(6)]
AGENTS = SATELLITES[:2]
STATIONS = {"oslo": (59.91, 10.75), "nuuk": (64.18, -51.72)}
# A 100-minute orbit and Earth's rotation, both 100 times faster.
ORBIT_PERIOD_S = 60.0
EARTH_ROTATION_S = 864.0
INCLINATION_DEG = 86.4


@dataclass
class Feeder:
    """Starts the exporters and a thread that updates them every `tick_s`."""

    tick_s: float = 0.2
    exporters: dict[str, Exporter] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._rng = random.Random(7)
        self._t0 = time.time()
        emulator_registry = CollectorRegistry()
        self.emulator = EmulatorMetrics(emulator_registry)
        self.agents = {}
        for sat in AGENTS:
            registry = CollectorRegistry()
            self.agents[sat] = SatelliteMetrics(registry, sat)
            self.exporters[sat] = serve(registry, "127.0.0.1", 0)
        inference_registry = CollectorRegistry()
        self.inference = InferenceMetrics(inference_registry)
        self.exporters["emulator"] = serve(emulator_registry, "127.0.0.1", 0)
        self.exporters["inference"] = serve(inference_registry, "127.0.0.1", 0)

        self._soc = {sat: 0.7 for sat in AGENTS}
        self._energy = {sat: [0.0, 0.0] for sat in AGENTS}
        self._bytes = [0.0] * 16
        self._tick()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for exporter in self.exporters.values():
            exporter.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            self._tick()

    def _tick(self) -> None:
        t = time.time() - self._t0
        positions = {sat: _position(i, t) for i, sat in enumerate(SATELLITES)}
        self._emulator(t, positions)
        for sat in AGENTS:
            self._agent(sat, positions[sat])
        self._controller(t)

    def _emulator(self, t: float, positions: dict) -> None:
        names = list(SATELLITES) + list(STATIONS)
        lat = [positions[s][0] for s in SATELLITES] + [v[0] for v in STATIONS.values()]
        lon = [positions[s][1] for s in SATELLITES] + [v[1] for v in STATIONS.values()]
        kinds = ["satellite"] * len(SATELLITES) + ["ground"] * len(STATIONS)
        self.emulator.nodes.update(
            names, kinds, lat_deg=lat, lon_deg=lon, alt_m=[780e3] * 6 + [20.0, 20.0]
        )

        # A ring of intra-plane links, and each station linked to the
        # satellite nearest to it (up only above ~40 degrees latitude).
        links = [(SATELLITES[i], SATELLITES[(i + 1) % 6], "isl") for i in range(6)]
        for gs, (glat, glon) in STATIONS.items():
            near = min(SATELLITES, key=lambda s: _dist(positions[s], (glat, glon)))
            links.append((near, gs, "gsl"))
        delay = [0.0135 + 0.0005 * math.sin(t + i) for i in range(6)] + [
            0.003 + 0.001 * math.sin(t), 0.004
        ]  # fmt: skip
        up = [1] * 5 + [int(t % 20 < 15)] + [1, 1]
        n = len(links)
        for i in range(2 * n):
            self._bytes[i] += self._rng.uniform(1e5, 1e6) * (up[i % n])
        self.emulator.links.update(
            [f"{k}-{i}" for i, (_, _, k) in enumerate(links)],
            [k for _, _, k in links],
            [a for a, _, _ in links],
            [b for _, b, _ in links],
            delay_s=delay,
            rate_bps=[100e6] * 6 + [50e6] * 2,
            up=up,
            loss_fraction=[0.0] * n,
            tx_bytes_ab=self._bytes[:n],
            tx_bytes_ba=self._bytes[n : 2 * n],
            dropped_packets_ab=[0] * n,
            dropped_packets_ba=[0] * n,
        )
        self.emulator.step_done(
            scenario_time_s=1.7743e9 + t,
            duration_s=self._rng.uniform(0.002, 0.02),
            lag_s=self._rng.uniform(0.0, 0.005),
            route_changes=self._rng.randint(0, 3),
            link_changes={"delay": 6, "up": 0, "down": 0},
        )

    def _agent(self, sat: str, position: tuple[float, float]) -> None:
        sunlit = position[1] > -90  # crude day side
        solar = 180.0 if sunlit else 0.0
        compute = self._rng.uniform(20, 60)
        load = 40.0 + compute + 15.0
        battery = solar - load
        self._soc[sat] = min(1.0, max(0.2, self._soc[sat] + battery * 1e-5))
        self._energy[sat][0] += load * self.tick_s
        self._energy[sat][1] += solar * self.tick_s
        self.agents[sat].set_power(
            solar_w=solar,
            load_bus_w=40.0,
            load_compute_w=compute,
            load_radio_w=15.0,
            battery_w=battery,
            soc_fraction=self._soc[sat],
            battery_energy_j=self._soc[sat] * 360e3,
            capacity_fade_fraction=0.002,
            temperature_c=20 + compute / 4,
            throttle_factor=1.0 if compute < 55 else 0.8,
            sunlit=float(sunlit),
            energy_consumed_j=self._energy[sat][0],
            energy_harvested_j=self._energy[sat][1],
        )
        for _ in range(self._rng.randint(1, 4)):
            busy = self._rng.uniform(0.002, 0.02)
            self.agents[sat].observe_request(
                layer=self._rng.randrange(4),
                expert=self._rng.randrange(8),
                status="ok" if self._rng.random() > 0.05 else "error",
                duration_s=busy + self._rng.uniform(0.0, 0.01),
                busy_s=busy,
                bytes_in=4096,
                bytes_out=4096,
            )
        self.agents[sat].set_queue_length(self._rng.randint(0, 3))
        self.agents[sat].set_shards(8, 8 * 2_097_152)

    def _controller(self, t: float) -> None:
        for _ in range(3):
            parts = {c: self._rng.uniform(0.001, 0.03) for c in LATENCY_COMPONENTS}
            self.inference.observe_token(
                sum(parts.values()),
                parts,
                transfer_bytes=self._rng.randint(8_000, 60_000),
            )
        self.inference.count_prompt_tokens(5)
        self.inference.request_done("ok", self._rng.uniform(0.5, 2.0))
        shift = int(t // 4)
        placement = {
            (layer, expert): [AGENTS[(layer + expert + shift) % 2]]
            for layer in range(4)
            for expert in range(8)
        }
        self.inference.set_placement(placement, migrations=32 if t % 4 < 0.2 else 0)


def _position(index: int, t: float) -> tuple[float, float]:
    """(lat, lon) in degrees on a circular orbit over a spherical Earth."""
    u = 2 * math.pi * (t / ORBIT_PERIOD_S + index / 6)
    inc = math.radians(INCLINATION_DEG)
    lat = math.degrees(math.asin(math.sin(inc) * math.sin(u)))
    lon = math.degrees(math.atan2(math.cos(inc) * math.sin(u), math.cos(u)))
    lon += 20 - 360 * t / EARTH_ROTATION_S
    return lat, (lon + 180) % 360 - 180


def _dist(p: tuple[float, float], q: tuple[float, float]) -> float:
    return (p[0] - q[0]) ** 2 + ((p[1] - q[1] + 180) % 360 - 180) ** 2
