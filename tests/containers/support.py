"""Shared pieces for the agent and inference tests: a small model and its shards."""

from __future__ import annotations

import socket
from pathlib import Path

import torch

from moe.model import ModelConfig, MoeLM
from moe.shards import cut_model

# Small enough to run in milliseconds, big enough to route: 2 layers of 4
# experts, top-2.
TINY = ModelConfig(
    d_model=32, n_layers=2, n_heads=2, n_experts=4, top_k=2, d_expert=64, max_seq_len=96
)


def tiny_model(seed: int = 0) -> MoeLM:
    """A randomly initialised small MoeLM (weights fixed by `seed`)."""
    torch.manual_seed(seed)
    model = MoeLM(TINY)
    model.reset_parameters(seed)
    return model.eval()


def write_tiny_shards(directory: Path, seed: int = 0) -> MoeLM:
    """Cut the tiny model into `directory`; return the model."""
    model = tiny_model(seed)
    cut_model(model, directory)
    return model


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
