"""Brokers and agents for a set of nodes, and one inference run over them.

:class:`Deployment` starts one Mosquitto broker per node (in the node's
namespace, on its data-plane address; or on 127.0.0.1 with a port per node
for namespace-free runs), one zygote launcher, and one forked agent per
node with the node's initial shards, and waits until every agent has
subscribed. ``stop()`` ends all of it, also after a failed start.

Home takes part like any node when the placement puts experts there (the
ground baseline), so it has a broker and an agent too.

:func:`run_inference` is what ``spacemoe infer`` calls: placement from the
running emulation, deployment, generation with the latency breakdown,
tear-down.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from containers.broker import Broker
from containers.launcher import Launcher
from containers.power_config import load_power_config
from controller.inference import Endpoint, MoeConfig, MqttExecutor
from controller.placement import (
    ExpertKey,
    Placement,
    PlacementContext,
    PlacementPolicy,
    check_placement,
    forecast_delays_s,
    make_policy,
    node_shards,
)
from moe.shards import shard_file_name
from topology.errors import ConfigError, InferenceError
from topology.rundir import namespace_name, run_dir

log = logging.getLogger(__name__)


def free_loopback_ports(count: int) -> list[int]:
    """`count` TCP ports free on 127.0.0.1 right now (for namespace-free runs)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def loopback_endpoints(nodes: Sequence[str]) -> dict[str, Endpoint]:
    """One 127.0.0.1 endpoint with its own port per node."""
    ports = free_loopback_ports(len(nodes))
    return {
        node: Endpoint(node, "127.0.0.1", port)
        for node, port in zip(nodes, ports, strict=True)
    }


class Deployment:
    """Brokers plus agents (see the module docstring).

    `namespaces`: run each node's broker and agent inside ``smoe-<node>``
    (needs the emulation up); False runs them in the caller's namespace.
    `metrics_addrs` maps a node to the (management) address where its agent
    serves Prometheus metrics; nodes not in it serve none.
    """

    def __init__(
        self,
        endpoints: Mapping[str, Endpoint],
        shard_dir: str | Path,
        namespaces: bool = True,
        metrics_addrs: Mapping[str, str] | None = None,
        power_share: Path | None = None,
        power_rows: Mapping[str, int] | None = None,
    ) -> None:
        self.endpoints = dict(endpoints)
        # Agents charge their work to, and take their throttle from, the
        # power model through this file (see containers.powershare).
        self.power_share = power_share
        self.power_rows = dict(power_rows or {})
        self.metrics_addrs = dict(metrics_addrs or {})
        self.shard_dir = Path(shard_dir)
        self.namespaces = namespaces
        self.brokers: dict[str, Broker] = {}
        self.launcher: Launcher | None = None

    def start(
        self,
        placement: Mapping[ExpertKey, Sequence[str]],
        nodes: Sequence[str] | None = None,
        timeout_s: float = 30.0,
    ) -> Deployment:
        """Start brokers and agents on `nodes` (default: those in `placement`)."""
        held = node_shards(placement)
        nodes = sorted(set(nodes) if nodes is not None else set(held))
        try:
            for node in nodes:
                self._start_broker(node)
            self.launcher = Launcher().start()
            for node in nodes:
                self._spawn(node, held.get(node, []))
            self.launcher.wait_ready(list(nodes), timeout_s)
        except BaseException:
            self.stop()
            raise
        log.info(
            "deployed %d agents with %d shards",
            len(nodes),
            sum(len(v) for v in held.values()),
        )
        return self

    @property
    def nodes(self) -> list[str]:
        """The nodes running a broker and an agent of this deployment."""
        return sorted(self.brokers)

    def add_nodes(self, nodes: Sequence[str], timeout_s: float = 30.0) -> None:
        """Start brokers and agents holding nothing yet on `nodes`.

        They take shards later (see MqttExecutor.apply_placement).
        """
        if self.launcher is None:
            raise InferenceError("add_nodes before start: start the deployment first")
        new = [node for node in nodes if node not in self.brokers]
        try:
            for node in new:
                self._start_broker(node)
                self._spawn(node, [])
            self.launcher.wait_ready(new, timeout_s)
        except BaseException:
            self.remove_nodes(new)
            raise
        if new:
            log.info("agents added on %s", ", ".join(new))

    def remove_nodes(self, nodes: Sequence[str]) -> None:
        """Stop the agents and brokers of `nodes` (those that run)."""
        for node in nodes:
            if self.launcher is not None and node in self.launcher.status():
                self.launcher.stop_agent(node)
            broker = self.brokers.pop(node, None)
            if broker is not None:
                broker.stop()
        if nodes:
            log.info("agents removed from %s", ", ".join(nodes))

    def _start_broker(self, node: str) -> None:
        endpoint = self.endpoints[node]
        broker = Broker(
            node,
            endpoint.host,
            endpoint.port,
            namespace=namespace_name(node) if self.namespaces else None,
        )
        self.brokers[node] = broker
        broker.start()

    def _spawn(self, node: str, held: Sequence[ExpertKey]) -> None:
        assert self.launcher is not None
        endpoint = self.endpoints[node]
        self.launcher.spawn(
            node,
            endpoint.host,
            endpoint.port,
            self.shard_dir,
            namespace=namespace_name(node) if self.namespaces else None,
            shards=[
                (layer, expert, shard_file_name(layer, expert))
                for layer, expert in held
            ],
            metrics_addr=self.metrics_addrs.get(node),
            power=self._power_of(node),
        )

    def _power_of(self, node: str) -> tuple[Path, int, int] | None:
        if self.power_share is None or node not in self.power_rows:
            return None
        return (self.power_share, self.power_rows[node], len(self.power_rows))

    def agent_pid(self, node: str) -> int:
        """The pid of `node`'s agent (for fault injection in tests)."""
        assert self.launcher is not None
        pid: int = self.launcher.status()[node]["pid"]
        return pid

    def stop(self) -> None:
        """Stop agents, then brokers; safe to call twice or after a failed start."""
        if self.launcher is not None:
            self.launcher.stop()
            self.launcher = None
        for broker in self.brokers.values():
            broker.stop()
        self.brokers.clear()

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- one inference run over a running emulation --------------------------------


