"""The `spacemoe` command-line tool.

Only this module configures logging, prints, and turns errors into exit
codes; everything it calls raises :class:`SpaceMoeError` subclasses whose
messages already name the bad value and the fix.

Commands::

    spacemoe up [SCENARIO] [--detach]     bring a scenario up, advance time
    spacemoe down                         stop the running scenario
    spacemoe status [--json]              nodes, links, routes, shaping, time
    spacemoe exec NODE -- CMD ...         run a command inside a node
    spacemoe snapshot [SCENARIO] [--at S] geometry only, as JSON
    spacemoe clean                        remove our leftovers after a crash
    spacemoe infer PROMPT --tokens N      generate through the constellation
    spacemoe report [--out DIR]           PNG plots from Prometheus
    spacemoe power [SCENARIO] --days N    fast-forward power and battery ageing
    spacemoe demo [SCENARIO]              up, measure, infer, down
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from topology.errors import SpaceMoeError

log = logging.getLogger("spacemoe")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    # Long-running commands narrate state changes at INFO; one-shot
    # commands stay quiet unless asked.
    chatty = args.command in ("up", "demo")
    _configure_logging(args.verbose + (1 if chatty else 0))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SpaceMoeError as exc:
        print(f"spacemoe {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"spacemoe {args.command}: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spacemoe",
        description="Emulate a LEO constellation and serve a mixture-of-experts "
        "model across it.",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more log output (-vv: every kernel change)",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def scenario_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "scenario",
            nargs="?",
            default=None,
            help="scenario YAML file (default: the built-in one)",
        )

    sp = sub.add_parser("up", help="bring a scenario up and keep time advancing")
    scenario_arg(sp)
    sp.add_argument(
        "--detach",
        action="store_true",
        help="return once the scenario is up; stop it with `down`",
    )
    sp.add_argument(
        "--no-moe",
        action="store_true",
        help="emulate the network only: no brokers, agents or model",
    )
    sp.add_argument(
        "--no-monitoring", action="store_true", help="do not start Prometheus"
    )
    sp.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="S",
        help="stop after S seconds of scenario time",
    )
    sp.add_argument(
        "--speed",
        type=float,
        default=None,
        help="scenario seconds per wall second (overrides the file)",
    )
    sp.add_argument(
        "--partition",
        type=int,
        default=None,
        metavar="I",
        help="run this host's share, index I into emulation.partitions "
        "(overrides emulation.partition_index)",
    )
    sp.add_argument(
        "--start-at",
        type=float,
        default=None,
        metavar="UNIX_S",
        help="scenario time 0 is this wall-clock time (seconds since 1970); "
        "give every partition the same value so their steps line up",
    )
    sp.set_defaults(func=_cmd_up)

    sp = sub.add_parser("down", help="stop the running scenario and remove it")
    sp.set_defaults(func=_cmd_down)

    sp = sub.add_parser("status", help="show the running scenario")
    sp.add_argument("--json", action="store_true", help="print the full state")
    sp.set_defaults(func=_cmd_status)

    sp = sub.add_parser("exec", help="run a command inside a node's namespace")
    sp.add_argument("node")
    sp.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    sp.set_defaults(func=_cmd_exec)

    sp = sub.add_parser("snapshot", help="geometry at one instant, as JSON")
    scenario_arg(sp)
    sp.add_argument(
        "--at",
        type=float,
        default=0.0,
        metavar="S",
        help="scenario seconds after the epoch (default 0)",
    )
    sp.add_argument("--out", type=Path, default=None, help="write to a file")
    sp.set_defaults(func=_cmd_snapshot)

    sp = sub.add_parser("clean", help="remove leftovers of a crashed run (ours only)")
    sp.set_defaults(func=_cmd_clean)

    sp = sub.add_parser("infer", help="generate text through the constellation")
    sp.add_argument("prompt")
    sp.add_argument("--tokens", type=int, default=32)
    sp.add_argument(
        "--home",
        default=None,
        help="node where the request enters (default: scenario's)",
    )
    sp.add_argument(
        "--placement",
        default=None,
        help="ground | round-robin | aware (default: scenario's)",
    )
    sp.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="FILE",
        help="also write the full report as JSON",
    )
    sp.set_defaults(func=_cmd_infer)

    sp = sub.add_parser("report", help="PNG plots of a run from Prometheus")
    sp.add_argument("--out", type=Path, default=Path("report"))
    sp.add_argument("--minutes", type=float, default=10.0, help="how far back to plot")
    sp.set_defaults(func=_cmd_report)

    sp = sub.add_parser("power", help="fast-forward power, heat and battery ageing")
    scenario_arg(sp)
    sp.add_argument("--days", type=float, default=1.0)
    sp.add_argument("--step", type=float, default=30.0, metavar="S")
    sp.add_argument(
        "--busy",
        type=float,
        default=0.5,
        help="compute busy fraction of every satellite (0..1)",
    )
    sp.add_argument("--json", type=Path, default=None, metavar="FILE")
    sp.set_defaults(func=_cmd_power)

    sp = sub.add_parser("demo", help="up, measure RTT, infer, down")
    scenario_arg(sp)
    sp.add_argument("--tokens", type=int, default=24)
    sp.add_argument("--prompt", default="def main(")
    sp.set_defaults(func=_cmd_demo)
    return p


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * min(verbosity, 2)
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _cmd_up(args: argparse.Namespace) -> int:
    from controller.testbed import Testbed, detach_and_wait

    if args.detach:
        return detach_and_wait(_reinvoke_without_detach())
    testbed = Testbed.from_args(
        args.scenario,
        moe=not args.no_moe,
        monitoring=not args.no_monitoring,
        duration_s=args.duration,
        speed=args.speed,
        partition=args.partition,
        start_at_unix_s=args.start_at,
    )
    testbed.run_forever(progress=_progress)
    return 0


def _reinvoke_without_detach() -> list[str]:
    argv = [a for a in sys.argv[1:] if a != "--detach"]
    return [sys.executable, "-m", "controller.cli", *argv]


def _cmd_down(args: argparse.Namespace) -> int:
    from controller.testbed import stop_running

    print(stop_running())
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from controller.testbed import format_status, read_status

    state = read_status()
    if args.json:
        print(json.dumps(state, indent=1))
    else:
        print(format_status(state))
    return 0


def _cmd_exec(args: argparse.Namespace) -> int:
    from topology.emulator import exec_in

    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print(
            "spacemoe exec: give a command after --, e.g. "
            "spacemoe exec s0-0-0 -- ip route",
            file=sys.stderr,
        )
        return 2
    exec_in(args.node, argv)  # replaces this process
    return 0


def _cmd_snapshot(args: argparse.Namespace) -> int:
    from topology.scenario import load_scenario
    from topology.snapshot import snapshot

    scenario = load_scenario(args.scenario)
    text = json.dumps(snapshot(scenario, args.at), indent=1)
    if args.out:
        args.out.write_text(text + "\n")
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


def _cmd_clean(args: argparse.Namespace) -> int:
    from topology.cleanup import clean

    removed = clean()
    if removed:
        for item in removed:
            print(f"removed {item}")
    else:
        print("nothing of ours was left")
    return 0


def _cmd_infer(args: argparse.Namespace) -> int:
    from controller.testbed import infer_on_running

    report, table = infer_on_running(
        args.prompt, args.tokens, home=args.home, placement=args.placement
    )
    print(table)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from controller.testbed import report_from_running

    for path in report_from_running(args.out, minutes=args.minutes):
        print(f"wrote {path}")
    return 0


def _cmd_power(args: argparse.Namespace) -> int:
    from controller.testbed import power_fast_forward

    summary, text = power_fast_forward(
        args.scenario, days=args.days, step_s=args.step, busy_fraction=args.busy
    )
    print(text)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from controller.demo import run_demo

    return run_demo(
        args.scenario, prompt=args.prompt, tokens=args.tokens, progress=_progress
    )


def _progress(message: str) -> None:
    """Progress lines for long steps; only on a terminal or when asked."""
    from controller.testbed import PROGRESS_PREFIX

    if sys.stderr.isatty() or os.environ.get("SPACEMOE_PROGRESS"):
        print(f"{PROGRESS_PREFIX}{message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
