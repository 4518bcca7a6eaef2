"""Which links exist at each timestep, how long they are and what they carry.

:class:`Geometry` is the per-step view the emulator consumes: node
positions, sunlight, and a :class:`LinkState` listing every inter-satellite
link (ISL) candidate and the current ground-satellite links (GSLs).

ISLs follow the +Grid pattern, built once per Walker shell:

- intra-plane: slot s to slot s+1 (mod S) in the same plane, a ring;
- inter-plane: slot s of plane p to slot s of plane p+1. In a Walker-delta
  shell the last plane also links to plane 0, with the slot shifted by the
  phasing F: plane P would be plane 0 advanced by P*F*360/T = F slots, so
  the shifted pair is the image of every other inter-plane pair under the
  constellation's symmetry and has the same length.
- the seam: in a Walker-star shell planes 0 and P-1 are neighbours that move
  in opposite directions. Their same-slot pairs are kept as candidates but
  are only up when ``isl.cross_seam`` is set (they then come and go quickly
  as the planes pass each other).

Every candidate is always present in `LinkState` (its identity is the node
pair); ``up`` is False while the pair is beyond ``max_range_km``, the line
between them passes lower than ``grazing_altitude_km`` above a spherical
Earth of equatorial radius, an inter-plane endpoint is above
``max_latitude_deg`` (geodetic), or the pair crosses the seam without
``cross_seam``. TLE shells have no known plane structure and get no ISLs;
there are no links between shells.

GSLs: one per ground station, to a satellite at least ``min_elevation_deg``
above its horizon. ``nearest`` takes the closest visible satellite every
step; ``sticky`` keeps the current satellite until it drops below the
minimum elevation, then takes the nearest. A satellite may serve several
stations. Only current GSLs appear in `LinkState` (all up); a station with
no satellite in view has none.

Delay is range / c (vacuum); rate and loss come from the scenario per link
type and do not vary with range (no link budget).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from topology.orbits import SPEED_OF_LIGHT_KM_S, Constellation, ShellLayout
from topology.scenario import GslConfig, IslConfig, Scenario

log = logging.getLogger(__name__)

ISL = 0
GSL = 1

# Line-of-sight sphere for ISLs: WGS84 equatorial radius, the conservative
# choice (the polar radius is 21 km smaller).
EARTH_RADIUS_KM = 6378.137


@dataclass(frozen=True)
class LinkState:
    """Arrays over the links present at one step; link i joins a[i] < b[i]."""

    a: np.ndarray  # int32 node index
    b: np.ndarray  # int32 node index
    kind: np.ndarray  # int8: ISL = 0, GSL = 1
    up: np.ndarray  # bool
    range_km: np.ndarray
    delay_s: np.ndarray
    rate_bps: np.ndarray
    loss_fraction: np.ndarray

    def __len__(self) -> int:
        return len(self.a)


@dataclass(frozen=True)
class GeometryState:
    """Everything geometric about one timestep."""

    t_s: float
    when: datetime
    positions_km: np.ndarray  # (N, 3) ITRS
    lat_deg: np.ndarray  # (N,) geodetic WGS84
    lon_deg: np.ndarray
    alt_km: np.ndarray
    sunlit: np.ndarray  # (N,) bool; stations: Sun above the horizon
    links: LinkState


@dataclass(frozen=True)
class IslCandidates:
    """The fixed +Grid pairs of a constellation (a < b)."""

    a: np.ndarray
    b: np.ndarray
    inter_plane: np.ndarray  # bool
    seam: np.ndarray  # bool: joins counter-rotating planes

    def __len__(self) -> int:
        return len(self.a)


def grid_candidates(constellation: Constellation) -> IslCandidates:
    """Every +Grid ISL pair of every Walker shell (see the module notes)."""
    built = [_shell_grid(layout) for layout in constellation.layouts]
    parts = [p for p in built if p is not None]
    if not parts:
        return grid_candidates_empty()
    a = np.concatenate([p[0] for p in parts])
    b = np.concatenate([p[1] for p in parts])
    inter = np.concatenate([p[2] for p in parts])
    seam = np.concatenate([p[3] for p in parts])

    # Small shells (2 slots, 2 planes) produce the same pair twice.
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    keep = lo != hi
    pairs = np.stack([lo[keep], hi[keep]], axis=1)
    _, first = np.unique(pairs, axis=0, return_index=True)
    first = np.sort(first)
    return IslCandidates(
        pairs[first, 0].astype(np.int32),
        pairs[first, 1].astype(np.int32),
        inter[keep][first],
        seam[keep][first],
    )


def _shell_grid(
    layout: ShellLayout,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    if layout.kind == "tle":
        log.info(
            "shell %d comes from a TLE file: no plane structure, so no ISLs",
            layout.index,
        )
        return None
    planes, per_plane = layout.planes, layout.sats_per_plane
    node = layout.first + np.arange(planes * per_plane).reshape(planes, per_plane)

    intra_a = node.ravel()
    intra_b = np.roll(node, -1, axis=1).ravel()
    if per_plane < 2:
        intra_a = intra_b = np.zeros(0, dtype=np.int64)

    inter_a = node[:-1].ravel()
    inter_b = node[1:].ravel()
    seam_a = seam_b = np.zeros(0, dtype=np.int64)
    if planes >= 2 and layout.kind == "walker-delta":
        # Plane P is plane 0 advanced by F slots (see the module notes).
        wrap = np.roll(node[0], -layout.phasing)
        inter_a = np.concatenate([inter_a, node[-1]])
        inter_b = np.concatenate([inter_b, wrap])
    elif planes >= 2:
        seam_a, seam_b = node[-1], node[0]

    a = np.concatenate([intra_a, inter_a, seam_a])
    b = np.concatenate([intra_b, inter_b, seam_b])
    inter = np.concatenate(
        [np.zeros(len(intra_a), bool), np.ones(len(inter_a) + len(seam_a), bool)]
    )
    seam = np.concatenate(
        [np.zeros(len(intra_a) + len(inter_a), bool), np.ones(len(seam_a), bool)]
    )
    return a, b, inter, seam


def line_clearance_km(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Smallest distance from Earth's centre to each segment p[i]-q[i], in km."""
    d = q - p
    dd = np.einsum("ij,ij->i", d, d)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.clip(-np.einsum("ij,ij->i", p, d) / dd, 0.0, 1.0)
    t = np.nan_to_num(t)
    closest = p + t[:, None] * d
    return np.asarray(np.linalg.norm(closest, axis=1))