def ensure_shards(checkpoint: str | Path | None = None) -> Path:
    """A shard directory cut from `checkpoint` (default: the shipped one).

    `checkpoint` is our checkpoint or a local Hugging Face MoE directory
    (see moe.serving). Cut once into ``run_dir()/shards/<fingerprint of the
    weights>`` and reused while the weights are unchanged; the manifest is
    written last, so a cut that died half-way is done again.
    """
    from moe.errors import CheckpointError
    from moe.serving import resolve_model_source
    from moe.shards import MANIFEST_NAME

    try:
        source = resolve_model_source(checkpoint)
    except CheckpointError as exc:
        raise InferenceError(f"moe.checkpoint: {exc}") from None
    directory = run_dir() / "shards" / source.fingerprint()
    if not (directory / MANIFEST_NAME).is_file():
        source.cut(directory)
        log.info(
            "cut %s model %s into shards at %s", source.family, source.path, directory
        )
    return directory


@dataclasses.dataclass(frozen=True)
class Placed:
    """A placement with the policy, its options and the context it saw."""

    policy: PlacementPolicy
    options: dict[str, Any]
    placement: Placement
    context: PlacementContext


def place_experts(
    config: MoeConfig,
    experts: Sequence[ExpertKey],
    satellites: Sequence[str],
    nodes: Sequence[str],
    context: PlacementContext,
    *,
    scenario: Any = None,
) -> Placed:
    """Place `experts` as the scenario's `moe` section asks.

    `context` holds the delays from home now and, if known, each
    satellite's battery and heat (`node_state`; none: all fit). The aware
    policy also needs the `scenario`: its orbits give the delays ahead,
    and its power section the throttle temperature, the default ceiling
    for a compute module.
    """
    options: dict[str, Any] = {}
    if config.placement != "ground":
        options = {"k": config.k, "replicas": config.replicas}
    if config.placement == "aware":
        if scenario is None:
            raise ConfigError(
                "moe.placement: aware forecasts from the scenario's orbits, and "
                "none was given; run it through `spacemoe up`"
            )
        started = time.perf_counter()
        ahead = forecast_delays_s(
            scenario,
            context.home,
            context.time_s,
            config.horizon_used_s,
            config.horizon_samples,
        )
        log.info(
            "placement forecast: %d times over %.0f s in %.2f s",
            config.horizon_samples,
            config.horizon_used_s,
            time.perf_counter() - started,
        )
        context = dataclasses.replace(context, delay_ahead_s=ahead)
        limit_c = config.max_compute_temperature_c
        if limit_c is None:
            limit_c = load_power_config(scenario.power).throttle_c
        options.update(
            min_soc_fraction=config.min_soc_fraction,
            max_compute_temperature_c=limit_c,
        )
    policy = make_policy(config.placement, **options)
    placement = policy.place(experts, satellites, context)
    check_placement(placement, experts, nodes)
    return Placed(policy, options, placement, context)


