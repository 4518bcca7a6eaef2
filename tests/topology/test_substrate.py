"""The kernel substrate: netlink messages, namespaces, links, routes, tear-down.

Message layouts are checked against what iproute2 sends (captured once with
``strace -e sendmsg tc qdisc add ...``). The root tests build a three-node
line ``tsub-a -- tsub-b -- tsub-c`` and read the kernel back with
``ip -j``, an implementation independent of ours.
"""

from __future__ import annotations

import ipaddress
import json
import os
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from topology import rtnl
from topology.addressing import AddressPlan, data_ifindex
from topology.errors import ConfigError, EmulationError, NodeNotFound
from topology.scenario import EmulationConfig
from topology.shaping import Shape

NODES = ["tsub-a", "tsub-b", "tsub-c"]
ADDRESS = {n: ipaddress.IPv4Address(f"198.18.0.{i + 1}") for i, n in enumerate(NODES)}
LINK0 = ipaddress.IPv4Network("198.19.0.0/31")
LINK1 = ipaddress.IPv4Network("198.19.0.2/31")


def ip_json(*argv: str) -> list[dict]:
    out = subprocess.run(
        ["ip", "-j", *argv], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out) if out.strip() else []


def tc_json(namespace: str, device: str) -> list[dict]:
    out = subprocess.run(
        ["tc", "-j", "-s", "-n", namespace, "qdisc", "show", "dev", device],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out) if out.strip() else []


def attrs(payload: bytes) -> dict[int, bytes]:
    """Top-level netlink attributes of `payload`, by type."""
    found, offset = {}, 0
    while offset + 4 <= len(payload):
        length, kind = struct.unpack_from("=HH", payload, offset)
        found[kind] = payload[offset + 4 : offset + length]
        offset += length + (-length % 4)
    return found


# --- messages (no root needed) ---------------------------------------------


def test_netem_message_matches_iproute2() -> None:
    # tc qdisc add dev lo root handle 1: netem delay 1500us loss 1% \
    #     rate 100mbit limit 1000
    expected_options = bytes.fromhex(
        "8d5b0000"
        "e8030000"
        "295c8f02"
        "00000000"
        "00000000"
        "00000000"
        "14000600"
        "20bcbe00"
        "00000000"
        "00000000"
        "00000000"
    )
    message = rtnl.netem(1, 1.5e-3, 100e6, 0.01, 1000, create=True)
    length, kind, flags = struct.unpack_from("=IHH", message)
    assert (length, kind) == (len(message), rtnl.RTM_NEWQDISC)
    assert flags & rtnl.NLM_F_CREATE and flags & rtnl.NLM_F_EXCL
    assert message[16:36] == bytes.fromhex("000000000100000000000100ffffffff00000000")
    top = attrs(message[36:])
    assert top[rtnl.TCA_KIND] == b"netem\0"
    options = top[rtnl.TCA_OPTIONS]
    assert options[: len(expected_options)] == expected_options
    # We add the delay in nanoseconds as well (iproute2 does for long delays).
    extra = attrs(options[len(expected_options) :])
    assert struct.unpack("=q", extra[rtnl.TCA_NETEM_LATENCY64]) == (1_500_000,)


def test_tbf_message_matches_iproute2() -> None:
    # tc qdisc add dev lo root handle 1: tbf rate 100mbit burst 50000 \
    #     limit 2500000 (rate table left out: linklayer ethernet needs none)
    message = rtnl.tbf(1, 100e6, 50_000, 2_500_000, create=False)
    _, _, flags = struct.unpack_from("=IHH", message)
    assert not flags & (rtnl.NLM_F_CREATE | rtnl.NLM_F_EXCL | rtnl.NLM_F_REPLACE)
    options = attrs(attrs(message[36:])[rtnl.TCA_OPTIONS])
    parms = options[rtnl.TCA_TBF_PARMS]
    _, linklayer, overhead, align, mpu, rate = struct.unpack_from("=BBHhHI", parms)
    assert (linklayer, overhead, align, mpu, rate) == (1, 0, -1, 0, 12_500_000)
    assert parms[12:24] == bytes(12)
    assert struct.unpack_from("=III", parms, 24) == (2_500_000, 62_500, 0)
    assert struct.unpack("=I", options[rtnl.TCA_TBF_BURST]) == (50_000,)
    assert rtnl.TCA_TBF_RATE64 not in options


