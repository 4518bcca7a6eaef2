"""How a link's delay, loss and rate become kernel state.

Two modes, chosen by ``emulation.shaping``:

- ``netem`` (a kernel with ``sch_netem``): one root netem qdisc on each
  veth end's egress does delay, random loss and rate for packets leaving
  that end. Its packet limit covers the bandwidth-delay product of the
  link plus :data:`QUEUE_S` of queueing.
- ``tbf+delayline`` (this project's machine: no netem, no fq): a root
  token-bucket filter on each veth end's egress limits the rate, and the
  user-space :class:`~topology.delayline.DelayLine` delays and drops
  packets as they *arrive* at the other end (NFQUEUE in the receiving
  namespace's PREROUTING). The tbf queue holds :data:`QUEUE_S` at the link
  rate, at least the bandwidth-delay product of the longest LEO path, so
  one TCP flow can fill the link; its bucket holds :data:`BURST_S` of
  traffic and at least two full frames.

``auto`` picks netem where the kernel has it. Asking for ``netem`` on a
kernel without it is an error, never a silent loss of delay (Mininet's
TCLink logs and drops the delay in that case).

Qdiscs are changed in place (``RTM_NEWQDISC`` without create flags, what
``tc qdisc change`` sends), never deleted and added again: a delete drops
the queue and resets counters, the artefacts users of TCLink complain of.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

from topology import rtnl
from topology.errors import EmulationError

log = logging.getLogger(__name__)

ShapingMode = Literal["netem", "tbf+delayline"]

# Queue at the link rate for this long before dropping: the round trip of
# a long LEO path (about 20,000 km out and back), so a TCP flow's window
# fits the queue when it crosses one bottleneck.
QUEUE_S = 0.15
# Token bucket depth in time at the link rate (and at least two frames).
BURST_S = 0.002
FRAME_BYTES = 1514
MIN_LIMIT_BYTES = 64 * 1024
MIN_NETEM_PACKETS = 1000


def resolve_mode(requested: str, kernel_has_netem: bool) -> ShapingMode:
    """The shaping mode for ``emulation.shaping`` on this kernel."""
    if requested == "netem" and not kernel_has_netem:
        raise EmulationError(
            "emulation.shaping is 'netem' but this kernel has no netem qdisc "
            "(sch_netem is neither built in nor loadable); set emulation.shaping "
            "to 'auto' or 'delayline' to shape with tbf plus the user-space delay "
            "line, or run on a kernel with CONFIG_NET_SCH_NETEM"
        )
    if requested in ("netem", "auto") and kernel_has_netem:
        return "netem"
    if requested in ("delayline", "auto"):
        return "tbf+delayline"
    raise EmulationError(
        f"emulation.shaping: got {requested!r}, expected 'auto', 'netem' or 'delayline'"
    )


@dataclass(frozen=True)
class Shape:
    """What one direction of a link should do to packets."""

    delay_s: float
    rate_bps: float
    loss_fraction: float


def tbf_sizes(rate_bps: float) -> tuple[int, int]:
    """(burst_bytes, limit_bytes) of the token bucket for `rate_bps`."""
    rate_bytes_s = rate_bps / 8
    burst = max(int(rate_bytes_s * BURST_S), 2 * FRAME_BYTES)
    limit = max(int(rate_bytes_s * QUEUE_S), MIN_LIMIT_BYTES, burst)
    return burst, limit


def netem_limit_packets(shape: Shape) -> int:
    """netem's queue length: packets in flight on the link plus the queue."""
    in_flight_bytes = shape.rate_bps / 8 * (shape.delay_s + QUEUE_S)
    return max(math.ceil(in_flight_bytes / FRAME_BYTES), MIN_NETEM_PACKETS)


def check_rate(rate_bps: float, where: str) -> None:
    """Reject rates the qdiscs cannot express."""
    if not (math.isfinite(rate_bps) and rate_bps >= 8):
        raise EmulationError(
            f"{where}: rate_bps={rate_bps!r} cannot be shaped; give at least 8 bit/s"
        )


def egress_message(
    mode: ShapingMode, ifindex: int, shape: Shape, create: bool
) -> bytes:
    """The qdisc message for the sending end of a link direction.

    netem mode carries the whole shape; tbf mode only the rate (delay and
    loss go to the delay line at the receiving end).
    """
    if mode == "netem":
        return rtnl.netem(
            ifindex,
            shape.delay_s,
            shape.rate_bps,
            shape.loss_fraction,
            netem_limit_packets(shape),
            create,
        )
    burst, limit = tbf_sizes(shape.rate_bps)
    return rtnl.tbf(ifindex, shape.rate_bps, burst, limit, create)


def egress_needs_change(mode: ShapingMode, old: Shape, new: Shape) -> bool:
    """Whether going from `old` to `new` touches the sender's qdisc."""
    if mode == "netem":
        return old != new
    return old.rate_bps != new.rate_bps


def probe_netem() -> bool:
    """Whether this kernel has netem (the delay line's probe; needs root)."""
    from topology.delayline import kernel_has_netem

    has = kernel_has_netem()
    log.info("kernel %s the netem qdisc", "has" if has else "lacks")
    return has
