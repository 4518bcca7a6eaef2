"""The user-space delay line on a real three-namespace chain.

A -- B -- C, each link a veth pair named ``d<link>`` on both ends (the
data-plane naming the delay line keys on) plus a ``mgmt0`` pair between A
and B that must stay undelayed. Delay and loss are applied where packets
arrive, so a link's delay is set on both of its ends. RTTs are measured
user space to user space with a UDP echo server in C (kernel receive
timestamps would be taken before the delay line holds the packet).
"""

from __future__ import annotations

import gzip
import json
import os
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from topology.commands import run
from topology.delayline import (
    RULE_COMMENT,
    DelayLine,
    cleanup_namespace_rules,
    kernel_has_netem,
)
from topology.errors import ConfigError, EmulationError
from topology.nfqueue import (
    NF_ACCEPT,
    NF_DROP,
    NFQNL_MSG_VERDICT,
    VERDICT_SIZE,
    VerdictBatch,
    _parse_generic,
    in_namespace,
    open_namespace,
    parse_packet,
)

# Unique per run: the suite may run twice at once on a shared machine.
_RUN = f"smoe-tdl{os.getpid()}"
NS_A, NS_B, NS_C = f"{_RUN}a", f"{_RUN}b", f"{_RUN}c"
ADDR_A, ADDR_B_AB, ADDR_B_BC, ADDR_C = (
    "10.77.1.1",
    "10.77.1.2",
    "10.77.2.1",
    "10.77.2.2",
)
MGMT_A, MGMT_B = "10.77.9.1", "10.77.9.2"
ECHO_PORT = 7777
PACKET = struct.Struct("!Iq")

