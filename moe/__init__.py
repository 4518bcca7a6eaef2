"""The MoE language model, its training, shards, and Hugging Face import."""
