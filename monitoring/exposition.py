"""Serving /metrics, with a fast path for families built from arrays.

prometheus_client formats every sample in Python on every scrape: label
escaping, sorting and float formatting cost about 25 us a sample, so the
emulator's per-link families (several samples per link, thousands of
links) would hold the GIL for a large share of each scrape interval.
:class:`ArrayFamily` keeps each entry's rendered ``name{labels} `` prefix,
built once per link set, and renders a scrape by joining prefixes and
values; `benchmarks/bench_monitoring.py` prints both costs.

:func:`render` writes the text format (version 0.0.4) of a registry, using
the fast path for array families and prometheus_client for everything
else; :func:`serve` puts it behind a small threaded HTTP server. Array
families still expose ordinary samples (built on demand), so
``generate_latest`` and any other consumer see the same data.
"""

from __future__ import annotations

import logging
import math
import operator
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from topology.errors import EmulationError

log = logging.getLogger(__name__)


class LabelRows:
    """The label sets of an array's entries, and their rendered text.

    Build one when the set of entries changes (a link appears or goes); a
    timestep that only changes values reuses it.
    """

    def __init__(self, labels: Sequence[dict[str, str]]) -> None:
        self.labels = list(labels)
        self._prefixes: dict[str, list[str]] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def __add__(self, other: LabelRows) -> LabelRows:
        return LabelRows(self.labels + other.labels)

    def prefixes(self, sample_name: str) -> list[str]:
        """``name{labels} `` for each entry, as the text format writes it."""
        cached = self._prefixes.get(sample_name)
        if cached is None:
            cached = [
                f"{sample_name}{{{_label_text(labels)}}} "
                if labels
                else f"{sample_name} "
                for labels in self.labels
            ]
            self._prefixes[sample_name] = cached
        return cached


class ArrayFamily(Metric):
    """A metric family with one sample per entry of `rows` and `values`.

    `name` follows prometheus_client: without ``_total`` for a counter.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        typ: str,
        rows: LabelRows,
        values: Sequence[float],
    ) -> None:
        if len(rows) != len(values):
            raise ValueError(f"{name}: {len(rows)} label rows but {len(values)} values")
        self._rows = rows
        self._values = list(values)
        self._samples: list[Sample] | None = None
        super().__init__(name, documentation, typ)

    # Metric keeps samples in an attribute; here they are made only when
    # read, since the exporter renders text without them.
    @property  # type: ignore[override]
    def samples(self) -> list[Sample]:
        if self._samples is None:
            name = self.sample_name
            self._samples = [
                Sample(name, labels, value, None, None, None)
                for labels, value in zip(self._rows.labels, self._values, strict=True)
            ]
        return self._samples

    @samples.setter
    def samples(self, value: list[Sample]) -> None:
        self._samples = value or None

    @property
    def sample_name(self) -> str:
        return self.name + "_total" if self.type == "counter" else self.name

    def text(self) -> str:
        """This family in the text format, HELP and TYPE lines included."""
        name = self.sample_name
        help_text = self.documentation.replace("\\", r"\\").replace("\n", r"\n")
        head = f"# HELP {name} {help_text}\n# TYPE {name} {self.type}\n"
        if not self._values:
            return head
        # repr is the shortest exact form and 2.5x faster than Go-style
        # formatting; Prometheus parses both. Non-finite values take the
        # slow path for their spelling (+Inf, NaN).
        fmt: Callable[[float], str] = repr
        if not all(map(math.isfinite, self._values)):
            fmt = floatToGoString
        lines = map(operator.add, self._rows.prefixes(name), map(fmt, self._values))
        return head + "\n".join(lines) + "\n"


def render(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format (0.0.4)."""
    out: list[bytes] = []
    pending: list[Metric] = []
    for metric in registry.collect():
        if isinstance(metric, ArrayFamily):
            if pending:
                out.append(generate_latest(_Families(pending)))
                pending = []
            out.append(metric.text().encode())
        else:
            pending.append(metric)
    if pending:
        out.append(generate_latest(_Families(pending)))
    return b"".join(out)


class _Families:
    """Metric families already collected, as something generate_latest reads."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def _label_text(labels: dict[str, str]) -> str:
    return ",".join(
        f'{key}="{_escape(value)}"' for key, value in sorted(labels.items())
    )


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        # One line per scrape would flood the log; errors still raise.
        pass


class Exporter:
    """A running /metrics HTTP server; `stop()` shuts it down."""

    def __init__(self, registry: CollectorRegistry, addr: str, port: int) -> None:
        def app(
            environ: dict[str, Any], start_response: Callable[..., Any]
        ) -> list[bytes]:
            if environ.get("PATH_INFO", "/") not in ("/", "/metrics"):
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"only /metrics is served here\n"]
            body = render(registry)
            start_response(
                "200 OK",
                [
                    ("Content-Type", CONTENT_TYPE_PLAIN_0_0_4),
                    ("Content-Length", str(len(body))),
                ],
            )
            return [body]

        server_class = _Server6 if ":" in addr else _Server
        try:
            self._server = make_server(
                addr, port, app, server_class, handler_class=_QuietHandler
            )
        except OSError as exc:
            raise EmulationError(
                f"cannot serve metrics on {addr}:{port}: {exc.strerror}; pick a "
                "free port or stop whatever listens there"
            ) from None
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"metrics-{port}", daemon=True
        )
        self._thread.start()
        self.addr = addr
        self.port = int(self._server.server_port)
        log.info("serving metrics on %s", self.target)

    @property
    def target(self) -> str:
        """``host:port`` as a Prometheus target."""
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"{host}:{self.port}"

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve(registry: CollectorRegistry, addr: str, port: int) -> Exporter:
    """Serve `registry` on http://addr:port/metrics in a daemon thread.

    Port 0 picks a free port (see ``Exporter.port``). Bind to a management
    or loopback address, never 0.0.0.0: nothing may listen beyond the
    testbed.

    Serving turns off prometheus_client's ``*_created`` series for the whole
    process: they would double the series of every labelled counter and
    histogram, and Prometheus 2.42 stores them as plain gauges nobody reads.
    """
    disable_created_metrics()
    return Exporter(registry, addr, port)
