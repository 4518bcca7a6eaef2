"""Orbit propagation, frames, sunlight and Walker layouts.

References are independent of our code paths: Skyfield's EarthSatellite
(its own TEME->GCRS->ITRS chain and eclipse test), Kepler's third law, the
cylindrical-shadow eclipse fraction and beta-angle formulas of the fact
sheet (/work/shared/reference/power-thermal-constants.md), and Skyfield's
WGS84 conversions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from skyfield.api import EarthSatellite, load, wgs84
from skyfield.framelib import itrs

from topology.config import from_dict
from topology.errors import ConfigError
from topology.orbits import Constellation, period_s, walker_elements
from topology.scenario import Scenario

START = "2026-03-20T12:00:00Z"


def scenario(shells: list[dict], stations: list[dict] | None = None) -> Scenario:
    return from_dict(
        Scenario,
        {
            "time": {"start_utc": START},
            "shells": shells,
            "ground_stations": stations or [],
        },
    )


IRIDIUM = {
    "kind": "walker-star",
    "planes": 6,
    "sats_per_plane": 11,
    "phasing": 2,
    "altitude_km": 780,
    "inclination_deg": 86.4,
}


@pytest.fixture(scope="module")
def iridium() -> Constellation:
    return Constellation.from_scenario(scenario([IRIDIUM]))


def test_positions_match_skyfield_earth_satellite(iridium: Constellation) -> None:
    ts = load.timescale(builtin=True)
    for t_s in (0.0, 1234.5, 86400.0):
        ours = iridium.positions_km(t_s)
        t = iridium.time_at(t_s)
        for i in (0, 17, 65):
            reference = EarthSatellite.from_satrec(iridium._satrecs[i], ts)
            theirs = reference.at(t).frame_xyz(itrs).km
            assert np.linalg.norm(ours[i] - theirs) < 1e-3, (t_s, i)


def test_time_axis_is_utc_seconds_since_start(iridium: Constellation) -> None:
    ts = load.timescale(builtin=True)
    t = iridium.time_at(3600.0)
    assert abs(t.tt - ts.utc(2026, 3, 20, 13).tt) * 86400 < 1e-4
    assert iridium.datetime_at(90.0).isoformat() == "2026-03-20T12:01:30+00:00"


def test_period_matches_kepler() -> None:
    # A polar orbit crosses the equator northbound once per (nodal) period;
    # J2 makes that differ from Kepler's by well under 0.5 %.
    c = Constellation.from_scenario(
        scenario([{**IRIDIUM, "planes": 1, "sats_per_plane": 1, "phasing": 0}])
    )
    times = np.arange(0.0, 2.5 * period_s(780.0), 5.0)
    z = np.array([c._at(t).teme_r_km[0, 2] for t in times])
    rising = np.flatnonzero((z[:-1] < 0) & (z[1:] >= 0))
    crossings = times[rising] - z[rising] * 5.0 / (z[rising + 1] - z[rising])
    measured = np.diff(crossings).mean()
    kepler = 2 * math.pi * math.sqrt((6378.135 + 780.0) ** 3 / 398600.8)
    assert measured == pytest.approx(kepler, rel=5e-3)
    assert kepler / 60 == pytest.approx(100.5, abs=0.3)  # fact sheet: 100.5 min


def test_mean_radius_is_altitude_above_equator(iridium: Constellation) -> None:
    radius = np.linalg.norm(iridium.positions_km(0.0), axis=1)
    assert radius.mean() == pytest.approx(6378.135 + 780, abs=10)


def test_walker_raan_spread() -> None:
    star = from_dict(Scenario, {"shells": [IRIDIUM]}).shells[0]
    delta = from_dict(Scenario, {"shells": [{**IRIDIUM, "kind": "walker-delta"}]})
    raan_star, _ = walker_elements(star)
    raan_delta, anomaly = walker_elements(delta.shells[0])
    assert np.allclose(raan_star[:, 0], np.arange(6) * 30.0)
    assert np.allclose(raan_delta[:, 0], np.arange(6) * 60.0)
    # Walker phasing: plane p is advanced by p * F * 360 / T.
    assert anomaly[1, 0] == pytest.approx(2 * 360 / 66)
    assert anomaly[0, 1] == pytest.approx(360 / 11)


def test_satellites_sit_on_their_planes(iridium: Constellation) -> None:
    # Every satellite's orbit normal points at its plane's RAAN - 90 deg.
    instant = iridium._at(0.0)
    normal = np.cross(instant.teme_r_km, instant.teme_v_km_s)
    node_deg = np.degrees(np.arctan2(normal[:, 0], -normal[:, 1]))
    off_deg = (node_deg - iridium.plane * 30.0 + 180.0) % 360.0 - 180.0
    assert np.abs(off_deg).max() < 0.05


def test_names_and_shells_combine() -> None:
    c = Constellation.from_scenario(
        scenario(
            [IRIDIUM, {**IRIDIUM, "planes": 2, "sats_per_plane": 3, "phasing": 0}],
            [{"name": "tromso", "lat_deg": 69.66, "lon_deg": 18.94}],
        )
    )
    assert c.n_sats == 72 and c.n_ground == 1
    assert c.names[0] == "s0-0-0" and c.names[65] == "s0-5-10"
    assert c.names[66] == "s1-0-0" and c.names[-1] == "tromso"
    assert list(c.shell[64:68]) == [0, 0, 1, 1]
    assert c.positions_km(0.0).shape == (73, 3)


def test_sunlit_matches_skyfield(iridium: Constellation) -> None:
    ts = load.timescale(builtin=True)
    for t_s in (0.0, 2000.0, 4000.0):
        t = iridium.time_at(t_s)
        ours = iridium.sunlit(t_s)
        theirs = np.array(
            [
                EarthSatellite.from_satrec(sat, ts).at(t).is_sunlit(iridium.ephemeris)
                for sat in iridium._satrecs
            ]
        )
        assert np.array_equal(ours, theirs)
        assert 0 < ours.sum() < len(ours)


def test_satellite_behind_earth_is_dark(iridium: Constellation) -> None:
    sun = iridium.sun_position_km(0.0)
    sun_dir = sun / np.linalg.norm(sun)
    positions = iridium.positions_km(0.0)[: iridium.n_sats]
    towards_sun = positions @ sun_dir
    lit = iridium.sunlit(0.0)
    assert not lit[np.argmin(towards_sun)]
    assert lit[np.argmax(towards_sun)]


def test_eclipse_fraction_at_beta_zero() -> None:
    # At the March equinox the Sun is near RA 0, dec 0, so a polar orbit
    # with RAAN 0 contains the Sun direction: beta ~ 0. Fact sheet: 780 km,
    # f_e = 0.350 at beta 0.
    c = Constellation.from_scenario(
        scenario(
            [
                {
                    **IRIDIUM,
                    "planes": 1,
                    "sats_per_plane": 1,
                    "phasing": 0,
                    "inclination_deg": 90.0,
                }
            ]
        )
    )
    assert abs(c.sun_beta_deg(0.0)[0]) < 1.0
    times = np.arange(0.0, period_s(780.0), 5.0)
    dark = np.array([not c.sunlit(t)[0] for t in times])
    assert dark.mean() == pytest.approx(0.350, abs=0.01)


def test_beta_angle_matches_fact_sheet_formula() -> None:
    c = Constellation.from_scenario(
        scenario([{**IRIDIUM, "kind": "walker-delta", "inclination_deg": 53.0}])
    )
    t = c.time_at(0.0)
    ra, dec, _ = (c.ephemeris["sun"] - c.ephemeris["earth"]).at(t).radec(epoch=t)
    a_s, d_s = ra.radians, dec.radians
    raan = np.radians(np.repeat(np.arange(6) * 60.0, 11))
    i = math.radians(53.0)
    sin_beta = math.cos(d_s) * math.sin(i) * np.sin(raan - a_s) + math.sin(
        d_s
    ) * math.cos(i)
    # The formula is n.s with n the orbit normal: the same sign as ours.
    ours = c.sun_beta_deg(0.0)
    assert np.allclose(ours, np.degrees(np.arcsin(sin_beta)), atol=0.1)
    assert np.ptp(ours) > 20  # the planes really do see different betas


def test_geodetic_round_trip_through_skyfield() -> None:
    stations = [
        {"name": "pole", "lat_deg": 89.9, "lon_deg": 10.0, "alt_m": 0},
        {"name": "quito", "lat_deg": -0.18, "lon_deg": -78.47, "alt_m": 2850},
        {"name": "hobart", "lat_deg": -42.88, "lon_deg": 147.33, "alt_m": 50},
    ]
    c = Constellation.from_scenario(scenario([IRIDIUM], stations))
    lat, lon, alt = c.geodetic(123.0)
    g = slice(c.n_sats, None)
    assert np.allclose(lat[g], [s["lat_deg"] for s in stations], atol=1e-6)
    assert np.allclose(lon[g], [s["lon_deg"] for s in stations], atol=1e-6)
    assert np.allclose(alt[g], [s["alt_m"] / 1000 for s in stations], atol=1e-6)

    # Satellites: compare with Skyfield's own geodetic of the same satellite.
    ts = load.timescale(builtin=True)
    reference = EarthSatellite.from_satrec(c._satrecs[5], ts).at(c.time_at(123.0))
    place = wgs84.geographic_position_of(reference)
    assert lat[5] == pytest.approx(place.latitude.degrees, abs=1e-5)
    assert alt[5] == pytest.approx(place.elevation.km, abs=1e-3)


def test_ground_station_sunlit_follows_the_sun() -> None:
    c0 = Constellation.from_scenario(scenario([IRIDIUM]))
    sun = c0.sun_position_km(0.0)
    lat = math.degrees(math.atan2(sun[2], math.hypot(sun[0], sun[1])))
    lon = math.degrees(math.atan2(sun[1], sun[0]))
    anti_lon = lon - 180 if lon > 0 else lon + 180
    c = Constellation.from_scenario(
        scenario(
            [IRIDIUM],
            [
                {"name": "noon", "lat_deg": lat, "lon_deg": lon},
                {"name": "midnight", "lat_deg": -lat, "lon_deg": anti_lon},
            ],
        )
    )
    assert list(c.ground_sunlit(0.0)) == [True, False]


def test_naive_epoch_rejected() -> None:
    from datetime import datetime

    with pytest.raises(ConfigError, match="time zone"):
        Constellation(
            datetime(2026, 1, 1),
            [],
            [],
            [],
            *[np.zeros(0)] * 3,
            [],
            [],
            np.zeros(0),
            np.zeros(0),
            np.zeros(0),
        )
