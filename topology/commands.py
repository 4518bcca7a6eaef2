"""Running external commands as argument lists.

Only set-up and tear-down paths use this: per-timestep changes go through
netlink. A failure raises :class:`CommandError` with the command and stderr.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence

from topology.errors import CommandError

log = logging.getLogger(__name__)


def run(
    argv: Sequence[str],
    *,
    input_text: str | None = None,
    check: bool = True,
    timeout_s: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Run `argv` without a shell; raise CommandError if it fails."""
    log.debug("run %s", " ".join(argv))
    proc = subprocess.run(
        list(argv),
        input=input_text,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stderr)
    return proc
