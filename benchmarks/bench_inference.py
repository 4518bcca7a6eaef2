"""Per-token latency of MoE inference over the constellation, and agent memory.

Two parts:

memory   64 agents forked by the launcher on loopback (no root needed), each
         holding one expert shard of the model, connected to one broker.
         Prints the proportional set size (PSS, shared pages split among
         the processes sharing them) of the zygote and the agents, summed.
         Target: <= 2 GiB for 64 agents.

latency  (root) the default scenario brought up in this process and held
         at one instant (scenario time --at, default 0 s: no stepping, so
         the run is repeatable); brokers and agents in the satellites'
         namespaces; greedy generation from home through MQTT. For each
         placement policy it prints the per-token table (home compute,
         expert compute, serialization, network, queueing remainder), p50/p95
         and the ratio to the physical lower bound (propagation both ways +
         tensor bytes at the bottleneck rate + measured compute). Target:
         ratio <= 1.25 for round-robin in the default scenario. The ground
         baseline runs the same wire path at home; its bound has no network,
         so its ratio shows the MQTT overhead alone.

Do not run while another scenario is up (namespace names are shared).

    .venv/bin/python benchmarks/bench_inference.py [--tokens 32] [--agents 64]
        [--policies round-robin ground] [--k 8] [--at 0] [--json FILE]
        [--only memory|latency]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "def parse_args(argv):\n    "


def bench_memory(n_agents: int, shard_dir: Path) -> dict[str, float]:
    from containers.broker import Broker
    from containers.launcher import Launcher
    from controller.deployment import free_loopback_ports
    from moe.shards import load_manifest, shard_file_name

    shards = [(e.layer, e.expert) for e in load_manifest(shard_dir).shards]
    port = free_loopback_ports(1)[0]
    broker = Broker("bench", "127.0.0.1", port, namespace=None).start()
    launcher = Launcher()
    try:
        started = time.monotonic()
        launcher.start()
        zygote_s = time.monotonic() - started
        nodes = [f"a{i}" for i in range(n_agents)]
        for i, node in enumerate(nodes):
            layer, expert = shards[i % len(shards)]
            launcher.spawn(
                node,
                "127.0.0.1",
                port,
                shard_dir,
                shards=[(layer, expert, shard_file_name(layer, expert))],
            )
        launcher.wait_ready(nodes, timeout_s=120)
        ready_s = time.monotonic() - started
        time.sleep(1.0)  # let the agents settle (first publishes, GC)
        memory = launcher.memory()
    finally:
        launcher.stop()
        broker.stop()
    agents = [v for k, v in memory.items() if k.startswith("a")]
    figures = {
        "agents": n_agents,
        "zygote_start_s": zygote_s,
        "all_ready_s": ready_s,
        "zygote_pss_mib": memory["_launcher"] / 2**20,
        "agent_pss_mean_mib": sum(agents) / len(agents) / 2**20,
        "agent_pss_max_mib": max(agents) / 2**20,
        "total_pss_mib": memory["total"] / 2**20,
    }
    print(
        f"memory: {n_agents} agents ready in {ready_s:.1f} s "
        f"(zygote {zygote_s:.1f} s); "
        f"PSS zygote {figures['zygote_pss_mib']:.0f} MiB, agent mean "
        f"{figures['agent_pss_mean_mib']:.1f} MiB (max "
        f"{figures['agent_pss_max_mib']:.1f}), total "
        f"{figures['total_pss_mib']:.0f} MiB (target <= 2048 MiB)"
    )
    return figures


def bench_latency(args: argparse.Namespace, shard_dir: Path) -> dict[str, object]:
    from controller.deployment import run_inference
    from controller.inference import MoeConfig
    from controller.latency import format_report
    from topology.emulator import Emulator
    from topology.scenario import load_scenario

    if os.geteuid() != 0:
        print("latency: skipped (needs root to build the emulated network)")
        return {}
    scenario = load_scenario(args.scenario)
    emulator = Emulator(scenario)
    started = time.monotonic()
    emulator.up()
    results: dict[str, object] = {}
    try:
        if args.at > 0:
            emulator.step(args.at)
        print(
            f"scenario {scenario.name}: up in {time.monotonic() - started:.1f} s, "
            f"t = {emulator.t_s:.0f} s, shaping {emulator.substrate.shaping_mode}"
        )
        for policy in args.policies:
            config = MoeConfig(
                placement=policy,
                k=args.k,
                wire_dtype=args.wire_dtype,
                checkpoint=args.checkpoint,
            )
            report = run_inference(
                PROMPT, args.tokens, config, emulator=emulator, shard_dir=shard_dir
            )
            print(f"\n== placement {policy} ==")
            print(format_report(report))
            results[policy] = report
    finally:
        emulator.down()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--agents", type=int, default=64)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--policies", nargs="+", default=["round-robin", "ground"])
    parser.add_argument("--wire-dtype", default="float32")
    parser.add_argument("--at", type=float, default=0.0, help="scenario time, s")
    parser.add_argument("--scenario", default=None, help="default: built-in")
    parser.add_argument("--checkpoint", default=None, help="default: shipped one")
    parser.add_argument("--only", choices=["memory", "latency"], default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    run_root = Path(tempfile.mkdtemp(prefix="smoe-bench-inference-"))
    os.environ["SPACEMOE_RUN_DIR"] = str(run_root)
    from controller.deployment import ensure_shards

    shard_dir = ensure_shards(args.checkpoint)
    out: dict[str, object] = {}
    if args.only in (None, "memory"):
        out["memory"] = bench_memory(args.agents, shard_dir)
    if args.only in (None, "latency"):
        out["latency"] = bench_latency(args, shard_dir)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
