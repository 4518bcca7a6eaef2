"""What travels over MQTT between the home controller and the expert agents.

Expert traffic is binary, because it is mostly tensor bytes; control traffic
is small JSON, because it is rare and people read it in broker logs.

Every binary message starts with the same 6 bytes::

    magic b"SMOE" | version u8 | kind u8

followed, per kind, by (all little-endian):

    REQUEST   request_id u64, layer u16, expert u16, tensor block
    REPLY     request_id u64, compute_s f64, decode_s f64, encode_s f64,
              tensor block
    ERROR     request_id u64, code u16, text_len u16, text (UTF-8)

and a tensor block is::

    magic b"SMT" | version u8 | dtype u8 | ndim u8 | ndim x u32 dims | data

with `data` the raw little-endian element bytes in row-major order. The
element type on the wire is float32 unless the sender chose float16 or
bfloat16 (a trade of accuracy for bytes; float32 keeps the distributed model
within 1e-5 of the single-process one). Receivers widen to float32.

Decoding trusts nothing: a wrong magic, version, kind, dtype, rank, a dim of
zero or above the limit, or a byte count that does not match the dims raises
:class:`WireError` naming what is wrong. Sizes are checked against the bytes
actually received before anything is allocated, so a lying header cannot make
a receiver allocate more than it was sent.
"""

from __future__ import annotations

import enum
import json
import math
import struct
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from topology.errors import SpaceMoeError

MAGIC = b"SMOE"
TENSOR_MAGIC = b"SMT"
VERSION = 1

# Bounds a well-formed message never reaches; anything beyond is rejected
# before allocation. 16 MiB holds a 512-token prefill of d_model 8192.
MAX_PAYLOAD_BYTES = 16 * 1024 * 1024
MAX_NDIM = 4
MAX_DIM = 1 << 24
MAX_ERROR_TEXT_BYTES = 1024
MAX_CONTROL_BYTES = 64 * 1024

_HEADER = struct.Struct("<4sBB")
_REQUEST = struct.Struct("<QHH")
_REPLY = struct.Struct("<Qddd")
_ERROR = struct.Struct("<QHH")
_TENSOR = struct.Struct("<3sBBB")


class WireError(SpaceMoeError):
    """A payload does not decode; the message says which part is wrong."""


class Kind(enum.IntEnum):
    REQUEST = 1
    REPLY = 2
    ERROR = 3


class ErrorCode(enum.IntEnum):
    """Why an agent refused a request (carried in ERROR messages)."""

    BAD_REQUEST = 1  # the payload did not decode
    UNKNOWN_EXPERT = 2  # this agent holds no shard for (layer, expert)
    BAD_SHAPE = 3  # rows do not fit the expert's d_model
    INTERNAL = 4  # the expert raised while computing
    BAD_COMMAND = 5  # a control command did not decode or failed
    THROTTLED = 6  # the satellite's compute is off (too hot or out of power)


# Wire dtype codes. The code is part of the format: never renumber.
DTYPES: dict[str, tuple[int, torch.dtype]] = {
    "float32": (1, torch.float32),
    "float16": (2, torch.float16),
    "bfloat16": (3, torch.bfloat16),
}
_BY_CODE = {code: (name, dtype) for name, (code, dtype) in DTYPES.items()}


def wire_dtype(name: str) -> torch.dtype:
    """The torch dtype for a wire dtype name, or a WireError naming the choices."""
    try:
        return DTYPES[name][1]
    except KeyError:
        raise WireError(
            f"wire dtype {name!r} is not supported; choose one of {sorted(DTYPES)}"
        ) from None


# -- tensors ----------------------------------------------------------------


