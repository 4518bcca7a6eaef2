"""Decode cost of the shipped MoE checkpoint in one process, and what would travel.

Run::

    python benchmarks/moe_decode.py [--tokens 64] [--threads 2]

Prints per-token latency (p50/p95) with experts run locally and through
shard files (ShardExecutor, what a satellite computes), the expert rows a
token sends per layer and their float32 bytes, and the shard sizes the
placement has to move. Network time is not included: this is the floor the
emulated constellation adds to.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from moe.checkpoint import load_checkpoint, read_metadata
from moe.model import ExpertExecutor, LocalExecutor, MoeLM, RoutingDecision
from moe.shards import ShardExecutor, cut_model, load_home_model, load_manifest

PROMPT = b"import os\nimport sys\n\n\ndef main(argv):\n    "


def decode_latencies_s(
    model: MoeLM, executor: ExpertExecutor, n_tokens: int
) -> tuple[list[float], list[int]]:
    """Seconds per step and the expert rows each step sent (all layers)."""
    rows_per_step: list[int] = []
    current: list[int] = []

    def count(decision: RoutingDecision) -> None:
        current.append(decision.expert_ids.numel())

    session = model.start_session(executor, count)
    logits = session.prefill(PROMPT)[-1]
    latencies = []
    for _ in range(n_tokens):
        current.clear()
        start = time.perf_counter()
        logits = session.step(int(logits.argmax()))
        latencies.append(time.perf_counter() - start)
        rows_per_step.append(sum(current))
    return latencies, rows_per_step


def summary_ms(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return f"p50 {statistics.median(ordered) * 1e3:.2f} ms  p95 {p95 * 1e3:.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load_checkpoint()
    meta = read_metadata()
    cfg = model.cfg
    n_params = sum(p.numel() for p in model.parameters())
    print(f"checkpoint: {n_params} parameters, validation {meta['validation_bpb']} bpb")

    with tempfile.TemporaryDirectory() as shard_dir:
        cut_model(model, shard_dir)
        manifest = load_manifest(shard_dir)
        sizes = [entry.size_bytes for entry in manifest.shards]
        print(
            f"shards: {len(sizes)} experts of {sizes[0]} bytes each "
            f"({sum(sizes) / 2**20:.1f} MiB in all), backbone "
            f"{manifest.backbone.size_bytes / 2**20:.2f} MiB"
        )

        local_s, rows = decode_latencies_s(model, LocalExecutor(model), args.tokens)
        home = load_home_model(shard_dir)
        shard_s, _ = decode_latencies_s(home, ShardExecutor(shard_dir), args.tokens)

    row_bytes = cfg.d_model * 4
    per_token_rows = statistics.mean(rows)
    print(f"decode, local experts:  {summary_ms(local_s)}")
    print(f"decode, shard executor: {summary_ms(shard_s)}")
    print(
        f"expert rows per token: {per_token_rows:.0f} ({cfg.top_k} per layer x "
        f"{cfg.n_layers} layers), {row_bytes} bytes each way per row, "
        f"{2 * per_token_rows * row_bytes:.0f} bytes per token in float32"
    )


if __name__ == "__main__":
    main()
