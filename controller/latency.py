"""Where the time of each generated token goes, and how close it is to physics.

Each token's wall time is split into parts that add up exactly:

home_compute_s     embeddings, attention, norms, routers, head: the time of
                   the step outside the expert calls.
expert_compute_s   expert_forward on the agent, as the agent measured it, for
                   the request each layer waited for last (its critical
                   request).
serialization_s    encoding and decoding on both sides on that critical
                   path: home encodes the layer's requests before the last
                   one leaves and decodes after the last reply arrives; the
                   agent's own decode and encode come from its reply.
network_s          propagation plus transmission over the path the emulator
                   routes at that moment, both ways, for the bytes that
                   went (MQTT framing and TCP/IP/Ethernet headers
                   included): per hop delay_s + bits / rate_bps for the
                   first packet, then the rest of the packets at the
                   bottleneck rate.
queueing_s         the remainder of the round trip: two broker hops,
                   paho's threads, scheduling, queueing in the shaper. Can
                   be slightly negative when the emulator's real delay falls
                   short of the model.

The physical lower bound of a token is home compute, plus per layer the
slowest expert's (propagation both ways + tensor bytes at the bottleneck
rate + its measured compute). ``ratio = total / bound``.

The first row is the prefill (the whole prompt in one step); percentiles
are over the decode steps only.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import dijkstra

from controller.inference import LayerRecord, MqttExecutor, RequestRecord
from controller.placement import Placement, placement_to_json
from moe.serving import ServedModel
from moe.tokenizer import ByteTokenizer, Tokenizer, encode_prompt
from topology.errors import InferenceError, InferenceTimeout

# Per-packet framing on a veth link: Ethernet 14 + IPv4 20 + TCP 20 + TCP
# timestamps 12. MSS for a 1500-byte MTU with timestamps.
FRAME_OVERHEAD_BYTES = 66
MSS_BYTES = 1448


@dataclass(frozen=True)
class Hop:
    """One link of a path as the emulator shapes it at one instant."""

    src: str
    dst: str
    delay_s: float
    rate_bps: float


# The parts of a step's time, as named in rows and in the Prometheus
# component label (without the "_s").
COMPONENTS = (
    "home_compute_s",
    "expert_compute_s",
    "serialization_s",
    "network_s",
    "queueing_s",
)


class TokenObserver(Protocol):
    """Where per-token figures go (monitoring.metrics.InferenceMetrics fits)."""

    def observe_token(
        self, latency_s: float, components_s: Mapping[str, float], transfer_bytes: int
    ) -> None: ...

    def count_prompt_tokens(self, n: int) -> None: ...

    def request_done(self, status: str, duration_s: float) -> None: ...


class PathModel(Protocol):
    """The hops from one node to another at the current instant."""

    def hops(self, src: str, dst: str) -> list[Hop]: ...


class LoopbackPaths:
    """No network at all (every broker on this host's loopback)."""

    def hops(self, src: str, dst: str) -> list[Hop]:
        return []


class StatePaths:
    """Paths from an emulator state dict (the form of run_dir()/state.json).

    Uses the routes the emulator recorded ("paths": {SRC: {DST: [nodes]}},
    kept from each ground station; the way back is taken as the reverse,
    which holds while the routes are symmetric) and otherwise the
    delay-shortest path over the links that are up, as the router would
    pick without hysteresis. With `path` given, :meth:`refresh` rereads the
    file when the emulator has rewritten it.
    """

    def __init__(self, state: Mapping[str, Any], path: Path | None = None) -> None:
        self.path = path
        self._mtime_ns = path.stat().st_mtime_ns if path is not None else 0
        self._load(state)

    @classmethod
    def from_file(cls, path: Path) -> StatePaths:
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InferenceError(
                f"cannot read the emulator state {path} ({exc}); is an emulation "
                "running (`spacemoe up`)?"
            ) from None
        return cls(state, path)

    def _load(self, state: Mapping[str, Any]) -> None:
        self.state = state
        self.names = [node["name"] for node in state["nodes"]]
        self.index = {name: i for i, name in enumerate(self.names)}
        self.links: dict[tuple[str, str], tuple[float, float]] = {}
        for link in state["links"]:
            if not link.get("up", True):
                continue
            figures = (float(link["delay_s"]), float(link["rate_bps"]))
            self.links[(link["a"], link["b"])] = figures
            self.links[(link["b"], link["a"])] = figures
        self.recorded = state.get("paths") or {}
        self._pred: dict[str, np.ndarray] = {}

    def refresh(self) -> None:
        """Reread the state file if it changed since it was read."""
        if self.path is None:
            return
        try:
            mtime_ns = self.path.stat().st_mtime_ns
            if mtime_ns != self._mtime_ns:
                self._load(json.loads(self.path.read_text()))
                self._mtime_ns = mtime_ns
        except (OSError, json.JSONDecodeError):
            pass  # mid-rename or gone: keep the last good picture

    def _shortest(self, src: str, dst: str) -> list[str]:
        if src not in self._pred:
            n = len(self.names)
            pairs = [
                (self.index[a], self.index[b], d)
                for (a, b), (d, _) in self.links.items()
            ]
            rows, cols, weights = zip(*pairs, strict=True) if pairs else ((), (), ())
            graph = csr_matrix((weights, (rows, cols)), shape=(n, n))
            _, pred = dijkstra(graph, indices=self.index[src], return_predecessors=True)
            self._pred[src] = pred
        pred = self._pred[src]
        path = [self.index[dst]]
        while path[-1] != self.index[src]:
            prev = int(pred[path[-1]])
            if prev < 0:
                return []
            path.append(prev)
        return [self.names[i] for i in reversed(path)]

    def hops(self, src: str, dst: str) -> list[Hop]:
        if src == dst:
            return []
        nodes = self.recorded.get(src, {}).get(dst)
        if not nodes:
            back = self.recorded.get(dst, {}).get(src)
            nodes = list(reversed(back)) if back else self._shortest(src, dst)
        if not nodes:
            raise InferenceError(f"no path from {src} to {dst} in the emulator state")
        hops = []
        for a, b in zip(nodes, nodes[1:], strict=False):
            if (a, b) not in self.links:
                raise InferenceError(
                    f"the path {src}->{dst} uses link {a}-{b}, which is down in the "
                    "emulator state"
                )
            delay_s, rate_bps = self.links[(a, b)]
            hops.append(Hop(a, b, delay_s, rate_bps))
        return hops


class EmulatorPaths:
    """Paths from an Emulator running in this process (its applied state)."""

    def __init__(self, emulator: Any) -> None:
        self.emulator = emulator

    def hops(self, src: str, dst: str) -> list[Hop]:
        emulator = self.emulator
        nodes = emulator.path(src, dst)
        if not nodes:
            raise InferenceError(f"no route from {src} to {dst} at t={emulator.t_s} s")
        hops = []
        for a, b in zip(nodes, nodes[1:], strict=False):
            link_id = emulator.link_of[emulator.node_index(a), emulator.node_index(b)]
            hops.append(
                Hop(
                    a,
                    b,
                    float(emulator.link_delay_s[link_id]),
                    float(emulator.link_rate_bps[link_id]),
                )
            )
        return hops


def propagation_delays_s(
    paths: PathModel, home: str, nodes: Sequence[str]
) -> dict[str, float]:
    """One-way propagation delay from home to each reachable node."""
    delays = {}
    for node in nodes:
        try:
            delays[node] = sum(h.delay_s for h in paths.hops(home, node))
        except InferenceError:
            continue
    return delays


# -- the arithmetic -----------------------------------------------------------


def _varint_len(value: int) -> int:
    return 1 if value < 128 else 2 if value < 16384 else 3 if value < 2097152 else 4


def mqtt_publish_bytes(topic_len: int, payload_len: int, properties_len: int) -> int:
    """Size of an MQTT 5 QoS 0 PUBLISH packet."""
    remaining = (
        2 + topic_len + _varint_len(properties_len) + properties_len + payload_len
    )
    return 1 + _varint_len(remaining) + remaining


def _framed(message_bytes: int) -> int:
    """Bytes on the link for one TCP message, headers of every packet included."""
    packets = max(1, math.ceil(message_bytes / MSS_BYTES))
    return message_bytes + packets * FRAME_OVERHEAD_BYTES


def transfer_s(hops: Sequence[Hop], message_bytes: int) -> float:
    """Time to move one TCP message along `hops` (no queueing, no loss).

    The first packet is stored and forwarded at every hop; the others follow
    it at the bottleneck rate.
    """
    if not hops:
        return 0.0
    wire_bytes = _framed(message_bytes)
    first = min(wire_bytes, MSS_BYTES + FRAME_OVERHEAD_BYTES)
    bottleneck = min(h.rate_bps for h in hops)
    return (
        sum(h.delay_s + 8 * first / h.rate_bps for h in hops)
        + 8 * (wire_bytes - first) / bottleneck
    )


def _request_wire_bytes(r: RequestRecord) -> tuple[int, int]:
    """(request, reply) MQTT packet sizes of one expert request."""
    reply_topic = r.reply_topic_bytes
    request_topic = r.request_topic_bytes - reply_topic
    correlation = 1 + 2 + 8
    req = mqtt_publish_bytes(
        request_topic, r.request_bytes, correlation + 1 + 2 + reply_topic
    )
    rep = mqtt_publish_bytes(reply_topic, r.reply_bytes, correlation)
    return req, rep


def token_row(
    total_s: float, layers: Sequence[LayerRecord], paths: PathModel, home: str
) -> dict[str, Any]:
    """The breakdown of one step (see the module docstring)."""
    parts = dict.fromkeys(
        ("expert_compute_s", "serialization_s", "network_s", "queueing_s"), 0.0
    )
    layer_wall_s = 0.0
    bound_experts_s = 0.0
    payload_bytes = 0
    wire_bytes = 0
    retries = 0
    for layer in layers:
        layer_wall_s += layer.wall_s
        if not layer.requests:
            continue
        c = layer.critical()
        serial_home = (c.sent_s - layer.start_s) + (layer.end_s - c.received_s)
        agent = c.agent_decode_s + c.agent_compute_s + c.agent_encode_s
        req_bytes, rep_bytes = _request_wire_bytes(c)
        network = transfer_s(paths.hops(home, c.node), req_bytes) + transfer_s(
            paths.hops(c.node, home), rep_bytes
        )
        parts["expert_compute_s"] += c.agent_compute_s
        parts["serialization_s"] += serial_home + c.agent_decode_s + c.agent_encode_s
        parts["network_s"] += network
        parts["queueing_s"] += c.round_trip_s - agent - network

        slowest = 0.0
        for r in layer.requests:
            payload_bytes += r.request_bytes + r.reply_bytes
            wire_bytes += sum(_framed(n) for n in _request_wire_bytes(r))
            retries += r.attempts - 1
            tensor_bytes = r.tensor_bytes
            there, back = paths.hops(home, r.node), paths.hops(r.node, home)
            bound = r.agent_compute_s
            for hops in (there, back):
                if hops:
                    bound += sum(h.delay_s for h in hops)
                    bound += 8 * tensor_bytes / min(h.rate_bps for h in hops)
            slowest = max(slowest, bound)
        bound_experts_s += slowest

    home_s = total_s - layer_wall_s
    bound_s = home_s + bound_experts_s
    return {
        "total_s": total_s,
        "home_compute_s": home_s,
        **parts,
        "bound_s": bound_s,
        "ratio": total_s / bound_s if bound_s > 0 else None,
        "payload_bytes": payload_bytes,
        "wire_bytes": wire_bytes,
        "requests": sum(len(layer.requests) for layer in layers),
        "retries": retries,
    }


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..1); None for no values."""
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=float), 100 * q))


# -- one generation, measured ---------------------------------------------------


def infer(
    model: ServedModel,
    executor: MqttExecutor,
    prompt: str,
    n_tokens: int,
    paths: PathModel,
    home: str,
    reference: ServedModel | None = None,
    on_step: Callable[[int, MqttExecutor], None] | None = None,
    metrics: TokenObserver | None = None,
    tokenizer: Tokenizer | None = None,
) -> dict[str, Any]:
    """Greedy generation through `executor`, with a per-token breakdown.

    `model` is the home model (its experts, if any, are not used).
    `reference`, if given, is run in process on the same prompt for
    comparison (tokens must match; the largest logit difference is
    reported). `on_step(i, executor)` runs before decode step i, e.g. to
    change the placement mid-run. `metrics` (e.g. monitoring.metrics.
    InferenceMetrics) gets every step's breakdown and the request's outcome.
    `tokenizer` turns the prompt into ids and ids into text (default: our
    byte-level one; see moe.serving for a checkpoint's own).
    Returns a JSON-able report.
    """
    tokenizer = tokenizer or ByteTokenizer()
    started = time.perf_counter()
    try:
        report = _generate(
            model, executor, prompt, n_tokens, paths, home, on_step, tokenizer
        )
    except InferenceError as exc:
        if metrics is not None:
            status = "timeout" if isinstance(exc, InferenceTimeout) else "error"
            metrics.request_done(status, time.perf_counter() - started)
        raise
    report["duration_s"] = time.perf_counter() - started
    if metrics is not None:
        observe_report(metrics, report)
    if reference is not None:
        report["reference"] = compare_with_reference(
            reference, report["prompt_ids"], report["tokens"], report.pop("_logits")
        )
    report.pop("_logits", None)
    return report


def _generate(
    model: ServedModel,
    executor: MqttExecutor,
    prompt: str,
    n_tokens: int,
    paths: PathModel,
    home: str,
    on_step: Callable[[int, MqttExecutor], None] | None,
    tokenizer: Tokenizer,
) -> dict[str, Any]:
    if n_tokens < 1:
        raise InferenceError(f"n_tokens={n_tokens}: ask for at least one token")
    prompt_ids = encode_prompt(tokenizer, prompt)
    executor.take_records()
    session = model.start_session(executor)

    rows: list[dict[str, Any]] = []
    tokens: list[int] = []
    logits_seen: list[torch.Tensor] = []
    load: dict[str, int] = {}
    t0 = time.perf_counter()
    logits = session.prefill(prompt_ids)[-1]
    rows.append(_row("prefill", t0, executor, paths, home, load))
    for i in range(n_tokens):
        token = int(logits.argmax())
        tokens.append(token)
        logits_seen.append(logits)
        rows[-1]["token"] = token
        rows[-1]["text"] = tokenizer.token_text(token)
        if i == n_tokens - 1:
            break
        if on_step is not None:
            on_step(i, executor)
        t0 = time.perf_counter()
        logits = session.step(token)
        rows.append(_row(f"step {i + 1}", t0, executor, paths, home, load))

    report: dict[str, Any] = {
        "prompt": prompt,
        "prompt_ids": prompt_ids,
        "tokens": tokens,
        "text": tokenizer.decode(tokens),
        "home": home,
        "placement": placement_to_json(executor.placement),
        "wire_dtype": executor.wire_dtype,
        "rows": rows,
        "summary": summarize(rows),
        # Token rows each expert served, "LAYER/EXPERT": rows: the routing's
        # load, which placement can use (PlacementContext.expert_load).
        "expert_rows": dict(sorted(load.items())),
        "_logits": logits_seen,
    }
    return report


def _row(
    label: str,
    t0: float,
    executor: MqttExecutor,
    paths: PathModel,
    home: str,
    load: dict[str, int],
) -> dict[str, Any]:
    total_s = time.perf_counter() - t0
    refresh = getattr(paths, "refresh", None)
    if refresh is not None:
        refresh()
    records = executor.take_records()
    for layer in records:
        for request in layer.requests:
            key = f"{request.layer}/{request.expert}"
            load[key] = load.get(key, 0) + request.rows
    return {"step": label, **token_row(total_s, records, paths, home)}


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """p50/p95 of the decode steps, mean breakdown, bytes per token."""
    steps = [r for r in rows if r["step"] != "prefill"] or list(rows)
    summary: dict[str, Any] = {"decode_steps": len(steps)}
    for key in ("total_s", "bound_s", "ratio"):
        values = [float(r[key]) for r in steps if r[key] is not None]
        summary[f"{key}_p50"] = percentile(values, 0.50)
        summary[f"{key}_p95"] = percentile(values, 0.95)
    for key in COMPONENTS:
        summary[f"{key}_mean"] = statistics.fmean(float(r[key]) for r in steps)
    summary["payload_bytes_per_token"] = statistics.fmean(
        r["payload_bytes"] for r in steps
    )
    summary["wire_bytes_per_token"] = statistics.fmean(r["wire_bytes"] for r in steps)
    summary["retries"] = sum(r["retries"] for r in rows)
    return summary


def compare_with_reference(
    reference: ServedModel,
    prompt_ids: Sequence[int] | bytes,
    tokens: Sequence[int],
    logits: Sequence[torch.Tensor],
) -> dict[str, Any]:
    """Run the single-process model on the same tokens; compare logits.

    The reference is fed the distributed run's tokens (teacher forcing), so
    one early disagreement does not hide how close the rest is. Our model's
    prompt ids are its UTF-8 bytes, so bytes are accepted as well.
    """
    session = reference.start_session()
    ids = list(prompt_ids)
    ref_logits = [session.prefill(ids)[-1]]
    for token in tokens[:-1]:
        ref_logits.append(session.step(token))
    diffs = [
        float((a - b).abs().max()) for a, b in zip(logits, ref_logits, strict=True)
    ]
    ref_tokens = [int(x.argmax()) for x in ref_logits]
    return {
        "tokens_identical": ref_tokens == list(tokens),
        "max_abs_logit_diff": max(diffs) if diffs else 0.0,
    }


def observe_report(metrics: TokenObserver, report: Mapping[str, Any]) -> None:
    """Feed a finished generation's report to `metrics`.

    A report of a failed request carries only ``status`` (timeout or
    error) and ``duration_s``.
    """
    status = report.get("status", "ok")
    if status == "ok":
        # Reports from before prompt_ids was recorded held byte-level prompts.
        prompt_ids = report.get("prompt_ids")
        metrics.count_prompt_tokens(
            len(prompt_ids)
            if prompt_ids is not None
            else len(str(report["prompt"]).encode("utf-8"))
        )
        for row in report["rows"]:
            metrics.observe_token(
                row["total_s"],
                {name[:-2]: row[name] for name in COMPONENTS},
                row["payload_bytes"],
            )
    metrics.request_done(status, float(report.get("duration_s", 0.0)))


# -- presentation -----------------------------------------------------------------


def format_report(report: Mapping[str, Any]) -> str:
    """A fixed-width table of the per-token breakdown and the summary."""
    ms = 1e3
    head = (
        f"{'step':>8} {'tok':>4} {'total':>8} {'home':>7} {'expert':>7} "
        f"{'serial':>7} {'network':>8} {'queue':>7} {'bound':>8} {'ratio':>6} "
        f"{'bytes':>7}"
    )
    lines = [
        f"prompt {report['prompt']!r} -> {report['text']!r}",
        f"home {report['home']}, wire {report['wire_dtype']}; times in ms",
        head,
        "-" * len(head),
    ]
    for r in report["rows"]:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        lines.append(
            f"{r['step']:>8} {repr(r.get('text', ''))[1:-1]:>4} "
            f"{r['total_s'] * ms:8.2f} "
            f"{r['home_compute_s'] * ms:7.2f} {r['expert_compute_s'] * ms:7.2f} "
            f"{r['serialization_s'] * ms:7.2f} {r['network_s'] * ms:8.2f} "
            f"{r['queueing_s'] * ms:7.2f} {r['bound_s'] * ms:8.2f} {ratio:>6} "
            f"{r['payload_bytes']:7d}"
        )
    s = report["summary"]
    lines.append("-" * len(head))

    def fmt(value: float | None, scale: float = ms, digits: int = 2) -> str:
        return "-" if value is None else f"{value * scale:.{digits}f}"

    lines.append(
        f"decode p50 {fmt(s['total_s_p50'])} ms, p95 {fmt(s['total_s_p95'])} ms; "
        f"bound p50 {fmt(s['bound_s_p50'])} ms; ratio p50 "
        f"{fmt(s['ratio_p50'], 1)} p95 {fmt(s['ratio_p95'], 1)}"
    )
    lines.append(
        f"mean home {fmt(s['home_compute_s_mean'])}, expert "
        f"{fmt(s['expert_compute_s_mean'])}, serialization "
        f"{fmt(s['serialization_s_mean'])}, network {fmt(s['network_s_mean'])}, "
        f"queueing {fmt(s['queueing_s_mean'])} ms; "
        f"{s['payload_bytes_per_token']:.0f} payload bytes/token "
        f"({s['wire_bytes_per_token']:.0f} with MQTT/TCP/IP framing); "
        f"retries {s['retries']}"
    )
    ref = report.get("reference")
    if ref:
        lines.append(
            f"vs single process: tokens identical {ref['tokens_identical']}, "
            f"max |logit diff| {ref['max_abs_logit_diff']:.2e}"
        )
    return "\n".join(lines)


__all__ = [
    "Hop",
    "LoopbackPaths",
    "PathModel",
    "Placement",
    "StatePaths",
    "format_report",
    "infer",
    "propagation_delays_s",
    "summarize",
    "token_row",
    "transfer_s",
]
