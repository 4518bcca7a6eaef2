"""The offline training text: the Python standard library's own sources.

Every machine with this Python has the same files, so the corpus needs no
download. Files are split into train and validation by a hash of their path
relative to the stdlib root, so the split does not depend on listing order or
on where Python is installed; the test suite (``test/``) stays in, it is
Python like the rest.

Caveat: the bytes differ between Python minor versions, so figures measured
on 3.11 are comparable only with other 3.11 runs.
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from moe.errors import ConfigError

FILE_SEPARATOR = b"\n\n"


@dataclass(frozen=True)
class Corpus:
    """Train and validation bytes, plus the files each came from."""

    train: bytes
    validation: bytes
    train_files: tuple[str, ...]
    validation_files: tuple[str, ...]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_validation(relative_path: str, validation_per_mille: int) -> bool:
    """Deterministic split: a file is held out if its path hash falls low."""
    digest = hashlib.sha256(relative_path.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 1000 < validation_per_mille


def load_corpus(root: Path | None = None, validation_per_mille: int = 50) -> Corpus:
    """Read every .py file under the stdlib (excluding site-packages)."""
    root = root or stdlib_root()
    files = sorted(
        p
        for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "dist-packages" not in p.parts
    )
    if not files:
        raise ConfigError(
            f"no .py files under {root}; point load_corpus at a Python stdlib tree"
        )
    parts: dict[bool, list[bytes]] = {True: [], False: []}
    names: dict[bool, list[str]] = {True: [], False: []}
    for path in files:
        relative = path.relative_to(root).as_posix()
        held_out = is_validation(relative, validation_per_mille)
        parts[held_out].append(path.read_bytes())
        names[held_out].append(relative)
    return Corpus(
        train=FILE_SEPARATOR.join(parts[False]),
        validation=FILE_SEPARATOR.join(parts[True]),
        train_files=tuple(names[False]),
        validation_files=tuple(names[True]),
    )


def unigram_bits_per_byte(train: bytes, evaluate: bytes) -> float:
    """Cross-entropy of ``evaluate`` under add-one byte frequencies of ``train``."""
    counts = (
        torch.bincount(
            torch.frombuffer(bytearray(train), dtype=torch.uint8).long(), minlength=256
        ).double()
        + 1.0
    )
    log_probs = (counts / counts.sum()).log2()
    eval_counts = torch.bincount(
        torch.frombuffer(bytearray(evaluate), dtype=torch.uint8).long(), minlength=256
    ).double()
    return float(-(eval_counts * log_probs).sum() / max(len(evaluate), 1))


def as_tensor(data: bytes) -> Tensor:
    """Bytes as a 1-D uint8 tensor (a copy, so the bytes object stays immutable)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def eval_windows(data: Tensor, window: int, max_windows: int | None = None) -> Tensor:
    """Non-overlapping (n, window + 1) slices: input plus next-byte target.

    With ``max_windows`` the windows are spread evenly over the data so a
    small evaluation still sees every part of it.
    """
    total = (data.numel() - 1) // window
    if total < 1:
        raise ConfigError(f"{data.numel()} bytes is too short for window={window}")
    starts = torch.arange(total) * window
    if max_windows is not None and max_windows < total:
        pick = torch.linspace(0, total - 1, max_windows).round().long()
        starts = starts[pick]
    return torch.stack([data[s : s + window + 1] for s in starts.tolist()]).long()


def bits_per_byte_from_nats(nats: float) -> float:
    return nats / math.log(2)
