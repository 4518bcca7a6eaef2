"""Experts that follow the orbit: placement redone while a scenario runs.

With ``moe.replace_every_s`` set, the `up` process decides the placement
again every that many seconds of scenario time, with the scenario's own
policy, from the delays, battery and heat of that moment, and moves the
experts there without a gap:

1. agents (and their brokers) start on new holders, holding nothing;
2. each new holder receives its shards' bytes over MQTT from home,
   across the emulated links (so migration costs link time and radio
   energy), checks them against the manifest's hash and warms them;
3. the new placement is published (``moe.json``, metrics), so the next
   ``spacemoe infer`` uses it;
4. shards the round before this one dropped, and that are not wanted
   again, are unloaded, and agents left holding nothing stop.

Unloading lags one round so that a generation which started on the old
placement still finds its experts; one that runs longer than a round
(``replace_every_s / speed`` wall seconds) may not, and then fails over or
names the missing expert. A round runs in a thread of its own so the
emulator's timestep never waits for MQTT; a round still running when the
next is due makes that one wait.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from controller.deployment import Deployment, Placed, place_experts
from controller.inference import Endpoint, MoeConfig, MqttExecutor
from controller.placement import ExpertKey, Placement, PlacementContext
from topology.errors import SpaceMoeError
from topology.rundir import namespace_name

log = logging.getLogger(__name__)

Moves = dict[str, list[list[Any]]]


class Replacer:
    """Redoes the placement every `config.replace_every_s` of scenario time.

    `placement` is where the experts are now. `on_change(placed, moves,
    t_s)` is called after each round that changed something, from the
    round's thread.
    """

    def __init__(
        self,
        config: MoeConfig,
        scenario: Any,
        experts: Sequence[ExpertKey],
        satellites: Sequence[str],
        names: Sequence[str],
        endpoints: Mapping[str, Endpoint],
        deployment: Deployment,
        placement: Placement,
        on_change: Callable[[Placed, Moves, float], None],
        start_t_s: float = 0.0,
    ) -> None:
        if config.replace_every_s <= 0:
            raise SpaceMoeError("Replacer needs moe.replace_every_s > 0")
        self.config = config
        self.scenario = scenario
        self.experts = list(experts)
        self.satellites = list(satellites)
        self.names = list(names)
        self.endpoints = dict(endpoints)
        self.deployment = deployment
        self.placement: Placement = {k: list(v) for k, v in placement.items()}
        self.on_change = on_change
        self.next_t_s = start_t_s + config.replace_every_s
        self.rounds = 0
        self.moved_total = 0
        self.sent_bytes_total = 0
        self.last_error: str | None = None
        self._pending_drops: list[tuple[ExpertKey, str]] = []
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def due(self, t_s: float) -> bool:
        """Whether a round should start at scenario time `t_s`."""
        return t_s >= self.next_t_s and not self.busy and not self._stopping.is_set()

    def start_round(self, t_s: float, context: PlacementContext) -> None:
        """Start a round for what `context` captured at `t_s` (delays,
        battery and heat, expert load)."""
        every = self.config.replace_every_s
        # Due times stay on the grid; rounds missed while busy are skipped.
        while self.next_t_s <= t_s:
            self.next_t_s += every
        self._thread = threading.Thread(
            target=self._round_safely,
            args=(t_s, context),
            name="replacement",
            daemon=True,
        )
        self._thread.start()

    def stop(self, timeout_s: float = 60.0) -> None:
        """Let a running round finish (it is never cut mid-handover)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("a re-placement round still runs after %.0f s", timeout_s)

    def _round_safely(self, t_s: float, context: PlacementContext) -> None:
        try:
            self.run_round(t_s, context)
            self.last_error = None
        except Exception as exc:  # keep the scenario running; try next round
            self.last_error = str(exc)
            log.error("re-placement at t=%.0f s failed: %s", t_s, exc)

    def run_round(self, t_s: float, context: PlacementContext) -> Moves | None:
        """Place again and move there (see the module docstring)."""
        started = time.perf_counter()
        if not any(n in context.path_delay_s for n in self.satellites):
            # Home sees no satellite this moment (no ground link above the
            # minimum elevation): the experts stay where they are.
            log.info(
                "re-placement at t=%.0f s: %s reaches no satellite; nothing moves",
                t_s,
                context.home,
            )
            return None
        placed = place_experts(
            self.config,
            self.experts,
            self.satellites,
            self.names,
            dataclasses.replace(context, current=self.placement),
            scenario=self.scenario,
        )
        self.rounds += 1
        new = placed.placement
        if new == self.placement and not self._pending_drops:
            log.info("re-placement at t=%.0f s: nothing to move", t_s)
            return None

        holders = {n for nodes in new.values() for n in nodes}
        self.deployment.add_nodes(sorted(holders - set(self.deployment.nodes)))
        home = context.home
        executor = MqttExecutor(
            self.endpoints,
            self.placement,
            namespace=namespace_name(home),
            attempt_timeout_s=self.config.attempt_timeout_s,
            source_address=self.endpoints[home].host,
            client_prefix="smoe-replace",
        )
        try:
            # The weights travel from home across the links, as they would.
            moves = executor.apply_placement(
                new, timeout_s=60.0, unload=False, shard_dir=self.deployment.shard_dir
            )
            # What the previous round dropped and this one does not want back.
            stale = [
                (key, node)
                for key, node in self._pending_drops
                if node not in new.get(key, ())
            ]
            executor.unload(stale)
        finally:
            executor.close()
        self._pending_drops = [
            ((layer, expert), node) for layer, expert, node in moves["dropped"]
        ]
        self.placement = {k: list(v) for k, v in new.items()}

        # Agents that hold nothing now and will not be asked to unload.
        keep = holders | {node for _, node in self._pending_drops}
        idle = [n for n in self.deployment.nodes if n not in keep and n != home]
        self.deployment.remove_nodes(idle)
        self.moved_total += len(moves["added"])
        self.sent_bytes_total += moves["sent_bytes"]
        log.info(
            "re-placement at t=%.0f s: %d shards (%.1f MB) moved onto %d satellites "
            "in %.1f s",
            t_s,
            len(moves["added"]),
            moves["sent_bytes"] / 1e6,
            len(holders),
            time.perf_counter() - started,
        )
        self.on_change(placed, moves, t_s)
        return moves
