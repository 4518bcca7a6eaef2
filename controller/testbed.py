"""A whole running scenario: network, satellites' runtime, power, monitoring.

:class:`Testbed` is what `spacemoe up` runs. It composes the parts the
other packages build:

1. the emulated network (:class:`topology.emulator.Emulator`): namespaces,
   shaped links and routes that follow the geometry every timestep;
2. the power, heat and battery model of every satellite
   (:class:`containers.power.PowerModel`, vectorised over the
   constellation), stepped with the emulator, charged with the expert work
   the agents report and throttling them in turn through a
   :class:`containers.powershare.PowerShare`;
3. the satellites' runtime (:class:`controller.deployment.Deployment`):
   a Mosquitto broker and a forked agent on every node the placement uses,
   holding its expert shards; `spacemoe infer` then reaches them from home
   across the emulated links, using ``run_dir()/moe.json``;
4. monitoring: the central exporter (links, nodes, power, loop timing) on
   127.0.0.1, the agents' exporters on their management addresses, and a
   Prometheus server that scrapes them by file-based discovery.

Power metrics come from the central model for every satellite, not from
the agents, so satellites without experts are watched too and Prometheus
holds one copy of each series.

Everything started here is stopped by :meth:`Testbed.down`, which also runs
when bring-up fails halfway; `spacemoe clean` finds what a crashed run left
by the pid files and names under the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from topology.config import from_dict
from topology.errors import (
    ConfigError,
    EmulationError,
    InferenceError,
    InferenceTimeout,
    SpaceMoeError,
)
from topology.rundir import namespace_name, run_dir
from topology.scenario import Scenario, load_scenario

log = logging.getLogger(__name__)

Say = Callable[[str], None]

EMULATOR_METRICS_PORT = 9470
PROMETHEUS_PORT = 9090
READY_TIMEOUT_S = 300.0
# Lines the CLI prints for long steps (see controller.cli._progress).
PROGRESS_PREFIX = "  .. "
# Link counters are read from about this many nodes' namespaces per step.
TRAFFIC_NODES_PER_STEP = 200


def require_root() -> None:
    """Raise a clear error unless we run as root."""
    if os.geteuid() != 0:
        raise EmulationError(
            "this command needs root (network namespaces, tc, iptables); run it "
            "with sudo, or use `spacemoe snapshot` for geometry only"
        )


def moe_config(scenario: Scenario) -> Any:
    """The scenario's `moe` section, validated."""
    from controller.inference import MoeConfig

    # A relative checkpoint path means relative to the scenario file, as
    # tle_file does, so a scenario and its model can move together.
    section = dict(scenario.moe or {})
    checkpoint = section.get("checkpoint")
    if isinstance(checkpoint, str) and scenario.source:
        expanded = Path(checkpoint).expanduser()
        if not expanded.is_absolute():
            expanded = Path(scenario.source).parent / expanded
        section["checkpoint"] = str(expanded)
    return from_dict(MoeConfig, section, "moe")


