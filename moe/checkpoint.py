"""Save and load MoeLM checkpoints (safetensors weights + a JSON sidecar).

The shipped checkpoint lives in ``moe/checkpoints/``; its weights are stored
in float16 to keep the repository small and are widened to float32 on load,
so every figure in its JSON was measured with exactly those rounded weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from moe.errors import CheckpointError
from moe.model import ModelConfig, MoeLM

log = logging.getLogger(__name__)

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
DEFAULT_NAME = "moe-byte-stdlib"


def checkpoint_paths(path: str | Path | None = None) -> tuple[Path, Path]:
    """(weights, metadata) paths for a directory, a .safetensors file, or None."""
    if path is None:
        path = CHECKPOINT_DIR
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        stem = path.with_suffix("")
    else:
        stem = path / DEFAULT_NAME
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save_checkpoint(
    model: MoeLM,
    path: str | Path | None = None,
    metadata: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write weights (cast to ``dtype``) and ``{"config", **metadata}`` JSON."""
    weights_path, meta_path = checkpoint_paths(path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()
    }
    save_file(state, str(weights_path), metadata={"format": "pt"})
    meta = {"config": model.cfg.to_dict(), **(metadata or {})}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    log.info("saved checkpoint %s", weights_path)
    return weights_path


def read_metadata(path: str | Path | None = None) -> dict[str, Any]:
    """The JSON sidecar of a checkpoint (config and measured figures)."""
    _, meta_path = checkpoint_paths(path)
    if not meta_path.is_file():
        raise CheckpointError(
            f"checkpoint metadata {meta_path} not found; train one with "
            "`python -m moe.train --out DIR` or pass the right path"
        )
    data: dict[str, Any] = json.loads(meta_path.read_text())
    return data


def load_checkpoint(path: str | Path | None = None) -> MoeLM:
    """Load a checkpoint (default: the shipped one) as a float32 MoeLM in eval mode."""
    weights_path, _ = checkpoint_paths(path)
    meta = read_metadata(path)
    if not weights_path.is_file():
        raise CheckpointError(
            f"checkpoint weights {weights_path} not found next to its metadata; "
            "retrain or restore the file from git"
        )
    model = MoeLM(ModelConfig.from_dict(meta["config"]))
    state = {k: v.float() for k, v in load_file(str(weights_path)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {weights_path} does not fit its config: missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.eval()
    return model
