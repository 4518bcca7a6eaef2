"""The Prometheus server of a run: configuration, targets, process, queries.

`spacemoe up` starts one Prometheus (the distribution's package,
``/usr/bin/prometheus``) bound to 127.0.0.1, with everything under the run
directory::

    prometheus/prometheus.yml     scrape configuration
    prometheus/targets/*.json     file-based service discovery, one per group
    prometheus/data/              the time-series database
    prometheus/prometheus.pid     pid, so `spacemoe down` stops exactly ours
    prometheus/prometheus.log     its stdout and stderr

Two scrape jobs: ``spacemoe-emulator`` (static, the emulator's central
exporter) and ``spacemoe`` (file_sd over ``targets/*.json``: satellite
agents on their management addresses, the inference controller). Targets
are rewritten atomically, and Prometheus picks the change up through inotify
without a reload. Both jobs honour the exporters' labels: an exporter that
sets ``satellite`` or ``kind`` itself keeps it when a target label has the
same name, instead of seeing it renamed to ``exported_...``.

The query helpers talk HTTP to localhost only; nothing leaves the machine.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from monitoring.metrics import EMULATOR_METRICS_PORT
from topology.errors import ConfigError, EmulationError, MonitoringError
from topology.rundir import run_dir as default_run_dir

log = logging.getLogger(__name__)

PROMETHEUS_BINARY = "/usr/bin/prometheus"
DEFAULT_PORT = 9090
EMULATOR_JOB = "spacemoe-emulator"
TARGETS_JOB = "spacemoe"

_GROUP_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_TARGET = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$")
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


class PrometheusServer:
    """One Prometheus process for one run directory.

    Caveats: scenario time is not Prometheus time; samples carry wall-clock
    timestamps, and the scenario clock is the metric
    ``spacemoe_scenario_time_seconds``. The database sits in the run
    directory (tmpfs under /run by default), so `retention_size` bounds the
    memory it can take.
    """

    def __init__(
        self,
        run_dir: Path | None = None,
        *,
        port: int = DEFAULT_PORT,
        scrape_interval_s: float = 1.0,
        retention_time: str = "2d",
        retention_size: str = "1GB",
        emulator_target: str = f"127.0.0.1:{EMULATOR_METRICS_PORT}",
        binary: str = PROMETHEUS_BINARY,
    ) -> None:
        if not 1 <= port <= 65535:
            raise ConfigError(f"Prometheus port {port} is not a TCP port; use 1-65535")
        if not 0.1 <= scrape_interval_s <= 60:
            raise ConfigError(
                f"scrape_interval_s {scrape_interval_s!r} is out of range; use "
                "0.1 to 60 seconds (1 or 2 suits the testbed)"
            )
        _check_target(emulator_target)
        self.port = port
        self.scrape_interval_s = scrape_interval_s
        self.retention_time = retention_time
        self.retention_size = retention_size
        self.emulator_target = emulator_target
        self.binary = binary
        self.dir = (
            run_dir if run_dir is not None else default_run_dir()
        ) / "prometheus"
        self.config_path = self.dir / "prometheus.yml"
        self.targets_dir = self.dir / "targets"
        self._target_files: set[str] = set()
        self.data_dir = self.dir / "data"
        self.pid_path = self.dir / "prometheus.pid"
        self.log_path = self.dir / "prometheus.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL of the HTTP API."""
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        """The scrape configuration as data (written by write_config)."""
        interval = _duration(self.scrape_interval_s)
        return {
            "global": {
                "scrape_interval": interval,
                # Prometheus refuses a timeout longer than the interval.
                "scrape_timeout": interval,
                "evaluation_interval": interval,
            },
            "scrape_configs": [
                {
                    "job_name": EMULATOR_JOB,
                    "honor_labels": True,
                    "static_configs": [
                        {
                            "targets": [self.emulator_target],
                            "labels": {"role": "emulator"},
                        }
                    ],
                },
                {
                    "job_name": TARGETS_JOB,
                    "honor_labels": True,
                    "file_sd_configs": [
                        {
                            "files": [str(self.targets_dir / "*.json")],
                            # inotify sees changes at once; this is a fallback.
                            "refresh_interval": "10s",
                        }
                    ],
                },
            ],
        }

    def write_config(self) -> Path:
        """Write prometheus.yml and create the targets directory."""
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        text = "# Written by spacemoe (monitoring/prometheus.py); edits are lost.\n"
        text += yaml.safe_dump(self.config(), sort_keys=False)
        _write_atomically(self.config_path, text)
        return self.config_path

    def update_targets(
        self, name: str, targets: Sequence[tuple[str, Mapping[str, str]]]
    ) -> Path:
        """Replace target group `name` (targets/<name>.json) atomically.

        Each target is ("host:port", labels). Every target gets the label
        ``role=<name>`` unless its labels set `role`. An empty list removes
        the group's targets.
        """
        if not _GROUP_NAME.match(name):
            raise ConfigError(
                f"target group {name!r}: use lowercase letters, digits, '-' or "
                "'_' (it becomes a file name)"
            )
        groups = []
        for target, labels in targets:
            _check_target(target)
            groups.append({"targets": [target], "labels": {"role": name, **labels}})
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        path = self.targets_dir / f"{name}.json"
        self._target_files.add(path.name)
        _write_atomically(path, json.dumps(groups, indent=1) + "\n")
        log.debug("wrote %d targets to %s", len(groups), path)
        return path

    def running_pid(self) -> int | None:
        """Pid of the Prometheus this run started, if it is still running.

        The pid file alone is not trusted: the process must be a prometheus
        reading our configuration file, so a recycled pid is never signalled.
        """
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        if f"--config.file={self.config_path}".encode() not in cmdline:
            return None
        return pid

    def start(self, timeout_s: float = 30.0, keep_data: bool = False) -> None:
        """Start Prometheus and wait until it reports ready.

        The data of an earlier run in the same directory is removed unless
        `keep_data`: its series would otherwise show in this run's queries
        for Prometheus's five-minute lookback, as it never saw them end.

        Raises EmulationError if the binary is missing, the port is taken,
        or it exits or does not become ready; nothing is left running then.
        """
        if not shutil.which(self.binary):
            raise EmulationError(
                f"Prometheus binary {self.binary!r} not found; install the "
                "distribution's package (apt-get install prometheus)"
            )
        pid = self.running_pid()
        if pid is not None:
            raise EmulationError(
                f"Prometheus of this run is already running (pid {pid}); stop it "
                "first (spacemoe down)"
            )
        _check_port_free(self.port)
        self.write_config()
        if not keep_data and self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Targets of an earlier run in the same directory are not this run's.
        for stale in self.targets_dir.glob("*.json"):
            if stale.name not in self._target_files:
                stale.unlink()

        argv = [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.data_dir}",
            f"--storage.tsdb.retention.time={self.retention_time}",
            f"--storage.tsdb.retention.size={self.retention_size}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        log.info("starting Prometheus on %s", self.url)
        log.debug("run %s", " ".join(argv))
        with open(self.log_path, "ab") as out:
            # Own session: a Ctrl-C meant for the CLI does not kill it midway.
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _write_atomically(self.pid_path, f"{self._proc.pid}\n")

        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc.poll() is not None:
                raise EmulationError(
                    f"Prometheus exited with {self._proc.returncode} at start; "
                    f"its log ({self.log_path}) ends with: {self._log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise EmulationError(
                    f"Prometheus did not become ready on {self.url} within "
                    f"{timeout_s:.0f} s; its log ({self.log_path}) ends with: "
                    f"{self._log_tail()}"
                )
            time.sleep(0.1)

    def _log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:]) or "(empty log)"

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Stop our Prometheus by its pid; False if none was running.

        SIGTERM lets it flush the head block; SIGKILL follows after
        `timeout_s`.
        """
        pid = self.running_pid()
        if pid is None and self._proc is not None and self._proc.poll() is None:
            pid = self._proc.pid
        if pid is None:
            self.pid_path.unlink(missing_ok=True)
            return False

        log.info("stopping Prometheus (pid %d)", pid)
        _signal(pid, signal.SIGTERM)
        if not self._wait_gone(pid, timeout_s):
            log.warning("Prometheus (pid %d) ignored SIGTERM; killing it", pid)
            _signal(pid, signal.SIGKILL)
            self._wait_gone(pid, 5.0)
        self.pid_path.unlink(missing_ok=True)
        return True

    def _wait_gone(self, pid: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            # Our own child must be reaped, or it lingers as a zombie.
            if self._proc is not None and self._proc.pid == pid:
                if self._proc.poll() is not None:
                    return True
            elif not _alive(pid):
                return True
            time.sleep(0.05)
        return False

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query; see :func:`query`."""
        return query(self.url, expr, at)

    def query_range(
        self, expr: str, start: float, end: float, step_s: float
    ) -> list[dict[str, Any]]:
        """Range query; see :func:`query_range`."""
        return query_range(self.url, expr, start, end, step_s)


