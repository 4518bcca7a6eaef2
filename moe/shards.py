"""Cut a MoE model into one safetensors file per (layer, expert) plus a manifest.

Layout of a shard directory::

    manifest.json                 format, family, model config, files + hashes
    backbone.safetensors          every non-expert weight (what home keeps)
    layer00-expert000.safetensors w1 (I, H), w2 (H, I), w3 (I, H) of one expert
    ...

Every expert shard holds exactly the three tensors :func:`moe.model.expert_forward`
takes, in nn.Linear layout, whatever the source model called them, so a
satellite needs nothing but this module and that function. Each file is
listed with its SHA-256 and size; :func:`load_shard` refuses a file whose
content hash differs, naming the file and both hashes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file
from torch import Tensor

from moe.errors import ShardError
from moe.model import EXPERT_PARAM_NAMES, ModelConfig, MoeLM, expert_forward

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "spacemoe-shards/1"
MANIFEST_NAME = "manifest.json"
BACKBONE_NAME = "backbone.safetensors"
FAMILY_SPACEMOE = "spacemoe-byte"


@dataclass(frozen=True)
class ShardEntry:
    """One file of a shard directory, as the manifest lists it.

    ``layer`` and ``expert`` are -1 for the backbone file.
    """

    layer: int
    expert: int
    file: str
    sha256: str
    size_bytes: int
    parameters: tuple[str, ...]
    directory: Path

    @property
    def path(self) -> Path:
        return self.directory / self.file

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "expert": self.expert,
            "file": self.file,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "parameters": list(self.parameters),
        }


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest.json: what model this is and where each piece lives."""

    family: str
    model_config: dict[str, Any]
    backbone: ShardEntry
    shards: tuple[ShardEntry, ...]
    directory: Path

    def shard(self, layer: int, expert: int) -> ShardEntry:
        for entry in self.shards:
            if entry.layer == layer and entry.expert == expert:
                return entry
        raise ShardError(
            f"manifest {self.directory / MANIFEST_NAME} has no shard for layer "
            f"{layer} expert {expert}; it lists layers {sorted(self.moe_layers())}"
        )

    def moe_layers(self) -> set[int]:
        return {entry.layer for entry in self.shards}

    def experts_per_layer(self) -> dict[int, list[int]]:
        table: dict[int, list[int]] = {}
        for entry in self.shards:
            table.setdefault(entry.layer, []).append(entry.expert)
        return {layer: sorted(experts) for layer, experts in sorted(table.items())}


def shard_file_name(layer: int, expert: int) -> str:
    return f"layer{layer:02d}-expert{expert:03d}.safetensors"


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write(directory: Path, name: str, tensors: Mapping[str, Tensor]) -> dict[str, Any]:
    path = directory / name
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))
    return {
        "file": name,
        "sha256": sha256_of_file(path),
        "size_bytes": path.stat().st_size,
        "parameters": sorted(tensors),
    }


