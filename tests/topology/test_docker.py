"""Nodes as Docker containers (``emulation.nodes: docker``).

The root tests run the built-in scenario with every node a container of
our own dockerd, inside the module's private namespaces and with a data
root of their own under the test's temporary directory (the node image is
imported from the cached root file system, bootstrapped on first use).
They check that each node is our container holding the namespace the
emulator wired, that its limits apply, that the RTT across containers
follows the geometry, that ``spacemoe exec`` lands inside the container,
and that ``down``, and ``clean`` after ``kill -9``, leave nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from containers.docker import (
    NODE_LABEL,
    Dockerd,
    debian_mirror,
    exec_root,
    missing_programs,
    node_rootfs,
)
from topology.errors import ConfigError, EmulationError
from topology.scenario import load_scenario

REPO = Path(__file__).resolve().parents[2]
A, B = "longyearbyen", "inuvik"
CPUS = 0.5
MEMORY_BYTES = 128 * 2**20


# --- without root ----------------------------------------------------------


def test_mirror_from_deb822_skips_security(tmp_path: Path) -> None:
    sources = tmp_path / "debian.sources"
    sources.write_text(
        "Types: deb\nURIs: http://security.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n"
    )
    assert debian_mirror([sources]) == "http://mirror.example/debian"


def test_mirror_from_one_line_sources(tmp_path: Path) -> None:
    sources = tmp_path / "sources.list"
    sources.write_text(
        "# comment\n"
        "deb http://security.example/debian-security bookworm-security main\n"
        "deb [arch=amd64] http://mirror.example/debian bookworm main\n"
    )
    assert debian_mirror([sources]) == "http://mirror.example/debian"


def test_no_mirror_is_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "sources.list"
    empty.write_text("# nothing\n")
    with pytest.raises(EmulationError, match="no Debian mirror"):
        debian_mirror([empty])


def test_exec_root_fits_a_unix_socket_path(tmp_path: Path) -> None:
    deep = tmp_path.joinpath(*["a-rather-long-directory-name"] * 8)
    socket = exec_root(deep) / "containerd" / "containerd.sock"
    assert len(str(socket)) < 108
    assert exec_root(deep) != exec_root(tmp_path)


def test_limits_without_docker_nodes_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("emulation:\n  node_cpus: 0.5\n")
    with pytest.raises(
        ConfigError, match=r"emulation\.node_cpus: 0\.5 .*nodes: docker"
    ):
        load_scenario(path)
    path.write_text("emulation:\n  nodes: vm\n")
    with pytest.raises(ConfigError, match=r"emulation\.nodes: got 'vm'"):
        load_scenario(path)


# --- with root and a real dockerd --------------------------------------------


def docker_scenario():
    base = load_scenario()
    return replace(
        base,
        name="test-docker",
        emulation=replace(
            base.emulation,
            nodes="docker",
            node_cpus=CPUS,
            node_memory_bytes=MEMORY_BYTES,
        ),
    )


@pytest.fixture(scope="module")
def node_image_rootfs() -> Path:
    """The node image's root file system, built before the sandbox.

    Bootstrapping reaches the Debian mirror, which the private network
    namespace of `net_sandbox` cannot; later runs find it cached.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root (debootstrap, dockerd)")
    return node_rootfs()


