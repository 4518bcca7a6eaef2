"""Every metric the testbed exports: names, help texts, types and labels.

This module is the one place where metric names are defined. The
exporters (satellite agents, the emulator, the inference controller) build
their collectors from the table :data:`METRICS` in a registry they pass in;
nothing is registered at import time. Dashboards (`monitoring.dashboards`)
and the PNG report query these names.

Naming follows the Prometheus conventions and passes `promtool check
metrics`: one prefix (``spacemoe_``), base units in the name (``_seconds``,
``_bytes``, ``_joules``, ``_celsius``, ``_ratio`` for 0..1 quantities),
``_total`` on counters. Two choices need a word:

- Power is exported in ``_watts``. The Prometheus base unit of energy is the
  joule; power has no listed base unit and watts is what the power model and
  every reader use. The energy counters (``_joules_total``) let a reader take
  ``rate()`` for an average power over any window.
- Link rates are ``spacemoe_link_rate_bytes_per_second``. The configuration
  speaks bits per second (``rate_bps``), but Prometheus prefers bytes over
  bits (promtool rejects ``_bits``), and bytes per second lines up with the
  ``spacemoe_link_transmit_bytes_total`` counter: ``rate(transmit) / rate``
  is a utilisation ratio without a factor of 8.
- Latitude and longitude are ``_degrees``: Prometheus names no base unit for
  angles, and maps (Grafana's geomap, the PNG report) want degrees.

Per-link, per-node and per-satellite arrays are exported by custom
collectors (:class:`LinkCollector` and its siblings) that keep each entry's
rendered labels and render a scrape from arrays (`monitoring.exposition`);
with thousands of links this costs a fraction of one labelled child per
link and metric (`benchmarks/bench_monitoring.py` prints the figures).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# serve and Exporter live with the fast text exposition; re-exported here so
# exporters need one import.
from monitoring.exposition import ArrayFamily, Exporter, LabelRows, serve

__all__ = [
    "METRICS",
    "EmulatorMetrics",
    "Exporter",
    "InferenceMetrics",
    "LinkCollector",
    "NodeCollector",
    "PlacementCollector",
    "PowerCollector",
    "SatelliteMetrics",
    "metric_table",
    "serve",
    "spec",
]

log = logging.getLogger(__name__)

PREFIX = "spacemoe_"

# Where each exporter listens by default. Agents sit in their own network
# namespaces, so they can all use the same port on their management address.
AGENT_METRICS_PORT = 9471
EMULATOR_METRICS_PORT = 9470
INFERENCE_METRICS_PORT = 9472

Kind = Literal["gauge", "counter", "histogram"]

LOAD_SUBSYSTEMS = ("bus", "compute", "radio")
LATENCY_COMPONENTS = (
    "home_compute",
    "expert_compute",
    "serialization",
    "network",
    "queueing",
)

# Histogram buckets, in seconds or bytes, chosen around what the testbed
# sees: expert calls of a few ms to seconds under throttling, tokens of tens
# of ms to seconds across several hops, emulator steps of ms.
EXPERT_DURATION_BUCKETS_S = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10
)  # fmt: skip
TOKEN_LATENCY_BUCKETS_S = (
    0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30
)  # fmt: skip
COMPONENT_BUCKETS_S = (
    0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5
)  # fmt: skip
STEP_DURATION_BUCKETS_S = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2
)  # fmt: skip
TRANSFER_BUCKETS_BYTES = tuple(float(1024 * 4**i) for i in range(10))


@dataclass(frozen=True)
class MetricSpec:
    """Name, type, help text and label names of one exported metric.

    `name` is the name as exposed, counters included (``..._total``).
    `source` says which process exports it: satellite, emulator, inference.
    """

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...]
    source: str
    buckets: tuple[float, ...] = ()

    @property
    def base(self) -> str:
        """The name without ``_total``, as prometheus_client wants it."""
        return self.name.removesuffix("_total") if self.kind == "counter" else self.name


def _specs(*specs: MetricSpec) -> dict[str, MetricSpec]:
    return {s.name: s for s in specs}


SAT = ("satellite",)
LINK = ("link", "kind", "a", "b")
LINK_DIR = ("link", "kind", "src", "dst")

METRICS: dict[str, MetricSpec] = _specs(
    # Power, heat and battery of each satellite (agent, or the emulator when
    # it runs the power model for the whole constellation).
    MetricSpec("spacemoe_solar_power_watts", "gauge",
               "Electrical power delivered by the solar arrays.", SAT, "satellite"),
    MetricSpec("spacemoe_load_power_watts", "gauge",
               "Electrical power drawn, by subsystem (bus, compute, radio).",
               SAT + ("subsystem",), "satellite"),
    MetricSpec("spacemoe_battery_power_watts", "gauge",
               "Battery power; positive while charging, negative while "
               "discharging.", SAT, "satellite"),
    MetricSpec("spacemoe_battery_soc_ratio", "gauge",
               "Battery state of charge, 0 (empty) to 1 (full).", SAT, "satellite"),
    MetricSpec("spacemoe_battery_energy_joules", "gauge",
               "Energy stored in the battery.", SAT, "satellite"),
    MetricSpec("spacemoe_battery_capacity_fade_ratio", "gauge",
               "Fraction of the battery's initial capacity lost to ageing.",
               SAT, "satellite"),
    MetricSpec("spacemoe_temperature_celsius", "gauge",
               "Temperature of the compute payload.", SAT, "satellite"),
    MetricSpec("spacemoe_compute_throttle_ratio", "gauge",
               "Compute speed allowed by power and thermal limits, 1 = full "
               "speed.", SAT, "satellite"),
    MetricSpec("spacemoe_sunlit", "gauge",
               "1 while the satellite is in sunlight, 0 in eclipse.", SAT,
               "satellite"),
    MetricSpec("spacemoe_energy_consumed_joules_total", "counter",
               "Electrical energy drawn by all loads.", SAT, "satellite"),
    MetricSpec("spacemoe_solar_energy_joules_total", "counter",
               "Electrical energy delivered by the solar arrays.", SAT,
               "satellite"),
    # Expert serving on each satellite (agent).
    MetricSpec("spacemoe_expert_requests_total", "counter",
               "Expert requests handled, by layer, expert and status (ok, "
               "error, rejected).", SAT + ("layer", "expert", "status"),
               "satellite"),
    MetricSpec("spacemoe_expert_request_duration_seconds", "histogram",
               "Time from receiving an expert request to sending its reply.",
               SAT, "satellite", EXPERT_DURATION_BUCKETS_S),
    MetricSpec("spacemoe_expert_busy_seconds_total", "counter",
               "Time spent computing experts; its rate is the busy ratio.",
               SAT, "satellite"),
    MetricSpec("spacemoe_expert_queue_length", "gauge",
               "Expert requests waiting to be computed.", SAT, "satellite"),
    MetricSpec("spacemoe_expert_shards_loaded", "gauge",
               "Expert shards held in memory.", SAT, "satellite"),
    MetricSpec("spacemoe_expert_shard_bytes", "gauge",
               "Bytes of expert weights held in memory.", SAT, "satellite"),
    MetricSpec("spacemoe_expert_payload_bytes_total", "counter",
               "Activation bytes received (in) and sent (out) by expert "
               "requests.", SAT + ("direction",), "satellite"),
    # Links, nodes and the emulation loop (emulator, central).
    MetricSpec("spacemoe_link_delay_seconds", "gauge",
               "One-way propagation delay of the link.", LINK, "emulator"),
    MetricSpec("spacemoe_link_rate_bytes_per_second", "gauge",
               "Shaped rate of the link, per direction.", LINK, "emulator"),
    MetricSpec("spacemoe_link_up", "gauge",
               "1 while the link is up, 0 while it is down.", LINK, "emulator"),
    MetricSpec("spacemoe_link_loss_ratio", "gauge",
               "Configured packet loss probability of the link.", LINK,
               "emulator"),
    MetricSpec("spacemoe_link_transmit_bytes_total", "counter",
               "Bytes sent over the link from src to dst.", LINK_DIR, "emulator"),
    MetricSpec("spacemoe_link_dropped_packets_total", "counter",
               "Packets dropped on the link from src to dst (loss, queue "
               "overflow, link down).", LINK_DIR, "emulator"),
    MetricSpec("spacemoe_node_latitude_degrees", "gauge",
               "Geodetic latitude of the node (WGS84).", ("node", "kind"),
               "emulator"),
    MetricSpec("spacemoe_node_longitude_degrees", "gauge",
               "Longitude of the node (WGS84), -180 to 180.", ("node", "kind"),
               "emulator"),
    MetricSpec("spacemoe_node_altitude_meters", "gauge",
               "Height of the node above the WGS84 ellipsoid.", ("node", "kind"),
               "emulator"),
    MetricSpec("spacemoe_scenario_time_seconds", "gauge",
               "Scenario clock as seconds since the Unix epoch.", (), "emulator"),
    MetricSpec("spacemoe_emulator_step_lag_seconds", "gauge",
               "How far the last applied step lagged behind the scenario "
               "clock.", (), "emulator"),
    MetricSpec("spacemoe_emulator_step_duration_seconds", "histogram",
               "Wall time to compute and apply one timestep.", (), "emulator",
               STEP_DURATION_BUCKETS_S),
    MetricSpec("spacemoe_emulator_steps_total", "counter",
               "Timesteps applied.", (), "emulator"),
    MetricSpec("spacemoe_route_changes_total", "counter",
               "Routes installed, replaced or removed.", (), "emulator"),
    MetricSpec("spacemoe_link_changes_total", "counter",
               "Link changes applied, by change (up, down, delay, rate).",
               ("change",), "emulator"),
    # Inference (controller).
    MetricSpec("spacemoe_inference_token_latency_seconds", "histogram",
               "Time to produce one token, end to end.", (), "inference",
               TOKEN_LATENCY_BUCKETS_S),
    MetricSpec("spacemoe_inference_token_component_seconds", "histogram",
               "Time one token spent in each component (home_compute, "
               "expert_compute, serialization, network, queueing).",
               ("component",), "inference", COMPONENT_BUCKETS_S),
    MetricSpec("spacemoe_inference_token_transfer_bytes", "histogram",
               "Bytes sent over the network to produce one token.", (),
               "inference", TRANSFER_BUCKETS_BYTES),
    MetricSpec("spacemoe_inference_tokens_total", "counter",
               "Tokens processed, by phase (prompt, generated).", ("phase",),
               "inference"),
    MetricSpec("spacemoe_inference_requests_total", "counter",
               "Generation requests finished, by status (ok, error, timeout).",
               ("status",), "inference"),
    MetricSpec("spacemoe_inference_request_duration_seconds", "histogram",
               "Time to serve one generation request.", (), "inference",
               TOKEN_LATENCY_BUCKETS_S),
    MetricSpec("spacemoe_expert_placement", "gauge",
               "1 for each (layer, expert) replica placed on a node.",
               ("layer", "expert", "node"), "inference"),
    MetricSpec("spacemoe_expert_migrations_total", "counter",
               "Expert replicas moved or added by the placement.", (),
               "inference"),
)  # fmt: skip


def spec(name: str) -> MetricSpec:
    """The spec of metric `name` (the exposed name, with ``_total``)."""
    try:
        return METRICS[name]
    except KeyError:
        raise KeyError(f"{name!r} is not a metric defined in {__name__}") from None


def _gauge(registry: CollectorRegistry, name: str) -> Gauge:
    s = spec(name)
    return Gauge(s.name, s.help, s.labels, registry=registry)


def _counter(registry: CollectorRegistry, name: str) -> Counter:
    s = spec(name)
    return Counter(s.base, s.help, s.labels, registry=registry)


def _histogram(registry: CollectorRegistry, name: str) -> Histogram:
    s = spec(name)
    return Histogram(s.name, s.help, s.labels, registry=registry, buckets=s.buckets)


def _family(name: str) -> Metric:
    s = spec(name)
    return Metric(s.base, s.help, s.kind)


def _fill(name: str, rows: LabelRows, values: list[float]) -> ArrayFamily:
    """Family `name` with one sample per (label row, value)."""
    s = spec(name)
    return ArrayFamily(s.base, s.help, s.kind, rows, values)


def _check_lengths(n: int, arrays: Mapping[str, Any]) -> dict[str, list[float]]:
    """Each array as a list of floats, after checking it has `n` entries."""
    out = {}
    for key, values in arrays.items():
        flat = np.asarray(values, dtype=float).reshape(-1)
        if flat.shape[0] != n:
            raise ValueError(f"{key}: got {flat.shape[0]} values, expected {n}")
        out[key] = flat.tolist()
    return out


class _ArrayCollector(Collector):
    """Base of the collectors that export arrays as metric families.

    `update` builds a complete snapshot and swaps it in with one assignment,
    so a scrape running in the exporter's thread sees one whole timestep.
    """

    names: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._snapshot: Sequence[Metric] = ()

    def describe(self) -> Iterable[Metric]:
        # Lets the registry detect clashing names at registration.
        return [_family(n) for n in self.names]

    def collect(self) -> Iterable[Metric]:
        return self._snapshot


class PowerCollector(_ArrayCollector):
    """Power, heat and battery of one or many satellites, from arrays.

    An agent uses it with one satellite; the emulator can use it for the whole
    constellation when it runs the power model centrally. Use one or the
    other for a satellite, not both, or Prometheus holds two copies.
    """

    names = (
        "spacemoe_solar_power_watts",
        "spacemoe_load_power_watts",
        "spacemoe_battery_power_watts",
        "spacemoe_battery_soc_ratio",
        "spacemoe_battery_energy_joules",
        "spacemoe_battery_capacity_fade_ratio",
        "spacemoe_temperature_celsius",
        "spacemoe_compute_throttle_ratio",
        "spacemoe_sunlit",
        "spacemoe_energy_consumed_joules_total",
        "spacemoe_solar_energy_joules_total",
    )

    def __init__(self, satellites: Sequence[str]) -> None:
        super().__init__()
        self.satellites = list(satellites)
        self._rows = LabelRows([{"satellite": s} for s in self.satellites])
        self._load_rows = LabelRows(
            [
                {"satellite": s, "subsystem": sub}
                for sub in LOAD_SUBSYSTEMS
                for s in self.satellites
            ]
        )

    def update(
        self,
        *,
        solar_w: Any,
        load_bus_w: Any,
        load_compute_w: Any,
        load_radio_w: Any,
        battery_w: Any,
        soc_fraction: Any,
        battery_energy_j: Any,
        capacity_fade_fraction: Any,
        temperature_c: Any,
        throttle_factor: Any,
        sunlit: Any,
        energy_consumed_j: Any,
        energy_harvested_j: Any,
    ) -> None:
        """Publish one sample per satellite (arrays in `satellites` order).

        The two energy values are cumulative since the model started; they
        are exported as counters and must not decrease.
        """
        v = _check_lengths(
            len(self.satellites),
            {
                "solar_w": solar_w,
                "bus": load_bus_w,
                "compute": load_compute_w,
                "radio": load_radio_w,
                "battery_w": battery_w,
                "soc_fraction": soc_fraction,
                "battery_energy_j": battery_energy_j,
                "capacity_fade_fraction": capacity_fade_fraction,
                "temperature_c": temperature_c,
                "throttle_factor": throttle_factor,
                "sunlit": sunlit,
                "energy_consumed_j": energy_consumed_j,
                "energy_harvested_j": energy_harvested_j,
            },
        )
        per_sat = [
            ("spacemoe_solar_power_watts", "solar_w"),
            ("spacemoe_battery_power_watts", "battery_w"),
            ("spacemoe_battery_soc_ratio", "soc_fraction"),
            ("spacemoe_battery_energy_joules", "battery_energy_j"),
            ("spacemoe_battery_capacity_fade_ratio", "capacity_fade_fraction"),
            ("spacemoe_temperature_celsius", "temperature_c"),
            ("spacemoe_compute_throttle_ratio", "throttle_factor"),
            ("spacemoe_sunlit", "sunlit"),
            ("spacemoe_energy_consumed_joules_total", "energy_consumed_j"),
            ("spacemoe_solar_energy_joules_total", "energy_harvested_j"),
        ]
        families = [_fill(name, self._rows, v[key]) for name, key in per_sat]
        load = [x for sub in LOAD_SUBSYSTEMS for x in v[sub]]
        families.append(_fill("spacemoe_load_power_watts", self._load_rows, load))
        self._snapshot = families


class LinkCollector(_ArrayCollector):
    """Delay, rate, state and traffic of every link, from arrays.

    Link identity (name, kind, endpoints) is re-labelled only when it
    changes; a timestep that only moves delays costs one list per metric.
    """

    names = (
        "spacemoe_link_delay_seconds",
        "spacemoe_link_rate_bytes_per_second",
        "spacemoe_link_up",
        "spacemoe_link_loss_ratio",
        "spacemoe_link_transmit_bytes_total",
        "spacemoe_link_dropped_packets_total",
    )

    def __init__(self) -> None:
        super().__init__()
        self._identity: tuple[tuple[str, ...], ...] = ()
        self._rows = LabelRows([])
        self._both_ways = LabelRows([])

    def update(
        self,
        names: Sequence[str],
        kinds: Sequence[str],
        a: Sequence[str],
        b: Sequence[str],
        *,
        delay_s: Any,
        rate_bps: Any,
        up: Any,
        loss_fraction: Any = None,
        tx_bytes_ab: Any = None,
        tx_bytes_ba: Any = None,
        dropped_packets_ab: Any = None,
        dropped_packets_ba: Any = None,
    ) -> None:
        """Publish the state of all links (arrays in `names` order).

        Rates are given in bits per second, as the configuration has them,
        and exported in bytes per second. Byte and drop counts are cumulative
        per direction (a to b, b to a); leave them out where not measured.
        """
        n = len(names)
        identity = (tuple(names), tuple(kinds), tuple(a), tuple(b))
        if identity != self._identity:
            if not len(kinds) == len(a) == len(b) == n:
                raise ValueError(
                    f"link names, kinds and endpoints differ in length: "
                    f"{n}, {len(kinds)}, {len(a)}, {len(b)}"
                )
            self._identity = identity
            rows = list(zip(names, kinds, a, b, strict=True))
            self._rows = LabelRows(
                [{"link": ln, "kind": k, "a": x, "b": y} for ln, k, x, y in rows]
            )
            # Directional counters: every a-to-b entry, then every b-to-a.
            self._both_ways = LabelRows(
                [{"link": ln, "kind": k, "src": x, "dst": y} for ln, k, x, y in rows]
                + [{"link": ln, "kind": k, "src": y, "dst": x} for ln, k, x, y in rows]
            )

        arrays = {
            "delay_s": delay_s,
            "rate_Bps": np.asarray(rate_bps, dtype=float) / 8.0,
            "up": np.asarray(up, dtype=float),
        }
        optional = {
            "loss_fraction": loss_fraction,
            "tx_bytes_ab": tx_bytes_ab,
            "tx_bytes_ba": tx_bytes_ba,
            "dropped_packets_ab": dropped_packets_ab,
            "dropped_packets_ba": dropped_packets_ba,
        }
        arrays.update({k: x for k, x in optional.items() if x is not None})
        v = _check_lengths(n, arrays)

        families = [
            _fill("spacemoe_link_delay_seconds", self._rows, v["delay_s"]),
            _fill("spacemoe_link_rate_bytes_per_second", self._rows, v["rate_Bps"]),
            _fill("spacemoe_link_up", self._rows, v["up"]),
        ]
        if "loss_fraction" in v:
            families.append(
                _fill("spacemoe_link_loss_ratio", self._rows, v["loss_fraction"])
            )
        for name, key in (
            ("spacemoe_link_transmit_bytes_total", "tx_bytes"),
            ("spacemoe_link_dropped_packets_total", "dropped_packets"),
        ):
            if f"{key}_ab" in v and f"{key}_ba" in v:
                families.append(
                    _fill(name, self._both_ways, v[f"{key}_ab"] + v[f"{key}_ba"])
                )
        self._snapshot = families


class NodeCollector(_ArrayCollector):
    """Positions of satellites and ground stations, for maps."""

    names = (
        "spacemoe_node_latitude_degrees",
        "spacemoe_node_longitude_degrees",
        "spacemoe_node_altitude_meters",
    )

    def __init__(self) -> None:
        super().__init__()
        self._identity: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
        self._rows = LabelRows([])

    def update(
        self,
        names: Sequence[str],
        kinds: Sequence[str],
        *,
        lat_deg: Any,
        lon_deg: Any,
        alt_m: Any,
    ) -> None:
        """Publish node positions; `kinds` are "satellite" or "ground"."""
        identity = (tuple(names), tuple(kinds))
        if identity != self._identity:
            self._identity = identity
            self._rows = LabelRows(
                [{"node": n, "kind": k} for n, k in zip(names, kinds, strict=True)]
            )
        v = _check_lengths(
            len(names), {"lat_deg": lat_deg, "lon_deg": lon_deg, "alt_m": alt_m}
        )
        self._snapshot = [
            _fill("spacemoe_node_latitude_degrees", self._rows, v["lat_deg"]),
            _fill("spacemoe_node_longitude_degrees", self._rows, v["lon_deg"]),
            _fill("spacemoe_node_altitude_meters", self._rows, v["alt_m"]),
        ]


class PlacementCollector(_ArrayCollector):
    """Which node holds which (layer, expert): one series per replica.

    Built from the current placement on every update, so a replica that
    moves away stops being exported (its series goes stale in Prometheus)
    instead of lingering at 0.
    """

    names = ("spacemoe_expert_placement",)

    def update(self, placement: Mapping[tuple[int, int], Iterable[str]]) -> None:
        """`placement` maps (layer, expert) to the nodes holding a replica."""
        rows = LabelRows(
            [
                {"layer": str(layer), "expert": str(expert), "node": node}
                for (layer, expert), nodes in sorted(placement.items())
                for node in sorted(set(nodes))
            ]
        )
        self._snapshot = [_fill("spacemoe_expert_placement", rows, [1.0] * len(rows))]


class SatelliteMetrics:
    """What one satellite agent exports: power state and expert serving.

    Every series carries ``satellite=<name>``, set here rather than by the
    scrape target, so the same queries work when the emulator exports power
    for all satellites.
    """

    def __init__(self, registry: CollectorRegistry, satellite: str) -> None:
        self.satellite = satellite
        self.power = PowerCollector([satellite])
        registry.register(self.power)
        self._requests = _counter(registry, "spacemoe_expert_requests_total")
        self._duration = _histogram(
            registry, "spacemoe_expert_request_duration_seconds"
        ).labels(satellite)
        self._busy = _counter(registry, "spacemoe_expert_busy_seconds_total").labels(
            satellite
        )
        self._queue = _gauge(registry, "spacemoe_expert_queue_length").labels(satellite)
        self._shards = _gauge(registry, "spacemoe_expert_shards_loaded").labels(
            satellite
        )
        self._shard_bytes = _gauge(registry, "spacemoe_expert_shard_bytes").labels(
            satellite
        )
        payload = _counter(registry, "spacemoe_expert_payload_bytes_total")
        self._bytes_in = payload.labels(satellite, "in")
        self._bytes_out = payload.labels(satellite, "out")

    def set_power(self, **values: float) -> None:
        """Publish this satellite's power state; see PowerCollector.update."""
        self.power.update(**{k: [x] for k, x in values.items()})

    def observe_request(
        self,
        layer: int,
        expert: int,
        status: str,
        duration_s: float,
        busy_s: float,
        bytes_in: int,
        bytes_out: int,
    ) -> None:
        """Count one expert request: its outcome, time, compute time, bytes."""
        self._requests.labels(self.satellite, str(layer), str(expert), status).inc()
        self._duration.observe(duration_s)
        self._busy.inc(busy_s)
        self._bytes_in.inc(bytes_in)
        self._bytes_out.inc(bytes_out)

    def set_queue_length(self, n: int) -> None:
        """Requests waiting for compute right now."""
        self._queue.set(n)

    def set_shards(self, count: int, total_bytes: int) -> None:
        """Shards held in memory and their size."""
        self._shards.set(count)
        self._shard_bytes.set(total_bytes)


