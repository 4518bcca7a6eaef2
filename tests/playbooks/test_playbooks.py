"""The Ansible playbooks: lint, syntax, and a real cycle against localhost.

The real cycle runs `ansible-playbook` for up, workload, checks and down in
a private network and mount namespace (`net_sandbox`), so it neither sees
nor disturbs a scenario someone else runs on the machine, and then checks
that nothing of the run is left: no ``smoe-`` namespace or link, no process
in the sandbox, none that belongs to the run directory.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PLAYBOOKS = REPO / "playbooks"
BIN = Path(sys.executable).parent
PLAYBOOK_FILES = [
    "site.yml",
    "deps.yml",
    "up.yml",
    "workload.yml",
    "check.yml",
    "down.yml",
]
RECAP = re.compile(
    r"^(?P<host>\S+)\s*:\s*ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
    r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)",
    re.MULTILINE,
)
# One playbook run may not take longer than this (the bring-up is the
# longest: 69 namespaces, brokers, agents, Prometheus).
PLAYBOOK_TIMEOUT_S = 600


def _require_ansible() -> None:
    if not (BIN / "ansible-playbook").exists() or not (BIN / "ansible-lint").exists():
        pytest.skip(
            f"ansible-core and ansible-lint are not installed in {BIN.parent}; "
            "`./run setup` installs them from requirements.txt"
        )


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["ANSIBLE_NOCOLOR"] = "1"
    env["ANSIBLE_CONFIG"] = str(PLAYBOOKS / "ansible.cfg")
    env.update(extra)
    return env


def _run(
    argv: list[str], env: dict[str, str], timeout_s: float = PLAYBOOK_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        cwd=PLAYBOOKS,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def _playbook(
    name: str, env: dict[str, str], *extra: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, int]]:
    """Run one playbook on localhost; the result and its recap counts."""
    argv = [str(BIN / "ansible-playbook"), "-i", "inventory/localhost.yml", name]
    result = _run([*argv, *extra], env)
    match = RECAP.search(result.stdout)
    counts = (
        {k: int(v) for k, v in match.groupdict().items() if k != "host"}
        if match
        else {}
    )
    return result, counts


def _explain(result: subprocess.CompletedProcess[str]) -> str:
    command = " ".join(result.args)
    return (
        f"{command} exited {result.returncode}\n"
        f"{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    )


def test_ansible_lint_passes_with_the_production_profile() -> None:
    _require_ansible()
    result = _run([str(BIN / "ansible-lint")], _env(), timeout_s=300)
    assert result.returncode == 0, _explain(result)
    assert "Profile 'production' was required, and it passed" in (
        result.stdout + result.stderr
    )


@pytest.mark.parametrize("name", PLAYBOOK_FILES)
def test_playbook_syntax(name: str) -> None:
    _require_ansible()
    argv = [str(BIN / "ansible-playbook"), "--syntax-check", name]
    result = _run(argv, _env(), timeout_s=120)
    assert result.returncode == 0, _explain(result)


def test_inventories_put_hosts_in_the_spacemoe_group() -> None:
    _require_ansible()
    for inventory, hosts, partitions in (
        ("localhost.yml", ["localhost"], 1),
        ("two-hosts.example.yml", ["sat-host-a", "sat-host-b"], 2),
    ):
        argv = [
            str(BIN / "ansible-inventory"),
            "-i",
            f"inventory/{inventory}",
            "--list",
        ]
        result = _run(argv, _env(), timeout_s=120)
        assert result.returncode == 0, _explain(result)
        listing = json.loads(result.stdout)
        assert listing["spacemoe_hosts"]["hosts"] == hosts
        for index, host in enumerate(hosts):
            variables = listing["_meta"]["hostvars"][host]
            assert variables["spacemoe_partitions"] == partitions
            assert variables["spacemoe_partition_index"] == index


def test_deps_role_installs_the_packages_the_run_script_installs() -> None:
    script = (REPO / "run").read_text()
    match = re.search(r"debian_packages=\((.*?)\)", script, re.DOTALL)
    assert match, "no debian_packages=( ... ) array in ./run"
    in_script = match.group(1).split()
    defaults = PLAYBOOKS / "roles/spacemoe_deps/defaults/main.yml"
    in_role = yaml.safe_load(defaults.read_text())["spacemoe_deps_debian_packages"]
    assert in_role == in_script


def test_a_partition_index_out_of_range_is_refused_with_the_fix() -> None:
    _require_ansible()
    result, counts = _playbook(
        "check.yml",
        _env(),
        "-e",
        "spacemoe_partitions=2",
        "-e",
        "spacemoe_partition_index=2",
    )
    assert result.returncode != 0
    assert counts.get("failed") == 1
    assert "spacemoe_partition_index=2 does not fit" in result.stdout


def test_a_partitioned_up_passes_partition_and_one_start_time(
    tmp_path: Path,
) -> None:
    """The role's `up` command line, as Ansible renders it for two hosts."""
    _require_ansible()
    role = PLAYBOOKS / "roles/spacemoe_constellation"
    playbook = tmp_path / "argv.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Render the up command",
                    "hosts": "all",
                    "gather_facts": False,
                    "vars_files": [
                        str(role / "defaults/main.yml"),
                        str(role / "vars/main.yml"),
                    ],
                    "tasks": [
                        {
                            "name": "Pick the start",
                            "ansible.builtin.set_fact": {
                                "spacemoe_constellation_start_at_unix_s": (
                                    "{{ 1700000000 + 5 }}"
                                )
                            },
                            "run_once": True,
                        },
                        {
                            "name": "Show it",
                            "ansible.builtin.debug": {
                                "msg": "ARGV {{ inventory_hostname }} "
                                "{{ spacemoe_constellation_up_argv | to_json }}"
                            },
                        },
                    ],
                }
            ]
        )
    )
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(
        yaml.safe_dump(
            {
                "all": {
                    "hosts": {
                        f"h{i}": {
                            "ansible_connection": "local",
                            "spacemoe_partition_index": i,
                        }
                        for i in range(2)
                    },
                    # vars_files outrank inventory, so the spacemoe
                    # role's own defaults stay out of the play.
                    "vars": {
                        "spacemoe_partitions": 2,
                        "spacemoe_repo_dir": "/opt/spacemoe",
                        "spacemoe_cli": "/opt/spacemoe/.venv/bin/spacemoe",
                    },
                }
            }
        )
    )
    argv = [str(BIN / "ansible-playbook"), "-i", str(inventory), str(playbook)]
    result = _run(argv, _env(), timeout_s=120)
    assert result.returncode == 0, _explain(result)
    # Hosts run in parallel, so their lines come in either order.
    rendered = {}
    for line in result.stdout.splitlines():
        if "ARGV " in line:
            host, text = line.split("ARGV ", 1)[1].split(" ", 1)
            rendered[host] = json.loads(text.rstrip('"').replace('\\"', '"'))
    assert sorted(rendered) == ["h0", "h1"]
    for host, command in rendered.items():
        assert command[1] == "up" and command[-1] == "--detach"
        assert command[command.index("--partition") + 1] == host[1:]
        assert command[command.index("--start-at") + 1] == "1700000005"