def encode_tensor(tensor: Tensor, dtype: str = "float32") -> bytes:
    """The tensor block for `tensor`, cast to the wire dtype `dtype`."""
    if dtype not in DTYPES:
        wire_dtype(dtype)
    code, torch_dtype = DTYPES[dtype]
    if tensor.dim() < 1 or tensor.dim() > MAX_NDIM:
        raise WireError(
            f"cannot encode a tensor of rank {tensor.dim()}; ranks 1..{MAX_NDIM} "
            "are supported"
        )
    shape = tuple(tensor.shape)
    if any(d < 1 or d > MAX_DIM for d in shape):
        raise WireError(f"cannot encode shape {shape}: every dim must be 1..{MAX_DIM}")
    flat = tensor.detach().to(device="cpu", dtype=torch_dtype).contiguous()

    # Reinterpret as plain integers so bfloat16 (which numpy lacks) goes the
    # same way as the others; swap only on a big-endian host.
    raw = flat.view(torch.int32 if torch_dtype == torch.float32 else torch.int16)
    array = raw.numpy()
    if sys.byteorder != "little":
        array = array.byteswap()
    data = array.tobytes()
    dims = struct.pack(f"<{len(shape)}I", *shape)
    return _TENSOR.pack(TENSOR_MAGIC, VERSION, code, len(shape)) + dims + data


def decode_tensor(buf: bytes | bytearray | memoryview, what: str = "tensor") -> Tensor:
    """A float32 tensor from a complete tensor block; WireError if malformed."""
    return decode_tensor_block(buf, what)[0]


def decode_tensor_block(
    buf: bytes | bytearray | memoryview, what: str = "tensor"
) -> tuple[Tensor, str]:
    """(float32 tensor, wire dtype name) from a tensor block."""
    view = memoryview(buf)
    if len(view) < _TENSOR.size:
        raise WireError(
            f"{what}: block of {len(view)} bytes is shorter than its "
            f"{_TENSOR.size}-byte header"
        )
    magic, version, code, ndim = _TENSOR.unpack_from(view)
    if magic != TENSOR_MAGIC:
        raise WireError(f"{what}: magic {bytes(magic)!r}, expected {TENSOR_MAGIC!r}")
    if version != VERSION:
        raise WireError(f"{what}: version {version}, this build reads {VERSION}")
    if code not in _BY_CODE:
        raise WireError(
            f"{what}: dtype code {code} unknown; known codes "
            f"{ {c: n for c, (n, _) in _BY_CODE.items()} }"
        )
    if not 1 <= ndim <= MAX_NDIM:
        raise WireError(f"{what}: rank {ndim}, expected 1..{MAX_NDIM}")

    offset = _TENSOR.size
    dims_end = offset + 4 * ndim
    if len(view) < dims_end:
        raise WireError(f"{what}: header says rank {ndim} but the dims are cut off")
    shape = struct.unpack_from(f"<{ndim}I", view, offset)
    if any(d < 1 or d > MAX_DIM for d in shape):
        raise WireError(f"{what}: shape {shape} has a dim outside 1..{MAX_DIM}")

    # Compare against the bytes actually present before allocating anything.
    name, torch_dtype = _BY_CODE[code]
    itemsize = 4 if torch_dtype == torch.float32 else 2
    expected = math.prod(shape) * itemsize
    present = len(view) - dims_end
    if present != expected:
        raise WireError(
            f"{what}: shape {shape} of {name} needs {expected} data bytes, "
            f"got {present}"
        )
    data = bytearray(view[dims_end:])
    if sys.byteorder != "little":
        data = bytearray(
            torch.frombuffer(data, dtype=torch.int32 if itemsize == 4 else torch.int16)
            .numpy()
            .byteswap()
            .tobytes()
        )
    tensor = torch.frombuffer(data, dtype=torch_dtype).reshape(shape)
    if torch_dtype != torch.float32:
        tensor = tensor.float()
    return tensor, name


def tensor_data_bytes(buf: bytes | bytearray | memoryview) -> int:
    """How many element bytes a well-formed tensor block carries (no checks)."""
    ndim = buf[_TENSOR.size - 1]
    return len(buf) - _TENSOR.size - 4 * ndim


# -- expert messages --------------------------------------------------------


@dataclass(frozen=True)
class ExpertRequest:
    """Rows for one expert of one layer: (n, d_model) float32 after decoding.

    `dtype` is the wire dtype the rows travelled in; the reply uses it too.
    """

    request_id: int
    layer: int
    expert: int
    tensor: Tensor
    dtype: str = "float32"


