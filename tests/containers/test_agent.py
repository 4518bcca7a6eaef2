"""The satellite agent: correct answers, error replies, and it keeps serving."""

from __future__ import annotations

import json
import queue
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import torch
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from containers import wire
from containers.agent import Agent
from containers.broker import Broker
from moe.model import MoeLM, expert_forward
from moe.shards import shard_file_name
from tests.containers.support import free_port

NODE = "s7"


class Requester:
    """A bare MQTT 5 client that publishes with a ResponseTopic and waits."""

    def __init__(self, port: int) -> None:
        self.replies: queue.Queue[tuple[bytes, bytes | None]] = queue.Queue()
        self.statuses: queue.Queue[bytes] = queue.Queue()
        self.reply_topic = wire.reply_topic(NODE, "tester")
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, "tester", protocol=MQTTProtocolVersion.MQTTv5
        )
        client.message_callback_add(
            self.reply_topic,
            lambda c, u, m: self.replies.put(
                (m.payload, getattr(m.properties, "CorrelationData", None))
            ),
        )
        client.message_callback_add(
            wire.status_topic(NODE), lambda c, u, m: self.statuses.put(m.payload)
        )
        client.connect("127.0.0.1", port)
        client.loop_start()
        client.subscribe([(self.reply_topic, 0), (wire.status_topic(NODE), 1)])
        self.client = client

    def ask(self, topic: str, payload: bytes, correlation: bytes = b"c1") -> bytes:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = correlation
        self.client.publish(topic, payload, properties=props)
        reply, corr = self.replies.get(timeout=5)
        assert corr == correlation
        return reply

    def status(self) -> bytes:
        return self.statuses.get(timeout=5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def served(tiny_shards: tuple[MoeLM, Path]) -> Iterator[tuple[Agent, Requester, MoeLM]]:
    """Broker, an agent holding layer 1 expert 2, and a requester."""
    model, shard_dir = tiny_shards
    port = free_port()
    broker = Broker(NODE, "127.0.0.1", port, namespace=None).start()
    busy: list[float] = []
    agent = Agent(
        NODE, "127.0.0.1", port, shard_dir, on_busy=lambda t, s: busy.append(s)
    )
    agent.busy_log = busy  # type: ignore[attr-defined]
    agent.load(1, 2, shard_file_name(1, 2))
    requester = None
    try:
        agent.start()
        requester = Requester(port)
        yield agent, requester, model
    finally:
        if requester is not None:
            requester.close()
        agent.stop()
        broker.stop()


def test_answers_on_the_response_topic_with_exact_rows(served) -> None:  # type: ignore[no-untyped-def]
    agent, requester, model = served
    rows = torch.randn(3, model.cfg.d_model)
    payload = requester.ask(
        wire.request_topic(NODE, 1, 2), wire.encode_request(11, 1, 2, rows), b"\x01\x02"
    )
    reply = wire.decode_reply(payload)
    assert isinstance(reply, wire.ExpertReply)
    assert reply.request_id == 11
    assert torch.equal(reply.tensor, expert_forward(model.expert_weights(1, 2), rows))
    assert reply.compute_s > 0 and reply.decode_s > 0 and reply.encode_s > 0
    assert requester.status() == b"online"
    assert agent.busy_log and agent.busy_log[0] > 0  # type: ignore[attr-defined]


def test_reply_uses_the_request_wire_dtype(served) -> None:  # type: ignore[no-untyped-def]
    agent, requester, model = served
    rows = torch.randn(2, model.cfg.d_model)
    request = wire.encode_request(12, 1, 2, rows, "bfloat16")
    payload = requester.ask(wire.request_topic(NODE, 1, 2), request)
    block = payload[6 + 8 + 24 :]
    assert wire.decode_tensor_block(block)[1] == "bfloat16"


def test_malformed_requests_get_error_replies_and_serving_goes_on(served) -> None:  # type: ignore[no-untyped-def]
    agent, requester, model = served
    d = model.cfg.d_model
    cases = [
        (wire.request_topic(NODE, 1, 2), b"not a tensor", "BAD_REQUEST"),
        (
            wire.request_topic(NODE, 0, 0),
            wire.encode_request(2, 0, 0, torch.zeros(1, d)),
            "UNKNOWN_EXPERT",
        ),
        (
            wire.request_topic(NODE, 1, 2),
            wire.encode_request(3, 1, 2, torch.zeros(1, d + 1)),
            "BAD_SHAPE",
        ),
        (
            wire.request_topic(NODE, 1, 2),
            wire.encode_request(4, 1, 3, torch.zeros(1, d)),
            "BAD_REQUEST",
        ),
        (
            wire.request_topic(NODE, 1, 2),
            wire.encode_request(5, 1, 2, torch.zeros(2, 2, d)),
            "BAD_SHAPE",
        ),
    ]
    for topic, payload, code in cases:
        reply = wire.decode_reply(requester.ask(topic, payload))
        assert isinstance(reply, wire.ExpertError), code
        assert reply.code_name() == code

    rows = torch.randn(1, d)
    reply = wire.decode_reply(
        requester.ask(
            wire.request_topic(NODE, 1, 2), wire.encode_request(6, 1, 2, rows)
        )
    )
    assert isinstance(reply, wire.ExpertReply)
    stats = agent.stats()
    assert stats["errors_total"] == len(cases)
    assert stats["replies_total"] == 1
    assert stats["requests_total"] == len(cases) + 1


def test_control_over_mqtt_load_handover_unload_stats(served) -> None:  # type: ignore[no-untyped-def]
    agent, requester, model = served
    ctl = wire.control_topic(NODE)

    def command(*args: object) -> dict:
        payload = wire.encode_control(wire.ControlCommand(*args))  # type: ignore[arg-type]
        return json.loads(requester.ask(ctl, payload))

    reply = command("handover", 0, 3, shard_file_name(0, 3))
    assert reply["ok"] and reply["warmup_s"] > 0 and len(reply["sha256"]) == 64
    assert (0, 3) in agent.shards
    assert command("ping")["node"] == NODE
    assert command("unload", 1, 2) == {
        "v": 1,
        "op": "unload",
        "ok": True,
        "layer": 1,
        "expert": 2,
        "was_loaded": True,
    }
    stats = command("stats")["stats"]
    assert [(s["layer"], s["expert"]) for s in stats["shards"]] == [(0, 3)]

    bad = json.loads(requester.ask(ctl, b'{"v": 1, "op": "launch"}'))
    assert not bad["ok"] and "launch" in bad["error"]["text"]


def test_load_refuses_paths_outside_and_files_that_are_not_the_shard(
    tiny_shards: tuple[MoeLM, Path], tmp_path: Path
) -> None:
    _, shard_dir = tiny_shards
    agent = Agent(NODE, "127.0.0.1", 1, shard_dir)
    for path, match in [
        ("../manifest.json", "leaves the shard directory"),
        ("/etc/passwd", "leaves the shard directory"),
        (shard_file_name(0, 1), "not the manifest's file"),
    ]:
        reply = json.loads(
            agent.handle_control(
                wire.encode_control(wire.ControlCommand("load", 0, 0, path))
            )
        )
        assert not reply["ok"] and match in reply["error"]["text"]
    assert agent.shards == {}


def test_load_refuses_a_corrupt_shard(
    tiny_shards: tuple[MoeLM, Path], tmp_path: Path
) -> None:
    _, shard_dir = tiny_shards
    copy = tmp_path / "shards"
    shutil.copytree(shard_dir, copy)
    target = copy / shard_file_name(0, 0)
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    agent = Agent(NODE, "127.0.0.1", 1, copy)
    reply = json.loads(
        agent.handle_control(
            wire.encode_control(
                wire.ControlCommand("load", 0, 0, shard_file_name(0, 0))
            )
        )
    )
    assert not reply["ok"] and "sha256" in reply["error"]["text"]
    assert agent.shards == {}


def test_stop_publishes_offline(tiny_shards: tuple[MoeLM, Path]) -> None:
    _, shard_dir = tiny_shards
    port = free_port()
    broker = Broker(NODE, "127.0.0.1", port, namespace=None).start()
    requester = None
    try:
        agent = Agent(NODE, "127.0.0.1", port, shard_dir).start()
        requester = Requester(port)
        assert requester.status() == b"online"
        agent.stop()
        deadline = time.monotonic() + 5
        status = requester.status()
        assert status == b"offline" and time.monotonic() < deadline
    finally:
        if requester is not None:
            requester.close()
        broker.stop()


def test_metrics_hook_counts_requests_and_shards(
    tiny_shards: tuple[MoeLM, Path],
) -> None:
    from prometheus_client import CollectorRegistry

    from monitoring.metrics import SatelliteMetrics

    model, shard_dir = tiny_shards
    registry = CollectorRegistry()
    port = free_port()
    broker = Broker(NODE, "127.0.0.1", port, namespace=None).start()
    agent = Agent(
        NODE, "127.0.0.1", port, shard_dir, metrics=SatelliteMetrics(registry, NODE)
    )
    requester = None
    try:
        agent.load(0, 1, shard_file_name(0, 1))
        agent.start()
        requester = Requester(port)
        rows = torch.randn(2, model.cfg.d_model)
        requester.ask(
            wire.request_topic(NODE, 0, 1), wire.encode_request(1, 0, 1, rows)
        )
        requester.ask(
            wire.request_topic(NODE, 0, 2), wire.encode_request(2, 0, 2, rows)
        )
    finally:
        if requester is not None:
            requester.close()
        agent.stop()
        broker.stop()

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"satellite": NODE, **labels})

    assert (
        value("spacemoe_expert_requests_total", layer="0", expert="1", status="ok") == 1
    )
    assert (
        value("spacemoe_expert_requests_total", layer="0", expert="2", status="error")
        == 1
    )
    assert value("spacemoe_expert_shards_loaded") == 1
    assert value("spacemoe_expert_shard_bytes") == 3 * 32 * 64 * 4
    assert value("spacemoe_expert_payload_bytes_total", direction="in") > 2 * 2 * 32 * 4


