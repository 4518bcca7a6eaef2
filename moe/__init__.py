"""The MoE language model, its training, shards, and Hugging Face import.

model       MoeLM, the ExpertExecutor seam, expert_forward, KV-cached Session
shards      one safetensors file per (layer, expert) + hashed manifest.json
checkpoint  load_checkpoint(): the trained byte-level model shipped in checkpoints/
train       ``python -m moe.train``: training on the Python stdlib's sources
corpus      that corpus, its train/validation split and the unigram baseline
hf          Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE: cut into shards, serve split
serving     which format a checkpoint path is; home model, reference, tokenizer
tokenizer   text <-> ids: byte-level for ours, the checkpoint's own for HF
errors      the package's additions to topology.errors
"""
