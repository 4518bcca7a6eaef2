"""Route-netlink messages and a batching channel to send them.

Per-timestep kernel work of the emulator (routes, qdisc changes, link
state) goes through persistent netlink sockets, one per namespace, never a
forked ``ip`` or ``tc``. This module builds the few message kinds we need
with :mod:`struct` and sends many of them in one ``sendmsg``.

Why not pyroute2's request builders: pyroute2 0.9.7 takes 170-420 us to
encode one message (`IPBatch().addr(...)`, `.tc(...)`), and its netem
encoder fails on a plain rate; bring-up of 1,584 satellites sends about
40,000 link/address/qdisc messages and 2.5 million routes. Built here,
a route costs well under a microsecond (numpy, all routes of a node at
once). pyroute2 still supplies the message-type and flag constants, and
the tests read kernel state back with its `IPRoute`.

Batching: messages in a batch carry no ``NLM_F_ACK`` except the last of
each chunk. The kernel handles the messages of one ``sendmsg`` in order and
reports every failure even without ``NLM_F_ACK``, so once the last
message's acknowledgement arrives, every failure before it has arrived too.
Message layouts follow ``linux/rtnetlink.h``, ``linux/if_link.h`` and
``linux/pkt_sched.h``; `tbf` and `netem` options were checked byte for byte
against what iproute2's ``tc`` sends.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from pyroute2.netlink import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
)
from pyroute2.netlink.rtnl import (
    RTM_DELLINK,
    RTM_DELROUTE,
    RTM_GETLINK,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWQDISC,
    RTM_NEWROUTE,
)

from topology.errors import EmulationError

NETLINK_ROUTE = 0
SOL_NETLINK = 270

# Socket options from linux/netlink.h.
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
SOCKET_BUFFER_BYTES = 8 << 20

# Attribute numbers from linux/if_link.h, if_addr.h, rtnetlink.h, pkt_sched.h.
IFLA_IFNAME = 3
IFLA_MASTER = 10
IFLA_LINKINFO = 18
IFLA_NET_NS_FD = 28
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
VETH_INFO_PEER = 1
IFLA_MTU = 4
IFLA_VXLAN_ID = 1
IFLA_VXLAN_GROUP = 2
IFLA_VXLAN_LOCAL = 4
IFLA_VXLAN_TTL = 5
IFLA_VXLAN_LEARNING = 7
IFLA_VXLAN_PORT = 15
IFF_UP = 0x1
IFA_ADDRESS = 1
IFA_LOCAL = 2
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PREFSRC = 7
IFLA_STATS64 = 23
TCA_KIND = 1
TCA_OPTIONS = 2
TCA_TBF_PARMS = 1
TCA_TBF_RATE64 = 4
TCA_TBF_BURST = 6
TCA_NETEM_RATE = 6
TCA_NETEM_RATE64 = 8
TCA_NETEM_LATENCY64 = 10
TC_H_ROOT = 0xFFFFFFFF
TC_LINKLAYER_ETHERNET = 1
NLMSGERR_ATTR_MSG = 1
NLM_F_ACK_TLVS = 0x200

RT_TABLE_MAIN = 254
RT_SCOPE_UNIVERSE = 0
RTN_UNICAST = 1
# Our routes are marked "static" (RTPROT_STATIC): installed by an operator,
# not learnt by a routing daemon.
RTPROT_STATIC = 4

# Packet-scheduler time unit: one "tick" is 64 ns (PSCHED_SHIFT = 6).
PSCHED_NS_PER_TICK = 64
U32_MAX = 0xFFFFFFFF

_HEADER = struct.Struct("=IHHII")
_IFINFO = struct.Struct("=BxHiII")
_IFADDR = struct.Struct("=BBBBI")
_TCMSG = struct.Struct("=BxxxiIII")
_ATTR = struct.Struct("=HH")

# One IPv4 host route: header, rtmsg, then RTA_DST, RTA_GATEWAY, RTA_OIF
# (each 4-byte attribute header plus 4 bytes). Deletions use the same
# layout; the kernel ignores gateway 0 and oif 0 when matching.
ROUTE_RECORD = np.dtype(
    [
        ("len", "<u4"),
        ("type", "<u2"),
        ("flags", "<u2"),
        ("seq", "<u4"),
        ("pid", "<u4"),
        ("family", "u1"),
        ("dst_len", "u1"),
        ("src_len", "u1"),
        ("tos", "u1"),
        ("table", "u1"),
        ("protocol", "u1"),
        ("scope", "u1"),
        ("rtype", "u1"),
        ("rtflags", "<u4"),
        ("dst_hdr", "<u4"),
        ("dst", ">u4"),
        ("gw_hdr", "<u4"),
        ("gateway", ">u4"),
        ("oif_hdr", "<u4"),
        ("oif", "<u4"),
        ("prefsrc_hdr", "<u4"),
        ("prefsrc", ">u4"),
    ]
)
assert ROUTE_RECORD.itemsize == 60

# How many messages go out before we wait for the kernel to catch up; the
# error replies of one chunk must fit the receive buffer.
CHUNK_MESSAGES = 8192


@dataclass(frozen=True)
class NetlinkFailure:
    """One message of a batch that the kernel refused."""

    index: int
    errno: int
    message: str

    def describe(self) -> str:
        """The error as errno name, its meaning and the kernel's reason."""
        name = errno.errorcode.get(self.errno, str(self.errno))
        text = f": {self.message}" if self.message else ""
        return f"{name} ({os.strerror(self.errno)}){text}"


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return _ATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack("=I", value))


