"""NFQUEUE over raw netlink, one socket per network namespace.

The delay line (:mod:`topology.delayline`) holds packets that iptables'
``NFQUEUE`` target hands to user space and gives them back after the link
delay. This module speaks the kernel's ``nfnetlink_queue`` protocol
(``NETLINK_NETFILTER``, subsystem ``NFNL_SUBSYS_QUEUE``) directly, because
the installed binding (``netfilterqueue``, over libnetfilter_queue) cannot
do what a delay line for a thousand namespaces needs:

- ``NFQA_CFG_F_GSO``: without it the kernel segments every GSO super-packet
  before queueing it (a 64 KiB TCP burst becomes 45 queue messages);
- the length of a packet without copying it (``NFQA_CAP_LEN`` with a
  one-byte copy range; libnetfilter_queue's copy-meta mode gives no length);
- many verdicts in one ``send()`` (the binding makes one syscall each);
- sockets opened in other namespaces and served from one ``epoll`` loop.

Protocol constants come from ``include/uapi/linux/netfilter/nfnetlink_queue.h``
and ``nfnetlink.h``. A netlink socket stays bound to the namespace it was
created in, so :func:`in_namespace` switches the calling thread with
``setns(2)`` (Python 3.11 has no ``os.setns``) only while opening it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

from topology.errors import EmulationError

NETNS_DIR = Path("/var/run/netns")

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
SO_RCVBUFFORCE = 33

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 2

NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = (NFNL_SUBSYS_QUEUE << 8) | 0
NFQNL_MSG_VERDICT = (NFNL_SUBSYS_QUEUE << 8) | 1
NFQNL_MSG_CONFIG = (NFNL_SUBSYS_QUEUE << 8) | 2

NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_PACKET = 2

NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_TIMESTAMP = 4
NFQA_IFINDEX_INDEV = 5
NFQA_CAP_LEN = 13
NFQA_PAYLOAD = 10

NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQA_CFG_F_GSO = 0x4

NF_DROP = 0
NF_ACCEPT = 1

_NLMSGHDR = struct.Struct("=IHHII")
_NLATTR = struct.Struct("=HH")
_BE32 = struct.Struct("!I")
_TIMESTAMP = struct.Struct("!QQ")

# A verdict message is fixed-size: nlmsghdr, nfgenmsg, one nlattr holding
# struct nfqnl_msg_verdict_hdr {be32 verdict; be32 id}.
_VERDICT = struct.Struct("=IHHIIBBHHH")
_VERDICT_BODY = struct.Struct("!II")
VERDICT_SIZE = _VERDICT.size + _VERDICT_BODY.size

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace open at `fd`."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise EmulationError(f"setns(fd {fd}) failed: {os.strerror(err)}")


def netns_path(namespace: str | Path) -> Path:
    """Where a namespace is: a bare name lives in /var/run/netns, a path
    (``/proc/PID/ns/net`` of a container) is taken as it is."""
    text = str(namespace)
    return Path(text) if "/" in text else NETNS_DIR / text


def open_namespace(namespace: str | Path) -> int:
    """Open a namespace (name or path); the fd pins it for setns."""
    path = netns_path(namespace)
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise EmulationError(
            f"network namespace {str(namespace)!r} does not exist ({path} is missing); "
            f"create it first (`ip netns add NAME`, or start its container)"
        ) from None


@contextlib.contextmanager
def in_namespace(namespace_fd: int) -> Iterator[None]:
    """Run the body in another network namespace, then switch back.

    Only the calling thread moves; sockets created inside stay in that
    namespace after the switch back.
    """
    home_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(namespace_fd)
        try:
            yield
        finally:
            setns(home_fd)
    finally:
        os.close(home_fd)


def _attr(kind: int, payload: bytes) -> bytes:
    length = _NLATTR.size + len(payload)
    return _NLATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def _message(kind: int, flags: int, seq: int, queue_num: int, attrs: bytes) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue_num)) + attrs
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


def _attr_header(length: int, kind: int) -> int:
    """An nlattr header as the big-endian integer _USUAL reads it as."""
    return int.from_bytes(_NLATTR.pack(length, kind), "big")


# The kernel writes a packet's attributes in a fixed order; on an Ethernet
# (veth) interface with timestamps on, the first five are always these.
# One unpack checks their headers and reads them all.
_USUAL = struct.Struct(">II4xIII12xIQQII")
_USUAL_HEADERS = (
    _attr_header(11, NFQA_PACKET_HDR),
    _attr_header(8, NFQA_IFINDEX_INDEV),
    _attr_header(16, 9),  # NFQA_HWADDR: be16 length, pad, 8 address bytes
    _attr_header(20, NFQA_TIMESTAMP),
    _attr_header(8, NFQA_CAP_LEN),
)


def parse_packet(buf: bytearray, offset: int, length: int) -> tuple[int, int, int, int]:
    """Pick id, input ifindex, length and timestamp out of one packet message."""
    if length >= 20 + _USUAL.size:
        h1, packet_id, h2, indev, h3, h4, sec, usec, h5, cap_len = _USUAL.unpack_from(
            buf, offset + 20
        )
        if (h1, h2, h3, h4, h5) == _USUAL_HEADERS:
            return packet_id, indev, cap_len, sec * 1_000_000_000 + usec * 1000
    return _parse_generic(buf, offset, length)


def _parse_generic(
    buf: bytearray, offset: int, length: int
) -> tuple[int, int, int, int]:
    end = offset + length
    pos = offset + 20
    packet_id = indev = cap_len = stamp_ns = 0
    while pos + 4 <= end:
        attr_len, kind = _NLATTR.unpack_from(buf, pos)
        if attr_len < 4:
            break
        kind &= 0x7FFF
        if kind == NFQA_PACKET_HDR:
            (packet_id,) = _BE32.unpack_from(buf, pos + 4)
        elif kind == NFQA_IFINDEX_INDEV:
            (indev,) = _BE32.unpack_from(buf, pos + 4)
        elif kind == NFQA_CAP_LEN:
            (cap_len,) = _BE32.unpack_from(buf, pos + 4)
        elif kind == NFQA_TIMESTAMP:
            sec, usec = _TIMESTAMP.unpack_from(buf, pos + 4)
            stamp_ns = sec * 1_000_000_000 + usec * 1000
        elif kind == NFQA_PAYLOAD and not cap_len:
            # Packet shorter than the copy range: no CAP_LEN, payload is whole.
            cap_len = attr_len - 4
        pos += (attr_len + 3) & ~3
    return packet_id, indev, cap_len, stamp_ns


class VerdictBatch:
    """Verdict messages for one queue, back to back, for one ``send()``."""

    def __init__(self, queue_num: int) -> None:
        self.data = bytearray()
        self._template = bytearray(VERDICT_SIZE)
        _VERDICT.pack_into(
            self._template,
            0,
            VERDICT_SIZE,
            NFQNL_MSG_VERDICT,
            NLM_F_REQUEST,
            0,
            0,
            socket.AF_UNSPEC,
            0,
            socket.htons(queue_num),
            _NLATTR.size + _VERDICT_BODY.size,
            NFQA_VERDICT_HDR,
        )

    def add(self, packet_id: int, verdict: int) -> None:
        start = len(self.data)
        self.data += self._template
        _VERDICT_BODY.pack_into(self.data, start + _VERDICT.size, verdict, packet_id)

    def __len__(self) -> int:
        return len(self.data) // VERDICT_SIZE


class QueueSocket:
    """One bound NFQUEUE queue in the namespace the caller is in.

    Packets are queued in copy-packet mode with a one-byte copy range, so
    each message carries the packet's length (``NFQA_CAP_LEN``) but almost
    none of its payload, and with ``NFQA_CFG_F_GSO`` so GSO packets stay
    whole. Held packets count against `maxlen`; when it is full the kernel
    drops new packets (no fail-open: bypassing the delay would reorder).
    """

    def __init__(self, queue_num: int, *, maxlen: int, rcvbuf_bytes: int) -> None:
        self.queue_num = queue_num
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.bind((0, 0))
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf_bytes)
            self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
            self._configure(maxlen)
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise
        self.batch = VerdictBatch(queue_num)
        self.verdict_errors = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def _request(self, attrs: bytes, seq: int) -> None:
        """Send one config message and wait for the kernel's ack.

        A packet that a leftover rule queued meanwhile is accepted at once.
        """
        msg = _message(
            NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, self.queue_num, attrs
        )
        self.sock.send(msg)
        while True:
            reply = bytearray(self.sock.recv(65536))
            offset = 0
            while offset + _NLMSGHDR.size <= len(reply):
                length, kind, _, reply_seq, _ = _NLMSGHDR.unpack_from(reply, offset)
                if kind == NFQNL_MSG_PACKET:
                    packet_id = parse_packet(reply, offset, length)[0]
                    batch = VerdictBatch(self.queue_num)
                    batch.add(packet_id, NF_ACCEPT)
                    self.sock.send(batch.data)
                elif kind == NLMSG_ERROR and reply_seq == seq:
                    (code,) = struct.unpack_from("=i", reply, offset + _NLMSGHDR.size)
                    self._check(code)
                    return
                offset += max((length + 3) & ~3, _NLMSGHDR.size)

    def _check(self, code: int) -> None:
        if code == -errno.EPERM:
            raise EmulationError(
                f"NFQUEUE queue {self.queue_num} is already bound by another process "
                "in this namespace; stop it or choose another queue_num"
            )
        if code != 0:
            raise EmulationError(
                f"NFQUEUE config of queue {self.queue_num} failed: {os.strerror(-code)}"
            )

    def _configure(self, maxlen: int) -> None:
        self._request(
            _attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, 0)), 1
        )
        params = struct.pack("!IB", 1, NFQNL_COPY_PACKET)
        self._request(
            _attr(NFQA_CFG_PARAMS, params)
            + _attr(NFQA_CFG_QUEUE_MAXLEN, _BE32.pack(maxlen))
            + _attr(NFQA_CFG_MASK, _BE32.pack(NFQA_CFG_F_GSO))
            + _attr(NFQA_CFG_FLAGS, _BE32.pack(NFQA_CFG_F_GSO)),
            2,
        )

    def receive(
        self, buf: bytearray, view: memoryview, max_messages: int
    ) -> list[tuple[int, int, int, int]]:
        """Read up to `max_messages` queued packets without blocking.

        Returns ``(packet_id, in_ifindex, length_bytes, kernel_timestamp_ns)``
        tuples; the timestamp is 0 when the kernel sent none. Netlink error
        replies (a verdict for an unknown id) are counted, not raised.
        """
        packets: list[tuple[int, int, int, int]] = []
        recv_into = self.sock.recv_into
        unpack_hdr = _NLMSGHDR.unpack_from
        for _ in range(max_messages):
            try:
                size = recv_into(view)
            except BlockingIOError:
                break
            offset = 0
            while offset + 16 <= size:
                length, kind, _, _, _ = unpack_hdr(buf, offset)
                if length < 16:
                    break
                if kind == NFQNL_MSG_PACKET:
                    packets.append(parse_packet(buf, offset, length))
                elif kind == NLMSG_ERROR:
                    self.verdict_errors += 1
                offset += (length + 3) & ~3
        return packets

    def verdict(self, packet_id: int, verdict: int) -> None:
        """Queue a verdict; :meth:`flush` sends all queued ones at once."""
        self.batch.add(packet_id, verdict)

    def flush(self, max_batch: int = 1024) -> None:
        """Send the queued verdicts, `max_batch` messages per ``send()``."""
        data = self.batch.data
        step = max_batch * VERDICT_SIZE
        for start in range(0, len(data), step):
            self.sock.send(data[start : start + step])
        data.clear()

    def close(self) -> None:
        """Unbind and close. The kernel drops packets still held (flush first)."""
        with contextlib.suppress(OSError):
            self.flush()
        self.sock.close()