class Testbed:
    """One scenario brought up with everything that runs on it."""

    def __init__(
        self,
        scenario: Scenario,
        moe: bool = True,
        monitoring: bool = True,
        start_at_unix_s: float | None = None,
    ) -> None:
        from containers.power_config import load_power_config

        self.scenario = scenario
        # Wall-clock time of scenario time 0, shared by all partitions.
        self.start_at_unix_s = start_at_unix_s
        self.with_moe = moe
        self.with_monitoring = monitoring
        self.moe = moe_config(scenario)
        self.power_config = load_power_config(scenario.power)
        if self.moe.replace_every_s > 0 and scenario.emulation.partitions:
            raise ConfigError(
                f"moe.replace_every_s: {self.moe.replace_every_s} re-places experts "
                "during the run, which partitioned runs do not support yet (each "
                "host sees only its own satellites' batteries); set it to 0"
            )
        self.emulator: Any = None
        self.power: Any = None
        self.share: Any = None
        self.deployment: Any = None
        self.replacer: Any = None
        # What moe.json says besides the placement, and its rounds so far.
        self._moe_doc: dict[str, Any] = {}
        self._placement_round = -1
        self._metrics_addrs: dict[str, str] = {}
        self.prometheus: Any = None
        self.exporter: Any = None
        self.metrics: Any = None
        self.inference_metrics: Any = None
        self._reports_seen: set[str] = set()
        # Token rows each (layer, expert) served in this run's generations.
        self.expert_load: dict[tuple[int, int], float] = {}
        self._exported_j: dict[str, np.ndarray] = {}
        self._busy_seen_s: np.ndarray | None = None
        self._sent_seen: np.ndarray | None = None
        self._link_sent: np.ndarray | None = None
        self._link_dropped: np.ndarray | None = None
        self._steps_since_traffic = 0
        self._last_power_t_s = 0.0
        self._stop = threading.Event()

    @classmethod
    def from_args(
        cls,
        scenario_path: str | None,
        moe: bool = True,
        monitoring: bool = True,
        duration_s: float | None = None,
        speed: float | None = None,
        partition: int | None = None,
        start_at_unix_s: float | None = None,
    ) -> Testbed:
        """A testbed for a scenario file, with command-line overrides."""
        scenario = load_scenario(scenario_path)
        if partition is not None:
            emulation = from_dict(
                type(scenario.emulation),
                {
                    **dataclasses.asdict(scenario.emulation),
                    "partition_index": partition,
                },
                "emulation",
            )
            scenario = dataclasses.replace(scenario, emulation=emulation)
        changes: dict[str, Any] = {}
        if duration_s is not None:
            changes["duration_s"] = duration_s
        if speed is not None:
            changes["speed"] = speed
        if changes:
            time_config = from_dict(
                type(scenario.time),
                {**dataclasses.asdict(scenario.time), **changes},
                "time",
            )
            scenario = dataclasses.replace(scenario, time=time_config)
        return cls(
            scenario, moe=moe, monitoring=monitoring, start_at_unix_s=start_at_unix_s
        )

    # -- bring-up --------------------------------------------------------

    def up(self, say: Say | None = None) -> None:
        """Bring everything up; on any failure, take down what was built."""
        say = say or (lambda message: None)
        require_root()
        from containers.power import PowerModel
        from containers.powershare import PowerShare
        from topology.emulator import Emulator

        try:
            say(f"building {self.scenario.name!r}")
            self.emulator = Emulator(self.scenario)

            def progress(phase: str, done: int, total: int) -> None:
                if done == total or done % max(1, total // 4) == 0:
                    say(f"{phase}: {done}/{total}")

            self.emulator.up(progress)
            names = self.emulator.names
            n_sats = self.emulator.n_sats
            self.power = PowerModel(self.power_config, n_sats, names[:n_sats])
            self.share = PowerShare(run_dir() / "power.share", len(names), create=True)
            self._busy_seen_s = np.zeros(len(names))
            # Reports of earlier runs in the same directory are not this run's.
            self._reports_seen = {
                p.name for p in (run_dir() / "results").glob("infer-*.json")
            }
            if self.with_monitoring:
                say("starting Prometheus and exporters")
                self._start_monitoring()
            if self.with_moe:
                say("starting brokers and expert agents")
                self._start_moe()
            self._on_step(None)
            if self.prometheus is not None:
                self._wait_for_first_scrapes()
        except BaseException:
            log.error("bring-up failed; taking down what was started")
            self.down()
            raise

    def _start_monitoring(self) -> None:
        from prometheus_client import CollectorRegistry

        from monitoring.metrics import EmulatorMetrics, InferenceMetrics, serve
        from monitoring.prometheus import PrometheusServer

        names = self.emulator.names
        registry = CollectorRegistry()
        self._registry = registry
        # Each host exports its own nodes; its Prometheus scrapes only them.
        local = self.emulator.local
        self.metrics = EmulatorMetrics(
            registry,
            power_satellites=[
                name for i, name in enumerate(names[: self.emulator.n_sats]) if local[i]
            ],
        )
        # `spacemoe infer` runs are short-lived processes; their reports are
        # fed to these long-lived series (see _ingest_reports).
        self.inference_metrics = InferenceMetrics(registry)
        self.exporter = serve(registry, "127.0.0.1", EMULATOR_METRICS_PORT)
        self.prometheus = PrometheusServer(
            run_dir(),
            port=PROMETHEUS_PORT,
            emulator_target=f"127.0.0.1:{EMULATOR_METRICS_PORT}",
        )
        self.prometheus.start()

    def _start_moe(self) -> None:
        from controller.deployment import Deployment, ensure_shards, place_experts
        from controller.inference import Endpoint
        from controller.replacement import Replacer
        from moe.shards import load_manifest

        emulator = self.emulator
        names = emulator.names
        satellites = names[: emulator.n_sats]
        stations = names[emulator.n_sats :]
        home = self.moe.home or (stations[0] if stations else satellites[0])
        if home not in names:
            raise ConfigError(
                f"moe.home: {home!r} is not a node of scenario "
                f"{self.scenario.name!r}; use one of its ground stations {stations}"
            )

        shard_dir = ensure_shards(self.moe.checkpoint)
        manifest = load_manifest(shard_dir)
        experts = [(e.layer, e.expert) for e in manifest.shards]
        placed = place_experts(
            self.moe,
            experts,
            satellites,
            names,
            self._placement_context(home),
            scenario=self.scenario,
        )
        placement = placed.placement

        nodes_json = {n["name"]: n for n in emulator.state()["nodes"]}
        endpoints = {
            name: Endpoint(name, str(nodes_json[name]["address"]).split("/")[0])
            for name in names
        }
        self._metrics_addrs = {}
        if self.with_monitoring:
            self._metrics_addrs = {
                name: str(nodes_json[name]["management"]).split("/")[0]
                for name in names
                if nodes_json[name].get("management")
            }
        self.deployment = Deployment(
            endpoints,
            shard_dir,
            namespaces=True,
            metrics_addrs=self._metrics_addrs,
            power_share=self.share.path,
            power_rows={name: i for i, name in enumerate(names)},
        )
        # Partitioned, each host starts the brokers and agents of its own
        # placed nodes; the other hosts start theirs (same placement).
        placed_here = sorted(
            {n for holders in placement.values() for n in holders}
            & {n for i, n in enumerate(names) if emulator.local[i]}
        )
        self.deployment.start(placement, nodes=placed_here)
        self._moe_doc = {
            "home": home,
            "endpoints": {n: dataclasses.asdict(e) for n, e in endpoints.items()},
            "shard_dir": str(shard_dir),
            "config": dataclasses.asdict(self.moe),
        }
        self._publish_placement(placed, emulator.t_s, moved=0)
        if self.moe.replace_every_s > 0:
            self.replacer = Replacer(
                self.moe,
                self.scenario,
                experts,
                satellites,
                names,
                endpoints,
                self.deployment,
                placement,
                on_change=lambda placed, moves, t_s: self._publish_placement(
                    placed, t_s, moved=len(moves["added"])
                ),
                start_t_s=emulator.t_s,
            )
        log.info(
            "experts placed by %s over %d nodes, home %s",
            placed.policy.name,
            len({n for hs in placement.values() for n in hs}),
            home,
        )

    def _placement_context(self, home: str) -> Any:
        """What placement knows now: delays from `home` along today's routes,
        each satellite's charge and compute temperature, and the expert
        load of this run's generations."""
        from controller.latency import EmulatorPaths, propagation_delays_s
        from controller.placement import PlacementContext

        emulator = self.emulator
        satellites = emulator.names[: emulator.n_sats]
        delays = propagation_delays_s(EmulatorPaths(emulator), home, satellites)
        soc = self.power.soc_fraction
        compute_c = self.power.compute_temperature_c
        node_state = {
            name: {
                "soc_fraction": float(soc[i]),
                "compute_temperature_c": float(compute_c[i]),
            }
            for i, name in enumerate(satellites)
        }
        return PlacementContext(
            home,
            emulator.t_s,
            delays,
            node_state=node_state,
            expert_load=dict(self.expert_load),
        )

    def _publish_placement(self, placed: Any, t_s: float, moved: int) -> None:
        """Tell `infer`, `status`, Prometheus and the metrics where experts are."""
        from monitoring.metrics import AGENT_METRICS_PORT

        placement = placed.placement
        holders = sorted({n for hs in placement.values() for n in hs})
        context = placed.context
        self._placement_round += 1
        doc = {
            **self._moe_doc,
            "policy": {"name": placed.policy.name, **placed.options},
            "round": self._placement_round,
            "placed_at_t_s": t_s,
            "placement": [
                {"layer": layer, "expert": expert, "nodes": nodes}
                for (layer, expert), nodes in sorted(placement.items())
            ],
            "path_delay_s": {n: context.path_delay_s.get(n) for n in holders},
            # aware: the forecast each holder was chosen by (null: out of
            # reach at that time).
            "delay_ahead_s": {
                n: [d if np.isfinite(d) else None for d in context.delay_ahead_s[n]]
                for n in holders
                if n in context.delay_ahead_s
            },
        }
        _write_json(run_dir() / "moe.json", doc)
        if self.prometheus is not None:
            self._agent_targets = [
                (f"{self._metrics_addrs[n]}:{AGENT_METRICS_PORT}", {"satellite": n})
                for n in self.deployment.nodes
                if n in self._metrics_addrs
            ]
            self.prometheus.update_targets("satellite", self._agent_targets)
        if self.inference_metrics is not None:
            self.inference_metrics.set_placement(placement, moved)

    def _wait_for_first_scrapes(self, timeout_s: float = 20.0) -> None:
        """Return once Prometheus has scraped every target we gave it.

        Work done before a series' first scrape shows in its first sample,
        so rate() never sees it; waiting here keeps the first request of a
        run on the dashboards.
        """
        from monitoring.prometheus import query

        expected = 1 + len(getattr(self, "_agent_targets", []))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            up = query(self.prometheus.url, "up")
            if len(up) >= expected and all(r["value"][1] == "1" for r in up):
                return
            time.sleep(0.25)
        log.warning(
            "Prometheus has not scraped all %d targets within %.0f s",
            expected,
            timeout_s,
        )

    # -- every timestep --------------------------------------------------

    def _on_step(self, report: Any) -> None:
        """Advance power and heat, throttle agents, publish metrics."""
        emulator = self.emulator
        t_s = emulator.t_s
        geometry = emulator.geometry_state
        n_sats = emulator.n_sats
        dt_s = t_s - self._last_power_t_s
        lat, lon, alt_km = geometry.lat_deg, geometry.lon_deg, geometry.alt_km
        sunlit = geometry.sunlit[:n_sats]

        step = None
        if dt_s > 0:
            busy_total = self.share.busy_totals_s()
            busy = (busy_total - self._busy_seen_s)[:n_sats]
            self._busy_seen_s = busy_total
            # Busy time is wall time; the model steps in scenario time.
            busy_fraction = np.clip(busy * self.scenario.time.speed / dt_s, 0.0, 1.0)
            isl_tx, isl_rx, gsl_tx, gsl_rx = self._sample_traffic()
            step = self.power.step(
                dt_s,
                sunlit,
                None,
                busy_fraction,
                isl_tx,
                isl_rx,
                alt_km[:n_sats],
                gsl_tx_bits=gsl_tx,
                gsl_rx_bits=gsl_rx,
            )
            self.share.set_throttle(step.throttle_factor)
            self._last_power_t_s = t_s

        if self.replacer is not None and self.replacer.due(t_s):
            self.replacer.start_round(
                t_s, self._placement_context(self._moe_doc["home"])
            )

        # Finished generations feed the metrics and the re-placement's load.
        if self.inference_metrics is not None or self.replacer is not None:
            self._ingest_reports()
        if self.metrics is None:
            return
        names = emulator.names
        kinds = ["satellite"] * n_sats + ["ground"] * (len(names) - n_sats)
        # Partitioned, each host publishes only its own nodes (the power
        # model of the others lacks their compute and radio load).
        mine = np.flatnonzero(emulator.local)
        self.metrics.nodes.update(
            [names[i] for i in mine],
            [kinds[i] for i in mine],
            lat_deg=np.asarray(lat)[mine],
            lon_deg=np.asarray(lon)[mine],
            alt_m=np.asarray(alt_km)[mine] * 1e3,
        )
        self._link_metrics()
        if step is not None:
            counters = self.power.counters
            wh_to_j = 3600.0
            sats = mine[mine < n_sats]

            def here(values: Any) -> np.ndarray:
                return np.broadcast_to(np.asarray(values), (n_sats,))[sats]

            self.metrics.power.update(
                solar_w=here(step.solar_w),
                load_bus_w=here(step.bus_w),
                load_compute_w=here(step.compute_w),
                load_radio_w=here(step.radio_w),
                battery_w=here(step.battery_w),
                soc_fraction=here(step.soc_fraction),
                battery_energy_j=here(step.energy_wh) * wh_to_j,
                capacity_fade_fraction=here(self.power.capacity_fade_fraction),
                temperature_c=here(step.temperature_c),
                throttle_factor=here(step.throttle_factor),
                sunlit=here(sunlit.astype(float)),
                energy_consumed_j=here(
                    self._monotonic("consumed", counters["load_wh"])
                ),
                energy_harvested_j=here(self._monotonic("solar", counters["solar_wh"])),
            )
        if report is not None:
            self.metrics.step_done(
                self.scenario.time.start().timestamp() + t_s,
                report.total_s,
                report.lag_s,
                report.route_changes,
                {
                    "up": report.links_up + report.links_created,
                    "down": report.links_down + report.links_removed,
                    "shape": report.shaping_changes,
                },
            )

    def _monotonic(self, name: str, energy_wh: np.ndarray) -> np.ndarray:
        """`energy_wh` in joules, never below what was exported before.

        The model derives some energies as sums and differences, which can
        step back by a rounding error; Prometheus would read that as a
        counter reset and show a spike.
        """
        joules = np.asarray(energy_wh) * 3600.0
        previous = self._exported_j.get(name)
        if previous is not None:
            joules = np.maximum(joules, previous)
        self._exported_j[name] = joules
        return joules

    def _ingest_reports(self) -> None:
        """Count the generations `spacemoe infer` finished since last step.

        Their tokens go to the inference metrics, and the rows each expert
        served to `expert_load`, which re-placement rounds order by.
        """
        from controller.latency import observe_report

        for path in sorted((run_dir() / "results").glob("infer-*.json")):
            if path.name in self._reports_seen:
                continue
            self._reports_seen.add(path.name)
            try:
                report = json.loads(path.read_text())
                if self.inference_metrics is not None:
                    observe_report(self.inference_metrics, report)
                for key, rows in report.get("expert_rows", {}).items():
                    layer, expert = (int(part) for part in key.split("/"))
                    self.expert_load[(layer, expert)] = self.expert_load.get(
                        (layer, expert), 0.0
                    ) + float(rows)
            except (OSError, ValueError, KeyError) as exc:
                log.warning("cannot count inference report %s: %s", path, exc)

    def _sample_traffic(self) -> tuple[np.ndarray, ...]:
        """Bits each satellite sent and received since the last sample.

        Returns ISL transmit, ISL receive, GSL transmit and GSL receive bits
        per satellite, from the kernel's per-link counters. Reading them
        costs a netlink dump per node, so with many nodes it happens every
        few steps and the bits of those steps are charged at once (the
        energy is the same).
        """
        e = self.emulator
        n_sats = e.n_sats
        zeros = np.zeros(n_sats)
        self._steps_since_traffic += 1
        every = max(1, len(e.names) // TRAFFIC_NODES_PER_STEP)
        if self._steps_since_traffic < every:
            return zeros, zeros, zeros, zeros
        self._steps_since_traffic = 0
        sent, dropped = e.link_traffic()
        self._link_sent, self._link_dropped = sent, dropped
        previous = self._sent_seen
        self._sent_seen = sent
        if previous is None or len(previous) != len(sent):
            return zeros, zeros, zeros, zeros
        delta = np.maximum(sent - previous, 0.0) * 8.0
        a, b, kind = e.link_a[: len(sent)], e.link_b[: len(sent)], e.link_kind
        out = []
        for link_kind in (0, 1):  # ISL, then GSL
            mask = kind[: len(sent)] == link_kind
            tx = np.zeros(len(e.names))
            rx = np.zeros(len(e.names))
            np.add.at(tx, a[mask], delta[mask, 0])
            np.add.at(tx, b[mask], delta[mask, 1])
            np.add.at(rx, b[mask], delta[mask, 0])
            np.add.at(rx, a[mask], delta[mask, 1])
            out += [tx[:n_sats], rx[:n_sats]]
        return tuple(out)

    def _link_metrics(self) -> None:
        e = self.emulator
        ids = np.flatnonzero(e.link_active)
        ids = ids[e.local[e.link_a[ids]] | e.local[e.link_b[ids]]]
        names = e.names
        a = [names[i] for i in e.link_a[ids]]
        b = [names[i] for i in e.link_b[ids]]
        self.metrics.links.update(
            [f"{x}~{y}" for x, y in zip(a, b, strict=True)],
            ["gsl" if k == 1 else "isl" for k in e.link_kind[ids]],
            a,
            b,
            delay_s=e.link_delay_s[ids],
            rate_bps=e.link_rate_bps[ids],
            up=e.link_up[ids].astype(float),
            loss_fraction=e.link_loss[ids],
            **self._traffic_columns(ids),
        )

    def _traffic_columns(self, ids: np.ndarray) -> dict[str, Any]:
        sent, dropped = self._link_sent, self._link_dropped
        if sent is None or dropped is None or len(sent) <= int(ids.max(initial=0)):
            return {}
        return {
            "tx_bytes_ab": sent[ids, 0],
            "tx_bytes_ba": sent[ids, 1],
            "dropped_packets_ab": dropped[ids, 0],
            "dropped_packets_ba": dropped[ids, 1],
        }

    # -- running and stopping -------------------------------------------

    def run(self) -> None:
        """Advance the scenario until stopped or its duration ends."""
        self.emulator.run(
            self._stop,
            on_step=self._safe_on_step,
            start_at_unix_s=self.start_at_unix_s,
        )

    def _safe_on_step(self, report: Any) -> None:
        try:
            self._on_step(report)
        except SpaceMoeError as exc:
            log.error("after step t=%.1f s: %s", self.emulator.t_s, exc)

    def run_forever(self, progress: Say | None = None) -> None:
        """`spacemoe up` in the foreground: up, run until a signal, down."""
        say = progress or (lambda message: None)

        def on_signal(signum: int, frame: Any) -> None:
            self._stop.set()

        require_root()
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        try:
            self.up(say)
            _write_json(run_dir() / "ready.json", {"pid": os.getpid()})
            log.info("scenario %r is up; `spacemoe down` stops it", self.scenario.name)
            self.run()
        finally:
            self.down()

    def down(self) -> None:
        """Stop everything this testbed started (safe after partial bring-up)."""
        errors: list[str] = []
        for name, stop in (
            ("re-placement", lambda: self.replacer and self.replacer.stop()),
            ("agents and brokers", lambda: self.deployment and self.deployment.stop()),
            ("Prometheus", lambda: self.prometheus and self.prometheus.stop()),
            ("exporter", lambda: self.exporter and self.exporter.stop()),
            ("emulator", lambda: self.emulator and self.emulator.down()),
        ):
            try:
                stop()
            except Exception as exc:  # stop the rest regardless
                errors.append(f"{name}: {exc}")
                log.error("stopping %s: %s", name, exc)
        self.deployment = self.prometheus = self.exporter = self.emulator = None
        self.replacer = None
        for leftover in ("moe.json", "ready.json", "power.share"):
            (run_dir() / leftover).unlink(missing_ok=True)
        if errors:
            raise EmulationError("tear-down was incomplete: " + "; ".join(errors))


# -- commands that talk to a running testbed ---------------------------------


def detach_and_wait(argv: list[str], timeout_s: float = READY_TIMEOUT_S) -> int:
    """Start `spacemoe up` in the background; return once it is up.

    Its log goes to ``run_dir()/up.log``. If it dies while starting, the
    log's tail is raised as the error.
    """
    require_root()
    directory = run_dir()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ready.json").unlink(missing_ok=True)
    log_path = directory / "up.log"
    with open(log_path, "ab") as log_file:
        offset = log_file.tell()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
            env={**os.environ, "SPACEMOE_PROGRESS": "1"},
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        offset = _relay_progress(log_path, offset)
        if proc.poll() is not None:
            raise EmulationError(
                f"`spacemoe up` exited with {proc.returncode} while starting; "
                f"log tail:\n{_tail(log_path)}"
            )
        if (directory / "ready.json").exists():
            print(f"up (pid {proc.pid}); log in {log_path}")
            return 0
        time.sleep(0.2)
    proc.terminate()
    raise EmulationError(
        f"`spacemoe up` was not ready within {timeout_s:.0f} s; log tail:\n"
        f"{_tail(log_path)}"
    )


def _relay_progress(log_path: Path, offset: int) -> int:
    """Echo the progress lines the background `up` logged since `offset`."""
    try:
        with open(log_path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except OSError:
        return offset
    complete = chunk[: chunk.rfind(b"\n") + 1]
    for line in complete.decode(errors="replace").splitlines():
        if line.startswith(PROGRESS_PREFIX):
            print(line, file=sys.stderr, flush=True)
    return offset + len(complete)


def stop_running(timeout_s: float = 60.0) -> str:
    """Stop the running `spacemoe up` (by its pid file) and wait for it."""
    require_root()
    from topology.cleanup import clean

    pid_path = run_dir() / "emulator.pid"
    try:
        pid = int(pid_path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        removed = clean()
        return (
            f"no scenario was running; removed {len(removed)} leftovers"
            if removed
            else "no scenario was running"
        )
    if not _is_spacemoe(pid):
        removed = clean()
        return f"the recorded emulator (pid {pid}) was gone; cleaned {len(removed)}"
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
        removed = clean()
        return f"pid {pid} did not stop in {timeout_s:.0f} s; killed, cleaned " + str(
            len(removed)
        )
    leftovers = clean()
    if leftovers:
        return f"stopped pid {pid}; also removed {len(leftovers)} leftovers"
    return f"stopped pid {pid}"


def read_status() -> dict[str, Any]:
    """The running scenario's state, or a clear error if none runs."""
    from topology.emulator import status

    state = status()
    if state is None:
        raise EmulationError(
            f"no scenario is running (no {run_dir() / 'state.json'}); start one "
            "with `spacemoe up --detach`"
        )
    moe_path = run_dir() / "moe.json"
    if moe_path.exists():
        state["moe"] = json.loads(moe_path.read_text())
    return state


def format_status(state: dict[str, Any]) -> str:
    """A short human-readable status."""
    counts = state.get("counts", {})
    lines = [
        f"scenario   {state.get('scenario')}  "
        f"({'running' if state.get('alive') else 'NOT RUNNING: stale state'})",
        f"time       t={state.get('t_s', 0):.1f} s  {state.get('when_utc')}  "
        f"speed x{state.get('speed')}",
        f"shaping    {state.get('shaping')}",
        f"node kind  {state.get('node_kind', 'namespace')}",
        f"nodes      {counts.get('nodes')} ({counts.get('satellites')} satellites)",
        f"links      {counts.get('links_up')} up of {counts.get('links')}",
        f"steps      {counts.get('steps')} ({counts.get('late_steps')} late); "
        f"{counts.get('link_changes')} link and {counts.get('route_changes')} "
        "route changes so far",
    ]
    gsl = [
        f"{link['a']}-{link['b']} {link['delay_s'] * 1e3:.2f} ms"
        for link in state.get("links", [])
        if link.get("kind") == "gsl"
    ]
    if gsl:
        lines.append("ground     " + ", ".join(gsl))
    partition = state.get("partition") or {}
    hosts = partition.get("hosts") or []
    if len(hosts) > 1:
        index = partition.get("index", 0)
        here = sum(1 for n in state.get("nodes", []) if n.get("netns"))
        others = ", ".join(h for i, h in enumerate(hosts) if i != index)
        lines.append(
            f"partition  {index} of {len(hosts)} (underlay {hosts[index]}): "
            f"{here} nodes here, the rest on {others}"
        )
    nodes = counts.get("nodes") or 0
    lines.append(f"routes     {max(nodes - 1, 0)} per node, to every other node's /32")
    paths = state.get("paths", {})
    stations = sorted(paths)
    for i, a in enumerate(stations):
        for b in stations[i + 1 :]:
            hops = paths[a].get(b) or []
            shown = " > ".join(hops) if hops else "no path"
            lines.append(f"path       {a} to {b}: {shown}")
    moe = state.get("moe")
    if moe:
        holders = sorted({n for p in moe["placement"] for n in p["nodes"]})
        lines.append(
            f"experts    home {moe['home']}, {moe['policy']['name']} over "
            f"{len(holders)} nodes: {', '.join(holders)}"
        )
        every_s = moe.get("config", {}).get("replace_every_s") or 0
        if every_s > 0:
            lines.append(
                f"placement  round {moe.get('round', 0)}, made at "
                f"t={moe.get('placed_at_t_s', 0):.0f} s; placed again every "
                f"{every_s:g} s"
            )
    return "\n".join(lines)


def infer_on_running(
    prompt: str,
    n_tokens: int,
    home: str | None = None,
    placement: str | None = None,
    compare: bool = True,
) -> tuple[dict[str, Any], str]:
    """Generate through the agents of the running scenario.

    Returns the JSON report and the printable table. `home` and
    `placement` may only name what `spacemoe up` deployed; a different
    placement needs a new `up` (the running agents hold the shards).
    """
    import torch

    torch.set_num_threads(1)
    from controller.inference import Endpoint, MoeConfig, MqttExecutor
    from controller.latency import StatePaths, format_report, infer
    from moe.serving import load_serving_models

    require_root()
    moe_path = run_dir() / "moe.json"
    if not moe_path.exists():
        raise EmulationError(
            "no experts are deployed: start a scenario with `spacemoe up --detach` "
            "(without --no-moe) first"
        )
    doc = json.loads(moe_path.read_text())
    config = MoeConfig(**doc["config"])
    paths = StatePaths.from_file(run_dir() / "state.json")
    home_node = next(
        (n for n in paths.state.get("nodes", []) if n["name"] == doc["home"]), None
    )
    if home_node is not None and home_node.get("netns") is None:
        hosts = paths.state.get("partition", {}).get("hosts", [])
        owner = home_node.get("partition", 0)
        where = hosts[owner] if owner < len(hosts) else f"partition {owner}"
        raise ConfigError(
            f"home {doc['home']!r} runs on partition {owner} ({where}), not on "
            "this host; run `spacemoe infer` there"
        )
    if home is not None and home != doc["home"]:
        raise ConfigError(
            f"--home {home!r}: the running deployment serves home {doc['home']!r}; "
            "set moe.home in the scenario and bring it up again"
        )
    if placement is not None and placement != doc["policy"]["name"]:
        raise ConfigError(
            f"--placement {placement!r}: the running deployment uses "
            f"{doc['policy']['name']!r}; set moe.placement in the scenario and "
            "bring it up again"
        )
    placed = {(p["layer"], p["expert"]): list(p["nodes"]) for p in doc["placement"]}
    endpoints = {n: Endpoint(**e) for n, e in doc["endpoints"].items()}
    model, reference, tokenizer = load_serving_models(
        config.checkpoint, Path(doc["shard_dir"]), compare
    )
    executor = MqttExecutor(
        endpoints,
        placed,
        namespace=namespace_name(doc["home"]),
        attempt_timeout_s=config.attempt_timeout_s,
        wire_dtype=config.wire_dtype,
        source_address=endpoints[doc["home"]].host,
    )
    # The running `spacemoe up` counts this report into its metrics.
    result_path = run_dir() / "results" / f"infer-{time.time():.3f}-{os.getpid()}.json"
    started = time.perf_counter()
    try:
        executor.connect()
        report = infer(
            model,
            executor,
            prompt,
            n_tokens,
            paths,
            doc["home"],
            reference,
            tokenizer=tokenizer,
        )
    except InferenceError as exc:
        status = "timeout" if isinstance(exc, InferenceTimeout) else "error"
        failed = {"status": status, "error": str(exc)}
        _write_json(
            result_path, {**failed, "duration_s": time.perf_counter() - started}
        )
        raise
    finally:
        executor.close()
    state = paths.state
    report["scenario"] = state.get("scenario")
    report["t_s"] = state.get("t_s")
    report["shaping"] = state.get("shaping")
    report["policy"] = doc["policy"]
    report["path_delay_s"] = doc.get("path_delay_s")
    _write_json(result_path, report)
    return report, format_report(report)


def report_from_running(out_dir: Path, minutes: float = 10.0) -> list[Path]:
    """PNG plots of the last `minutes` from the running Prometheus."""
    from monitoring.report import render_report

    state = read_status()
    url = f"http://127.0.0.1:{PROMETHEUS_PORT}"
    end = time.time()
    start = end - minutes * 60.0
    clock_path = run_dir() / "clock.json"
    if clock_path.exists():
        clock = json.loads(clock_path.read_text())
        start = max(start, float(clock.get("wall_start_unix_s", start)))
    # The map wants positions, which state.json does not carry: recompute
    # the geometry of the running scenario at its current time.
    from topology.scenario import Scenario
    from topology.snapshot import snapshot

    saved = json.loads((run_dir() / "scenario.json").read_text())
    scenario = from_dict(Scenario, saved)
    topology = snapshot(scenario, float(state.get("t_s", 0.0)))
    paths: list[Path] = render_report(url, out_dir, start, end, topology=topology)
    return paths


def power_fast_forward(
    scenario_path: str | None, days: float, step_s: float, busy_fraction: float
) -> tuple[dict[str, Any], str]:
    """Days of power, heat and ageing in seconds of wall time (no emulation)."""
    from containers.fastforward import fast_forward

    if not 0.0 <= busy_fraction <= 1.0:
        raise ConfigError(f"--busy {busy_fraction}: give a fraction from 0 to 1")
    if days <= 0:
        raise ConfigError(f"--days {days}: give a positive number of days")
    scenario = load_scenario(scenario_path)
    result = fast_forward(scenario, days, step_s=step_s, load=busy_fraction)
    summary = result.summary()
    lines = [
        f"{scenario.name}: {days:g} days in {summary['wall_s']:.1f} s "
        f"({summary['satellites']} satellites, busy {busy_fraction:g})"
    ]
    for key, value in summary.items():
        if isinstance(value, dict):
            lines.append(
                f"  {key:28s} min {value['min']:.4g}  median {value['median']:.4g}"
                f"  max {value['max']:.4g}"
            )
    return summary, "\n".join(lines)


def _alive(pid: int) -> bool:
    """Whether `pid` still runs; reaps it if it is our exited child."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[1].split()[0] != "Z":
        return True
    try:
        os.waitpid(pid, os.WNOHANG)  # `spacemoe demo` started it
    except ChildProcessError:
        pass
    return False


def _is_spacemoe(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"spacemoe" in cmdline or b"controller.cli" in cmdline


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _write_json(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(partial, path)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the `spacemoe` command")
