"""The Prometheus of a run: configuration, targets, process, queries."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from monitoring.prometheus import PrometheusServer, query, query_range
from tests.monitoring.conftest import LiveMonitoring, free_port
from topology.errors import ConfigError, EmulationError, MonitoringError


def test_promtool_accepts_the_config(tmp_path: Path) -> None:
    server = PrometheusServer(tmp_path, port=free_port(), scrape_interval_s=2)
    server.update_targets("satellite", [("198.18.128.2:9471", {"satellite": "s0-0"})])
    path = server.write_config()
    proc = subprocess.run(
        ["promtool", "check", "config", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_sub_second_scrape_interval_is_written_in_milliseconds(tmp_path: Path) -> None:
    server = PrometheusServer(tmp_path, scrape_interval_s=0.5)
    assert server.config()["global"]["scrape_interval"] == "500ms"


def test_targets_file_is_file_sd_json(tmp_path: Path) -> None:
    server = PrometheusServer(tmp_path)
    path = server.update_targets(
        "satellite",
        [("198.18.128.2:9471", {"satellite": "s0-0"}), ("198.18.128.3:9471", {})],
    )
    groups = json.loads(path.read_text())
    assert groups[0] == {
        "targets": ["198.18.128.2:9471"],
        "labels": {"role": "satellite", "satellite": "s0-0"},
    }
    assert len(groups) == 2
    assert not any(p.name.endswith(".tmp") for p in path.parent.iterdir())

    server.update_targets("satellite", [])
    assert json.loads(path.read_text()) == []


@pytest.mark.parametrize(
    ("name", "target"),
    [("Satellite", "1.2.3.4:1"), ("sat", "1.2.3.4"), ("sat", "1.2.3.4:1 x")],
)
def test_bad_targets_are_refused(tmp_path: Path, name: str, target: str) -> None:
    with pytest.raises(ConfigError):
        PrometheusServer(tmp_path).update_targets(name, [(target, {})])


def test_start_stop_and_a_taken_port(tmp_path: Path) -> None:
    server = PrometheusServer(tmp_path, port=free_port())
    server.start()
    try:
        pid = server.running_pid()
        assert pid is not None and Path(f"/proc/{pid}").exists()
        assert query(server.url, "1 + 1")[0]["value"][1] == "2"

        with pytest.raises(EmulationError, match="already running"):
            server.start()
        other = PrometheusServer(tmp_path / "other", port=server.port)
        with pytest.raises(EmulationError, match="already in use"):
            other.start()
        assert other.running_pid() is None
    finally:
        assert server.stop()
    assert not Path(f"/proc/{pid}").exists()
    assert not server.pid_path.exists()
    assert server.stop() is False


def test_a_stale_pid_file_is_not_trusted(tmp_path: Path) -> None:
    server = PrometheusServer(tmp_path)
    server.dir.mkdir(parents=True)
    # Our own pid: alive, but not a Prometheus of this run.
    server.pid_path.write_text(f"{os.getpid()}\n")
    assert server.running_pid() is None
    assert server.stop() is False


def test_a_port_held_by_something_else_fails_clearly(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(EmulationError, match=f"port {port} on 127.0.0.1"):
            PrometheusServer(tmp_path, port=port).start()


def test_a_missing_binary_is_named(tmp_path: Path) -> None:
    server = PrometheusServer(tmp_path, binary="/nonexistent/prometheus")
    with pytest.raises(EmulationError, match="apt-get install prometheus"):
        server.start()


def test_bad_config_exits_with_its_log(tmp_path: Path) -> None:
    server = PrometheusServer(tmp_path, port=free_port(), retention_time="soon")
    with pytest.raises(EmulationError, match="exited"):
        server.start(timeout_s=10)
    assert server.running_pid() is None


def test_query_errors_name_the_cause(live: LiveMonitoring) -> None:
    with pytest.raises(MonitoringError, match="rejected 'up{'"):
        query(live.url, "up{")
    with pytest.raises(MonitoringError, match="cannot reach Prometheus"):
        query(f"http://127.0.0.1:{free_port()}", "up")
    with pytest.raises(ConfigError, match="only http on localhost"):
        query("http://192.0.2.1:9090", "up")


def test_range_query_returns_samples(live: LiveMonitoring) -> None:
    end = time.time()
    series = query_range(live.url, "spacemoe_battery_soc_ratio", live.start, end, 1)
    assert {s["metric"]["satellite"] for s in series} == {"s0-0", "s0-1"}
    assert all(len(s["values"]) >= 2 for s in series)
    assert {s["metric"]["job"] for s in series} == {"spacemoe"}


def test_another_process_can_stop_it_by_pid_file(tmp_path: Path) -> None:
    # `spacemoe down` builds its own PrometheusServer over the same run dir.
    started = PrometheusServer(tmp_path, port=free_port())
    started.start()
    try:
        other = PrometheusServer(tmp_path)
        pid = other.running_pid()
        assert pid is not None
        t0 = time.monotonic()
        assert other.stop()
        # Our child is a zombie until we reap it; that counts as stopped.
        assert time.monotonic() - t0 < 5
    finally:
        started.stop()
    assert not Path(f"/proc/{pid}").exists()


def test_targets_and_data_of_an_earlier_run_are_dropped_at_start(
    tmp_path: Path,
) -> None:
    earlier = PrometheusServer(tmp_path, port=free_port())
    stale = earlier.update_targets("inference", [("127.0.0.1:9472", {})])
    old_block = earlier.data_dir / "01OLDBLOCK"
    old_block.mkdir(parents=True)
    server = PrometheusServer(tmp_path, port=free_port())
    kept = server.update_targets("satellite", [("127.0.0.1:9471", {})])
    server.start()
    try:
        assert kept.exists()
        assert not stale.exists()
        assert not old_block.exists()
    finally:
        server.stop()
