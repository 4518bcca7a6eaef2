"""How fast and how precise the user-space delay line is.

Run as root from the repository root::

    .venv/bin/python benchmarks/bench_delayline.py            # everything
    .venv/bin/python benchmarks/bench_delayline.py rate jitter --duration-s 3

Sections (each builds its own ``smoe-b*`` namespaces and deletes them):

- ``attach``: attach time per namespace and worker memory for N namespaces;
- ``rate``: packets/s one and two workers forward when a UDP flood of
  small packets overloads them (two receiving namespaces, 10 ms delay);
- ``jitter``: one-way delay minus the configured delay, measured by the
  application (sender and receiver stamps on CLOCK_MONOTONIC), at a few
  packet rates, alone and next to a busy numpy process;
- ``scrape``: the same one-way error while stats() reads N namespaces;
- ``compare``: the same flood and a TCP transfer through the installed
  ``netfilterqueue`` binding (accept at once, no delay) versus our queue.

Senders and receivers are this script re-run with ``--role`` inside a
namespace, so they do not share a GIL with the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from topology.commands import run  # noqa: E402
from topology.delayline import DelayLine  # noqa: E402

SENDER = "smoe-bsend"
RECEIVERS = ("smoe-brx1", "smoe-brx2")
PORT = 9000
STAMP = struct.Struct("!q")


def _in(ns: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{ns}", "--"]


def _role(ns: str, *args: str) -> list[str]:
    return [*_in(ns), sys.executable, __file__, "--role", *args]


def _addresses(k: int) -> tuple[str, str]:
    return f"10.201.{k}.1", f"10.201.{k}.2"


def build_star() -> None:
    """SENDER with link d<k> to each receiver k (addresses 10.201.k.1/.2)."""
    teardown_star()
    for ns in (SENDER, *RECEIVERS):
        run(["ip", "netns", "add", ns])
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
    for k, rx in enumerate(RECEIVERS, start=1):
        ifname = f"d{k}"
        run(
            [
                "ip",
                "link",
                "add",
                ifname,
                "netns",
                SENDER,
                "type",
                "veth",
                "peer",
                ifname,
                "netns",
                rx,
            ]
        )
        near, far = _addresses(k)
        for ns, addr in ((SENDER, near), (rx, far)):
            run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", ifname])
            run(["ip", "-n", ns, "link", "set", ifname, "up"])


def teardown_star() -> None:
    for ns in (SENDER, *RECEIVERS):
        run(["ip", "netns", "del", ns], check=False)


# --- roles (run inside namespaces) ---------------------------------------


def role_sender(args: argparse.Namespace) -> None:
    """Send stamped UDP packets to each --dest in turn, paced or flat out."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dests = [(d, PORT) for d in args.dest]
    pad = b"\0" * max(0, args.size - STAMP.size)
    sent = 0
    start = time.monotonic()
    end = start + args.duration_s
    burst = 64 if args.rate_pps == 0 else max(1, int(args.rate_pps / 2000))
    while time.monotonic() < end:
        for _ in range(burst):
            sock.sendto(STAMP.pack(time.monotonic_ns()) + pad, dests[sent % len(dests)])
            sent += 1
        if args.rate_pps:
            pause = start + sent / args.rate_pps - time.monotonic()
            if pause > 0:
                time.sleep(pause)
    print(json.dumps({"sent": sent, "seconds": time.monotonic() - start}))