class EmulatorMetrics:
    """What the emulator exports centrally: links, nodes, its own loop.

    `power_satellites` adds a :class:`PowerCollector` for those satellites,
    for when the emulator runs the power model for the whole constellation
    (then the agents must not export power themselves).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        power_satellites: Sequence[str] | None = None,
    ) -> None:
        self.links = LinkCollector()
        self.nodes = NodeCollector()
        registry.register(self.links)
        registry.register(self.nodes)
        self.power: PowerCollector | None = None
        if power_satellites is not None:
            self.power = PowerCollector(power_satellites)
            registry.register(self.power)
        self._time = _gauge(registry, "spacemoe_scenario_time_seconds")
        self._lag = _gauge(registry, "spacemoe_emulator_step_lag_seconds")
        self._step = _histogram(registry, "spacemoe_emulator_step_duration_seconds")
        self._steps = _counter(registry, "spacemoe_emulator_steps_total")
        self._routes = _counter(registry, "spacemoe_route_changes_total")
        self._changes = _counter(registry, "spacemoe_link_changes_total")

    def step_done(
        self,
        scenario_time_s: float,
        duration_s: float,
        lag_s: float,
        route_changes: int,
        link_changes: Mapping[str, int],
    ) -> None:
        """Count one applied timestep.

        `link_changes` maps a change kind (up, down, delay, rate) to how many
        links it touched in this step.
        """
        self._time.set(scenario_time_s)
        self._step.observe(duration_s)
        self._lag.set(lag_s)
        self._steps.inc()
        self._routes.inc(route_changes)
        for change, count in link_changes.items():
            self._changes.labels(change).inc(count)


class InferenceMetrics:
    """What the inference controller exports: token latency and placement."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.placement = PlacementCollector()
        registry.register(self.placement)
        self._latency = _histogram(registry, "spacemoe_inference_token_latency_seconds")
        component = _histogram(registry, "spacemoe_inference_token_component_seconds")
        self._components = {c: component.labels(c) for c in LATENCY_COMPONENTS}
        self._transfer = _histogram(registry, "spacemoe_inference_token_transfer_bytes")
        self._tokens = _counter(registry, "spacemoe_inference_tokens_total")
        self._requests = _counter(registry, "spacemoe_inference_requests_total")
        self._request_time = _histogram(
            registry, "spacemoe_inference_request_duration_seconds"
        )
        self._migrations = _counter(registry, "spacemoe_expert_migrations_total")

    def observe_token(
        self,
        latency_s: float,
        components_s: Mapping[str, float],
        transfer_bytes: int,
    ) -> None:
        """Record one generated token and where its time went.

        `components_s` maps each of LATENCY_COMPONENTS to seconds; missing
        components count as 0 so every component's histogram stays aligned
        with the token count.
        """
        unknown = set(components_s) - set(LATENCY_COMPONENTS)
        if unknown:
            raise ValueError(
                f"unknown latency components {sorted(unknown)}; expected some of "
                f"{', '.join(LATENCY_COMPONENTS)}"
            )
        self._latency.observe(latency_s)
        for name, child in self._components.items():
            child.observe(components_s.get(name, 0.0))
        self._transfer.observe(transfer_bytes)
        self._tokens.labels("generated").inc()

    def count_prompt_tokens(self, n: int) -> None:
        """Tokens of a prompt processed (prefill)."""
        self._tokens.labels("prompt").inc(n)

    def request_done(self, status: str, duration_s: float) -> None:
        """One generation request finished with `status` (ok, error, timeout)."""
        self._requests.labels(status).inc()
        self._request_time.observe(duration_s)

    def set_placement(
        self,
        placement: Mapping[tuple[int, int], Iterable[str]],
        migrations: int = 0,
    ) -> None:
        """Publish the current placement and count replicas moved to reach it."""
        self.placement.update(placement)
        self._migrations.inc(migrations)


def metric_table() -> str:
    """The metric list as a Markdown table, for docs/monitoring.md."""
    rows = [
        "| Metric | Type | Labels | Exported by | Meaning |",
        "|---|---|---|---|---|",
    ]
    for s in METRICS.values():
        labels = ", ".join(s.labels) or "-"
        rows.append(f"| `{s.name}` | {s.kind} | {labels} | {s.source} | {s.help} |")
    return "\n".join(rows) + "\n"