@pytest.fixture(scope="module")
def docker_root(
    node_image_rootfs: Path,
    net_sandbox: None,
    tmp_path_factory: pytest.TempPathFactory,
):
    """A data root of this module's own, removed with everything in it."""
    missing = missing_programs()
    assert not missing, f"install Debian's docker.io ({', '.join(missing)} missing)"
    root = tmp_path_factory.mktemp("docker")
    saved = {k: os.environ.get(k) for k in ("SPACEMOE_DOCKER_ROOT", "SPACEMOE_RUN_DIR")}
    os.environ["SPACEMOE_DOCKER_ROOT"] = str(root)
    os.environ["SPACEMOE_RUN_DIR"] = str(tmp_path_factory.mktemp("run"))
    try:
        yield root
    finally:
        Dockerd(root).stop()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(exec_root(root), ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def emulator(docker_root: Path):
    from topology.emulator import Emulator

    emulator = Emulator(docker_scenario())
    try:
        emulator.up()
        yield emulator
    finally:
        emulator.down()


def docker(*argv: str) -> str:
    """Ask the module's dockerd (the record says where it listens)."""
    record = json.loads(
        (Path(os.environ["SPACEMOE_RUN_DIR"]) / "docker.json").read_text()
    )
    return subprocess.run(
        ["docker", "-H", f"unix://{record['socket']}", *argv],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip


@pytest.mark.root
@pytest.mark.slow
def test_every_node_is_our_container_holding_its_namespace(emulator) -> None:
    running = docker("ps", "--filter", f"label={NODE_LABEL}", "--format", "{{.Names}}")
    assert sorted(running.split()) == sorted(f"smoe-{n}" for n in emulator.names)
    inspected = json.loads(docker("inspect", *(f"smoe-{n}" for n in emulator.names)))
    for container in inspected:
        node = container["Config"]["Labels"][NODE_LABEL]
        assert container["Config"]["Hostname"] == node
        assert container["HostConfig"]["NetworkMode"] == "none"
        pid = container["State"]["Pid"]
        # The namespace the emulator wired is the container's own.
        assert os.stat(f"/run/netns/smoe-{node}").st_ino == (
            os.stat(f"/proc/{pid}/ns/net").st_ino
        )
        assert container["HostConfig"]["NanoCpus"] == int(CPUS * 1e9)
        assert container["HostConfig"]["Memory"] == MEMORY_BYTES


@pytest.mark.root
@pytest.mark.slow
def test_rtt_between_containers_follows_the_geometry(emulator) -> None:
    t_s = emulator.t_s
    while len(emulator.path(A, B)) < 4:
        t_s += 10.0
        assert t_s < 3600, "no multi-hop path between the stations in an hour"
        emulator.step(t_s)
    target = str(emulator.plan.node_address(emulator.node_index(B)))
    # ping runs from the container's own file system; -U times in user space.
    out = docker("exec", f"smoe-{A}", "ping", "-n", "-U", "-i", "0.05", "-c", "12",
                 target)  # fmt: skip
    times = [float(w.split("=")[1]) for w in out.split() if w.startswith("time=")]
    assert len(times) == 12, out
    measured = float(np.median(times[2:]))
    expected = 1e3 * (emulator.path_delay_s(A, B) + emulator.path_delay_s(B, A))
    assert abs(measured - expected) <= max(1.0, 0.02 * expected), (
        emulator.path(A, B), measured, expected,
    )  # fmt: skip


@pytest.mark.root
@pytest.mark.slow
def test_spacemoe_exec_runs_inside_the_container(emulator) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "controller.cli", "exec", B, "--",
         "cat", "/etc/hostname"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == B


@pytest.mark.root
@pytest.mark.slow
def test_down_removes_containers_daemon_and_namespaces(emulator, docker_root) -> None:
    daemon = Dockerd(docker_root)
    pid = daemon.recorded_pid()
    assert pid is not None
    emulator.down()
    assert not list(Path("/run/netns").glob("smoe-*"))
    assert daemon.recorded_pid() is None
    assert not Path(f"/proc/{pid}").exists() or _zombie(pid)
    assert not (Path(os.environ["SPACEMOE_RUN_DIR"]) / "docker.json").exists()
    assert (
        "smoe"
        not in subprocess.run(
            ["ip", "-o", "link"], capture_output=True, text=True
        ).stdout
    )


@pytest.mark.root
@pytest.mark.slow
def test_clean_after_kill_9_removes_containers_and_daemon(
    docker_root: Path, tmp_path: Path
) -> None:
    scenario = tmp_path / "docker.yaml"
    scenario.write_text("name: test-docker-crash\nemulation:\n  nodes: docker\n")
    run_dir = Path(os.environ["SPACEMOE_RUN_DIR"])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-m", "controller.cli"]
    daemon = Dockerd(docker_root)
    try:
        up = subprocess.run([*cli, "up", str(scenario), "--detach"],
                            capture_output=True, text=True, timeout=300, cwd=REPO,
                            env=env)  # fmt: skip
        assert up.returncode == 0, up.stderr + up.stdout
        dockerd = daemon.recorded_pid()
        # The default constellation's 6 x 11 satellites; the file names no
        # stations.
        assert dockerd is not None and len(daemon.our_containers()) == 66
        os.kill(int((run_dir / "emulator.pid").read_text()), signal.SIGKILL)
    except BaseException:
        # What came up must not outlive the failed test.
        subprocess.run([*cli, "clean"], capture_output=True, timeout=120, cwd=REPO,
                       env=env)  # fmt: skip
        raise
    time.sleep(0.5)
    clean = subprocess.run([*cli, "clean"], capture_output=True, text=True,
                           timeout=120, cwd=REPO, env=env)  # fmt: skip
    assert clean.returncode == 0, clean.stderr
    assert "container smoe-s0-5-10" in clean.stdout
    assert f"our dockerd (pid {dockerd})" in clean.stdout
    assert not list(Path("/run/netns").glob("smoe-*"))
    assert daemon.recorded_pid() is None
    shims = subprocess.run(["pgrep", "-f", f"containerd-shim.*{daemon.exec_root}"],
                           capture_output=True, text=True)  # fmt: skip
    assert shims.stdout == "", shims.stdout


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True