def role_receiver(args: argparse.Namespace) -> None:
    """Record one-way delay minus --delay-s of every packet; print quantiles."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind(("0.0.0.0", PORT))
    print("ready", flush=True)
    errors_ns = []
    target_ns = int(args.delay_s * 1e9)
    end = time.monotonic() + args.duration_s
    while time.monotonic() < end:
        if not select.select([sock], [], [], 0.1)[0]:
            continue
        data = sock.recv(2048)
        errors_ns.append(time.monotonic_ns() - STAMP.unpack_from(data)[0] - target_ns)
    errors_ns.sort()
    n = len(errors_ns)

    def q(f: float) -> float:
        return errors_ns[min(n - 1, int(f * n))] * 1e-6 if n else float("nan")

    print(
        json.dumps(
            {
                "received": n,
                "p50_ms": q(0.5),
                "p99_ms": q(0.99),
                "max_ms": q(1.0) if n else float("nan"),
            }
        )
    )


def role_nfq(args: argparse.Namespace) -> None:
    """A delay line on netfilterqueue: accept at once, or retain for --delay-s."""
    from collections import deque

    try:
        from netfilterqueue import COPY_META, COPY_PACKET, NetfilterQueue
    except ImportError:
        sys.exit(
            "the 'compare' benchmark needs the netfilterqueue binding: "
            "apt-get install libnetfilter-queue-dev && .venv/bin/pip install "
            "netfilterqueue==1.1.0"
        )

    count = 0
    held: deque[tuple[float, object]] = deque()

    def on_packet(packet: object) -> None:
        nonlocal count
        if args.delay_s:
            packet.retain()  # type: ignore[attr-defined]
            held.append((time.monotonic() + args.delay_s, packet))
        else:
            count += 1
            packet.accept()  # type: ignore[attr-defined]

    queue = NetfilterQueue()
    # retain() copies the payload, so holding packets needs COPY_PACKET.
    mode = COPY_PACKET if args.delay_s else COPY_META
    queue.bind(7000, on_packet, max_len=65536, mode=mode)
    sock = socket.fromfd(queue.get_fd(), socket.AF_NETLINK, socket.SOCK_RAW)
    sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
    print("ready", flush=True)
    end = time.monotonic() + args.duration_s
    while (now := time.monotonic()) < end:
        timeout = max(0.0, held[0][0] - now) if held else 0.1
        if select.select([sock], [], [], timeout)[0]:
            queue.run(block=False)
        now = time.monotonic()
        while held and held[0][0] <= now:
            held.popleft()[1].accept()  # type: ignore[attr-defined]
            count += 1
    queue.unbind()
    print(json.dumps({"accepted": count}))


# --- sections --------------------------------------------------------------


def section_attach(args: argparse.Namespace) -> None:
    names = [f"smoe-batt{i}" for i in range(args.namespaces)]
    n = len(names)
    for name in names:
        run(["ip", "netns", "del", name], check=False)
    t0 = time.monotonic()
    for name in names:
        run(["ip", "netns", "add", name])
    print(f"attach: {n} namespaces (creating them took {time.monotonic() - t0:.2f} s)")
    try:
        for many in (False, True):
            line = DelayLine()
            try:
                line.start()
                rss_idle = _rss_bytes(line.pids[0])
                t0 = time.monotonic()
                if many:
                    line.attach_many(names)
                else:
                    for name in names:
                        line.attach(name)
                attach_s = time.monotonic() - t0
                entries = [
                    (name, f"d{k}", 0.005, 0.0) for name in names for k in range(4)
                ]
                t0 = time.monotonic()
                line.set_links(entries)
                set_s = time.monotonic() - t0
                t0 = time.monotonic()
                line.stats()
                stats_s = time.monotonic() - t0
                rss_full = _rss_bytes(line.pids[0])
                fds = len(os.listdir(f"/proc/{line.pids[0]}/fd"))
                t0 = time.monotonic()
                line.stop()
                stop_s = time.monotonic() - t0
            finally:
                line.stop()
            how = "attach_many()" if many else "attach() each "
            print(
                f"  {how}: {attach_s / n * 1e3:6.2f} ms per namespace "
                f"({attach_s:.2f} s); stop {stop_s:.2f} s"
            )
        print(
            f"  set_links: {set_s * 1e3:.2f} ms for {len(entries)} links; "
            f"stats: {stats_s * 1e3:.2f} ms"
        )
        print(
            f"  worker RSS: {rss_idle / 2**20:.1f} MiB idle, "
            f"{rss_full / 2**20:.1f} MiB with {n} namespaces and {len(entries)} "
            f"links; {fds} open fds"
        )
    finally:
        for name in names:
            run(["ip", "netns", "del", name], check=False)


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _flood(
    receivers: tuple[str, ...], duration_s: float, rate_pps: int = 0, size: int = 64
) -> dict[str, float]:
    dests = [_addresses(RECEIVERS.index(rx) + 1)[1] for rx in receivers]
    out = run(
        _role(
            SENDER,
            "sender",
            "--duration-s",
            str(duration_s),
            "--rate-pps",
            str(rate_pps),
            "--size",
            str(size),
            "--dest",
            *dests,
        ),
        timeout_s=duration_s + 30,
    ).stdout
    return json.loads(out)


def _settled_stats(line: DelayLine) -> dict:
    """Stats once the worker has read and released everything queued."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = line.stats()
        queued = sum(
            ns.get("kernel_queue_total", 0) for ns in stats["namespaces"].values()
        )
        if not queued and not stats["totals"]["held_packets"]:
            break
        time.sleep(0.05)
    return stats


