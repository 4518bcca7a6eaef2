"""Text to token ids and back, for whichever model a checkpoint holds.

Our model reads UTF-8 bytes, so its tokenizer is the identity on bytes.
Hugging Face checkpoints bring their own tokenizer files (tokenizer.json,
tokenizer.model, vocab.json + merges.txt, ...), loaded with transformers'
AutoTokenizer from the local directory only; nothing is downloaded.

Caveat: the HF tokenizer adds the special tokens its configuration asks
for (e.g. Mixtral's BOS), as transformers' own text generation does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from moe.errors import CheckpointError, InferenceError

log = logging.getLogger(__name__)

# Any of these next to config.json means the directory carries a tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "tokenizer_config.json",
)


class Tokenizer(Protocol):
    """Turns a prompt into model token ids and generated ids into text."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_text(self, token: int) -> str:
        """One token on its own, for per-token tables (may be a fragment)."""
        ...


class ByteTokenizer:
    """Our byte-level vocabulary: token i is the byte i."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def token_text(self, token: int) -> str:
        # One byte of a multi-byte character is not UTF-8 by itself; latin-1
        # shows every byte as one character.
        return bytes([token]).decode("latin-1")


class HfTokenizer:
    """A transformers tokenizer loaded from a local checkpoint directory."""

    def __init__(self, tokenizer: Any, directory: Path) -> None:
        self.tokenizer = tokenizer
        self.directory = directory

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer(text)["input_ids"]
        return list(ids)

    def decode(self, ids: Sequence[int]) -> str:
        text: str = self.tokenizer.decode(list(ids))
        return text

    def token_text(self, token: int) -> str:
        return self.decode([token])


def has_tokenizer_files(directory: str | Path) -> bool:
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def load_hf_tokenizer(
    directory: str | Path, vocab_size: int | None = None
) -> HfTokenizer:
    """The tokenizer shipped next to a HF checkpoint (local files only).

    `vocab_size` is the model's; a tokenizer with more ids than the model
    has embeddings belongs to another model and is refused.
    """
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not has_tokenizer_files(directory):
        raise CheckpointError(
            f"{directory} has no tokenizer (none of {list(TOKENIZER_FILES)}); copy "
            "the tokenizer files of this model (e.g. tokenizer.json and "
            "tokenizer_config.json from its Hugging Face repository) into it"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot load the tokenizer in {directory}: {exc}; check that its "
            "tokenizer files are complete and belong to this model"
        ) from exc
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise CheckpointError(
            f"the tokenizer in {directory} has {len(tokenizer)} tokens but the model "
            f"has vocab_size={vocab_size}; the tokenizer files belong to another model"
        )
    log.info("tokenizer %s from %s", type(tokenizer).__name__, directory)
    return HfTokenizer(tokenizer, directory)


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The prompt's ids, or an InferenceError if it gives none."""
    if not prompt:
        raise InferenceError("the prompt is empty; give at least one character")
    ids = tokenizer.encode(prompt)
    if not ids:
        raise InferenceError(
            f"the prompt {prompt!r} encodes to no tokens; give at least one character"
        )
    return ids
