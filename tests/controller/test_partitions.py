"""`spacemoe up` split over two pseudo-hosts, inference across them.

Two network namespaces joined by an underlay veth pair stand for two
machines. In each, a holder process keeps a private mount namespace (own
/run/netns and sysfs) open; every `spacemoe` command of that host runs in
the holder's namespaces, as if on that machine. Both hosts bring up their
partition of the built-in scenario with brokers, agents and Prometheus on
one shared start time; `spacemoe infer` at the home station's host then
reaches experts on both hosts over the data plane.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.topology.underlay import underlay

REPO = Path(__file__).resolve().parents[2]
HOSTS = ["10.78.0.1", "10.78.0.2"]
PSEUDO = ["smoetest-ia", "smoetest-ib"]


class Host:
    """A pseudo-host: a holder process in its network and mount namespace."""

    def __init__(self, index: int, run_dir: Path) -> None:
        self.run_dir = run_dir
        script = (
            "mount -t tmpfs none /run/netns && mount -t sysfs none /sys "
            "&& exec sleep infinity"
        )
        self.holder = subprocess.Popen(
            [
                "nsenter",
                f"--net=/run/netns/{PSEUDO[index]}",
                "--",
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                script,
            ]
        )
        # The holder is ready once it has exec'd `sleep`, which the shell does
        # only after both mounts succeeded. Its first command line (nsenter's)
        # already names sleep in the script, so argv[0] is what tells.
        deadline = time.monotonic() + 10
        while self._argv0() != b"sleep":
            assert self.holder.poll() is None, (
                f"pseudo-host holder exited with {self.holder.returncode}"
            )
            assert time.monotonic() < deadline, "pseudo-host holder did not start"
            time.sleep(0.05)

    def _argv0(self) -> bytes:
        try:
            cmdline = Path(f"/proc/{self.holder.pid}/cmdline").read_bytes()
        except FileNotFoundError:
            return b""
        return cmdline.split(b"\0", 1)[0]

    def spacemoe(
        self, *args: str, timeout_s: float = 300.0
    ) -> subprocess.CompletedProcess[str]:
        pid = self.holder.pid
        argv = [
            "nsenter",
            f"--net=/proc/{pid}/ns/net",
            f"--mount=/proc/{pid}/ns/mnt",
            "--",
            sys.executable,
            "-m",
            "controller.cli",
            *args,
        ]
        env = {
            **os.environ,
            "SPACEMOE_RUN_DIR": str(self.run_dir),
            "PYTHONPATH": str(REPO),
        }
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=REPO
        )

    def netns_names(self) -> list[str]:
        pid = self.holder.pid
        out = subprocess.run(
            ["nsenter", f"--mount=/proc/{pid}/ns/mnt", "--", "ls", "/run/netns"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return out.split()

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait()


@pytest.fixture
def two_hosts(net_sandbox: None, tmp_path: Path) -> Iterator[list[Host]]:
    with underlay(PSEUDO, HOSTS):
        hosts: list[Host] = []
        try:
            for index in range(2):
                hosts.append(Host(index, tmp_path / f"run{index}"))
            yield hosts
        finally:
            # Always down and clean: an `up` that went astray may have left
            # nothing in this host's /run/netns and still be running.
            for host in hosts:
                try:
                    host.spacemoe("down")
                    host.spacemoe("clean")
                finally:
                    host.close()


@pytest.mark.root
@pytest.mark.slow
def test_inference_reaches_experts_on_both_hosts(
    two_hosts: list[Host], tmp_path: Path
) -> None:
    scenario = tmp_path / "split.yaml"
    base = (REPO / "topology/scenarios/default.yaml").read_text()
    scenario.write_text(
        base.replace("name: ", "name: split-", 1)
        .replace("  partitions: []", f"  partitions: {json.dumps(HOSTS)}")
        .replace("  k: 8 ", "  k: 24 ")
    )
    start_at = f"{time.time() + 60:.0f}"
    for index, host in enumerate(two_hosts):
        up = host.spacemoe(
            "up", str(scenario), "--partition", str(index), "--start-at", start_at,
            "--detach",
        )  # fmt: skip
        assert up.returncode == 0, up.stderr + up.stdout

    moe = json.loads((two_hosts[0].run_dir / "moe.json").read_text())
    state = json.loads((two_hosts[0].run_dir / "state.json").read_text())
    owner = {n["name"]: n["partition"] for n in state["nodes"]}
    holders = {n for p in moe["placement"] for n in p["nodes"]}
    assert owner[moe["home"]] == 0
    assert {owner[n] for n in holders} == {0, 1}, holders
    # The same placement on both hosts, each running its own share of it.
    other = json.loads((two_hosts[1].run_dir / "moe.json").read_text())
    assert other["placement"] == moe["placement"]

    out = tmp_path / "infer.json"
    infer = two_hosts[0].spacemoe(
        "infer", "def main(", "--tokens", "4", "--json", str(out)
    )
    assert infer.returncode == 0, infer.stderr + infer.stdout
    report = json.loads(out.read_text())
    assert len(report["tokens"]) == 4 and len(report["rows"]) == 4

    # At the other host, the home station is not here: a clear refusal.
    refused = two_hosts[1].spacemoe("infer", "def main(", "--tokens", "1")
    assert refused.returncode != 0
    assert "runs on partition 0 (10.78.0.1)" in refused.stderr

    for host in two_hosts:
        down = host.spacemoe("down")
        assert down.returncode == 0, down.stderr
        assert host.netns_names() == []