def test_tbf_rate_above_32_bits_uses_rate64() -> None:
    options = attrs(attrs(rtnl.tbf(1, 400e9, 10**6, 10**8, True)[36:])[2])
    assert struct.unpack("=Q", options[rtnl.TCA_TBF_RATE64]) == (50_000_000_000,)


def test_route_records_layout() -> None:
    records = rtnl.route_records(
        np.array([0xC6120002, 0xC6120003], np.uint32),
        np.array([0xC6130001, 0], np.uint32),
        np.array([100_000, 0], np.uint32),
        0xC6120001,
    )
    raw = records.tobytes()
    assert len(raw) == 2 * 60
    length, kind, flags = struct.unpack_from("=IHH", raw)
    assert (length, kind) == (60, rtnl.RTM_NEWROUTE)
    assert flags & rtnl.NLM_F_REPLACE and flags & rtnl.NLM_F_CREATE
    family, dst_len, _, _, table, protocol = struct.unpack_from("=6B", raw, 16)
    assert (family, dst_len, table, protocol) == (2, 32, 254, rtnl.RTPROT_STATIC)
    top = attrs(raw[28:60])
    assert top[rtnl.RTA_DST] == bytes([198, 18, 0, 2])
    assert top[rtnl.RTA_GATEWAY] == bytes([198, 19, 0, 1])
    assert struct.unpack("=I", top[rtnl.RTA_OIF]) == (100_000,)
    # Sockets in the node pick its /32 as source, not the link's /31.
    assert top[rtnl.RTA_PREFSRC] == bytes([198, 18, 0, 1])
    assert struct.unpack_from("=H", raw, 60 + 4) == (rtnl.RTM_DELROUTE,)


def test_interface_names_are_checked() -> None:
    with pytest.raises(EmulationError, match="1 to 15 characters"):
        rtnl.link_set(name="a-name-far-too-long")


def test_address_plan_rejects_overlap_and_overflow() -> None:
    with pytest.raises(ConfigError, match="overlaps"):
        AddressPlan.from_config(
            EmulationConfig(node_prefix="10.0.0.0/8", link_prefix="10.1.0.0/16"), 4
        )
    with pytest.raises(ConfigError, match="shorter prefix"):
        AddressPlan.from_config(EmulationConfig(node_prefix="198.18.0.0/30"), 10)
    plan = AddressPlan.from_config(EmulationConfig(), 10)
    assert str(plan.node_address(0)) == "198.18.0.1"
    assert str(plan.management_address(0)) == "198.18.128.2"
    assert str(plan.link_subnet(3)) == "198.19.0.6/31"
    ends = plan.link_addresses_u32(np.array([3, 3]), np.array([False, True]))
    assert [str(ipaddress.IPv4Address(int(x))) for x in ends] == [
        "198.19.0.6",
        "198.19.0.7",
    ]


def test_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    from topology.substrate import NamespaceSubstrate

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(EmulationError, match="needs root"):
        NamespaceSubstrate()


# --- kernel (root) ------------------------------------------------------------


