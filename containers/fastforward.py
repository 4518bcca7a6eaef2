"""Run the power model over days of scenario time, faster than real time.

:func:`fast_forward` steps a :class:`~containers.power.PowerModel` for every
satellite of a scenario through its real orbits (sunlight, beta angle and
altitude from :class:`topology.orbits.Constellation`) under a chosen compute
load, and returns downsampled time series, daily extremes and the final
battery ageing. It backs ``spacemoe power --days N``.

Geometry is sampled in chunks of `chunk_steps` timesteps before the power
model runs over the chunk, so a faster, time-vectorised geometry source can
be dropped in without touching the loop. With the SGP4/Skyfield
constellation one geometry query costs ~0.5 ms, which sets the speed
(about 1 day of scenario time per wall second at 30 s steps).

The step must resolve eclipse entry and exit: 30 s (the default) puts at
most 30 s of an orbit's ~35 min shadow on the wrong side.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from containers.power import (
    EARTH_RADIUS_KM,
    PowerConfig,
    PowerModel,
    array_sun_cos,
    eclipse_fraction,
    load_power_config,
)
from topology.errors import ConfigError
from topology.scenario import Scenario

log = logging.getLogger(__name__)

DAY_S = 86400.0

# Load profile: one busy fraction for all, one per satellite, or a function
# of scenario time returning one per satellite.
Load = float | np.ndarray | Callable[[float], np.ndarray]


class SunGeometry(Protocol):
    """What fast-forward needs from the orbits (Constellation satisfies it)."""

    n_sats: int

    def sunlit(self, t_s: float) -> np.ndarray: ...

    def positions_km(self, t_s: float) -> np.ndarray: ...

    def sun_position_km(self, t_s: float) -> np.ndarray: ...

    def sun_beta_deg(self, t_s: float) -> np.ndarray: ...


@dataclass
class FastForwardResult:
    """Time series (rows: recorded instants, columns: satellites) and totals.

    Series are float32, recorded every `record_s`; the `daily_*` arrays
    hold each scenario day's extremes at full step resolution. Energies in
    `counters` are Wh per satellite over the whole run.
    """

    names: list[str]
    step_s: float
    days: float
    record_s: float
    times_s: np.ndarray
    sunlit: np.ndarray
    soc_fraction: np.ndarray
    temperature_c: np.ndarray
    compute_temperature_c: np.ndarray
    solar_w: np.ndarray
    load_w: np.ndarray
    battery_w: np.ndarray
    throttle_factor: np.ndarray
    daily_soc_min: np.ndarray
    daily_soc_max: np.ndarray
    daily_temperature_min_c: np.ndarray
    daily_temperature_max_c: np.ndarray
    capacity_fade_fraction: np.ndarray
    calendar_fade_fraction: np.ndarray
    cycle_fade_fraction: np.ndarray
    projected_fade_per_year: np.ndarray
    mean_cycle_depth: np.ndarray
    max_cycle_depth: np.ndarray
    cycle_count: np.ndarray
    counters: dict[str, np.ndarray]
    wall_s: float
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def days_per_wall_s(self) -> float:
        return self.days / self.wall_s if self.wall_s > 0 else math.inf

    def save(self, directory: str | Path) -> Path:
        """Write ``power.npz`` (all arrays) and ``power.json`` (summary, config).

        Returns the directory. The JSON holds the effective power
        configuration, so the run can be repeated.
        """
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        arrays = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if isinstance(getattr(self, f.name), np.ndarray)
        }
        arrays.update({f"counters_{k}": v for k, v in self.counters.items()})
        np.savez_compressed(path / "power.npz", **arrays)
        meta = {"summary": self.summary(), "names": self.names, "config": self.config}
        (path / "power.json").write_text(json.dumps(meta, indent=1) + "\n")
        return path

    def summary(self) -> dict[str, Any]:
        """Plain figures over all satellites (min / median / max)."""

        def spread(a: np.ndarray) -> dict[str, float]:
            return {
                "min": float(np.min(a)),
                "median": float(np.median(a)),
                "max": float(np.max(a)),
            }

        return {
            "satellites": len(self.names),
            "days": self.days,
            "step_s": self.step_s,
            "wall_s": round(self.wall_s, 3),
            "days_per_wall_s": round(self.days_per_wall_s, 3),
            "soc_min_fraction": spread(self.daily_soc_min.min(axis=0)),
            "soc_max_fraction": spread(self.daily_soc_max.max(axis=0)),
            "mean_cycle_depth_fraction": spread(self.mean_cycle_depth),
            "max_cycle_depth_fraction": spread(self.max_cycle_depth),
            "temperature_min_c": spread(self.daily_temperature_min_c.min(axis=0)),
            "temperature_max_c": spread(self.daily_temperature_max_c.max(axis=0)),
            "compute_temperature_max_c": spread(self.compute_temperature_c.max(axis=0)),
            "throttle_factor_min": spread(self.throttle_factor.min(axis=0)),
            "shed_wh": spread(self.counters["shed_wh"]),
            "capacity_fade_fraction": spread(self.capacity_fade_fraction),
            "projected_fade_per_year": spread(self.projected_fade_per_year),
        }


def fast_forward(
    scenario: Scenario,
    days: float,
    step_s: float = 30.0,
    load: Load = 0.5,
    *,
    isl_bps: float | np.ndarray = 0.0,
    config: PowerConfig | None = None,
    geometry: SunGeometry | None = None,
    max_records: int = 5000,
    chunk_steps: int = 256,
    settle: bool = True,
) -> FastForwardResult:
    """Step the power model of every satellite for `days` of scenario time.

    `load` is the accelerator busy fraction (see `Load`); `isl_bps` the
    traffic each satellite sends (and receives) over its ISLs. `config`
    defaults to the scenario's ``power`` section, `geometry` to the
    scenario's constellation. With `settle`, temperatures start at the
    equilibrium of the first orbit's average heat input.
    """
    if not days > 0:
        raise ConfigError(f"days: got {days!r}; give a positive number of days")
    if not 0 < step_s <= 600:
        raise ConfigError(
            f"step_s: got {step_s!r}; use 0 < step_s <= 600 so eclipses are resolved"
        )
    config = config or load_power_config(scenario.power)
    if geometry is None:
        from topology.orbits import Constellation

        geometry = Constellation.from_scenario(scenario)
    n = geometry.n_sats
    if n == 0:
        raise ConfigError("the scenario has no satellites to fast-forward")
    names = list(getattr(geometry, "names", [f"sat{i}" for i in range(n)]))[:n]
    busy_at = _load_function(load, n)
    bits_per_step = np.broadcast_to(np.asarray(isl_bps, float) * step_s, (n,))

    steps = max(1, round(days * DAY_S / step_s))
    record_every = max(1, math.ceil(steps / max_records))
    n_records = math.ceil(steps / record_every)
    n_days = max(1, math.ceil(steps * step_s / DAY_S))
    rec = _Recorder(n_records, n, n_days)
    model = PowerModel(config, n, names=names)

    if settle:
        altitude = _altitude_km(geometry, 0.0)
        lit_fraction = 1.0 - eclipse_fraction(altitude, geometry.sun_beta_deg(0.0))
        model.settle_temperature(lit_fraction, busy_at(0.0), altitude)

    log.info(
        "fast-forward: %d satellites, %.2f days in %d steps of %.0f s",
        n,
        days,
        steps,
        step_s,
    )
    wall0 = time.perf_counter()
    for first in range(0, steps, chunk_steps):
        times = (np.arange(first, min(first + chunk_steps, steps)) * step_s).astype(
            float
        )
        sunlit, sun_cos, altitude = _sample_geometry(geometry, times, config)
        for j, t_s in enumerate(times):
            out = model.step(
                step_s,
                sunlit[j],
                sun_cos[j],
                busy_at(float(t_s)),
                bits_per_step,
                bits_per_step,
                altitude[j],
            )
            index = first + j
            rec.day(int((t_s + step_s) // DAY_S), out.soc_fraction, out.temperature_c)
            if index % record_every == 0:
                rec.row(t_s + step_s, sunlit[j], out)
    model.flush_ageing()
    wall_s = time.perf_counter() - wall0

    result = FastForwardResult(
        names=names,
        step_s=step_s,
        days=steps * step_s / DAY_S,
        record_s=record_every * step_s,
        **rec.arrays(),
        capacity_fade_fraction=model.capacity_fade_fraction,
        calendar_fade_fraction=model.ageing.calendar_fade_fraction(),
        cycle_fade_fraction=model.ageing.cycle_fade_fraction(),
        projected_fade_per_year=model.projected_fade_fraction(1.0),
        mean_cycle_depth=model.ageing.mean_cycle_depth(),
        max_cycle_depth=model.ageing.max_cycle_depth.copy(),
        cycle_count=model.ageing.cycle_count.copy(),
        counters=model.counters,
        wall_s=wall_s,
        config=_config_dict(config),
    )
    log.info(
        "fast-forward done: %.2f days in %.1f s wall (%.2f days/s)",
        result.days,
        wall_s,
        result.days_per_wall_s,
    )
    return result


def _load_function(load: Load, n: int) -> Callable[[float], np.ndarray]:
    if callable(load):
        return lambda t_s: np.asarray(load(t_s), dtype=float)
    fixed = np.broadcast_to(np.asarray(load, dtype=float), (n,)).copy()
    if not ((fixed >= 0) & (fixed <= 1)).all():
        raise ConfigError(f"load: busy fractions must lie in [0, 1], got {load!r}")
    return lambda t_s: fixed


def _altitude_km(geometry: SunGeometry, t_s: float) -> np.ndarray:
    sats = geometry.positions_km(t_s)[: geometry.n_sats]
    return np.asarray(np.linalg.norm(sats, axis=1) - EARTH_RADIUS_KM)


def _sample_geometry(
    geometry: SunGeometry, times: np.ndarray, config: PowerConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sunlight, array cos(theta) and altitude at each time, shape (T, S)."""
    n = geometry.n_sats
    sunlit = np.empty((len(times), n), dtype=bool)
    sun_cos = np.ones((len(times), n))
    altitude = np.empty((len(times), n))
    for j, t_s in enumerate(times):
        t = float(t_s)
        sunlit[j] = geometry.sunlit(t)
        sats = geometry.positions_km(t)[:n]
        radius = np.linalg.norm(sats, axis=1)
        altitude[j] = radius - EARTH_RADIUS_KM
        if config.tracking == "single-axis":
            sun_cos[j] = array_sun_cos("single-axis", beta_deg=geometry.sun_beta_deg(t))
        elif config.tracking == "body-mounted":
            sun = geometry.sun_position_km(t)
            zenith_cos = (sats @ sun) / (radius * np.linalg.norm(sun))
            sun_cos[j] = array_sun_cos("body-mounted", sun_zenith_cos=zenith_cos)
    return sunlit, sun_cos, altitude


