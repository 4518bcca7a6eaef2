"""Grafana dashboards as code: every panel and its PromQL in one table.

:data:`PANELS` lists each panel of the five dashboards with its queries;
everything else is derived from it: the dashboard JSON and provisioning
files under ``monitoring/grafana/`` (regenerate with ``python -m
monitoring.dashboards``; a test checks the committed files match), the PNG
report (`monitoring.report`), and :func:`check_panels`, which runs every
query against a real Prometheus and counts the series it returns.

Queries use two Grafana variables: ``$__rate_interval`` (Grafana derives
it from the data source's scrape interval) and ``$satellite`` (a multi-value
selector; "All" is the regex ``.*``). :func:`expand` substitutes both for
use outside Grafana.

Expressions are written so that a healthy run always returns data: counts
of rare events use ``bool`` comparisons or ``or ... * 0`` rather than
filters that leave an empty result when nothing happened.

The JSON follows Grafana's dashboard model (schemaVersion 39, Grafana 10.4
and later); no Grafana is installed here, so the files are checked for
structure and their queries against Prometheus, not rendered by Grafana.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monitoring.prometheus import query

log = logging.getLogger(__name__)

GRAFANA_DIR = Path(__file__).resolve().parent / "grafana"
DATASOURCE = {"type": "prometheus", "uid": "spacemoe-prometheus"}
SCHEMA_VERSION = 39
RATE = "$__rate_interval"
SAT = 'satellite=~"$satellite"'


@dataclass(frozen=True)
class Query:
    """One PromQL expression of a panel and its legend (Grafana syntax)."""

    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    """One panel: where it goes, what it shows, its queries.

    `kind` is a Grafana panel type: timeseries, stat, state-timeline or
    geomap. `unit` is a Grafana unit id (s, bytes, Bps, watt, joule,
    celsius, percentunit, short, dateTimeAsIso). For a state timeline,
    `rows` and `state` (legend templates) let the PNG report draw one row
    per `rows` value coloured by `state`, instead of a row per series.
    """

    dashboard: str
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"
    stack: bool = False
    description: str = ""
    rows: str = ""
    state: str = ""

    @property
    def key(self) -> str:
        """``dashboard/title``: how reports and checks name the panel."""
        return f"{self.dashboard}/{self.title}"


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    variables: tuple[str, ...] = field(default=())


DASHBOARDS = (
    Dashboard(
        "spacemoe-overview",
        "SpaceMoE / Constellation overview",
        "Health of the whole run at a glance: nodes, links, energy, inference.",
    ),
    Dashboard(
        "spacemoe-power",
        "SpaceMoE / Satellite power, heat and battery",
        "Per-satellite power budget, battery and thermal state.",
        ("satellite",),
    ),
    Dashboard(
        "spacemoe-inference",
        "SpaceMoE / Inference latency and throughput",
        "Token latency and where it goes; expert serving on the satellites.",
        ("satellite",),
    ),
    Dashboard(
        "spacemoe-placement",
        "SpaceMoE / Expert placement over time",
        "Which node holds which expert, and how placement follows demand.",
    ),
    Dashboard(
        "spacemoe-links",
        "SpaceMoE / Links",
        "Inter-satellite and ground links: state, delay, capacity, traffic.",
    ),
)


def _q(expr: str, legend: str = "") -> Query:
    return Query(expr, legend)


def _quantiles(metric: str, by: str = "") -> tuple[Query, ...]:
    group = f"{by}, le" if by else "le"
    prefix = "{{" + by + "}} " if by else ""
    return tuple(
        _q(
            f"histogram_quantile({q}, sum by ({group}) "
            f"(rate({metric}_bucket[{RATE}])))",
            f"{prefix}p{round(q * 100)}",
        )
        for q in (0.5, 0.95, 0.99)
    )


def _mean(metric: str, by: str = "", sel: str = "") -> str:
    """Mean of a histogram over the rate window, optionally grouped."""
    group = f" by ({by})" if by else ""
    return (
        f"sum{group} (rate({metric}_sum{sel}[{RATE}])) / "
        f"sum{group} (rate({metric}_count{sel}[{RATE}]))"
    )


# fmt: off
PANELS: tuple[Panel, ...] = (
    # --- Constellation overview -------------------------------------------
    Panel("spacemoe-overview", "Satellite agents up", (
        _q('sum(up{job="spacemoe", role="satellite"})', "up"),
        _q('count(up{job="spacemoe", role="satellite"})', "expected"),
    ), kind="stat"),
    Panel("spacemoe-overview", "Links up", (
        _q("sum by (kind) (spacemoe_link_up)", "{{kind}}"),
    ), kind="stat"),
    Panel("spacemoe-overview", "Scenario time", (
        _q("spacemoe_scenario_time_seconds * 1000", "scenario time"),
    ), unit="dateTimeAsIso", kind="stat"),
    Panel("spacemoe-overview", "Generated tokens per second", (
        _q('sum(rate(spacemoe_inference_tokens_total{phase="generated"}'
           f'[{RATE}]))', "tokens/s"),
    ), kind="stat"),
    Panel("spacemoe-overview", "Battery state of charge across satellites", (
        _q("min(spacemoe_battery_soc_ratio)", "min"),
        _q("avg(spacemoe_battery_soc_ratio)", "mean"),
        _q("max(spacemoe_battery_soc_ratio)", "max"),
    ), unit="percentunit"),
    Panel("spacemoe-overview", "Payload temperature across satellites", (
        _q("max(spacemoe_temperature_celsius)", "max"),
        _q("avg(spacemoe_temperature_celsius)", "mean"),
    ), unit="celsius"),
    Panel("spacemoe-overview", "Satellites in sunlight and throttled", (
        _q("sum(spacemoe_sunlit)", "sunlit"),
        _q("sum(spacemoe_compute_throttle_ratio < bool 1)", "throttled"),
    )),
    Panel("spacemoe-overview", "Token latency", _quantiles(
        "spacemoe_inference_token_latency_seconds"), unit="s"),
    Panel("spacemoe-overview", "Satellites and ground stations", (
        _q("spacemoe_node_latitude_degrees", "latitude"),
        _q("spacemoe_node_longitude_degrees", "longitude"),
    ), kind="geomap", description="Positions now; links are drawn by the "
       "PNG report's ground-track map."),
    Panel("spacemoe-overview", "Emulator step time and lag", (
        *_quantiles("spacemoe_emulator_step_duration_seconds")[1:2],
        _q("spacemoe_emulator_step_lag_seconds", "lag behind scenario clock"),
    ), unit="s"),

    # --- Per-satellite power, heat and battery ----------------------------
    Panel("spacemoe-power", "Battery state of charge", (
        _q(f"spacemoe_battery_soc_ratio{{{SAT}}}", "{{satellite}}"),
    ), unit="percentunit"),
    Panel("spacemoe-power", "Battery energy stored", (
        _q(f"spacemoe_battery_energy_joules{{{SAT}}}", "{{satellite}}"),
    ), unit="joule"),
    Panel("spacemoe-power", "Solar power", (
        _q(f"spacemoe_solar_power_watts{{{SAT}}}", "{{satellite}}"),
    ), unit="watt"),
    Panel("spacemoe-power", "Load power by subsystem", (
        _q(f"sum by (subsystem) (spacemoe_load_power_watts{{{SAT}}})",
           "{{subsystem}}"),
    ), unit="watt", stack=True, description="Summed over the selected "
       "satellites."),
    Panel("spacemoe-power", "Battery power (charging > 0)", (
        _q(f"spacemoe_battery_power_watts{{{SAT}}}", "{{satellite}}"),
    ), unit="watt"),
    # Energy accrues in scenario time; dividing by the scenario clock's pace
    # gives watts also when the scenario runs faster than real time.
    Panel("spacemoe-power", "Average power from energy counters", (
        _q(f"rate(spacemoe_energy_consumed_joules_total{{{SAT}}}[{RATE}]) / "
           f"scalar(deriv(spacemoe_scenario_time_seconds[{RATE}]))",
           "{{satellite}} consumed"),
        _q(f"rate(spacemoe_solar_energy_joules_total{{{SAT}}}[{RATE}]) / "
           f"scalar(deriv(spacemoe_scenario_time_seconds[{RATE}]))",
           "{{satellite}} harvested"),
    ), unit="watt"),
    Panel("spacemoe-power", "Payload temperature", (
        _q(f"spacemoe_temperature_celsius{{{SAT}}}", "{{satellite}}"),
    ), unit="celsius"),
    Panel("spacemoe-power", "Compute throttle", (
        _q(f"spacemoe_compute_throttle_ratio{{{SAT}}}", "{{satellite}}"),
    ), unit="percentunit"),
    Panel("spacemoe-power", "Sunlight", (
        _q(f"spacemoe_sunlit{{{SAT}}}", "{{satellite}}"),
    ), kind="state-timeline"),
    Panel("spacemoe-power", "Battery capacity fade", (
        _q(f"spacemoe_battery_capacity_fade_ratio{{{SAT}}}", "{{satellite}}"),
    ), unit="percentunit"),

    # --- Inference latency and throughput ---------------------------------
    Panel("spacemoe-inference", "Token latency quantiles", _quantiles(
        "spacemoe_inference_token_latency_seconds"), unit="s"),
    Panel("spacemoe-inference", "Mean token latency by component", (
        _q(_mean("spacemoe_inference_token_component_seconds", "component"),
           "{{component}}"),
    ), unit="s", stack=True),
    Panel("spacemoe-inference", "Share of token latency spent communicating", (
        _q("sum(rate(spacemoe_inference_token_component_seconds_sum"
           f'{{component=~"network|serialization|queueing"}}[{RATE}])) / '
           "sum(rate(spacemoe_inference_token_latency_seconds_sum"
           f"[{RATE}]))", "communication-bound share"),
    ), unit="percentunit", description="Network, serialization and queueing "
       "over end-to-end latency: near 1 the run is bound by the network, "
       "near 0 by compute."),
    Panel("spacemoe-inference", "Tokens per second", (
        _q(f"sum by (phase) (rate(spacemoe_inference_tokens_total[{RATE}]))",
           "{{phase}}"),
    )),
    Panel("spacemoe-inference", "Network bytes per token", (
        _q(_mean("spacemoe_inference_token_transfer_bytes"), "mean"),
    ), unit="bytes"),
    Panel("spacemoe-inference", "Generation requests by status", (
        _q("sum by (status) (rate(spacemoe_inference_requests_total"
           f"[{RATE}]))", "{{status}}"),
    )),
    Panel("spacemoe-inference", "Expert requests per second", (
        _q(f"sum by (satellite) (rate(spacemoe_expert_requests_total{{{SAT}}}"
           f"[{RATE}]))", "{{satellite}}"),
    )),
    Panel("spacemoe-inference", "Expert request failures per second", (
        _q("sum by (satellite) (rate(spacemoe_expert_requests_total"
           f'{{{SAT}, status!="ok"}}[{RATE}])) or sum by (satellite) '
           f"(rate(spacemoe_expert_requests_total{{{SAT}}}[{RATE}])) * 0",
           "{{satellite}}"),
    )),
    Panel("spacemoe-inference", "Expert request time p95", (
        _q("histogram_quantile(0.95, sum by (satellite, le) (rate("
           f"spacemoe_expert_request_duration_seconds_bucket{{{SAT}}}"
           f"[{RATE}])))", "{{satellite}}"),
    ), unit="s"),
    Panel("spacemoe-inference", "Expert busy ratio", (
        _q(f"rate(spacemoe_expert_busy_seconds_total{{{SAT}}}[{RATE}])",
           "{{satellite}}"),
    ), unit="percentunit"),
    Panel("spacemoe-inference", "Expert queue length", (
        _q(f"spacemoe_expert_queue_length{{{SAT}}}", "{{satellite}}"),
    )),
    Panel("spacemoe-inference", "Expert activation traffic", (
        _q("sum by (satellite, direction) (rate("
           f"spacemoe_expert_payload_bytes_total{{{SAT}}}[{RATE}]))",
           "{{satellite}} {{direction}}"),
    ), unit="Bps"),

    # --- Expert placement over time ---------------------------------------
    Panel("spacemoe-placement", "Expert replicas per node", (
        _q("count by (node) (spacemoe_expert_placement)", "{{node}}"),
    ), stack=True),
    Panel("spacemoe-placement", "Replicas per expert", (
        _q("count by (layer, expert) (spacemoe_expert_placement)",
           "L{{layer}} E{{expert}}"),
    )),
    Panel("spacemoe-placement", "Placement over time", (
        _q("spacemoe_expert_placement", "L{{layer}} E{{expert}} on {{node}}"),
    ), kind="state-timeline", rows="L{{layer}} E{{expert}}", state="{{node}}",
       description="A bar while the node holds the replica; a gap after it "
       "moved."),
    Panel("spacemoe-placement", "Shards loaded (agents)", (
        _q("spacemoe_expert_shards_loaded", "{{satellite}}"),
    )),
    Panel("spacemoe-placement", "Expert weights in memory", (
        _q("spacemoe_expert_shard_bytes", "{{satellite}}"),
    ), unit="bytes"),
    Panel("spacemoe-placement", "Expert migrations per second", (
        _q(f"rate(spacemoe_expert_migrations_total[{RATE}])", "migrations"),
    )),
    Panel("spacemoe-placement", "Requests per expert", (
        _q("sum by (layer, expert) (rate(spacemoe_expert_requests_total"
           f"[{RATE}]))", "L{{layer}} E{{expert}}"),
    )),

    # --- Links -------------------------------------------------------------
    Panel("spacemoe-links", "Links up and down", (
        _q("sum by (kind) (spacemoe_link_up)", "{{kind}} up"),
        _q("sum by (kind) (1 - spacemoe_link_up)", "{{kind}} down"),
    )),
    Panel("spacemoe-links", "Delay of up links", (
        _q("min by (kind) (spacemoe_link_delay_seconds "
           "and spacemoe_link_up == 1)", "{{kind}} min"),
        _q("avg by (kind) (spacemoe_link_delay_seconds "
           "and spacemoe_link_up == 1)", "{{kind}} mean"),
        _q("max by (kind) (spacemoe_link_delay_seconds "
           "and spacemoe_link_up == 1)", "{{kind}} max"),
    ), unit="s"),
    Panel("spacemoe-links", "Ground link delays", (
        _q('spacemoe_link_delay_seconds{kind="gsl"} and spacemoe_link_up == 1',
           "{{a}}-{{b}}"),
    ), unit="s"),
    Panel("spacemoe-links", "Capacity of up links", (
        _q("sum by (kind) (spacemoe_link_rate_bytes_per_second "
           "and spacemoe_link_up == 1)", "{{kind}}"),
    ), unit="Bps"),
    Panel("spacemoe-links", "Traffic by link kind", (
        _q("sum by (kind) (rate(spacemoe_link_transmit_bytes_total"
           f"[{RATE}]))", "{{kind}}"),
    ), unit="Bps", stack=True),
    Panel("spacemoe-links", "Busiest link directions", (
        _q("topk(10, rate(spacemoe_link_transmit_bytes_total"
           f"[{RATE}]))", "{{src}}>{{dst}}"),
    ), unit="Bps"),
    Panel("spacemoe-links", "Utilisation of the busiest link directions", (
        _q("topk(10, rate(spacemoe_link_transmit_bytes_total"
           f"[{RATE}]) / on (link) group_left () max by (link) "
           "(spacemoe_link_rate_bytes_per_second))", "{{src}}>{{dst}}"),
    ), unit="percentunit"),
    Panel("spacemoe-links", "Dropped packets per second", (
        _q("sum by (kind) (rate(spacemoe_link_dropped_packets_total"
           f"[{RATE}]))", "{{kind}}"),
    )),
    Panel("spacemoe-links", "Link and route changes per second", (
        _q(f"sum by (change) (rate(spacemoe_link_changes_total[{RATE}]))",
           "link {{change}}"),
        _q(f"rate(spacemoe_route_changes_total[{RATE}])", "routes"),
    )),
    Panel("spacemoe-links", "Emulator step time", _quantiles(
        "spacemoe_emulator_step_duration_seconds"), unit="s"),
)
# fmt: on


def panels(dashboard: str | None = None) -> list[Panel]:
    """The panels of one dashboard (by uid), or all of them."""
    return [p for p in PANELS if dashboard is None or p.dashboard == dashboard]


def expand(expr: str, rate_window: str = "1m", satellite: str = ".*") -> str:
    """`expr` with the Grafana variables replaced, for use outside Grafana."""
    return expr.replace("$__rate_interval", rate_window).replace(
        "$satellite", satellite
    )


def check_panels(
    prometheus_url: str,
    at: float | None = None,
    rate_window: str = "1m",
) -> dict[str, int]:
    """Run every panel's queries; map each panel to its series count.

    A series counts if it has a finite value (a quantile over no
    observations is NaN and does not). A panel with several queries gets
    the smallest count among them, so 0 means some query shows nothing.
    """
    counts = {}
    for panel in PANELS:
        per_query = []
        for q in panel.queries:
            result = query(prometheus_url, expand(q.expr, rate_window), at)
            finite = [r for r in result if math.isfinite(float(r["value"][1]))]
            per_query.append(len(finite))
        counts[panel.key] = min(per_query)
        log.debug("%s: %s series", panel.key, per_query)
    return counts


# --- Grafana JSON -----------------------------------------------------------

_SIZES = {"stat": (6, 4), "geomap": (24, 12), "state-timeline": (24, 8)}


def dashboard_json(dashboard: Dashboard) -> dict[str, Any]:
    """The Grafana dashboard model of `dashboard`."""
    built = []
    x = y = row_height = 0
    for number, panel in enumerate(panels(dashboard.uid), start=1):
        width, height = _SIZES.get(panel.kind, (12, 8))
        if x + width > 24:
            x, y, row_height = 0, y + row_height, 0
        built.append(
            _panel_json(panel, number, {"h": height, "w": width, "x": x, "y": y})
        )
        x += width
        row_height = max(row_height, height)

    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": ["spacemoe"],
        "timezone": "utc",
        "editable": False,
        "graphTooltip": 1,
        "refresh": "5s",
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "time": {"from": "now-30m", "to": "now"},
        "annotations": {"list": []},
        "links": [
            {
                "type": "dashboards",
                "tags": ["spacemoe"],
                "asDropdown": True,
                "title": "SpaceMoE",
            }
        ],
        "templating": {"list": [_variable(v) for v in dashboard.variables]},
        "panels": built,
    }


def _variable(name: str) -> dict[str, Any]:
    if name != "satellite":
        raise ValueError(f"no definition for dashboard variable {name!r}")
    definition = "label_values(spacemoe_battery_soc_ratio, satellite)"
    return {
        "name": "satellite",
        "label": "Satellite",
        "type": "query",
        "datasource": DATASOURCE,
        "definition": definition,
        "query": {"query": definition, "refId": "satellite"},
        "refresh": 2,
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 3,
    }


def _panel_json(panel: Panel, number: int, grid: dict[str, int]) -> dict[str, Any]:
    table = panel.kind == "geomap"
    targets = [
        {
            "refId": chr(ord("A") + i),
            "datasource": DATASOURCE,
            "expr": q.expr,
            "legendFormat": q.legend or "__auto",
            "range": not table,
            "instant": table,
            **({"format": "table"} if table else {}),
        }
        for i, q in enumerate(panel.queries)
    ]
    custom: dict[str, Any] = {}
    if panel.kind == "timeseries":
        custom = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 20 if panel.stack else 0,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if panel.stack else "none", "group": "A"},
        }
    out: dict[str, Any] = {
        "id": number,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": grid,
        "fieldConfig": {
            "defaults": {"unit": panel.unit, "custom": custom},
            "overrides": [],
        },
        "options": _options(panel),
        "targets": targets,
    }
    if table:
        out["transformations"] = _geomap_transformations()
    return out


def _options(panel: Panel) -> dict[str, Any]:
    legend = {"displayMode": "list", "placement": "bottom", "showLegend": True}
    if panel.kind == "stat":
        return {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "value_and_name",
        }
    if panel.kind == "state-timeline":
        return {
            "legend": legend,
            "showValue": "never",
            "mergeValues": True,
            "rowHeight": 0.9,
        }
    if panel.kind == "geomap":
        return _geomap_options()
    return {"legend": legend, "tooltip": {"mode": "multi", "sort": "desc"}}


def _geomap_transformations() -> list[dict[str, Any]]:
    # Two instant queries in table format (A: latitude, B: longitude) joined
    # on the node label, then renamed so the map finds its coordinates.
    return [
        {"id": "joinByField", "options": {"byField": "node", "mode": "outer"}},
        {
            "id": "organize",
            "options": {
                "renameByName": {
                    "Value #A": "latitude",
                    "Value #B": "longitude",
                    "kind 1": "kind",
                },
                "excludeByName": {
                    "Time 1": True,
                    "Time 2": True,
                    "job 1": True,
                    "job 2": True,
                    "instance 1": True,
                    "instance 2": True,
                    "kind 2": True,
                    "__name__ 1": True,
                    "__name__ 2": True,
                },
            },
        },
    ]


def _geomap_options() -> dict[str, Any]:
    return {
        "view": {"id": "zero", "lat": 0, "lon": 0, "zoom": 1},
        "controls": {"showZoom": True, "mouseWheelZoom": True},
        "basemap": {"type": "default", "name": "Basemap"},
        "layers": [
            {
                "type": "markers",
                "name": "Nodes",
                "location": {
                    "mode": "coords",
                    "latitude": "latitude",
                    "longitude": "longitude",
                },
                "tooltip": True,
                "config": {
                    "showLegend": False,
                    "style": {
                        "size": {"fixed": 5},
                        "color": {"fixed": "dark-green"},
                        "text": {"mode": "field", "field": "node"},
                        "textConfig": {"fontSize": 9, "offsetY": -8},
                    },
                },
            }
        ],
        "tooltip": {"mode": "details"},
    }


def provisioning_files() -> dict[str, str]:
    """Every generated file, by path relative to GRAFANA_DIR."""
    files = {}
    for dashboard in DASHBOARDS:
        text = json.dumps(dashboard_json(dashboard), indent=2, sort_keys=True)
        files[f"dashboards/{dashboard.uid}.json"] = text + "\n"
    files["provisioning/datasources/spacemoe.yml"] = _DATASOURCE_YAML
    files["provisioning/dashboards/spacemoe.yml"] = _PROVIDER_YAML
    return files


_HEADER = "# Generated by `python -m monitoring.dashboards`; edit that, not this.\n"

_DATASOURCE_YAML = (
    _HEADER
    + f"""\
