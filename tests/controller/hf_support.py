"""Tiny Hugging Face MoE checkpoints with their own tokenizer, built offline.

Each directory looks like one downloaded from the Hub: config.json,
model.safetensors, tokenizer.json and tokenizer_config.json. The tokenizer
is a byte-level BPE trained here on a few strings, so nothing is fetched.
Weights use initializer_range=0.3 so routing is decisive and logits are
O(1), which makes a 1e-5 agreement a real check.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from tests.moe.test_hf import COMMON as HF_COMMON
from tests.moe.test_hf import FAMILIES as HF_FAMILIES

# Everything is built locally; never reach for the Hub. Tokenizers' thread
# pool would make the process multi-threaded, and the root tests' sandbox
# can only leave its mount namespace from a single-threaded process.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB_SIZE = 320
TEXTS = [
    "def main(): return 0",
    "the satellite carries two experts over the pole",
    "import os\nimport sys\n",
    "hidden states cross the links between planes",
]

# The same tiny families as the import tests, with the vocabulary of the
# tokenizer trained here and room for longer generations.
COMMON: dict[str, Any] = {
    **HF_COMMON,
    "vocab_size": VOCAB_SIZE,
    "num_hidden_layers": 2,
    "max_position_embeddings": 128,
}
FAMILIES = {name: HF_FAMILIES[name] for name in ("mixtral", "qwen3_moe")}


def save_tokenizer(directory: Path) -> None:
    """Train a byte-level BPE on TEXTS and save it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<eos>"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(TEXTS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")
    fast.save_pretrained(directory)


def save_hf_checkpoint(
    directory: Path, family: str, with_tokenizer: bool = True
) -> torch.nn.Module:
    """A tiny random model of `family` saved as a local HF directory; returns it."""
    import transformers

    config_name, model_name, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**COMMON, **extra)
    model = getattr(transformers, model_name)(config).eval()
    model.save_pretrained(directory)
    if with_tokenizer:
        save_tokenizer(directory)
    return model
