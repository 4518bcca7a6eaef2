"""Shard files, manifest hashes, and the home model built from a backbone."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from moe.errors import ExecutorError, ShardError, SpaceMoeError
from moe.model import LocalExecutor, ModelConfig, MoeLM, greedy_generate
from moe.shards import (
    ShardExecutor,
    cut_model,
    load_backbone,
    load_home_model,
    load_manifest,
    load_shard,
)

SMALL = ModelConfig(
    d_model=32, n_layers=2, n_heads=4, n_experts=4, top_k=2, d_expert=48, max_seq_len=64
)


@pytest.fixture(scope="module")
def model() -> MoeLM:
    m = MoeLM(SMALL)
    m.reset_parameters(seed=5)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.mul_(8.0)
    return m.eval()


@pytest.fixture()
def shard_dir(model: MoeLM, tmp_path: Path) -> Path:
    cut_model(model, tmp_path)
    return tmp_path


def test_manifest_lists_every_expert_with_its_hash(shard_dir: Path) -> None:
    manifest = load_manifest(shard_dir)
    assert manifest.experts_per_layer() == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}
    entry = manifest.shard(1, 2)
    data = entry.path.read_bytes()
    assert entry.sha256 == hashlib.sha256(data).hexdigest()
    assert entry.size_bytes == len(data)
    assert entry.parameters == ("w1", "w2", "w3")
    assert ModelConfig.from_dict(manifest.model_config) == SMALL


def test_home_model_with_shard_executor_matches_local(
    model: MoeLM, shard_dir: Path
) -> None:
    home = load_home_model(shard_dir)
    assert not any(".experts." in name for name, _ in home.named_parameters())

    prompt = b"for i in range(10):\n"
    local = greedy_generate(model, prompt, 10, LocalExecutor(model))
    remote = greedy_generate(home, prompt, 10, ShardExecutor(shard_dir))
    assert remote[0] == local[0]
    for a, b in zip(local[1], remote[1], strict=True):
        assert torch.equal(a, b)


def test_home_model_refuses_local_experts(shard_dir: Path) -> None:
    home = load_home_model(shard_dir)
    with pytest.raises(ExecutorError, match="without expert weights"):
        home.start_session().step(1)


def test_tampered_shard_names_file_and_both_hashes(shard_dir: Path) -> None:
    entry = load_manifest(shard_dir).shard(0, 3)
    data = bytearray(entry.path.read_bytes())
    data[-1] ^= 0x01
    entry.path.write_bytes(bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()

    with pytest.raises(ShardError) as caught:
        load_shard(entry)
    message = str(caught.value)
    assert str(entry.path) in message
    assert entry.sha256 in message
    assert actual in message
    assert isinstance(caught.value, SpaceMoeError)

    # The executor path refuses the same file rather than computing with it.
    with pytest.raises(ShardError, match="sha256"):
        ShardExecutor(shard_dir)(0, {3: torch.zeros(1, SMALL.d_model)})


def test_tampered_backbone_is_refused(shard_dir: Path) -> None:
    path = shard_dir / "backbone.safetensors"
    path.write_bytes(path.read_bytes()[:-1] + b" ")
    with pytest.raises(ShardError, match="backbone.safetensors"):
        load_backbone(shard_dir)


def test_load_shard_by_path_requires_hash(shard_dir: Path) -> None:
    entry = load_manifest(shard_dir).shard(0, 0)
    with pytest.raises(ShardError, match="expected_sha256"):
        load_shard(entry.path)
    weights = load_shard(entry.path, entry.sha256)
    assert weights["w1"].shape == (SMALL.d_expert, SMALL.d_model)


def test_restricted_executor_names_what_it_holds(shard_dir: Path) -> None:
    executor = ShardExecutor(shard_dir, only=[(0, 1)])
    executor(0, {1: torch.zeros(2, SMALL.d_model)})
    with pytest.raises(ShardError, match="layer 1 expert 0"):
        executor(1, {0: torch.zeros(2, SMALL.d_model)})


def test_missing_or_foreign_manifest(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="not found"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(ShardError, match="format"):
        load_manifest(tmp_path)
