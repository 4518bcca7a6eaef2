"""The emulated constellation: geometry driving kernel links and routes.

:class:`Emulator` owns one scenario's network. ``up()`` builds every node,
all +Grid ISL candidates (set down while geometry says so), the current
ground links, the management network and the initial routes. Each
``step(t_s)`` then:

1. asks :class:`~topology.links.Geometry` for the links at ``t_s``;
2. compares them with what the kernel holds and applies only the
   difference, in an order that never strands traffic: new ground links
   are created and links that came up are raised first; delay, rate and
   loss changes follow (a delay change below
   ``emulation.delay_threshold_s`` is left for later, when it has grown);
3. asks :class:`~topology.routing.Router` for the routes that changed and
   installs them, one netlink batch per node;
4. only then takes down the links that went down and deletes ground links
   that ended, so every route has moved off them before they go.

``run()`` repeats ``step`` on the scenario clock (``time.step_s`` of
scenario time per step, ``time.speed`` scenario seconds per wall second).
A step that finishes after the next one was due is logged and counted; the
next step then takes the scenario time of its actual start, so the network
keeps up with the clock rather than replaying the past.

Every step writes ``run_dir()/state.json`` atomically (written aside, then
renamed) for ``spacemoe status``; ``emulator.pid`` and
``delayline.pid`` let ``spacemoe clean`` find our processes after a crash.

Link identity is the node pair. ISLs keep their link id for the whole run;
a ground link gets an id when it appears and gives it back when it ends.

Spread over several hosts (``emulation.partitions``, see
:mod:`topology.partitions`), each host's emulator keeps the whole geometry,
link table and router, but builds only its own nodes, the links that touch
them (a VXLAN device where the other end is on another host) and their
routes. Link ids then come from the link's identity, so that hosts agree on
them without talking; ``run(start_at_unix_s=...)`` puts every host's step k
at the same wall-clock moment.
"""

from __future__ import annotations

import heapq
import ipaddress
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from topology.addressing import AddressPlan, data_ifname
from topology.errors import EmulationError, NodeNotFound
from topology.links import GSL, Geometry, GeometryState, LinkState
from topology.partitions import Partitioning, fixed_link_ids, max_fixed_link_id
from topology.routing import RouteChanges, Router
from topology.rundir import namespace_name, run_dir
from topology.scenario import EmulationConfig, Scenario
from topology.shaping import Shape
from topology.substrate import (
    LinkSpec,
    NamespaceSubstrate,
    NodeSpec,
    RouteBatch,
    ShapingChange,
    Substrate,
    ensure_neighbour_capacity,
)

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


@dataclass
class StepReport:
    """What one step did and how long each phase took (seconds)."""

    t_s: float
    geometry_s: float = 0.0
    links_s: float = 0.0
    routing_s: float = 0.0
    routes_s: float = 0.0
    teardown_s: float = 0.0
    state_s: float = 0.0
    total_s: float = 0.0
    links_created: int = 0
    links_removed: int = 0
    links_up: int = 0
    links_down: int = 0
    shaping_changes: int = 0
    route_changes: int = 0
    # Set by run(): how long after its due wall-clock time the step began.
    lag_s: float = 0.0

    @property
    def link_changes(self) -> int:
        """Links created, removed, raised, lowered or reshaped."""
        return (
            self.links_created
            + self.links_removed
            + self.links_up
            + self.links_down
            + self.shaping_changes
        )


@dataclass
class RunCounters:
    """Totals over a run, written into state.json."""

    steps: int = 0
    late_steps: int = 0
    max_late_s: float = 0.0
    link_changes: int = 0
    route_changes: int = 0
    last: dict[str, Any] = field(default_factory=dict)