def elevation_deg(
    station_km: np.ndarray, up: np.ndarray, target_km: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Elevation (deg) and range (km) of every target from every station.

    `station_km` (G, 3), `up` (G, 3) unit local verticals, `target_km`
    (S, 3); returns two (G, S) arrays. Elevation is geometric (no
    refraction) above the plane normal to the WGS84 vertical.
    """
    rel = target_km[None, :, :] - station_km[:, None, :]
    range_km = np.linalg.norm(rel, axis=2)
    sin_el = np.einsum("gsk,gk->gs", rel, up) / np.maximum(range_km, 1e-9)
    return np.degrees(np.arcsin(np.clip(sin_el, -1.0, 1.0))), range_km


class GslTracker:
    """Chooses each ground station's satellite, step by step (see module notes)."""

    def __init__(self, constellation: Constellation, config: GslConfig) -> None:
        self.constellation = constellation
        self.config = config
        self.current = np.full(constellation.n_ground, -1, dtype=np.int64)

    def step(
        self, positions_km: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Station node indices, satellite indices and ranges (km) of the GSLs."""
        c = self.constellation
        if not c.n_ground or not c.n_sats:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, np.zeros(0)
        elevation, range_km = elevation_deg(
            c.ground_itrs_km, c.ground_up, positions_km[: c.n_sats]
        )
        visible = elevation >= self.config.min_elevation_deg
        masked = np.where(visible, range_km, np.inf)
        nearest = np.argmin(masked, axis=1)
        any_visible = visible.any(axis=1)
        chosen = np.where(any_visible, nearest, -1)

        if self.config.handover == "sticky":
            stations = np.arange(c.n_ground)
            held = self.current >= 0
            still = np.zeros(c.n_ground, dtype=bool)
            still[held] = visible[stations[held], self.current[held]]
            chosen = np.where(still, self.current, chosen)

        changed = np.flatnonzero(chosen != self.current)
        for g in changed:
            log.info(
                "ground station %s hands over from %s to %s",
                c.names[c.n_sats + g],
                c.names[self.current[g]] if self.current[g] >= 0 else "none",
                c.names[chosen[g]] if chosen[g] >= 0 else "none",
            )
        self.current = chosen

        served = np.flatnonzero(chosen >= 0)
        sats = chosen[served]
        return c.n_sats + served, sats, range_km[served, sats]


class Geometry:
    """Positions, sunlight and links of a scenario, one timestep at a time.

    `step` is stateful (sticky handover remembers each station's
    satellite); call it with increasing times. Nothing here needs root.
    """

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.constellation = Constellation.from_scenario(scenario)
        self.isl_config: IslConfig = scenario.isl
        self.gsl_config: GslConfig = scenario.gsl
        if scenario.isl.enabled:
            self.candidates = grid_candidates(self.constellation)
        else:
            self.candidates = grid_candidates_empty()
        self.tracker = GslTracker(self.constellation, scenario.gsl)
        self._last_t_s: float | None = None
        log.info(
            "geometry: %d satellites, %d ground stations, %d ISL candidates",
            self.constellation.n_sats,
            self.constellation.n_ground,
            len(self.candidates),
        )

    @property
    def names(self) -> list[str]:
        return self.constellation.names

    def step(self, t_s: float) -> GeometryState:
        """The geometry `t_s` scenario seconds after the epoch."""
        if self._last_t_s is not None and t_s < self._last_t_s:
            log.debug("geometry stepped back from %s to %s s", self._last_t_s, t_s)
        self._last_t_s = t_s
        c = self.constellation

        positions = c.positions_km(t_s)
        lat, lon, alt = c.geodetic(t_s)
        sunlit = np.concatenate([c.sunlit(t_s), c.ground_sunlit(t_s)])

        isl = self._isl_state(positions, lat)
        gsl_a, gsl_b, gsl_range = self.tracker.step(positions)
        a = np.concatenate([isl[0], np.minimum(gsl_a, gsl_b)]).astype(np.int32)
        b = np.concatenate([isl[1], np.maximum(gsl_a, gsl_b)]).astype(np.int32)
        n_isl, n_gsl = len(isl[0]), len(gsl_a)
        range_km = np.concatenate([isl[2], gsl_range])
        links = LinkState(
            a=a,
            b=b,
            kind=np.concatenate(
                [np.full(n_isl, ISL, np.int8), np.full(n_gsl, GSL, np.int8)]
            ),
            up=np.concatenate([isl[3], np.ones(n_gsl, dtype=bool)]),
            range_km=range_km,
            delay_s=range_km / SPEED_OF_LIGHT_KM_S,
            rate_bps=np.concatenate(
                [
                    np.full(n_isl, self.isl_config.rate_bps),
                    np.full(n_gsl, self.gsl_config.rate_bps),
                ]
            ),
            loss_fraction=np.concatenate(
                [
                    np.full(n_isl, self.isl_config.loss_fraction),
                    np.full(n_gsl, self.gsl_config.loss_fraction),
                ]
            ),
        )
        return GeometryState(
            t_s=float(t_s),
            when=c.datetime_at(t_s),
            positions_km=positions,
            lat_deg=lat,
            lon_deg=lon,
            alt_km=alt,
            sunlit=sunlit,
            links=links,
        )

    def _isl_state(
        self, positions: np.ndarray, lat_deg: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        cand = self.candidates
        config = self.isl_config
        p, q = positions[cand.a], positions[cand.b]
        range_km = np.linalg.norm(q - p, axis=1)
        clearance = line_clearance_km(p, q)
        up = (range_km <= config.max_range_km) & (
            clearance >= EARTH_RADIUS_KM + config.grazing_altitude_km
        )
        if config.max_latitude_deg is not None:
            polar = (np.abs(lat_deg[cand.a]) > config.max_latitude_deg) | (
                np.abs(lat_deg[cand.b]) > config.max_latitude_deg
            )
            up &= ~(cand.inter_plane & polar)
        if not config.cross_seam:
            up &= ~cand.seam
        return cand.a, cand.b, range_km, up


def grid_candidates_empty() -> IslCandidates:
    """No ISLs (``isl.enabled: false``)."""
    empty = np.zeros(0, dtype=np.int32)
    return IslCandidates(empty, empty, empty.astype(bool), empty.astype(bool))
