"""Our own Docker daemon and the image satellites and stations run from.

The testbed never uses the host's Docker: it starts a ``dockerd`` of its
own, with its own socket, data root and exec root, that leaves the host's
iptables, bridges and IP forwarding alone (``--iptables=false
--bridge=none --ip-forward=false``) and whose containers have no network
of Docker's (``--network none``): the emulator wires each one itself.
Everything inside that daemon is ours, and containers also carry the
label ``org.spacemoe.node``, so removal never reaches anything else.

There is no image registry here, so the node image is made the way
Debian makes base images: ``debootstrap --variant=minbase`` from the
mirror the host's own apt uses, with the tools a user wants inside a
node (iproute2, ping, ps), then ``docker import``. The root file system
is kept as a tarball under ``/var/cache/spacemoe``, so a new data root
(each test run has one) imports it in seconds instead of bootstrapping
again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from topology.commands import run as run_command
from topology.errors import EmulationError

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/var/lib/spacemoe/docker")
CACHE_DIR = Path("/var/cache/spacemoe")
IMAGE = "spacemoe-node:bookworm"
SUITE = "bookworm"
PACKAGES = ("iproute2", "iputils-ping", "procps")
NODE_LABEL = "org.spacemoe.node"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0


def docker_root() -> Path:
    """Where our daemon keeps images and containers (SPACEMOE_DOCKER_ROOT)."""
    return Path(os.environ.get("SPACEMOE_DOCKER_ROOT", str(DEFAULT_ROOT)))


def exec_root(root: Path) -> Path:
    """The daemon's runtime directory for data root `root`.

    Short and under /run: containerd's socket lives below it, and a Unix
    socket path may not exceed 107 bytes.
    """
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:10]
    return Path(f"/run/smoe-docker-{digest}")


def missing_programs() -> list[str]:
    """The programs the Docker backend needs that are not on PATH."""
    return [
        p for p in ("dockerd", "docker", "containerd", "runc") if not shutil.which(p)
    ]


class Dockerd:
    """A dockerd of ours, reached over its own socket.

    :meth:`start` starts it (or finds it running from an earlier start in
    this data root), :meth:`stop` stops it. Its pid file is
    ``exec_root/dockerd.pid``; :func:`stop_leftover` uses it after a crash.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or docker_root()
        self.exec_root = exec_root(self.root)
        self.socket = self.exec_root / "docker.sock"
        self.pid_file = self.exec_root / "dockerd.pid"
        self.log_path = self.exec_root / "dockerd.log"
        self.proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def cli(
        self,
        *argv: str,
        timeout_s: float = 120.0,
        check: bool = True,
        input_file: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``docker -H OUR_SOCKET ARGV``; raise CommandError on failure."""
        command = ["docker", "-H", self.host, *argv]
        if input_file is None:
            return run_command(command, timeout_s=timeout_s, check=check)
        with open(input_file, "rb") as stdin:
            done = subprocess.run(
                command, stdin=stdin, capture_output=True, timeout=timeout_s
            )
        if check and done.returncode != 0:
            raise EmulationError(
                f"{' '.join(command)} < {input_file} failed "
                f"({done.returncode}): {done.stderr.decode(errors='replace').strip()}"
            )
        return subprocess.CompletedProcess(
            command, done.returncode, done.stdout.decode(), done.stderr.decode()
        )

    def responding(self) -> bool:
        if not self.socket.exists():
            return False
        done = self.cli(
            "version", "--format", "{{.Server.Version}}", timeout_s=10, check=False
        )
        return done.returncode == 0

    def start(self) -> None:
        """Start our dockerd; raise naming what is missing if it cannot."""
        missing = missing_programs()
        if missing:
            raise EmulationError(
                f"emulation.nodes: docker needs {', '.join(missing)}; install "
                "Debian's docker.io (`sudo ./run setup` does) or use "
                "nodes: namespace"
            )
        pid = self.recorded_pid()
        if pid is not None:
            raise EmulationError(
                f"a dockerd of ours (pid {pid}) is already running for "
                f"{self.root}; a previous run was not torn down: run "
                "`spacemoe clean` first"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        self.exec_root.mkdir(parents=True, exist_ok=True)
        argv = [
            "dockerd",
            f"--host={self.host}",
            f"--data-root={self.root}",
            f"--exec-root={self.exec_root}",
            f"--pidfile={self.pid_file}",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            "--bridge=none",
            "--userland-proxy=false",
            "--log-level=warn",
        ]
        log.info("starting our dockerd (data root %s)", self.root)
        log.debug("%s", " ".join(argv))
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.responding():
            if self.proc.poll() is not None:
                raise EmulationError(
                    f"dockerd exited with {self.proc.returncode} while starting; "
                    f"see {self.log_path}:\n{_tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise EmulationError(
                    f"dockerd did not answer on {self.socket} within "
                    f"{START_TIMEOUT_S:.0f} s; see {self.log_path}"
                )
            time.sleep(0.1)

    def recorded_pid(self) -> int | None:
        """The pid in our pid file, if that process is a live dockerd."""
        return _live_dockerd(self.pid_file)

    def stop(self) -> None:
        """Stop our dockerd (it stops its containers) and wait for it."""
        pid = self.proc.pid if self.proc is not None else self.recorded_pid()
        if pid is None:
            return
        _terminate(pid, STOP_TIMEOUT_S)
        if self.proc is not None:
            self.proc.wait()
            self.proc = None
        log.info("our dockerd stopped")

    # --- containers ----------------------------------------------------

    def our_containers(self) -> list[str]:
        """Names of every container of ours in this daemon, running or not."""
        out = self.cli(
            "ps", "-a", "--filter", f"label={NODE_LABEL}", "--format", "{{.Names}}"
        ).stdout
        return out.split()

    def remove(self, names: Sequence[str]) -> None:
        """Remove containers `names` (killing them first), in one call."""
        if names:
            self.cli("rm", "-f", *names, timeout_s=60 + 0.5 * len(names))

    def ensure_image(self, image: str = IMAGE) -> None:
        """Import the node image into this daemon unless it has it."""
        if self.cli("image", "inspect", image, check=False).returncode == 0:
            return
        tarball = node_rootfs()
        started = time.monotonic()
        self.cli("import", "-", image, input_file=tarball, timeout_s=300)
        log.info(
            "imported %s from %s in %.1f s", image, tarball, time.monotonic() - started
        )


def node_rootfs() -> Path:
    """The node image's root file system as a tarball, built once.

    Its name carries the suite and packages, so a change of either builds
    a new one.
    """
    key = hashlib.sha256(" ".join((SUITE, *PACKAGES)).encode()).hexdigest()[:10]
    tarball = CACHE_DIR / f"node-rootfs-{SUITE}-{key}.tar"
    if tarball.exists():
        return tarball
    if not shutil.which("debootstrap"):
        raise EmulationError(
            "building the node image needs debootstrap; install Debian's "
            "debootstrap (`sudo ./run setup` does)"
        )
    mirror = debian_mirror()
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log.info(
        "bootstrapping the node image (%s, %s) from %s",
        SUITE,
        ", ".join(PACKAGES),
        mirror,
    )
    with tempfile.TemporaryDirectory(dir=CACHE_DIR, prefix="rootfs-") as work:
        root = Path(work) / "root"
        argv = [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            SUITE,
            str(root),
            mirror,
        ]
        done = run_command(argv, timeout_s=900, check=False)
        if done.returncode != 0:
            # debootstrap reports on stdout, and most failures are the
            # mirror being out of reach.
            said = "\n".join((done.stdout + done.stderr).strip().splitlines()[-6:])
            raise EmulationError(
                f"building the node image: {' '.join(argv)} exited with "
                f"{done.returncode}; the host must reach {mirror} once "
                f"(the result is cached in {CACHE_DIR}):\n{said or '(no output)'}"
            )
        partial = tarball.with_suffix(".tar.partial")
        run_command(["tar", "-C", str(root), "-cf", str(partial), "."], timeout_s=300)
        partial.rename(tarball)
    log.info(
        "node image root file system built in %.0f s: %s",
        time.monotonic() - started,
        tarball,
    )
    return tarball


def debian_mirror(sources: Sequence[Path] | None = None) -> str:
    """The Debian mirror the host's apt uses (deb822 or one-line sources)."""
    if sources is None:
        base = Path("/etc/apt")
        sources = [base / "sources.list", *sorted((base / "sources.list.d").glob("*"))]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            # deb822: a stanza whose Suites name plain bookworm-style suites.
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(
                    (m.group(1).lower(), m.group(2).strip())
                    for m in re.finditer(r"^([A-Za-z-]+):(.*)$", stanza, re.M)
                )
                if "deb" in fields.get("types", "").split() and not any(
                    "security" in s for s in fields.get("suites", "").split()
                ):
                    uris = fields.get("uris", "").split()
                    if uris:
                        return uris[0]
        else:
            for line in text.splitlines():
                words = line.split("#", 1)[0].split()
                if len(words) >= 3 and words[0] == "deb":
                    uri = next((w for w in words[1:] if "://" in w), None)
                    if uri and "security" not in line:
                        return uri
    raise EmulationError(
        "no Debian mirror found in /etc/apt/sources.list or sources.list.d; "
        "the node image is bootstrapped from the mirror apt uses"
    )


def stop_leftover(root: Path | None = None) -> list[str]:
    """After a crash: remove our containers and stop our dockerd.

    Only the daemon recorded in our own pid file is touched, and only
    containers labelled ours inside it; return a line per thing removed.
    """
    daemon = Dockerd(root)
    removed: list[str] = []
    pid = daemon.recorded_pid()
    if pid is not None:
        if daemon.responding():
            names = daemon.our_containers()
            daemon.remove(names)
            removed += [f"container {n}" for n in names]
        _terminate(pid, STOP_TIMEOUT_S)
        removed.append(f"our dockerd (pid {pid})")
    # The managed containerd can outlive a dockerd that was killed.
    containerd = _live_pid(
        daemon.exec_root / "containerd" / "containerd.pid", "containerd"
    )
    if containerd is not None:
        _terminate(containerd, STOP_TIMEOUT_S)
        removed.append(f"our containerd (pid {containerd})")
    return removed


def _live_dockerd(pid_file: Path) -> int | None:
    return _live_pid(pid_file, "dockerd")


def _live_pid(pid_file: Path, program: str) -> int | None:
    """The pid in `pid_file` if it is alive and runs `program`."""
    try:
        pid = int(pid_file.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return None
    argv0 = os.path.basename(cmdline.split(b"\0", 1)[0].decode(errors="replace"))
    if argv0 != program:
        return None
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    return None if state == "Z" else pid


def _terminate(pid: int, timeout_s: float) -> None:
    """SIGTERM `pid`, wait up to `timeout_s`, then SIGKILL it."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.05)
    log.warning("pid %d ignored SIGTERM for %.0f s; killing it", pid, timeout_s)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
