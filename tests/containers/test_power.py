"""The power model makes physical sense: charge, heat, throttle, conservation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from containers.fastforward import FastForwardResult, fast_forward
from containers.power import (
    KELVIN,
    PowerConfig,
    PowerModel,
    array_sun_cos,
    eclipse_fraction,
    load_power_config,
)
from tests.containers.circular_orbit import CircularOrbit
from topology.errors import ConfigError
from topology.scenario import Scenario


def run_orbits(
    orbits: float,
    load: float | list[float] = 0.5,
    config: PowerConfig | None = None,
    geometry: CircularOrbit | None = None,
    step_s: float = 30.0,
) -> tuple[FastForwardResult, CircularOrbit]:
    n = 1 if isinstance(load, float) else len(load)
    geometry = geometry or CircularOrbit(n_sats=n)
    result = fast_forward(
        Scenario(),
        orbits * geometry.period_s / 86400.0,
        step_s=step_s,
        load=np.asarray(load, float),
        config=config,
        geometry=geometry,
    )
    return result, geometry


def orbit_rows(result: FastForwardResult, period_s: float, k: int) -> np.ndarray:
    """Row indices of recorded instants inside orbit number k (0-based)."""
    t = result.times_s
    return np.flatnonzero((t > k * period_s) & (t <= (k + 1) * period_s))


# Configuration.


def test_defaults_load_from_an_empty_section() -> None:
    assert load_power_config(None) == PowerConfig()
    assert load_power_config({}) == PowerConfig()
    config = load_power_config({"battery_capacity_wh": 900, "tracking": "single-axis"})
    assert config.battery_capacity_wh == 900.0
    assert config.tracking == "single-axis"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"battery_capacity_wh": -5}, "power.battery_capacity_wh"),
        ({"soc_min_fraction": 0.9, "soc_max_fraction": 0.5}, "power.soc_min_fraction"),
        ({"initial_soc_fraction": 0.1}, "power.initial_soc_fraction"),
        ({"throttle_c": 110}, "power.throttle_c"),
        ({"accelerator": "custom", "accelerator_idle_w": 5}, "power.accelerator"),
        ({"accelerator": "tpu"}, "power.accelerator"),
        ({"accelerator_busy_w": 1.0}, "power.accelerator_busy_w"),
        ({"tracking": "sun-pointing"}, "power.tracking"),
        ({"batery_capacity_wh": 100}, "power.batery_capacity_wh"),
        ({"cell_efficiency": "high"}, "power.cell_efficiency"),
    ],
)
def test_bad_config_names_the_field(data: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_power_config(data)
    assert str(caught.value).startswith(field)


def test_model_rechecks_a_config_built_directly() -> None:
    with pytest.raises(ConfigError, match="battery_capacity_wh"):
        PowerModel(PowerConfig(battery_capacity_wh=-1.0))


def test_every_field_names_a_source_or_assumption() -> None:
    for f in dataclasses.fields(PowerConfig):
        assert f.metadata.get("help"), f"{f.name} has no help text"


# Geometry helpers against the fact sheet.


@pytest.mark.parametrize(
    ("altitude_km", "beta_deg", "expected"),
    [(550, 0, 0.372), (550, 60, 0.214), (780, 0, 0.350), (550, 80, 0.0)],
)
def test_eclipse_fraction_matches_fact_sheet(
    altitude_km: float, beta_deg: float, expected: float
) -> None:
    assert eclipse_fraction(altitude_km, beta_deg) == pytest.approx(expected, abs=2e-3)


def test_test_orbit_shadow_matches_eclipse_fraction() -> None:
    orbit = CircularOrbit(beta_deg=30.0)
    t = np.arange(0, orbit.period_s, 5.0)
    dark = np.mean([not orbit.sunlit(float(x))[0] for x in t])
    assert dark == pytest.approx(float(eclipse_fraction(780, 30)), abs=2e-3)


def test_array_sun_cos_per_tracking_mode() -> None:
    assert array_sun_cos("two-axis", n_sats=3).tolist() == [1, 1, 1]
    assert array_sun_cos("single-axis", beta_deg=np.array([0, 60])) == pytest.approx(
        [1.0, 0.5]
    )
    assert array_sun_cos("body-mounted", sun_zenith_cos=np.array([-0.3, 0.4])) == (
        pytest.approx([0.0, 0.4])
    )
    with pytest.raises(ValueError, match="beta"):
        array_sun_cos("single-axis")


# Orbit behaviour (issue 4, must show 1).


def test_charge_falls_in_eclipse_and_rises_in_sunlight() -> None:
    result, orbit = run_orbits(2.2, load=1.0)
    soc = result.soc_fraction[:, 0].astype(float)
    lit = result.sunlit[:, 0]
    change = np.diff(soc)
    dark_steps = ~lit[1:]
    assert dark_steps.sum() > 50
    assert (change[dark_steps] < 0).all()
    # In sunlight the battery charges until it is full, then holds.
    assert (change[lit[1:]] >= -1e-6).all()
    assert change[lit[1:]].max() > 0
    assert soc.max() == pytest.approx(PowerConfig().soc_max_fraction, abs=1e-3)

    # Full load, beta 0: the design depth of discharge of about 20 %.
    rows = orbit_rows(result, orbit.period_s, 1)
    swing = soc[rows].max() - soc[rows].min()
    assert 0.12 < swing < 0.28


def test_temperature_swings_with_the_orbit_in_a_plausible_range() -> None:
    result, orbit = run_orbits(4.0, load=0.5)
    temp = result.temperature_c[:, 0].astype(float)
    lit = result.sunlit[:, 0]
    for k in (1, 2, 3):
        rows = orbit_rows(result, orbit.period_s, k)
        assert not lit[rows[np.argmin(temp[rows])]], f"orbit {k}: min not in eclipse"
        assert lit[rows[np.argmax(temp[rows])]], f"orbit {k}: max not in sunlight"
        assert temp[rows].max() - temp[rows].min() > 0.5
    # The bus stays inside the electronics' operating range, the compute
    # module below its throttle point.
    assert -20 < temp.min() and temp.max() < 60
    assert result.compute_temperature_c.max() < PowerConfig().throttle_c
    assert (result.throttle_factor == 1).all()


def test_busy_satellite_drains_and_heats_more_than_an_idle_one() -> None:
    result, _ = run_orbits(3.0, load=[1.0, 0.0])
    soc, temp = result.soc_fraction, result.temperature_c
    assert soc[:, 0].min() < soc[:, 1].min() - 0.03
    assert temp[-1, 0] > temp[-1, 1] + 3
    assert (
        result.compute_temperature_c[-1, 0] > result.compute_temperature_c[-1, 1] + 20
    )
    assert result.counters["compute_wh"][0] > 3 * result.counters["compute_wh"][1]
    assert result.counters["discharge_wh"][0] > result.counters["discharge_wh"][1]


def test_deeper_discharge_ages_the_battery_faster() -> None:
    result, _ = run_orbits(15.0, load=[1.0, 0.0])
    assert result.mean_cycle_depth[0] > result.mean_cycle_depth[1] + 0.04
    assert result.cycle_fade_fraction[0] > 1.4 * result.cycle_fade_fraction[1]
    assert result.capacity_fade_fraction[0] > result.capacity_fade_fraction[1]
    # One cycle per orbit once the start-up transient is over.
    assert result.cycle_count[0] == pytest.approx(14, abs=1.5)


def test_no_eclipse_means_no_cycling() -> None:
    result, _ = run_orbits(3.0, geometry=CircularOrbit(beta_deg=80.0))
    assert result.cycle_count[0] == 0
    assert result.sunlit.all()
    assert result.soc_fraction[-1, 0] == pytest.approx(0.95, abs=1e-6)


# Throttling.


def test_throttle_engages_above_the_throttle_temperature() -> None:
    # A poorly coupled module: 60 W would lift it 200 K above the bus.
    hot = PowerConfig(compute_conductance_w_k=0.3)
    result, _ = run_orbits(3.0, load=1.0, config=hot)
    tc = result.compute_temperature_c[:, 0]
    factor = result.throttle_factor[:, 0]
    assert factor.min() < 0.9
    assert (factor[tc < hot.throttle_c - 0.5] == 1.0).all()
    assert (factor[tc > hot.throttle_c + 0.5] < 1.0).all()
    # Throttling holds the module below shutdown: less power, less heat.
    assert tc.max() < hot.shutdown_c
    assert result.load_w[-1, 0] < 80 + 60 + 10 - 5


def test_shutdown_above_limit_and_restart_below_resume() -> None:
    model = PowerModel(PowerConfig(compute_conductance_w_k=0.1), n_sats=1)
    factors, temps = [], []
    for _ in range(4000):
        out = model.step(10.0, True, None, 1.0, 0.0, 0.0, 780.0)
        factors.append(float(out.throttle_factor[0]))
        temps.append(float(out.compute_temperature_c[0]))
        if model.shutdown[0]:
            assert out.compute_w[0] == 0.0
    factors_a, temps_a = np.array(factors), np.array(temps)
    assert (factors_a == 0).any(), "never shut down"
    # It comes back, but only once cooled below resume_c.
    back = np.flatnonzero((factors_a[1:] > 0) & (factors_a[:-1] == 0)) + 1
    assert back.size > 0
    assert (temps_a[back - 1] <= 80.0 + 0.5).all()
    assert temps_a.max() < 105 + 5


# Conservation and limits.


def test_energy_is_conserved() -> None:
    rng = np.random.default_rng(1)
    model = PowerModel(PowerConfig(battery_capacity_wh=200.0), n_sats=4)
    e0 = model.energy_wh.copy()
    dt = 20.0
    zero = np.zeros(4)
    solar, load, battery, loss, avail = zero, zero, zero, zero, zero
    for i in range(3000):
        out = model.step(
            dt,
            (i // 150) % 3 != 0,
            rng.uniform(0.2, 1.0, 4),
            rng.uniform(0, 1, 4),
            rng.uniform(0, 2e9, 4),
            rng.uniform(0, 2e9, 4),
            780.0,
            gsl_tx_bits=rng.uniform(0, 5e8, 4),
        )
        assert (out.solar_w <= out.solar_available_w + 1e-9).all()
        assert (out.load_w >= 0).all()
        solar = solar + out.solar_w * dt / 3600
        avail = avail + out.solar_available_w * dt / 3600
        load = load + out.load_w * dt / 3600
        battery = battery + out.battery_w * dt / 3600
        loss = loss + out.battery_loss_w * dt / 3600

    stored = model.energy_wh - e0
    counters = model.counters
    assert (counters["faded_wh"] > 0).all()
    np.testing.assert_allclose(solar, load + battery, rtol=1e-9)
    np.testing.assert_allclose(
        stored, battery - loss - counters["faded_wh"], rtol=1e-9, atol=1e-9
    )
    np.testing.assert_allclose(counters["solar_wh"], solar, rtol=1e-9)
    np.testing.assert_allclose(counters["solar_available_wh"], avail, rtol=1e-9)
    np.testing.assert_allclose(
        counters["solar_wh"] + counters["curtailed_wh"], avail, rtol=1e-9
    )
    # Round-trip losses are a few per cent of the battery throughput.
    throughput = counters["charge_wh"] + counters["discharge_wh"]
    assert (counters["battery_loss_wh"] < 0.05 * throughput).all()
    assert (counters["battery_loss_wh"] > 0.01 * throughput).all()


def test_dissipated_energy_heats_an_isolated_satellite() -> None:
    # No environment, a tiny radiator: all electrical energy becomes heat.
    config = PowerConfig(
        radiator_area_m2=1e-3,
        sunlit_area_m2=0.0,
        earth_ir_w_m2=0.0,
        albedo_fraction=0.0,
        battery_capacity_wh=2000.0,
    )
    model = PowerModel(config)
    heat_j = 0.0
    for _ in range(600):
        out = model.step(10.0, False, None, 1.0, 0.0, 0.0, 780.0)
        heat_j += float(out.load_w[0] + out.battery_loss_w[0]) * 10.0
    c = config
    stored_j = c.bus_heat_capacity_j_k * (
        model.temperature_c[0] - c.initial_temperature_c
    ) + c.compute_heat_capacity_j_k * (
        model.compute_temperature_c[0] - c.initial_temperature_c
    )
    # The 1e-3 m^2 radiator takes well under 1 % away.
    assert stored_j == pytest.approx(heat_j, rel=0.01)


def test_battery_never_goes_below_min_soc_and_compute_is_shed_first() -> None:
    config = PowerConfig(battery_capacity_wh=50.0)
    model = PowerModel(config, n_sats=1)
    shed_seen = False
    for _ in range(400):
        out = model.step(30.0, False, None, 1.0, 0.0, 0.0, 780.0)
        assert out.soc_fraction[0] >= config.soc_min_fraction - 1e-9
        if out.shed_w[0] > 0:
            shed_seen = True
            assert out.compute_shed_w[0] > 0
            assert out.throttle_factor[0] < 1
    assert shed_seen and model.shedding[0]

    # A small deficit in dim sunlight sheds part of the compute load only.
    model = PowerModel(PowerConfig(initial_soc_fraction=0.2), n_sats=1)
    full = model._solar_w_per_cos
    out = model.step(30.0, True, 120.0 / full, 1.0, 0.0, 0.0, 780.0)
    assert out.compute_shed_w[0] == pytest.approx(30.0)
    assert out.shed_w[0] == pytest.approx(30.0)
    assert out.bus_w[0] == 80.0 and out.radio_w[0] == 10.0
    assert out.throttle_factor[0] == pytest.approx(15.0 / 45.0)


def test_cold_battery_does_not_charge() -> None:
    config = PowerConfig(initial_temperature_c=-5.0, initial_soc_fraction=0.5)
    model = PowerModel(config, n_sats=2)
    model.temperature_k = np.array([-5.0, 20.0]) + KELVIN
    out = model.step(1.0, True, None, 0.0, 0.0, 0.0, 780.0)
    assert out.battery_w[0] == 0.0 and out.curtailed_w[0] > 0
    assert out.battery_w[1] > 0


def test_long_steps_stay_stable_with_a_tiny_heat_capacity() -> None:
    config = PowerConfig(compute_heat_capacity_j_k=1.0)
    model = PowerModel(config)
    for _ in range(50):
        out = model.step(600.0, True, None, 1.0, 0.0, 0.0, 780.0)
    # The module sits at bus + P / G, not oscillating.
    expected = out.temperature_c[0] + out.compute_w[0] / config.compute_conductance_w_k
    assert out.compute_temperature_c[0] == pytest.approx(expected, abs=0.5)


def test_tracking_modes_scale_the_array_output() -> None:
    two = PowerModel(PowerConfig())
    single = PowerModel(PowerConfig(tracking="single-axis"))
    cos60 = array_sun_cos("single-axis", beta_deg=np.array([60.0]))
    a = two.step(1.0, True, None, 0.0, 0.0, 0.0, 780.0).solar_available_w[0]
    b = single.step(1.0, True, cos60, 0.0, 0.0, 0.0, 780.0).solar_available_w[0]
    assert a == pytest.approx(1361 * 0.29 * 1.0 * 0.85)
    assert b == pytest.approx(a / 2)
    with pytest.raises(ValueError, match="sun_cos"):
        single.step(1.0, True, None, 0.0, 0.0, 0.0, 780.0)


def test_array_degrades_with_age() -> None:
    old = PowerModel(PowerConfig(mission_age_years=10.0))
    out = old.step(1.0, True, None, 0.0, 0.0, 0.0, 780.0)
    assert out.solar_available_w[0] == pytest.approx(335.5 * 0.9925**10, rel=1e-3)