ECHO_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(data, peer)
"""


def _rtt_tolerance_s(expected_s: float) -> float:
    return max(1e-3, 0.02 * expected_s)


def _in(ns: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{ns}", "--"]


def _delete_namespaces() -> None:
    for ns in (NS_A, NS_B, NS_C):
        run(["ip", "netns", "del", ns], check=False)


def _veth(ns1: str, if1: str, addr1: str, ns2: str, if2: str, addr2: str) -> None:
    run(
        [
            "ip",
            "link",
            "add",
            if1,
            "netns",
            ns1,
            "type",
            "veth",
            "peer",
            if2,
            "netns",
            ns2,
        ]
    )
    for ns, ifname, addr in ((ns1, if1, addr1), (ns2, if2, addr2)):
        run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", ifname])
        run(["ip", "-n", ns, "link", "set", ifname, "up"])


@dataclass
class Chain:
    echo: subprocess.Popen[str]

    def client(self) -> socket.socket:
        """A UDP socket in A, connected to the echo server in C."""
        with in_namespace(open_namespace(NS_A)):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect((ADDR_C, ECHO_PORT))
        sock.setblocking(False)
        return sock


@pytest.fixture(scope="module")
def chain(net_sandbox: None) -> Iterator[Chain]:
    _delete_namespaces()
    echo = None
    try:
        for ns in (NS_A, NS_B, NS_C):
            run(["ip", "netns", "add", ns])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
            # No IPv6 neighbour discovery in the counts the tests check.
            run(
                [
                    *_in(ns),
                    "sysctl",
                    "-qw",
                    "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1",
                ]
            )
        _veth(NS_A, "d1", ADDR_A, NS_B, "d1", ADDR_B_AB)
        _veth(NS_B, "d2", ADDR_B_BC, NS_C, "d2", ADDR_C)
        _veth(NS_A, "mgmt0", MGMT_A, NS_B, "mgmt0", MGMT_B)
        run(["ip", "-n", NS_A, "route", "add", "10.77.2.0/24", "via", ADDR_B_AB])
        run(["ip", "-n", NS_C, "route", "add", "10.77.1.0/24", "via", ADDR_B_BC])
        run([*_in(NS_B), "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        echo = subprocess.Popen(
            [*_in(NS_C), sys.executable, "-c", ECHO_SERVER, str(ECHO_PORT)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
        yield Chain(echo)
    finally:
        if echo is not None:
            echo.kill()
            echo.wait()
        _delete_namespaces()


@pytest.fixture
def delayline(chain: Chain) -> Iterator[DelayLine]:
    line = DelayLine(seed=1)
    try:
        line.start()
        for ns in (NS_A, NS_B, NS_C):
            line.attach(ns)
        yield line
    finally:
        line.stop()


def _link_delays(
    ab_s: float, bc_s: float, ab_loss: float = 0.0
) -> list[tuple[str, str, float, float]]:
    """Both ends of each link; loss only on A->B (arriving at B)."""
    return [
        (NS_A, "d1", ab_s, 0.0),
        (NS_B, "d1", ab_s, ab_loss),
        (NS_B, "d2", bc_s, 0.0),
        (NS_C, "d2", bc_s, 0.0),
    ]


def _probe(
    sock: socket.socket,
    count: int,
    interval_s: float,
    at_half: object = None,
    tail_s: float = 0.5,
) -> list[tuple[int, float]]:
    """Send `count` echo requests; return (seq, rtt_s) in arrival order.

    `at_half`, if given, is called after half of them are sent.
    """
    replies: list[tuple[int, float]] = []

    def drain() -> None:
        while True:
            try:
                data = sock.recv(64)
            except BlockingIOError:
                return
            seq, sent_ns = PACKET.unpack(data)
            replies.append((seq, (time.monotonic_ns() - sent_ns) * 1e-9))

    def wait_until(when_s: float) -> None:
        # Read replies as they come (select), not when the next send is due,
        # or the RTT would be rounded up to the send interval.
        while (pause := when_s - time.monotonic()) > 0:
            if select.select([sock], [], [], pause)[0]:
                drain()

    start = time.monotonic()
    for seq in range(count):
        if seq == count // 2 and callable(at_half):
            at_half()
        sock.send(PACKET.pack(seq, time.monotonic_ns()))
        wait_until(start + (seq + 1) * interval_s)
    deadline = time.monotonic() + tail_s
    while len(replies) < count and time.monotonic() < deadline:
        wait_until(min(deadline, time.monotonic() + 0.01))
    return replies


# --- without root --------------------------------------------------------


def _packet_message(with_timestamp: bool) -> bytearray:
    """An NFQNL_MSG_PACKET laid out as the kernel writes one for a veth."""
    attrs = [
        struct.pack("=HH", 11, 1) + struct.pack("!IHB", 4242, 0x0800, 0) + b"\0",
        struct.pack("=HH", 8, 5) + struct.pack("!I", 100_007),
        struct.pack("=HH", 16, 9) + struct.pack("!HH", 6, 0) + bytes(8),
        struct.pack("=HH", 20, 4) + struct.pack("!QQ", 1_700_000_000, 250_000),
        struct.pack("=HH", 8, 13) + struct.pack("!I", 65_226),
        struct.pack("=HH", 8, 14) + struct.pack("!I", 4),
        struct.pack("=HH", 5, 10) + b"E" + b"\0" * 3,
    ]
    if not with_timestamp:
        del attrs[3]
    body = struct.pack("=BBH", 0, 0, socket.htons(7000)) + b"".join(attrs)
    return bytearray(struct.pack("=IHHII", 16 + len(body), 0x300, 0, 0, 0) + body)


def test_parse_packet_message_fields() -> None:
    """Id, input ifindex, full length and timestamp, on both parse paths."""
    message = _packet_message(with_timestamp=True)
    expected = (4242, 100_007, 65_226, 1_700_000_000_250_000_000)
    assert parse_packet(message, 0, len(message)) == expected
    assert _parse_generic(message, 0, len(message)) == expected
    message = _packet_message(with_timestamp=False)
    assert parse_packet(message, 0, len(message)) == (4242, 100_007, 65_226, 0)


def test_verdict_batch_layout() -> None:
    """Queued verdicts are back-to-back 32-byte NFQNL_MSG_VERDICT messages."""
    batch = VerdictBatch(7000)
    batch.add(5, NF_ACCEPT)
    batch.add(6, NF_DROP)
    data = bytes(batch.data)
    assert len(batch) == 2 and len(data) == 2 * VERDICT_SIZE == 64
    for i, (packet_id, verdict) in enumerate([(5, NF_ACCEPT), (6, NF_DROP)]):
        length, kind, flags = struct.unpack_from("=IHH", data, 32 * i)
        assert (length, kind, flags) == (32, NFQNL_MSG_VERDICT, 1)
        assert struct.unpack_from("!H", data, 32 * i + 18) == (7000,)
        assert struct.unpack_from("!II", data, 32 * i + 24) == (verdict, packet_id)


def test_bad_worker_count_is_rejected() -> None:
    with pytest.raises(ConfigError, match="workers=0"):
        DelayLine(workers=0)


# --- with namespaces ------------------------------------------------------


@pytest.mark.root
def test_chain_rtt_is_sum_of_link_delays(chain: Chain, delayline: DelayLine) -> None:
    delayline.set_links(_link_delays(0.010, 0.025))
    sock = chain.client()
    try:
        replies = _probe(sock, 40, 0.01)
    finally:
        sock.close()
    assert len(replies) == 40
    rtt_s = statistics.median(r for _, r in replies)
    assert abs(rtt_s - 0.070) <= _rtt_tolerance_s(0.070), rtt_s

    stats = delayline.stats()
    link = stats["links"][(NS_B, "d2")]

    assert link["packets"] == 40 and link["released"] == 40 and link["drops"] == 0
    assert link["bytes"] == 40 * (20 + 8 + PACKET.size)
    # The learnt lead may let a packet go a fraction of a millisecond early.
    assert -0.0005 <= link["max_lateness_s"] < 0.005


@pytest.mark.root
def test_management_interface_is_not_delayed(
    chain: Chain, delayline: DelayLine
) -> None:
    delayline.set_links(_link_delays(0.050, 0.050))
    out = run([*_in(NS_A), "ping", "-U", "-c", "3", "-i", "0.05", "-q", MGMT_B]).stdout
    avg_ms = float(out.rsplit("=", 1)[1].split("/")[1])
    assert avg_ms < 5.0, out
    assert (NS_B, "mgmt0") not in delayline.stats()["links"]


@pytest.mark.root
def test_delay_change_keeps_order(chain: Chain, delayline: DelayLine) -> None:
    """Shortening a delay mid-stream must not let later packets overtake."""
    delayline.set_links(_link_delays(0.010, 0.025))
    sock = chain.client()
    try:
        replies = _probe(
            sock,
            400,
            0.0025,
            at_half=lambda: delayline.set_links(_link_delays(0.010, 0.005)),
        )
    finally:
        sock.close()
    seqs = [seq for seq, _ in replies]
    assert seqs == sorted(seqs), "packets were reordered"
    assert len(seqs) == 400
    before = statistics.median(r for s, r in replies if s < 150)
    after = statistics.median(r for s, r in replies if s >= 300)
    assert abs(before - 0.070) <= _rtt_tolerance_s(0.070), before
    assert abs(after - 0.030) <= _rtt_tolerance_s(0.030), after


@pytest.mark.root
def test_loss_fraction_drops_that_share(chain: Chain, delayline: DelayLine) -> None:
    delayline.set_links(_link_delays(0.002, 0.002, ab_loss=0.2))
    count = 1000
    sock = chain.client()
    try:
        replies = _probe(sock, count, 0.001)
    finally:
        sock.close()
    lost = count - len(replies)

    # Binomial(1000, 0.2): sd 12.6; five of them either side.
    assert 137 <= lost <= 263, lost
    link = delayline.stats()["links"][(NS_B, "d1")]
    assert link["drops"] == lost
    assert link["packets"] == count


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize("rate_mbit", [10, 100])
def test_tcp_reaches_tbf_rate_through_delay(
    chain: Chain, delayline: DelayLine, rate_mbit: int
) -> None:
    """tbf on A's egress plus 35 ms one-way delay: TCP gets >= 90% of the rate.

    tbf limit = bandwidth-delay product of the 70 ms RTT (at least 64 KiB),
    burst = 64 KiB so GSO packets pass whole.
    """
    from pyroute2 import NetNS

    delayline.set_links(_link_delays(0.010, 0.025))
    rate_bps = rate_mbit * 1_000_000
    burst_bytes = 64 * 1024
    limit_bytes = max(int(rate_bps / 8 * 0.070), burst_bytes)
    with NetNS(NS_A) as ipr:
        index = ipr.link_lookup(ifname="d1")[0]
        ipr.tc(
            "add",
            "tbf",
            index,
            rate=f"{rate_mbit}mbit",
            burst=burst_bytes,
            limit=limit_bytes,
        )
    server = subprocess.Popen(
        [*_in(NS_C), "iperf3", "-s", "-1", "-B", ADDR_C],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)
        out = run(
            [*_in(NS_A), "iperf3", "-c", ADDR_C, "-t", "5", "-O", "2", "-J"],
            timeout_s=30,
        ).stdout
        received_bps = json.loads(out)["end"]["sum_received"]["bits_per_second"]
    finally:
        server.kill()
        server.wait()
        with NetNS(NS_A) as ipr:
            ipr.tc("del", index=index, parent=0xFFFFFFFF)
    assert received_bps >= 0.9 * rate_bps, received_bps
    totals = delayline.stats()["totals"]
    assert totals["kernel_queue_dropped"] == 0 and totals["kernel_user_dropped"] == 0


@pytest.mark.root
def test_stop_leaves_no_rules_and_no_process(chain: Chain) -> None:
    line = DelayLine(workers=2)
    line.start()
    pids = line.pids
    try:
        for ns in (NS_A, NS_B, NS_C):
            line.attach(ns)
        assert line.alive()
        assert RULE_COMMENT in run([*_in(NS_B), "iptables-save", "-t", "raw"]).stdout
    finally:
        line.stop()
    assert not line.alive()
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}")
    for ns in (NS_A, NS_B, NS_C):
        for save in ("iptables-save", "ip6tables-save"):
            assert RULE_COMMENT not in run([*_in(ns), save]).stdout
    with pytest.raises(EmulationError, match="not running"):
        line.set_links([])


PARENT = """
import sys, time
from topology.delayline import DelayLine
line = DelayLine()
line.start()
line.attach(sys.argv[1])
print(line.pids[0], flush=True)
time.sleep(60)
"""


@pytest.mark.root
def test_parent_crash_stops_worker_and_removes_rules(chain: Chain) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, NS_B], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        worker_pid = int(parent.stdout.readline())
        assert RULE_COMMENT in run([*_in(NS_B), "iptables-save", "-t", "raw"]).stdout
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{worker_pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{worker_pid}"), "worker outlived its parent"
    assert RULE_COMMENT not in run([*_in(NS_B), "iptables-save", "-t", "raw"]).stdout
    assert cleanup_namespace_rules(NS_B) == 0


@pytest.mark.root
def test_cleanup_finds_rules_by_comment(chain: Chain) -> None:
    from topology.delayline import install_rule

    install_rule(NS_C, queue_num=7001, ipv6=True)
    install_rule(NS_C, queue_num=7002, ipv6=False)
    assert cleanup_namespace_rules(NS_C) == 3
    assert RULE_COMMENT not in run([*_in(NS_C), "iptables-save"]).stdout


@pytest.mark.root
def test_set_links_rejects_bad_entries(chain: Chain, delayline: DelayLine) -> None:
    with pytest.raises(ConfigError, match="not attached"):
        delayline.set_links([("smoe-nosuch", "d1", 0.01, 0.0)])
    with pytest.raises(ConfigError, match="mgmt0"):
        delayline.set_links([(NS_A, "mgmt0", 0.01, 0.0)])
    with pytest.raises(ConfigError, match="delay_s=-0.1"):
        delayline.set_links([(NS_A, "d1", -0.1, 0.0)])
    with pytest.raises(ConfigError, match="loss_fraction=1.5"):
        delayline.set_links([(NS_A, "d1", 0.01, 1.5)])
    with pytest.raises(ConfigError, match="no network namespace at"):
        delayline.attach("smoe-nosuch")


@pytest.mark.root
def test_attach_by_path_of_a_process(chain: Chain) -> None:
    """A container's namespace is given as /proc/PID/ns/net under any label."""
    holder = subprocess.Popen([*_in(NS_C), "sleep", "60"])
    line = DelayLine()
    try:
        line.start()
        time.sleep(0.1)
        line.attach("container-c", f"/proc/{holder.pid}/ns/net")
        line.set_links([("container-c", "d2", 0.020, 0.0)])
        sock = chain.client()
        try:
            replies = _probe(sock, 10, 0.01)
        finally:
            sock.close()
        rtt_s = statistics.median(r for _, r in replies)
        assert abs(rtt_s - 0.020) <= _rtt_tolerance_s(0.020), rtt_s
        assert line.stats()["links"][("container-c", "d2")]["packets"] == 10
    finally:
        line.stop()
        holder.kill()
        holder.wait()
    assert RULE_COMMENT not in run([*_in(NS_C), "iptables-save"]).stdout


