"""Link delay and loss in user space, for kernels without sch_netem.

On a kernel with ``sch_netem`` delay and loss are netem's job
(:mod:`topology.shaping`). This kernel has neither netem nor fq, so a
separate process holds packets instead:

- every namespace we attach gets one iptables rule,
  ``-t raw -A PREROUTING -i d+ -m comment --comment smoe-delayline -j NFQUEUE
  --queue-num 7000``: packets *arriving* on a data-plane interface are
  queued to user space. Queueing at the receiver, not at the sender's
  egress, matters: queueing on egress throttled TCP to about 2 Mbit/s;
  rate limiting (tbf/htb) stays on the sender's egress;
- the delay line (:mod:`topology.delayline_worker`, a separate process so
  the emulator's numpy work adds no jitter) opens one NFQUEUE netlink
  socket inside each namespace and gives each packet back after the delay
  of its (namespace, input interface), or drops it with that link's loss
  probability.

Interface naming is the contract with the namespace builder: data-plane
interfaces start with :data:`topology.addressing.DATA_IFNAME_PREFIX`
(``d`` + link id, at most 15 characters); anything else, the management
interface ``mgmt0`` and ``lo`` included, is not delayed.

No ``--queue-bypass``: if a worker crashes, its rules stay and the
data-plane packets of its namespaces are dropped rather than silently
passing undelayed; :meth:`DelayLine.alive` reports it and
:meth:`DelayLine.stop` removes the rules. When the parent dies (or on
SIGTERM) the worker removes its rules itself and exits.
:func:`cleanup_namespace_rules` removes leftovers by their comment;
deleting a namespace removes its rules with it, but our open socket keeps
a deleted namespace (and its veths) alive until detach() or stop().

Workers run under SCHED_FIFO (priority 10 by default): under load a
normal-priority worker added milliseconds of delay (see
``benchmarks/bench_delayline.py``).

The rule is installed with ``iptables-restore`` (one fork per namespace
and address family, at attach time only): nftables' native ``queue``
expression is not built into this kernel (``CONFIG_NFT_QUEUE`` is off),
and iptables-nft reaches the xtables NFQUEUE target through nft_compat.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from topology.addressing import DATA_IFNAME_PREFIX
from topology.commands import run
from topology.delayline_worker import LATENESS_BUCKETS_S, LINK_FIELDS, NAMESPACE_FIELDS
from topology.errors import CommandError, ConfigError, EmulationError
from topology.nfqueue import netns_path as _netns_path
from topology.rundir import PREFIX

log = logging.getLogger(__name__)

RULE_COMMENT = f"{PREFIX}-delayline"
DEFAULT_QUEUE_NUM = 7000

# Held packets count against each namespace's queue length; 65536 covers
# 1 Gbit/s of 1500-byte packets for 0.75 s (GSO packets hold up to 64 KiB).
DEFAULT_MAXLEN = 65536
DEFAULT_RCVBUF_BYTES = 8 * 1024 * 1024
MAX_DELAY_S = 10.0
IFNAMSIZ = 16

_IPTABLES = {
    4: ("iptables-restore", "iptables-save"),
    6: ("ip6tables-restore", "ip6tables-save"),
}


def _families(ipv6: bool) -> tuple[int, ...]:
    return (4, 6) if ipv6 else (4,)


def _nsenter(namespace: str | Path) -> list[str]:
    return ["nsenter", f"--net={_netns_path(namespace)}", "--"]


def _rule_line(action: str, queue_num: int, iface_prefix: str) -> str:
    return (
        f"{action} PREROUTING -i {iface_prefix}+ -m comment --comment {RULE_COMMENT} "
        f"-j NFQUEUE --queue-num {queue_num}"
    )


def _rule_jobs(
    namespaces: Iterable[str | Path],
    action: str,
    queue_num: int,
    iface_prefix: str,
    ipv6: bool,
) -> list[tuple[str, list[str], str]]:
    text = f"*raw\n{_rule_line(action, queue_num, iface_prefix)}\nCOMMIT\n"
    return [
        (
            str(namespace),
            [*_nsenter(namespace), _IPTABLES[family][0], "--noflush"],
            text,
        )
        for namespace in namespaces
        for family in _families(ipv6)
    ]


def _run_jobs(
    jobs: Sequence[tuple[str, list[str], str]], parallel: int = 8
) -> dict[str, CommandError]:
    """Run (namespace, argv, stdin) jobs, `parallel` at a time.

    Returns the first failure of each namespace that had one.
    """
    failures: dict[str, CommandError] = {}
    pending = list(jobs)
    pending.reverse()
    running: list[tuple[str, list[str], subprocess.Popen[str]]] = []
    while pending or running:
        while pending and len(running) < parallel:
            namespace, argv, text = pending.pop()
            log.debug("run %s", " ".join(argv))
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert proc.stdin is not None and proc.stderr is not None
            # A few hundred bytes: fits the pipe, so this cannot block.
            proc.stdin.write(text)
            proc.stdin.close()
            running.append((namespace, argv, proc))
        namespace, argv, proc = running.pop(0)
        assert proc.stderr is not None
        stderr = proc.stderr.read()
        proc.stderr.close()
        if proc.wait() != 0:
            failures.setdefault(namespace, CommandError(argv, proc.returncode, stderr))
    return failures


def install_rules(
    namespaces: Iterable[str | Path],
    *,
    queue_num: int,
    iface_prefix: str = DATA_IFNAME_PREFIX,
    ipv6: bool,
) -> dict[str, CommandError]:
    """Queue packets arriving on data-plane interfaces of each namespace.

    One ``iptables-restore`` per namespace and family, several at once.
    Returns the failures by namespace (empty when all went in).
    """
    return _run_jobs(_rule_jobs(namespaces, "-A", queue_num, iface_prefix, ipv6))


def remove_rules(
    namespaces: Iterable[str | Path],
    *,
    queue_num: int,
    iface_prefix: str = DATA_IFNAME_PREFIX,
    ipv6: bool,
) -> dict[str, CommandError]:
    """Remove what :func:`install_rules` added; returns failures by namespace."""
    return _run_jobs(_rule_jobs(namespaces, "-D", queue_num, iface_prefix, ipv6))


def install_rule(
    namespace: str | Path,
    *,
    queue_num: int,
    iface_prefix: str = DATA_IFNAME_PREFIX,
    ipv6: bool,
) -> None:
    """:func:`install_rules` for one namespace; raises its CommandError."""
    failures = install_rules(
        [namespace], queue_num=queue_num, iface_prefix=iface_prefix, ipv6=ipv6
    )
    if failures:
        raise failures[str(namespace)]


def remove_rule(
    namespace: str | Path,
    *,
    queue_num: int,
    iface_prefix: str = DATA_IFNAME_PREFIX,
    ipv6: bool,
) -> None:
    """:func:`remove_rules` for one namespace; raises its CommandError."""
    failures = remove_rules(
        [namespace], queue_num=queue_num, iface_prefix=iface_prefix, ipv6=ipv6
    )
    if failures:
        raise failures[str(namespace)]


def cleanup_namespace_rules(namespace: str | Path) -> int:
    """Remove every delay-line rule in `namespace`, found by its comment.

    For leftovers of a crashed run (``spacemoe clean``); returns how many
    rules were removed. A namespace that no longer exists has none.
    """
    if not _netns_path(namespace).exists():
        return 0
    removed = 0
    for family in (4, 6):
        restore, save = _IPTABLES[family]
        listing = run([*_nsenter(namespace), save, "-t", "raw"]).stdout
        marker = f"--comment {RULE_COMMENT} "
        doomed = [
            "-D" + line[2:]
            for line in listing.splitlines()
            if line.startswith("-A ") and marker in line + " "
        ]
        if doomed:
            text = "*raw\n" + "\n".join(doomed) + "\nCOMMIT\n"
            run([*_nsenter(namespace), restore, "--noflush"], input_text=text)
            removed += len(doomed)
    if removed:
        log.info("removed %d leftover delay-line rules in %s", removed, namespace)
    return removed


def kernel_has_netem() -> bool:
    """Whether this kernel runs the netem qdisc.

    Probe, not guess: create a scratch namespace, ask the kernel (over
    rtnetlink, via pyroute2) for a netem qdisc on its ``lo``, and delete
    the namespace. ENOENT means the qdisc kind is unknown (not built in,
    and no module to load). Needs root.
    """
    from pyroute2 import NetNS
    from pyroute2.netlink.exceptions import NetlinkError

    if os.geteuid() != 0:
        raise EmulationError(
            "kernel_has_netem() needs root to create a scratch namespace"
        )
    name = f"{PREFIX}-netemprobe-{os.getpid()}"
    run(["ip", "netns", "add", name])
    try:
        with NetNS(name) as ipr:
            index = ipr.link_lookup(ifname="lo")[0]
            ipr.link("set", index=index, state="up")
            try:
                ipr.tc("add", "netem", index, delay=1000)
            except NetlinkError as exc:
                if exc.code in (errno.ENOENT, errno.EOPNOTSUPP):
                    return False
                raise EmulationError(f"netem probe failed unexpectedly: {exc}") from exc
            return True
    finally:
        run(["ip", "netns", "del", name])


class _WorkerHandle:
    """Parent-side end of one worker process."""

    def __init__(self, index: int, argv: list[str], reply_timeout_s: float) -> None:
        self.index = index
        self.reply_timeout_s = reply_timeout_s
        self.namespaces: set[str] = set()
        self.lock = threading.Lock()

        # The latest counters the worker reported, by link and namespace.
        self.links: dict[tuple[str, str], dict[str, Any]] = {}
        self.counters: dict[str, dict[str, Any]] = {}
        parent_sock, child_sock = socket.socketpair()
        child_fd = child_sock.fileno()
        package_root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, env.get("PYTHONPATH")) if p
        )
        try:
            self.proc = subprocess.Popen(
                [*argv, "--control-fd", str(child_fd)],
                pass_fds=(child_fd,),
                stdin=subprocess.DEVNULL,
                # Own session: a terminal's Ctrl-C goes to the emulator,
                # which then stops us in order.
                start_new_session=True,
                env=env,
            )
        finally:
            child_sock.close()
        self.conn = Connection(parent_sock.detach())
        try:
            kind, self.pid = self._receive("starting")
        except BaseException:
            self.kill()
            raise
        if kind != "ready":
            self.kill()
            raise EmulationError(f"delay-line worker sent {kind!r} instead of 'ready'")

    def _receive(self, what: str) -> Any:
        if not self.conn.poll(self.reply_timeout_s):
            raise EmulationError(
                f"delay-line worker {self.proc.pid} did not answer {what!r} within "
                f"{self.reply_timeout_s} s"
            )
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            code = self.proc.poll()
            raise EmulationError(
                f"delay-line worker {self.proc.pid} exited (code {code}) during "
                f"{what!r}; its error is on stderr"
            ) from None

    def request(self, *message: Any) -> Any:
        with self.lock:
            try:
                self.conn.send(message)
            except OSError as exc:
                raise EmulationError(
                    f"delay-line worker {self.proc.pid} is gone ({exc}); "
                    f"exit code {self.proc.poll()}"
                ) from None
            kind, result = self._receive(message[0])
        if kind == "error":
            raise EmulationError(f"delay line: {result}")
        return result

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            try:
                self.request("stop")
            except EmulationError as exc:
                log.warning("%s", exc)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning(
                    "delay-line worker %s ignored stop; killing it", self.proc.pid
                )
                self.kill()
        self.conn.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


class DelayLine:
    """Delay and loss per (namespace, input interface), in one or K processes.

    Workers split the namespaces between them (each namespace is served by
    one worker, so a link's packets stay in order). `seed` makes the loss
    decisions repeatable for the same packet arrival order. Workers run
    under SCHED_FIFO at `realtime_priority` (0: normal scheduling, then
    `nice` applies): on a busy machine that is the difference between
    tens of microseconds and milliseconds of added delay.
    """

    def __init__(
        self,
        workers: int = 1,
        *,
        seed: int = 0,
        queue_num: int = DEFAULT_QUEUE_NUM,
        iface_prefix: str = DATA_IFNAME_PREFIX,
        ipv6: bool = True,
        maxlen: int = DEFAULT_MAXLEN,
        realtime_priority: int = 10,
        nice: int = 0,
        reply_timeout_s: float = 30.0,
    ) -> None:
        if not 1 <= workers <= 64:
            raise ConfigError(f"DelayLine workers={workers!r}: expected 1..64")
        if not 0 <= realtime_priority <= 99:
            raise ConfigError(
                f"DelayLine realtime_priority={realtime_priority!r}: expected 0..99 "
                "(0 = normal scheduling)"
            )
        if not 0 <= queue_num <= 65535:
            raise ConfigError(f"DelayLine queue_num={queue_num!r}: expected 0..65535")
        if not iface_prefix or len(iface_prefix) >= IFNAMSIZ - 1:
            raise ConfigError(
                f"DelayLine iface_prefix={iface_prefix!r}: expected 1-14 chars"
            )
        self.workers = workers
        self.seed = seed
        self.queue_num = queue_num
        self.iface_prefix = iface_prefix
        self.ipv6 = ipv6
        self.maxlen = maxlen
        self.realtime_priority = realtime_priority
        self.nice = nice
        self.reply_timeout_s = reply_timeout_s
        self._handles: list[_WorkerHandle] = []
        self._owner: dict[str, _WorkerHandle] = {}
        self._paths: dict[str, Path] = {}

    def __enter__(self) -> DelayLine:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the worker processes; returns once each has said it is ready."""
        if self._handles:
            return
        if os.geteuid() != 0:
            raise EmulationError("the delay line needs root (CAP_NET_ADMIN, setns)")
        try:
            for index in range(self.workers):
                argv = [
                    sys.executable,
                    "-m",
                    "topology.delayline_worker",
                    "--parent-pid",
                    str(os.getpid()),
                    "--seed",
                    str(self.seed + index),
                    "--queue-num",
                    str(self.queue_num),
                    "--maxlen",
                    str(self.maxlen),
                    "--rcvbuf-bytes",
                    str(DEFAULT_RCVBUF_BYTES),
                    "--nice",
                    str(self.nice),
                    "--realtime-priority",
                    str(self.realtime_priority),
                    "--iface-prefix",
                    self.iface_prefix,
                ]
                if self.ipv6:
                    argv.append("--ipv6")
                self._handles.append(_WorkerHandle(index, argv, self.reply_timeout_s))
        except BaseException:
            self.stop()
            raise
        log.info("delay line started: %d worker(s), pids %s", self.workers, self.pids)

    @property
    def pids(self) -> list[int]:
        return [h.proc.pid for h in self._handles]

    def stop(self) -> None:
        """Remove our rules from namespaces that still exist, then stop workers.

        Held packets are released (accepted) before the queues close. A
        namespace deleted while attached lives on (with its veths) until
        this closes our socket in it. Idempotent.
        """
        live: list[Path] = []
        dead: list[Path] = []
        for namespace, path in self._paths.items():
            if path.exists():
                alive = self._owner[namespace].proc.poll() is None
                (live if alive else dead).append(path)
        failures = remove_rules(
            live,
            queue_num=self.queue_num,
            iface_prefix=self.iface_prefix,
            ipv6=self.ipv6,
        )

        # A worker that died may or may not have removed its rules itself.
        for path in dead:
            try:
                cleanup_namespace_rules(path)
            except CommandError as exc:
                failures[str(path)] = exc
        self._owner.clear()
        self._paths.clear()
        for handle in self._handles:
            handle.stop()
        if self._handles:
            log.info("delay line stopped")
        self._handles.clear()
        if failures:
            first = next(iter(failures.values()))
            raise EmulationError(
                f"delay line stopped but rule removal failed in {sorted(failures)}, "
                f"first: {first}; run cleanup_namespace_rules() on those namespaces"
            )

    def alive(self) -> bool:
        """True while started and every worker process runs."""
        return bool(self._handles) and all(h.proc.poll() is None for h in self._handles)

    def _require_started(self) -> None:
        if not self._handles:
            raise EmulationError("the delay line is not running; call start() first")

    def attach(self, namespace: str, netns_path: str | Path | None = None) -> None:
        """Delay data-plane packets arriving in `namespace` (idempotent).

        `namespace` names it in set_links and stats; it lives at
        ``/var/run/netns/<namespace>`` unless `netns_path` says where
        (``/proc/PID/ns/net`` for a container). The worker binds the queue
        before the rule exists, so no packet is ever queued without a
        listener. Detach (or stop) before deleting the namespace: our open
        socket keeps a deleted namespace alive.
        """
        paths = {namespace: netns_path} if netns_path is not None else None
        self.attach_many([namespace], paths)

    def attach_many(
        self,
        namespaces: Iterable[str],
        netns_paths: Mapping[str, str | Path] | None = None,
    ) -> None:
        """:meth:`attach` for many namespaces, with the rules set up in parallel.

        Namespaces whose rule could not be installed are left detached and
        named in the EmulationError raised at the end; the others stay.
        """
        self._require_started()
        todo = [ns for ns in dict.fromkeys(namespaces) if ns not in self._owner]
        paths = {ns: _netns_path((netns_paths or {}).get(ns, ns)) for ns in todo}
        missing = [str(path) for path in paths.values() if not path.exists()]
        if missing:
            raise ConfigError(
                f"attach: no network namespace at {missing[:5]}; create it first"
            )
        plan: dict[_WorkerHandle, list[str]] = {}
        for namespace in todo:
            handle = min(
                self._handles,
                key=lambda h: len(h.namespaces) + len(plan.get(h, [])),
            )
            plan.setdefault(handle, []).append(namespace)
        for handle, names in plan.items():
            handle.request("attach", [(ns, str(paths[ns])) for ns in names])
            handle.namespaces.update(names)
            self._owner.update(dict.fromkeys(names, handle))
            self._paths.update((ns, paths[ns]) for ns in names)
        failures = install_rules(
            paths.values(),
            queue_num=self.queue_num,
            iface_prefix=self.iface_prefix,
            ipv6=self.ipv6,
        )
        failed = [ns for ns, path in paths.items() if str(path) in failures]
        for namespace in failed:
            self._forget_namespace(namespace).request("detach", namespace)
        if failures:
            first = next(iter(failures.values()))
            raise EmulationError(
                f"delay line: could not install the NFQUEUE rule in "
                f"{failed[:5]} ({len(failed)} namespaces), first: {first}"
            )
        log.debug("delay line attached to %d namespaces", len(todo))

    def _forget_namespace(self, namespace: str) -> _WorkerHandle:
        handle = self._owner.pop(namespace)
        handle.namespaces.discard(namespace)
        self._paths.pop(namespace, None)
        handle.counters.pop(namespace, None)
        for key in [key for key in handle.links if key[0] == namespace]:
            del handle.links[key]
        return handle

    def detach(self, namespace: str) -> None:
        """Remove the rule and the socket; held packets are released at once."""
        if namespace not in self._owner:
            return
        path = self._paths[namespace]
        handle = self._forget_namespace(namespace)
        try:
            if path.exists():
                remove_rule(
                    path,
                    queue_num=self.queue_num,
                    iface_prefix=self.iface_prefix,
                    ipv6=self.ipv6,
                )
        finally:
            handle.request("detach", namespace)

    def set_links(self, entries: list[tuple[str, str, float, float]]) -> None:
        """Set (namespace, ifname, delay_s, loss_fraction) for many links at once.

        Takes effect for packets arriving after the call returns; packets
        already held keep their release time, and a shorter delay waits for
        the link's previous packet, so links never reorder.
        """
        self._require_started()
        batches: dict[_WorkerHandle, list[tuple[str, str, float, float]]] = {}
        for entry in entries:
            namespace, ifname, delay_s, loss_fraction = entry
            handle = self._owner.get(namespace)
            if handle is None:
                raise ConfigError(
                    f"set_links {entry!r}: namespace {namespace!r} is not attached; "
                    "call attach() first"
                )
            if not (ifname.startswith(self.iface_prefix) and len(ifname) < IFNAMSIZ):
                raise ConfigError(
                    f"set_links {entry!r}: interface {ifname!r} is not a data-plane "
                    f"name ({self.iface_prefix!r} + link id, < {IFNAMSIZ} chars), so "
                    "its packets are never queued; rename the interface"
                )
            if not (math.isfinite(delay_s) and 0.0 <= delay_s <= MAX_DELAY_S):
                raise ConfigError(
                    f"set_links {entry!r}: delay_s={delay_s!r} must be within "
                    f"0..{MAX_DELAY_S} s"
                )
            if not 0.0 <= loss_fraction <= 1.0:
                raise ConfigError(
                    f"set_links {entry!r}: loss_fraction={loss_fraction!r} must be "
                    "within 0..1"
                )
            batches.setdefault(handle, []).append(
                (namespace, ifname, float(delay_s), float(loss_fraction))
            )
        for handle, batch in batches.items():
            handle.request("set", batch)

    def forget_link(self, namespace: str, ifname: str) -> None:
        """Drop a link's settings and counters (its packets then pass undelayed)."""
        self.forget_links([(namespace, ifname)])

    def forget_links(self, pairs: Iterable[tuple[str, str]]) -> None:
        """:meth:`forget_link` for many (namespace, ifname) pairs, one message
        per worker."""
        batches: dict[_WorkerHandle, list[tuple[str, str]]] = {}
        for namespace, ifname in pairs:
            handle = self._owner.get(namespace)
            if handle is not None:
                batches.setdefault(handle, []).append((namespace, ifname))
        for handle, batch in batches.items():
            handle.request("forget", batch)
            for key in batch:
                handle.links.pop(key, None)

    def stats(self) -> dict[str, Any]:
        """Counters per link, per namespace, per worker, and totals.

        ``links[(namespace, ifname)]`` holds packets, bytes (kernel length,
        a GSO packet counts whole), drops (loss decisions), released,
        max_lateness_s, lateness_sum_s and a lateness histogram
        (``lateness_buckets_s`` upper bounds, ``lateness_counts`` per
        bucket plus +Inf). Lateness is actual minus intended release time.
        ``namespaces[ns]`` adds the kernel's queue_dropped (queue full) and
        user_dropped (our socket buffer full) counters.
        """
        self._require_started()
        links: dict[tuple[str, str], dict[str, Any]] = {}
        namespaces: dict[str, dict[str, Any]] = {}
        workers = []
        buckets = list(LATENESS_BUCKETS_S)
        for handle in self._handles:
            part = handle.request("stats")

            # Workers send what changed since their last reply.
            for key, values in part["links"].items():
                link = dict(zip(LINK_FIELDS, values, strict=True))
                link["lateness_counts"] = list(link["lateness_counts"])
                handle.links[key] = link
            for name, values in part["namespaces"].items():
                handle.counters[name] = dict(zip(NAMESPACE_FIELDS, values, strict=True))
            for key, link in handle.links.items():
                links[key] = {**link, "lateness_buckets_s": buckets}
            for name, counters in handle.counters.items():
                namespaces[name] = dict(counters)
            workers.append(part["worker"])
        totals: dict[str, Any] = {
            key: sum(link[key] for link in links.values())
            for key in ("packets", "bytes", "drops", "released")
        }
        totals["max_lateness_s"] = max(
            (link["max_lateness_s"] for link in links.values()), default=0.0
        )
        for key in ("held_packets", "kernel_queue_dropped", "kernel_user_dropped"):
            totals[key] = sum(max(0, ns[key]) for ns in namespaces.values())
        return {
            "links": links,
            "namespaces": namespaces,
            "workers": workers,
            "totals": totals,
        }
