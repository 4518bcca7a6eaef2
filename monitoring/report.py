"""PNG report of a run, drawn from Prometheus, for users without Grafana.

`spacemoe report` calls :func:`render_report`, which draws one figure per
dashboard with the same panels and the same queries (taken from
:data:`monitoring.dashboards.PANELS`, so the two never disagree), plus a
ground-track map: satellite tracks over the report window, ground stations,
and the links up at its end, on an equirectangular projection (longitude
and latitude in degrees as axes; no coastlines).

Caveats: the x axis is wall-clock time since `start`, not scenario time
(the scenario clock is on the overview's "Scenario time" panel). Panels
with more series than fit a legend draw every series without one and say
how many there are.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from monitoring.dashboards import DASHBOARDS, Panel, expand, panels
from monitoring.prometheus import query, query_range

log = logging.getLogger(__name__)

MAX_LEGEND = 10
MAX_TIMELINE_ROWS = 64
DPI = 100

_UNIT_LABELS = {
    "s": "seconds",
    "percentunit": "ratio (0-1)",
    "watt": "watts",
    "joule": "joules",
    "celsius": "°C",
    "Bps": "bytes/s",
    "bytes": "bytes",
    "dateTimeAsIso": "scenario seconds since first sample",
    "short": "",
}


def render_report(
    prometheus_url: str,
    out_dir: Path,
    start: float,
    end: float,
    *,
    step_s: float | None = None,
    rate_window: str | None = None,
    topology: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Draw every dashboard and the ground-track map into `out_dir`.

    `start` and `end` are unix times. `step_s` defaults to about 400 points
    over the window (at least 1 s); `rate_window` replaces Grafana's
    ``$__rate_interval`` (default: 4 steps, at least 10 s). `topology` is an
    optional snapshot for the map (see :func:`ground_track_map`). Returns
    the PNG paths.
    """
    if end <= start:
        raise ValueError(f"report window {start}..{end} is empty; end must be later")
    step = step_s or max(1.0, (end - start) / 400)
    window = rate_window or f"{max(10, math.ceil(4 * step))}s"
    out_dir.mkdir(parents=True, exist_ok=True)

    paths = []
    for dashboard in DASHBOARDS:
        drawable = [p for p in panels(dashboard.uid) if p.kind != "geomap"]
        path = out_dir / f"{dashboard.uid.removeprefix('spacemoe-')}.png"
        _dashboard_figure(
            prometheus_url, dashboard.title, drawable, path, start, end, step, window
        )
        paths.append(path)

    map_path = out_dir / "ground-track.png"
    ground_track_map(prometheus_url, map_path, start, end, step, topology)
    paths.append(map_path)
    log.info("wrote %d report figures to %s", len(paths), out_dir)
    return paths


@dataclass
class _Series:
    label: str
    labels: dict[str, str]
    times: list[float]
    values: list[float]


def _dashboard_figure(
    url: str,
    title: str,
    drawable: Sequence[Panel],
    path: Path,
    start: float,
    end: float,
    step: float,
    window: str,
) -> None:
    # Time series go two to a row; a state timeline takes a whole row, as
    # tall as its number of rows needs.
    layout: list[list[Panel]] = []
    for panel in drawable:
        if panel.kind == "state-timeline":
            layout.append([panel])
        elif layout and len(layout[-1]) == 1 and layout[-1][0].kind != "state-timeline":
            layout[-1].append(panel)
        else:
            layout.append([panel])
    data = {p.key: _fetch(url, p, start, end, step, window) for p in drawable}
    heights = [
        max(3.4, 0.14 * _timeline_rows(row[0], data[row[0].key]) + 1.2)
        if row[0].kind == "state-timeline"
        else 3.4
        for row in layout
    ]

    # A bare Figure (Agg canvas) rather than pyplot: no global state, no
    # display backend.
    fig = Figure(figsize=(15, sum(heights) + 0.8), layout="constrained")
    grid = fig.add_gridspec(len(layout), 2, height_ratios=heights)
    for r, row in enumerate(layout):
        if row[0].kind == "state-timeline":
            ax = fig.add_subplot(grid[r, :])
            _timeline(ax, row[0], data[row[0].key], end - start)
            continue
        for c, panel in enumerate(row):
            _lines(fig.add_subplot(grid[r, c]), panel, data[panel.key])
    when = _utc(start) + " to " + _utc(end)
    fig.suptitle(f"{title}\n{when}", fontsize=12)
    fig.savefig(path, dpi=DPI)


