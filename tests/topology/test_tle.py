"""TLE parsing, checksums, error messages and TLE shells.

Fixtures in data/: `iss_2019.tle` is a real 2-line ISS element set (the
example in the sgp4 package's documentation); `iridium_like.tle` holds 12
3-line sets generated from Iridium-like elements (analyst catalog numbers
80001-80012) by sgp4's exporter, which writes the checksums.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skyfield.api import EarthSatellite, load
from skyfield.framelib import itrs

from topology.config import from_dict
from topology.errors import TleError
from topology.orbits import Constellation
from topology.scenario import Scenario
from topology.tle import parse_tle_text, read_tle_file, tle_checksum

DATA = Path(__file__).parent / "data"
ISS_1 = "1 25544U 98067A   19343.69339541  .00001764  00000-0  38792-4 0  9991"
ISS_2 = "2 25544  51.6439 211.2001 0007417  17.6667  85.6398 15.50103472202482"


def test_checksums_of_a_real_element_set() -> None:
    assert tle_checksum(ISS_1) == 1
    assert tle_checksum(ISS_2) == 2


def test_reads_two_and_three_line_files() -> None:
    iss = read_tle_file(DATA / "iss_2019.tle")
    assert [(r.title, r.catalog_number, r.line_number) for r in iss] == [
        ("", "25544", 1)
    ]
    iridium = read_tle_file(DATA / "iridium_like.tle")
    assert len(iridium) == 12
    assert iridium[0].title == "IRIDIUM-LIKE P0 S0"
    assert iridium[0].catalog_number == "80001"
    assert iridium[1].line_number == 5


def test_celestrak_style_title_and_blank_lines() -> None:
    text = f"\n0 ISS (ZARYA)\n{ISS_1}\r\n{ISS_2}   \n\n"
    (record,) = parse_tle_text(text)
    assert record.title == "ISS (ZARYA)" and record.line_number == 3


def test_bad_checksum_names_file_line_and_digits(tmp_path: Path) -> None:
    bad = ISS_2[:-1] + "7"
    path = tmp_path / "bad.tle"
    path.write_text(f"ISS\n{ISS_1}\n{bad}\n")
    with pytest.raises(TleError) as err:
        read_tle_file(path)
    message = str(err.value)
    assert f"{path}:3" in message
    assert "expected 2 got 7" in message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (f"{ISS_1[:60]}\n{ISS_2}\n", ":1: line 1 has 60 characters, expected 69"),
        (f"{ISS_1}\n", ":1: line 1 has no line 2"),
        ("ISS\n", ":1: title 'ISS' is not followed"),
        (f"ISS\nfoo\n{ISS_1}\n{ISS_2}\n", ":2: expected line 1"),
        (f"{ISS_1}\n{ISS_1}\n", ":2: expected line 2"),
        (f"{ISS_1}\n{ISS_2.replace('25544', '25545', 1)[:-1]}3\n", "does not match"),
        (f"{ISS_1}\n{ISS_2}\nX\n{ISS_1}\n{ISS_2}\n", "already appeared at line 1"),
        ("\n\n", "no element sets found"),
    ],
)
def test_malformed_files(text: str, fragment: str) -> None:
    with pytest.raises(TleError, match=None) as err:
        parse_tle_text(text, "f.tle")
    assert fragment in str(err.value)
    assert str(err.value).startswith("f.tle")


def test_missing_file_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(TleError, match="tle_file path"):
        read_tle_file(tmp_path / "nope.tle")


def tle_scenario(path: Path, start: str) -> Scenario:
    return from_dict(
        Scenario,
        {
            "time": {"start_utc": start},
            "shells": [{"kind": "tle", "tle_file": str(path)}],
        },
    )


def test_tle_shell_matches_skyfield() -> None:
    c = Constellation.from_scenario(
        tle_scenario(DATA / "iridium_like.tle", "2026-03-20T06:00:00Z")
    )
    assert c.n_sats == 12
    assert c.names[0] == "s0-80001" and c.labels[0] == "IRIDIUM-LIKE P0 S0"
    assert (c.plane == -1).all() and (c.slot == -1).all()
    ts = load.timescale(builtin=True)
    records = read_tle_file(DATA / "iridium_like.tle")
    for t_s in (0.0, 3000.0):
        ours = c.positions_km(t_s)
        t = c.time_at(t_s)
        for i, record in enumerate(records):
            theirs = EarthSatellite(record.line1, record.line2, ts=ts).at(t)
            assert np.linalg.norm(ours[i] - theirs.frame_xyz(itrs).km) < 1e-3


def test_real_iss_tle_altitude() -> None:
    c = Constellation.from_scenario(
        tle_scenario(DATA / "iss_2019.tle", "2019-12-09T17:00:00Z")
    )
    _, _, alt = c.geodetic(0.0)
    assert 400 < alt[0] < 430  # the ISS flew at ~420 km in December 2019


def test_decayed_propagation_raises_naming_the_satellite() -> None:
    # Thirty years after its epoch the ISS element set has decayed in SGP4.
    c = Constellation.from_scenario(
        tle_scenario(DATA / "iss_2019.tle", "2049-12-09T17:00:00Z")
    )
    with pytest.raises(TleError, match="s0-25544"):
        c.positions_km(0.0)