def run_inference(
    prompt: str,
    n_tokens: int,
    config: MoeConfig | None = None,
    *,
    emulator: Any = None,
    state_path: Path | None = None,
    shard_dir: Path | None = None,
    compare: bool = True,
    placement: Placement | None = None,
) -> dict[str, Any]:
    """Generate `n_tokens` through the running emulation; return the report.

    The experts are placed as `config` asks at this moment, or kept where
    a given `placement` (from :func:`place_experts` earlier) puts them.

    The network comes from `emulator` (an Emulator in this process) or else
    from its state file (default run_dir()/state.json, written by
    `spacemoe up`). Brokers and agents are started for the nodes the
    placement uses and stopped afterwards. With `compare`, the
    single-process model runs on the same tokens for an accuracy check.
    """
    from controller.latency import (
        EmulatorPaths,
        PathModel,
        StatePaths,
        infer,
        propagation_delays_s,
    )
    from moe.serving import load_serving_models
    from moe.shards import load_manifest

    config = config or MoeConfig()
    paths: PathModel
    if emulator is not None:
        state = emulator.state()
        paths = EmulatorPaths(emulator)
    else:
        state_path = state_path or run_dir() / "state.json"
        state_paths = StatePaths.from_file(state_path)
        state, paths = state_paths.state, state_paths
    nodes = state["nodes"]
    satellites = [n["name"] for n in nodes if n["kind"] == "satellite"]
    stations = [n["name"] for n in nodes if n["kind"] != "satellite"]
    home = config.home or (stations[0] if stations else None)
    if home is None or home not in {n["name"] for n in nodes}:
        raise ConfigError(
            f"moe.home: {home!r} is not a node of the running scenario; use one of "
            f"its ground stations {stations}"
        )

    delays = propagation_delays_s(paths, home, satellites)
    context = PlacementContext(home, float(state.get("t_s", 0.0)), delays)
    shard_dir = shard_dir or ensure_shards(config.checkpoint)
    manifest = load_manifest(shard_dir)
    experts = [(e.layer, e.expert) for e in manifest.shards]
    names = [n["name"] for n in nodes]
    options: dict[str, Any] = {}
    if placement is None:
        placed = place_experts(
            config,
            experts,
            satellites,
            names,
            context,
            scenario=getattr(emulator, "scenario", None),
        )
        placement, name, options = placed.placement, placed.policy.name, placed.options
    else:
        check_placement(placement, experts, names)
        name = "fixed"

    endpoints = {
        n["name"]: Endpoint(n["name"], str(n["address"]).split("/")[0]) for n in nodes
    }
    model, reference, tokenizer = load_serving_models(
        config.checkpoint, manifest, compare
    )
    deployment = Deployment(endpoints, shard_dir, namespaces=True)
    executor = MqttExecutor(
        endpoints,
        placement,
        namespace=namespace_name(home),
        attempt_timeout_s=config.attempt_timeout_s,
        wire_dtype=config.wire_dtype,
        source_address=endpoints[home].host,
    )
    try:
        deployment.start(placement)
        executor.connect()
        report = infer(
            model,
            executor,
            prompt,
            n_tokens,
            paths,
            home,
            reference,
            tokenizer=tokenizer,
        )
    finally:
        executor.close()
        deployment.stop()
    report["scenario"] = state.get("scenario")
    report["t_s"] = state.get("t_s")
    report["shaping"] = state.get("shaping")
    report["policy"] = {"name": name, **options}
    report["path_delay_s"] = {
        node: delays.get(node)
        for node in sorted(set(n for ns in placement.values() for n in ns))
    }
    return report