@dataclass(frozen=True)
class ExpertReply:
    """An expert's output rows and what the agent spent making them.

    `compute_s` is expert_forward alone; `decode_s`/`encode_s` are the agent's
    own (de)serialisation of the request and of this reply's tensor.
    """

    request_id: int
    tensor: Tensor
    compute_s: float
    decode_s: float
    encode_s: float


@dataclass(frozen=True)
class ExpertError:
    """An agent's refusal: a code from :class:`ErrorCode` and a readable text."""

    request_id: int
    code: int
    text: str

    def code_name(self) -> str:
        try:
            return ErrorCode(self.code).name
        except ValueError:
            return f"code {self.code}"


Message = ExpertRequest | ExpertReply | ExpertError


def encode_request(
    request_id: int, layer: int, expert: int, rows: Tensor, dtype: str = "float32"
) -> bytes:
    """A REQUEST payload carrying `rows` in wire dtype `dtype`."""
    _check_u(request_id, 64, "request_id")
    _check_u(layer, 16, "layer")
    _check_u(expert, 16, "expert")
    return (
        _HEADER.pack(MAGIC, VERSION, Kind.REQUEST)
        + _REQUEST.pack(request_id, layer, expert)
        + encode_tensor(rows, dtype)
    )


def encode_reply(
    request_id: int,
    tensor_block: bytes,
    compute_s: float,
    decode_s: float,
    encode_s: float,
) -> bytes:
    """A REPLY payload around an already encoded tensor block.

    The block is encoded first by the caller so that its encode time can be
    measured and carried in this same header.
    """
    _check_u(request_id, 64, "request_id")
    return (
        _HEADER.pack(MAGIC, VERSION, Kind.REPLY)
        + _REPLY.pack(request_id, compute_s, decode_s, encode_s)
        + tensor_block
    )


def encode_error(request_id: int, code: int, text: str) -> bytes:
    """An ERROR payload; text is cut to MAX_ERROR_TEXT_BYTES of UTF-8."""
    _check_u(request_id, 64, "request_id")
    _check_u(int(code), 16, "code")
    raw = text.encode("utf-8")[:MAX_ERROR_TEXT_BYTES].decode("utf-8", "ignore")
    data = raw.encode("utf-8")
    return (
        _HEADER.pack(MAGIC, VERSION, Kind.ERROR)
        + _ERROR.pack(request_id, int(code), len(data))
        + data
    )


