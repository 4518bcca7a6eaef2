"""Hugging Face MoE families: cut into shards, serve split, compare with the original.

Tiny random models are built locally from a config (no download). Weights
use initializer_range=0.3 so routing is decisive and logits are O(1), which
makes a 1e-5 agreement a real check.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import save_file

from moe.errors import CheckpointError
from moe.hf import cut_hf_checkpoint, load_hf_home_model, wrap_hf_model
from moe.model import RoutingDecision, greedy_generate
from moe.shards import ShardExecutor, load_manifest, load_shard

# Everything is built locally; never reach for the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

COMMON: dict[str, Any] = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    num_experts_per_tok=2,
    initializer_range=0.3,
    tie_word_embeddings=False,
)

FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(intermediate_size=48, num_local_experts=4),
    ),
    # Layer 1 dense (mlp_only_layers) so sparse/dense interleaving is covered;
    # the shared expert and its sigmoid gate stay on the home node.
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            intermediate_size=40,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_experts=4,
            mlp_only_layers=[1],
            norm_topk_prob=False,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            intermediate_size=40,
            moe_intermediate_size=24,
            num_experts=4,
            norm_topk_prob=True,
            head_dim=8,
        ),
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(
            intermediate_size=24,
            num_experts=4,
            norm_topk_prob=False,
            eos_token_id=None,
            pad_token_id=None,
        ),
    ),
}


def build(family: str) -> torch.nn.Module:
    config_name, model_name, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**COMMON, **extra)
    return getattr(transformers, model_name)(config).eval()


@torch.no_grad()
def cached_reference(
    model: torch.nn.Module, tokens: list[int], prompt_len: int
) -> torch.Tensor:
    """The original model decoding with its own KV cache, logits per position."""
    cache = transformers.DynamicCache(config=model.config)
    ids = torch.tensor([tokens])
    first = model(input_ids=ids[:, :prompt_len], cache=cache, use_cache=True).logits[0]
    rows = [first[-1]]
    for pos in range(prompt_len, len(tokens) - 1):
        rows.append(
            model(input_ids=ids[:, pos : pos + 1], cache=cache, use_cache=True).logits[
                0, -1
            ]
        )
    return torch.stack(rows)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_split_model_matches_original(family: str, tmp_path: Path) -> None:
    original = build(family)
    original.save_pretrained(tmp_path / "src")
    manifest_path = cut_hf_checkpoint(tmp_path / "src", tmp_path / "shards")
    home = load_hf_home_model(manifest_path)
    executor = ShardExecutor(manifest_path)

    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = original(input_ids=ids).logits
    got = home.forward_logits(ids, executor)
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

    # Decoding with the KV cache agrees with the original's own cached decode.
    prompt = [5, 17, 33, 2]
    decisions: list[RoutingDecision] = []
    tokens, logits = greedy_generate(home, prompt, 6, executor, decisions.append)
    reference = cached_reference(original, prompt + tokens, len(prompt))
    torch.testing.assert_close(torch.stack(logits), reference, atol=1e-5, rtol=0)
    assert tokens == reference.argmax(-1).tolist()

    # Routing as the family defines it: weights renormalised only with
    # norm_topk_prob (Mixtral always renormalises).
    renormalised = (
        getattr(original.config, "norm_topk_prob", True) or family == "mixtral"
    )
    sums = torch.cat([d.weights.sum(-1) for d in decisions])
    assert bool(torch.allclose(sums, torch.ones_like(sums))) == renormalised
    moe_layers = sorted({d.layer for d in decisions})
    assert moe_layers == (
        [0, 2] if family == "qwen2_moe" else list(range(COMMON["num_hidden_layers"]))
    )


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_fused_and_per_expert_layouts_cut_identically(
    family: str, tmp_path: Path
) -> None:
    original = build(family)
    original.save_pretrained(tmp_path / "legacy")

    # transformers 5 holds experts fused; write that layout by hand.
    fused = tmp_path / "fused"
    fused.mkdir()
    state = {
        k: v.detach().clone().contiguous() for k, v in original.state_dict().items()
    }
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, str(fused / "model.safetensors"))
    (fused / "config.json").write_text(
        (tmp_path / "legacy" / "config.json").read_text()
    )

    a = load_manifest(cut_hf_checkpoint(tmp_path / "legacy", tmp_path / "cut_a"))
    b = load_manifest(cut_hf_checkpoint(fused, tmp_path / "cut_b"))
    assert [e.sha256 for e in a.shards] == [e.sha256 for e in b.shards]

    # Round trip: a shard holds exactly that expert's slice of the fused tensors.
    experts = original.model.layers[2].mlp.experts
    size = experts.down_proj.shape[-1]
    weights = load_shard(a.shard(2, 3))
    assert torch.equal(weights["w1"], experts.gate_up_proj[3, :size])
    assert torch.equal(weights["w3"], experts.gate_up_proj[3, size:])
    assert torch.equal(weights["w2"], experts.down_proj[3])


def test_wrapping_a_loaded_model_serves_from_shards(tmp_path: Path) -> None:
    original = build("qwen2_moe")
    original.save_pretrained(tmp_path / "src")
    manifest_path = cut_hf_checkpoint(tmp_path / "src", tmp_path / "shards")

    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src")
    served = wrap_hf_model(loaded)
    assert sorted(served.blocks) == [0, 2]
    assert not any(".experts." in name for name, _ in loaded.named_parameters())

    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = original(input_ids=ids).logits
    got = served.forward_logits(ids, ShardExecutor(manifest_path))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_unsupported_family_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="'llama'"):
        cut_hf_checkpoint(tmp_path, tmp_path / "out")
