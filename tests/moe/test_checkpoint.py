"""The shipped checkpoint has learned Python; the training entry point works."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe.checkpoint import checkpoint_paths, load_checkpoint, read_metadata
from moe.corpus import as_tensor, eval_windows, load_corpus, unigram_bits_per_byte
from moe.errors import CheckpointError
from moe.model import MoeLM, greedy_generate
from moe.train import evaluate_bits_per_byte, main


@pytest.fixture(scope="module")
def shipped() -> MoeLM:
    return load_checkpoint()


def test_shipped_checkpoint_beats_unigram_on_held_out_files(shipped: MoeLM) -> None:
    corpus = load_corpus()
    validation = as_tensor(corpus.validation)

    # Eight 512-byte windows spread over the held-out files; the unigram
    # baseline is scored on exactly the bytes the model predicts.
    windows = eval_windows(validation, 512, max_windows=8)
    model_bpb = evaluate_bits_per_byte(shipped, validation, 512, max_windows=8)
    targets = bytes(windows[:, 1:].flatten().to(torch.uint8).tolist())
    unigram_bpb = unigram_bits_per_byte(corpus.train, targets)

    assert unigram_bpb > 4.0
    assert model_bpb < unigram_bpb - 1.5, (model_bpb, unigram_bpb)


def test_shipped_metadata_records_the_run() -> None:
    meta = read_metadata()
    assert meta["validation_bpb"] < meta["unigram_validation_bpb"]
    assert meta["command"].startswith("python -m moe.train")
    assert meta["tokens_seen"] > 1_000_000
    weights, _ = checkpoint_paths()
    assert weights.stat().st_size < 32 * 2**20


def test_shipped_checkpoint_writes_python(shipped: MoeLM) -> None:
    tokens, _ = greedy_generate(shipped, b"import os\n\n\ndef ", 60)
    text = bytes(tokens).decode("utf-8", errors="replace")
    assert "(" in text or ":" in text or "=" in text, text


def test_missing_checkpoint_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="moe.train"):
        load_checkpoint(tmp_path)


def test_train_entry_point_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    args = ["--out", str(tmp_path), "--minutes", "0.03", "--batch-size", "2"]
    args += ["--seq-len", "32", "--final-eval-windows", "1", "--sample-bytes", "4"]
    assert main(args) == 0
    meta = json.loads((tmp_path / "moe-byte-stdlib.json").read_text())
    assert meta["steps"] >= 1 and meta["validation_bpb"] > 0
    assert isinstance(load_checkpoint(tmp_path), MoeLM)
