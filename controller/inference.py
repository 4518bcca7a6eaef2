"""The home side of distributed MoE inference: experts reached over MQTT.

Home runs everything but the experts (embeddings, attention, norms, routers:
moe's decode session). For each MoE layer the session hands the grouped
token rows to :class:`MqttExecutor`, which

1. sends one request per chosen expert, all at once, each to the broker of
   the first healthy node holding that expert (one paho client per remote
   broker, at that node's data-plane address, opened from inside the home
   namespace so the traffic crosses the emulated links);
2. asks for the reply on a topic of that same remote broker (MQTT 5
   ResponseTopic + CorrelationData), so request and reply both cross the
   path between home and the satellite;
3. waits with a deadline per attempt; on an error reply, a missed deadline,
   or the agent's will ("offline") it retries on the next replica, and when
   none is left raises InferenceTimeout / InferenceError naming the node,
   layer, expert and cause. It never waits without a deadline.

Every call leaves a :class:`LayerRecord` (send/receive times, bytes, the
agent's own compute and (de)serialisation times) that controller.latency
turns into a per-token breakdown.

Placement changes go through :meth:`MqttExecutor.apply_placement`: new
holders load the shard and run it once (handover), routing switches, then
old holders unload, so a generation running across the change produces the
same tokens.

Sockets: MQTT clients connect from a short-lived thread that has entered
the home namespace; paho's network threads, started from there, inherit
it, so reconnects happen from home too. The calling thread never changes
namespace.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from torch import Tensor

from containers import wire
from containers.agent import set_nodelay
from containers.netns import call_in_namespace
from controller.placement import ExpertKey, Placement, placement_moves
from moe.errors import CheckpointError
from moe.serving import resolve_model_source
from topology.config import spec
from topology.errors import ConfigError, InferenceError, InferenceTimeout

log = logging.getLogger(__name__)

# Error codes after which another replica may well succeed. BAD_REQUEST and
# BAD_SHAPE mean our own message is wrong, so a retry elsewhere would fail
# the same way.
RETRYABLE = {
    wire.ErrorCode.UNKNOWN_EXPERT,
    wire.ErrorCode.INTERNAL,
    wire.ErrorCode.THROTTLED,
}


@dataclass(frozen=True)
class MoeConfig:
    """The scenario's ``moe`` section: how inference runs over the constellation."""

    home: str | None = field(
        default=None,
        metadata=spec(help="node where requests enter; null: first ground station"),
    )
    placement: Literal["ground", "round-robin", "aware"] = field(
        default="round-robin",
        metadata=spec(
            help="ground: all experts at home; round-robin: K nearest now; "
            "aware: K best over the horizon, battery and heat permitting"
        ),
    )
    k: int = field(
        default=8, metadata=spec(min=1, help="experts spread over this many satellites")
    )
    replicas: int = field(
        default=1, metadata=spec(min=1, help="copies of each expert (failover)")
    )
    horizon_s: float | None = field(
        default=None,
        metadata=spec(
            min=0,
            help="aware: judge satellites by their delay over this much time; "
            "null: replace_every_s when placing again, else 1200 s",
        ),
    )
    horizon_samples: int = field(
        default=7,
        metadata=spec(min=1, max=1000, help="aware: forecast times over the horizon"),
    )
    min_soc_fraction: float = field(
        default=0.4,
        metadata=spec(min=0, max=1, help="aware: no experts below this charge"),
    )
    replace_every_s: float = field(
        default=0.0,
        metadata=spec(
            min=0,
            help="place again and move experts every this much scenario time; "
            "0: keep the first placement",
        ),
    )
    max_compute_temperature_c: float | None = field(
        default=None,
        metadata=spec(
            help="aware: no experts on a hotter compute module; null: power.throttle_c"
        ),
    )
    wire_dtype: Literal["float32", "float16", "bfloat16"] = field(
        default="float32",
        metadata=spec(help="element type of rows on the wire; float32 is exact"),
    )
    attempt_timeout_s: float = field(
        default=2.0,
        metadata=spec(min=0.01, help="wait this long for one replica's reply"),
    )
    checkpoint: str | None = field(
        default=None,
        metadata=spec(
            help="our checkpoint (.safetensors + .json) or a local Hugging Face "
            "MoE directory (config.json, *.safetensors, tokenizer); null: shipped one"
        ),
    )

    @property
    def horizon_used_s(self) -> float:
        """The aware policy's horizon (see `horizon_s`)."""
        if self.horizon_s is not None:
            return self.horizon_s
        return self.replace_every_s if self.replace_every_s > 0 else 1200.0

    def validate(self, where: str) -> None:
        if self.replicas > self.k:
            raise ConfigError(
                f"{where}.replicas: {self.replicas} exceeds k={self.k}; a replica "
                "needs a satellite of its own"
            )
        # Only small files are read here, so a wrong path fails at load time
        # rather than after the network is up. The shipped checkpoint is
        # checked where it is cut (ensure_shards).
        if self.checkpoint is None:
            return
        try:
            resolve_model_source(self.checkpoint)
        except CheckpointError as exc:
            raise ConfigError(f"{where}.checkpoint: {exc}") from None