def _message(kind: int, flags: int, body: bytes) -> bytes:
    return _HEADER.pack(16 + len(body), kind, NLM_F_REQUEST | flags, 0, 0) + body


def _ifname(kind: int, name: str) -> bytes:
    if not 0 < len(name) < 16:
        raise EmulationError(
            f"interface name {name!r} must have 1 to 15 characters (IFNAMSIZ)"
        )
    return _attr(kind, name.encode() + b"\0")


def veth_add(
    name: str,
    index: int,
    netns_fd: int | None,
    peer_name: str,
    peer_index: int,
    peer_netns_fd: int | None,
) -> bytes:
    """Create a veth pair, each end straight into its namespace (by fd).

    `index`/`peer_index` fix the interface indexes (0: the kernel picks),
    so routes can name their output device without a lookup.
    """
    peer = _IFINFO.pack(socket.AF_UNSPEC, 0, peer_index, 0, 0)
    peer += _ifname(IFLA_IFNAME, peer_name)
    if peer_netns_fd is not None:
        peer += _u32(IFLA_NET_NS_FD, peer_netns_fd)
    info = _attr(IFLA_INFO_KIND, b"veth") + _attr(
        IFLA_INFO_DATA, _attr(VETH_INFO_PEER, peer)
    )
    body = _IFINFO.pack(socket.AF_UNSPEC, 0, index, 0, 0)
    body += _ifname(IFLA_IFNAME, name)
    if netns_fd is not None:
        body += _u32(IFLA_NET_NS_FD, netns_fd)
    body += _attr(IFLA_LINKINFO, info)
    return _message(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)


def vxlan_add(
    name: str,
    index: int,
    netns_fd: int | None,
    vni: int,
    local: int,
    remote: int,
    port: int,
    mtu: int,
) -> bytes:
    """Create a point-to-point VXLAN device, straight into a namespace (by fd).

    The UDP socket stays in the namespace of the netlink socket that sends
    this (the host's underlay), while the device lives in `netns_fd`: the
    way ``ip link add NAME netns NS type vxlan id VNI local L remote R
    dstport P nolearning`` makes it. `local`/`remote` are IPv4 addresses as
    integers; with a unicast remote every frame goes to that one host.
    """
    data = _u32(IFLA_VXLAN_ID, vni)
    data += _attr(IFLA_VXLAN_GROUP, struct.pack("!I", remote))
    data += _attr(IFLA_VXLAN_LOCAL, struct.pack("!I", local))
    data += _attr(IFLA_VXLAN_TTL, struct.pack("=B", 64))
    data += _attr(IFLA_VXLAN_LEARNING, struct.pack("=B", 0))
    data += _attr(IFLA_VXLAN_PORT, struct.pack("!H", port))
    info = _attr(IFLA_INFO_KIND, b"vxlan") + _attr(IFLA_INFO_DATA, data)
    body = _IFINFO.pack(socket.AF_UNSPEC, 0, index, 0, 0)
    body += _ifname(IFLA_IFNAME, name)
    body += _u32(IFLA_MTU, mtu)
    if netns_fd is not None:
        body += _u32(IFLA_NET_NS_FD, netns_fd)
    body += _attr(IFLA_LINKINFO, info)
    return _message(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)