class Emulator:
    """One scenario's emulated network (see the module docstring).

    `partition` is this host's index into ``emulation.partitions``
    (default: ``emulation.partition_index``); it only matters when the
    scenario lists more than one host.
    """

    def __init__(
        self,
        scenario: Scenario,
        substrate: Substrate | None = None,
        partition: int | None = None,
    ) -> None:
        if os.geteuid() != 0:
            raise EmulationError(
                "the emulator needs root to create network namespaces and links; "
                "run it with sudo (or use `spacemoe snapshot` for geometry only)"
            )
        self.scenario = scenario
        self.geometry = Geometry(scenario)
        constellation = self.geometry.constellation
        self.names: list[str] = list(constellation.names)
        self.n_sats = constellation.n_sats
        n = len(self.names)
        self.plan = AddressPlan.from_config(scenario.emulation, n)
        self.partitioning = Partitioning(scenario, constellation, partition)
        # Which nodes this host builds; all of them on one machine.
        self.local: np.ndarray = self.partitioning.local
        self._fixed_ids = self.partitioning.enabled
        if self._fixed_ids:
            needed = max_fixed_link_id(
                len(self.geometry.candidates), self.n_sats, n - self.n_sats
            )
            if needed > self.plan.max_links:
                self.plan.link_subnet(needed - 1)  # raises, naming the fix
        self.router = Router(
            n,
            scenario.emulation.route_hysteresis_fraction,
            scenario.emulation.route_hysteresis_s,
        )
        self._substrate_given = substrate is not None
        self.substrate: Substrate = substrate or _substrate_for(scenario.emulation)
        self.node_u32 = self.plan.node_addresses_u32()

        # Applied link state, by link id; link_of[a, b] (both orders) is the
        # id of the link between nodes a and b, -1 if none exists.
        self.link_of = np.full((n, n), -1, dtype=np.int32)
        capacity = 1024
        self.link_a = np.zeros(capacity, np.int32)
        self.link_b = np.zeros(capacity, np.int32)
        self.link_kind = np.zeros(capacity, np.int8)
        self.link_up = np.zeros(capacity, bool)
        self.link_delay_s = np.zeros(capacity)
        self.link_rate_bps = np.zeros(capacity)
        self.link_loss = np.zeros(capacity)
        self.link_active = np.zeros(capacity, bool)
        self._free_ids: list[int] = []
        self._next_id = 0

        self.t_s = 0.0
        # The geometry of the last step (positions, sunlit, links), for
        # whoever steps alongside the network (the power model, metrics).
        self.geometry_state: GeometryState | None = None
        self.counters = RunCounters()
        self._is_up = False
        self._stop = threading.Event()
        self._nodes_json: list[dict[str, Any]] = []
        self._paths: dict[str, dict[str, list[str]]] | None = None

    # --- bring-up ----------------------------------------------------------

    def up(self, progress: Progress | None = None) -> None:
        """Build the whole network at scenario time 0; tear down on failure."""
        report = progress or (lambda phase, done, total: None)
        started = time.monotonic()
        directory = run_dir()
        directory.mkdir(parents=True, exist_ok=True)
        running = _running_emulator(directory / "emulator.pid")
        if running is not None:
            raise EmulationError(
                f"an emulator already runs as pid {running} (run directory "
                f"{directory}); stop it with `spacemoe down` first"
            )
        _write_atomic(directory / "emulator.pid", f"{os.getpid()}\n")
        _write_atomic(
            directory / "scenario.json", json.dumps(self.scenario.to_dict(), indent=1)
        )
        try:
            self._up(report)
        except BaseException:
            log.error("bring-up failed; tearing down what was built")
            try:
                self.down()
            except Exception as exc:  # the original error matters more
                log.error("tear-down after failed bring-up: %s", exc)
            raise
        log.info(
            "up: %d nodes, %d links in %.1f s (shaping %s)",
            len(self.names),
            int(self.link_active.sum()),
            time.monotonic() - started,
            self.substrate.shaping_mode,
        )

    def _up(self, report: Progress) -> None:
        n = len(self.names)
        self._is_up = True
        management = ipaddress.IPv4Interface(
            f"{self.plan.management_bridge_address()}/"
            f"{self.plan.management_network.prefixlen}"
        )
        self.substrate.start(management)
        _write_atomic(
            run_dir() / "delayline.pid",
            "".join(f"{pid}\n" for pid in self.substrate.helper_pids()),
        )

        state = self.geometry.step(0.0)
        self.geometry_state = state
        links = state.links
        # Neighbour entries: both ends of every link, and each node plus the
        # root on the management network.
        ensure_neighbour_capacity(2 * len(links) + 2 * n + 1024)

        nodes = [
            NodeSpec(
                name,
                self.plan.node_address(i),
                ipaddress.IPv4Interface(
                    f"{self.plan.management_address(i)}/"
                    f"{self.plan.management_network.prefixlen}"
                ),
            )
            for i, name in enumerate(self.names)
        ]
        mine = [spec for i, spec in enumerate(nodes) if self.local[i]]
        chunk = 64
        for start in range(0, len(mine), chunk):
            self.substrate.add_nodes(mine[start : start + chunk])
            report("nodes", min(start + chunk, len(mine)), len(mine))
        # Every node is listed (addresses are global); management network
        # and namespace only for this host's own.
        self._nodes_json = [
            {
                "name": spec.name,
                "index": i,
                "kind": "satellite" if i < self.n_sats else "ground",
                "address": str(spec.address),
                "management": (
                    str(spec.management.ip)
                    if spec.management and self.local[i]
                    else None
                ),
                "netns": namespace_name(spec.name) if self.local[i] else None,
                "partition": int(self.partitioning.owner[i]),
            }
            for i, spec in enumerate(nodes)
        ]

        order = np.arange(len(links))
        ids = self._allocate(links, order)
        specs = [
            self._link_spec(links, int(i), int(k))
            for i, k in zip(order, ids, strict=True)
            if self._touches_here(links, int(i))
        ]
        chunk = 512
        for start in range(0, len(specs), chunk):
            self.substrate.add_links(specs[start : start + chunk])
            report("links", min(start + chunk, len(specs)), len(specs))

        self.router.update(links)
        for node in np.flatnonzero(self.local).tolist():
            dests = np.flatnonzero(self.router.next_hop[node] >= 0)
            dests = dests[dests != node]
            self._apply_routes(node, dests, self.router.next_hop[node, dests])
            if node % 64 == 63 or node == n - 1:
                report("routes", node + 1, n)
        self.t_s = 0.0
        self._write_state(StepReport(0.0))

    def _touches_here(self, links: LinkState, i: int) -> bool:
        return bool(self.local[links.a[i]] or self.local[links.b[i]])

    def _here(self, ids: np.ndarray) -> np.ndarray:
        """Those link ids with at least one end on this host."""
        ids = np.asarray(ids)
        return ids[self.local[self.link_a[ids]] | self.local[self.link_b[ids]]]

    def _link_spec(self, links: LinkState, i: int, link_id: int) -> LinkSpec:
        a, b = int(links.a[i]), int(links.b[i])
        return LinkSpec(
            link_id,
            self.names[a],
            self.names[b],
            self.plan.link_subnet(link_id),
            Shape(
                float(links.delay_s[i]),
                float(links.rate_bps[i]),
                float(links.loss_fraction[i]),
            ),
            up=bool(links.up[i]),
            tunnel=self.partitioning.tunnel(link_id, a, b),
        )

    def _allocate(self, links: LinkState, rows: np.ndarray) -> np.ndarray:
        """Give link ids to links[rows] and record them as applied."""
        if self._fixed_ids:
            ids = fixed_link_ids(
                links.a,
                links.b,
                links.kind,
                rows,
                len(self.geometry.candidates),
                self.n_sats,
            )
            self._next_id = max(self._next_id, int(ids.max(initial=-1)) + 1)
            self._record(links, rows, ids)
            return ids
        ids = np.empty(len(rows), np.int32)
        for j in range(len(rows)):
            if self._free_ids:
                link_id = heapq.heappop(self._free_ids)
            else:
                link_id = self._next_id
                self._next_id += 1
            if link_id >= self.plan.max_links:
                self.plan.link_subnet(link_id)  # raises, naming the fix
            ids[j] = link_id
        self._record(links, rows, ids)
        return ids

    def _record(self, links: LinkState, rows: np.ndarray, ids: np.ndarray) -> None:
        self._grow(self._next_id)
        a, b = links.a[rows], links.b[rows]
        self.link_of[a, b] = ids
        self.link_of[b, a] = ids
        self.link_a[ids] = a
        self.link_b[ids] = b
        self.link_kind[ids] = links.kind[rows]
        self.link_up[ids] = links.up[rows]
        self.link_delay_s[ids] = links.delay_s[rows]
        self.link_rate_bps[ids] = links.rate_bps[rows]
        self.link_loss[ids] = links.loss_fraction[rows]
        self.link_active[ids] = True

    def _grow(self, size: int) -> None:
        capacity = len(self.link_a)
        if size <= capacity:
            return
        new = max(size, 2 * capacity)
        for name in (
            "link_a",
            "link_b",
            "link_kind",
            "link_up",
            "link_delay_s",
            "link_rate_bps",
            "link_loss",
            "link_active",
        ):
            old = getattr(self, name)
            grown = np.zeros(new, old.dtype)
            grown[:capacity] = old
            setattr(self, name, grown)

    # --- one timestep ------------------------------------------------------

    def step(self, t_s: float) -> StepReport:
        """Advance the network to scenario time `t_s` (see module docstring)."""
        if not self._is_up:
            raise EmulationError("step() before up(): bring the network up first")
        report = StepReport(t_s)
        clock = time.perf_counter()

        self.geometry_state = self.geometry.step(t_s)
        links = self.geometry_state.links
        now = time.perf_counter()
        report.geometry_s, clock = now - clock, now

        # Match this step's links with the applied ones by node pair.
        ids = self.link_of[links.a, links.b]
        new_rows = np.flatnonzero(ids < 0)
        old_rows = np.flatnonzero(ids >= 0)
        old_ids = ids[old_rows]
        seen = np.zeros(len(self.link_active), bool)
        seen[old_ids] = True
        ended = np.flatnonzero(self.link_active & ~seen)

        # Creations and raises first, then reshaping.
        if len(new_rows):
            created = self._allocate(links, new_rows)
            specs = [
                self._link_spec(links, int(r), int(k))
                for r, k in zip(new_rows, created, strict=True)
                if self._touches_here(links, int(r))
            ]
            if specs:
                self.substrate.add_links(specs)
            report.links_created = len(new_rows)

        up_now = links.up[old_rows]
        was_up = self.link_up[old_ids]
        raise_ids = old_ids[up_now & ~was_up]
        lower_ids = old_ids[~up_now & was_up]
        if len(self._here(raise_ids)):
            self.substrate.set_links_up([int(k) for k in self._here(raise_ids)], True)
            report.links_up = len(raise_ids)
        self.link_up[old_ids] = up_now

        delay = links.delay_s[old_rows]
        rate = links.rate_bps[old_rows]
        loss = links.loss_fraction[old_rows]
        threshold = self.scenario.emulation.delay_threshold_s
        reshape = (
            (np.abs(delay - self.link_delay_s[old_ids]) >= threshold)
            | (rate != self.link_rate_bps[old_ids])
            | (loss != self.link_loss[old_ids])
        )
        # A link coming up carries the shape of now, however small the drift.
        reshape |= np.isin(old_ids, raise_ids)
        reshape &= up_now
        rows = np.flatnonzero(reshape)
        if len(rows):
            changes = []
            for j in rows[np.isin(old_ids[rows], self._here(old_ids[rows]))]:
                k = int(old_ids[j])
                shape = Shape(float(delay[j]), float(rate[j]), float(loss[j]))
                changes.append(ShapingChange(k, "ab", shape))
                changes.append(ShapingChange(k, "ba", shape))
            if changes:
                self.substrate.set_shaping(changes)
            reshaped = old_ids[rows]
            self.link_delay_s[reshaped] = delay[rows]
            self.link_rate_bps[reshaped] = rate[rows]
            self.link_loss[reshaped] = loss[rows]
            report.shaping_changes = len(rows)
        now = time.perf_counter()
        report.links_s, clock = now - clock, now

        changes_of_routes = self.router.update(links)
        now = time.perf_counter()
        report.routing_s, clock = now - clock, now

        self._apply_route_changes(changes_of_routes)
        report.route_changes = len(changes_of_routes)
        now = time.perf_counter()
        report.routes_s, clock = now - clock, now

        # Routes have left these links; now they may go.
        if len(lower_ids):
            here = self._here(lower_ids)
            if len(here):
                self.substrate.set_links_up([int(k) for k in here], False)
            report.links_down = len(lower_ids)
        if len(ended):
            here = self._here(ended)
            if len(here):
                self.substrate.remove_links([int(k) for k in here])
            self._release(ended)
            report.links_removed = len(ended)
        now = time.perf_counter()
        report.teardown_s, clock = now - clock, now

        self.t_s = t_s
        self.counters.steps += 1
        self.counters.link_changes += report.link_changes
        self.counters.route_changes += report.route_changes
        self._write_state(report)
        now = time.perf_counter()
        report.state_s = now - clock
        report.total_s = (
            report.geometry_s
            + report.links_s
            + report.routing_s
            + report.routes_s
            + report.teardown_s
            + report.state_s
        )
        if report.links_created or report.links_removed or report.links_down:
            log.info(
                "t=%.1f s: %d links created, %d removed, %d up, %d down, "
                "%d reshaped, %d routes changed",
                t_s,
                report.links_created,
                report.links_removed,
                report.links_up,
                report.links_down,
                report.shaping_changes,
                report.route_changes,
            )
        return report

    def _release(self, ids: np.ndarray) -> None:
        a, b = self.link_a[ids], self.link_b[ids]
        self.link_of[a, b] = -1
        self.link_of[b, a] = -1
        self.link_active[ids] = False
        self.link_up[ids] = False
        if self._fixed_ids:
            return
        for k in ids:
            heapq.heappush(self._free_ids, int(k))

    def _apply_route_changes(self, changes: RouteChanges) -> None:
        if not len(changes):
            return
        # Other hosts route their own nodes.
        mine = np.flatnonzero(self.local[changes.node])
        if not len(mine):
            return
        order = mine[np.argsort(changes.node[mine], kind="stable")]
        node = changes.node[order]
        dest = changes.dest[order]
        hop = changes.next_hop[order]
        bounds = np.flatnonzero(np.diff(node)) + 1
        for part in np.split(np.arange(len(node)), bounds):
            self._apply_routes(int(node[part[0]]), dest[part], hop[part])

    def _apply_routes(self, node: int, dest: np.ndarray, hop: np.ndarray) -> None:
        """Point `node`'s routes to `dest` at next hops `hop` (-1: delete)."""
        if not len(dest):
            return
        hop = np.asarray(hop, np.int64)
        reachable = hop >= 0
        link_ids = np.where(reachable, self.link_of[node, np.maximum(hop, 0)], -1)
        if np.any(reachable & (link_ids < 0)):
            bad = int(hop[np.flatnonzero(reachable & (link_ids < 0))[0]])
            raise EmulationError(
                f"router sends {self.names[node]} via {self.names[bad]} but no link "
                "joins them; geometry and router disagree"
            )
        via = np.where(
            reachable,
            self.plan.link_addresses_u32(np.maximum(link_ids, 0), hop > node),
            0,
        ).astype(np.uint32)
        self.substrate.apply_routes(
            self.names[node],
            RouteBatch(self.node_u32[dest], via, link_ids),
        )

    # --- running on the clock ---------------------------------------------

    def run(
        self,
        stop: threading.Event | None = None,
        on_step: Callable[[StepReport], None] | None = None,
        start_at_unix_s: float | None = None,
    ) -> RunCounters:
        """Step on the scenario clock until `stop` is set or the duration ends.

        Scenario time advances `time.speed` seconds per wall second; steps
        are `time.step_s` of scenario time apart. Late steps are logged and
        counted (see the module docstring). `start_at_unix_s` anchors
        scenario time 0 to that wall-clock time (hosts of one partitioned
        scenario share it, so step k happens at the same moment on each,
        as far as their clocks agree: keep them NTP-synchronised); a run
        that starts after the anchor joins at the current step.
        """
        stop = stop or self._stop
        config = self.scenario.time
        step_s, speed = config.step_s, config.speed
        if start_at_unix_s is None:
            wall_start = time.time() - self.t_s / speed
        else:
            wall_start = start_at_unix_s
            behind_steps = int((time.time() - wall_start) * speed // step_s)
            joined_s = (behind_steps - 1) * step_s
            if joined_s > self.t_s:
                log.info(
                    "joining the shared clock at t=%.1f s (%d steps after its start)",
                    joined_s + step_s,
                    behind_steps,
                )
                self.t_s = joined_s
        _write_atomic(
            run_dir() / "clock.json",
            json.dumps(
                {
                    "epoch_utc": self.scenario.time.start().isoformat(),
                    "wall_start_unix_s": wall_start,
                    "speed": speed,
                    "step_s": step_s,
                }
            ),
        )
        t_s = self.t_s
        while not stop.is_set():
            t_s += step_s
            if config.duration_s is not None and t_s > config.duration_s + 1e-9:
                break
            due = wall_start + t_s / speed
            wait = due - time.time()
            if wait > 0 and stop.wait(wait):
                break
            late_s = time.time() - due
            report = self.step(t_s)
            report.lag_s = max(late_s, 0.0)
            if on_step is not None:
                on_step(report)
            after = time.time()
            next_due = wall_start + (t_s + step_s) / speed
            if after > next_due:
                self.counters.late_steps += 1
                self.counters.max_late_s = max(self.counters.max_late_s, after - due)
                # Catch up with the clock instead of replaying the past.
                behind_s = (after - wall_start) * speed - t_s
                skipped = int(behind_s // step_s)
                log.warning(
                    "step at t=%.1f s took %.3f s (started %.3f s late); %d steps "
                    "of %.3g s skipped to keep up with the clock",
                    t_s,
                    report.total_s,
                    max(late_s, 0.0),
                    max(skipped - 1, 0),
                    step_s,
                )
                if skipped > 1:
                    t_s += (skipped - 1) * step_s
        return self.counters

    def request_stop(self) -> None:
        """Make `run()` return after the current step (signal-handler safe)."""
        self._stop.set()

    # --- tear-down ---------------------------------------------------------

    def down(self) -> None:
        """Remove every node, link and process of this emulation."""
        self._stop.set()
        try:
            self.substrate.teardown()
        finally:
            self._is_up = False
            for name in ("state.json", "emulator.pid", "delayline.pid", "clock.json"):
                (run_dir() / name).unlink(missing_ok=True)

    def __enter__(self) -> Emulator:
        self.up()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.down()

    # --- traffic ---------------------------------------------------------

    def link_traffic(self) -> tuple[np.ndarray, np.ndarray]:
        """Cumulative bytes sent and packets dropped per link and direction.

        Returns two (links, 2) arrays indexed by link id: column 0 is the
        direction a->b, column 1 b->a. Bytes are the sender's kernel
        transmit counter; drops are the delay line's loss decisions at the
        receiver (zero under netem, whose drops the kernel counts in the
        qdisc instead). A ground link's counters restart when its id is
        reused. One netlink dump per node: at thousands of nodes, call it
        less often than every step.
        """
        capacity = len(self.link_active)
        sent = np.zeros((capacity, 2))
        dropped = np.zeros((capacity, 2))
        for i, name in enumerate(self.names):
            if not self.local[i]:
                continue
            for k, (_rx, tx, _rxd, _txd) in self.substrate.link_bytes(name).items():
                if k < capacity and self.link_active[k]:
                    sent[k, 0 if self.link_a[k] == i else 1] = tx
        delayline = getattr(self.substrate, "delayline", None)
        if delayline is not None:
            index = {namespace_name(n): i for i, n in enumerate(self.names)}
            prefix = len(data_ifname(0)) - 1
            for (label, ifname), link in delayline.stats()["links"].items():
                k = int(ifname[prefix:])
                receiver = index.get(label)
                if receiver is None or k >= capacity or not self.link_active[k]:
                    continue
                # Received at b means sent a->b.
                dropped[k, 0 if self.link_b[k] == receiver else 1] = link["drops"]
        return sent, dropped

    # --- state for `spacemoe status` ---------------------------------------

    def node_index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise NodeNotFound(
                f"no node {name!r} in scenario {self.scenario.name!r}"
            ) from None

    def path(self, src: str, dst: str) -> list[str]:
        """Node names along the current route from `src` to `dst`."""
        hops = self.router.path(self.node_index(src), self.node_index(dst))
        return [self.names[i] for i in hops]

    def path_delay_s(self, src: str, dst: str) -> float:
        """One-way delay the kernel applies along the current route."""
        hops = self.router.path(self.node_index(src), self.node_index(dst))
        total = 0.0
        for u, v in zip(hops, hops[1:], strict=False):
            total += float(self.link_delay_s[self.link_of[u, v]])
        return total

    def state(self, report: StepReport | None = None) -> dict[str, Any]:
        """The state.json document: clock, nodes, links, counts, paths.

        ``paths`` holds the routed path from each ground station to every
        node (all pairs would be N^2 lists).
        """
        ids = np.flatnonzero(self.link_active)
        names = self.names
        columns = zip(
            ids.tolist(),
            self.link_a[ids].tolist(),
            self.link_b[ids].tolist(),
            (self.link_kind[ids] == GSL).tolist(),
            self.link_up[ids].tolist(),
            self.link_delay_s[ids].tolist(),
            self.link_rate_bps[ids].tolist(),
            self.link_loss[ids].tolist(),
            strict=True,
        )
        link_base = int(self.plan.link_network.network_address)
        links = [
            {
                "id": k,
                "a": names[a],
                "b": names[b],
                "kind": "gsl" if gsl else "isl",
                "up": up,
                "delay_s": delay_s,
                "rate_bps": rate_bps,
                "loss_fraction": loss,
                "ifname": data_ifname(k),
                "subnet": f"{ipaddress.IPv4Address(link_base + 2 * k)}/31",
            }
            for k, a, b, gsl, up, delay_s, rate_bps, loss in columns
        ]
        when = self.scenario.time.start() + timedelta(seconds=self.t_s)
        # Paths only change with routes, so they are kept between steps.
        if self._paths is None or (report is not None and report.route_changes):
            self._paths = {
                names[g]: {
                    names[d]: [names[i] for i in self.router.path(g, d)]
                    for d in range(len(names))
                    if d != g
                }
                for g in range(self.n_sats, len(names))
            }
        paths = self._paths
        return {
            "scenario": self.scenario.name,
            "pid": os.getpid(),
            "t_s": self.t_s,
            "when_utc": when.isoformat(),
            "written_unix_s": time.time(),
            "shaping": self.substrate.shaping_mode,
            "node_kind": getattr(self.substrate, "node_kind", "namespace"),
            "speed": self.scenario.time.speed,
            "step_s": self.scenario.time.step_s,
            "management_bridge": str(self.plan.management_bridge_address()),
            "partition": {
                "index": self.partitioning.index,
                "hosts": [str(h) for h in self.partitioning.hosts],
            },
            "counts": {
                "nodes": len(names),
                "satellites": self.n_sats,
                "links": len(links),
                "links_up": int(self.link_up[ids].sum()),
                "steps": self.counters.steps,
                "late_steps": self.counters.late_steps,
                "max_late_s": self.counters.max_late_s,
                "link_changes": self.counters.link_changes,
                "route_changes": self.counters.route_changes,
            },
            "last_step": asdict(report) if report is not None else None,
            "nodes": self._nodes_json,
            "links": links,
            "paths": paths,
        }

    def _write_state(self, report: StepReport) -> None:
        _write_atomic(run_dir() / "state.json", json.dumps(self.state(report)))


def status() -> dict[str, Any] | None:
    """The running emulation's state.json, or None if none is running.

    Adds ``"alive"``: whether the process that wrote it still runs.
    """
    path = run_dir() / "state.json"
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise EmulationError(f"cannot read {path}: {exc}") from None
    pid = int(state.get("pid", 0))
    state["alive"] = pid > 0 and Path(f"/proc/{pid}").exists()
    return state


def _substrate_for(emulation: EmulationConfig) -> Substrate:
    """The substrate backend the scenario's `emulation.nodes` names."""
    if emulation.nodes == "docker":
        from topology.dockernodes import DockerSubstrate

        return DockerSubstrate(
            shaping=emulation.shaping,
            cpus=emulation.node_cpus,
            memory_bytes=emulation.node_memory_bytes,
        )
    return NamespaceSubstrate(shaping=emulation.shaping)


def exec_in(node: str, argv: list[str]) -> None:
    """Replace this process with `argv` run inside `node`'s namespace.

    Raises NodeNotFound if no namespace of that node exists.
    """
    name = namespace_name(node)
    if not (Path("/run/netns") / name).exists():
        raise NodeNotFound(
            f"no node {node!r} is running (no network namespace {name}); "
            "`spacemoe status` lists the nodes"
        )
    if not argv:
        raise EmulationError("exec_in: give a command to run")
    from topology.dockernodes import recorded

    docker = recorded()
    if docker is not None and node in docker["containers"]:
        # Inside the container: its file system and processes, as docker exec.
        tty = ["-t"] if sys.stdin.isatty() and sys.stdout.isatty() else []
        os.execvp(
            "docker",
            ["docker", "-H", f"unix://{docker['socket']}", "exec", "-i", *tty,
             docker["containers"][node], *argv],
        )  # fmt: skip
    os.execvp("ip", ["ip", "netns", "exec", name, *argv])


def _running_emulator(pid_file: Path) -> int | None:
    """The pid of a live emulator recorded in `pid_file`, other than us."""
    from topology.cleanup import is_ours

    try:
        pid = int(pid_file.read_text().split()[0])
        written = pid_file.stat().st_mtime
    except (OSError, ValueError, IndexError):
        return None
    if pid != os.getpid() and is_ours(pid, written):
        return pid
    return None


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so readers see the old or new file, never half."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(text)
    os.replace(partial, path)