def _fetch(
    url: str, panel: Panel, start: float, end: float, step: float, window: str
) -> list[_Series]:
    series = []
    for q in panel.queries:
        for s in query_range(url, expand(q.expr, window), start, end, step):
            series.append(
                _Series(
                    format_legend(q.legend, s["metric"]),
                    s["metric"],
                    [float(t) - start for t, _ in s["values"]],
                    [float(v) for _, v in s["values"]],
                )
            )
    return series


def _lines(ax: Axes, panel: Panel, series: list[_Series]) -> None:
    if panel.unit == "dateTimeAsIso":
        # Milliseconds since the epoch: show scenario seconds elapsed.
        for s in series:
            s.values = [(v - s.values[0]) / 1000 for v in s.values]
    series.sort(key=lambda s: _natural(s.label))
    crowded = len(series) > MAX_LEGEND
    for s in series:
        ax.plot(s.times, s.values, linewidth=0.8 if crowded else 1.3, label=s.label)
    suffix = f" ({len(series)} series)" if crowded else ""
    _decorate(ax, panel, suffix)
    if series and not crowded:
        ax.legend(fontsize=7, loc="best", ncols=2 if len(series) > 5 else 1)
    if not series:
        _no_data(ax)


def _timeline_rows(panel: Panel, series: list[_Series]) -> int:
    if panel.rows:
        keys = {format_legend(panel.rows, s.labels) for s in series}
    else:
        keys = {s.label for s in series}
    return min(len(keys), MAX_TIMELINE_ROWS)


def _timeline(ax: Axes, panel: Panel, series: list[_Series], span: float) -> None:
    """A row per series (or per `panel.rows`), a bar where the value is > 0.

    With `panel.state`, bars are coloured by that label (e.g. the node that
    holds an expert), so a change of colour along a row is a migration.
    """
    row_of: dict[str, int] = {}
    states: dict[str, str] = {}
    for s in sorted(series, key=lambda s: _natural(s.label)):
        key = format_legend(panel.rows, s.labels) if panel.rows else s.label
        row_of.setdefault(key, len(row_of))
        if panel.state:
            state = format_legend(panel.state, s.labels)
            states.setdefault(state, f"C{len(states) % 10}")
    rows = sorted(row_of, key=_natural)[:MAX_TIMELINE_ROWS]
    index = {key: i for i, key in enumerate(rows)}

    for s in series:
        key = format_legend(panel.rows, s.labels) if panel.rows else s.label
        if key not in index:
            continue
        if panel.state:
            colour = states[format_legend(panel.state, s.labels)]
        else:
            colour = f"C{index[key] % 10}"
        row = index[key]
        ax.broken_barh(_runs(s.times, s.values), (row - 0.4, 0.8), color=colour)
    ax.set_yticks(range(len(rows)), rows, fontsize=6)
    ax.set_ylim(-0.6, max(len(rows), 1) - 0.4)
    ax.invert_yaxis()
    ax.set_xlim(0, span)
    hidden = len(row_of) - len(rows)
    _decorate(ax, panel, f" (first {len(rows)} of {len(row_of)})" if hidden else "")
    if states:
        handles = [Patch(color=c, label=name) for name, c in list(states.items())[:20]]
        ax.legend(handles=handles, fontsize=7, loc="upper left",
                  bbox_to_anchor=(1.0, 1.0))  # fmt: skip
    if not series:
        _no_data(ax)


def _runs(times: list[float], values: list[float]) -> list[tuple[float, float]]:
    """(start, width) of each stretch of non-zero samples."""
    if len(times) > 1:
        gap = min(b - a for a, b in zip(times, times[1:], strict=False))
    else:
        gap = 1.0
    spans: list[tuple[float, float]] = []
    for t, v in zip(times, values, strict=True):
        if v == 0 or math.isnan(v):
            continue
        if spans and t - (spans[-1][0] + spans[-1][1]) <= gap * 1.5:
            spans[-1] = (spans[-1][0], t + gap - spans[-1][0])
        else:
            spans.append((t, gap))
    return spans


