"""The delay-line process: holds queued packets for their link's delay.

Started by :class:`topology.delayline.DelayLine` as
``python -m topology.delayline_worker`` (a fresh interpreter, so it
inherits neither the emulator's threads nor its numpy work). One
single-threaded ``epoll`` loop serves every attached namespace:

1. a packet message arrives on a namespace's NFQUEUE socket; its arrival
   time is the kernel's receive timestamp (we keep kernel timestamping
   switched on) or, failing that, the time we read it;
2. with probability ``loss_fraction`` it gets a drop verdict at once;
3. otherwise its release time is ``max(arrival + delay_s, previous release
   on the same link)``, so a delay change never reorders a link, and it
   waits in one heap ordered by (due time, arrival order). The due time is
   the release time less a lead the loop learns from how late its timer
   wakes (at most 0.5 ms), so packets leave on time on average rather
   than always late by the wake-up time; it never moves a packet before
   an earlier one of its link;
4. a ``timerfd`` (nanosecond deadline, unlike epoll's milliseconds) wakes
   the loop at the head's due time; all due packets get accept
   verdicts, sent as one ``send()`` per namespace.

The parent talks over a ``multiprocessing`` connection on an inherited
socket. When it closes (the parent died) or our parent pid changes, the
worker accepts what it holds, removes its iptables rules and exits, so a
crashed emulator leaves neither this process nor rules that black-hole
traffic. ``PR_SET_PDEATHSIG`` is not used: it fires when the *thread* that
started us exits, which would kill the delay line under a thread pool.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import ctypes
import gc
import heapq
import itertools
import logging
import os
import random
import resource
import select
import signal
import socket
import sys
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

from topology.errors import EmulationError
from topology.nfqueue import (
    NF_ACCEPT,
    NF_DROP,
    QueueSocket,
    in_namespace,
    open_namespace,
)

log = logging.getLogger(__name__)

# The learnt lead (see Worker.heap) follows wake-up lateness with this gain
# and never exceeds this bound, so a stalled loop cannot teach it to let
# packets go early by more than a fraction of a millisecond.
LEAD_GAIN = 0.05
LEAD_MAX_S = 0.0005

# Upper bounds of the lateness histogram (seconds); the last bucket is +Inf.
LATENESS_BUCKETS_S = (50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 0.1)

# A kernel timestamp further than this from our clock is not trusted.
_TIMESTAMP_WINDOW_S = 1.0

_PARENT_CHECK_S = 1.0
_MESSAGES_PER_READ = 64

_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC
_TFD_TIMER_ABSTIME = 1
_PR_SET_TIMERSLACK = 29
_SO_TIMESTAMPNS = 35
_SO_SNDBUFFORCE = 32

_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class TimerFd:
    """A CLOCK_MONOTONIC timerfd armed at absolute deadlines (nanoseconds)."""

    def __init__(self) -> None:
        fd = _libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if fd < 0:
            raise EmulationError(f"timerfd_create: {os.strerror(ctypes.get_errno())}")
        self.fd = fd
        self.deadline_s = 0.0
        self._spec = _Itimerspec()

    def arm(self, deadline_s: float) -> None:
        """Fire at `deadline_s` (time.monotonic seconds); 0 disarms."""
        if deadline_s == self.deadline_s:
            return
        self.deadline_s = deadline_s
        seconds = int(deadline_s)
        nanoseconds = int((deadline_s - seconds) * 1e9)
        if deadline_s and not (seconds or nanoseconds):
            nanoseconds = 1
        self._spec.it_value.tv_sec = seconds
        self._spec.it_value.tv_nsec = nanoseconds
        _libc.timerfd_settime(
            self.fd, _TFD_TIMER_ABSTIME, ctypes.byref(self._spec), None
        )

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 8)
        self.deadline_s = 0.0


class Link:
    """Settings and counters of one (namespace, input interface)."""

    __slots__ = (
        "namespace",
        "ifname",
        "configured",
        "delay_s",
        "loss_fraction",
        "last_release_s",
        "last_due_s",
        "held",
        "packets",
        "bytes",
        "drops",
        "released",
        "lateness_sum_s",
        "lateness_max_s",
        "lateness_counts",
        "sent",
    )

    def __init__(self, namespace: str, ifname: str) -> None:
        self.namespace = namespace
        self.ifname = ifname
        self.configured = False
        self.delay_s = 0.0
        self.loss_fraction = 0.0
        self.last_release_s = 0.0
        self.last_due_s = 0.0
        self.held = 0
        self.packets = 0
        self.bytes = 0
        self.drops = 0
        self.released = 0
        self.lateness_sum_s = 0.0
        self.lateness_max_s = 0.0
        self.lateness_counts = [0] * (len(LATENESS_BUCKETS_S) + 1)
        self.sent: tuple[Any, ...] | None = None

    def counters(self) -> tuple[Any, ...]:
        """The values of LINK_FIELDS (tuples pickle twice as fast as dicts)."""
        return (
            self.configured,
            self.delay_s,
            self.loss_fraction,
            self.packets,
            self.bytes,
            self.drops,
            self.released,
            self.lateness_sum_s,
            self.lateness_max_s,
            tuple(self.lateness_counts),
        )


# What Link.counters() returns, in order.
LINK_FIELDS = (
    "configured",
    "delay_s",
    "loss_fraction",
    "packets",
    "bytes",
    "drops",
    "released",
    "lateness_sum_s",
    "max_lateness_s",
    "lateness_counts",
)

# What Namespace.counters() returns, in order.
NAMESPACE_FIELDS = (
    "held_packets",
    "verdict_errors",
    "kernel_queue_total",
    "kernel_queue_dropped",
    "kernel_user_dropped",
)

# stats() walks this many namespaces per loop pass, serving packets between
# passes, so a scrape of a thousand namespaces does not stall the delay.
_STATS_NAMESPACES_PER_STEP = 32


class Namespace:
    """One attached namespace: its queue socket and its links."""

    def __init__(
        self, name: str, path: str, queue: QueueSocket, ns_fd: int, proc_fd: int
    ) -> None:
        self.name = name
        self.path = path
        self.queue = queue
        self.ns_fd = ns_fd
        self.proc_fd = proc_fd
        self.links_by_name: dict[str, Link] = {}
        self.links_by_index: dict[int, Link] = {}
        self.held = 0
        self.closed = False
        self.sent: tuple[int, ...] | None = None

    def counters(self) -> tuple[int, ...]:
        """The values of NAMESPACE_FIELDS.

        The kernel's counters come from /proc/net/netfilter/nfnetlink_queue,
        opened inside the namespace so it shows that namespace's queues:
        queue_dropped counts packets lost because the queue held `maxlen`
        packets, user_dropped those lost because our socket buffer was
        full; -1 where the row is missing.
        """
        text = os.pread(self.proc_fd, 65536, 0).decode()
        kernel = (-1, -1, -1)
        for line in text.splitlines():
            fields = line.split()
            if fields and int(fields[0]) == self.queue.queue_num:
                kernel = (int(fields[2]), int(fields[5]), int(fields[6]))
        return (self.held, self.queue.verdict_errors, *kernel)

    def link(self, ifname: str) -> Link:
        link = self.links_by_name.get(ifname)
        if link is None:
            link = self.links_by_name[ifname] = Link(self.name, ifname)
        return link


class Worker:
    """The event loop; see the module docstring."""

    def __init__(
        self,
        control: Connection,
        *,
        parent_pid: int,
        seed: int,
        queue_num: int,
        maxlen: int,
        rcvbuf_bytes: int,
        iface_prefix: str,
        ipv6: bool,
    ) -> None:
        self.control = control
        self.parent_pid = parent_pid
        self.random = random.Random(seed).random
        self.queue_num = queue_num
        self.maxlen = maxlen
        self.rcvbuf_bytes = rcvbuf_bytes
        self.iface_prefix = iface_prefix
        self.ipv6 = ipv6
        self.namespaces: dict[str, Namespace] = {}
        self.by_fd: dict[int, Namespace] = {}
        # (due, order, namespace, packet id, link, intended release): a
        # packet is let go `lead_s` before its intended release, where
        # lead_s is how late the loop wakes, learnt as it runs, so that
        # packets leave on time on average instead of always a little late.
        self.heap: list[tuple[float, int, Namespace, int, Link, float]] = []
        self.lead_s = 0.0
        self.sequence = itertools.count()
        self.dirty: set[Namespace] = set()
        self.buffer = bytearray(256 * 1024)
        self.view = memoryview(self.buffer)
        self.timer = TimerFd()
        self.epoll = select.epoll()
        self.stop_requested = False
        self.parent_gone = False
        self.stopped_by_parent = False
        self.timestamps_kernel = 0
        self.timestamps_local = 0
        self.scheduler = "other"
        self.stats_job: Iterator[None] | None = None

        # Kernel receive timestamps are only taken while some socket asks
        # for them; this one does, for every namespace (the switch is global).
        self._stamp_socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._stamp_socket.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)

        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        signal.set_wakeup_fd(self._wake_write.fileno())
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, signal.SIG_IGN)

        self.epoll.register(control.fileno(), select.EPOLLIN)
        self.epoll.register(self.timer.fd, select.EPOLLIN)
        self.epoll.register(self._wake_read.fileno(), select.EPOLLIN)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stop_requested = True

    # --- commands from the parent -------------------------------------

    def attach_all(self, names: list[tuple[str, str]]) -> None:
        """Attach each (name, netns path), or none of them if one fails."""
        done = []
        try:
            for name, path in names:
                if name not in self.namespaces:
                    self.attach(name, path)
                    done.append(name)
        except BaseException:
            for name in done:
                self.detach(name)
            raise

    def attach(self, name: str, path: str) -> None:
        if (
            len(self.namespaces) * 3 + 32
            > resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        ):
            raise EmulationError(
                f"cannot attach {name!r}: {len(self.namespaces)} namespaces use "
                "3 descriptors each and the open-file limit is reached; raise the "
                "hard limit (ulimit -Hn) or use more workers"
            )
        ns_fd = open_namespace(path)
        try:
            with in_namespace(ns_fd):
                queue = QueueSocket(
                    self.queue_num, maxlen=self.maxlen, rcvbuf_bytes=self.rcvbuf_bytes
                )
                proc_fd = os.open(
                    "/proc/thread-self/net/netfilter/nfnetlink_queue",
                    os.O_RDONLY | os.O_CLOEXEC,
                )
        except BaseException:
            os.close(ns_fd)
            raise
        namespace = Namespace(name, path, queue, ns_fd, proc_fd)
        self.namespaces[name] = namespace
        self.by_fd[queue.fileno()] = namespace
        self.epoll.register(queue.fileno(), select.EPOLLIN)

    def detach(self, name: str) -> None:
        """Let go of a namespace: held packets are accepted now, not dropped."""
        namespace = self.namespaces.pop(name, None)
        if namespace is None:
            return
        self.epoll.unregister(namespace.queue.fileno())
        del self.by_fd[namespace.queue.fileno()]
        self._accept_held(lambda ns: ns is namespace)
        namespace.closed = True
        namespace.queue.close()
        os.close(namespace.proc_fd)
        os.close(namespace.ns_fd)
        self.dirty.discard(namespace)

    def set_links(self, entries: list[tuple[str, str, float, float]]) -> None:
        missing = []
        for name, ifname, delay_s, loss_fraction in entries:
            namespace = self.namespaces.get(name)
            if namespace is None:
                missing.append(name)
                continue
            link = namespace.link(ifname)
            link.configured = True
            link.delay_s = delay_s
            link.loss_fraction = loss_fraction
        if missing:
            raise EmulationError(
                f"set_links: namespaces {sorted(set(missing))} are not attached to "
                "this delay line; call attach() first"
            )

    def forget_links(self, pairs: list[tuple[str, str]]) -> None:
        for name, ifname in pairs:
            namespace = self.namespaces.get(name)
            if namespace is None:
                continue
            link = namespace.links_by_name.pop(ifname, None)
            if link is not None:
                stale = [i for i, x in namespace.links_by_index.items() if x is link]
                for index in stale:
                    del namespace.links_by_index[index]

    def _stats_steps(self) -> Iterator[None]:
        """Build the stats reply a few namespaces at a time (see run).

        Only counters that changed since the last reply are sent; the
        parent keeps the rest, so scraping idle namespaces costs little.
        """
        links = {}
        namespaces = {}
        for count, namespace in enumerate(list(self.namespaces.values()), start=1):
            if namespace.closed:
                continue
            for ifname, link in namespace.links_by_name.items():
                counters = link.counters()
                if counters != link.sent:
                    link.sent = counters
                    links[(namespace.name, ifname)] = counters
            counters = namespace.counters()
            if counters != namespace.sent:
                namespace.sent = counters
                namespaces[namespace.name] = counters
            if count % _STATS_NAMESPACES_PER_STEP == 0:
                yield
        usage = resource.getrusage(resource.RUSAGE_SELF)
        worker = {
            "pid": os.getpid(),
            "scheduler": self.scheduler,
            "held_packets": len(self.heap),
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "max_rss_bytes": usage.ru_maxrss * 1024,
            "timestamps_kernel": self.timestamps_kernel,
            "timestamps_local": self.timestamps_local,
        }
        self.control.send(
            ("ok", {"links": links, "namespaces": namespaces, "worker": worker})
        )

    def _command(self) -> None:
        try:
            request = self.control.recv()
        except (EOFError, OSError):
            self.parent_gone = True
            return
        kind, args = request[0], request[1:]
        result: Any = None
        try:
            if kind == "attach":
                self.attach_all(*args)
            elif kind == "detach":
                self.detach(*args)
            elif kind == "set":
                self.set_links(*args)
            elif kind == "forget":
                self.forget_links(*args)
            elif kind == "stats":
                # Answered by run(), step by step.
                self.stats_job = self._stats_steps()
                return
            elif kind == "stop":
                self.stop_requested = self.stopped_by_parent = True
                return
            else:
                raise EmulationError(f"unknown delay-line command {kind!r}")
        except Exception as exc:  # reported to the parent, which raises it
            self.control.send(("error", f"{type(exc).__name__}: {exc}"))
            return
        self.control.send(("ok", result))

    # --- packets ------------------------------------------------------

    def _resolve(self, namespace: Namespace, ifindex: int) -> Link:
        """Map an input ifindex to its link by looking up the name once."""
        try:
            with in_namespace(namespace.ns_fd):
                ifname = socket.if_indextoname(ifindex)
        except OSError:
            ifname = f"ifindex{ifindex}"
        link = namespace.link(ifname)
        namespace.links_by_index[ifindex] = link
        return link

    def _receive(self, namespace: Namespace, real_offset_s: float) -> None:
        packets = namespace.queue.receive(self.buffer, self.view, _MESSAGES_PER_READ)
        if not packets:
            return
        # Every packet read so far arrived before this instant.
        now = time.monotonic()
        self.dirty.add(namespace)
        links = namespace.links_by_index
        verdict = namespace.queue.batch.add
        heap = self.heap
        for packet_id, ifindex, length, stamp_ns in packets:
            link = links.get(ifindex) or self._resolve(namespace, ifindex)
            link.packets += 1
            link.bytes += length

            # Kernel stamps are CLOCK_REALTIME, or CLOCK_MONOTONIC when a
            # sender's delivery time survived the veth crossing.
            arrival = now
            stamp_s = stamp_ns * 1e-9
            if stamp_s and abs(stamp_s - real_offset_s - now) < _TIMESTAMP_WINDOW_S:
                arrival = min(stamp_s - real_offset_s, now)
                self.timestamps_kernel += 1
            elif stamp_s and abs(stamp_s - now) < _TIMESTAMP_WINDOW_S:
                arrival = min(stamp_s, now)
                self.timestamps_kernel += 1
            else:
                self.timestamps_local += 1

            if link.loss_fraction and self.random() < link.loss_fraction:
                link.drops += 1
                verdict(packet_id, NF_DROP)
                continue

            release = arrival + link.delay_s
            if release < link.last_release_s:
                release = link.last_release_s
            link.last_release_s = release
            # Never before an earlier packet of the same link: no reordering
            # while the lead moves.
            due = max(release - self.lead_s, link.last_due_s)
            link.last_due_s = due
            # A due packet may pass the heap only if none of its link's
            # packets wait there (a late loop leaves due ones behind).
            if due <= now and not link.held:
                self._record(link, now - release)
                verdict(packet_id, NF_ACCEPT)
            else:
                heapq.heappush(
                    heap,
                    (due, next(self.sequence), namespace, packet_id, link, release),
                )
                namespace.held += 1
                link.held += 1

    @staticmethod
    def _record(link: Link, lateness_s: float) -> None:
        link.released += 1
        link.lateness_sum_s += lateness_s
        if lateness_s > link.lateness_max_s:
            link.lateness_max_s = lateness_s
        link.lateness_counts[bisect.bisect_left(LATENESS_BUCKETS_S, lateness_s)] += 1

    def _release_due(self, now: float) -> None:
        heap = self.heap
        dirty = self.dirty
        record = self._record
        woke = False
        while heap and heap[0][0] <= now:
            due, _, namespace, packet_id, link, release = heapq.heappop(heap)
            if not woke:
                # How late this wake-up came for the packet it was armed for.
                woke = True
                late_s = min(max(now - due, 0.0), LEAD_MAX_S)
                self.lead_s += LEAD_GAIN * (late_s - self.lead_s)
            if namespace.closed:
                continue
            namespace.held -= 1
            link.held -= 1
            namespace.queue.batch.add(packet_id, NF_ACCEPT)
            dirty.add(namespace)
            record(link, now - release)

    def _accept_held(self, which: Any) -> None:
        """Accept every held packet of the namespaces `which` selects."""
        keep = []
        # In release order, so that letting go early does not reorder.
        for entry in sorted(self.heap):
            namespace = entry[2]
            if which(namespace) and not namespace.closed:
                namespace.queue.verdict(entry[3], NF_ACCEPT)
                namespace.held -= 1
                entry[4].held -= 1
                self.dirty.add(namespace)
            else:
                keep.append(entry)
        heapq.heapify(keep)
        self.heap = keep
        self._flush()

    def _flush(self) -> None:
        for namespace in self.dirty:
            try:
                namespace.queue.flush()
            except OSError as exc:
                log.warning("verdicts to namespace %s failed: %s", namespace.name, exc)
        self.dirty.clear()

    # --- loop ---------------------------------------------------------

    def run(self) -> None:
        poll = self.epoll.poll
        control_fd = self.control.fileno()
        timer_fd = self.timer.fd
        wake_fd = self._wake_read.fileno()
        by_fd = self.by_fd
        monotonic = time.monotonic
        next_parent_check = monotonic() + _PARENT_CHECK_S
        while not (self.stop_requested or self.parent_gone):
            events = poll(0.0 if self.stats_job else _PARENT_CHECK_S)
            now = monotonic()
            real_offset_s = time.time() - now
            for fd, _ in events:
                namespace = by_fd.get(fd)
                if namespace is not None:
                    self._receive(namespace, real_offset_s)
                elif fd == timer_fd:
                    self.timer.drain()
                elif fd == control_fd and self.stats_job is None:
                    self._command()
                elif fd == wake_fd:
                    with contextlib.suppress(BlockingIOError):
                        self._wake_read.recv(64)
            self._release_due(monotonic())
            if self.dirty:
                self._flush()
            self.timer.arm(self.heap[0][0] if self.heap else 0.0)
            if self.stats_job is not None:
                if next(self.stats_job, StopIteration) is StopIteration:
                    self.stats_job = None
            if now >= next_parent_check:
                next_parent_check = now + _PARENT_CHECK_S
                if os.getppid() != self.parent_pid:
                    self.parent_gone = True

    def shutdown(self, *, remove_rules: bool) -> None:
        """Accept what we hold and close; remove our rules if asked.

        On a parent's stop the parent removes the rules; when the parent is
        gone or SIGTERM came, nobody else will, and a rule without a
        listener drops every data-plane packet, so we remove them here.
        """
        self._accept_held(lambda ns: True)
        paths = {name: ns.path for name, ns in self.namespaces.items()}
        for name in paths:
            self.detach(name)
        if remove_rules and paths:
            from topology.delayline import remove_rules as remove

            failures = remove(
                [p for p in paths.values() if os.path.exists(p)],
                queue_num=self.queue_num,
                iface_prefix=self.iface_prefix,
                ipv6=self.ipv6,
            )
            for name, exc in failures.items():
                log.warning("could not remove delay-line rule in %s: %s", name, exc)


def _set_realtime(priority: int) -> str:
    """Run under SCHED_FIFO at `priority` (0: stay SCHED_OTHER).

    On a loaded machine a normal-priority process waits milliseconds for
    a CPU after its timer fires (measured: p99 3 ms under SCHED_OTHER,
    83 us under SCHED_FIFO). The kernel's RT throttling
    (sched_rt_runtime_us, 95% by default) keeps a flooded worker from
    starving everything else; children (iptables at exit) start as
    SCHED_OTHER.
    """
    if priority <= 0:
        return "other"
    try:
        os.sched_setscheduler(
            0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(priority)
        )
    except OSError as exc:
        log.warning(
            "could not switch to SCHED_FIFO %d (%s); delays will jitter more "
            "on a busy machine",
            priority,
            exc,
        )
        return "other"
    return f"fifo:{priority}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--queue-num", type=int, required=True)
    parser.add_argument("--maxlen", type=int, required=True)
    parser.add_argument("--rcvbuf-bytes", type=int, required=True)
    parser.add_argument("--iface-prefix", required=True)
    parser.add_argument("--ipv6", action="store_true")
    parser.add_argument("--nice", type=int, default=0)
    parser.add_argument("--realtime-priority", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="delayline[%(process)d] %(levelname)s %(message)s"
    )

    # A thousand namespaces need a few thousand descriptors.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # Default timer slack (50 us) would be added to every release.
    _libc.prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)
    if args.nice:
        os.nice(args.nice)
    scheduler = _set_realtime(args.realtime_priority)

    # A stats reply for a thousand namespaces is hundreds of KiB; a socket
    # buffer that holds it whole means send() never waits for the parent.
    with socket.socket(fileno=os.dup(args.control_fd)) as control_socket:
        control_socket.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, 16 << 20)
    control = Connection(args.control_fd)
    worker = Worker(
        control,
        parent_pid=args.parent_pid,
        seed=args.seed,
        queue_num=args.queue_num,
        maxlen=args.maxlen,
        rcvbuf_bytes=args.rcvbuf_bytes,
        iface_prefix=args.iface_prefix,
        ipv6=args.ipv6,
    )
    worker.scheduler = scheduler

    # Few objects live long here; freezing them keeps the collector's
    # full passes (which would pause releases) short.
    gc.collect()
    gc.freeze()
    control.send(("ready", os.getpid()))
    try:
        worker.run()
    except Exception:
        # Fail closed: the rules stay, so data-plane traffic in our
        # namespaces stops (visibly) instead of flowing undelayed; the
        # parent sees alive() false and its stop() removes them.
        log.exception("delay-line worker failed; its NFQUEUE rules stay in place")
        worker.shutdown(remove_rules=False)
        return 1
    worker.shutdown(remove_rules=not worker.stopped_by_parent)
    if not worker.parent_gone:
        with contextlib.suppress(OSError):
            control.send(("ok", None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
