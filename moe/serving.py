"""What a checkpoint path names, and how to serve it: shards, home, reference, text.

``moe.checkpoint`` in a scenario names one of two formats:

* ours (family ``spacemoe-byte``): a ``.safetensors`` file with its
  ``.json`` sidecar, or a directory holding ``moe-byte-stdlib.safetensors``
  and ``.json``; None means the checkpoint shipped in moe/checkpoints;
* a local Hugging Face model directory: ``config.json``, ``*.safetensors``
  and the model's tokenizer files, of a family in
  :data:`moe.hf.SUPPORTED_FAMILIES`.

Both are cut into the same shard directories (moe.shards); afterwards the
manifest's family alone decides which home model to build
(:func:`load_home`). The accuracy reference is each format's full model in
one process: our MoeLM with its local executor, or the original
transformers model with its own sparse blocks.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from torch import Tensor

from moe.errors import CheckpointError
from moe.model import ExpertExecutor, RoutingCallback
from moe.shards import FAMILY_SPACEMOE, Manifest, load_manifest
from moe.tokenizer import (
    TOKENIZER_FILES,
    ByteTokenizer,
    Tokenizer,
    has_tokenizer_files,
    load_hf_tokenizer,
)

log = logging.getLogger(__name__)


class DecodeSession(Protocol):
    """One generation with a KV cache (moe.model.Session, moe.hf.HfSession)."""

    def prefill(self, tokens: Tensor | list[int] | bytes) -> Tensor: ...

    def step(self, token: int) -> Tensor: ...


class ServedModel(Protocol):
    """What inference needs of a model: sessions over an expert executor.

    A reference model also accepts no executor (it holds its experts).
    """

    def start_session(
        self,
        executor: ExpertExecutor | None = None,
        on_routing: RoutingCallback | None = None,
    ) -> DecodeSession: ...


@dataclass(frozen=True)
class ModelSource:
    """A checkpoint in one of the two formats, checked but not loaded.

    `path` is the weights file for ours and the directory for HF.
    """

    kind: Literal["spacemoe", "hf"]
    path: Path
    family: str
    vocab_size: int | None

    def weights_files(self) -> list[Path]:
        if self.kind == "spacemoe":
            return [self.path]
        return sorted(self.path.glob("*.safetensors"))

    def fingerprint(self) -> str:
        """16 hex digits that change whenever the weights do.

        Ours: the SHA-256 of the weights file. HF: a SHA-256 over config.json
        and each weights file's name, size and modification time, because
        reading tens of gigabytes at every `spacemoe up` only to find the
        cut shards again would take minutes; the shards themselves are
        still hash-checked on every load.
        """
        from moe.shards import sha256_of_file

        if self.kind == "spacemoe":
            return sha256_of_file(self.path)[:16]
        digest = hashlib.sha256((self.path / "config.json").read_bytes())
        for path in self.weights_files():
            stat = path.stat()
            digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        return digest.hexdigest()[:16]

    def cut(self, out_dir: str | Path) -> Path:
        """Cut into a shard directory; returns the manifest path."""
        if self.kind == "spacemoe":
            from moe.checkpoint import load_checkpoint
            from moe.shards import cut_model

            return cut_model(load_checkpoint(self.path), out_dir)
        from moe.hf import cut_hf_checkpoint

        return cut_hf_checkpoint(self.path, out_dir)

    def load_reference(self) -> ServedModel:
        """The full model in this process, for the accuracy comparison."""
        if self.kind == "spacemoe":
            from moe.checkpoint import load_checkpoint

            return load_checkpoint(self.path)
        from moe.hf import load_hf_reference

        return load_hf_reference(self.path)

    def load_tokenizer(self) -> Tokenizer:
        if self.kind == "spacemoe":
            return ByteTokenizer()
        return load_hf_tokenizer(self.path, self.vocab_size)


def _hf_source(directory: Path) -> ModelSource:
    from moe.hf import SUPPORTED_FAMILIES, read_hf_config

    config = read_hf_config(directory)
    family = config.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise CheckpointError(
            f"{directory}: model_type {family!r} is not a supported MoE family; "
            f"supported: {list(SUPPORTED_FAMILIES)}"
        )
    if not any(directory.glob("*.safetensors")):
        other = sorted(p.name for p in directory.glob("*.bin"))[:3]
        hint = (
            f" (found {other}: convert them to safetensors)"
            if other
            else "; download the weights files into it"
        )
        raise CheckpointError(
            f"{directory} has config.json but no .safetensors weights{hint}"
        )
    if not has_tokenizer_files(directory):
        raise CheckpointError(
            f"{directory} has no tokenizer (none of {list(TOKENIZER_FILES)}); copy "
            "the model's tokenizer files (e.g. tokenizer.json and "
            "tokenizer_config.json) into it"
        )
    vocab = config.get("vocab_size")
    return ModelSource("hf", directory, str(family), int(vocab) if vocab else None)


def resolve_model_source(checkpoint: str | Path | None) -> ModelSource:
    """Which format `checkpoint` is in, with a CheckpointError naming what is missing.

    Reads only small files (config.json, the sidecar); weights stay on disk.
    """
    from moe.checkpoint import (
        CHECKPOINT_DIR,
        DEFAULT_NAME,
        checkpoint_paths,
        read_metadata,
    )

    path = CHECKPOINT_DIR if checkpoint is None else Path(checkpoint).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not exist; give our checkpoint "
            "(.safetensors + .json) or a local Hugging Face model directory"
        )
    if path.is_dir() and (path / "config.json").is_file():
        return _hf_source(path)
    sidecar = path.with_suffix(".json")
    if (
        path.suffix == ".safetensors"
        and not sidecar.is_file()
        and (path.parent / "config.json").is_file()
    ):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is one file of a Hugging Face model; "
            f"give its directory {str(path.parent)!r} instead"
        )
    is_ours = path.is_file() and path.suffix in (".safetensors", ".json")
    if is_ours or (path / f"{DEFAULT_NAME}.safetensors").is_file():
        weights, _ = checkpoint_paths(path)
        if not weights.is_file():
            raise CheckpointError(
                f"checkpoint weights {weights} not found; train one with "
                "`python -m moe.train --out DIR` or restore the file from git"
            )
        return ModelSource(
            "spacemoe", weights, FAMILY_SPACEMOE, _our_vocab(read_metadata(path))
        )
    raise CheckpointError(
        f"checkpoint {str(path)!r} is neither a Hugging Face model directory "
        "(config.json + *.safetensors + tokenizer files) nor our checkpoint "
        f"({DEFAULT_NAME}.safetensors + .json, or a .safetensors file with its .json)"
    )


def _our_vocab(metadata: dict[str, object]) -> int:
    config = metadata.get("config")
    if isinstance(config, dict) and "vocab_size" in config:
        return int(config["vocab_size"])
    return 256


def load_home(manifest: Manifest | str | Path) -> ServedModel:
    """The home model (everything but the experts) for a shard directory's family."""
    from moe.hf import SUPPORTED_FAMILIES, load_hf_home_model
    from moe.shards import load_home_model

    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest)
    if manifest.family == FAMILY_SPACEMOE:
        return load_home_model(manifest)
    if manifest.family in SUPPORTED_FAMILIES:
        return load_hf_home_model(manifest)
    raise CheckpointError(
        f"{manifest.directory} holds family {manifest.family!r}; supported: "
        f"{[FAMILY_SPACEMOE, *SUPPORTED_FAMILIES]}"
    )


def load_serving_models(
    checkpoint: str | Path | None, manifest: Manifest | str | Path, compare: bool
) -> tuple[ServedModel, ServedModel | None, Tokenizer]:
    """(home model, reference or None, tokenizer) for serving a shard directory.

    The home model follows the manifest's family; the reference (the full
    model in this process, only with `compare`) and the tokenizer come from
    `checkpoint`, the source the shards were cut from.
    """
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest)
    source = resolve_model_source(checkpoint)
    if source.family != manifest.family:
        raise CheckpointError(
            f"the shards in {manifest.directory} hold family {manifest.family!r} "
            f"but checkpoint {str(source.path)!r} is {source.family!r}; bring the "
            "scenario up again after changing moe.checkpoint"
        )
    home = load_home(manifest)
    reference = source.load_reference() if compare else None
    return home, reference, source.load_tokenizer()


__all__ = [
    "DecodeSession",
    "ModelSource",
    "ServedModel",
    "load_home",
    "load_serving_models",
    "resolve_model_source",
]
