"""Battery ageing: streaming rainflow against the `rainflow` package, fade laws."""

from __future__ import annotations

import numpy as np
import pytest
import rainflow

from containers.battery import (
    SECONDS_PER_YEAR,
    AgeingParams,
    BatteryAgeing,
    StreamingRainflow,
    arrhenius_factor,
    cycles_to_end_of_life,
)


def random_soc(seed: int, n: int = 2000) -> np.ndarray:
    """A wandering SoC series with flat stretches (battery held full)."""
    rng = np.random.default_rng(seed)
    steps = rng.normal(0, 0.02, n)
    steps[rng.random(n) < 0.2] = 0.0
    return np.round(np.clip(0.6 + np.cumsum(steps), 0.05, 0.95), 6)


def library_damage(series: np.ndarray, a: float = 4350.0, b: float = 1.2) -> float:
    cycles = rainflow.count_cycles(series.tolist())
    return float(sum(n * rng**b / a for rng, n in cycles))


def feed(ageing: BatteryAgeing, series: np.ndarray, temp_c: float = 20.0) -> None:
    for value in series:
        ageing.record(np.array([value]), np.array([temp_c]), 60.0)
    ageing.flush()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_streaming_counter_matches_the_rainflow_package(seed: int) -> None:
    series = random_soc(seed)
    points = [value for _index, value in rainflow.reversals(series.tolist())]
    counter = StreamingRainflow(points[0])
    ours = []
    for value in points[1:-1]:
        ours.extend(counter.push(value))
    ours.extend(counter.residual(points[-1]))

    theirs = list(rainflow.extract_cycles(series.tolist()))
    assert len(ours) == len(theirs) > 50
    for (rng, mean, count, _w), (rng2, mean2, count2, _i, _j) in zip(
        ours, theirs, strict=True
    ):
        assert (rng, mean, count) == pytest.approx((rng2, mean2, count2))


@pytest.mark.parametrize("per_update", [1, 7, 60, 5000])
def test_windowed_ageing_equals_counting_the_whole_series(per_update: int) -> None:
    # The same damage whether the samples arrive one by one or all at once:
    # the open residual is carried between windows, not counted twice.
    series = random_soc(5)
    params = AgeingParams(samples_per_update=per_update, calendar_k_per_year=0.0)
    ageing = BatteryAgeing(params, 1, initial_soc_fraction=series[0])
    feed(ageing, series[1:], temp_c=20.0)
    assert ageing.damage[0] == pytest.approx(library_damage(series), rel=1e-9)


def test_satellites_are_counted_independently() -> None:
    series = np.stack([random_soc(s) for s in range(3)])
    ageing = BatteryAgeing(AgeingParams(), 3, initial_soc_fraction=series[:, 0])
    for k in range(1, series.shape[1]):
        ageing.record(series[:, k], np.full(3, 20.0), 60.0)
    ageing.flush()
    for i in range(3):
        assert ageing.damage[i] == pytest.approx(library_damage(series[i]), rel=1e-9)


def test_cycle_life_matches_the_fact_sheet_fit() -> None:
    n = cycles_to_end_of_life(np.array([0.2, 0.4, 0.8]))
    assert n[0] == pytest.approx(30_000, rel=0.05)
    assert n[1] == pytest.approx(13_500, rel=0.05)
    assert n[2] == pytest.approx(5_500, rel=0.05)
    assert cycles_to_end_of_life(0.0) == np.inf


def orbit_soc(depth: float, orbits: int, samples: int = 100) -> np.ndarray:
    phase = np.linspace(0, 2 * np.pi * orbits, orbits * samples + 1)
    return np.round(0.95 - depth * 0.5 * (1 - np.cos(phase)), 6)


def test_deeper_cycles_age_faster_by_the_wohler_exponent() -> None:
    fades = []
    for depth in (0.1, 0.3):
        ageing = BatteryAgeing(AgeingParams(calendar_k_per_year=0.0), 1, 0.95)
        feed(ageing, orbit_soc(depth, 200)[1:])
        fades.append(ageing.cycle_fade_fraction()[0])
        assert ageing.cycle_count[0] == pytest.approx(200, abs=1)
        assert ageing.max_cycle_depth[0] == pytest.approx(depth, abs=1e-3)
    assert fades[1] / fades[0] == pytest.approx(3**1.2, rel=0.02)
    # 200 cycles at 30 % DoD use 200 / N(0.3) of the life.
    n = float(cycles_to_end_of_life(0.3))
    assert fades[1] == pytest.approx(0.2 * 200 / n, rel=0.02)


def test_heat_speeds_up_both_cycle_and_calendar_fade() -> None:
    cold = BatteryAgeing(AgeingParams(), 1, 0.95, initial_temperature_c=20.0)
    warm = BatteryAgeing(AgeingParams(), 1, 0.95, initial_temperature_c=40.0)
    series = orbit_soc(0.2, 50)[1:]
    feed(cold, series, 20.0)
    feed(warm, series, 40.0)
    cycle_ratio = warm.cycle_fade_fraction()[0] / cold.cycle_fade_fraction()[0]
    assert cycle_ratio == pytest.approx(
        float(arrhenius_factor(313.15, 31500.0, 293.15)), rel=1e-6
    )
    assert cycle_ratio > 2
    calendar_ratio = warm.calendar_fade_fraction()[0] / cold.calendar_fade_fraction()[0]
    expected = (
        float(arrhenius_factor(313.15, 50000.0, 298.15))
        / float(arrhenius_factor(293.15, 50000.0, 298.15))
    ) ** 0.5
    assert calendar_ratio == pytest.approx(expected, rel=1e-6)


def test_calendar_fade_follows_square_root_of_time() -> None:
    ageing = BatteryAgeing(AgeingParams(samples_per_update=1000), 1, 0.5, 25.0)
    day_s = 86400.0
    for _ in range(365):
        ageing.record(np.array([0.5]), np.array([25.0]), day_s)
    ageing.flush()
    one_year = 365 * day_s / SECONDS_PER_YEAR
    assert ageing.calendar_fade_fraction()[0] == pytest.approx(
        0.02 * one_year**0.5, rel=1e-9
    )
    assert ageing.damage[0] == 0.0
    # Projection keeps the t^z shape: four years is twice one year.
    assert ageing.projected_fade_fraction(4.0)[0] == pytest.approx(0.04, rel=1e-9)


def test_projection_extrapolates_cycle_damage_linearly() -> None:
    ageing = BatteryAgeing(AgeingParams(calendar_k_per_year=0.0), 1, 0.95)
    series = orbit_soc(0.2, 20, samples=96)[1:]  # 20 orbits of 96 min
    feed(ageing, series)
    elapsed_years = ageing.elapsed_s / SECONDS_PER_YEAR
    projected = ageing.projected_fade_fraction(1.0)[0]
    assert projected == pytest.approx(
        ageing.cycle_fade_fraction()[0] / elapsed_years, rel=1e-9
    )
    # About 5,500 orbits a year at 20 % DoD: 0.2 * 5500 / 30,000 = 3.7 %.
    assert 0.025 < projected < 0.05


def test_float_noise_at_full_charge_makes_no_cycles() -> None:
    ageing = BatteryAgeing(AgeingParams(), 1, 0.95)
    noise = 0.95 + np.random.default_rng(0).normal(0, 1e-9, 500)
    feed(ageing, noise)
    assert ageing.damage[0] == 0.0
    assert ageing.cycle_count[0] == 0
