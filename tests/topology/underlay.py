"""Two pseudo-hosts joined by an underlay, for the tests that split a scenario.

Each pseudo-host is a named network namespace standing for one machine;
a veth pair ``ul0`` between them is the network those machines share. Its
MTU of 1,550 leaves room for VXLAN's 50 bytes of headers around the
emulated links' 1,500. Used from inside ``net_sandbox``, so the names
never meet a user's.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager


def ip(*argv: str, netns: str | None = None) -> str:
    """Run `ip ARGV` (in `netns` if given); raise with its stderr on failure."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.run(
        [*prefix, "ip", *argv], check=True, capture_output=True, text=True
    ).stdout


@contextmanager
def underlay(names: Sequence[str], addresses: Sequence[str]) -> Iterator[None]:
    """Create the two pseudo-hosts with `addresses` (/24) on ``ul0``."""
    first, second = names
    try:
        for name in names:
            ip("netns", "add", name)
        ip(
            "link", "add", "ul0", "mtu", "1550", "netns", first, "type", "veth",
            "peer", "ul0", "mtu", "1550", "netns", second,
        )  # fmt: skip
        for name, address in zip(names, addresses, strict=True):
            ip("addr", "add", f"{address}/24", "dev", "ul0", netns=name)
            ip("link", "set", "ul0", "up", netns=name)
            ip("link", "set", "lo", "up", netns=name)
        yield
    finally:
        # Deleting a namespace deletes its end of ul0, and with it the pair.
        for name in names:
            subprocess.run(["ip", "netns", "del", name], check=False)
