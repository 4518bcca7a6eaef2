"""Experts that follow the orbit: the testbed places them again while it runs.

One testbed on the default scenario at 60 times real time, with the aware
policy placing again every 300 s of scenario time (5 s of wall time). The
checks: rounds happen and move experts to other satellites, their
weights sent across the links; agents run on exactly the satellites that
hold or are about to drop shards; generation after the moves still
matches the single-process model and uses the new holders; everything
comes down.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.controller.testbeds import running_testbed
from topology.config import from_dict
from topology.scenario import load_scenario

pytestmark = [pytest.mark.root, pytest.mark.slow]

EVERY_S = 300.0


@pytest.fixture(scope="module")
def run_directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("replacement") / "run"


@pytest.fixture(autouse=True)
def private_run_dir(
    run_directory: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    monkeypatch.setenv("SPACEMOE_RUN_DIR", str(run_directory))
    yield run_directory


@pytest.fixture(scope="module")
def testbed(net_sandbox: None, run_directory: Path) -> Iterator[Any]:
    base = load_scenario(None)
    scenario = dataclasses.replace(
        base,
        time=dataclasses.replace(base.time, speed=60.0),
        moe={**(base.moe or {}), "placement": "aware", "replace_every_s": EVERY_S},
    )
    with running_testbed(scenario, run_directory, monitoring=False) as testbed:
        yield testbed


def moe_doc(run_directory: Path) -> dict[str, Any]:
    return json.loads((run_directory / "moe.json").read_text())


def holders(doc: dict[str, Any]) -> set[str]:
    return {n for p in doc["placement"] for n in p["nodes"]}


def test_config_names_the_new_fields() -> None:
    from controller.inference import MoeConfig

    config = from_dict(MoeConfig, {"replace_every_s": 60}, "moe")
    assert config.replace_every_s == 60
    with pytest.raises(Exception, match=r"moe\.replace_every_s"):
        from_dict(MoeConfig, {"replace_every_s": -1}, "moe")


def test_a_round_while_home_sees_no_satellite_moves_nothing() -> None:
    from controller.inference import MoeConfig
    from controller.placement import PlacementContext
    from controller.replacement import Replacer

    placement = {(0, 0): ["s0-0-1"]}
    replacer = Replacer(
        MoeConfig(placement="aware", replace_every_s=EVERY_S),
        scenario=None,
        experts=[(0, 0)],
        satellites=["s0-0-1", "s0-0-2"],
        names=["s0-0-1", "s0-0-2", "home"],
        endpoints={},
        deployment=None,  # type: ignore[arg-type]
        placement=placement,
        on_change=lambda *args: pytest.fail("nothing changed"),
    )
    # Only home itself is in reach: no ground link at this moment.
    cut_off = PlacementContext("home", 900.0, {"home": 0.0})
    assert replacer.run_round(900.0, cut_off) is None
    assert replacer.placement == placement and replacer.last_error is None


def test_experts_move_with_the_orbit_and_still_answer_exactly(
    testbed: Any, run_directory: Path
) -> None:
    from controller.testbed import infer_on_running

    first = moe_doc(run_directory)
    assert first["round"] == 0 and first["policy"]["name"] == "aware"

    # Wait for two rounds that moved something (bounded: 6 rounds of 5 s).
    deadline = time.monotonic() + 45
    while testbed.replacer.moved_total == 0 or moe_doc(run_directory)["round"] < 2:
        assert time.monotonic() < deadline, (
            f"no re-placement moved experts: {testbed.replacer.rounds} rounds, "
            f"last error {testbed.replacer.last_error}"
        )
        time.sleep(0.5)
    # No more rounds: unloading lags only one round, and a slow machine could
    # fit two into the generation below (a documented limitation).
    testbed.replacer.next_t_s = float("inf")
    while testbed.replacer.busy:
        time.sleep(0.1)
    assert testbed.replacer.last_error is None
    now = moe_doc(run_directory)
    assert now["placed_at_t_s"] >= 2 * EVERY_S
    assert holders(now) != holders(first)
    # Moves keep most experts in place: never all of them in one round.
    assert testbed.replacer.moved_total < 32 * now["round"]
    # Every moved expert's weights crossed the links from home.
    shard_bytes = {
        p.stat().st_size for p in Path(now["shard_dir"]).glob("layer*-expert*")
    }
    assert len(shard_bytes) == 1  # the shipped model's experts are all alike
    assert testbed.replacer.sent_bytes_total == (
        testbed.replacer.moved_total * shard_bytes.pop()
    )

    # Agents run where shards are held or about to be dropped, nowhere else.
    running = set(testbed.deployment.nodes)
    pending = {node for _, node in testbed.replacer._pending_drops}
    assert holders(now) <= running <= holders(now) | pending

    from controller.testbed import format_status, read_status

    assert f"placement  round {now['round']}," in format_status(read_status())

    report, _ = infer_on_running("import ", 6)
    assert report["reference"]["tokens_identical"]
    assert report["reference"]["max_abs_logit_diff"] <= 1e-5
    used = {n for nodes in report["placement"].values() for n in nodes}
    assert used == holders(now)

    # The next step counts the generation's expert load for later rounds.
    deadline = time.monotonic() + 10
    while sum(testbed.expert_load.values()) == 0:
        assert time.monotonic() < deadline, "the report was never counted"
        time.sleep(0.1)
    assert testbed.expert_load == {
        tuple(int(x) for x in key.split("/")): float(rows)
        for key, rows in report["expert_rows"].items()
    }
