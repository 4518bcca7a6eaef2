"""Import Hugging Face MoE checkpoints from a local directory and serve them split.

Supported families (``model_type`` in config.json): mixtral, qwen2_moe,
qwen3_moe, olmoe. All four use SiLU-gated (SwiGLU) experts, so each expert
becomes a standard shard that :func:`moe.model.expert_forward` computes.

Two halves:

* :func:`cut_hf_checkpoint` reads config.json and the safetensors files
  directly (no transformers needed) and writes a shard directory
  (see moe.shards). It understands both per-expert key layouts
  (``...experts.N.w1/w2/w3.weight`` as Mixtral ships, ``...experts.N.
  gate_proj/up_proj/down_proj.weight`` as Qwen and OLMoE ship) and the fused
  transformers-5 layout (``mlp.experts.gate_up_proj`` (E, 2I, H) whose first
  I rows are the gate, ``mlp.experts.down_proj`` (E, H, I)).
* :func:`load_hf_home_model` builds the model with transformers from the
  shard directory's config and backbone, and replaces every sparse MoE block
  by :class:`RoutedMoeBlock`, which keeps the original router module (so
  routing is computed by the family's own code: softmax before top-k,
  ``norm_topk_prob``) and hands the rows to an ExpertExecutor. Qwen2-MoE's
  shared expert and its sigmoid gate stay on the home node, in the backbone.

Caveats: Mixtral's router jitter (training only) is not reproduced; serve in
eval mode. The home model is created with random expert tensors that are
dropped at once, so home needs that memory transiently.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from moe.errors import CheckpointError, InferenceError, ShardError
from moe.model import (
    ExpertExecutor,
    RoutingCallback,
    RoutingDecision,
    as_token_tensor,
    dispatch_to_experts,
)
from moe.shards import Manifest, load_backbone, load_manifest, write_shards

log = logging.getLogger(__name__)

SUPPORTED_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")

# Per-expert names -> our shard names (w1 gate, w3 up, w2 down).
PROJECTION_NAMES = {
    "w1": "w1",
    "w3": "w3",
    "w2": "w2",
    "gate_proj": "w1",
    "up_proj": "w3",
    "down_proj": "w2",
}
_PER_EXPERT = re.compile(
    r"^(?P<prefix>.*\.layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe))\.experts\."
    r"(?P<expert>\d+)\.(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)
_FUSED = re.compile(
    r"^(?P<prefix>.*\.layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe))\.experts\."
    r"(?P<proj>gate_up_proj|down_proj)$"
)


@dataclass(frozen=True)
class FamilyShape:
    """What the cutter needs from config.json, with family differences resolved."""

    family: str
    hidden_size: int
    n_experts: int
    expert_intermediate_size: int
    moe_layers: tuple[int, ...]


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found; a Hugging Face checkpoint directory needs config.json "
            "next to its .safetensors files"
        )
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def family_shape(config: dict[str, Any]) -> FamilyShape:
    """Resolve expert count, expert width and which layers are sparse."""
    family = config.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise CheckpointError(
            f"model_type {family!r} is not supported; expected one of "
            f"{list(SUPPORTED_FAMILIES)}"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(
            f"hidden_act {config['hidden_act']!r}: shards compute SiLU-gated experts "
            "only (expert_forward); this checkpoint needs another expert function"
        )
    n_layers = int(config["num_hidden_layers"])

    # Configs name the expert count either way (transformers' attribute_map
    # writes back whichever name the family's class stores).
    count = config.get("num_experts", config.get("num_local_experts"))
    if count is None:
        raise CheckpointError(
            f"{family} config has neither num_experts nor num_local_experts"
        )
    n_experts = int(count)
    if family in ("qwen2_moe", "qwen3_moe"):
        width = int(config["moe_intermediate_size"])
        step = int(config.get("decoder_sparse_step", 1))
        dense = set(config.get("mlp_only_layers") or [])
        layers = tuple(
            i
            for i in range(n_layers)
            if i not in dense and n_experts > 0 and (i + 1) % step == 0
        )
    else:
        width = int(config["intermediate_size"])
        layers = tuple(range(n_layers))
    return FamilyShape(family, int(config["hidden_size"]), n_experts, width, layers)


def iter_safetensors(directory: str | Path) -> Iterator[tuple[str, Tensor]]:
    """Every tensor of every .safetensors file in the directory."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no .safetensors files in {directory}")
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield key, handle.get_tensor(key)


