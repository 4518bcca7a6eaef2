"""Errors raised by the MoE package.

ShardError and InferenceError come from the project's one error tree
(topology.errors); this module only adds the cases that belong to the model.
"""

from __future__ import annotations

from topology.errors import ConfigError, InferenceError, ShardError, SpaceMoeError

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ExecutorError",
    "InferenceError",
    "ShardError",
    "SpaceMoeError",
]


class ExecutorError(InferenceError):
    """An expert executor returned rows that do not fit the batches it was given."""


class CheckpointError(SpaceMoeError):
    """A model checkpoint is missing, malformed, or of an unsupported family."""
