"""Train the byte-level MoE model on the Python standard library's sources.

Run::

    python -m moe.train --out moe/checkpoints --minutes 22

CPU only. The learning-rate schedule follows wall time (warm-up, then cosine
decay ending at the deadline), so a run of N minutes is a complete run, not
a truncated longer one. The loss adds a Switch-style load-balancing term so
all experts get traffic. At the end the weights are rounded to float16 (the
stored form) and then evaluated: the reported validation bits per byte is
that of the file on disk, printed next to a unigram (byte frequency)
baseline on the same validation split.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from moe.checkpoint import load_checkpoint, save_checkpoint
from moe.corpus import (
    as_tensor,
    bits_per_byte_from_nats,
    eval_windows,
    load_corpus,
    unigram_bits_per_byte,
)
from moe.model import ModelConfig, MoeLM, greedy_generate

log = logging.getLogger(__name__)

SAMPLE_PROMPTS = (b"import os\n\n\ndef ", b"class Parser:\n    def __init__(self")


def load_balance_loss(router_logits: list[Tensor], top_k: int) -> Tensor:
    """Switch Transformer auxiliary loss, averaged over layers.

    E * sum_e (fraction of routed slots that went to e) * (mean router
    probability of e); equals 1 when routing is uniform.
    """
    total = router_logits[0].new_zeros(())
    for logits in router_logits:
        n_experts = logits.shape[-1]
        probs = logits.softmax(dim=-1)
        chosen = logits.topk(top_k, dim=-1).indices
        counts = torch.zeros(n_experts).index_add_(
            0, chosen.flatten(), torch.ones(chosen.numel())
        )
        fraction = counts / chosen.numel()
        total = total + n_experts * (fraction * probs.mean(dim=0)).sum()
    return total / len(router_logits)


@torch.no_grad()
def evaluate_bits_per_byte(
    model: MoeLM,
    data: Tensor,
    window: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 8,
) -> float:
    """Mean next-byte cross-entropy in bits over non-overlapping windows."""
    window = window or model.cfg.max_seq_len
    windows = eval_windows(data, window, max_windows)
    was_training = model.training
    model.eval()
    nats, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        chunk = windows[start : start + batch_size]
        logits, _ = model.full_forward(chunk[:, :-1])
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            chunk[:, 1:].reshape(-1),
            reduction="sum",
        )
        nats += float(loss)
        count += chunk[:, 1:].numel()
    model.train(was_training)
    return bits_per_byte_from_nats(nats / count)


def learning_rate(
    fraction_done: float, step: int, peak: float, warmup_steps: int
) -> float:
    """Linear warm-up by step, then cosine to 10% of peak by wall-time fraction."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(fraction_done, 1.0)))
    return peak * (0.1 + 0.9 * cosine)


def random_batch(
    data: Tensor, batch_size: int, length: int, gen: torch.Generator
) -> Tensor:
    starts = torch.randint(0, data.numel() - length - 1, (batch_size,), generator=gen)
    return torch.stack([data[s : s + length + 1] for s in starts.tolist()]).long()