def split_hf_tensors(
    tensors: Iterator[tuple[str, Tensor]], shape: FamilyShape
) -> tuple[dict[str, Tensor], dict[tuple[int, int], dict[str, Tensor]]]:
    """Separate expert weights (by layer, expert) from the backbone.

    Backbone keys are renamed to transformers-5 module names (Mixtral's
    ``block_sparse_moe`` becomes ``mlp``) so the home model loads them
    strictly.
    """
    backbone: dict[str, Tensor] = {}
    experts: dict[tuple[int, int], dict[str, Tensor]] = {}
    h, i = shape.hidden_size, shape.expert_intermediate_size
    for key, tensor in tensors:
        if match := _PER_EXPERT.match(key):
            slot = (int(match["layer"]), int(match["expert"]))
            experts.setdefault(slot, {})[PROJECTION_NAMES[match["proj"]]] = tensor
        elif match := _FUSED.match(key):
            layer, proj = int(match["layer"]), match["proj"]
            want = (
                (shape.n_experts, 2 * i, h)
                if proj == "gate_up_proj"
                else (shape.n_experts, h, i)
            )
            if tuple(tensor.shape) != want:
                raise CheckpointError(
                    f"{key} has shape {tuple(tensor.shape)}, expected {want} "
                    "(experts, out, in) for this config"
                )
            for expert in range(shape.n_experts):
                named = experts.setdefault((layer, expert), {})
                if proj == "gate_up_proj":
                    named["w1"] = tensor[expert, :i].clone()
                    named["w3"] = tensor[expert, i:].clone()
                else:
                    named["w2"] = tensor[expert].clone()
        else:
            backbone[key.replace(".block_sparse_moe.", ".mlp.")] = tensor

    want_shapes = {"w1": (i, h), "w3": (i, h), "w2": (h, i)}
    expected = {
        (layer, e) for layer in shape.moe_layers for e in range(shape.n_experts)
    }
    if set(experts) != expected:
        raise CheckpointError(
            f"expert weights found for {len(experts)} (layer, expert) pairs, "
            f"expected {len(expected)}; missing {sorted(expected - set(experts))[:5]}, "
            f"unexpected {sorted(set(experts) - expected)[:5]}"
        )
    for (layer, expert), weights in experts.items():
        got = {name: tuple(t.shape) for name, t in weights.items()}
        if got != want_shapes:
            raise CheckpointError(
                f"layer {layer} expert {expert} weights {got}, expected {want_shapes}"
            )
    return backbone, experts


def cut_hf_checkpoint(source_dir: str | Path, out_dir: str | Path) -> Path:
    """Cut a local HF MoE checkpoint into a shard directory; returns the manifest."""
    config = read_hf_config(source_dir)
    shape = family_shape(config)
    backbone, experts = split_hf_tensors(iter_safetensors(source_dir), shape)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return write_shards(
        out,
        shape.family,
        config,
        backbone,
        ((layer, expert, w) for (layer, expert), w in sorted(experts.items())),
        extra={"moe_layers": list(shape.moe_layers)},
    )