def query(url: str, expr: str, at: float | None = None) -> list[dict[str, Any]]:
    """Evaluate `expr` at unix time `at` (default now).

    Returns Prometheus' result list: for vectors, one dict per series with
    ``metric`` (labels) and ``value`` ([time, "text"]).
    """
    params = {"query": expr}
    if at is not None:
        params["time"] = f"{at:.3f}"
    data = _get(url, "/api/v1/query", params, expr)
    result = data["result"]
    if data["resultType"] == "scalar":
        return [{"metric": {}, "value": result}]
    return list(result)


def query_range(
    url: str, expr: str, start: float, end: float, step_s: float
) -> list[dict[str, Any]]:
    """Evaluate `expr` from `start` to `end` (unix seconds) every `step_s`.

    Returns one dict per series with ``metric`` and ``values``
    ([[time, "text"], ...]).
    """
    if end < start or step_s <= 0:
        raise ConfigError(
            f"query range {start}..{end} step {step_s}: need start <= end and a "
            "positive step"
        )
    params = {
        "query": expr,
        "start": f"{start:.3f}",
        "end": f"{end:.3f}",
        "step": f"{step_s:g}",
    }
    return list(_get(url, "/api/v1/query_range", params, expr)["result"])


def _get(url: str, path: str, params: Mapping[str, str], expr: str) -> Any:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "http" or parsed.hostname not in _LOCAL_HOSTS:
        raise ConfigError(
            f"Prometheus URL {url!r}: only http on localhost is queried "
            "(e.g. http://127.0.0.1:9090)"
        )
    full = f"{url.rstrip('/')}{path}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(full, timeout=30) as response:
            body = json.load(response)
    except urllib.error.HTTPError as exc:
        try:
            detail = json.load(exc).get("error", exc.reason)
        except (ValueError, AttributeError):
            detail = exc.reason
        raise MonitoringError(f"Prometheus rejected {expr!r}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise MonitoringError(
            f"cannot reach Prometheus at {url} ({reason}); is the run up (spacemoe up)?"
        ) from None
    if body.get("status") != "success":
        raise MonitoringError(f"Prometheus failed on {expr!r}: {body.get('error')}")
    return body["data"]


def _duration(seconds: float) -> str:
    """A Prometheus duration: whole seconds as "2s", else milliseconds."""
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


def _check_target(target: str) -> None:
    if not _TARGET.match(target):
        raise ConfigError(
            f"scrape target {target!r}: expected host:port, e.g. 198.18.128.2:9471"
        )


def _check_port_free(port: int) -> None:
    """Fail clearly if something already listens on 127.0.0.1:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR: a socket in TIME_WAIT does not count, a listener does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise EmulationError(
                f"port {port} on 127.0.0.1 is already in use (another "
                "Prometheus?); stop it or choose another port"
            ) from None


def _alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped) is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the command name, which is in parentheses.
    return stat.rpartition(")")[2].split()[0] != "Z"


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _write_atomically(path: Path, text: str) -> None:
    # The temporary name does not match *.json, so file_sd never reads a
    # half-written file.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