def _p99_bucket_ms(links: list[dict]) -> float:
    """Upper bound of the lateness bucket holding the 99th percentile."""
    bounds = [*links[0]["lateness_buckets_s"], float("inf")]
    counts = [
        sum(link["lateness_counts"][i] for link in links) for i in range(len(bounds))
    ]
    cumulative = 0
    for bound, count in zip(bounds, counts, strict=True):
        cumulative += count
        if cumulative >= 0.99 * sum(counts):
            return bound * 1e3
    return float("nan")


def section_rate(args: argparse.Namespace) -> None:
    print("rate: UDP (64-byte payload) into 2 namespaces, 10 ms delay; sender, workers")
    print("      and kernel share the 2 cores")
    build_star()
    try:
        for workers, priority in ((1, 10), (2, 10), (1, 0)):
            for rate_pps in (0, *args.rates):
                with DelayLine(workers=workers, realtime_priority=priority) as line:
                    for rx in RECEIVERS:
                        line.attach(rx)
                    line.set_links(
                        [(rx, f"d{k}", 0.010, 0.0) for k, rx in enumerate(RECEIVERS, 1)]
                    )
                    sent = _flood(RECEIVERS, args.duration_s, rate_pps)
                    stats = _settled_stats(line)
                totals = stats["totals"]
                cpu_s = sum(w["cpu_s"] for w in stats["workers"])
                lost = totals["kernel_queue_dropped"] + totals["kernel_user_dropped"]
                offered = sent["sent"] / sent["seconds"]
                forwarded = totals["released"] / sent["seconds"]
                sched = f"fifo:{priority}" if priority else "other  "
                print(
                    f"  workers={workers} {sched} {'paced' if rate_pps else 'flood'}: "
                    f"offered {offered:7.0f} pkt/s, forwarded {forwarded:7.0f} pkt/s, "
                    f"lost {lost / max(1, sent['sent']):5.1%}, lateness p99 <= "
                    f"{_p99_bucket_ms(list(stats['links'].values())):5.2f} ms, "
                    f"worker CPU {cpu_s / sent['seconds']:.2f} cores"
                )
    finally:
        teardown_star()


def _owd(
    line: DelayLine | None, rate_pps: int, duration_s: float, delay_s: float
) -> dict[str, float]:
    receiver = subprocess.Popen(
        _role(
            RECEIVERS[0],
            "receiver",
            "--duration-s",
            str(duration_s + 1),
            "--delay-s",
            str(delay_s),
        ),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert receiver.stdout is not None
    assert receiver.stdout.readline().strip() == "ready"
    _flood(RECEIVERS[:1], duration_s, rate_pps)
    result = json.loads(receiver.stdout.readline())
    receiver.wait()
    if line is not None:
        link = _settled_stats(line)["links"][(RECEIVERS[0], "d1")]
        result["line_p99_bucket_ms"] = _p99_bucket_ms([link])
        result["line_max_ms"] = link["max_lateness_s"] * 1e3
    return result


def _busy_numpy(duration_s: float) -> subprocess.Popen[bytes]:
    code = (
        "import numpy, time\n"
        "a = numpy.random.rand(400, 400)\n"
        f"end = time.monotonic() + {duration_s}\n"
        "while time.monotonic() < end:\n    a @ a\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", code], env=env)