def _recap_changed(
    result: subprocess.CompletedProcess[str], counts: dict[str, int]
) -> int:
    assert result.returncode == 0 and counts.get("failed") == 0, _explain(result)
    return counts["changed"]


@pytest.mark.root
@pytest.mark.slow
def test_deps_playbook_is_idempotent() -> None:
    """A second run of deps.yml finds everything installed (changed=0)."""
    _require_ansible()
    if os.geteuid() != 0:
        pytest.skip("needs root (apt, ./run setup)")
    _recap_changed(*_playbook("deps.yml", _env()))
    assert _recap_changed(*_playbook("deps.yml", _env())) == 0


def _our_leftovers(run_dir: Path) -> list[str]:
    """Everything of the run still there, as seen inside the sandbox."""
    left = [f"namespace {p.name}" for p in Path("/run/netns").glob("smoe-*")]
    left += [f"link {p.name}" for p in Path("/sys/class/net").glob("smoe*")]
    sandbox_net = os.stat("/proc/self/ns/net").st_ino
    marker = str(run_dir).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
            in_sandbox = os.stat(proc / "ns/net").st_ino == sandbox_net
        except OSError:
            continue
        if in_sandbox or marker in cmdline or marker in environ:
            shown = cmdline.replace(b"\0", b" ").decode(errors="replace")[:120]
            left.append(f"process {proc.name}: {shown}")
    return left