def bridge_add(name: str) -> bytes:
    """Create a Linux bridge (no STP: the management net is a star)."""
    body = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _ifname(IFLA_IFNAME, name)
    body += _attr(IFLA_LINKINFO, _attr(IFLA_INFO_KIND, b"bridge"))
    return _message(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)


def link_set(
    index: int = 0, name: str | None = None, up: bool = True, master: int | None = None
) -> bytes:
    """Set a link administratively up or down (and optionally its master)."""
    body = _IFINFO.pack(socket.AF_UNSPEC, 0, index, IFF_UP if up else 0, IFF_UP)
    if name is not None:
        body += _ifname(IFLA_IFNAME, name)
    if master is not None:
        body += _u32(IFLA_MASTER, master)
    return _message(RTM_NEWLINK, 0, body)


def link_del(index: int = 0, name: str | None = None) -> bytes:
    """Delete a link by index or name (a veth takes its peer along)."""
    body = _IFINFO.pack(socket.AF_UNSPEC, 0, index, 0, 0)
    if name is not None:
        body += _ifname(IFLA_IFNAME, name)
    return _message(RTM_DELLINK, 0, body)


def addr_add(index: int, address: int, prefixlen: int) -> bytes:
    """Add an IPv4 address (as an integer) to interface `index`."""
    raw = struct.pack("!I", address)
    body = _IFADDR.pack(socket.AF_INET, prefixlen, 0, RT_SCOPE_UNIVERSE, index)
    body += _attr(IFA_LOCAL, raw) + _attr(IFA_ADDRESS, raw)
    return _message(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, body)


def _qdisc(index: int, kind: str, options: bytes, create: bool) -> bytes:
    body = _TCMSG.pack(socket.AF_UNSPEC, index, 0x10000, TC_H_ROOT, 0)
    body += _attr(TCA_KIND, kind.encode() + b"\0") + _attr(TCA_OPTIONS, options)
    # 'change' keeps the qdisc and its queue, unlike delete and add.
    flags = NLM_F_CREATE | NLM_F_EXCL if create else 0
    return _message(RTM_NEWQDISC, flags, body)


def tbf(
    index: int, rate_bps: float, burst_bytes: int, limit_bytes: int, create: bool
) -> bytes:
    """Root token-bucket filter on interface `index` (add, or change in place).

    Rates above 2^32-1 bytes/s travel in TCA_TBF_RATE64, as tc does.
    """
    rate_bytes = int(rate_bps / 8)
    ratespec = struct.pack(
        "=BBHhHI", 0, TC_LINKLAYER_ETHERNET, 0, -1, 0, min(rate_bytes, U32_MAX)
    )
    buffer_ticks = int(burst_bytes / rate_bytes * 1e9 / PSCHED_NS_PER_TICK)
    parms = (
        ratespec
        + bytes(12)
        + struct.pack("=III", limit_bytes, min(buffer_ticks, U32_MAX), 0)
    )
    options = _attr(TCA_TBF_PARMS, parms) + _u32(TCA_TBF_BURST, burst_bytes)
    if rate_bytes > U32_MAX:
        options += _attr(TCA_TBF_RATE64, struct.pack("=Q", rate_bytes))
    return _qdisc(index, "tbf", options, create)