def test_throttle_stretches_expert_work_and_zero_refuses(
    tiny_shards: tuple[MoeLM, Path],
) -> None:
    model, shard_dir = tiny_shards
    speed = [1.0]
    port = free_port()
    broker = Broker(NODE, "127.0.0.1", port, namespace=None).start()
    agent = Agent(NODE, "127.0.0.1", port, shard_dir, throttle=lambda: speed[0])
    agent.load(1, 2, shard_file_name(1, 2))
    requester = None
    rows = torch.randn(4096, model.cfg.d_model)

    def compute_s(n: int = 7) -> float:
        """The fastest of `n` requests: the least disturbed by the machine."""
        times = []
        for i in range(n):
            request = wire.encode_request(100 + i, 1, 2, rows)
            reply = wire.decode_reply(
                requester.ask(wire.request_topic(NODE, 1, 2), request)
            )
            assert isinstance(reply, wire.ExpertReply)
            times.append(reply.compute_s)
        return min(times)

    try:
        agent.start()
        requester = Requester(port)
        compute_s(3)  # warm up caches and allocator
        full = compute_s()
        speed[0] = 0.25
        slowed = compute_s()
        speed[0] = 0.0
        refused = wire.decode_reply(
            requester.ask(
                wire.request_topic(NODE, 1, 2), wire.encode_request(7, 1, 2, rows)
            )
        )
    finally:
        if requester is not None:
            requester.close()
        agent.stop()
        broker.stop()

    # A quarter of the speed takes about four times as long.
    assert slowed > 2.5 * full, (full, slowed)
    assert isinstance(refused, wire.ExpertError)
    assert refused.code == wire.ErrorCode.THROTTLED
    assert "another replica" in refused.text