@dataclass(frozen=True)
class Endpoint:
    """Where a node's broker listens (its data-plane address)."""

    node: str
    host: str
    port: int = 1883


@dataclass
class RequestRecord:
    """One expert request as it went (the successful attempt's figures)."""

    layer: int
    expert: int
    node: str
    rows: int
    request_bytes: int
    tensor_bytes: int = 0
    reply_bytes: int = 0
    request_topic_bytes: int = 0
    reply_topic_bytes: int = 0
    encode_s: float = 0.0
    decode_s: float = 0.0
    sent_s: float = 0.0
    received_s: float = 0.0
    agent_compute_s: float = 0.0
    agent_decode_s: float = 0.0
    agent_encode_s: float = 0.0
    attempts: int = 1
    failures: list[str] = field(default_factory=list)

    @property
    def round_trip_s(self) -> float:
        return self.received_s - self.sent_s


@dataclass
class LayerRecord:
    """One executor call: the experts of one MoE layer for one step."""

    layer: int
    start_s: float
    end_s: float
    requests: list[RequestRecord]

    @property
    def wall_s(self) -> float:
        return self.end_s - self.start_s

    def critical(self) -> RequestRecord:
        """The request whose reply came last: the one the layer waited for."""
        return max(self.requests, key=lambda r: r.received_s)


@dataclass
class _Pending:
    request_id: int
    key: ExpertKey
    rows: Tensor
    record: RequestRecord
    node: str = ""
    deadline_s: float = 0.0
    tried: list[str] = field(default_factory=list)