class RoutedMoeBlock(nn.Module):
    """A sparse MoE block that routes with the original router, runs experts elsewhere.

    Output: sum of weight * expert(row) over the chosen experts, plus, when
    present, sigmoid(shared_expert_gate(x)) * shared_expert(x) (Qwen2-MoE).
    """

    def __init__(
        self,
        layer: int,
        gate: nn.Module,
        shared_expert: nn.Module | None = None,
        shared_expert_gate: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.gate = gate
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate
        self.executor: ExpertExecutor | None = None
        self.on_routing: RoutingCallback | None = None
        self.last_decision: RoutingDecision | None = None

    def forward(self, hidden_states: Tensor) -> Tensor:
        if self.executor is None:
            raise InferenceError(
                f"MoE block of layer {self.layer} has no expert executor; run the "
                "model through HfMoeModel.start_session or HfMoeModel.forward_logits"
            )
        b, t, h = hidden_states.shape
        flat = hidden_states.reshape(-1, h)
        _, weights, expert_ids = self.gate(flat)
        decision = RoutingDecision(self.layer, expert_ids.detach(), weights.detach())
        self.last_decision = decision
        if self.on_routing is not None:
            self.on_routing(decision)

        out = dispatch_to_experts(flat, expert_ids, weights, self.layer, self.executor)

        if self.shared_expert is not None:
            shared = self.shared_expert(flat)
            if self.shared_expert_gate is not None:
                shared = F.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared
        return out.reshape(b, t, h)


def patch_moe_blocks(model: nn.Module) -> dict[int, RoutedMoeBlock]:
    """Replace every sparse MoE block of a transformers model, dropping its experts.

    Returns the new blocks by decoder-layer index (the ``layer`` the
    executor and the shards use).
    """
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise CheckpointError(
            f"model_type {family!r}: only {list(SUPPORTED_FAMILIES)} are known to "
            "route with a plain softmax top-k router that RoutedMoeBlock can reuse"
        )
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise CheckpointError(
            f"{type(model).__name__} has no model.layers; not a supported causal LM"
        )
    blocks: dict[int, RoutedMoeBlock] = {}
    for index, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not hasattr(getattr(mlp, "experts", None), "gate_up_proj"):
            continue
        block = RoutedMoeBlock(
            index,
            mlp.gate,
            getattr(mlp, "shared_expert", None),
            getattr(mlp, "shared_expert_gate", None),
        )
        layer.mlp = block
        blocks[index] = block
    if not blocks:
        raise CheckpointError(
            f"{type(model).__name__} has no sparse MoE block to patch"
        )
    return blocks


class HfMoeModel:
    """A patched transformers model plus its routed blocks (home side)."""

    def __init__(self, model: nn.Module, blocks: dict[int, RoutedMoeBlock]) -> None:
        self.model = model
        self.blocks = blocks

    def _attach(
        self, executor: ExpertExecutor | None, on_routing: RoutingCallback | None
    ) -> None:
        for block in self.blocks.values():
            block.executor = executor
            block.on_routing = on_routing

    @torch.no_grad()
    def forward_logits(self, input_ids: Tensor, executor: ExpertExecutor) -> Tensor:
        """Logits (B, T, vocab) for a batch of token ids, no cache."""
        self._attach(executor, None)
        logits: Tensor = self.model(input_ids=input_ids, use_cache=False).logits
        return logits

    def start_session(
        self,
        executor: ExpertExecutor | None = None,
        on_routing: RoutingCallback | None = None,
    ) -> HfSession:
        """A decoding session; only one may be active per model at a time.

        `executor` may be None only for a model without routed blocks (the
        original model, see :func:`load_hf_reference`).
        """
        if executor is None and self.blocks:
            raise InferenceError(
                f"{type(self.model).__name__} routes {len(self.blocks)} MoE blocks "
                "to an executor; pass one (e.g. moe.shards.ShardExecutor)"
            )
        return HfSession(self, executor, on_routing)


class HfSession:
    """Same interface as moe.model.Session, over a transformers KV cache."""

    def __init__(
        self,
        owner: HfMoeModel,
        executor: ExpertExecutor | None,
        on_routing: RoutingCallback | None = None,
    ) -> None:
        from transformers import DynamicCache

        self.owner = owner
        self.executor = executor
        self.on_routing = on_routing
        config: Any = owner.model.config
        self.cache = DynamicCache(config=config)
        self.position = 0
        self.last_routing: list[RoutingDecision] = []

    @torch.no_grad()
    def _advance(self, tokens: Tensor) -> Tensor:
        self.owner._attach(self.executor, self.on_routing)
        out = self.owner.model(
            input_ids=tokens.view(1, -1), cache=self.cache, use_cache=True
        )
        self.position += tokens.numel()
        self.last_routing = [
            block.last_decision
            for _, block in sorted(self.owner.blocks.items())
            if block.last_decision is not None
        ]
        logits: Tensor = out.logits[0]
        return logits

    def prefill(self, tokens: Tensor | list[int] | bytes) -> Tensor:
        """Feed prompt token ids; returns logits (T, vocab)."""
        tensor = as_token_tensor(tokens)
        if tensor.numel() == 0:
            raise InferenceError("prefill got an empty prompt; give at least one token")
        return self._advance(tensor)

    def step(self, token: int) -> Tensor:
        """Feed one token id; returns logits (vocab,) for the next one."""
        return self._advance(torch.tensor([token], dtype=torch.long))[0]


def load_hf_home_model(manifest: Manifest | str | Path) -> HfMoeModel:
    """Build the home model of an HF family from a shard directory (no experts)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest)
    if manifest.family not in SUPPORTED_FAMILIES:
        raise ShardError(
            f"{manifest.directory} holds family {manifest.family!r}; "
            f"load_hf_home_model handles {list(SUPPORTED_FAMILIES)}"
        )
    config = AutoConfig.from_pretrained(manifest.directory)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    blocks = patch_moe_blocks(model)
    state = load_backbone(manifest)
    missing, unexpected = model.load_state_dict(state, strict=False)

    # With tied embeddings the checkpoint has no lm_head of its own.
    tied = (
        {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    )
    if set(missing) - tied or unexpected:
        raise ShardError(
            f"backbone {manifest.backbone.path} does not fit {type(model).__name__}: "
            f"missing {sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]}"
        )
    if tied:
        model.tie_weights()
    model.eval()
    log.info("home model %s with %d routed MoE blocks", manifest.family, len(blocks))
    return HfMoeModel(model, blocks)


def wrap_hf_model(model: nn.Module) -> HfMoeModel:
    """Patch an already-loaded transformers model in place (its experts are dropped)."""
    model.eval()
    return HfMoeModel(model, patch_moe_blocks(model))


def load_hf_reference(directory: str | Path) -> HfMoeModel:
    """The original model of a local HF directory, experts in place, float32.

    Nothing is patched, so its sessions run the family's own sparse blocks
    in this process: the accuracy reference for split serving. It needs
    the memory of the whole model.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        Path(directory), dtype=torch.float32, local_files_only=True
    )
    model.eval()
    return HfMoeModel(model, {})
