"""The wire format: exact round trips, and malformed input always a WireError."""

from __future__ import annotations

import random
import struct
import tracemalloc

import pytest
import torch

from containers import wire
from containers.wire import WireError


@pytest.mark.parametrize("shape", [(1, 32), (7, 256), (3,), (2, 3, 4)])
def test_float32_round_trip_is_bit_exact(shape: tuple[int, ...]) -> None:
    rows = torch.randn(shape)
    message = wire.decode_request(wire.encode_request(42, 3, 7, rows))
    assert (message.request_id, message.layer, message.expert) == (42, 3, 7)
    assert message.dtype == "float32"
    assert message.tensor.dtype == torch.float32
    assert torch.equal(message.tensor, rows)


@pytest.mark.parametrize(
    ("dtype", "torch_dtype"), [("float16", torch.float16), ("bfloat16", torch.bfloat16)]
)
def test_half_dtypes_round_trip_as_their_rounding(
    dtype: str, torch_dtype: torch.dtype
) -> None:
    rows = torch.randn(5, 16)
    payload = wire.encode_request(1, 0, 0, rows, dtype)
    message = wire.decode_request(payload)
    assert message.dtype == dtype
    assert torch.equal(message.tensor, rows.to(torch_dtype).float())
    assert len(payload) < len(wire.encode_request(1, 0, 0, rows)) - 5 * 16


def test_reply_and_error_round_trip() -> None:
    out = torch.randn(2, 8)
    payload = wire.encode_reply(9, wire.encode_tensor(out), 0.5, 0.25, 0.125)
    reply = wire.decode_reply(payload)
    assert isinstance(reply, wire.ExpertReply)
    assert (reply.request_id, reply.compute_s, reply.decode_s, reply.encode_s) == (
        9,
        0.5,
        0.25,
        0.125,
    )
    assert torch.equal(reply.tensor, out)

    error = wire.decode_reply(
        wire.encode_error(9, wire.ErrorCode.UNKNOWN_EXPERT, "gone")
    )
    assert isinstance(error, wire.ExpertError)
    assert (error.code_name(), error.text) == ("UNKNOWN_EXPERT", "gone")


def test_error_text_is_cut_to_the_limit_on_a_character_boundary() -> None:
    text = "é" * wire.MAX_ERROR_TEXT_BYTES
    error = wire.decode_reply(wire.encode_error(1, 4, text))
    assert isinstance(error, wire.ExpertError)
    assert len(error.text.encode()) <= wire.MAX_ERROR_TEXT_BYTES
    assert set(error.text) == {"é"}


def test_encoding_refuses_unknown_dtype_and_out_of_range_fields() -> None:
    with pytest.raises(WireError, match="float64"):
        wire.encode_request(1, 0, 0, torch.zeros(1, 2), "float64")
    with pytest.raises(WireError, match="layer"):
        wire.encode_request(1, 70000, 0, torch.zeros(1, 2))
    with pytest.raises(WireError, match="rank"):
        wire.encode_tensor(torch.tensor(1.0))


def test_kind_mismatch_is_named() -> None:
    request = wire.encode_request(1, 0, 0, torch.zeros(1, 4))
    with pytest.raises(WireError, match="got a request"):
        wire.decode_reply(request)
    with pytest.raises(WireError, match="expected an expert request"):
        wire.decode_request(wire.encode_error(1, 1, "x"))


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda b: b"XXXX" + b[4:], "magic"),
        (lambda b: b[:4] + b"\x09" + b[5:], "version"),
        (lambda b: b[:5] + b"\x07" + b[6:], "kind 7"),
        (lambda b: b[:18] + b"BAD" + b[21:], "magic"),
        (lambda b: b[:22] + b"\x09" + b[23:], "dtype code 9"),
        (lambda b: b[:23] + b"\x00" + b[24:], "rank 0"),
        (lambda b: b[:23] + b"\x05" + b[24:], "rank 5"),
        (lambda b: b[:24] + struct.pack("<I", 0) + b[28:], "dim outside"),
        (lambda b: b[:-1], "needs 96 data bytes, got 95"),
        (lambda b: b + b"\x00", "needs 96 data bytes, got 97"),
        (lambda b: b[:10], "request header"),
        (lambda b: b[:3], "shorter than"),
    ],
)
def test_each_malformation_is_named(mutate, match: str) -> None:  # type: ignore[no-untyped-def]
    good = wire.encode_request(5, 1, 2, torch.zeros(3, 8))
    with pytest.raises(WireError, match=match):
        wire.decode_message(mutate(good))


