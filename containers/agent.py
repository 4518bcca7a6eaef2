"""The satellite agent: serves the expert shards it holds over MQTT 5.

One agent per node. It connects to the node's own broker (a paho-mqtt 2.2
client, MQTT v5) and subscribes to

    smoe/<node>/expert/+/+/req   expert requests (binary, containers.wire)
    smoe/<node>/ctl              control commands (JSON: load, handover,
                                 unload, ping, stats)
    smoe/<node>/shard/+/+        a shard's bytes, when an expert migrates
                                 here with its weights (checked against
                                 the manifest's SHA-256, then served)

Each request carries a ResponseTopic and CorrelationData (MQTT 5 request /
response); the agent publishes its reply there with the same correlation
data. It subscribes to every expert topic of its node rather than to the
ones it holds, so a request for a shard it does not hold (e.g. one unloaded
a moment ago) gets a prompt UNKNOWN_EXPERT error instead of silence, and
the controller can retry elsewhere without waiting for a timeout.

The agent's status topic holds a retained "online"; its MQTT will sets
"offline" when the connection drops without a goodbye (the process died),
which lets a controller fail over at once.

A malformed payload, an unknown expert, or rows of the wrong width get an
ERROR reply (when the request named a response topic) and a log line; the
agent keeps serving.

Busy time: the wall time from taking a request to handing its reply to the
client is accumulated in ``stats()["busy_s"]`` and, if given, reported to
``on_busy(start_monotonic_s, busy_s)`` after every request: the hook the
power model uses. ``metrics`` (e.g. monitoring.metrics.SatelliteMetrics)
receives every request's outcome and the shard count for Prometheus.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as mqtt
import torch
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from torch import Tensor

from containers import wire
from moe.model import expert_forward
from moe.shards import Manifest, load_manifest, load_shard, load_shard_bytes
from topology.errors import ShardError, SpaceMoeError

log = logging.getLogger(__name__)

# How many recent request latencies stats() summarises.
LATENCY_WINDOW = 1024

BusyHook = Callable[[float, float], None]


class RequestObserver(Protocol):
    """What the agent reports to a metrics exporter (SatelliteMetrics fits)."""

    def observe_request(
        self,
        layer: int,
        expert: int,
        status: str,
        duration_s: float,
        busy_s: float,
        bytes_in: int,
        bytes_out: int,
    ) -> None: ...

    def set_shards(self, count: int, total_bytes: int) -> None: ...


class Agent:
    """The expert server of one node (see the module docstring).

    `host`/`port` name the node's broker; `shard_dir` holds manifest.json
    and the shard files that load commands name (relative paths only).
    """

    def __init__(
        self,
        node: str,
        host: str,
        port: int,
        shard_dir: str | Path,
        on_busy: BusyHook | None = None,
        keepalive_s: int = 5,
        on_ready: Callable[[], None] | None = None,
        metrics: RequestObserver | None = None,
        throttle: Callable[[], float] | None = None,
    ) -> None:
        self.node = node
        # Speed the power model allows (1 full, 0 off); None: never slowed.
        self.throttle = throttle
        self.metrics = metrics
        self.host = host
        self.port = port
        self.shard_dir = Path(shard_dir).resolve()
        self.on_busy = on_busy
        self.keepalive_s = keepalive_s
        self.client_id = f"smoe-agent-{node}"
        self.shards: dict[tuple[int, int], dict[str, Tensor]] = {}
        self.shard_sha256: dict[tuple[int, int], str] = {}
        self._manifest: Manifest | None = None
        self._lock = threading.Lock()
        self._latencies_s: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._counters: dict[str, float] = {
            "requests_total": 0,
            "replies_total": 0,
            "errors_total": 0,
            "control_total": 0,
            "busy_s": 0.0,
            "compute_s": 0.0,
            "decode_s": 0.0,
            "encode_s": 0.0,
            "bytes_in_total": 0,
            "bytes_out_total": 0,
        }
        self._started_monotonic = time.monotonic()
        self._stopping = False
        self.on_ready = on_ready
        self.ready = threading.Event()
        self.client = self._make_client()

    # -- MQTT plumbing --------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        client.will_set(wire.status_topic(self.node), b"offline", qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=4)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.message_callback_add(wire.request_filter(self.node), self._on_request)
        client.message_callback_add(wire.control_topic(self.node), self._on_control)
        client.message_callback_add(wire.shard_filter(self.node), self._on_shard)
        return client

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason_code: Any,
        properties: Any,
    ) -> None:
        if reason_code.is_failure:
            log.warning(
                "agent %s: broker refused connection: %s", self.node, reason_code
            )
            return
        set_nodelay(client)
        client.subscribe(
            [
                (wire.request_filter(self.node), 0),
                (wire.control_topic(self.node), 1),
                (wire.shard_filter(self.node), 1),
            ]
        )
        client.publish(wire.status_topic(self.node), b"online", qos=1, retain=True)
        log.info("agent %s connected to %s:%s", self.node, self.host, self.port)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: Any,
        properties: Any,
    ) -> None:
        failed = [code for code in reason_codes if code.is_failure]
        if failed:
            log.error("agent %s: broker refused subscriptions: %s", self.node, failed)
            return
        # Serving starts only once the broker routes requests to us.
        if not self.ready.is_set():
            self.ready.set()
            if self.on_ready is not None:
                self.on_ready()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason_code: Any,
        properties: Any,
    ) -> None:
        if not self._stopping:
            log.warning(
                "agent %s lost its broker (%s); reconnecting", self.node, reason_code
            )

    def connect(self, timeout_s: float = 10.0) -> None:
        """Connect to the broker, retrying until `timeout_s` has passed."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.client.connect(self.host, self.port, keepalive=self.keepalive_s)
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise SpaceMoeError(
                        f"agent {self.node}: cannot reach its broker at "
                        f"{self.host}:{self.port} within {timeout_s} s ({exc}); "
                        "is the broker running?"
                    ) from None
                time.sleep(0.05)

    def serve_forever(self, timeout_s: float = 10.0) -> None:
        """Connect and serve in this thread until request_stop() is called.

        The loop is ours rather than paho's loop_forever so that a signal
        handler can end it safely: it only sets a flag that the loop polls.
        """
        self.connect(timeout_s)
        backoff_s = 0.25
        while not self._stopping:
            rc = self.client.loop(timeout=0.1)
            if rc == mqtt.MQTT_ERR_SUCCESS or self._stopping:
                backoff_s = 0.25
                continue
            time.sleep(backoff_s)
            try:
                self.client.reconnect()
            except OSError as exc:
                log.warning("agent %s: reconnect failed: %s", self.node, exc)
                backoff_s = min(backoff_s * 2, 4.0)
        self._say_goodbye()

    def request_stop(self) -> None:
        """Ask serve_forever to finish (safe to call from a signal handler)."""
        self._stopping = True

    def start(self, timeout_s: float = 10.0) -> Agent:
        """Connect and serve from a background thread (tests, in-process use)."""
        self.connect(timeout_s)
        self.client.loop_start()
        if not self.ready.wait(timeout_s):
            self.stop()
            raise SpaceMoeError(
                f"agent {self.node}: broker at {self.host}:{self.port} did not "
                f"acknowledge its subscriptions within {timeout_s} s"
            )
        return self

    def stop(self) -> None:
        """Say offline (retained), disconnect, and end the background loop."""
        self._stopping = True
        info = self.client.publish(
            wire.status_topic(self.node), b"offline", qos=1, retain=True
        )
        try:
            info.wait_for_publish(timeout=1.0)
        except (RuntimeError, ValueError):
            pass  # not connected: the broker will publish the will instead
        self.client.disconnect()
        self.client.loop_stop()

    def _say_goodbye(self) -> None:
        """Publish "offline" and disconnect, driving the loop by hand."""
        info = self.client.publish(
            wire.status_topic(self.node), b"offline", qos=1, retain=True
        )
        deadline = time.monotonic() + 1.0
        while not info.is_published() and time.monotonic() < deadline:
            if self.client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                break
        self.client.disconnect()
        self.client.loop(timeout=0.05)
        log.info("agent %s stopped", self.node)

    # -- expert requests ------------------------------------------------

    def _on_request(
        self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage
    ) -> None:
        started = time.monotonic()
        response_topic = getattr(msg.properties, "ResponseTopic", None)
        correlation = getattr(msg.properties, "CorrelationData", None)
        reply = self.handle_request(msg.topic, msg.payload)
        if response_topic:
            props = Properties(PacketTypes.PUBLISH)
            if correlation is not None:
                props.CorrelationData = correlation
            client.publish(response_topic, reply, qos=0, properties=props)
        else:
            log.warning(
                "agent %s: request on %s has no ResponseTopic; dropped the reply",
                self.node,
                msg.topic,
            )
        busy_s = time.monotonic() - started
        with self._lock:
            self._counters["busy_s"] += busy_s
            self._counters["bytes_in_total"] += len(msg.payload)
            self._counters["bytes_out_total"] += len(reply)
            self._latencies_s.append(busy_s)
        if self.on_busy is not None:
            self.on_busy(started, busy_s)
        if self.metrics is not None:
            try:
                _, layer, expert = wire.parse_request_topic(msg.topic)
            except wire.WireError:
                layer, expert = -1, -1
            status = "ok" if reply[5] == wire.Kind.REPLY else "error"
            self.metrics.observe_request(
                layer, expert, status, busy_s, busy_s, len(msg.payload), len(reply)
            )

    def handle_request(self, topic: str, payload: bytes | bytearray) -> bytes:
        """The reply payload (REPLY or ERROR) for one request payload."""
        with self._lock:
            self._counters["requests_total"] += 1

        t0 = time.perf_counter()
        try:
            _, topic_layer, topic_expert = wire.parse_request_topic(topic)
            request = wire.decode_request(payload)
        except wire.WireError as exc:
            return self._error(0, wire.ErrorCode.BAD_REQUEST, str(exc))
        decode_s = time.perf_counter() - t0

        key = (request.layer, request.expert)
        if key != (topic_layer, topic_expert):
            return self._error(
                request.request_id,
                wire.ErrorCode.BAD_REQUEST,
                f"payload names layer {request.layer} expert {request.expert} but "
                f"was sent on {topic}",
            )
        weights = self.shards.get(key)
        if weights is None:
            return self._error(
                request.request_id,
                wire.ErrorCode.UNKNOWN_EXPERT,
                f"{self.node} holds no shard for layer {request.layer} expert "
                f"{request.expert}; it holds {sorted(self.shards)}",
            )
        rows = request.tensor
        d_model = weights["w1"].shape[1]
        if rows.dim() != 2 or rows.shape[1] != d_model:
            return self._error(
                request.request_id,
                wire.ErrorCode.BAD_SHAPE,
                f"rows of shape {tuple(rows.shape)}; expected (n, {d_model})",
            )

        factor = 1.0 if self.throttle is None else self.throttle()
        if factor <= 0.0:
            return self._error(
                request.request_id,
                wire.ErrorCode.THROTTLED,
                f"{self.node} has its compute off (too hot or battery at its "
                "limit); ask another replica",
            )

        t1 = time.perf_counter()
        try:
            with torch.inference_mode():
                out = expert_forward(weights, rows)
        except Exception as exc:  # a bad shard must not end the agent
            log.exception("agent %s: expert %s failed", self.node, key)
            return self._error(request.request_id, wire.ErrorCode.INTERNAL, repr(exc))
        if factor < 1.0:
            # A throttled accelerator takes 1/factor as long for the same work.
            time.sleep((time.perf_counter() - t1) * (1.0 / factor - 1.0))
        compute_s = time.perf_counter() - t1

        t2 = time.perf_counter()
        block = wire.encode_tensor(out, request.dtype)
        encode_s = time.perf_counter() - t2
        with self._lock:
            self._counters["replies_total"] += 1
            self._counters["compute_s"] += compute_s
            self._counters["decode_s"] += decode_s
            self._counters["encode_s"] += encode_s
        return wire.encode_reply(
            request.request_id, block, compute_s, decode_s, encode_s
        )

    def _error(self, request_id: int, code: wire.ErrorCode, text: str) -> bytes:
        log.warning("agent %s: %s: %s", self.node, code.name, text)
        with self._lock:
            self._counters["errors_total"] += 1
        return wire.encode_error(request_id, code, text)

    # -- control commands -----------------------------------------------

    def _on_control(
        self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage
    ) -> None:
        self._answer(client, msg, self.handle_control(msg.payload))

    def _on_shard(
        self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage
    ) -> None:
        self._answer(client, msg, self.handle_shard(msg.topic, bytes(msg.payload)))

    def _answer(self, client: mqtt.Client, msg: mqtt.MQTTMessage, reply: bytes) -> None:
        """Publish `reply` to the ResponseTopic of `msg`, with its correlation."""
        response_topic = getattr(msg.properties, "ResponseTopic", None)
        if not response_topic:
            log.info("agent %s: %s without ResponseTopic", self.node, msg.topic)
            return
        props = Properties(PacketTypes.PUBLISH)
        correlation = getattr(msg.properties, "CorrelationData", None)
        if correlation is not None:
            props.CorrelationData = correlation
        client.publish(response_topic, reply, qos=1, properties=props)

    def handle_shard(self, topic: str, data: bytes) -> bytes:
        """Take a shard sent as bytes (a migration); the JSON reply.

        The bytes must hash to the manifest's SHA-256 for that expert; the
        expert is then run once, as for a handover.
        """
        with self._lock:
            self._counters["control_total"] += 1
        try:
            node, layer, expert = wire.parse_shard_topic(topic)
            if node != self.node:
                raise wire.WireError(f"shard for {node!r} reached agent {self.node}")
            entry = self._manifest_entry(layer, expert)
            weights = load_shard_bytes(entry, data)
        except (ShardError, wire.WireError, OSError) as exc:
            log.warning("agent %s: shard refused: %s", self.node, exc)
            return wire.encode_control_reply(
                "receive", False, error={"code": "BAD_SHARD", "text": str(exc)}
            )
        key = (layer, expert)
        self._install(key, weights, entry.sha256)
        log.info(
            "agent %s received layer %s expert %s (%d bytes)",
            self.node,
            layer,
            expert,
            len(data),
        )
        return wire.encode_control_reply(
            "receive",
            True,
            layer=layer,
            expert=expert,
            sha256=entry.sha256,
            bytes=len(data),
            warmup_s=self._warm_up(key),
        )

    def handle_control(self, payload: bytes | bytearray) -> bytes:
        """The JSON reply to one control command payload."""
        with self._lock:
            self._counters["control_total"] += 1
        try:
            command = wire.decode_control(payload)
        except wire.WireError as exc:
            log.warning("agent %s: bad control command: %s", self.node, exc)
            return wire.encode_control_reply(
                "?", False, error={"code": "BAD_COMMAND", "text": str(exc)}
            )
        try:
            fields = self._run_control(command)
        except (ShardError, wire.WireError, OSError) as exc:
            log.warning("agent %s: %s failed: %s", self.node, command.op, exc)
            return wire.encode_control_reply(
                command.op, False, error={"code": "BAD_COMMAND", "text": str(exc)}
            )
        return wire.encode_control_reply(command.op, True, **fields)

    def _run_control(self, command: wire.ControlCommand) -> dict[str, Any]:
        if command.op == "ping":
            return {"node": self.node}
        if command.op == "stats":
            return {"stats": self.stats()}
        assert command.layer is not None and command.expert is not None
        key = (command.layer, command.expert)
        if command.op == "unload":
            held = self.shards.pop(key, None) is not None
            self.shard_sha256.pop(key, None)
            self._report_shards()
            log.info("agent %s unloaded layer %s expert %s", self.node, *key)
            return {"layer": key[0], "expert": key[1], "was_loaded": held}

        assert command.path is not None
        sha256 = self.load(command.layer, command.expert, command.path)
        fields: dict[str, Any] = {"layer": key[0], "expert": key[1], "sha256": sha256}
        if command.op == "handover":
            fields["warmup_s"] = self._warm_up(key)
        return fields

    def _warm_up(self, key: tuple[int, int]) -> float:
        """Run the expert once, so the first routed request is not the one
        that pays for cold caches, and so a broken shard shows up here."""
        weights = self.shards[key]
        t0 = time.perf_counter()
        with torch.inference_mode():
            expert_forward(weights, torch.zeros(1, weights["w1"].shape[1]))
        return time.perf_counter() - t0

    def load(self, layer: int, expert: int, path: str) -> str:
        """Load and hash-check a shard; returns its sha256."""
        target = (self.shard_dir / path).resolve()
        if not target.is_relative_to(self.shard_dir):
            raise ShardError(
                f"shard path {path!r} leaves the shard directory {self.shard_dir}; "
                "give a path relative to it"
            )
        entry = self._manifest_entry(layer, expert)
        if entry.path.resolve() != target:
            raise ShardError(
                f"shard path {path!r} is not the manifest's file for layer {layer} "
                f"expert {expert} ({entry.file!r})"
            )
        self._install((layer, expert), load_shard(entry), entry.sha256)
        log.info(
            "agent %s loaded layer %s expert %s from %s", self.node, layer, expert, path
        )
        return entry.sha256

    def _install(
        self, key: tuple[int, int], weights: dict[str, Tensor], sha256: str
    ) -> None:
        """Serve `weights` (verified) for expert `key` from now on."""
        self.shards[key] = {k: v.float() for k, v in weights.items()}
        self.shard_sha256[key] = sha256
        self._report_shards()

    def _report_shards(self) -> None:
        if self.metrics is not None:
            total = sum(
                t.numel() * t.element_size()
                for w in self.shards.values()
                for t in w.values()
            )
            self.metrics.set_shards(len(self.shards), total)

    def _manifest_entry(self, layer: int, expert: int) -> Any:
        if self._manifest is None:
            self._manifest = load_manifest(self.shard_dir)
        try:
            return self._manifest.shard(layer, expert)
        except ShardError:
            # The directory may have been re-cut since we read it.
            self._manifest = load_manifest(self.shard_dir)
            return self._manifest.shard(layer, expert)

    # -- numbers ----------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters since start, and latency percentiles of recent requests.

        Times are seconds; `busy_s` is what the power model integrates.
        """
        with self._lock:
            data: dict[str, Any] = dict(self._counters)
            recent = sorted(self._latencies_s)
        data["node"] = self.node
        data["uptime_s"] = time.monotonic() - self._started_monotonic
        data["shards"] = [
            {
                "layer": layer,
                "expert": expert,
                "sha256": self.shard_sha256[(layer, expert)],
            }
            for layer, expert in sorted(self.shards)
        ]
        data["latency_p50_s"] = _percentile(recent, 0.50)
        data["latency_p95_s"] = _percentile(recent, 0.95)
        return data


def set_nodelay(client: mqtt.Client) -> None:
    """Turn off Nagle on the client's socket (paho leaves it on).

    With Nagle on, a second small publish on the same connection waits for
    the first one's ACK, which over an emulated path costs a round trip.
    """
    sock = client.socket()
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, int(round(q * (len(sorted_values) - 1))))
    return sorted_values[index]
