"""Dashboards as code: committed files, structure, and every query live."""

from __future__ import annotations

import json
import re

import yaml

from monitoring.dashboards import (
    DASHBOARDS,
    DATASOURCE,
    DOC,
    GRAFANA_DIR,
    PANELS,
    check_panels,
    dashboard_json,
    doc_sections,
    expand,
    provisioning_files,
)
from monitoring.metrics import METRICS
from tests.monitoring.conftest import LiveMonitoring

# Exported for other readers (maps, debugging), not drawn by any panel.
NOT_ON_DASHBOARDS = {
    "spacemoe_node_altitude_meters",
    "spacemoe_link_loss_ratio",
    "spacemoe_emulator_steps_total",
    "spacemoe_inference_request_duration_seconds",
}


def test_committed_files_match_the_generator() -> None:
    expected = provisioning_files()
    on_disk = {
        str(p.relative_to(GRAFANA_DIR)): p.read_text()
        for p in GRAFANA_DIR.rglob("*")
        if p.is_file()
    }
    assert set(on_disk) == set(expected), "run: python -m monitoring.dashboards"
    for path, text in expected.items():
        assert on_disk[path] == text, (
            f"{path} is stale: python -m monitoring.dashboards"
        )


def test_every_queried_metric_is_defined_and_every_metric_is_shown() -> None:
    queried = set()
    for panel in PANELS:
        for q in panel.queries:
            for name in re.findall(r"\bspacemoe_\w+", q.expr):
                queried.add(re.sub(r"_(bucket|sum|count)$", "", name))
    assert queried - set(METRICS) == set()
    assert set(METRICS) - queried == NOT_ON_DASHBOARDS


def test_dashboard_structure() -> None:
    datasource = yaml.safe_load(
        provisioning_files()["provisioning/datasources/spacemoe.yml"]
    )["datasources"][0]
    assert datasource["uid"] == DATASOURCE["uid"]
    assert {d.uid for d in DASHBOARDS} == {p.dashboard for p in PANELS}

    for dashboard in DASHBOARDS:
        model = json.loads(json.dumps(dashboard_json(dashboard)))
        ids = [p["id"] for p in model["panels"]]
        assert len(ids) == len(set(ids))
        boxes: set[tuple[int, int]] = set()
        for panel in model["panels"]:
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24
            cells = {
                (grid["x"] + dx, grid["y"] + dy)
                for dx in range(grid["w"])
                for dy in range(grid["h"])
            }
            assert not boxes & cells, f"{panel['title']} overlaps another panel"
            boxes |= cells
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"] == DATASOURCE
        variables = {v["name"] for v in model["templating"]["list"]}
        used = set(re.findall(r"\$(\w+)", json.dumps(model["panels"])))
        assert used - {"__rate_interval"} <= variables


def test_expand_replaces_grafana_variables() -> None:
    expr = 'rate(x{satellite=~"$satellite"}[$__rate_interval])'
    assert expand(expr, "30s") == 'rate(x{satellite=~".*"}[30s])'


def test_every_panel_query_returns_data(live: LiveMonitoring) -> None:
    counts = check_panels(live.url)
    assert set(counts) == {p.key for p in PANELS}
    empty = sorted(k for k, n in counts.items() if n == 0)
    assert empty == [], f"panels without data: {empty}"


def test_docs_tables_are_current() -> None:
    text = DOC.read_text()
    for name, table in doc_sections().items():
        assert f"<!-- {name}:begin -->\n{table}<!-- {name}:end -->" in text, (
            f"the {name} table in {DOC} is stale: python -m monitoring.dashboards"
        )