apiVersion: 1
datasources:
  - name: SpaceMoE Prometheus
    uid: {DATASOURCE["uid"]}
    type: prometheus
    access: proxy
    url: http://127.0.0.1:9090
    isDefault: true
    editable: false
    jsonData:
      timeInterval: 1s   # the scrape interval; sets $__rate_interval
      httpMethod: POST
"""
)

_PROVIDER_YAML = (
    _HEADER
    + """\
apiVersion: 1
providers:
  - name: spacemoe
    folder: SpaceMoE
    type: file
    disableDeletion: true
    allowUiUpdates: false
    updateIntervalSeconds: 30
    options:
      # Set to the absolute path of monitoring/grafana/dashboards.
      path: ${SPACEMOE_GRAFANA_DASHBOARDS}
"""
)


def write_files(root: Path = GRAFANA_DIR) -> list[Path]:
    """Write the generated files under `root`; return their paths."""
    written = []
    for relative, text in provisioning_files().items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def panel_table() -> str:
    """The panels and their queries as a Markdown table, for the docs."""
    rows = ["| Dashboard | Panel | PromQL |", "|---|---|---|"]
    for panel in PANELS:
        exprs = "<br>".join(f"`{q.expr}`".replace("|", "\\|") for q in panel.queries)
        rows.append(f"| {panel.dashboard} | {panel.title} | {exprs} |")
    return "\n".join(rows) + "\n"


DOC = Path(__file__).resolve().parents[1] / "docs" / "monitoring.md"


def doc_sections() -> dict[str, str]:
    """Generated tables of docs/monitoring.md, by marker name."""
    from monitoring.metrics import metric_table

    return {"metrics": metric_table(), "panels": panel_table()}


def refresh_doc(path: Path = DOC) -> bool:
    """Rewrite the generated tables between their markers; True if changed."""
    text = original = path.read_text()
    for name, table in doc_sections().items():
        begin, end = f"<!-- {name}:begin -->\n", f"<!-- {name}:end -->"
        head, found, rest = text.partition(begin)
        if not found:
            raise ValueError(f"{path}: marker {begin.strip()!r} is missing")
        _, found, tail = rest.partition(end)
        if not found:
            raise ValueError(f"{path}: marker {end!r} is missing")
        text = head + begin + table + end + tail
    if text != original:
        path.write_text(text)
    return text != original


def main(argv: Iterable[str] | None = None) -> int:
    """Regenerate monitoring/grafana/ and the tables in docs/monitoring.md."""
    args = list(sys.argv[1:] if argv is None else argv)
    root = Path(args[0]) if args else GRAFANA_DIR
    for path in write_files(root):
        log.info("wrote %s", path)
    if DOC.exists() and refresh_doc(DOC):
        log.info("refreshed the tables in %s", DOC)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(main())
