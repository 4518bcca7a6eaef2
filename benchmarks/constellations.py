"""The constellations the benchmarks measure, defined once.

An Iridium-like 6x11 Walker star (66), a 20x20 Walker delta (400) and
Starlink shell 1 (72x22 = 1,584 at 550 km, 53 deg, phasing 39), plus
three mid-latitude stations (the 53 deg shell never rises 25 deg above
the default scenario's Arctic sites).
"""

from __future__ import annotations

SHELLS_BY_SIZE: dict[int, dict[str, object]] = {
    66: {
        "kind": "walker-star",
        "planes": 6,
        "sats_per_plane": 11,
        "phasing": 2,
        "altitude_km": 780,
        "inclination_deg": 86.4,
    },
    400: {
        "kind": "walker-delta",
        "planes": 20,
        "sats_per_plane": 20,
        "phasing": 1,
        "altitude_km": 600,
        "inclination_deg": 60.0,
    },
    1584: {
        "kind": "walker-delta",
        "planes": 72,
        "sats_per_plane": 22,
        "phasing": 39,
        "altitude_km": 550,
        "inclination_deg": 53.0,
    },
}

LABELS = {
    66: "iridium-like 6x11",
    400: "walker-delta 20x20",
    1584: "starlink shell 1 72x22",
}

MID_LATITUDE_STATIONS = [
    {"name": "madrid", "lat_deg": 40.42, "lon_deg": -3.70, "alt_m": 650},
    {"name": "denver", "lat_deg": 39.74, "lon_deg": -104.99, "alt_m": 1600},
    {"name": "tokyo", "lat_deg": 35.68, "lon_deg": 139.69, "alt_m": 40},
]