def _decorate(ax: Axes, panel: Panel, suffix: str = "") -> None:
    ax.set_title(panel.title + suffix, fontsize=10)
    ax.set_xlabel("seconds since report start", fontsize=8)
    if panel.kind != "state-timeline":
        ax.set_ylabel(_UNIT_LABELS.get(panel.unit, panel.unit), fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)


def _no_data(ax: Axes) -> None:
    ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")


def format_legend(template: str, labels: Mapping[str, str]) -> str:
    """Grafana's legend format: ``{{label}}`` replaced by the label's value."""
    if not template or template == "__auto":
        shown = {k: v for k, v in labels.items() if k not in ("job", "instance")}
        return ", ".join(f"{k}={v}" for k, v in sorted(shown.items())) or "value"
    return re.sub(
        r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template
    )


def ground_track_map(
    prometheus_url: str,
    path: Path,
    start: float,
    end: float,
    step_s: float = 10.0,
    topology: Mapping[str, Any] | None = None,
) -> Path:
    """Satellite ground tracks over [start, end] and the links at `end`.

    Tracks and positions come from ``spacemoe_node_*_degrees``. Links come
    from `topology` when given, else from ``spacemoe_link_up`` at `end`.
    `topology` is a snapshot such as the emulator's state.json: ``links`` a
    list of ``{a, b}`` or ``{endpoints: [a, b]}`` with ``up`` and ``kind``;
    ``nodes`` may carry ``{name, lat_deg, lon_deg, kind}`` to override the
    positions from Prometheus (state.json's nodes have no positions).
    """
    tracks = _tracks(prometheus_url, start, end, step_s)
    nodes = _positions(prometheus_url, end)
    if topology is not None:
        snapshot_nodes, links = _from_snapshot(topology)
        nodes.update(snapshot_nodes)
    else:
        links = [
            (r["metric"].get("a", ""), r["metric"].get("b", ""), r["metric"]["kind"])
            for r in query(prometheus_url, "spacemoe_link_up == 1", end)
        ]

    fig = Figure(figsize=(14, 7.5), layout="constrained")
    ax = fig.subplots()
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_aspect("equal")
    ax.set_xticks(range(-180, 181, 30))
    ax.set_yticks(range(-90, 91, 30))
    ax.grid(True, alpha=0.3)
    ax.set_xlabel("longitude (degrees)")
    ax.set_ylabel("latitude (degrees)")

    for lons, lats in tracks.values():
        for seg_lon, seg_lat in _split_at_dateline(lons, lats):
            ax.plot(seg_lon, seg_lat, color="0.75", linewidth=0.6, zorder=1)

    colours = {"isl": "tab:blue", "gsl": "tab:orange"}
    drawn: set[str] = set()
    for a, b, kind in links:
        if a not in nodes or b not in nodes:
            continue
        (lat_a, lon_a, _), (lat_b, lon_b, _) = nodes[a], nodes[b]
        label = kind if kind not in drawn else None
        drawn.add(kind)
        for xs, ys in _link_segments(lon_a, lat_a, lon_b, lat_b):
            ax.plot(
                xs,
                ys,
                color=colours.get(kind, "tab:gray"),
                linewidth=0.9,
                label=label,
                zorder=2,
            )
            label = None

    sats = [(lon, lat) for lat, lon, kind in nodes.values() if kind == "satellite"]
    if sats:
        ax.scatter(
            [lon for lon, _ in sats],
            [lat for _, lat in sats],
            s=12,
            color="black",
            zorder=3,
            label="satellite",
        )
    ground = [(n, v) for n, v in nodes.items() if v[2] != "satellite"]
    if ground:
        ax.scatter(
            [v[1] for _, v in ground],
            [v[0] for _, v in ground],
            marker="^",
            s=60,
            color="tab:red",
            zorder=4,
            label="ground station",
        )
        for name, (lat, lon, _) in ground:
            ax.annotate(name, (lon, lat), xytext=(4, 4), textcoords="offset points",
                        fontsize=8, color="tab:red")  # fmt: skip
    if nodes:
        ax.legend(loc="lower left", fontsize=8)
    else:
        _no_data(ax)
    ax.set_title(
        f"Ground tracks {_utc(start)} to {_utc(end)}; {len(sats)} satellites, "
        f"{sum(1 for a, b, _ in links if a in nodes and b in nodes)} links up at end"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _tracks(
    url: str, start: float, end: float, step: float
) -> dict[str, tuple[list[float], list[float]]]:
    sel = '{kind="satellite"}'
    lat = query_range(url, f"spacemoe_node_latitude_degrees{sel}", start, end, step)
    lon = query_range(url, f"spacemoe_node_longitude_degrees{sel}", start, end, step)
    lat_by = {s["metric"]["node"]: dict(s["values"]) for s in lat}
    tracks = {}
    for s in lon:
        node = s["metric"]["node"]
        lats = lat_by.get(node, {})
        pairs = [(float(v), float(lats[t])) for t, v in s["values"] if t in lats]
        tracks[node] = ([p[0] for p in pairs], [p[1] for p in pairs])
    return tracks


def _positions(url: str, at: float) -> dict[str, tuple[float, float, str]]:
    """node -> (lat, lon, kind) at time `at`."""
    lat = {
        r["metric"]["node"]: (float(r["value"][1]), r["metric"].get("kind", ""))
        for r in query(url, "spacemoe_node_latitude_degrees", at)
    }
    out = {}
    for r in query(url, "spacemoe_node_longitude_degrees", at):
        node = r["metric"]["node"]
        if node in lat:
            out[node] = (lat[node][0], float(r["value"][1]), lat[node][1])
    return out


def _from_snapshot(
    snapshot: Mapping[str, Any],
) -> tuple[dict[str, tuple[float, float, str]], list[tuple[str, str, str]]]:
    """The snapshot's node positions, where it has them, and its up links."""
    nodes = {}
    for n in snapshot.get("nodes", []):
        if "lat_deg" not in n or "lon_deg" not in n:
            continue
        kind = n.get("kind") or n.get("role") or "satellite"
        kind = "satellite" if kind in ("satellite", "sat") else "ground"
        nodes[n["name"]] = (float(n["lat_deg"]), float(n["lon_deg"]), kind)
    links = []
    for link in snapshot.get("links", []):
        if not link.get("up", True):
            continue
        a, b = link["endpoints"] if "endpoints" in link else (link["a"], link["b"])
        links.append((a, b, link.get("kind", "isl")))
    return nodes, links


def _split_at_dateline(
    lons: list[float], lats: list[float]
) -> list[tuple[list[float], list[float]]]:
    """Cut a track where it jumps across ±180°, so no line spans the map."""
    segments: list[tuple[list[float], list[float]]] = []
    seg_lon: list[float] = []
    seg_lat: list[float] = []
    for lon, lat in zip(lons, lats, strict=True):
        if seg_lon and abs(lon - seg_lon[-1]) > 180:
            segments.append((seg_lon, seg_lat))
            seg_lon, seg_lat = [], []
        seg_lon.append(lon)
        seg_lat.append(lat)
    if seg_lon:
        segments.append((seg_lon, seg_lat))
    return segments


def _link_segments(
    lon_a: float, lat_a: float, lon_b: float, lat_b: float
) -> list[tuple[list[float], list[float]]]:
    """A straight segment, or two that leave and re-enter across ±180°."""
    if abs(lon_b - lon_a) <= 180:
        return [([lon_a, lon_b], [lat_a, lat_b])]
    # Unwrap b next to a, find where the line meets the edge, draw both parts.
    shifted = lon_b + (360 if lon_b < lon_a else -360)
    edge = 180.0 if shifted > lon_a else -180.0
    frac = (edge - lon_a) / (shifted - lon_a)
    lat_edge = lat_a + frac * (lat_b - lat_a)
    return [
        ([lon_a, edge], [lat_a, lat_edge]),
        ([-edge, lon_b], [lat_edge, lat_b]),
    ]


def _natural(text: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _utc(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m monitoring.report``: draw the report of the last while."""
    import argparse
    import json
    import time

    parser = argparse.ArgumentParser(
        prog="python -m monitoring.report", description=main.__doc__
    )
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument(
        "--since-s", type=float, default=1800.0, help="window length (seconds)"
    )
    parser.add_argument(
        "--topology", type=Path, help="state.json snapshot to draw links from"
    )
    args = parser.parse_args(argv)
    topology = json.loads(args.topology.read_text()) if args.topology else None
    end = time.time()
    for path in render_report(
        args.prometheus, args.out, end - args.since_s, end, topology=topology
    ):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
