"""A real Prometheus scraping the real exporters, shared by the tests here."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from monitoring.prometheus import PrometheusServer
from tests.monitoring.feeder import AGENTS, Feeder


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LiveMonitoring:
    prometheus: PrometheusServer
    feeder: Feeder
    start: float

    @property
    def url(self) -> str:
        return self.prometheus.url


@pytest.fixture(scope="session")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveMonitoring]:
    """Prometheus (1 s scrapes) with emulator, two agents and the controller.

    Waits until every target is up and has been scraped several times, so
    rates and quantiles have samples to work on.
    """
    run_dir: Path = tmp_path_factory.mktemp("run")
    feeder = Feeder()
    feeder.start()
    prometheus = PrometheusServer(
        run_dir,
        port=free_port(),
        scrape_interval_s=1.0,
        emulator_target=feeder.exporters["emulator"].target,
    )
    try:
        prometheus.update_targets(
            "satellite",
            [(feeder.exporters[s].target, {"satellite": s}) for s in AGENTS],
        )
        prometheus.update_targets(
            "inference", [(feeder.exporters["inference"].target, {})]
        )
        start = time.time()
        prometheus.start()
        _wait_for_scrapes(prometheus, targets=len(AGENTS) + 2, scrapes=6)
        yield LiveMonitoring(prometheus, feeder, start)
    finally:
        prometheus.stop()
        feeder.stop()


def _wait_for_scrapes(
    prometheus: PrometheusServer, targets: int, scrapes: int, timeout_s: float = 60
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = prometheus.query("count_over_time(up[1m]) and up == 1")
        counts = [float(r["value"][1]) for r in result]
        if len(counts) == targets and min(counts) >= scrapes:
            return
        time.sleep(0.5)
    up = prometheus.query("up")
    raise AssertionError(f"targets not scraped {scrapes} times in {timeout_s} s: {up}")
