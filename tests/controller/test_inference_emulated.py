"""End to end in namespaces: the default constellation, brokers on satellites.

The emulator brings the default scenario up (69 namespaces, shaped links);
brokers and agents run inside the satellites nearest home, the controller
inside home's namespace. Generation must match the single-process model,
survive a placement change and an agent's death, and take at least the
propagation time of the paths it used (proof that traffic crossed the
emulated links rather than a shortcut).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.deployment import Deployment
from controller.inference import Endpoint, MqttExecutor
from controller.latency import EmulatorPaths, infer, propagation_delays_s
from controller.placement import PlacementContext, RoundRobinPolicy
from moe.model import MoeLM
from tests.containers.support import TINY
from topology.rundir import namespace_name

pytestmark = pytest.mark.root

EXPERTS = [(layer, e) for layer in range(TINY.n_layers) for e in range(TINY.n_experts)]
PROMPT = "import os"


@pytest.fixture
def emulator(net_sandbox: None) -> Iterator[object]:
    from topology.emulator import Emulator
    from topology.scenario import load_scenario

    emulator = Emulator(load_scenario(None))
    emulator.up()
    try:
        yield emulator
    finally:
        emulator.down()


def test_generation_across_the_emulated_constellation(
    emulator, tiny_shards: tuple[MoeLM, Path]
) -> None:  # type: ignore[no-untyped-def]
    model, shard_dir = tiny_shards
    state = emulator.state()
    nodes = state["nodes"]
    satellites = [n["name"] for n in nodes if n["kind"] == "satellite"]
    home = next(n["name"] for n in nodes if n["kind"] == "ground")
    endpoints = {n["name"]: Endpoint(n["name"], n["address"]) for n in nodes}
    paths = EmulatorPaths(emulator)
    delays = propagation_delays_s(paths, home, satellites)
    context = PlacementContext(home, path_delay_s=delays)
    first = RoundRobinPolicy(k=4, replicas=2).place(EXPERTS, satellites, context)
    ring = sorted({n for nodes_ in first.values() for n in nodes_})
    later = {key: list(reversed(nodes_)) for key, nodes_ in first.items()}

    deployment = Deployment(endpoints, shard_dir, namespaces=True)
    executor = MqttExecutor(
        endpoints,
        first,
        namespace=namespace_name(home),
        source_address=endpoints[home].host,
        attempt_timeout_s=2.0,
    )
    victim = first[EXPERTS[0]][0]

    def disturb(step: int, executor: MqttExecutor) -> None:
        if step == 2:
            executor.apply_placement(later)
        if step == 5:
            os.kill(deployment.agent_pid(victim), signal.SIGKILL)

    try:
        deployment.start(first, ring)
        executor.connect()
        report = infer(model, executor, PROMPT, 10, paths, home, model, on_step=disturb)
    finally:
        executor.close()
        deployment.stop()

    assert report["reference"]["tokens_identical"]
    assert report["reference"]["max_abs_logit_diff"] <= 1e-5
    assert victim in executor.down
    nearest_s = min(delays[n] for n in ring)
    for row in report["rows"]:
        # Each layer waits for at least one crossing to the nearest holder.
        assert row["total_s"] > TINY.n_layers * nearest_s
        assert row["network_s"] > 0