def decode_message(payload: bytes | bytearray | memoryview) -> Message:
    """Any expert message; WireError says what is malformed."""
    view = memoryview(payload)
    if len(view) > MAX_PAYLOAD_BYTES:
        raise WireError(
            f"payload of {len(view)} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit"
        )
    if len(view) < _HEADER.size:
        raise WireError(
            f"payload of {len(view)} bytes is shorter than the "
            f"{_HEADER.size}-byte message header"
        )
    magic, version, kind = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise WireError(f"message magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise WireError(f"message version {version}, this build reads {VERSION}")
    body = view[_HEADER.size :]

    if kind == Kind.REQUEST:
        _need(body, _REQUEST.size, "request header")
        request_id, layer, expert = _REQUEST.unpack_from(body)
        tensor, dtype = decode_tensor_block(body[_REQUEST.size :], "request tensor")
        return ExpertRequest(request_id, layer, expert, tensor, dtype)
    if kind == Kind.REPLY:
        _need(body, _REPLY.size, "reply header")
        request_id, compute_s, decode_s, encode_s = _REPLY.unpack_from(body)
        for name, value in (
            ("compute_s", compute_s),
            ("decode_s", decode_s),
            ("encode_s", encode_s),
        ):
            if not math.isfinite(value) or value < 0:
                raise WireError(f"reply {name}={value!r}: expected a finite s >= 0")
        tensor = decode_tensor(body[_REPLY.size :], "reply tensor")
        return ExpertReply(request_id, tensor, compute_s, decode_s, encode_s)
    if kind == Kind.ERROR:
        _need(body, _ERROR.size, "error header")
        request_id, code, text_len = _ERROR.unpack_from(body)
        text_bytes = bytes(body[_ERROR.size :])
        if text_len != len(text_bytes) or text_len > MAX_ERROR_TEXT_BYTES:
            raise WireError(
                f"error text length {text_len} does not match the "
                f"{len(text_bytes)} bytes present (limit {MAX_ERROR_TEXT_BYTES})"
            )
        try:
            text = text_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WireError(f"error text is not UTF-8: {exc}") from None
        return ExpertError(request_id, code, text)
    raise WireError(
        f"message kind {kind} unknown; expected one of "
        f"{ {k.value: k.name for k in Kind} }"
    )


def decode_request(payload: bytes | bytearray | memoryview) -> ExpertRequest:
    """A REQUEST, or WireError (also for a well-formed message of another kind)."""
    message = decode_message(payload)
    if not isinstance(message, ExpertRequest):
        raise WireError(f"expected an expert request, got {type(message).__name__}")
    return message


def decode_reply(payload: bytes | bytearray | memoryview) -> ExpertReply | ExpertError:
    """A REPLY or ERROR, or WireError."""
    message = decode_message(payload)
    if isinstance(message, ExpertRequest):
        raise WireError("expected an expert reply or error, got a request")
    return message


def _need(body: memoryview, size: int, what: str) -> None:
    if len(body) < size:
        raise WireError(f"{what}: {len(body)} bytes, expected at least {size}")


def _check_u(value: int, bits: int, name: str) -> None:
    if not isinstance(value, int) or not 0 <= value < (1 << bits):
        raise WireError(f"{name}={value!r}: expected an integer in 0..2**{bits}-1")


# -- control commands (JSON) -----------------------------------------------

# op -> the fields it needs besides "op" and "v".
CONTROL_OPS: dict[str, tuple[str, ...]] = {
    "load": ("layer", "expert", "path"),
    "handover": ("layer", "expert", "path"),
    "unload": ("layer", "expert"),
    "ping": (),
    "stats": (),
}


@dataclass(frozen=True)
class ControlCommand:
    """One control command to an agent.

    `load` reads a shard (path relative to the agent's shard directory) and
    verifies its hash; `handover` does the same and then runs the expert once
    so the controller knows it serves before it moves traffic there;
    `unload` drops a shard; `ping` and `stats` just answer.
    """

    op: str
    layer: int | None = None
    expert: int | None = None
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"v": VERSION, "op": self.op}
        for name in CONTROL_OPS.get(self.op, ()):
            data[name] = getattr(self, name)
        return data


def encode_control(command: ControlCommand) -> bytes:
    """The JSON payload of a control command (validated as on receipt)."""
    payload = json.dumps(command.to_dict(), separators=(",", ":")).encode()
    decode_control(payload)
    return payload


def decode_control(payload: bytes | bytearray | memoryview) -> ControlCommand:
    """A validated control command, or WireError naming the bad field."""
    data = _json_object(payload, "control command")
    if data.get("v") != VERSION:
        raise WireError(
            f"control command version {data.get('v')!r}, expected {VERSION}"
        )
    op = data.get("op")
    if op not in CONTROL_OPS:
        raise WireError(
            f"control op {op!r} unknown; expected one of {sorted(CONTROL_OPS)}"
        )
    needed = CONTROL_OPS[op]
    extra = sorted(set(data) - {"v", "op", *needed})
    if extra:
        raise WireError(f"control op {op!r}: unexpected fields {extra}")
    fields: dict[str, Any] = {}
    for name in needed:
        if name not in data:
            raise WireError(f"control op {op!r}: missing field {name!r}")
        value = data[name]
        if name == "path":
            if not isinstance(value, str) or not value or len(value) > 4096:
                raise WireError(f"control op {op!r}: path {value!r} is not a path")
        elif (
            not isinstance(value, int)
            or isinstance(value, bool)
            or not (0 <= value < 1 << 16)
        ):
            raise WireError(
                f"control op {op!r}: {name}={value!r}, expected an integer 0..65535"
            )
        fields[name] = value
    return ControlCommand(op=op, **fields)


