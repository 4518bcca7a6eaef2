"""Network namespaces: create, open, enter and remove them without forking.

A :class:`Namespace` is whatever a node lives in, however it was made: a
named namespace of ours under ``/run/netns`` (the kind of host Mininet
makes), or the namespace of a container's process (``/proc/PID/ns/net``).
It holds an open file descriptor and a persistent netlink socket opened
inside it, so addresses, routes and qdiscs can be changed from this process
at any time.

Only the calling thread changes namespace (``setns`` acts per thread), and
:func:`entered` always brings it back. Named namespaces are made the way
``ip netns add`` makes them: ``unshare(CLONE_NEWNET)`` then a bind mount of
the new namespace onto ``/run/netns/NAME``, with ``/run/netns`` a shared
mount so that ``ip netns exec`` in other mount namespaces sees it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from topology.errors import EmulationError
from topology.rtnl import NetlinkChannel, NetlinkFailure, raise_failures

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MS_REC = 16384
MS_SHARED = 1 << 20
MNT_DETACH = 2


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise EmulationError(f"{what}: {os.strerror(code)} (errno {code})")


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace open as `fd`."""
    _check(_libc().setns(fd, CLONE_NEWNET), "setns")


@contextmanager
def entered(fd: int) -> Iterator[None]:
    """Run the calling thread inside namespace `fd`, then bring it back."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        setns(fd)
        try:
            yield
        finally:
            setns(home)
    finally:
        os.close(home)


def _prepare_netns_dir() -> None:
    """Make /run/netns a shared mount point, as `ip netns add` does."""
    NETNS_DIR.mkdir(parents=True, exist_ok=True)
    libc = _libc()
    path = str(NETNS_DIR).encode()
    if libc.mount(b"none", path, b"none", MS_SHARED | MS_REC, None) == 0:
        return
    if ctypes.get_errno() != errno.EINVAL:
        _check(-1, f"mount --make-shared {NETNS_DIR}")
    # Not a mount point yet: bind it onto itself, then share it.
    _check(libc.mount(path, path, b"none", MS_BIND | MS_REC, None), "bind mount")
    _check(
        libc.mount(b"none", path, b"none", MS_SHARED | MS_REC, None),
        f"mount --make-shared {NETNS_DIR}",
    )


_netns_dir_ready = False


def _mount_point(name: str) -> Path:
    """Create the empty file /run/netns/NAME that a namespace is bound onto."""
    global _netns_dir_ready
    if not _netns_dir_ready:
        _prepare_netns_dir()
        _netns_dir_ready = True
    path = NETNS_DIR / name
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    except FileExistsError:
        raise EmulationError(
            f"network namespace {name!r} already exists; a previous run was not "
            "torn down: run `spacemoe clean` (or `spacemoe down`) first"
        ) from None
    return path


def create_named(name: str) -> Path:
    """Create namespace `name` at /run/netns/NAME; return its path."""
    path = _mount_point(name)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _check(_libc().unshare(CLONE_NEWNET), f"unshare for namespace {name}")
        try:
            _check(
                _libc().mount(
                    b"/proc/thread-self/ns/net",
                    str(path).encode(),
                    b"none",
                    MS_BIND,
                    None,
                ),
                f"bind mount of namespace {name}",
            )
        finally:
            setns(home)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        os.close(home)
    return path


def attach_named(name: str, pid: int) -> Path:
    """Name the namespace of process `pid` at /run/netns/NAME; return its path.

    What ``ip netns attach NAME PID`` does: a bind mount of the process's
    namespace, so that everything that finds nodes by name (``ip netns
    exec``, the delay line, brokers, ``spacemoe exec``) finds a container's
    namespace like one of ours, and it stays valid until
    :func:`remove_named` even if the process dies.
    """
    path = _mount_point(name)
    source = f"/proc/{pid}/ns/net".encode()
    if _libc().mount(source, str(path).encode(), b"none", MS_BIND, None) != 0:
        code = ctypes.get_errno()
        path.unlink(missing_ok=True)
        raise EmulationError(
            f"bind mount of /proc/{pid}/ns/net onto {path}: {os.strerror(code)}"
        )
    return path


def remove_named(name: str) -> None:
    """Remove namespace `name` (the kernel frees it once nothing uses it)."""
    path = NETNS_DIR / name
    if _libc().umount2(str(path).encode(), MNT_DETACH) != 0:
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOENT):
            _check(-1, f"umount {path}")
    path.unlink(missing_ok=True)


def list_named(prefix: str) -> list[str]:
    """Names of the namespaces under /run/netns that start with `prefix`."""
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


class Namespace:
    """A network namespace, open, with a netlink socket inside it.

    `path` is a namespace file: /run/netns/NAME or /proc/PID/ns/net.
    """

    def __init__(self, path: str | Path, label: str) -> None:
        self.path = Path(path)
        self.label = label
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise EmulationError(
                f"cannot open network namespace {label!r} at {self.path}: "
                f"{exc.strerror}"
            ) from None
        try:
            with entered(self.fd):
                self.channel = NetlinkChannel()
        except BaseException:
            os.close(self.fd)
            raise

    @classmethod
    def of_process(cls, pid: int, label: str) -> Namespace:
        """The namespace of process `pid` (e.g. a container's first process)."""
        return cls(f"/proc/{pid}/ns/net", label)

    def close(self) -> None:
        """Close our socket and descriptor (the namespace itself stays)."""
        self.channel.close()
        os.close(self.fd)

    def sysctl(self, settings: Mapping[str, str]) -> None:
        """Write net.* sysctls of this namespace ('ipv4/ip_forward' -> '1')."""
        with entered(self.fd):
            for key, value in settings.items():
                try:
                    with open(f"/proc/sys/net/{key}", "w") as handle:
                        handle.write(value)
                except OSError as exc:
                    raise EmulationError(
                        f"{self.label}: cannot set net/{key} = {value}: {exc.strerror}"
                    ) from None

    def send(self, messages: Sequence[bytes], what: Sequence[str]) -> None:
        """Send netlink messages; raise naming `what[i]` for each refusal."""
        raise_failures(self.channel.transact(messages), what, self.label)

    def send_records(self, records: np.ndarray) -> list[NetlinkFailure]:
        """Send packed records (see rtnl.route_records); return refusals."""
        return self.channel.transact_records(records)
