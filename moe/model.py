"""A Mixtral-style byte-level decoder-only MoE language model.

Architecture: byte embedding, ``n_layers`` pre-norm blocks of (RMSNorm,
causal multi-head attention with rotary position embeddings, RMSNorm, sparse
MoE of SwiGLU experts), final RMSNorm and a linear head over 256 bytes.

The seam that makes the model distributable: a MoE layer never computes its
experts. It routes each token (linear gate, top-k, softmax over the chosen
logits as in Mixtral), groups the token rows by expert, and hands the groups
to an :class:`ExpertExecutor`. :class:`LocalExecutor` runs them in this
process; a remote executor ships the rows to whoever holds the expert's
weights, and that party calls :func:`expert_forward`, the same function the
local path calls, so given the same input rows both paths produce
bit-identical outputs.

Two ways to run the model share every line of the layer code:
:meth:`MoeLM.full_forward` (batched, all positions, used for training and
evaluation) and :class:`Session` (batch of one, KV cache, used for decoding).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe.errors import ConfigError, ExecutorError, InferenceError

EXPERT_PARAM_NAMES = ("w1", "w2", "w3")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a :class:`MoeLM`; the defaults are the shipped checkpoint's."""

    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_experts: int = 8
    top_k: int = 2
    d_expert: int = 512
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        checks = [
            ("vocab_size", self.vocab_size >= 2, "at least 2"),
            ("d_model", self.d_model >= 2, "at least 2"),
            ("n_layers", self.n_layers >= 1, "at least 1"),
            ("n_heads", self.n_heads >= 1, "at least 1"),
            ("n_experts", self.n_experts >= 1, "at least 1"),
            ("top_k", 1 <= self.top_k <= self.n_experts, "between 1 and n_experts"),
            ("d_expert", self.d_expert >= 1, "at least 1"),
            ("max_seq_len", self.max_seq_len >= 1, "at least 1"),
            ("rope_theta", self.rope_theta > 0, "positive"),
            ("rms_norm_eps", self.rms_norm_eps > 0, "positive"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(
                    f"ModelConfig.{name}={getattr(self, name)!r}: must be {expected}"
                )
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ConfigError(
                f"ModelConfig.d_model={self.d_model} with n_heads={self.n_heads}: "
                "d_model must split into n_heads heads of even width (for RoPE)"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict (e.g. a manifest), naming any unknown key."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"ModelConfig got unknown keys {unknown}; expected a subset of "
                f"{sorted(known)}"
            )
        return cls(**data)


class ExpertExecutor(Protocol):
    """Runs the experts of one MoE layer on grouped token rows.

    ``batches`` maps expert id to its input rows, shape (n_i, d_model); the
    result maps the same ids to output rows of the same shape and order.
    """

    def __call__(self, layer: int, batches: dict[int, Tensor]) -> dict[int, Tensor]: ...


@dataclass
class RoutingDecision:
    """Which experts one MoE layer chose for each token and with what weight.

    ``expert_ids`` and ``weights`` have shape (n_tokens, top_k); row i is the
    i-th token given to the layer in this call.
    """

    layer: int
    expert_ids: Tensor
    weights: Tensor

    def tokens_per_expert(self) -> dict[int, int]:
        ids, counts = self.expert_ids.flatten().unique(return_counts=True)
        return {int(e): int(c) for e, c in zip(ids, counts, strict=True)}


RoutingCallback = Callable[[RoutingDecision], None]


def expert_forward(weights: dict[str, Tensor], x: Tensor) -> Tensor:
    """One SwiGLU expert: ``w2 @ (silu(w1 @ x) * (w3 @ x))`` per row.

    ``weights`` holds w1 (d_expert, d_model), w3 (d_expert, d_model) and
    w2 (d_model, d_expert), i.e. nn.Linear layout. Every executor, local or
    remote, must call this so outputs are bit-identical for the same rows.
    """
    gate = F.linear(x, weights["w1"])
    up = F.linear(x, weights["w3"])
    return F.linear(F.silu(gate) * up, weights["w2"])


def dispatch_to_experts(
    x: Tensor,
    expert_ids: Tensor,
    weights: Tensor,
    layer: int,
    executor: ExpertExecutor,
) -> Tensor:
    """Group rows of ``x`` by chosen expert, run them, and mix the results.

    ``expert_ids``/``weights`` are (n, top_k). Rows are sent in token order
    within each expert, and outputs are summed in ascending expert order, so
    the result depends only on the rows, never on who computed them.
    """
    batches: dict[int, Tensor] = {}
    placement: dict[int, tuple[Tensor, Tensor]] = {}
    for expert in expert_ids.unique().tolist():
        rows, slots = (expert_ids == expert).nonzero(as_tuple=True)
        batches[expert] = x[rows]
        placement[expert] = (rows, slots)

    outputs = executor(layer, batches)

    missing = sorted(set(batches) - set(outputs))
    if missing:
        raise ExecutorError(
            f"executor returned no rows for layer {layer} experts {missing}; "
            f"it must answer every expert it is given ({sorted(batches)})"
        )
    mixed = torch.zeros_like(x)
    for expert in sorted(batches):
        rows, slots = placement[expert]
        out = outputs[expert]
        if out.shape != batches[expert].shape:
            raise ExecutorError(
                f"executor returned shape {tuple(out.shape)} for layer {layer} "
                f"expert {expert}; expected {tuple(batches[expert].shape)}"
            )
        out = out.to(dtype=x.dtype, device=x.device) * weights[rows, slots, None]
        mixed.index_add_(0, rows, out.to(mixed.dtype))
    return mixed


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * scale * self.weight


def rope_tables(cfg: ModelConfig) -> tuple[Tensor, Tensor]:
    """cos/sin tables (max_seq_len, head_dim) for rotate-half RoPE."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (
        cfg.rope_theta ** (torch.arange(half, dtype=torch.float64) / half)
    )
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (..., T, head_dim) by the tables' rows for those T positions."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: list[Tensor] | None = None,
    ) -> Tensor:
        """x (B, T, d). With ``cache`` ([k, v], possibly empty), append to it."""
        b, t, _ = x.shape

        def heads(proj: nn.Linear) -> Tensor:
            return proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

        q = apply_rope(heads(self.wq), cos, sin)
        k = apply_rope(heads(self.wk), cos, sin)
        v = heads(self.wv)

        # A cache that already holds positions makes a prefix every new query
        # may see, so the causal mask must be offset by the cached length.
        past = 0
        if cache is not None:
            if cache:
                past = cache[0].shape[2]
                k = torch.cat([cache[0], k], dim=2)
                v = torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
        elif t == 1:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            mask = torch.ones(t, past + t, dtype=torch.bool).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class Expert(nn.Module):
    """Weights of one SwiGLU expert; the arithmetic lives in expert_forward."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(cfg.d_expert, cfg.d_model))
        self.w3 = nn.Parameter(torch.empty(cfg.d_expert, cfg.d_model))
        self.w2 = nn.Parameter(torch.empty(cfg.d_model, cfg.d_expert))

    def weights(self) -> dict[str, Tensor]:
        return {"w1": self.w1, "w2": self.w2, "w3": self.w3}


class MoeLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, with_experts: bool = True) -> None:
        super().__init__()
        self.top_k = cfg.top_k
        self.gate = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        count = cfg.n_experts if with_experts else 0
        self.experts = nn.ModuleList(Expert(cfg) for _ in range(count))

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (n, d) -> (router logits (n, E), expert ids (n, k), weights (n, k))."""
        logits = self.gate(x)
        top_logits, expert_ids = logits.topk(self.top_k, dim=-1)
        return logits, expert_ids, top_logits.softmax(dim=-1)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, with_experts: bool = True) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.moe_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.moe = MoeLayer(cfg, with_experts)


@dataclass
class ForwardExtras:
    """What full_forward also returns: router logits and the routing per layer."""

    router_logits: list[Tensor] = field(default_factory=list)
    routing: list[RoutingDecision] = field(default_factory=list)


class MoeLM(nn.Module):
    """The byte-level MoE language model (see the module docstring).

    ``with_experts=False`` builds the home node's part only: everything but
    the expert weights, which then live wherever the executor sends rows.
    """

    def __init__(
        self, cfg: ModelConfig | None = None, with_experts: bool = True
    ) -> None:
        super().__init__()
        self.cfg = cfg or ModelConfig()
        self.has_experts = with_experts
        self.embed = nn.Embedding(self.cfg.vocab_size, self.cfg.d_model)
        self.layers = nn.ModuleList(
            Block(self.cfg, with_experts) for _ in range(self.cfg.n_layers)
        )
        self.norm = RMSNorm(self.cfg.d_model, self.cfg.rms_norm_eps)
        self.head = nn.Linear(self.cfg.d_model, self.cfg.vocab_size, bias=False)
        cos, sin = rope_tables(self.cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> None:
        """GPT-2 style init; output projections scaled down by depth."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = 0.02
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                elif name.endswith(("wo.weight", ".w2")):
                    param.normal_(0.0, out_std, generator=gen)
                else:
                    param.normal_(0.0, std, generator=gen)

    def expert_weights(self, layer: int, expert: int) -> dict[str, Tensor]:
        """The named weights of one (layer, expert), as expert_forward takes them."""
        if not self.has_experts:
            raise ExecutorError(
                "this model was built without expert weights (a home model from a "
                "shard manifest); run experts with a ShardExecutor or a remote executor"
            )
        block = self.layers[layer]
        assert isinstance(block, Block)
        module = block.moe.experts[expert]
        assert isinstance(module, Expert)
        return module.weights()

    def rope_table(self, positions: slice) -> tuple[Tensor, Tensor]:
        cos, sin = self.rope_cos, self.rope_sin
        assert isinstance(cos, Tensor) and isinstance(sin, Tensor)
        return cos[positions], sin[positions]

    def backbone_state_dict(self) -> dict[str, Tensor]:
        """Every weight except the experts' (what the home node keeps)."""
        return {k: v for k, v in self.state_dict().items() if ".experts." not in k}

    def _run_block(
        self,
        index: int,
        x: Tensor,
        positions: slice,
        executor: ExpertExecutor,
        cache: list[Tensor] | None,
        on_routing: RoutingCallback | None = None,
    ) -> tuple[Tensor, Tensor, RoutingDecision]:
        block = self.layers[index]
        assert isinstance(block, Block)
        cos, sin = self.rope_table(positions)
        x = x + block.attn(block.attn_norm(x), cos, sin, cache)

        flat = block.moe_norm(x).reshape(-1, self.cfg.d_model)
        logits, expert_ids, weights = block.moe.route(flat)
        decision = RoutingDecision(index, expert_ids.detach(), weights.detach())

        # Report the decision before the experts run, so a controller can log
        # or act on it even if a remote expert call then fails.
        if on_routing is not None:
            on_routing(decision)
        mixed = dispatch_to_experts(flat, expert_ids, weights, index, executor)
        return x + mixed.view_as(x), logits, decision

    def full_forward(
        self, tokens: Tensor, executor: ExpertExecutor | None = None
    ) -> tuple[Tensor, ForwardExtras]:
        """Logits (B, T, vocab) for every position of ``tokens`` (B, T).

        No cache; used for training and evaluation. Defaults to running the
        experts in process.
        """
        b, t = tokens.shape
        if t > self.cfg.max_seq_len:
            raise InferenceError(
                f"sequence of {t} tokens exceeds max_seq_len={self.cfg.max_seq_len}; "
                "split it into windows"
            )
        executor = executor or LocalExecutor(self)
        extras = ForwardExtras()
        x = self.embed(tokens)
        for index in range(self.cfg.n_layers):
            x, logits, decision = self._run_block(index, x, slice(0, t), executor, None)
            extras.router_logits.append(logits)
            extras.routing.append(decision)
        return self.head(self.norm(x)), extras

    def start_session(
        self,
        executor: ExpertExecutor | None = None,
        on_routing: RoutingCallback | None = None,
    ) -> Session:
        """A decoding session (batch of one) with its own KV cache."""
        return Session(self, executor or LocalExecutor(self), on_routing)


class LocalExecutor:
    """Runs every expert in this process from the model's own weights."""

    def __init__(self, model: MoeLM) -> None:
        self.model = model

    def __call__(self, layer: int, batches: dict[int, Tensor]) -> dict[int, Tensor]:
        return {
            expert: expert_forward(self.model.expert_weights(layer, expert), rows)
            for expert, rows in batches.items()
        }


class Session:
    """Incremental decoding with a KV cache.

    ``last_routing`` holds one RoutingDecision per layer for the latest
    prefill or step; ``on_routing`` (if given) is called with each as soon
    as it is made, before that layer's experts run.
    """

    def __init__(
        self,
        model: MoeLM,
        executor: ExpertExecutor,
        on_routing: RoutingCallback | None = None,
    ) -> None:
        self.model = model
        self.executor = executor
        self.on_routing = on_routing
        self.caches: list[list[Tensor]] = [[] for _ in range(model.cfg.n_layers)]
        self.position = 0
        self.last_routing: list[RoutingDecision] = []

    @torch.no_grad()
    def _advance(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[0]
        limit = self.model.cfg.max_seq_len
        if self.position + t > limit:
            raise InferenceError(
                f"session at position {self.position} cannot take {t} more tokens: "
                f"max_seq_len={limit}; start a new session with a shorter context"
            )
        positions = slice(self.position, self.position + t)
        x = self.model.embed(tokens.view(1, t))
        self.last_routing = []
        for index in range(self.model.cfg.n_layers):
            x = self._layer(index, x, positions)
        self.position += t
        return self.model.head(self.model.norm(x))[0]

    def _layer(self, index: int, x: Tensor, positions: slice) -> Tensor:
        x, _, decision = self.model._run_block(
            index, x, positions, self.executor, self.caches[index], self.on_routing
        )
        self.last_routing.append(decision)
        return x

    def prefill(self, tokens: Tensor | list[int] | bytes) -> Tensor:
        """Feed a prompt; returns logits (T, vocab) for each of its positions."""
        tensor = as_token_tensor(tokens)
        if tensor.numel() == 0:
            raise InferenceError("prefill got an empty prompt; give at least one byte")
        return self._advance(tensor)

    def step(self, token: int) -> Tensor:
        """Feed one token; returns the logits (vocab,) for the next one."""
        return self._advance(torch.tensor([token], dtype=torch.long))[0]


def as_token_tensor(tokens: Tensor | list[int] | bytes) -> Tensor:
    """A 1-D long tensor from bytes, a list of ids, or a tensor."""
    if isinstance(tokens, bytes | bytearray):
        return torch.tensor(list(tokens), dtype=torch.long)
    if isinstance(tokens, Tensor):
        return tokens.reshape(-1).long()
    return torch.tensor(tokens, dtype=torch.long)


def greedy_generate(
    model: MoeLM,
    prompt_bytes: bytes,
    n_tokens: int,
    executor: ExpertExecutor | None = None,
    on_routing: RoutingCallback | None = None,
) -> tuple[list[int], list[Tensor]]:
    """Greedy decoding: the ``n_tokens`` chosen bytes and each one's logits."""
    session = model.start_session(executor, on_routing)
    logits = session.prefill(prompt_bytes)[-1]
    tokens: list[int] = []
    all_logits: list[Tensor] = []
    for _ in range(n_tokens):
        token = int(logits.argmax())
        tokens.append(token)
        all_logits.append(logits)
        if len(tokens) == n_tokens:
            break
        logits = session.step(token)
    return tokens, all_logits
