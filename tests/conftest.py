"""Fixtures shared by every test package.

`net_sandbox` (defined with the emulation tests) gives a test module
private network and mount namespaces, so root tests neither see nor
disturb a scenario that someone runs on the same machine. Entering and
leaving a mount namespace needs a single-threaded process, so torch is
kept to one thread here before any test runs a torch operation (its
OpenMP pool would otherwise stay alive for the rest of the session).
"""

import torch

from tests.topology.conftest import net_sandbox  # noqa: F401

torch.set_num_threads(1)
torch.set_num_interop_threads(1)
