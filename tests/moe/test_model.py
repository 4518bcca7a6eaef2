"""The model's two paths (batched and KV-cached) and the executor seam."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load, save

from moe.errors import ConfigError, ExecutorError, InferenceError
from moe.model import (
    LocalExecutor,
    ModelConfig,
    MoeLM,
    RoutingDecision,
    expert_forward,
    greedy_generate,
)

SMALL = ModelConfig(
    d_model=32, n_layers=2, n_heads=4, n_experts=4, top_k=2, d_expert=48, max_seq_len=64
)


@pytest.fixture(scope="module")
def model() -> MoeLM:
    torch.manual_seed(0)
    m = MoeLM(SMALL)

    # Larger weights than the training init so routing and logits are far
    # from uniform and a wrong mix of experts would show.
    m.reset_parameters(seed=1)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.mul_(8.0)
    return m.eval()


def test_session_matches_full_forward(model: MoeLM) -> None:
    tokens = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, extras = model.full_forward(tokens.view(1, -1))

    session = model.start_session()
    first = session.prefill(tokens[:25])
    stepped = [session.step(int(t)) for t in tokens[25:]]
    incremental = torch.cat([first, torch.stack(stepped)])

    assert full.abs().max() > 1.0
    torch.testing.assert_close(incremental, full[0], atol=1e-5, rtol=1e-5)
    assert len(session.last_routing) == SMALL.n_layers
    last_ids = extras.routing[0].expert_ids[-1]
    assert torch.equal(session.last_routing[0].expert_ids[0], last_ids)


def test_prefill_in_two_chunks_matches_one(model: MoeLM) -> None:
    tokens = list(b"def f(x):\n    return x + 1\n")
    one = model.start_session().prefill(tokens)
    session = model.start_session()
    two = torch.cat([session.prefill(tokens[:10]), session.prefill(tokens[10:])])
    torch.testing.assert_close(two, one, atol=1e-5, rtol=1e-5)


def test_batched_full_forward_matches_single_rows(model: MoeLM) -> None:
    tokens = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        batched, _ = model.full_forward(tokens)
        single = torch.cat([model.full_forward(row.view(1, -1))[0] for row in tokens])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def pack_rows(rows: torch.Tensor) -> bytes:
    return save({"rows": rows.contiguous()})


def unpack_rows(data: bytes) -> torch.Tensor:
    return load(data)["rows"]


class WireExecutor:
    """Remote-like: rows and weights cross a byte boundary, as over MQTT."""

    def __init__(self, model: MoeLM) -> None:
        self.weights = {
            (layer, e): {
                k: unpack_rows(pack_rows(v))
                for k, v in model.expert_weights(layer, e).items()
            }
            for layer in range(model.cfg.n_layers)
            for e in range(model.cfg.n_experts)
        }
        self.calls: list[tuple[int, dict[int, int]]] = []

    def __call__(
        self, layer: int, batches: dict[int, torch.Tensor]
    ) -> dict[int, torch.Tensor]:
        self.calls.append((layer, {e: rows.shape[0] for e, rows in batches.items()}))
        answers = {}
        for expert, rows in batches.items():
            received = unpack_rows(pack_rows(rows))
            answers[expert] = unpack_rows(
                pack_rows(expert_forward(self.weights[(layer, expert)], received))
            )
        return answers


def test_remote_like_executor_is_bit_identical(model: MoeLM) -> None:
    prompt = b"import sys\n"
    local_tokens, local_logits = greedy_generate(
        model, prompt, 12, LocalExecutor(model)
    )
    wire = WireExecutor(model)
    remote_tokens, remote_logits = greedy_generate(model, prompt, 12, wire)

    assert remote_tokens == local_tokens
    for a, b in zip(local_logits, remote_logits, strict=True):
        assert torch.equal(a, b)

    # Prefill sends every prompt row; each later step sends top_k rows per layer.
    layer0 = [sizes for layer, sizes in wire.calls if layer == 0]
    assert sum(layer0[0].values()) == len(prompt) * SMALL.top_k
    assert all(sum(sizes.values()) == SMALL.top_k for sizes in layer0[1:])


def test_routing_callback_sees_each_layer_before_experts(model: MoeLM) -> None:
    seen: list[RoutingDecision] = []
    order: list[str] = []

    def executor(
        layer: int, batches: dict[int, torch.Tensor]
    ) -> dict[int, torch.Tensor]:
        order.append(f"run{layer}")
        return LocalExecutor(model)(layer, batches)

    def on_routing(decision: RoutingDecision) -> None:
        order.append(f"route{decision.layer}")
        seen.append(decision)

    session = model.start_session(executor, on_routing)
    session.step(65)
    assert order == ["route0", "run0", "route1", "run1"]
    for decision in seen:
        assert decision.expert_ids.shape == (1, SMALL.top_k)
        assert torch.allclose(decision.weights.sum(-1), torch.ones(1))
        assert sum(decision.tokens_per_expert().values()) == SMALL.top_k


def test_executor_missing_expert_raises(model: MoeLM) -> None:
    def lazy(layer: int, batches: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return {}

    with pytest.raises(ExecutorError, match="no rows for layer 0"):
        model.start_session(lazy).step(1)


def test_session_refuses_past_max_seq_len(model: MoeLM) -> None:
    session = model.start_session()
    session.prefill(bytes(SMALL.max_seq_len))
    with pytest.raises(InferenceError, match="max_seq_len"):
        session.step(0)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match="top_k"):
        ModelConfig(n_experts=4, top_k=5)
    with pytest.raises(ConfigError, match="unknown keys"):
        ModelConfig.from_dict({"d_model": 64, "depth": 3})


def test_expert_params_are_separable() -> None:
    m = MoeLM(SMALL)
    names = [n for n, _ in m.named_parameters() if ".experts." in n]
    assert len(names) == SMALL.n_layers * SMALL.n_experts * 3
    assert "layers.1.moe.experts.3.w2" in names
    assert not any(".experts." in k for k in m.backbone_state_dict())
