"""The PNG report, drawn from the real Prometheus of the test run."""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib.image
import numpy as np

from monitoring.report import (
    _from_snapshot,
    _link_segments,
    _split_at_dateline,
    format_legend,
    ground_track_map,
    render_report,
)
from tests.monitoring.conftest import LiveMonitoring


def assert_drawn(path: Path, min_coloured: float = 1e-3) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)
    height, width = pixels.shape[:2]
    assert width >= 1000 and height >= 600
    # Data is drawn in colour; axes, grid and text are grey. An empty
    # figure has no saturated pixels at all.
    rgb = pixels[..., :3]
    coloured = np.mean((rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.3)
    assert coloured > min_coloured, (
        f"{path.name} shows no data ({coloured:.4f} coloured)"
    )


def test_report_draws_every_view(live: LiveMonitoring, tmp_path: Path) -> None:
    paths = render_report(live.url, tmp_path, live.start, time.time())
    assert [p.name for p in paths] == [
        "overview.png",
        "power.png",
        "inference.png",
        "placement.png",
        "links.png",
        "ground-track.png",
    ]
    for path in paths:
        assert_drawn(path)


def test_map_from_a_topology_snapshot(live: LiveMonitoring, tmp_path: Path) -> None:
    snapshot = {
        "nodes": [
            {"name": "s0-0", "lat_deg": 10.0, "lon_deg": 170.0, "kind": "satellite"},
            {"name": "s0-1", "lat_deg": 12.0, "lon_deg": -170.0, "kind": "satellite"},
            {"name": "oslo", "lat_deg": 59.9, "lon_deg": 10.75, "kind": "ground"},
            # As in the emulator's state.json: no position, Prometheus has it.
            {"name": "s0-3", "kind": "satellite"},
        ],
        "links": [
            {"endpoints": ["s0-0", "s0-1"], "up": True, "kind": "isl"},
            {"a": "s0-1", "b": "oslo", "up": False, "kind": "gsl"},
            {"a": "s0-3", "b": "s0-4", "up": True, "kind": "isl"},
        ],
    }
    nodes, links = _from_snapshot(snapshot)
    assert set(nodes) == {"s0-0", "s0-1", "oslo"}
    assert links == [("s0-0", "s0-1", "isl"), ("s0-3", "s0-4", "isl")]
    path = ground_track_map(
        live.url, tmp_path / "map.png", live.start, time.time(), 2.0, snapshot
    )
    # Two satellites, one link and a station: few coloured pixels.
    assert_drawn(path, min_coloured=1e-4)


def test_links_across_the_dateline_are_cut_in_two() -> None:
    segments = _link_segments(170.0, 10.0, -170.0, 12.0)
    assert segments == [
        ([170.0, 180.0], [10.0, 11.0]),
        ([-180.0, -170.0], [11.0, 12.0]),
    ]
    assert _link_segments(-10.0, 0.0, 10.0, 0.0) == [([-10.0, 10.0], [0.0, 0.0])]


def test_tracks_are_cut_at_the_dateline() -> None:
    parts = _split_at_dateline([170.0, 178.0, -176.0, -170.0], [0.0, 1.0, 2.0, 3.0])
    assert parts == [([170.0, 178.0], [0.0, 1.0]), ([-176.0, -170.0], [2.0, 3.0])]


def test_legend_format_follows_grafana() -> None:
    labels = {"satellite": "s0-1", "direction": "in", "job": "spacemoe"}
    assert format_legend("{{satellite}} {{ direction }}", labels) == "s0-1 in"
    assert format_legend("__auto", labels) == "direction=in, satellite=s0-1"