def netem(
    index: int,
    delay_s: float,
    rate_bps: float,
    loss_fraction: float,
    limit_packets: int,
    create: bool,
) -> bytes:
    """Root netem qdisc: delay, random loss and rate (add, or change in place).

    netem's options are a fixed `tc_netem_qopt` followed by attributes; the
    delay goes in both (ticks, and nanoseconds in TCA_NETEM_LATENCY64).
    """
    delay_ns = int(round(delay_s * 1e9))
    loss = min(int(round(loss_fraction * U32_MAX)), U32_MAX)
    qopt = struct.pack(
        "=IIIIII",
        min(delay_ns // PSCHED_NS_PER_TICK, U32_MAX),
        limit_packets,
        loss,
        0,
        0,
        0,
    )
    rate_bytes = int(rate_bps / 8)
    options = qopt + _attr(
        TCA_NETEM_RATE, struct.pack("=IiIi", min(rate_bytes, U32_MAX), 0, 0, 0)
    )
    if rate_bytes > U32_MAX:
        options += _attr(TCA_NETEM_RATE64, struct.pack("=Q", rate_bytes))
    options += _attr(TCA_NETEM_LATENCY64, struct.pack("=q", delay_ns))
    return _qdisc(index, "netem", options, create)


def route_records(
    dest: np.ndarray, gateway: np.ndarray, oif: np.ndarray, prefsrc: int
) -> np.ndarray:
    """Host routes as packed RTM_NEWROUTE / RTM_DELROUTE records.

    `dest` and `gateway` are IPv4 addresses as unsigned integers, `oif` the
    output interface index. A gateway of 0 deletes the route to `dest`;
    otherwise the route is created or replaced. `prefsrc` (the node's own
    /32) is the source address the node's sockets pick for the route:
    without it they would pick the outgoing link's address, which only the
    neighbour can reach.
    """
    count = len(dest)
    records = np.zeros(count, dtype=ROUTE_RECORD)
    delete = np.asarray(gateway) == 0
    records["len"] = ROUTE_RECORD.itemsize
    records["type"] = np.where(delete, RTM_DELROUTE, RTM_NEWROUTE)
    records["flags"] = np.where(
        delete, NLM_F_REQUEST, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE
    )
    records["family"] = socket.AF_INET
    records["dst_len"] = 32
    records["table"] = RT_TABLE_MAIN
    records["protocol"] = RTPROT_STATIC
    records["scope"] = RT_SCOPE_UNIVERSE
    records["rtype"] = RTN_UNICAST
    records["dst_hdr"] = 8 | (RTA_DST << 16)
    records["dst"] = dest
    records["gw_hdr"] = 8 | (RTA_GATEWAY << 16)
    records["gateway"] = gateway
    records["oif_hdr"] = 8 | (RTA_OIF << 16)
    records["oif"] = oif
    records["prefsrc_hdr"] = 8 | (RTA_PREFSRC << 16)
    records["prefsrc"] = prefsrc
    return records


class NetlinkChannel:
    """A route-netlink socket bound in one namespace, sending in batches.

    The socket belongs to the namespace that the calling thread was in when
    it was opened, for its whole life, whatever the thread does later.
    Channels share one receive buffer (a megabyte per namespace would cost
    1.5 GiB at 1,584 satellites), so use them from one thread.
    """

    _recv_buffer = bytearray(1 << 20)

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SOCKET_BUFFER_BYTES)
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, SOCKET_BUFFER_BYTES)
            # Failures then carry a text reason but not our message back.
            self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            self.sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
            self.sock.bind((0, 0))
            self.sock.settimeout(60.0)
        except OSError:
            self.sock.close()
            raise
        self._seq = 1

    def close(self) -> None:
        self.sock.close()

    def transact(self, messages: Sequence[bytes]) -> list[NetlinkFailure]:
        """Send `messages` in batches; return the ones the kernel refused."""
        failures: list[NetlinkFailure] = []
        for start in range(0, len(messages), CHUNK_MESSAGES):
            chunk = messages[start : start + CHUNK_MESSAGES]
            first = self._seq
            buffer = bytearray(b"".join(chunk))
            offset = 0
            for i in range(len(chunk)):
                length, kind, flags = struct.unpack_from("=IHH", buffer, offset)
                flags &= ~NLM_F_ACK
                if i == len(chunk) - 1:
                    flags |= NLM_F_ACK
                struct.pack_into("=HII", buffer, offset + 6, flags, first + i, 0)
                offset += length + (-length % 4)
            self._seq += len(chunk)
            failures += self._exchange(buffer, first, len(chunk), start)
        return failures

    def transact_records(self, records: np.ndarray) -> list[NetlinkFailure]:
        """Send fixed-size records (e.g. :func:`route_records`) in batches."""
        failures: list[NetlinkFailure] = []
        for start in range(0, len(records), CHUNK_MESSAGES):
            chunk = records[start : start + CHUNK_MESSAGES].copy()
            first = self._seq
            chunk["seq"] = first + np.arange(len(chunk), dtype=np.uint32)
            chunk["flags"] &= ~np.uint16(NLM_F_ACK)
            chunk["flags"][-1] |= NLM_F_ACK
            self._seq += len(chunk)
            failures += self._exchange(chunk.tobytes(), first, len(chunk), start)
        return failures

    def link_stats(self) -> dict[int, tuple[int, int, int, int]]:
        """Byte counters of every interface: index -> (rx, tx, rx drop, tx drop).

        One RTM_GETLINK dump; counters are the kernel's 64-bit ones.
        """
        seq = self._seq
        self._seq += 1
        body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, 0, 0, 0)
        header = _HEADER.pack(
            16 + len(body), RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, seq, 0
        )
        self.sock.send(header + body)
        stats: dict[int, tuple[int, int, int, int]] = {}
        view = memoryview(self._recv_buffer)
        while True:
            size = self.sock.recv_into(view)
            offset = 0
            while offset + 16 <= size:
                length, kind, _flags, got_seq, _ = _HEADER.unpack_from(view, offset)
                if got_seq == seq:
                    if kind == NLMSG_DONE:
                        return stats
                    if kind == NLMSG_ERROR:
                        code = -struct.unpack_from("=i", view, offset + 16)[0]
                        raise EmulationError(
                            f"netlink: link dump refused: {errno.errorcode.get(code)}"
                        )
                    if kind == RTM_NEWLINK:
                        index = struct.unpack_from("=i", view, offset + 20)[0]
                        attr = offset + 32
                        end = offset + length
                        while attr + 4 <= end:
                            alen, atype = struct.unpack_from("=HH", view, attr)
                            if alen < 4:
                                break
                            if atype & 0x3FFF == IFLA_STATS64:
                                c = struct.unpack_from("=8Q", view, attr + 4)
                                stats[index] = (c[2], c[3], c[6], c[7])
                                break
                            attr += alen + (-alen % 4)
                offset += length + (-length % 4)

    def _exchange(
        self, buffer: bytes | bytearray, first: int, count: int, base: int
    ) -> list[NetlinkFailure]:
        self.sock.send(buffer)
        last = first + count - 1
        failures: list[NetlinkFailure] = []
        view = memoryview(self._recv_buffer)
        while True:
            try:
                size = self.sock.recv_into(view)
            except TimeoutError:
                raise EmulationError(
                    f"netlink: no answer from the kernel within 60 s to a batch "
                    f"of {count} messages"
                ) from None
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    raise EmulationError(
                        f"netlink: receive buffer overflowed while {count} "
                        "messages were answered: too many failures to report"
                    ) from None
                raise
            offset = 0
            while offset + 16 <= size:
                length, kind, flags, seq, _ = _HEADER.unpack_from(view, offset)
                if kind == NLMSG_ERROR and first <= seq <= last:
                    code = -struct.unpack_from("=i", view, offset + 16)[0]
                    if code:
                        text = _ext_ack_text(view, offset, length, flags)
                        failures.append(NetlinkFailure(base + seq - first, code, text))
                    if seq == last:
                        return failures
                offset += length + (-length % 4)


def _ext_ack_text(view: memoryview, offset: int, length: int, flags: int) -> str:
    """The kernel's text reason in an extended acknowledgement, if any."""
    if not flags & NLM_F_ACK_TLVS:
        return ""
    # nlmsghdr + error code + echoed nlmsghdr (capped), then attributes.
    position = offset + 16 + 4 + 16
    end = offset + length
    while position + 4 <= end:
        attr_len, attr_type = _ATTR.unpack_from(view, position)
        if attr_len < 4:
            break
        if attr_type == NLMSGERR_ATTR_MSG:
            raw = bytes(view[position + 4 : position + attr_len])
            return raw.split(b"\0", 1)[0].decode(errors="replace")
        position += attr_len + (-attr_len % 4)
    return ""


def raise_failures(
    failures: Iterable[NetlinkFailure], what: Sequence[str], where: str
) -> None:
    """Raise one EmulationError naming each refused message by `what[i]`."""
    failures = list(failures)
    if not failures:
        return
    shown = "; ".join(
        f"{what[f.index] if f.index < len(what) else f.index}: {f.describe()}"
        for f in failures[:5]
    )
    more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
    raise EmulationError(f"{where}: the kernel refused {shown}{more}")