@pytest.mark.root
def test_sigterm_makes_worker_remove_its_rules(chain: Chain) -> None:
    line = DelayLine()
    try:
        line.start()
        line.attach(NS_B)
        os.kill(line.pids[0], signal.SIGTERM)
        deadline = time.monotonic() + 5
        while line.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not line.alive()
        assert RULE_COMMENT not in run([*_in(NS_B), "iptables-save"]).stdout
    finally:
        line.stop()


@pytest.mark.root
def test_forget_links_drops_settings(chain: Chain, delayline: DelayLine) -> None:
    delayline.set_links(_link_delays(0.010, 0.025))
    before = delayline.stats()["links"]

    # Workers send only what changed; a quiet second call sees the same.
    assert delayline.stats()["links"] == before
    delayline.forget_links([(NS_B, "d2"), (NS_C, "d2")])
    links = delayline.stats()["links"]
    assert (NS_B, "d2") not in links and (NS_C, "d2") not in links
    assert links[(NS_B, "d1")]["delay_s"] == 0.010


@pytest.mark.root
def test_kernel_has_netem_agrees_with_kernel_config(chain: Chain) -> None:
    config = Path("/proc/config.gz")
    if not config.exists():
        pytest.skip("no /proc/config.gz to compare with")
    text = gzip.decompress(config.read_bytes()).decode()
    built_in = "CONFIG_NET_SCH_NETEM=y" in text
    modular = "CONFIG_NET_SCH_NETEM=m" in text
    if modular:
        pytest.skip("netem is a module; loading it depends on the machine")
    assert kernel_has_netem() is built_in
