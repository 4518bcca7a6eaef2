"""The whole testbed on the default scenario, inside a private sandbox.

One scenario run (network, power model, brokers and agents, Prometheus)
serves every check here: inference through the satellites matches the
single-process model, every dashboard panel's query returns data from the
real Prometheus, the exporters pass `promtool check metrics`, the report
writes its PNGs, and tear-down leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.controller.testbeds import running_testbed
from topology.rundir import run_dir
from topology.scenario import load_scenario

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture(scope="module")
def testbed_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("testbed") / "run"


@pytest.fixture(autouse=True)
def private_run_dir(
    testbed_run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """Every test here talks to the one testbed of this module."""
    monkeypatch.setenv("SPACEMOE_RUN_DIR", str(testbed_run_dir))
    yield testbed_run_dir


@pytest.fixture(scope="module")
def testbed(net_sandbox: None, testbed_run_dir: Path) -> Iterator[Any]:
    scenario = load_scenario(None)
    # Ten times real time: several power steps per second of test.
    scenario = dataclasses.replace(
        scenario, time=dataclasses.replace(scenario.time, speed=10.0)
    )
    with running_testbed(scenario, testbed_run_dir) as testbed:
        yield testbed


def test_inference_through_the_running_testbed(testbed: Any) -> None:
    from controller.testbed import infer_on_running

    report, table = infer_on_running("import ", 6)
    assert report["reference"]["tokens_identical"]
    assert report["reference"]["max_abs_logit_diff"] <= 1e-5
    assert len(report["rows"]) == 6
    # The experts sit on satellites: each token pays real propagation.
    assert report["summary"]["total_s_p50"] > 2 * min(
        d for d in report["path_delay_s"].values() if d
    )
    assert "ratio" in table


def test_power_model_follows_the_agents_work(testbed: Any) -> None:
    # Agents charged their busy time through the shared file.
    busy = testbed.share.busy_totals_s()
    rows = {n: i for i, n in enumerate(testbed.emulator.names)}
    import json

    placed = json.loads((run_dir() / "moe.json").read_text())
    holders = {n for p in placed["placement"] for n in p["nodes"]}
    assert all(busy[rows[n]] > 0 for n in holders)
    idle = [n for n in testbed.emulator.names[: testbed.emulator.n_sats]]
    idle = [n for n in idle if n not in holders]
    assert all(busy[rows[n]] == 0 for n in idle)
    assert testbed.power.elapsed_s > 0


def test_every_dashboard_panel_has_data(testbed: Any) -> None:
    from monitoring.dashboards import check_panels

    url = testbed.prometheus.url
    # Wait for the scrapes after the inference test's last token.
    deadline = time.monotonic() + 30
    while True:
        counts = check_panels(url)
        empty = sorted(k for k, v in counts.items() if v == 0)
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert not empty, f"panels without data: {empty}"


def test_exporters_pass_promtool(testbed: Any) -> None:
    from controller.testbed import EMULATOR_METRICS_PORT

    body = urllib.request.urlopen(
        f"http://127.0.0.1:{EMULATOR_METRICS_PORT}/metrics", timeout=10
    ).read()
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=body, capture_output=True
    )
    assert check.returncode == 0, check.stderr.decode() + check.stdout.decode()
    config = run_dir() / "prometheus" / "prometheus.yml"
    check = subprocess.run(
        ["promtool", "check", "config", str(config)], capture_output=True
    )
    assert check.returncode == 0, check.stderr.decode()


def test_report_writes_pngs(testbed: Any, tmp_path: Path) -> None:
    from controller.testbed import report_from_running

    paths = report_from_running(tmp_path, minutes=5)
    names = {p.name for p in paths}
    assert "ground-track.png" in names
    assert len(paths) >= 6
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 10_000


def test_status_describes_the_run(testbed: Any) -> None:
    from controller.testbed import format_status, read_status

    state = read_status()
    assert state["alive"]
    assert state["shaping"] in ("netem", "tbf+delayline")
    text = format_status(state)
    assert "round-robin over 8 nodes" in text
    assert f"{state['counts']['links_up']} up" in text