def train(args: argparse.Namespace) -> dict[str, object]:
    """The training run; returns the metadata written next to the checkpoint."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    corpus = load_corpus()
    train_data, val_data = as_tensor(corpus.train), as_tensor(corpus.validation)
    unigram_bpb = unigram_bits_per_byte(corpus.train, corpus.validation)
    log.info(
        "corpus: %s train bytes (%s files), %s validation bytes (%s files); "
        "unigram validation bpb %.4f",
        len(corpus.train),
        len(corpus.train_files),
        len(corpus.validation),
        len(corpus.validation_files),
        unigram_bpb,
    )

    cfg = ModelConfig()
    model = MoeLM(cfg)
    model.reset_parameters(seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    active = (
        n_params
        - sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        * (cfg.n_experts - cfg.top_k)
        // cfg.n_experts
    )
    log.info("model: %s parameters (%s active per token)", n_params, active)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": 0.1},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
    )

    budget_s = args.minutes * 60.0
    start = time.monotonic()
    step, tokens_seen = 0, 0
    history: list[dict[str, float]] = []
    model.train()
    while (elapsed := time.monotonic() - start) < budget_s:
        lr = learning_rate(elapsed / budget_s, step, args.lr, args.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr

        # Every fourth step uses full-length windows so every RoPE position
        # up to max_seq_len is trained; the rest use short windows, which
        # give more distinct contexts per second.
        if step % 4 == 3:
            batch = random_batch(train_data, args.batch_size // 2, cfg.max_seq_len, gen)
        else:
            batch = random_batch(train_data, args.batch_size, args.seq_len, gen)
        logits, extras = model.full_forward(batch[:, :-1])
        lm_loss = F.cross_entropy(
            logits.reshape(-1, cfg.vocab_size), batch[:, 1:].reshape(-1)
        )
        aux = load_balance_loss(extras.router_logits, cfg.top_k)
        loss = lm_loss + args.aux_weight * aux

        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += batch[:, 1:].numel()

        if step % args.log_every == 0:
            log.info(
                "step %d  %.0fs  lr %.2e  train bpb %.3f  aux %.3f  %.0f tok/s",
                step,
                elapsed,
                lr,
                bits_per_byte_from_nats(float(lm_loss.detach())),
                float(aux.detach()),
                tokens_seen / max(elapsed, 1e-9),
            )
        if step % args.eval_every == 0:
            val = evaluate_bits_per_byte(model, val_data, max_windows=64)
            history.append({"step": step, "elapsed_s": elapsed, "val_bpb_subset": val})
            log.info("step %d  validation bpb (64 windows) %.4f", step, val)
    train_s = time.monotonic() - start

    # Evaluate the weights exactly as stored: save in float16, load back.
    meta: dict[str, object] = {
        "command": "python -m moe.train " + shlex.join(sys.argv[1:]),
        "train_wall_time_s": round(train_s, 1),
        "steps": step,
        "tokens_seen": tokens_seen,
        "parameters": n_params,
        "active_parameters_per_token": active,
        "unigram_validation_bpb": round(unigram_bpb, 4),
        "corpus": {
            "source": "Python stdlib .py files, split by sha256 of relative path",
            "python": sys.version.split()[0],
            "train_bytes": len(corpus.train),
            "validation_bytes": len(corpus.validation),
            "validation_files": len(corpus.validation_files),
        },
        "history": history,
    }
    out = Path(args.out)
    save_checkpoint(model, out, meta)
    stored = load_checkpoint(out)
    val_bpb = evaluate_bits_per_byte(
        stored, val_data, max_windows=args.final_eval_windows
    )
    meta["validation_bpb"] = round(val_bpb, 4)
    meta["validation_eval_bytes"] = int(
        eval_windows(val_data, cfg.max_seq_len, args.final_eval_windows)[:, 1:].numel()
    )
    meta["samples_greedy"] = {
        prompt.decode(): bytes(
            greedy_generate(stored, prompt, args.sample_bytes)[0]
        ).decode(errors="replace")
        for prompt in SAMPLE_PROMPTS
    }
    save_checkpoint(stored, out, meta)
    log.info(
        "done: validation bpb %.4f vs unigram %.4f after %d tokens in %.0fs",
        val_bpb,
        unigram_bpb,
        tokens_seen,
        train_s,
    )
    return meta


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m moe.train",
        description="Train the byte-level MoE model on the Python stdlib sources.",
    )
    parser.add_argument(
        "--out", required=True, help="checkpoint directory or .safetensors"
    )
    parser.add_argument("--minutes", type=float, default=22.0, help="wall-time budget")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256, help="short-window length")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument(
        "--aux-weight",
        type=float,
        default=0.01,
        help="weight of the load-balancing loss",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument(
        "--final-eval-windows",
        type=int,
        default=None,
        help="limit the final evaluation (default: whole split)",
    )
    parser.add_argument(
        "--sample-bytes", type=int, default=200, help="greedy sample length"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    meta = train(args)
    print(
        f"validation bpb {meta['validation_bpb']} vs unigram "
        f"{meta['unigram_validation_bpb']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
