"""The `spacemoe` command as a user runs it: bad input, crashes, clean-up.

Every bad input must end in one line on stderr naming the value and the
fix, a non-zero exit, and nothing left behind. The crash test kills a
running `spacemoe up` with SIGKILL and checks that `spacemoe clean`
removes every namespace and process it had started. Commands run as
subprocesses inside the module's private namespaces (`net_sandbox`).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Imported here, not in a test: scipy starts BLAS threads when first
# imported, and threads started inside `net_sandbox` keep it from leaving.
import scipy.sparse.csgraph  # noqa: F401

from controller.placement import AwarePolicy, PlacementContext, forecast_delays_s
from topology.scenario import load_scenario

REPO = Path(__file__).resolve().parents[2]


def spacemoe(
    *args: str, run_dir: Path, timeout_s: float = 120.0, user: str | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "controller.cli", *args]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
        argv += [sys.executable, "-m", "controller.cli", *args]
    env = {**os.environ, "SPACEMOE_RUN_DIR": str(run_dir), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=REPO
    )


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_unknown_field_names_the_closest_one(tmp_path: Path) -> None:
    scenario = write(tmp_path / "s.yaml", "isl:\n  rate_bsp: 1.0e+6\n")
    line = one_line_error(spacemoe("snapshot", str(scenario), run_dir=tmp_path))
    assert "isl.rate_bsp" in line and "did you mean 'rate_bps'" in line


def test_out_of_range_value_names_the_bound(tmp_path: Path) -> None:
    scenario = write(tmp_path / "s.yaml", "gsl:\n  min_elevation_deg: 95\n")
    line = one_line_error(spacemoe("snapshot", str(scenario), run_dir=tmp_path))
    assert "gsl.min_elevation_deg" in line and "95" in line and "90" in line


def test_malformed_tle_names_file_line_and_checksum(tmp_path: Path) -> None:
    good1 = "1 25544U 98067A   24001.50000000  .00016717  00000-0  10270-3 0  9009"
    good2 = "2 25544  51.6416 247.4627 0006703 130.5360 325.0288 15.50377579 12345"
    bad2 = good2[:-1] + str((int(good2[-1]) + 1) % 10)
    tle = write(tmp_path / "bad.tle", f"ISS\n{good1}\n{bad2}\n")
    scenario = write(
        tmp_path / "s.yaml", f"shells:\n  - kind: tle\n    tle_file: {tle}\n"
    )
    line = one_line_error(spacemoe("snapshot", str(scenario), run_dir=tmp_path))
    assert "bad.tle" in line and ":3" in line and "checksum" in line


def test_partition_out_of_range_names_the_range(tmp_path: Path) -> None:
    scenario = write(
        tmp_path / "s.yaml", "emulation:\n  partitions: [10.0.0.1, 10.0.0.2]\n"
    )
    line = one_line_error(
        spacemoe("up", str(scenario), "--partition", "2", run_dir=tmp_path)
    )
    assert "partition_index" in line and "2" in line and "0 to 1" in line
    assert not (tmp_path / "emulator.pid").exists()


def test_missing_scenario_file(tmp_path: Path) -> None:
    line = one_line_error(spacemoe("snapshot", "nope.yaml", run_dir=tmp_path))
    assert "nope.yaml" in line and "cannot read" in line


@pytest.mark.root
def test_without_root_up_refuses_and_names_sudo(tmp_path: Path) -> None:
    tmp_path.chmod(0o777)
    line = one_line_error(spacemoe("up", run_dir=tmp_path, user="65534"))
    assert "root" in line and "sudo" in line
    assert not list(tmp_path.glob("*.pid"))


@pytest.mark.root
def test_exec_on_an_unknown_node(net_sandbox: None, tmp_path: Path) -> None:
    line = one_line_error(spacemoe("exec", "s9-9-9", "--", "true", run_dir=tmp_path))
    assert "s9-9-9" in line and "spacemoe status" in line


@pytest.mark.root
def test_bad_scenario_leaves_nothing_running(net_sandbox: None, tmp_path: Path) -> None:
    scenario = write(tmp_path / "s.yaml", "moe:\n  placement: random\n")
    line = one_line_error(spacemoe("up", str(scenario), run_dir=tmp_path))
    assert "moe.placement" in line and "'random'" in line
    assert not list(Path("/run/netns").glob("smoe-*"))
    assert not (tmp_path / "emulator.pid").exists()


@pytest.mark.root
def test_up_of_one_partition_builds_its_share_only(
    net_sandbox: None, tmp_path: Path
) -> None:
    # The other host (10.0.0.1) does not exist: its links are VXLAN devices
    # that carry nothing, which is all this test needs.
    scenario = write(
        tmp_path / "s.yaml",
        "name: part\nemulation:\n  partitions: [10.0.0.1, 10.0.0.2]\n",
    )
    run_dir = tmp_path / "run"
    start = f"{time.time():.0f}"
    argv = ["up", str(scenario), "--partition", "1", "--start-at", start]
    up = spacemoe(*argv, "--no-moe", "--no-monitoring", "--detach", run_dir=run_dir)
    try:
        assert up.returncode == 0, up.stderr
        status = spacemoe("status", run_dir=run_dir)
        assert "partition  1 of 2 (underlay 10.0.0.2): 33 nodes here" in (
            status.stdout
        ), status.stdout
        # Planes 3-5 of the 6x11 default are this host's.
        names = {p.name for p in Path("/run/netns").glob("smoe-*")}
        assert len(names) == 33 and "smoe-s0-3-0" in names, names
        links = subprocess.run(
            ["ip", "netns", "exec", "smoe-s0-3-0", "ip", "-d", "-o", "link"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "vxlan id" in links and "remote 10.0.0.1" in links, links
    finally:
        down = spacemoe("down", run_dir=run_dir)
    assert down.returncode == 0, down.stderr
    assert not list(Path("/run/netns").glob("smoe-*"))


@pytest.mark.root
@pytest.mark.slow
def test_clean_after_kill_9_of_a_full_up(net_sandbox: None, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    up = spacemoe("up", "--detach", run_dir=run_dir, timeout_s=300)
    assert up.returncode == 0, up.stderr
    pid = int((run_dir / "emulator.pid").read_text())
    started = _our_pids(run_dir)
    assert len(started) >= 10, started  # delay line, brokers, zygote, agents, ...
    assert list(Path("/run/netns").glob("smoe-*"))

    os.kill(pid, signal.SIGKILL)
    _wait_gone([pid])
    clean = spacemoe("clean", run_dir=run_dir)
    assert clean.returncode == 0, clean.stderr
    assert "removed" in clean.stdout

    assert not list(Path("/run/netns").glob("smoe-*"))
    _wait_gone(started)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True)
    assert "smoe" not in links.stdout
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True)
    assert "smoe" not in rules.stdout
    again = spacemoe("clean", run_dir=run_dir)
    assert "nothing of ours" in again.stdout


def _our_pids(run_dir: Path) -> list[int]:
    """Live processes recorded in the run directory's pid files."""
    pids = []
    for path in run_dir.rglob("*pid"):
        try:
            pid = int(path.read_text().split()[0])
        except (ValueError, IndexError, OSError):
            continue
        if Path(f"/proc/{pid}").exists():
            pids.append(pid)
    return pids


