"""Fixtures for the emulation tests.

`net_sandbox` moves the test process into a private network namespace and
a private mount namespace (with its own empty /run/netns and /sys) for the
duration of a test module. The emulator's "root" namespace is then a
scratch one: its management bridge, its ``smoe-*`` namespaces and a
``clean()`` inside see nothing of a scenario someone else runs on the same
machine, and nothing leaks out if a test fails half-way. Processes the
tests start inherit both namespaces.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_BIND = 4096
MNT_DETACH = 2


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def _mount_sysfs_keeping_cgroups(libc: ctypes.CDLL) -> None:
    """A sysfs of this network namespace on /sys, with the cgroups kept.

    A fresh sysfs hides the cgroup hierarchies mounted below
    /sys/fs/cgroup, which dockerd needs (``nodes: docker``): they are moved
    aside first and bound back on top.
    """
    keep = os.path.ismount("/sys/fs/cgroup")
    stash = tempfile.mkdtemp(prefix="smoe-cgroup-") if keep else None
    try:
        if stash is not None:
            _check(
                libc.mount(
                    b"/sys/fs/cgroup", stash.encode(), None, MS_BIND | MS_REC, None
                ),
                "bind /sys/fs/cgroup aside",
            )
        _check(libc.mount(b"sysfs", b"/sys", b"sysfs", 0, None), "/sys")
        if stash is not None:
            _check(
                libc.mount(
                    stash.encode(), b"/sys/fs/cgroup", None, MS_BIND | MS_REC, None
                ),
                "bind cgroups back",
            )
    finally:
        if stash is not None:
            libc.umount2(stash.encode(), MNT_DETACH)
            os.rmdir(stash)


@pytest.fixture(scope="module")
def net_sandbox() -> Iterator[None]:
    """Private network and mount namespaces for this module's root tests."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    saved_net = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    saved_mnt = os.open("/proc/thread-self/ns/mnt", os.O_RDONLY)
    cwd = os.getcwd()
    _check(libc.unshare(CLONE_NEWNS | CLONE_NEWNET), "unshare")
    try:
        _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "private /")
        os.makedirs("/run/netns", exist_ok=True)
        _check(libc.mount(b"tmpfs", b"/run/netns", b"tmpfs", 0, None), "/run/netns")
        _mount_sysfs_keeping_cgroups(libc)
        # A new network namespace starts with loopback down; exporters and
        # Prometheus bind 127.0.0.1.
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        yield
    finally:
        _check(libc.setns(saved_mnt, CLONE_NEWNS), "setns back (mount)")
        _check(libc.setns(saved_net, CLONE_NEWNET), "setns back (net)")
        os.close(saved_mnt)
        os.close(saved_net)
        os.chdir(cwd)
        import topology.netns

        # The sandbox's /run/netns was prepared, the host's maybe not.
        topology.netns._netns_dir_ready = False
