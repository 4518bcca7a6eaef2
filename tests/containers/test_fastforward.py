"""Fast-forward over scenario days: shapes, records, inputs, real orbits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from containers.fastforward import fast_forward
from containers.power import PowerConfig
from tests.containers.circular_orbit import CircularOrbit
from topology.errors import ConfigError
from topology.scenario import Scenario, load_scenario


def test_result_shapes_records_and_daily_extremes() -> None:
    orbit = CircularOrbit(n_sats=3, beta_deg=np.array([0.0, 40.0, 80.0]))
    result = fast_forward(
        Scenario(), 1.5, step_s=60.0, load=0.5, geometry=orbit, max_records=500
    )
    assert result.names == ["c0", "c1", "c2"]
    assert result.days == pytest.approx(1.5)
    assert result.soc_fraction.shape == (len(result.times_s), 3)
    assert 250 <= len(result.times_s) <= 500
    assert result.record_s == pytest.approx(60.0 * 5)
    assert result.daily_soc_min.shape == (2, 3)
    assert (result.daily_soc_min <= result.daily_soc_max).all()
    # Records are snapshots: the daily extremes at full resolution bound them.
    assert result.soc_fraction.min() >= result.daily_soc_min.min() - 1e-6
    # Deeper shadow, deeper discharge: beta 0 > beta 40 > beta 80 (no eclipse).
    depth = result.max_cycle_depth
    assert depth[0] > depth[1] > depth[2] == 0.0
    summary = result.summary()
    assert summary["satellites"] == 3
    assert summary["days_per_wall_s"] > 0
    assert summary["capacity_fade_fraction"]["max"] > 0
    assert result.config["battery_capacity_wh"] == 450.0


def test_results_are_saved_with_their_config(tmp_path: Path) -> None:
    result = fast_forward(Scenario(), 0.05, geometry=CircularOrbit(n_sats=2))
    result.save(tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "power.json").read_text())
    assert meta["names"] == ["c0", "c1"]
    assert meta["config"]["bus_w"] == 80.0
    assert meta["summary"]["satellites"] == 2
    with np.load(tmp_path / "out" / "power.npz") as data:
        assert data["soc_fraction"].shape == result.soc_fraction.shape
        assert data["counters_load_wh"].shape == (2,)


def test_load_profile_may_vary_in_time() -> None:
    orbit = CircularOrbit(n_sats=2)
    period = orbit.period_s

    def busy(t_s: float) -> np.ndarray:
        # Satellite 0 works only in its second orbit.
        return np.array([1.0 if period < t_s < 2 * period else 0.0, 0.0])

    result = fast_forward(Scenario(), 3 * period / 86400, load=busy, geometry=orbit)
    work = result.load_w[:, 0] - result.load_w[:, 1]
    t = result.times_s
    assert work[(t > period + 60) & (t < 2 * period - 60)].min() > 40
    assert abs(work[t > 2 * period + 60]).max() < 1e-3


def test_isl_traffic_costs_energy() -> None:
    orbit = CircularOrbit(n_sats=2)
    result = fast_forward(
        Scenario(), 0.1, isl_bps=np.array([10e9, 0.0]), geometry=orbit
    )
    # 10 Gbit/s each way: 5 nJ/bit out + 1 nJ/bit in = 60 W more.
    extra = result.counters["radio_wh"][0] - result.counters["radio_wh"][1]
    assert extra == pytest.approx(60.0 * 0.1 * 24, rel=1e-6)


def test_single_axis_array_gives_cos_beta() -> None:
    orbit = CircularOrbit(n_sats=1, beta_deg=60.0)
    two = fast_forward(Scenario(), 0.1, load=0.0, geometry=orbit)
    one = fast_forward(
        Scenario(),
        0.1,
        load=0.0,
        geometry=orbit,
        config=PowerConfig(tracking="single-axis"),
    )
    a = two.counters["solar_available_wh"][0]
    assert one.counters["solar_available_wh"][0] == pytest.approx(a / 2, rel=1e-6)


def test_body_mounted_array_collects_less() -> None:
    orbit = CircularOrbit(n_sats=1, beta_deg=0.0)
    days = 3 * orbit.period_s / 86400
    config = PowerConfig(tracking="body-mounted")
    body = fast_forward(Scenario(), days, step_s=10.0, geometry=orbit, config=config)
    two = fast_forward(Scenario(), days, step_s=10.0, geometry=orbit)
    collected = body.counters["solar_available_wh"][0]
    ratio = collected / two.counters["solar_available_wh"][0]
    # A zenith panel sees the Sun at cos(angle) over half the sunlit arc:
    # 1/pi of a full orbit against (1 - eclipse) for a tracking array.
    assert ratio == pytest.approx((1 / np.pi) / (1 - 0.35), rel=0.01)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"days": 0.0}, "days"),
        ({"days": 1.0, "step_s": 3600.0}, "step_s"),
        ({"days": 1.0, "load": 1.5}, "load"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        fast_forward(Scenario(), geometry=CircularOrbit(), **kwargs)  # type: ignore[arg-type]


def test_bad_power_section_is_refused_before_running() -> None:
    scenario = Scenario(power={"soc_min_fraction": 0.99})
    with pytest.raises(ConfigError, match="power.soc_min_fraction"):
        fast_forward(scenario, 1.0, geometry=CircularOrbit())


def test_real_constellation_one_orbit() -> None:
    # The default scenario's SGP4 constellation: 66 satellites at 780 km.
    scenario = load_scenario()
    result = fast_forward(scenario, 101 * 60 / 86400, load=1.0)
    assert result.soc_fraction.shape[1] == 66
    assert result.names[0].startswith("s0-")
    soc = result.soc_fraction.astype(float)
    lit = result.sunlit
    falling = np.diff(soc, axis=0)[~lit[1:]]
    assert falling.size > 0 and (falling < 0).all()
    # Some planes see the Sun all orbit long at this epoch, others dive deep.
    eclipsed = (~lit).any(axis=0)
    assert eclipsed.any() and (~eclipsed).any()
    dips = 0.95 - result.daily_soc_min[0]
    assert dips[eclipsed].max() > 0.1
    assert -20 < result.temperature_c.min() and result.temperature_c.max() < 60