def write_shards(
    out_dir: str | Path,
    family: str,
    model_config: dict[str, Any],
    backbone: Mapping[str, Tensor],
    experts: Iterable[tuple[int, int, Mapping[str, Tensor]]],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write backbone, expert shards and manifest; returns the manifest path.

    ``experts`` yields (layer, expert, {"w1", "w2", "w3"}) in any order.
    """
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for layer, expert, weights in experts:
        if set(weights) != set(EXPERT_PARAM_NAMES):
            raise ShardError(
                f"layer {layer} expert {expert} has parameters {sorted(weights)}; "
                f"a shard needs exactly {list(EXPERT_PARAM_NAMES)}"
            )
        info = _write(directory, shard_file_name(layer, expert), weights)
        entries.append({"layer": layer, "expert": expert, **info})
    entries.sort(key=lambda e: (e["layer"], e["expert"]))
    manifest = {
        "format": MANIFEST_FORMAT,
        "family": family,
        "expert_arithmetic": "w2 @ (silu(w1 @ x) * (w3 @ x)), nn.Linear layout",
        "model_config": model_config,
        "backbone": {
            "layer": -1,
            "expert": -1,
            **_write(directory, BACKBONE_NAME, backbone),
        },
        "shards": entries,
        **(extra or {}),
    }
    path = directory / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("wrote %d expert shards and backbone to %s", len(entries), directory)
    return path


def cut_model(model: MoeLM, out_dir: str | Path) -> Path:
    """Cut one of our MoeLM models into a shard directory (float32 as held)."""
    cfg = model.cfg
    experts = (
        (layer, expert, model.expert_weights(layer, expert))
        for layer in range(cfg.n_layers)
        for expert in range(cfg.n_experts)
    )
    return write_shards(
        out_dir, FAMILY_SPACEMOE, cfg.to_dict(), model.backbone_state_dict(), experts
    )


def _entry(raw: dict[str, Any], directory: Path, where: str) -> ShardEntry:
    try:
        return ShardEntry(
            layer=int(raw["layer"]),
            expert=int(raw["expert"]),
            file=str(raw["file"]),
            sha256=str(raw["sha256"]),
            size_bytes=int(raw["size_bytes"]),
            parameters=tuple(raw["parameters"]),
            directory=directory,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ShardError(f"{where}: malformed entry {raw!r} ({exc})") from exc


def load_manifest(path: str | Path) -> Manifest:
    """Parse manifest.json (or the directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise ShardError(
            f"shard manifest {path} not found; cut a model with moe.shards.cut_model "
            "or moe.hf.cut_hf_checkpoint first"
        )
    data = json.loads(path.read_text())
    if data.get("format") != MANIFEST_FORMAT:
        raise ShardError(
            f"{path}: format {data.get('format')!r}, expected {MANIFEST_FORMAT!r}; "
            "re-cut the model with this version"
        )
    directory = path.parent
    return Manifest(
        family=str(data["family"]),
        model_config=dict(data["model_config"]),
        backbone=_entry(data["backbone"], directory, str(path)),
        shards=tuple(_entry(raw, directory, str(path)) for raw in data["shards"]),
        directory=directory,
    )


def _verified(
    data: bytes, expected_sha256: str, what: str, fix: str
) -> dict[str, Tensor]:
    """The tensors in `data`, unless its SHA-256 is not the expected one."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256.lower():
        raise ShardError(
            f"{what} has sha256 {actual}, expected {expected_sha256}; {fix}"
        )
    return load_safetensors_bytes(data)


def _read_verified(path: Path, expected_sha256: str) -> dict[str, Tensor]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ShardError(f"cannot read shard file {path}: {exc}") from exc
    return _verified(
        data,
        expected_sha256,
        f"shard file {path}",
        "the file is corrupt or from another model: copy it again from the "
        "shard directory that wrote the manifest",
    )


def _expert_weights(weights: dict[str, Tensor], what: str) -> dict[str, Tensor]:
    if set(weights) != set(EXPERT_PARAM_NAMES):
        raise ShardError(
            f"{what} holds {sorted(weights)}; an expert shard holds "
            f"exactly {list(EXPERT_PARAM_NAMES)}"
        )
    return weights


def load_shard_bytes(entry: ShardEntry, data: bytes) -> dict[str, Tensor]:
    """A shard received as bytes (a migration), refused unless it hashes right."""
    what = f"{len(data)} bytes received for layer {entry.layer} expert {entry.expert}"
    weights = _verified(data, entry.sha256, what, "send the file the manifest names")
    return _expert_weights(weights, what)


def load_shard(
    entry_or_path: ShardEntry | str | Path, expected_sha256: str | None = None
) -> dict[str, Tensor]:
    """Read one expert shard, refusing it unless its SHA-256 matches.

    With a ShardEntry the expected hash defaults to the manifest's; with a
    bare path it must be given. Returns {"w1", "w2", "w3"} for expert_forward.
    """
    if isinstance(entry_or_path, ShardEntry):
        path = entry_or_path.path
        expected = expected_sha256 or entry_or_path.sha256
    else:
        path = Path(entry_or_path)
        if expected_sha256 is None:
            raise ShardError(
                f"load_shard({path}) needs expected_sha256 (from the manifest)"
            )
        expected = expected_sha256
    return _expert_weights(_read_verified(path, expected), f"shard file {path}")


def load_backbone(manifest: Manifest | str | Path) -> dict[str, Tensor]:
    """The verified non-expert weights, keyed as the home model names them."""
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest)
    return _read_verified(manifest.backbone.path, manifest.backbone.sha256)


def load_home_model(manifest: Manifest | str | Path) -> MoeLM:
    """Our MoeLM without expert weights, from a shard directory's backbone."""
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest)
    if manifest.family != FAMILY_SPACEMOE:
        raise ShardError(
            f"{manifest.directory} holds a {manifest.family!r} model; use "
            "moe.hf.load_hf_home_model for Hugging Face families"
        )
    model = MoeLM(ModelConfig.from_dict(manifest.model_config), with_experts=False)
    state = load_backbone(manifest)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ShardError(
            f"backbone {manifest.backbone.path} does not fit the manifest config: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.eval()
    return model


class ShardExecutor:
    """Runs experts from shard files, as a satellite would.

    Shards are loaded (and hash-checked) on first use and kept in memory.
    ``only`` limits which (layer, expert) pairs this executor may hold; a
    request for another raises ShardError naming it.
    """

    def __init__(
        self,
        manifest: Manifest | str | Path,
        only: Iterable[tuple[int, int]] | None = None,
    ) -> None:
        self.manifest = (
            manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
        )
        self.allowed = set(only) if only is not None else None
        self.loaded: dict[tuple[int, int], dict[str, Tensor]] = {}

    def weights(self, layer: int, expert: int) -> dict[str, Tensor]:
        key = (layer, expert)
        if self.allowed is not None and key not in self.allowed:
            raise ShardError(
                f"this executor does not hold layer {layer} expert {expert}; "
                f"it holds {sorted(self.allowed)}"
            )
        if key not in self.loaded:
            self.loaded[key] = load_shard(self.manifest.shard(layer, expert))
        return self.loaded[key]

    def __call__(self, layer: int, batches: dict[int, Tensor]) -> dict[int, Tensor]:
        return {
            expert: expert_forward(self.weights(layer, expert), rows)
            for expert, rows in batches.items()
        }