def encode_control_reply(op: str, ok: bool, **fields: Any) -> bytes:
    """A JSON reply: ``{"v", "op", "ok", ...fields}``."""
    return json.dumps(
        {"v": VERSION, "op": op, "ok": ok, **fields}, separators=(",", ":")
    ).encode()


def decode_control_reply(payload: bytes | bytearray | memoryview) -> dict[str, Any]:
    """A control reply as a dict with at least "op" and a boolean "ok"."""
    data = _json_object(payload, "control reply")
    if not isinstance(data.get("ok"), bool) or not isinstance(data.get("op"), str):
        raise WireError(f"control reply lacks a boolean 'ok' or an 'op': {data!r}")
    return data


def _json_object(payload: bytes | bytearray | memoryview, what: str) -> dict[str, Any]:
    if len(payload) > MAX_CONTROL_BYTES:
        raise WireError(
            f"{what} of {len(payload)} bytes exceeds {MAX_CONTROL_BYTES} bytes"
        )
    try:
        data = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"{what} is not UTF-8 JSON: {exc}") from None
    if not isinstance(data, dict):
        raise WireError(f"{what} must be a JSON object, got {type(data).__name__}")
    return data


# -- topics -----------------------------------------------------------------

# Every node's broker carries only that node's topics, but the node name is
# kept in the topic so broker logs and captures read unambiguously.
TOPIC_ROOT = "smoe"


def request_topic(node: str, layer: int, expert: int) -> str:
    """Where requests for (layer, expert) held by `node` are published."""
    return f"{TOPIC_ROOT}/{node}/expert/{layer}/{expert}/req"


def request_filter(node: str) -> str:
    """The subscription that catches every expert request sent to `node`."""
    return f"{TOPIC_ROOT}/{node}/expert/+/+/req"


def parse_request_topic(topic: str) -> tuple[str, int, int]:
    """(node, layer, expert) from a request topic; WireError if it is not one."""
    parts = topic.split("/")
    if (
        len(parts) != 6
        or parts[0] != TOPIC_ROOT
        or parts[2] != "expert"
        or parts[5] != "req"
        or not parts[3].isdigit()
        or not parts[4].isdigit()
    ):
        raise WireError(
            f"topic {topic!r} is not an expert request topic "
            f"({request_topic('NODE', 0, 0).replace('/0/0/', '/LAYER/EXPERT/')})"
        )
    return parts[1], int(parts[3]), int(parts[4])


def shard_topic(node: str, layer: int, expert: int) -> str:
    """Where a shard's bytes are sent to `node` when an expert migrates."""
    return f"{TOPIC_ROOT}/{node}/shard/{layer}/{expert}"


def shard_filter(node: str) -> str:
    """The subscription that catches every shard sent to `node`."""
    return f"{TOPIC_ROOT}/{node}/shard/+/+"


def parse_shard_topic(topic: str) -> tuple[str, int, int]:
    """(node, layer, expert) from a shard topic; WireError if it is not one."""
    parts = topic.split("/")
    if (
        len(parts) != 5
        or parts[0] != TOPIC_ROOT
        or parts[2] != "shard"
        or not parts[3].isdigit()
        or not parts[4].isdigit()
    ):
        raise WireError(
            f"topic {topic!r} is not a shard topic "
            f"({TOPIC_ROOT}/NODE/shard/LAYER/EXPERT)"
        )
    return parts[1], int(parts[3]), int(parts[4])


def control_topic(node: str) -> str:
    """Where control commands for the agent of `node` are published."""
    return f"{TOPIC_ROOT}/{node}/ctl"


def status_topic(node: str) -> str:
    """Retained "online"/"offline" of the agent of `node` (its MQTT will)."""
    return f"{TOPIC_ROOT}/{node}/status"


def reply_topic(node: str, client_id: str) -> str:
    """Where a client of `node`'s broker asks its replies to be sent."""
    return f"{TOPIC_ROOT}/{node}/reply/{client_id}"
