"""Tear-down: down() and a failed bring-up leave nothing; clean() after kill -9.

Each test runs in the module's private network and mount namespaces
(`net_sandbox`), so what it checks for ("no smoe namespace, no smoe link")
is about this test's emulator only; the crash test adds its own private
namespaces around the killed emulator and `clean()`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from topology.errors import EmulationError
from topology.scenario import load_scenario


def scenario():
    return replace(load_scenario(), name="test-cleanup")


@pytest.mark.root
def test_down_leaves_nothing(
    net_sandbox: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from topology.emulator import Emulator, status

    monkeypatch.setenv("SPACEMOE_RUN_DIR", str(tmp_path))
    emulator = Emulator(scenario())
    emulator.up()
    helpers = emulator.substrate.helper_pids()
    in_node = emulator.substrate.popen(emulator.names[0], ["sleep", "60"])
    inode = os.stat(f"/run/netns/smoe-{emulator.names[0]}").st_ino
    deadline = time.monotonic() + 10
    while os.stat(f"/proc/{in_node.pid}/ns/net").st_ino != inode:
        assert time.monotonic() < deadline, "nsenter never entered the node"
        time.sleep(0.01)
    emulator.down()
    assert in_node.wait(timeout=10) is not None
    assert not any((Path("/run/netns") / f"smoe-{n}").exists() for n in emulator.names)
    links = subprocess.run(
        ["ip", "-o", "link"], capture_output=True, text=True, check=True
    ).stdout
    assert "smoe-mgmt" not in links and "smoe-m0:" not in links
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in helpers):
        assert time.monotonic() < deadline, f"delay line {helpers} still runs"
        time.sleep(0.1)
    rules = subprocess.run(
        ["iptables-save"], capture_output=True, text=True, check=True
    ).stdout
    assert "smoe" not in rules
    assert status() is None
    assert not (tmp_path / "emulator.pid").exists()


@pytest.mark.root
def test_failed_bring_up_tears_down(
    net_sandbox: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from topology.emulator import Emulator

    monkeypatch.setenv("SPACEMOE_RUN_DIR", str(tmp_path))
    emulator = Emulator(scenario())

    def broken(node, routes):
        raise EmulationError("injected failure while installing routes")

    monkeypatch.setattr(emulator.substrate, "apply_routes", broken)
    with pytest.raises(EmulationError, match="injected"):
        emulator.up()
    assert not any((Path("/run/netns") / f"smoe-{n}").exists() for n in emulator.names)
    assert "smoe-mgmt" not in Path("/proc/net/dev").read_text()


CRASH_DRIVER = textwrap.dedent(
    """
    import json, os, signal, subprocess, sys, time
    from pathlib import Path

    # Private /run/netns: this sandbox sees only its own namespaces.
    os.makedirs("/run/netns", exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run/netns"], check=True)
    run_dir = Path(sys.argv[1])
    child = subprocess.Popen([sys.executable, "-c", '''
    import time
    from dataclasses import replace
    from topology.emulator import Emulator
    from topology.scenario import load_scenario
    emulator = Emulator(replace(load_scenario(), name="crash"))
    emulator.up()
    time.sleep(600)
    '''])
    deadline = time.monotonic() + 120
    while not (run_dir / "state.json").exists():
        assert child.poll() is None, "emulator died during bring-up"
        assert time.monotonic() < deadline, "bring-up took over 120 s"
        time.sleep(0.2)
    helpers = [int(p) for p in (run_dir / "delayline.pid").read_text().split()]
    sleeper = subprocess.Popen(
        ["ip", "netns", "exec", "smoe-s0-0-0", "sleep", "600"]
    )
    time.sleep(0.5)
    child.send_signal(signal.SIGKILL)
    child.wait()
    before = len(os.listdir("/run/netns"))

    from topology.cleanup import clean
    removed = clean()
    sleeper.wait(timeout=10)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{p}").exists() for p in helpers):
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    print(json.dumps({
        "namespaces_before": before,
        "namespaces_after": os.listdir("/run/netns"),
        "smoe_links": [l for l in links.splitlines() if "smoe" in l],
        "helpers_alive": [p for p in helpers if Path(f"/proc/{p}").exists()],
        "removed": removed,
        "pid_files": [str(p) for p in run_dir.rglob("*.pid")],
    }))
    """
)


@pytest.mark.root
@pytest.mark.slow
def test_clean_after_kill_9(net_sandbox: None, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(CRASH_DRIVER)
    env = dict(os.environ, SPACEMOE_RUN_DIR=str(run_dir))
    proc = subprocess.run(
        [
            "unshare",
            "--net",
            "--mount",
            "--propagation",
            "private",
            sys.executable,
            str(driver),
            str(run_dir),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["namespaces_before"] == 69
    assert result["namespaces_after"] == []
    assert result["smoe_links"] == []
    assert result["helpers_alive"] == []
    assert result["pid_files"] == []
    assert any("process" in line for line in result["removed"])
