"""Entering a node's network namespace by name, for agents and the controller.

The system call itself is topology.netns.setns (libc ``setns(2)`` through
ctypes; Python 3.11 has no ``os.setns``). A network namespace switch applies
to the calling thread only, and a thread created afterwards inherits the
namespace of the thread that created it; a socket stays in the namespace it
was created in, whichever thread then uses it. :func:`call_in_namespace`
uses this to open sockets inside a node's namespace from a short-lived
thread, leaving the caller's thread where it was.

Namespaces are the named ones of ``ip netns`` (``/run/netns/NAME``);
entering one needs CAP_SYS_ADMIN.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from topology.errors import EmulationError
from topology.netns import NETNS_DIR, setns

PR_SET_PDEATHSIG = 1

T = TypeVar("T")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def enter_namespace(namespace: str) -> None:
    """Move the calling thread into the named network namespace."""
    path = NETNS_DIR / namespace
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise EmulationError(
            f"network namespace {namespace!r} not found at {path} "
            f"({exc.strerror}); is the emulation up (`spacemoe up`)?"
        ) from None
    try:
        setns(fd)
    except EmulationError as exc:
        raise EmulationError(
            f"cannot enter network namespace {namespace!r} ({exc}); entering a "
            "namespace needs root (CAP_SYS_ADMIN)"
        ) from None
    finally:
        os.close(fd)


def call_in_namespace(namespace: str | None, fn: Callable[[], T]) -> T:
    """Run `fn` in a fresh thread inside `namespace` and return its result.

    With `namespace` None, `fn` runs in the caller's thread. Threads that `fn`
    starts stay in the namespace (they inherit it), which is how a paho
    network loop ends up reconnecting from the right place.
    """
    if namespace is None:
        return fn()
    box: dict[str, object] = {}

    def body() -> None:
        try:
            enter_namespace(namespace)
            box["result"] = fn()
        except BaseException as exc:  # handed back to the caller below
            box["error"] = exc

    thread = threading.Thread(target=body, name=f"netns-{namespace}", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


def set_parent_death_signal(signum: int) -> None:
    """Ask the kernel to send `signum` to this process when its parent dies."""
    if _libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise EmulationError(f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
