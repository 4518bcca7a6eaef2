"""The exceptions the testbed raises.

One small tree, so callers can catch what they can handle::

    SpaceMoeError
    ├── ConfigError        a scenario or option is wrong (names field, value, fix)
    ├── TleError           a TLE line does not parse or fails its checksum
    ├── EmulationError     the kernel or a helper process refused what we asked
    │   └── CommandError   an external command failed (carries argv and stderr)
    ├── MonitoringError    Prometheus cannot be reached or rejected a query
    ├── NodeNotFound       a node name that the running scenario does not have
    ├── ShardError         an expert shard is missing or its hash does not match
    └── InferenceError     a request could not be served (names the cause)
        └── InferenceTimeout

Every message names the value received, what was expected, and how to fix
it. Library code raises; only the command-line tool turns these into exit
codes.
"""

from __future__ import annotations

from collections.abc import Sequence


class SpaceMoeError(Exception):
    """Base class of every error the testbed raises on purpose."""


class ConfigError(SpaceMoeError):
    """A scenario file, option or argument is invalid."""


class TleError(SpaceMoeError):
    """A two-line element set is malformed."""


class EmulationError(SpaceMoeError):
    """Building or changing the emulated network failed."""


class CommandError(EmulationError):
    """An external command exited non-zero.

    The message carries the argument list and the command's stderr so the
    failure can be reproduced by hand.
    """

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        super().__init__(
            f"command {' '.join(self.argv)!r} exited with {returncode}: "
            f"{self.stderr or '(no stderr)'}"
        )


class MonitoringError(SpaceMoeError):
    """Prometheus is unreachable, or a query failed (the message has the query)."""


class NodeNotFound(SpaceMoeError):
    """A node name that is not part of the running scenario."""


class ShardError(SpaceMoeError):
    """An expert shard is missing, unreadable, or fails its content hash."""


class InferenceError(SpaceMoeError):
    """A generation request could not be completed; the message names why."""


class InferenceTimeout(InferenceError):
    """A request to an expert agent got no reply in time."""