def _wait_gone(pids: list[int], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in pids if _running(p)]
        if not alive:
            return
        assert time.monotonic() < deadline, f"still running: {alive}"
        time.sleep(0.1)


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[1].split()[0] == "Z":
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return False
    return True


@pytest.mark.root
@pytest.mark.slow
def test_up_with_aware_placement_serves_from_its_forecast(
    net_sandbox: None, tmp_path: Path
) -> None:
    default = (REPO / "topology/scenarios/default.yaml").read_text()
    assert "placement: round-robin" in default
    scenario = write(
        tmp_path / "aware.yaml",
        default.replace("placement: round-robin", "placement: aware"),
    )
    run_dir = tmp_path / "run"
    try:
        up = spacemoe("up", str(scenario), "--detach", run_dir=run_dir, timeout_s=300)
        assert up.returncode == 0, up.stderr
        doc = json.loads((run_dir / "moe.json").read_text())
        report_path = tmp_path / "infer.json"
        infer = spacemoe(
            "infer", "import ", "--tokens", "4", "--json", str(report_path),
            run_dir=run_dir, timeout_s=180,
        )  # fmt: skip
        assert infer.returncode == 0, infer.stderr
    finally:
        down = spacemoe("down", run_dir=run_dir, timeout_s=120)
        if down.returncode != 0:
            spacemoe("clean", run_dir=run_dir)
    assert down.returncode == 0, down.stderr

    # The satellites are the ones the policy picks from the forecast.
    config = doc["config"]
    assert doc["policy"]["name"] == "aware"
    home = config["home"]
    ahead = forecast_delays_s(
        load_scenario(scenario), home, 0.0, 1200.0, config["horizon_samples"],
    )  # fmt: skip
    now = {n: d[0] for n, d in ahead.items() if n != home and math.isfinite(d[0])}
    context = PlacementContext(home, 0.0, now, delay_ahead_s=ahead)
    satellites = [n for n in ahead if n.startswith("s")]
    expected = AwarePolicy(k=config["k"]).rank(satellites, context)[: config["k"]]
    placed = {n for p in doc["placement"] for n in p["nodes"]}
    assert placed == set(expected)
    assert set(doc["delay_ahead_s"]) == placed
    assert all(
        len(d) == config["horizon_samples"] for d in doc["delay_ahead_s"].values()
    )

    report = json.loads(report_path.read_text())
    assert report["reference"]["tokens_identical"]
    assert report["reference"]["max_abs_logit_diff"] <= 1e-5
