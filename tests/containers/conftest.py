"""Fixtures for tests/containers: a private run directory and tiny shards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from moe.model import MoeLM
from tests.containers.support import write_tiny_shards


@pytest.fixture(autouse=True)
def private_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test keeps brokers, agents and logs under its own run directory."""
    monkeypatch.setenv("SPACEMOE_RUN_DIR", str(tmp_path / "run"))
    yield tmp_path / "run"


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[MoeLM, Path]:
    """The tiny model and a shard directory cut from it."""
    directory = tmp_path_factory.mktemp("shards")
    return write_tiny_shards(directory), directory