@pytest.fixture
def line(net_sandbox: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """tsub-a --d0-- tsub-b --d1-- tsub-c, routed end to end."""
    from topology.substrate import (
        LinkSpec,
        NamespaceSubstrate,
        NodeSpec,
        RouteBatch,
    )

    monkeypatch.setenv("SPACEMOE_RUN_DIR", str(tmp_path))
    substrate = NamespaceSubstrate()
    try:
        substrate.start(None)
        substrate.add_nodes([NodeSpec(n, ADDRESS[n]) for n in NODES])
        substrate.add_links(
            [
                LinkSpec(0, "tsub-a", "tsub-b", LINK0, Shape(0.002, 100e6, 0.0)),
                LinkSpec(1, "tsub-b", "tsub-c", LINK1, Shape(0.003, 100e6, 0.0)),
            ]
        )
        a, b, c = (str(ADDRESS[n]) for n in NODES)
        substrate.apply_routes(
            "tsub-a",
            RouteBatch.from_tuples([(b, "198.19.0.1", 0), (c, "198.19.0.1", 0)]),
        )
        substrate.apply_routes(
            "tsub-b",
            RouteBatch.from_tuples([(a, "198.19.0.0", 0), (c, "198.19.0.3", 1)]),
        )
        substrate.apply_routes(
            "tsub-c",
            RouteBatch.from_tuples([(a, "198.19.0.2", 1), (b, "198.19.0.2", 1)]),
        )
        yield substrate
    finally:
        substrate.teardown()


def ping_rtt_ms(substrate, node: str, target: str, count: int = 5) -> float:
    """Median RTT of `count` pings from `node`'s address to `target`.

    ``-U``: time on receipt in user space. Without it ping takes the
    kernel's receive timestamp, stamped on arrival at the veth, before the
    delay line holds the packet, and misses the last link's delay.
    """
    argv = ["ping", "-n", "-U", "-i", "0.1", "-W", "2", "-I", str(ADDRESS[node])]
    substrate.run(node, [*argv, "-c", "2", target], check=False)  # ARP, caches
    out = substrate.run(node, [*argv, "-c", str(count), target], check=False).stdout
    times = [float(w.split("=")[1]) for w in out.split() if w.startswith("time=")]
    assert len(times) == count, out
    return float(np.median(times))


@pytest.mark.root
def test_nodes_links_and_settings_exist(line) -> None:
    names = {n["ifname"]: n for n in ip_json("-n", "smoe-tsub-b", "addr")}
    assert {"lo", "d0", "d1"} <= set(names)
    assert names["d0"]["ifindex"] == data_ifindex(0)
    assert {(a["local"], a["prefixlen"]) for a in names["lo"]["addr_info"]} >= {
        (str(ADDRESS["tsub-b"]), 32)
    }
    assert [(a["local"], a["prefixlen"]) for a in names["d1"]["addr_info"]] == [
        ("198.19.0.2", 31)
    ]
    out = line.run(
        "tsub-b", ["sysctl", "-n", "net.ipv4.ip_forward", "net.ipv4.conf.all.rp_filter"]
    ).stdout.split()
    assert out == ["1", "0"]
    qdiscs = tc_json("smoe-tsub-a", "d0")
    assert qdiscs[0]["kind"] == line.shaping_mode.split("+")[0]
    with pytest.raises(NodeNotFound):
        line.run("tsub-zz", ["true"])


@pytest.mark.root
def test_end_to_end_rtt_is_twice_the_link_delays(line) -> None:
    rtt = ping_rtt_ms(line, "tsub-a", str(ADDRESS["tsub-c"]))
    assert abs(rtt - 2 * (2 + 3)) <= 1.0


@pytest.mark.root
def test_shaping_changes_in_place(line) -> None:
    from topology.substrate import ShapingChange

    ping_rtt_ms(line, "tsub-a", str(ADDRESS["tsub-c"]), count=3)
    before = tc_json("smoe-tsub-b", "d1")[0]
    assert before["packets"] > 0
    slower = Shape(0.010, 10e6, 0.0)
    line.set_shaping([ShapingChange(1, "ab", slower), ShapingChange(1, "ba", slower)])
    after = tc_json("smoe-tsub-b", "d1")[0]
    # Same qdisc, counters kept: changed, not deleted and added again.
    assert after["handle"] == before["handle"]
    assert after["packets"] >= before["packets"]
    if line.shaping_mode == "tbf+delayline":
        assert after["options"]["rate"] == 10_000_000 // 8
    rtt = ping_rtt_ms(line, "tsub-a", str(ADDRESS["tsub-c"]))
    assert abs(rtt - 2 * (2 + 10)) <= 1.0


@pytest.mark.root
def test_routes_in_batches(line) -> None:
    from topology.substrate import RouteBatch

    # 2,000 host routes in one call; then half deleted, some twice.
    dests = np.uint32(int(ipaddress.IPv4Address("198.18.64.0"))) + np.arange(
        2000, dtype=np.uint32
    )
    via = np.full(2000, int(ipaddress.IPv4Address("198.19.0.1")), np.uint32)
    line.apply_routes("tsub-a", RouteBatch(dests, via, np.zeros(2000, int)))
    routes = ip_json("-n", "smoe-tsub-a", "route", "show", "proto", "static")
    assert len(routes) == 2000 + 2
    line.apply_routes(
        "tsub-a", RouteBatch(dests[:1000], np.zeros(1000, np.uint32), np.zeros(1000))
    )
    line.apply_routes(
        "tsub-a", RouteBatch(dests[:10], np.zeros(10, np.uint32), np.zeros(10))
    )
    routes = ip_json("-n", "smoe-tsub-a", "route", "show", "proto", "static")
    assert len(routes) == 1000 + 2

    # A gateway on no connected subnet is refused, and the error says which.
    bad = RouteBatch.from_tuples([("198.18.99.1", "203.0.113.9", 0)])
    with pytest.raises(EmulationError, match="198.18.99.1 via 203.0.113.9"):
        line.apply_routes("tsub-a", bad)


@pytest.mark.root
def test_link_down_and_up(line) -> None:
    line.set_link_up(1, False)
    states = {n["ifname"]: n["operstate"] for n in ip_json("-n", "smoe-tsub-c", "link")}
    assert states["d1"] == "DOWN"
    failed = line.run(
        "tsub-a",
        [
            "ping",
            "-c",
            "1",
            "-W",
            "1",
            "-I",
            str(ADDRESS["tsub-a"]),
            str(ADDRESS["tsub-c"]),
        ],
        check=False,
    )
    assert failed.returncode != 0
    line.set_link_up(1, True)
    # The kernel flushed the routes through d1 when it went down.
    from topology.substrate import RouteBatch

    line.apply_routes(
        "tsub-b", RouteBatch.from_tuples([(str(ADDRESS["tsub-c"]), "198.19.0.3", 1)])
    )
    line.apply_routes(
        "tsub-c",
        RouteBatch.from_tuples(
            [
                (str(ADDRESS["tsub-a"]), "198.19.0.2", 1),
                (str(ADDRESS["tsub-b"]), "198.19.0.2", 1),
            ]
        ),
    )
    assert ping_rtt_ms(line, "tsub-a", str(ADDRESS["tsub-c"]), count=2) > 0


@pytest.mark.root
def test_remove_link_and_teardown_leave_nothing(
    net_sandbox: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from topology.substrate import LinkSpec, NamespaceSubstrate, NodeSpec

    monkeypatch.setenv("SPACEMOE_RUN_DIR", str(tmp_path))
    monkeypatch.setattr("topology.substrate.PORTS_PER_BRIDGE", 2)
    substrate = NamespaceSubstrate()
    try:
        substrate.start(ipaddress.IPv4Interface("198.18.128.1/17"))
        substrate.add_nodes(
            [
                NodeSpec(
                    n, ADDRESS[n], ipaddress.IPv4Interface(f"198.18.128.{i + 2}/17")
                )
                for i, n in enumerate(NODES)
            ]
        )
        assert "smoe-mgmt1" in {n["ifname"] for n in ip_json("link")}
        substrate.add_link(
            LinkSpec(5, "tsub-a", "tsub-b", LINK0, Shape(0.001, 50e6, 0.0))
        )
        # Management: reachable from the root namespace, never shaped.
        subprocess.run(
            ["ping", "-c", "1", "-W", "2", "198.18.128.3"],
            check=True,
            capture_output=True,
        )
        # Two ports per bridge here: the third node's port opens a second
        # bridge behind a trunk, as the 1,001st does in a real run.
        subprocess.run(
            ["ping", "-c", "1", "-W", "2", "198.18.128.4"],
            check=True,
            capture_output=True,
        )
        mgmt = tc_json("smoe-tsub-a", "mgmt0")
        assert all(q["kind"] == "noqueue" for q in mgmt)
        substrate.remove_link(5)
        links = {n["ifname"] for n in ip_json("-n", "smoe-tsub-b", "link")}
        assert "d5" not in links
        helpers = substrate.helper_pids()
    finally:
        substrate.teardown()
    assert not (Path("/run/netns") / "smoe-tsub-a").exists()
    root_links = {n["ifname"] for n in ip_json("link")}
    assert not any(name.startswith("smoe-m") for name in root_links)
    assert "smoe-mgmt" not in root_links
    deadline = time.monotonic() + 5
    while any(Path(f"/proc/{p}").exists() for p in helpers):
        assert time.monotonic() < deadline, f"delay line {helpers} still runs"
        time.sleep(0.1)
