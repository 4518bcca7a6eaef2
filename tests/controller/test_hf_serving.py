"""Serving a local Hugging Face MoE directory over the real MQTT path (loopback).

The directory goes through the same steps as in `spacemoe up` / `infer`:
format detection, cutting into run_dir()/shards, the home model by family,
the checkpoint's own tokenizer, brokers and agents on 127.0.0.1. Tokens
must equal the original transformers model's greedy choice and logits
must agree within 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from controller.deployment import Deployment, ensure_shards, loopback_endpoints
from controller.inference import MoeConfig, MqttExecutor
from controller.latency import LoopbackPaths, format_report, infer
from controller.placement import PlacementContext, RoundRobinPolicy
from controller.testbed import moe_config
from moe.errors import CheckpointError
from moe.hf import HfMoeModel
from moe.serving import load_serving_models, resolve_model_source
from moe.shards import load_manifest
from tests.controller.hf_support import TEXTS, save_hf_checkpoint, save_tokenizer
from topology.config import from_dict
from topology.errors import ConfigError
from topology.scenario import Scenario

SATS = ["s0", "s1", "s2"]
HOME = "gs"
CONTEXT = PlacementContext(
    HOME, path_delay_s={n: 0.001 * i for i, n in enumerate(SATS)}
)
PROMPT = "the satellite carries"


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_hf_directory_served_over_mqtt_matches_the_original(
    family: str, tmp_path: Path
) -> None:
    source = tmp_path / family
    original = save_hf_checkpoint(source, family)

    shard_dir = ensure_shards(str(source))
    assert ensure_shards(str(source)) == shard_dir  # cut once, then reused
    manifest = load_manifest(shard_dir)
    assert manifest.family == family
    home_model, reference, tokenizer = load_serving_models(
        str(source), manifest, compare=True
    )
    assert isinstance(home_model, HfMoeModel) and home_model.blocks
    assert reference is not None

    experts = [(e.layer, e.expert) for e in manifest.shards]
    placement = RoundRobinPolicy(k=3).place(experts, SATS, CONTEXT)
    endpoints = loopback_endpoints([*SATS, HOME])
    deployment = Deployment(endpoints, shard_dir, namespaces=False)
    executor = MqttExecutor(endpoints, placement)
    try:
        deployment.start(placement)
        executor.connect()
        report = infer(
            home_model,
            executor,
            PROMPT,
            8,
            LoopbackPaths(),
            HOME,
            reference,
            tokenizer=tokenizer,
        )
    finally:
        executor.close()
        deployment.stop()

    assert report["reference"]["tokens_identical"]
    assert report["reference"]["max_abs_logit_diff"] <= 1e-5
    assert report["summary"]["payload_bytes_per_token"] > 0

    # Independently of compare_with_reference: the original model, run on
    # prompt + generated tokens at once, picks every generated token.
    prompt_ids = tokenizer.encode(PROMPT)
    assert report["prompt_ids"] == prompt_ids
    assert len(prompt_ids) < len(PROMPT.encode())  # BPE merged something
    tokens = report["tokens"]
    with torch.no_grad():
        logits = original(input_ids=torch.tensor([prompt_ids + tokens[:-1]])).logits
    assert logits.abs().max() > 1.0
    assert logits[0, len(prompt_ids) - 1 :].argmax(-1).tolist() == tokens
    assert report["text"] == tokenizer.decode(tokens)
    assert [row["text"] for row in report["rows"]] == [
        tokenizer.decode([t]) for t in tokens
    ]
    assert repr(report["text"]) in format_report(report)


def test_scenario_checkpoint_relative_to_the_scenario_file(tmp_path: Path) -> None:
    save_hf_checkpoint(tmp_path / "models" / "tiny", "qwen3_moe")
    scenario = Scenario(
        moe={"checkpoint": "models/tiny"}, source=str(tmp_path / "s.yaml")
    )
    config = moe_config(scenario)
    assert config.checkpoint == str(tmp_path / "models" / "tiny")
    assert resolve_model_source(config.checkpoint).family == "qwen3_moe"


def test_directory_of_neither_format_is_named(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ConfigError) as caught:
        from_dict(MoeConfig, {"checkpoint": str(tmp_path)}, "moe")
    message = str(caught.value)
    assert message.startswith("moe.checkpoint: ")
    assert str(tmp_path) in message
    assert "config.json" in message and ".safetensors" in message


def test_missing_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        from_dict(MoeConfig, {"checkpoint": str(tmp_path / "nope")}, "moe")


def test_dense_family_is_refused_with_the_supported_ones(tmp_path: Path) -> None:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    save_tokenizer(tmp_path)
    with pytest.raises(ConfigError) as caught:
        from_dict(MoeConfig, {"checkpoint": str(tmp_path)}, "moe")
    message = str(caught.value)
    assert "'llama'" in message and str(tmp_path) in message
    for family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        assert family in message


def test_missing_tokenizer_tells_where_to_put_it(tmp_path: Path) -> None:
    save_hf_checkpoint(tmp_path, "mixtral", with_tokenizer=False)
    with pytest.raises(CheckpointError, match="tokenizer") as caught:
        resolve_model_source(tmp_path)
    assert str(tmp_path) in str(caught.value)


def test_config_without_safetensors_is_named(tmp_path: Path) -> None:
    config = {"model_type": "qwen3_moe", "vocab_size": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*safetensors"):
        resolve_model_source(tmp_path)


def test_tokenizer_of_another_model_is_refused(tmp_path: Path) -> None:
    from moe.tokenizer import load_hf_tokenizer

    save_tokenizer(tmp_path)
    with pytest.raises(CheckpointError, match="vocab_size=64"):
        load_hf_tokenizer(tmp_path, vocab_size=64)
    assert (
        load_hf_tokenizer(tmp_path).decode(load_hf_tokenizer(tmp_path).encode(TEXTS[0]))
        == (TEXTS[0])
    )
