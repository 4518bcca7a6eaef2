"""Where every satellite and ground station is, and whether it is in sunlight.

A :class:`Constellation` turns a scenario's shells (Walker-delta,
Walker-star or a TLE file) and ground stations into node positions in the
Earth-fixed ITRS frame at any scenario time. Satellites are propagated
with SGP4 (the `sgp4` package, all satellites at once through
``SatrecArray``); Skyfield supplies the time scales, the TEME -> ITRS
rotation, the WGS84 ellipsoid and the Sun (JPL DE421 from `skyfield-data`,
so nothing is downloaded).

Caveats:

- Walker satellites are SGP4 element sets built directly from the Walker
  parameters (circular, no drag, WGS72 constants, epoch = scenario start).
  SGP4 adds J2 effects, so the geocentric radius wobbles by a few km and
  the height above the WGS84 ellipsoid varies by ~20 km with latitude;
  `altitude_km` is the mean radius minus the WGS72 equatorial radius.
- TLE satellites are only as good as their element sets: SGP4 errors grow
  by roughly 1-3 km per day away from the TLE epoch.
- Eclipse uses Skyfield's own test (the line to the Sun against a sphere
  of Earth's equatorial radius): no penumbra, no atmosphere, no oblateness.
  A ground station counts as sunlit while the Sun's centre is above its
  geometric horizon (no refraction).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
from sgp4.api import SGP4_ERRORS, WGS72, Satrec, SatrecArray
from sgp4.earth_gravity import wgs72
from skyfield.api import Loader, load, wgs84
from skyfield.framelib import itrs
from skyfield.geometry import intersect_line_and_sphere
from skyfield.positionlib import Geocentric
from skyfield.sgp4lib import TEME
from skyfield.timelib import Time
from skyfield.units import Distance

from topology.errors import ConfigError, TleError
from topology.scenario import Scenario, ShellConfig
from topology.tle import read_tle_file

log = logging.getLogger(__name__)

DAY_S = 86400.0
AU_KM = 149597870.700
SPEED_OF_LIGHT_KM_S = 299792.458

# Skyfield's own eclipse test uses this sphere (IERS 2010 equatorial radius).
EARTH_SHADOW_RADIUS_KM = 6378.1366

# SGP4 epochs count days from 1949 December 31 00:00 UTC (JD 2433281.5).
_SGP4_EPOCH_JD = 2433281.5


@dataclass(frozen=True)
class ShellLayout:
    """Where one shell's satellites sit in the node list.

    `planes`, `sats_per_plane` and `phasing` are 0 for TLE shells, whose
    plane structure is not known.
    """

    index: int
    kind: str
    first: int
    count: int
    planes: int
    sats_per_plane: int
    phasing: int


@dataclass(frozen=True)
class _Instant:
    """Everything computed once per scenario time and shared by the queries."""

    t_s: float
    time: Time
    positions_km: np.ndarray  # (N, 3) ITRS, all nodes
    teme_r_km: np.ndarray  # (n_sats, 3)
    teme_v_km_s: np.ndarray  # (n_sats, 3)
    sun_itrs_km: np.ndarray  # (3,)
    sun_teme_km: np.ndarray  # (3,)


class Constellation:
    """All nodes of a scenario: satellites first, then ground stations.

    Node ``i < n_sats`` is a satellite; its shell, plane and slot are in
    `shell`, `plane`, `slot` (plane and slot are -1 for TLE satellites).
    Satellite names are ``s{shell}-{plane}-{slot}`` for Walker shells and
    ``s{shell}-{catalog number}`` for TLE shells (the TLE title is kept in
    `labels`); ground stations keep their scenario names.

    Times are scenario seconds since `epoch` (the scenario start, UTC).
    Each query propagates at most once per distinct time: the last
    instant is cached, so ``positions_km(t)`` followed by ``sunlit(t)``
    costs one SGP4 call.
    """

    def __init__(
        self,
        epoch: datetime,
        satellites: list[Satrec],
        names: list[str],
        labels: list[str],
        shell: np.ndarray,
        plane: np.ndarray,
        slot: np.ndarray,
        layouts: list[ShellLayout],
        ground_names: list[str],
        ground_lat_deg: np.ndarray,
        ground_lon_deg: np.ndarray,
        ground_alt_m: np.ndarray,
    ) -> None:
        if epoch.tzinfo is None:
            raise ConfigError(f"constellation epoch {epoch!r} must carry a time zone")
        self.epoch = epoch.astimezone(UTC)
        self.n_sats = len(satellites)
        self.n_ground = len(ground_names)
        self.names = list(names) + list(ground_names)
        self.labels = list(labels) + list(ground_names)
        self.shell = np.asarray(shell, dtype=np.int32)
        self.plane = np.asarray(plane, dtype=np.int32)
        self.slot = np.asarray(slot, dtype=np.int32)
        self.layouts = layouts
        self.index = {name: i for i, name in enumerate(self.names)}
        if len(self.index) != len(self.names):
            dupes = sorted({n for n in self.names if self.names.count(n) > 1})
            raise ConfigError(
                f"node names {dupes} occur more than once; give every shell its "
                "own satellites and every station its own name"
            )

        self._satrecs = satellites
        self._array = SatrecArray(satellites) if satellites else None

        # Skyfield's built-in tables keep the time scale offline. The
        # skyfield-data package warns when its bundled finals2000A.all has
        # expired; we only read de421.bsp from it (valid 1900-2050).
        self._ts = load.timescale(builtin=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=RuntimeWarning)
            from skyfield_data import get_skyfield_data_path

            data_path = get_skyfield_data_path()
        ephemeris = Loader(data_path, verbose=False)("de421.bsp")
        self._sun_from_earth = ephemeris["sun"] - ephemeris["earth"]
        self.ephemeris = ephemeris

        self._t0 = self._ts.from_datetime(self.epoch)
        self._jd0_whole, self._jd0_fraction = _julian_date_utc(self.epoch)

        self.ground_lat_deg = np.asarray(ground_lat_deg, dtype=float)
        self.ground_lon_deg = np.asarray(ground_lon_deg, dtype=float)
        self.ground_alt_m = np.asarray(ground_alt_m, dtype=float)
        if self.n_ground:
            stations = wgs84.latlon(
                self.ground_lat_deg, self.ground_lon_deg, elevation_m=self.ground_alt_m
            )
            self.ground_itrs_km = np.asarray(stations.itrs_xyz.km).T.reshape(-1, 3)
        else:
            self.ground_itrs_km = np.zeros((0, 3))
        self.ground_up = _geodetic_up(self.ground_lat_deg, self.ground_lon_deg)

        self._last: _Instant | None = None

    @classmethod
    def from_scenario(cls, scenario: Scenario) -> Constellation:
        """Build every shell and ground station of `scenario`."""
        epoch = scenario.time.start()
        satellites: list[Satrec] = []
        names: list[str] = []
        labels: list[str] = []
        shell: list[int] = []
        plane: list[int] = []
        slot: list[int] = []
        layouts: list[ShellLayout] = []

        for k, config in enumerate(scenario.shells):
            first = len(satellites)
            if config.kind == "tle":
                built = _tle_shell(k, config, epoch)
                layout = ShellLayout(k, config.kind, first, len(built), 0, 0, 0)
            else:
                built = _walker_shell(k, config, epoch, first)
                layout = ShellLayout(
                    k,
                    config.kind,
                    first,
                    len(built),
                    config.planes,
                    config.sats_per_plane,
                    config.phasing,
                )
            for sat, name, label, p, s in built:
                satellites.append(sat)
                names.append(name)
                labels.append(label)
                shell.append(k)
                plane.append(p)
                slot.append(s)
            layouts.append(layout)
            log.debug("shell %d: %d satellites (%s)", k, len(built), config.kind)

        stations = scenario.ground_stations
        return cls(
            epoch,
            satellites,
            names,
            labels,
            np.array(shell, dtype=np.int32),
            np.array(plane, dtype=np.int32),
            np.array(slot, dtype=np.int32),
            layouts,
            [g.name for g in stations],
            np.array([g.lat_deg for g in stations]),
            np.array([g.lon_deg for g in stations]),
            np.array([g.alt_m for g in stations]),
        )

    @property
    def n_nodes(self) -> int:
        return self.n_sats + self.n_ground

    def datetime_at(self, t_s: float) -> datetime:
        """The UTC time `t_s` scenario seconds after the epoch."""
        return self.epoch + timedelta(seconds=float(t_s))

    def time_at(self, t_s: float) -> Time:
        """The Skyfield time `t_s` scenario seconds after the epoch."""
        return self._t0 + float(t_s) / DAY_S

    def positions_km(self, t_s: float) -> np.ndarray:
        """(N, 3) Earth-fixed ITRS positions in km, satellites then stations."""
        return self._at(t_s).positions_km

    def sun_position_km(self, t_s: float) -> np.ndarray:
        """(3,) geocentric ITRS position of the Sun in km (geometric)."""
        return self._at(t_s).sun_itrs_km

    def sunlit(self, t_s: float) -> np.ndarray:
        """(n_sats,) True where the satellite is outside Earth's shadow.

        Same test as Skyfield's ``ICRF.is_sunlit``: the satellite is in
        shadow when the line towards the Sun meets the Earth sphere in
        front of it.
        """
        instant = self._at(t_s)
        sats = instant.positions_km[: self.n_sats]
        if not self.n_sats:
            return np.zeros(0, dtype=bool)
        earth = -sats.T
        near, far = intersect_line_and_sphere(
            instant.sun_itrs_km[:, None] + earth, earth, EARTH_SHADOW_RADIUS_KM
        )
        return np.asarray(np.nan_to_num(far) <= 0)

    def ground_sunlit(self, t_s: float) -> np.ndarray:
        """(n_ground,) True where the Sun's centre is above the horizon."""
        instant = self._at(t_s)
        to_sun = instant.sun_itrs_km[None, :] - self.ground_itrs_km
        return np.asarray(np.einsum("ij,ij->i", to_sun, self.ground_up) > 0)

    def sun_beta_deg(self, t_s: float) -> np.ndarray:
        """(n_sats,) solar beta angle: the Sun's elevation above each orbit plane.

        Computed from the osculating orbit normal (r x v in TEME) and the
        Sun's direction in the same frame; positive when the Sun is on the
        side of the orbit normal.
        """
        instant = self._at(t_s)
        normal = np.cross(instant.teme_r_km, instant.teme_v_km_s)
        normal /= np.linalg.norm(normal, axis=1, keepdims=True)
        sun = instant.sun_teme_km / np.linalg.norm(instant.sun_teme_km)
        return np.degrees(np.arcsin(np.clip(normal @ sun, -1.0, 1.0)))

    def geodetic(self, t_s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """WGS84 latitude (deg), longitude (deg) and height (km) of all nodes."""
        instant = self._at(t_s)
        itrs_to_gcrs = itrs.rotation_at(instant.time).T
        gcrs_au = itrs_to_gcrs @ (instant.positions_km.T / AU_KM)
        position = Geocentric(gcrs_au, t=instant.time, center=399)
        place = wgs84.geographic_position_of(position)
        height: Distance = place.elevation
        return (
            np.asarray(place.latitude.degrees),
            np.asarray(place.longitude.degrees),
            np.asarray(height.km),
        )

    def _at(self, t_s: float) -> _Instant:
        t_s = float(t_s)
        if self._last is not None and self._last.t_s == t_s:
            return self._last

        time = self.time_at(t_s)
        teme_to_gcrs = TEME.rotation_at(time).T
        gcrs_to_itrs = itrs.rotation_at(time)
        teme_to_itrs = gcrs_to_itrs @ teme_to_gcrs

        r_km, v_km_s = self._propagate(t_s)
        positions = np.empty((self.n_nodes, 3))
        positions[: self.n_sats] = r_km @ teme_to_itrs.T
        positions[self.n_sats :] = self.ground_itrs_km

        sun_gcrs_km = self._sun_from_earth.at(time).xyz.km
        instant = _Instant(
            t_s=t_s,
            time=time,
            positions_km=positions,
            teme_r_km=r_km,
            teme_v_km_s=v_km_s,
            sun_itrs_km=gcrs_to_itrs @ sun_gcrs_km,
            sun_teme_km=teme_to_gcrs.T @ sun_gcrs_km,
        )
        self._last = instant
        return instant

    def _propagate(self, t_s: float) -> tuple[np.ndarray, np.ndarray]:
        """TEME position (km) and velocity (km/s) of every satellite."""
        if self._array is None:
            return np.zeros((0, 3)), np.zeros((0, 3))
        jd = np.array([float(self._jd0_whole)])
        fraction = np.array([self._jd0_fraction + t_s / DAY_S])
        error, r, v = self._array.sgp4(jd, fraction)
        if error.any():
            bad = np.flatnonzero(error[:, 0])
            first = int(bad[0])
            raise TleError(
                f"SGP4 cannot propagate {len(bad)} satellite(s) to t={t_s:g} s "
                f"({self.datetime_at(t_s).isoformat()}), e.g. {self.names[first]}: "
                f"{SGP4_ERRORS[int(error[first, 0])]}; use element sets whose "
                "epoch is near the scenario start"
            )
        return r[:, 0, :], v[:, 0, :]


def mean_motion_rad_min(altitude_km: float) -> float:
    """Kepler mean motion (rad/min) of a circular orbit, WGS72 constants."""
    a_km = wgs72.radiusearthkm + altitude_km
    return math.sqrt(wgs72.mu / a_km**3) * 60.0


def period_s(altitude_km: float) -> float:
    """Kepler period of a circular orbit at `altitude_km` (WGS72 constants)."""
    return 2 * math.pi * 60.0 / mean_motion_rad_min(altitude_km)


def walker_elements(config: ShellConfig) -> tuple[np.ndarray, np.ndarray]:
    """RAAN and mean anomaly (degrees) of every slot, shape (planes, sats).

    Walker delta i:T/P/F spreads the P ascending nodes over 360 deg, Walker
    star over 180 deg (so planes 0 and P-1 are neighbours that move in
    opposite directions: the seam). Satellites in a plane are 360/S apart;
    plane p is advanced by p * F * 360 / T.
    """
    planes, per_plane = config.planes, config.sats_per_plane
    total = planes * per_plane
    spread_deg = 360.0 if config.kind == "walker-delta" else 180.0
    p = np.arange(planes)[:, None]
    s = np.arange(per_plane)[None, :]
    raan = (config.raan_offset_deg + spread_deg * p / planes) % 360.0
    anomaly = (360.0 * s / per_plane + 360.0 * config.phasing * p / total) % 360.0
    return np.broadcast_to(raan, (planes, per_plane)), anomaly


def _walker_shell(
    k: int, config: ShellConfig, epoch: datetime, first_satnum: int
) -> list[tuple[Satrec, str, str, int, int]]:
    raan_deg, anomaly_deg = walker_elements(config)
    no_kozai = mean_motion_rad_min(config.altitude_km)
    whole, fraction = _julian_date_utc(epoch)
    epoch_days = (whole - _SGP4_EPOCH_JD) + fraction
    built = []
    for p in range(config.planes):
        for s in range(config.sats_per_plane):
            sat = Satrec()
            sat.sgp4init(
                WGS72,
                "i",
                (first_satnum + p * config.sats_per_plane + s) % 100000,
                epoch_days,
                0.0,  # bstar: no drag
                0.0,  # ndot
                0.0,  # nddot
                0.0,  # eccentricity: circular
                0.0,  # argument of perigee
                math.radians(config.inclination_deg),
                math.radians(anomaly_deg[p, s]),
                no_kozai,
                math.radians(raan_deg[p, s]),
            )
            name = f"s{k}-{p}-{s}"
            built.append((sat, name, name, p, s))
    return built


def _tle_shell(
    k: int, config: ShellConfig, epoch: datetime
) -> list[tuple[Satrec, str, str, int, int]]:
    assert config.tle_file is not None
    records = read_tle_file(config.tle_file)
    built = []
    for record in records:
        sat = Satrec.twoline2rv(record.line1, record.line2, WGS72)
        whole, fraction = _julian_date_utc(epoch)
        age_days = abs((whole - sat.jdsatepoch) + (fraction - sat.jdsatepochF))
        if age_days > 14:
            log.warning(
                "%s (%s): TLE epoch is %.0f days from the scenario start; "
                "positions may be off by tens of km",
                record.title or record.catalog_number,
                config.tle_file,
                age_days,
            )
        name = f"s{k}-{record.catalog_number}"
        built.append((sat, name, record.title or name, -1, -1))
    return built


def _julian_date_utc(when: datetime) -> tuple[float, float]:
    """Julian date of an aware datetime in UTC, as (whole days, fraction).

    Kept in two parts so sub-millisecond precision survives; SGP4 counts
    its epochs and times in UTC.
    """
    since_midnight = when.astimezone(UTC) - datetime(2000, 1, 1, tzinfo=UTC)
    fraction = (since_midnight.seconds + since_midnight.microseconds / 1e6) / DAY_S
    return 2451544.5 + since_midnight.days, fraction


def _geodetic_up(lat_deg: np.ndarray, lon_deg: np.ndarray) -> np.ndarray:
    """(n, 3) unit vectors normal to the WGS84 ellipsoid (local vertical)."""
    lat = np.radians(lat_deg)
    lon = np.radians(lon_deg)
    return np.stack(
        [np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=-1
    ).reshape(-1, 3)
