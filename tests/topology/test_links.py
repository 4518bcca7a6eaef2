"""+Grid ISLs, line of sight, ground links and handover."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from topology.config import from_dict
from topology.links import (
    EARTH_RADIUS_KM,
    GSL,
    ISL,
    Geometry,
    elevation_deg,
    grid_candidates,
    line_clearance_km,
)
from topology.orbits import SPEED_OF_LIGHT_KM_S, Constellation
from topology.scenario import Scenario
from topology.snapshot import snapshot

START = "2026-03-20T12:00:00Z"
IRIDIUM = {
    "kind": "walker-star",
    "planes": 6,
    "sats_per_plane": 11,
    "phasing": 2,
    "altitude_km": 780,
    "inclination_deg": 86.4,
}
STARLINK = {
    "kind": "walker-delta",
    "planes": 72,
    "sats_per_plane": 22,
    "phasing": 39,
    "altitude_km": 550,
    "inclination_deg": 53.0,
}


def scenario(
    shells: list[dict],
    stations: list[dict] | None = None,
    isl: dict | None = None,
    gsl: dict | None = None,
) -> Scenario:
    return from_dict(
        Scenario,
        {
            "time": {"start_utc": START},
            "shells": shells,
            "ground_stations": stations or [],
            "isl": isl or {},
            "gsl": gsl or {},
        },
    )


def degrees(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(np.concatenate([a, b]), minlength=n)


def test_walker_star_grid_and_seam() -> None:
    c = Constellation.from_scenario(scenario([IRIDIUM]))
    cand = grid_candidates(c)
    assert len(cand) == 66 + 5 * 11 + 11
    assert (cand.a < cand.b).all()
    assert (degrees(cand.a, cand.b, 66) == 4).all()
    seam = {
        (c.names[a], c.names[b])
        for a, b in zip(cand.a[cand.seam], cand.b[cand.seam], strict=True)
    }
    assert ("s0-0-3", "s0-5-3") in seam and len(seam) == 11
    assert ("s0-0-3", "s0-0-4") in {
        (c.names[a], c.names[b]) for a, b in zip(cand.a, cand.b, strict=True)
    }


def test_seam_links_down_unless_cross_seam() -> None:
    g = Geometry(scenario([IRIDIUM]))
    links = g.step(0.0).links
    seam = g.candidates.seam
    assert not links.up[: len(seam)][seam].any()
    assert links.up[: len(seam)][~seam].mean() > 0.9

    crossing = Geometry(scenario([IRIDIUM], isl={"cross_seam": True}))
    ups = [crossing.step(t).links.up[: len(seam)][seam] for t in range(0, 6000, 300)]
    assert np.any(ups)


def test_walker_delta_wrap_joins_the_symmetric_neighbour() -> None:
    # With the slot shifted by F, the last-to-first plane links are the
    # image of all other inter-plane links: same length.
    g = Geometry(scenario([STARLINK]))
    state = g.step(0.0)
    cand = g.candidates
    n_isl = len(cand)
    assert n_isl == 2 * 72 * 22
    assert (degrees(cand.a, cand.b, 1584) == 4).all()
    rng = state.links.range_km[:n_isl]
    inter = cand.inter_plane
    wrap = (
        inter
        & (g.constellation.plane[cand.a] == 0)
        & (g.constellation.plane[cand.b] == 71)
    )
    assert wrap.sum() == 22
    assert np.median(rng[wrap]) == pytest.approx(
        np.median(rng[inter & ~wrap]), rel=0.02
    )


def test_intra_plane_range_is_the_chord() -> None:
    g = Geometry(scenario([IRIDIUM]))
    state = g.step(600.0)
    cand = g.candidates
    intra = ~cand.inter_plane
    radius = np.linalg.norm(state.positions_km, axis=1)
    r = 0.5 * (radius[cand.a[intra]] + radius[cand.b[intra]])
    chord = 2 * r * math.sin(math.pi / 11)
    assert np.allclose(state.links.range_km[: len(cand)][intra], chord, rtol=5e-3)
    assert chord.mean() == pytest.approx(
        2 * (6378.135 + 780) * math.sin(math.pi / 11), rel=5e-3
    )
    # 4,000 km chords clear the 80 km grazing height at 780 km altitude.
    assert state.links.up[: len(cand)][intra].all()


def test_delay_is_range_over_c() -> None:
    links = Geometry(scenario([IRIDIUM])).step(0.0).links
    assert np.allclose(links.delay_s, links.range_km / 299792.458)
    assert links.a.dtype == np.int32 and links.kind.dtype == np.int8


def test_line_clearance() -> None:
    r = 7000.0
    p = np.array([[r, 0, 0], [r, 0, 0], [r, 0, 0]])
    q = np.array([[-r, 0, 0], [0, r, 0], [r, 100, 0]])
    clearance = line_clearance_km(p, q)
    assert clearance[0] == pytest.approx(0.0, abs=1e-9)
    assert clearance[1] == pytest.approx(r / math.sqrt(2))
    assert clearance[2] == pytest.approx(r)


def test_range_and_line_of_sight_limits() -> None:
    # Opposite planes of a Walker delta are out of sight of each other.
    g = Geometry(scenario([STARLINK], isl={"max_range_km": 100}))
    assert not g.step(0.0).links.up.any()

    # At 550 km the grazing-limited range is 2 * sqrt((R+h)^2 - (R+80)^2).
    r_sat = 6378.135 + 550
    limit = 2 * math.sqrt(r_sat**2 - (EARTH_RADIUS_KM + 80) ** 2)
    for factor, visible in ((0.98, True), (1.02, False)):
        half = factor * limit / 2
        x = math.sqrt(r_sat**2 - half**2)
        a = np.array([[x, -half, 0]])
        b = np.array([[x, half, 0]])
        clear = line_clearance_km(a, b)[0] >= EARTH_RADIUS_KM + 80
        assert clear == visible


def test_max_latitude_cuts_inter_plane_only() -> None:
    g = Geometry(scenario([IRIDIUM], isl={"max_latitude_deg": 60.0}))
    state = g.step(0.0)
    cand = g.candidates
    up = state.links.up[: len(cand)]
    polar = (np.abs(state.lat_deg[cand.a]) > 60) | (np.abs(state.lat_deg[cand.b]) > 60)
    assert polar.any()
    assert not up[cand.inter_plane & polar].any()
    assert up[~cand.inter_plane & polar].all()


def overhead_station(t_s: float, sat: int) -> dict:
    c = Constellation.from_scenario(scenario([IRIDIUM]))
    lat, lon, _ = c.geodetic(t_s)
    return {"name": "below", "lat_deg": float(lat[sat]), "lon_deg": float(lon[sat])}


def test_satellite_overhead_is_at_zenith_with_altitude_delay() -> None:
    g = Geometry(scenario([IRIDIUM], [overhead_station(300.0, 7)]))
    state = g.step(300.0)
    c = g.constellation
    elevation, _ = elevation_deg(c.ground_itrs_km, c.ground_up, state.positions_km[:66])
    assert elevation[0, 7] == pytest.approx(90.0, abs=1e-3)
    links = state.links
    (j,) = np.flatnonzero(links.kind == GSL)
    assert (links.a[j], links.b[j]) == (7, 66)
    assert links.range_km[j] == pytest.approx(state.alt_km[7], abs=1e-3)
    assert links.delay_s[j] == pytest.approx(state.alt_km[7] / SPEED_OF_LIGHT_KM_S)


def test_satellite_below_horizon_is_not_visible() -> None:
    station = overhead_station(300.0, 7)
    station["lat_deg"] = -station["lat_deg"]
    station["lon_deg"] = (
        station["lon_deg"] - 180
        if station["lon_deg"] > 0
        else (station["lon_deg"] + 180)
    )
    g = Geometry(scenario([IRIDIUM], [station]))
    state = g.step(300.0)
    c = g.constellation
    elevation, _ = elevation_deg(c.ground_itrs_km, c.ground_up, state.positions_km[:66])
    assert elevation[0, 7] < -80
    links = state.links
    assert 7 not in links.a[links.kind == GSL]


STATIONS = [
    {"name": "longyearbyen", "lat_deg": 78.23, "lon_deg": 15.41, "alt_m": 500},
    {"name": "tromso", "lat_deg": 69.66, "lon_deg": 18.94, "alt_m": 100},
    {"name": "inuvik", "lat_deg": 68.32, "lon_deg": -133.55, "alt_m": 90},
]


@pytest.mark.parametrize("handover", ["nearest", "sticky"])
def test_handover_rules_against_brute_force(handover: str) -> None:
    g = Geometry(scenario([IRIDIUM], STATIONS, gsl={"handover": handover}))
    c = g.constellation
    previous = {s: -1 for s in range(66, 69)}
    kept_while_not_nearest = 0
    for t_s in range(0, 1800, 10):
        state = g.step(float(t_s))
        elevation, range_km = elevation_deg(
            c.ground_itrs_km, c.ground_up, state.positions_km[:66]
        )
        links = state.links
        gsl = links.kind == GSL
        assert links.up[gsl].all()
        served = dict(zip(links.b[gsl].tolist(), links.a[gsl].tolist(), strict=True))
        assert len(served) == int(gsl.sum())  # one GSL per station
        for g_idx in range(3):
            station = 66 + g_idx
            visible = np.flatnonzero(elevation[g_idx] >= 25)
            if not len(visible):
                assert station not in served
                continue
            nearest = visible[np.argmin(range_km[g_idx, visible])]
            sat = served[station]
            assert elevation[g_idx, sat] >= 25
            if handover == "nearest" or previous[station] not in visible:
                assert sat == nearest
            else:
                assert sat == previous[station]
                kept_while_not_nearest += sat != nearest
            previous[station] = sat
    if handover == "sticky":
        assert kept_while_not_nearest > 0


def test_isl_disabled() -> None:
    g = Geometry(scenario([IRIDIUM], STATIONS, isl={"enabled": False}))
    links = g.step(0.0).links
    assert (links.kind == GSL).all()


def test_snapshot_is_json_and_complete() -> None:
    import json

    base = scenario([IRIDIUM], STATIONS)
    data = snapshot(replace(base, name="snap"), 120.0)
    text = json.dumps(data)
    assert data["utc"] == "2026-03-20T12:02:00Z"
    assert len(data["nodes"]) == 69 and data["nodes"][0]["name"] == "s0-0-0"
    assert data["nodes"][-1]["kind"] == "ground"
    isl = [link for link in data["links"] if link["kind"] == "isl"]
    assert len(isl) == 132
    link = isl[0]
    assert set(link) >= {
        "a",
        "b",
        "kind",
        "up",
        "range_km",
        "delay_s",
        "rate_bps",
        "loss_fraction",
    }
    assert "s0-0-0" in text and data["scenario"] == "snap"
    assert ISL == 0