def _config_dict(config: PowerConfig) -> dict[str, Any]:
    from topology.config import to_dict

    data: dict[str, Any] = to_dict(config)
    return data


class _Recorder:
    """Preallocated float32 series and per-day extremes."""

    def __init__(self, rows: int, n: int, n_days: int) -> None:
        self.i = 0
        self.times_s = np.empty(rows)
        self.series = {
            name: np.empty((rows, n), dtype=np.float32)
            for name in (
                "soc_fraction",
                "temperature_c",
                "compute_temperature_c",
                "solar_w",
                "load_w",
                "battery_w",
                "throttle_factor",
            )
        }
        self.sunlit = np.empty((rows, n), dtype=bool)
        self.soc_min = np.full((n_days, n), np.inf)
        self.soc_max = np.full((n_days, n), -np.inf)
        self.temp_min = np.full((n_days, n), np.inf)
        self.temp_max = np.full((n_days, n), -np.inf)

    def row(self, t_s: float, sunlit: np.ndarray, out: Any) -> None:
        i = self.i
        self.times_s[i] = t_s
        self.sunlit[i] = sunlit
        for name, array in self.series.items():
            array[i] = getattr(out, name)
        self.i = i + 1

    def day(self, d: int, soc: np.ndarray, temp_c: np.ndarray) -> None:
        d = min(d, len(self.soc_min) - 1)
        np.minimum(self.soc_min[d], soc, out=self.soc_min[d])
        np.maximum(self.soc_max[d], soc, out=self.soc_max[d])
        np.minimum(self.temp_min[d], temp_c, out=self.temp_min[d])
        np.maximum(self.temp_max[d], temp_c, out=self.temp_max[d])

    def arrays(self) -> dict[str, Any]:
        k = self.i
        return {
            "times_s": self.times_s[:k],
            "sunlit": self.sunlit[:k],
            **{name: array[:k] for name, array in self.series.items()},
            "daily_soc_min": self.soc_min,
            "daily_soc_max": self.soc_max,
            "daily_temperature_min_c": self.temp_min,
            "daily_temperature_max_c": self.temp_max,
        }
