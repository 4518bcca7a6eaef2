"""Cost of exporting per-link metrics: array collector vs labelled children.

Run: .venv/bin/python benchmarks/bench_monitoring.py

For each link count, prints the time of one timestep's update (new delays,
rates, states and byte counters for every link) and of one scrape, for
three ways: `monitoring.metrics.LinkCollector` rendered by our exporter
(`monitoring.exposition.render`, what `serve` does), the same collector
rendered by prometheus_client's `generate_latest`, and the plain
prometheus_client way of one labelled Gauge/Counter child per link.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from monitoring.exposition import render
from monitoring.metrics import LinkCollector


@dataclass
class Links:
    names: list[str]
    kinds: list[str]
    a: list[str]
    b: list[str]
    delay_s: np.ndarray
    rate_bps: np.ndarray
    up: np.ndarray
    tx_bytes: np.ndarray


def make_links(n: int, rng: np.random.Generator) -> Links:
    return Links(
        names=[f"isl-{i}" for i in range(n)],
        kinds=["isl"] * n,
        a=[f"s{i // 22}-{i % 22}" for i in range(n)],
        b=[f"s{(i + 1) // 22}-{(i + 1) % 22}" for i in range(n)],
        delay_s=rng.uniform(0.002, 0.02, n),
        rate_bps=np.full(n, 100e6),
        up=np.ones(n),
        tx_bytes=rng.uniform(0, 1e9, n),
    )


def array_way(links: Links) -> tuple[CollectorRegistry, Callable[[], None]]:
    registry = CollectorRegistry()
    collector = LinkCollector()
    registry.register(collector)

    def update() -> None:
        collector.update(
            links.names, links.kinds, links.a, links.b,
            delay_s=links.delay_s, rate_bps=links.rate_bps, up=links.up,
            tx_bytes_ab=links.tx_bytes, tx_bytes_ba=links.tx_bytes,
        )  # fmt: skip

    return registry, update


def children_way(links: Links) -> tuple[CollectorRegistry, Callable[[], None]]:
    registry = CollectorRegistry()
    labels = ("link", "kind", "a", "b")
    delay = Gauge("d_seconds", "d", labels, registry=registry)
    rate = Gauge("r_bytes_per_second", "r", labels, registry=registry)
    up = Gauge("u", "u", labels, registry=registry)
    tx = Counter("t_bytes", "t", ("link", "kind", "src", "dst"), registry=registry)

    def update() -> None:
        rows = zip(links.names, links.kinds, links.a, links.b, strict=True)
        for i, (name, kind, a, b) in enumerate(rows):
            delay.labels(name, kind, a, b).set(links.delay_s[i])
            rate.labels(name, kind, a, b).set(links.rate_bps[i] / 8)
            up.labels(name, kind, a, b).set(links.up[i])
            tx.labels(name, kind, a, b).inc(1000)
            tx.labels(name, kind, b, a).inc(1000)

    return registry, update


def best_ms(fn: Callable[[], object], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main() -> None:
    rng = np.random.default_rng(1)
    print(f"{'links':>6} {'way':>9} {'update ms':>10} {'scrape ms':>10} {'KiB':>6}")
    for n in (1000, 5000, 20000):
        links = make_links(n, rng)
        ways = (
            ("array", array_way, render),
            ("array+gl", array_way, generate_latest),
            ("children", children_way, generate_latest),
        )
        for way, build, scrape in ways:
            registry, update = build(links)
            update()
            update_ms = best_ms(update)
            scrape_ms = best_ms(functools.partial(scrape, registry))
            kib = len(scrape(registry)) / 1024
            print(f"{n:>6} {way:>9} {update_ms:>10.1f} {scrape_ms:>10.1f} {kib:>6.0f}")


if __name__ == "__main__":
    main()