def test_a_shard_sent_as_bytes_is_checked_then_served(served) -> None:  # type: ignore[no-untyped-def]
    agent, requester, model = served
    shard_dir = agent.shard_dir
    data = (shard_dir / shard_file_name(0, 3)).read_bytes()

    reply = json.loads(requester.ask(wire.shard_topic(NODE, 0, 3), data))
    assert reply["ok"] and reply["op"] == "receive" and reply["bytes"] == len(data)
    assert reply["warmup_s"] > 0 and (0, 3) in agent.shards
    # What it serves is the expert itself.
    rows = torch.randn(3, model.cfg.d_model)
    request = wire.encode_request(7, 0, 3, rows)
    answer = wire.decode_reply(requester.ask(wire.request_topic(NODE, 0, 3), request))
    assert isinstance(answer, wire.ExpertReply)
    assert torch.equal(answer.tensor, expert_forward(model.expert_weights(0, 3), rows))

    # Another expert's bytes, or damaged ones, are refused by hash.
    for payload in (data, data[:-1] + bytes([data[-1] ^ 0xFF])):
        bad = json.loads(requester.ask(wire.shard_topic(NODE, 1, 0), payload))
        assert not bad["ok"] and bad["error"]["code"] == "BAD_SHARD"
        assert "sha256" in bad["error"]["text"]
    assert (1, 0) not in agent.shards
    assert (1, 2) in agent.shards and (0, 3) in agent.shards
