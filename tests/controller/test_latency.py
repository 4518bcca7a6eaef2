"""The latency arithmetic: paths from emulator state, transfer times, breakdown."""

from __future__ import annotations

import pytest

from controller.inference import LayerRecord, RequestRecord
from controller.latency import (
    FRAME_OVERHEAD_BYTES,
    Hop,
    StatePaths,
    mqtt_publish_bytes,
    summarize,
    token_row,
    transfer_s,
)
from topology.errors import InferenceError

STATE = {
    "nodes": [{"name": n} for n in ("gs", "s1", "s2", "s3")],
    "links": [
        {"a": "gs", "b": "s1", "up": True, "delay_s": 0.004, "rate_bps": 50e6},
        {"a": "s1", "b": "s2", "up": True, "delay_s": 0.010, "rate_bps": 100e6},
        {"a": "s2", "b": "s3", "up": True, "delay_s": 0.010, "rate_bps": 100e6},
        {"a": "s1", "b": "s3", "up": False, "delay_s": 0.001, "rate_bps": 100e6},
    ],
    "paths": {"gs": {"s2": ["gs", "s1", "s2"]}},
}


def test_paths_use_recorded_routes_their_reverse_or_the_shortest_up_path() -> None:
    paths = StatePaths(STATE)
    assert [(h.src, h.dst) for h in paths.hops("gs", "s2")] == [
        ("gs", "s1"),
        ("s1", "s2"),
    ]
    assert [(h.src, h.dst) for h in paths.hops("s2", "gs")] == [
        ("s2", "s1"),
        ("s1", "gs"),
    ]
    # s1-s3 is down, so gs -> s3 goes round through s2.
    assert [h.dst for h in paths.hops("gs", "s3")] == ["s1", "s2", "s3"]
    assert paths.hops("gs", "gs") == []
    cut = {**STATE, "links": STATE["links"][:1]}
    with pytest.raises(InferenceError, match="no path from gs to s3"):
        StatePaths(cut).hops("gs", "s3")


def test_transfer_time_of_one_and_of_many_packets() -> None:
    hops = [Hop("a", "b", 0.004, 50e6), Hop("b", "c", 0.010, 100e6)]
    one = 1000 + FRAME_OVERHEAD_BYTES
    assert transfer_s(hops, 1000) == pytest.approx(
        0.014 + 8 * one / 50e6 + 8 * one / 100e6
    )
    # Ten packets: the nine behind the first pass at the 50 Mb/s bottleneck.
    many = transfer_s(hops, 10 * 1448)
    first = 1448 + FRAME_OVERHEAD_BYTES
    assert many == pytest.approx(
        0.014 + 8 * first / 50e6 + 8 * first / 100e6 + 9 * 8 * first / 50e6
    )
    assert transfer_s([], 10**6) == 0.0


def test_mqtt_publish_size() -> None:
    # 1 fixed header + 1 remaining length + 2+5 topic + 1 props length + 4 payload
    assert mqtt_publish_bytes(5, 4, 0) == 14
    assert mqtt_publish_bytes(5, 200, 0) == 1 + 2 + 2 + 5 + 1 + 200


def record(node: str, sent: float, received: float, compute: float) -> RequestRecord:
    return RequestRecord(
        layer=0,
        expert=0,
        node=node,
        rows=1,
        request_bytes=1000,
        tensor_bytes=960,
        reply_bytes=1000,
        request_topic_bytes=40,
        reply_topic_bytes=20,
        sent_s=sent,
        received_s=received,
        agent_compute_s=compute,
        agent_decode_s=0.0001,
        agent_encode_s=0.0001,
    )


def test_breakdown_adds_up_and_follows_the_critical_request() -> None:
    paths = StatePaths(STATE)
    near = record("s1", 10.001, 10.011, 0.001)
    far = record("s2", 10.002, 10.032, 0.002)
    layer = LayerRecord(0, 10.0, 10.033, [near, far])
    row = token_row(0.040, [layer], paths, "gs")
    parts = (
        "home_compute_s",
        "expert_compute_s",
        "serialization_s",
        "network_s",
        "queueing_s",
    )
    assert sum(row[p] for p in parts) == pytest.approx(row["total_s"])
    assert row["home_compute_s"] == pytest.approx(0.007)
    assert row["expert_compute_s"] == 0.002  # the far one was waited for
    assert row["network_s"] > 2 * 0.014
    # Bound: home + far's propagation both ways + 960 B at 50 Mb/s each way + compute.
    assert row["bound_s"] == pytest.approx(0.007 + 0.028 + 2 * 8 * 960 / 50e6 + 0.002)
    assert row["ratio"] == pytest.approx(0.040 / row["bound_s"])
    assert row["payload_bytes"] == 4000 and row["wire_bytes"] > 4000

    summary = summarize([{"step": "prefill", **row}, {"step": "step 1", **row}])
    assert summary["decode_steps"] == 1
    assert summary["total_s_p50"] == pytest.approx(0.040)