class _BrokerLink:
    """One paho client connected to one node's broker."""

    def __init__(
        self,
        endpoint: Endpoint,
        client_id: str,
        events: queue.SimpleQueue,
        source_address: str = "",
    ) -> None:
        self.endpoint = endpoint
        self.source_address = source_address
        self.node = endpoint.node
        self.client_id = client_id
        self.reply_topic = wire.reply_topic(self.node, client_id)
        self.events = events
        self.ready = threading.Event()
        self.agent_online: bool | None = None
        self.control_waiters: dict[bytes, tuple[threading.Event, list[bytes]]] = {}
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        client.reconnect_delay_set(min_delay=1, max_delay=4)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.message_callback_add(self.reply_topic, self._on_reply)
        client.message_callback_add(wire.status_topic(self.node), self._on_status)
        self.client = client

    def open(self) -> None:
        """Connect and start the network thread (call inside the namespace)."""
        self.client.connect_async(
            self.endpoint.host,
            self.endpoint.port,
            keepalive=5,
            bind_address=self.source_address,
        )
        self.client.loop_start()

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        if rc.is_failure:
            log.warning("broker of %s refused us: %s", self.node, rc)
            return
        set_nodelay(client)
        client.subscribe([(self.reply_topic, 0), (wire.status_topic(self.node), 1)])

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any
    ) -> None:
        if any(code.is_failure for code in codes):
            log.error("broker of %s refused our subscriptions: %s", self.node, codes)
            return
        self.ready.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        self.ready.clear()
        self.events.put(
            ("down", self.node, f"lost the connection to its broker ({rc})")
        )

    def _on_status(
        self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage
    ) -> None:
        online = msg.payload == b"online"
        self.agent_online = online
        if not online:
            self.events.put(("down", self.node, "its agent went offline (MQTT will)"))

    def _on_reply(
        self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage
    ) -> None:
        received_s = time.perf_counter()
        correlation = getattr(msg.properties, "CorrelationData", None)
        if correlation is None:
            log.warning("reply from %s without CorrelationData; dropped", self.node)
            return
        waiter = self.control_waiters.pop(bytes(correlation), None)
        if waiter is not None:
            waiter[1].append(bytes(msg.payload))
            waiter[0].set()
            return
        self.events.put(
            ("reply", bytes(correlation), msg.payload, received_s, self.node)
        )

    def publish(
        self, topic: str, payload: bytes, correlation: bytes, qos: int = 0
    ) -> bool:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = correlation
        info = self.client.publish(topic, payload, qos=qos, properties=props)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class MqttExecutor:
    """An ExpertExecutor whose experts live on agents behind MQTT brokers.

    `endpoints` maps node name to its broker; `placement` maps each (layer,
    expert) to the nodes holding it, tried in order. `namespace` is the home
    network namespace (None: the caller's). `attempt_timeout_s` bounds each
    attempt; a layer call fails after every replica has had its attempt.
    `wire_dtype` is the element type of rows on the wire. `source_address`
    binds our end of every connection to home's data-plane address, so the
    satellites' replies are routed back to it (the emulator routes only node
    /32s, not the per-link addresses the kernel would otherwise pick).
    """

    def __init__(
        self,
        endpoints: Mapping[str, Endpoint],
        placement: Mapping[ExpertKey, Sequence[str]],
        namespace: str | None = None,
        attempt_timeout_s: float = 2.0,
        wire_dtype: str = "float32",
        shard_paths: Mapping[ExpertKey, str] | None = None,
        client_prefix: str = "smoe-home",
        source_address: str = "",
    ) -> None:
        self._itemsize = wire.wire_dtype(wire_dtype).itemsize
        self.endpoints = dict(endpoints)
        self.placement: Placement = {k: list(v) for k, v in placement.items()}
        self.namespace = namespace
        self.source_address = source_address
        self.attempt_timeout_s = attempt_timeout_s
        self.wire_dtype = wire_dtype
        self.shard_paths = dict(shard_paths or {})
        self.client_prefix = f"{client_prefix}-{os.getpid()}"
        self.records: list[LayerRecord] = []
        self.down: dict[str, str] = {}
        self._events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._links: dict[str, _BrokerLink] = {}
        self._ids = itertools.count(1)

    # -- connections ------------------------------------------------------

    def connect(
        self, nodes: Sequence[str] | None = None, timeout_s: float = 10.0
    ) -> MqttExecutor:
        """Open links to `nodes` (default: every node in the placement)."""
        wanted = sorted(
            set(nodes)
            if nodes is not None
            else {n for ns in self.placement.values() for n in ns}
        )
        new = [node for node in wanted if node not in self._links]
        for node in new:
            if node not in self.endpoints:
                raise InferenceError(
                    f"no broker endpoint for node {node!r}; known: "
                    f"{sorted(self.endpoints)[:10]}"
                )
            self._links[node] = _BrokerLink(
                self.endpoints[node],
                f"{self.client_prefix}-{node}",
                self._events,
                self.source_address,
            )

        def open_all() -> None:
            for node in new:
                self._links[node].open()

        call_in_namespace(self.namespace, open_all)
        deadline = time.monotonic() + timeout_s
        for node in new:
            link = self._links[node]
            if not link.ready.wait(max(0.0, deadline - time.monotonic())):
                raise InferenceError(
                    f"cannot reach the broker of {node} at {link.endpoint.host}:"
                    f"{link.endpoint.port} within {timeout_s} s; is it running and "
                    "is the node reachable from home?"
                )
        return self

    def close(self) -> None:
        """Disconnect every link."""
        for link in self._links.values():
            link.close()
        self._links.clear()

    def __enter__(self) -> MqttExecutor:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the ExpertExecutor call -------------------------------------------

    def __call__(self, layer: int, batches: dict[int, Tensor]) -> dict[int, Tensor]:
        start_s = time.perf_counter()
        pending: dict[int, _Pending] = {}
        results: dict[int, Tensor] = {}
        records: list[RequestRecord] = []
        self._drain_stale_events()

        for expert in sorted(batches):
            rows = batches[expert]
            record = RequestRecord(layer, expert, "", rows.shape[0], 0)
            records.append(record)
            item = _Pending(0, (layer, expert), rows, record)
            self._send(item, pending)

        while pending:
            now = time.perf_counter()
            soonest = min(pending.values(), key=lambda p: p.deadline_s)
            if now >= soonest.deadline_s:
                del pending[soonest.request_id]
                cause = f"no reply within {self.attempt_timeout_s} s"
                self._retry(soonest, cause, pending)
                continue
            try:
                event = self._events.get(timeout=soonest.deadline_s - now)
            except queue.Empty:
                continue
            self._handle_event(event, pending, results)

        self.records.append(LayerRecord(layer, start_s, time.perf_counter(), records))
        return results

    def _send(self, item: _Pending, pending: dict[int, _Pending]) -> None:
        """Send `item` to its next untried healthy replica, or raise."""
        layer, expert = item.key
        replicas = self.placement.get(item.key)
        if not replicas:
            raise InferenceError(
                f"layer {layer} expert {expert} is not placed on any node; "
                "the placement must cover every expert"
            )
        candidates = [n for n in replicas if n not in item.tried and n not in self.down]
        if not candidates:
            causes = "; ".join(item.record.failures) or "; ".join(
                f"{n}: {self.down.get(n, 'down')}" for n in replicas
            )
            error = (
                InferenceTimeout
                if item.record.failures
                and all("no reply within" in f for f in item.record.failures)
                else InferenceError
            )
            raise error(
                f"layer {layer} expert {expert}: no replica left to try "
                f"(placement {replicas}): {causes}"
            )
        node = candidates[0]
        if node not in self._links:
            self.connect([node])
        link = self._links[node]

        request_id = next(self._ids)
        t0 = time.perf_counter()
        payload = wire.encode_request(
            request_id, layer, expert, item.rows, self.wire_dtype
        )
        item.record.encode_s += time.perf_counter() - t0
        topic = wire.request_topic(node, layer, expert)
        correlation = request_id.to_bytes(8, "little")
        item.request_id = request_id
        item.node = node
        item.tried.append(node)
        item.record.node = node
        item.record.request_bytes = len(payload)
        item.record.tensor_bytes = item.rows.numel() * self._itemsize
        item.record.request_topic_bytes = len(topic) + len(link.reply_topic)
        item.record.reply_topic_bytes = len(link.reply_topic)
        item.record.sent_s = time.perf_counter()
        item.deadline_s = item.record.sent_s + self.attempt_timeout_s
        if not link.publish(topic, payload, correlation):
            pending.pop(request_id, None)
            self._retry(item, f"{node}: not connected to its broker", pending)
            return
        pending[request_id] = item

    def _retry(self, item: _Pending, cause: str, pending: dict[int, _Pending]) -> None:
        layer, expert = item.key
        text = cause if cause.startswith(item.node) else f"{item.node}: {cause}"
        item.record.failures.append(text)
        item.record.attempts += 1
        log.warning(
            "layer %s expert %s: %s; trying another replica", layer, expert, text
        )
        self._send(item, pending)

    def _handle_event(
        self,
        event: tuple[Any, ...],
        pending: dict[int, _Pending],
        results: dict[int, Tensor],
    ) -> None:
        if event[0] == "down":
            _, node, cause = event
            self.down[node] = cause
            for request_id, waiting in list(pending.items()):
                if waiting.node == node:
                    del pending[request_id]
                    self._retry(waiting, cause, pending)
            return

        _, correlation, payload, received_s, node = event
        request_id = int.from_bytes(correlation, "little")
        item = pending.get(request_id)
        if item is None:
            log.debug("late reply %s from %s ignored", request_id, node)
            return
        del pending[request_id]
        layer, expert = item.key

        t0 = time.perf_counter()
        try:
            reply = wire.decode_reply(payload)
        except wire.WireError as exc:
            raise InferenceError(
                f"layer {layer} expert {expert}: {node} sent an undecodable "
                f"reply: {exc}"
            ) from None
        item.record.decode_s += time.perf_counter() - t0

        if isinstance(reply, wire.ExpertError):
            cause = f"{node} answered {reply.code_name()}: {reply.text}"
            if reply.code not in RETRYABLE:
                raise InferenceError(f"layer {layer} expert {expert}: {cause}")
            self._retry(item, cause, pending)
            return
        if reply.request_id != request_id or reply.tensor.shape != item.rows.shape:
            raise InferenceError(
                f"layer {layer} expert {expert}: {node} replied to request "
                f"{reply.request_id} with shape {tuple(reply.tensor.shape)}; expected "
                f"request {request_id} and shape {tuple(item.rows.shape)}"
            )
        record = item.record
        record.received_s = received_s
        record.reply_bytes = len(payload)
        record.agent_compute_s = reply.compute_s
        record.agent_decode_s = reply.decode_s
        record.agent_encode_s = reply.encode_s
        results[expert] = reply.tensor

    def _drain_stale_events(self) -> None:
        """Apply node-down/-up news and drop replies nobody waits for."""
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            if event[0] == "down":
                self.down[event[1]] = event[2]
        for node in list(self.down):
            link = self._links.get(node)
            if link is not None and link.ready.is_set() and link.agent_online:
                log.info("%s serves again", node)
                del self.down[node]

    # -- control ------------------------------------------------------------

    def control(
        self, node: str, command: wire.ControlCommand, timeout_s: float = 10.0
    ) -> dict[str, Any]:
        """Send a control command to `node`'s agent and return its reply.

        Raises InferenceTimeout if it does not answer, InferenceError if it
        answers with an error.
        """
        payload = wire.encode_control(command)
        return self._ask(node, wire.control_topic(node), payload, command.op, timeout_s)

    def send_shard(
        self, node: str, layer: int, expert: int, data: bytes, timeout_s: float = 60.0
    ) -> dict[str, Any]:
        """Send a shard's bytes to `node`'s agent, which checks and serves it.

        This is how an expert migrates with its weights: the bytes cross
        the emulated links from home to the new holder.
        """
        if len(data) > wire.MAX_PAYLOAD_BYTES:
            raise InferenceError(
                f"shard of layer {layer} expert {expert} is {len(data)} bytes, over "
                f"the {wire.MAX_PAYLOAD_BYTES}-byte MQTT message limit; sending "
                "larger shards needs chunking, which is not built"
            )
        topic = wire.shard_topic(node, layer, expert)
        return self._ask(node, topic, data, "receive", timeout_s)

    def _ask(
        self, node: str, topic: str, payload: bytes, what: str, timeout_s: float
    ) -> dict[str, Any]:
        if node not in self._links:
            self.connect([node])
        link = self._links[node]
        correlation = next(self._ids).to_bytes(8, "little")
        done = threading.Event()
        box: list[bytes] = []
        link.control_waiters[correlation] = (done, box)
        link.publish(topic, payload, correlation, qos=1)
        if not done.wait(timeout_s):
            link.control_waiters.pop(correlation, None)
            raise InferenceTimeout(
                f"{node} did not answer {what!r} within {timeout_s} s"
            )
        reply = wire.decode_control_reply(box[0])
        if not reply["ok"]:
            raise InferenceError(f"{node} refused {what!r}: {reply.get('error')}")
        return reply

    def apply_placement(
        self,
        new: Mapping[ExpertKey, Sequence[str]],
        timeout_s: float = 10.0,
        unload: bool = True,
        shard_dir: Path | None = None,
    ) -> dict[str, Any]:
        """Move to placement `new` without a moment where an expert is unserved.

        New holders load and warm the shard (handover), from their own
        disk, or, given `shard_dir`, from its bytes sent from here across
        the links (:meth:`send_shard`); only then does routing switch; then
        old holders unload, unless `unload` is False (the caller unloads
        the returned ``dropped`` later, with :meth:`unload`, for other
        clients still using the old placement). Returns what moved and the
        shard bytes sent.
        """
        adds, drops = placement_moves(self.placement, new)
        sent_bytes = 0
        for (layer, expert), node in adds:
            path = self._shard_path(layer, expert)
            if shard_dir is None:
                command = wire.ControlCommand("handover", layer, expert, path)
                self.control(node, command, timeout_s)
            else:
                data = (shard_dir / path).read_bytes()
                self.send_shard(node, layer, expert, data, timeout_s)
                sent_bytes += len(data)
            log.info("layer %s expert %s handed over to %s", layer, expert, node)
        self.placement = {k: list(v) for k, v in new.items()}
        if unload:
            self.unload(drops, timeout_s)
        return {
            "added": [[layer, expert, node] for (layer, expert), node in adds],
            "dropped": [[layer, expert, node] for (layer, expert), node in drops],
            "sent_bytes": sent_bytes,
        }

    def unload(
        self, shards: Sequence[tuple[ExpertKey, str]], timeout_s: float = 10.0
    ) -> None:
        """Tell each (expert, node) pair's agent to drop that shard."""
        for (layer, expert), node in shards:
            try:
                self.control(
                    node, wire.ControlCommand("unload", layer, expert), timeout_s
                )
            except InferenceError as exc:
                # The new holders already serve; a node we cannot reach to
                # unload just keeps an unused copy.
                log.warning(
                    "unload of layer %s expert %s on %s failed: %s",
                    layer,
                    expert,
                    node,
                    exc,
                )

    def _shard_path(self, layer: int, expert: int) -> str:
        path = self.shard_paths.get((layer, expert))
        if path is None:
            from moe.shards import shard_file_name

            path = shard_file_name(layer, expert)
        return path

    def take_records(self) -> list[LayerRecord]:
        """The layer records since the last call (and forget them)."""
        records, self.records = self.records, []
        return records