def section_jitter(args: argparse.Namespace) -> None:
    print("jitter: one-way delay minus configured 10 ms, application timestamps")
    print(f"  load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    build_star()
    try:
        base = _owd(None, 1000, args.duration_s, 0.0)
        print(
            f"  no delay line, 1000 pkt/s: p50 {base['p50_ms']:.3f} ms "
            f"p99 {base['p99_ms']:.3f} ms (stack + Python floor)"
        )
        for priority, load in ((10, False), (10, True), (0, True)):
            for rate in args.jitter_rates:
                busy = _busy_numpy(args.duration_s + 2) if load else None
                try:
                    with DelayLine(realtime_priority=priority) as line:
                        line.attach(RECEIVERS[0])
                        line.set_links([(RECEIVERS[0], "d1", 0.010, 0.0)])
                        r = _owd(line, rate, args.duration_s, 0.010)
                finally:
                    if busy is not None:
                        busy.kill()
                        busy.wait()
                sched = f"fifo:{priority}" if priority else "other  "
                print(
                    f"  {sched} {'+numpy' if load else 'alone '} {rate:6d} pkt/s: "
                    f"error p50 {r['p50_ms']:6.3f} p99 {r['p99_ms']:7.3f} "
                    f"max {r['max_ms']:7.3f} ms (received {r['received']}); "
                    f"own lateness p99 <= {r['line_p99_bucket_ms']:.2f} "
                    f"max {r['line_max_ms']:.2f} ms"
                )
    finally:
        teardown_star()


def _scrape(line: DelayLine, stop: threading.Event, calls: list[float]) -> None:
    while not stop.is_set():
        t0 = time.monotonic()
        line.stats()
        calls.append(time.monotonic() - t0)
        stop.wait(0.2)


def section_scrape(args: argparse.Namespace) -> None:
    """Does a stats() of many namespaces stall the packets of one of them?"""
    names = [f"smoe-bscr{i}" for i in range(args.namespaces)]
    print(f"scrape: 10000 pkt/s through one namespace while {len(names)} more are")
    print("        attached (4 links each); stats() every 0.2 s or never")
    build_star()
    try:
        for name in names:
            run(["ip", "netns", "add", name], check=False)
        for scrape in (False, True):
            with DelayLine() as line:
                line.attach_many([RECEIVERS[0], *names])
                line.set_links(
                    [(RECEIVERS[0], "d1", 0.010, 0.0)]
                    + [(name, f"d{k}", 0.005, 0.0) for name in names for k in range(4)]
                )
                stop = threading.Event()
                calls: list[float] = []
                thread = threading.Thread(target=_scrape, args=(line, stop, calls))
                if scrape:
                    thread.start()
                try:
                    r = _owd(line, 10000, args.duration_s, 0.010)
                finally:
                    stop.set()
                    if scrape:
                        thread.join()
            took = (
                f", each took {1e3 * sum(calls) / len(calls):.1f} ms" if calls else ""
            )
            print(
                f"  stats() {'every 0.2 s' if scrape else 'never      '}: error p50 "
                f"{r['p50_ms']:.3f} p99 {r['p99_ms']:.3f} max {r['max_ms']:.3f} ms; "
                f"own lateness max {r['line_max_ms']:.2f} ms ({len(calls)} calls{took})"
            )
    finally:
        teardown_star()
        for name in names:
            run(["ip", "netns", "del", name], check=False)


def _iperf(ns_client: str, ns_server: str, server_addr: str, seconds: int) -> float:
    server = subprocess.Popen(
        [*_in(ns_server), "iperf3", "-s", "-1", "-B", server_addr],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)
        out = run(
            [*_in(ns_client), "iperf3", "-c", server_addr, "-t", str(seconds), "-J"],
            timeout_s=seconds + 30,
        ).stdout
    finally:
        server.kill()
        server.wait()
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"])


def _nfq_consumer(
    ns: str, seconds: float, delay_s: float = 0.0
) -> subprocess.Popen[str]:
    consumer = subprocess.Popen(
        _role(ns, "nfq", "--duration-s", str(seconds), "--delay-s", str(delay_s)),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert consumer.stdout is not None
    assert consumer.stdout.readline().strip() == "ready"
    return consumer


def _nfq_accepted(consumer: subprocess.Popen[str]) -> int:
    assert consumer.stdout is not None
    accepted = int(json.loads(consumer.stdout.readline())["accepted"])
    consumer.wait()
    return accepted


def section_compare(args: argparse.Namespace) -> None:
    print("compare: delay line on the netfilterqueue binding vs ours, 1 namespace")
    from topology.delayline import install_rule, remove_rule

    build_star()
    rx = RECEIVERS[0]
    addr = _addresses(1)[1]
    seconds = max(2, int(args.duration_s))
    try:
        install_rule(rx, queue_num=7000, ipv6=False)
        try:
            for delay_s in (0.0, 0.010):
                consumer = _nfq_consumer(rx, args.duration_s + 2, delay_s)
                sent = _flood((rx,), args.duration_s)
                udp_pps = _nfq_accepted(consumer) / sent["seconds"]
                consumer = _nfq_consumer(rx, seconds + 3, delay_s)
                tcp_bps = _iperf(SENDER, rx, addr, seconds)
                _nfq_accepted(consumer)
                print(
                    f"  netfilterqueue, delay {delay_s * 1e3:2.0f} ms: UDP flood "
                    f"forwarded {udp_pps:7.0f} pkt/s (offered "
                    f"{sent['sent'] / sent['seconds']:.0f}); "
                    f"TCP {tcp_bps / 1e9:.2f} Gbit/s"
                )
        finally:
            remove_rule(rx, queue_num=7000, ipv6=False)

        for delay_s in (0.0, 0.010):
            with DelayLine() as line:
                line.attach(rx)
                line.set_links([(rx, "d1", delay_s, 0.0)])
                sent = _flood((rx,), args.duration_s)
                released = _settled_stats(line)["totals"]["released"]
                tcp_bps = _iperf(SENDER, rx, addr, seconds)
            print(
                f"  ours,           delay {delay_s * 1e3:2.0f} ms: UDP flood "
                f"forwarded {released / sent['seconds']:7.0f} pkt/s (offered "
                f"{sent['sent'] / sent['seconds']:.0f}); "
                f"TCP {tcp_bps / 1e9:.2f} Gbit/s"
            )
        tcp_bps = _iperf(SENDER, rx, addr, seconds)
        print(f"  no queueing:    TCP {tcp_bps / 1e9:.2f} Gbit/s")
    finally:
        teardown_star()


SECTIONS = {
    "attach": section_attach,
    "rate": section_rate,
    "jitter": section_jitter,
    "scrape": section_scrape,
    "compare": section_compare,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*", help=f"any of {', '.join(SECTIONS)}")
    parser.add_argument("--duration-s", type=float, default=3.0)
    parser.add_argument("--namespaces", type=int, default=100)
    parser.add_argument(
        "--rates", type=int, nargs="*", default=[20000, 50000, 80000, 110000]
    )
    parser.add_argument("--role", choices=["sender", "receiver", "nfq"])
    parser.add_argument("--dest", nargs="*", default=[])
    parser.add_argument("--rate-pps", type=int, default=0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument(
        "--jitter-rates", type=int, nargs="*", default=[1000, 10000, 50000]
    )
    parser.add_argument("--delay-s", type=float, default=0.0)
    args = parser.parse_args()
    if args.role:
        # Measuring tools must not be the noise on a busy machine: run them
        # above the delay line's real-time priority.
        # The netfilterqueue consumer gets the delay line's own priority.
        priority = 10 if args.role == "nfq" else 20
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        {"sender": role_sender, "receiver": role_receiver, "nfq": role_nfq}[args.role](
            args
        )
        return
    if os.geteuid() != 0:
        sys.exit("bench_delayline.py needs root (namespaces, iptables)")
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(
            f"unknown sections {sorted(unknown)}; choose from {list(SECTIONS)}"
        )
    for name in args.sections or list(SECTIONS):
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