def test_lying_header_does_not_allocate_what_it_claims() -> None:
    """A header claiming 2**24 x 2**24 floats, with 8 bytes of data."""
    header = wire._HEADER.pack(wire.MAGIC, wire.VERSION, wire.Kind.REQUEST)
    body = wire._REQUEST.pack(1, 0, 0)
    block = wire._TENSOR.pack(wire.TENSOR_MAGIC, wire.VERSION, 1, 2)
    payload = header + body + block + struct.pack("<II", 1 << 24, 1 << 24) + b"\0" * 8
    tracemalloc.start()
    try:
        with pytest.raises(WireError, match="data bytes"):
            wire.decode_message(payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_oversized_payload_is_refused_before_parsing() -> None:
    with pytest.raises(WireError, match="exceeds"):
        wire.decode_message(b"\0" * (wire.MAX_PAYLOAD_BYTES + 1))


def test_fuzzed_payloads_raise_only_wire_errors() -> None:
    """Truncations, bit flips and random bytes: decode or WireError, never else."""
    rng = random.Random(1234)
    seeds = [
        wire.encode_request(77, 1, 3, torch.randn(2, 8)),
        wire.encode_request(78, 0, 1, torch.randn(1, 4), "bfloat16"),
        wire.encode_reply(79, wire.encode_tensor(torch.randn(2, 8)), 1e-3, 1e-4, 1e-4),
        wire.encode_error(80, 2, "no such expert"),
    ]
    cases = []
    for seed in seeds:
        cases += [seed[:n] for n in range(len(seed))]
        for _ in range(300):
            mutated = bytearray(seed)
            for _ in range(rng.randint(1, 4)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            cases.append(bytes(mutated))
    cases += [rng.randbytes(rng.randint(0, 200)) for _ in range(300)]
    decoded = 0
    for case in cases:
        try:
            message = wire.decode_message(case)
        except WireError:
            continue
        decoded += 1
        assert isinstance(
            message, wire.ExpertRequest | wire.ExpertReply | wire.ExpertError
        )
    # Flips inside tensor data leave valid messages; most others must not.
    assert 0 < decoded < len(cases)


def test_control_commands_round_trip_and_reject_bad_fields() -> None:
    command = wire.ControlCommand("handover", 1, 2, "layer01-expert002.safetensors")
    assert wire.decode_control(wire.encode_control(command)) == command
    assert (
        wire.decode_control(wire.encode_control(wire.ControlCommand("ping"))).op
        == "ping"
    )

    bad = [
        (b"\xff\xfe", "UTF-8 JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"v": 1, "op": "reboot"}', "op 'reboot' unknown"),
        (b'{"v": 2, "op": "ping"}', "version 2"),
        (b'{"v": 1, "op": "unload", "layer": 1}', "missing field 'expert'"),
        (b'{"v": 1, "op": "unload", "layer": -1, "expert": 0}', "layer=-1"),
        (b'{"v": 1, "op": "unload", "layer": true, "expert": 0}', "layer=True"),
        (b'{"v": 1, "op": "ping", "extra": 1}', "unexpected fields"),
        (b'{"v": 1, "op": "load", "layer": 0, "expert": 0, "path": ""}', "path"),
    ]
    for payload, match in bad:
        with pytest.raises(WireError, match=match):
            wire.decode_control(payload)


def test_request_topics_parse_and_reject_others() -> None:
    topic = wire.request_topic("s12", 3, 7)
    assert wire.parse_request_topic(topic) == ("s12", 3, 7)
    for other in [
        "smoe/s12/ctl",
        "smoe/s12/expert/x/7/req",
        "other/s12/expert/3/7/req",
    ]:
        with pytest.raises(WireError, match="not an expert request topic"):
            wire.parse_request_topic(other)


def test_shard_topics_parse_and_reject_others() -> None:
    topic = wire.shard_topic("s12", 3, 7)
    assert wire.parse_shard_topic(topic) == ("s12", 3, 7)
    assert topic.startswith(wire.shard_filter("s12").removesuffix("+/+"))
    for other in ["smoe/s12/ctl", "smoe/s12/shard/3", "smoe/s12/shard/x/7"]:
        with pytest.raises(WireError, match="not a shard topic"):
            wire.parse_shard_topic(other)
