"""End to end on loopback: brokers on 127.0.0.1, agents forked by the launcher.

Generation through MQTT must give the single-process tokens and logits, also
across a placement change, and an agent that dies or hangs must lead to a
replica or to a clear error within the timeout, never to a hang.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from controller.deployment import Deployment, loopback_endpoints
from controller.inference import MqttExecutor
from controller.latency import LoopbackPaths, format_report, infer
from controller.placement import GroundPolicy, PlacementContext, RoundRobinPolicy
from moe.model import MoeLM
from monitoring.metrics import InferenceMetrics
from tests.containers.support import TINY
from topology.errors import InferenceError, InferenceTimeout

SATS = ["s0", "s1", "s2", "s3"]
HOME = "gs"
EXPERTS = [(layer, e) for layer in range(TINY.n_layers) for e in range(TINY.n_experts)]
CONTEXT = PlacementContext(
    HOME, path_delay_s={n: 0.001 * i for i, n in enumerate(SATS)}
)
PROMPT = "def main():"


@contextmanager
def deployed(
    shard_dir: Path,
    placement: dict,
    attempt_timeout_s: float = 2.0,
    nodes: list[str] | None = None,
) -> Iterator[tuple[Deployment, MqttExecutor]]:
    endpoints = loopback_endpoints([*SATS, HOME])
    deployment = Deployment(endpoints, shard_dir, namespaces=False)
    executor = MqttExecutor(endpoints, placement, attempt_timeout_s=attempt_timeout_s)
    try:
        deployment.start(placement, nodes)
        executor.connect(nodes)
        yield deployment, executor
    finally:
        executor.close()
        deployment.stop()


def test_generation_over_mqtt_matches_the_single_process_model(
    tiny_shards: tuple[MoeLM, Path],
) -> None:
    model, shard_dir = tiny_shards
    placement = RoundRobinPolicy(k=4).place(EXPERTS, SATS, CONTEXT)
    registry = CollectorRegistry()
    metrics = InferenceMetrics(registry)
    with deployed(shard_dir, placement) as (_, executor):
        report = infer(
            model, executor, PROMPT, 16, LoopbackPaths(), HOME, model, metrics=metrics
        )
    assert report["reference"]["tokens_identical"]
    assert report["reference"]["max_abs_logit_diff"] <= 1e-5
    assert len(report["tokens"]) == 16 and len(report["rows"]) == 16
    assert report["rows"][0]["step"] == "prefill"
    row = report["rows"][3]
    parts = sum(
        row[k]
        for k in (
            "home_compute_s",
            "expert_compute_s",
            "serialization_s",
            "network_s",
            "queueing_s",
        )
    )
    assert parts == pytest.approx(row["total_s"], rel=1e-9)
    assert row["expert_compute_s"] > 0 and row["payload_bytes"] > 0
    assert report["summary"]["retries"] == 0
    # Every token position went to top_k experts in every layer.
    positions = len(report["prompt_ids"]) + len(report["tokens"]) - 1
    assert sum(report["expert_rows"].values()) == (
        positions * model.cfg.n_layers * model.cfg.top_k
    )
    assert "decode p50" in format_report(report)
    tokens = registry.get_sample_value(
        "spacemoe_inference_tokens_total", {"phase": "generated"}
    )
    assert tokens == 16
    assert (
        registry.get_sample_value("spacemoe_inference_requests_total", {"status": "ok"})
        == 1
    )


def test_ground_baseline_runs_the_same_wire_path_at_home(
    tiny_shards: tuple[MoeLM, Path],
) -> None:
    model, shard_dir = tiny_shards
    placement = GroundPolicy().place(EXPERTS, SATS, CONTEXT)
    with deployed(shard_dir, placement) as (deployment, executor):
        report = infer(
            model, executor, PROMPT, 8, LoopbackPaths(), HOME, reference=model
        )
        assert set(deployment.brokers) == {HOME}
    assert report["reference"]["tokens_identical"]
    assert all(nodes == [HOME] for nodes in report["placement"].values())


def test_placement_change_mid_run_keeps_generation_identical(
    tiny_shards: tuple[MoeLM, Path],
) -> None:
    model, shard_dir = tiny_shards
    first = RoundRobinPolicy(k=2).place(EXPERTS, SATS, CONTEXT)  # s0, s1
    later = {key: ["s3" if nodes == ["s0"] else "s2"] for key, nodes in first.items()}
    moves: list[dict] = []

    def migrate(step: int, executor: MqttExecutor) -> None:
        if step == 4:
            moves.append(executor.apply_placement(later))

    with deployed(shard_dir, first, nodes=SATS) as (deployment, executor):
        report = infer(
            model, executor, PROMPT, 12, LoopbackPaths(), HOME, model, on_step=migrate
        )
        held = {
            node: executor.control(node, _stats())["stats"]["shards"] for node in SATS
        }
    assert report["reference"]["tokens_identical"]
    assert report["reference"]["max_abs_logit_diff"] <= 1e-5
    assert len(moves[0]["added"]) == len(EXPERTS) == len(moves[0]["dropped"])
    assert held["s0"] == [] and held["s1"] == []
    assert len(held["s2"]) + len(held["s3"]) == len(EXPERTS)
    # Steps after the change went to the new holders only.
    assert report["summary"]["retries"] == 0


def test_killed_agent_fails_over_to_its_replica(
    tiny_shards: tuple[MoeLM, Path],
) -> None:
    model, shard_dir = tiny_shards
    placement = RoundRobinPolicy(k=4, replicas=2).place(EXPERTS, SATS, CONTEXT)

    with deployed(shard_dir, placement) as (deployment, executor):

        def kill(step: int, executor: MqttExecutor) -> None:
            if step == 3:
                os.kill(deployment.agent_pid("s0"), signal.SIGKILL)

        report = infer(model, executor, PROMPT, 12, LoopbackPaths(), HOME, model, kill)
        assert "s0" in executor.down and "offline" in executor.down["s0"]
    assert report["reference"]["tokens_identical"]


def test_hung_agent_times_out_and_its_replica_answers(
    tiny_shards: tuple[MoeLM, Path],
) -> None:
    model, shard_dir = tiny_shards
    placement = RoundRobinPolicy(k=4, replicas=2).place(EXPERTS, SATS, CONTEXT)
    with deployed(shard_dir, placement, attempt_timeout_s=0.3) as (
        deployment,
        executor,
    ):
        pid = deployment.agent_pid("s1")

        def freeze(step: int, executor: MqttExecutor) -> None:
            if step == 2:
                os.kill(pid, signal.SIGSTOP)

        try:
            report = infer(
                model, executor, PROMPT, 10, LoopbackPaths(), HOME, model, freeze
            )
        finally:
            os.kill(pid, signal.SIGCONT)
    assert report["reference"]["tokens_identical"]
    assert report["summary"]["retries"] >= 1


def test_killed_agent_without_replica_is_a_prompt_named_error(
    tiny_shards: tuple[MoeLM, Path],
) -> None:
    model, shard_dir = tiny_shards
    placement = RoundRobinPolicy(k=4).place(EXPERTS, SATS, CONTEXT)
    with deployed(shard_dir, placement, attempt_timeout_s=5.0) as (
        deployment,
        executor,
    ):
        for node in SATS:
            os.kill(deployment.agent_pid(node), signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(InferenceError, match=r"layer 0 expert \d: .*s\d.*offline"):
            infer(model, executor, PROMPT, 4, LoopbackPaths(), HOME)
        # The agents' wills arrive at once: no need to wait for the timeout.
        assert time.monotonic() - started < 2.0


def test_hung_agent_without_replica_raises_timeout_within_the_deadline(
    tiny_shards: tuple[MoeLM, Path],
) -> None:
    model, shard_dir = tiny_shards
    placement = {key: ["s2"] for key in EXPERTS}
    with deployed(shard_dir, placement, attempt_timeout_s=0.5) as (
        deployment,
        executor,
    ):
        pid = deployment.agent_pid("s2")
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        try:
            with pytest.raises(
                InferenceTimeout, match=r"layer 0 expert \d.*s2: no reply"
            ):
                infer(model, executor, PROMPT, 4, LoopbackPaths(), HOME)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert time.monotonic() - started < 1.5


def test_error_reply_from_first_replica_is_retried_on_the_second(
    tiny_shards: tuple[MoeLM, Path],
) -> None:
    model, shard_dir = tiny_shards
    placement = {key: ["s0", "s1"] for key in EXPERTS}
    with deployed(shard_dir, placement) as (_, executor):
        # Behind the executor's back: s0 drops everything it holds.
        for layer, expert in EXPERTS:
            executor.control("s0", _unload(layer, expert))
        report = infer(model, executor, PROMPT, 4, LoopbackPaths(), HOME, model)
    assert report["reference"]["tokens_identical"]
    assert report["summary"]["retries"] >= 1


def _stats():  # type: ignore[no-untyped-def]
    from containers.wire import ControlCommand

    return ControlCommand("stats")


def _unload(layer: int, expert: int):  # type: ignore[no-untyped-def]
    from containers.wire import ControlCommand

    return ControlCommand("unload", layer, expert)
