"""Shaping: mode choice, queue sizing, and TCP throughput through real qdiscs."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from topology.errors import EmulationError
from topology.shaping import (
    FRAME_BYTES,
    QUEUE_S,
    Shape,
    netem_limit_packets,
    resolve_mode,
    tbf_sizes,
)


def test_netem_asked_for_without_netem_is_an_error() -> None:
    with pytest.raises(EmulationError, match="no netem qdisc.*'delayline'"):
        resolve_mode("netem", kernel_has_netem=False)


@pytest.mark.parametrize(
    ("requested", "has_netem", "mode"),
    [
        ("auto", True, "netem"),
        ("auto", False, "tbf+delayline"),
        ("netem", True, "netem"),
        ("delayline", True, "tbf+delayline"),
        ("delayline", False, "tbf+delayline"),
    ],
)
def test_mode_choice(requested: str, has_netem: bool, mode: str) -> None:
    assert resolve_mode(requested, has_netem) == mode


def test_unknown_mode_is_an_error() -> None:
    with pytest.raises(EmulationError, match="'sfq'"):
        resolve_mode("sfq", True)


@pytest.mark.parametrize("rate_bps", [1e6, 10e6, 100e6, 1e9, 40e9])
def test_tbf_queue_holds_a_bandwidth_delay_product(rate_bps: float) -> None:
    burst, limit = tbf_sizes(rate_bps)
    assert burst >= 2 * FRAME_BYTES
    assert limit >= rate_bps / 8 * QUEUE_S
    assert limit >= burst


def test_netem_limit_covers_packets_in_flight() -> None:
    shape = Shape(delay_s=0.05, rate_bps=1e9, loss_fraction=0.0)
    assert netem_limit_packets(shape) * FRAME_BYTES >= 1e9 / 8 * (0.05 + QUEUE_S)
    assert netem_limit_packets(Shape(0.001, 1e6, 0.0)) == 1000


# --- throughput through the kernel (root) -------------------------------------


@pytest.fixture
def pair_path(net_sandbox: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """tshp-a -- tshp-b -- tshp-c with 2 ms and 3 ms links, routed."""
    from topology.substrate import LinkSpec, NamespaceSubstrate, NodeSpec, RouteBatch

    monkeypatch.setenv("SPACEMOE_RUN_DIR", str(tmp_path))
    nodes = ["tshp-a", "tshp-b", "tshp-c"]
    address = {n: f"198.18.0.{i + 1}" for i, n in enumerate(nodes)}
    substrate = NamespaceSubstrate()
    try:
        substrate.start(None)
        substrate.add_nodes(
            [NodeSpec(n, ipaddress.IPv4Address(address[n])) for n in nodes]
        )
        substrate.add_links(
            [
                LinkSpec(
                    0,
                    "tshp-a",
                    "tshp-b",
                    ipaddress.IPv4Network("198.19.0.0/31"),
                    Shape(0.002, 100e6, 0.0),
                ),
                LinkSpec(
                    1,
                    "tshp-b",
                    "tshp-c",
                    ipaddress.IPv4Network("198.19.0.2/31"),
                    Shape(0.003, 100e6, 0.0),
                ),
            ]
        )
        a, b, c = (address[n] for n in nodes)
        for node, routes in (
            ("tshp-a", [(b, "198.19.0.1", 0), (c, "198.19.0.1", 0)]),
            ("tshp-b", [(a, "198.19.0.0", 0), (c, "198.19.0.3", 1)]),
            ("tshp-c", [(a, "198.19.0.2", 1), (b, "198.19.0.2", 1)]),
        ):
            substrate.apply_routes(node, RouteBatch.from_tuples(routes))
        yield substrate, address
    finally:
        substrate.teardown()


def iperf_bps(substrate, address: dict[str, str], seconds: int = 4) -> float:
    """TCP goodput from tshp-a to tshp-c, as iperf3's receiver measured it."""
    server = substrate.popen(
        "tshp-c",
        ["iperf3", "-s", "-1", "-B", address["tshp-c"]],
        stdout=__import__("subprocess").DEVNULL,
        stderr=__import__("subprocess").DEVNULL,
    )
    try:
        import time

        time.sleep(0.5)
        out = substrate.run(
            "tshp-a",
            [
                "iperf3",
                "-c",
                address["tshp-c"],
                "-B",
                address["tshp-a"],
                "-t",
                str(seconds),
                "-O",
                "1",
                "-J",
            ],
            timeout_s=seconds + 30,
        ).stdout
    finally:
        server.kill()
        server.wait()
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"])


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize("rate_bps", [10e6, 100e6])
def test_tcp_fills_the_shaped_rate(pair_path, rate_bps: float) -> None:
    from topology.substrate import ShapingChange

    substrate, address = pair_path
    shape = Shape(0.003, rate_bps, 0.0)
    substrate.set_shaping(
        [ShapingChange(1, "ab", shape), ShapingChange(1, "ba", shape)]
    )
    goodput = iperf_bps(substrate, address)
    # TCP/IP headers take ~3% of a 1500-byte frame; the rest must get through.
    assert goodput >= 0.9 * rate_bps, f"{goodput / 1e6:.1f} Mbit/s"
    assert goodput <= 1.02 * rate_bps, f"{goodput / 1e6:.1f} Mbit/s exceeds the rate"