@pytest.fixture
def sandboxed_run_dir(net_sandbox: None, tmp_path: Path) -> Iterator[Path]:
    """A run directory for a cycle inside the sandbox; cleaned up whatever happens."""
    run_dir = tmp_path / "run"
    try:
        yield run_dir
    finally:
        env = _env(SPACEMOE_RUN_DIR=str(run_dir))
        if _our_leftovers(run_dir):
            for command in ("down", "clean"):
                subprocess.run(
                    [str(BIN / "spacemoe"), command],
                    env=env,
                    capture_output=True,
                    timeout=120,
                    check=False,
                )
        # Anything still in the sandbox was started by this test.
        for line in _our_leftovers(run_dir):
            if line.startswith("process "):
                pid = int(line.split()[1].rstrip(":"))
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.mark.root
@pytest.mark.slow
def test_up_workload_check_down_against_localhost(
    sandboxed_run_dir: Path, tmp_path: Path
) -> None:
    """The playbooks bring the default scenario up, use it, and leave nothing."""
    _require_ansible()
    env = _env(SPACEMOE_RUN_DIR=str(sandboxed_run_dir))
    fetched = tmp_path / "fetched"
    workload = json.dumps(
        {
            "spacemoe_workload_prompts": ["def main("],
            "spacemoe_workload_tokens": 4,
            "spacemoe_workload_fetch_dir": str(fetched),
            "spacemoe_workload_report_minutes": 2,
        }
    )

    assert _recap_changed(*_playbook("up.yml", env)) >= 1
    # The leftover check must see a running scenario, or its empty answer
    # after down.yml would prove nothing.
    running = "\n".join(_our_leftovers(sandboxed_run_dir))
    for part in ("namespace smoe-", "prometheus", "mosquitto"):
        assert part in running, f"{part!r} not among:\n{running}"
    # Up again: the scenario already runs, so nothing may report a change.
    assert _recap_changed(*_playbook("up.yml", env)) == 0
    # Up with another scenario while this one runs: refused, nothing touched.
    other = tmp_path / "other.yaml"
    other.write_text("name: other\n")
    result, counts = _playbook(
        "up.yml", env, "-e", f"spacemoe_constellation_scenario={other}"
    )
    assert result.returncode != 0 and counts["changed"] == 0, _explain(result)
    assert "Scenario iridium-like already runs" in result.stdout

    _recap_changed(*_playbook("workload.yml", env, "-e", workload))
    report = json.loads((fetched / "localhost" / "infer-0.json").read_text())
    assert len(report["tokens"]) == 4 and len(report["rows"]) == 4
    drawn = sandboxed_run_dir / "results" / "ansible" / "report"
    pngs = sorted(p.name for p in (fetched / "localhost" / "report").glob("*.png"))
    assert "overview.png" in pngs
    assert pngs == sorted(p.name for p in drawn.glob("*.png"))

    assert _recap_changed(*_playbook("check.yml", env)) == 0

    assert _recap_changed(*_playbook("down.yml", env)) >= 1
    assert _our_leftovers(sandboxed_run_dir) == []
    assert _recap_changed(*_playbook("down.yml", env)) == 0
