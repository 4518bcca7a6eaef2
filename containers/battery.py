"""Battery capacity fade from cycling and from time, for many satellites.

Cycle fade: the SoC history is cut into cycles by rainflow counting
(ASTM E1049-85 5.4.4), each cycle of depth DoD uses up ``1 / N(DoD)`` of the
life (Miner's rule) with ``N(DoD) = a * DoD^-b`` cycles to end of life, and
the used-up life maps linearly onto capacity: damage 1 = the end-of-life
fade (20 %). Each cycle is weighted by an Arrhenius factor at the battery
temperature of its two turning points.

Calendar fade: ``k * t_eq^z`` where the equivalent time t_eq accumulates
``dt * exp(-Ea/R (1/T - 1/Tref))``, so hot spells age the cell faster and
the sub-linear t^z law still holds under a varying temperature.

Both add up: ``fade = calendar + end_of_life_fade * damage``.

Why our own streaming counter: the `rainflow` package (3.2.0) counts a
finished series; it cannot carry the unclosed residual from one call to the
next, so counting window by window would count every window's open half
cycles as if they were closed. :class:`StreamingRainflow` keeps that
residual and applies the same three-point rule as
``rainflow.extract_cycles``; the tests check it cycle for cycle against the
package.

Caveats: SoC-dependent calendar fade, low-temperature lithium plating,
C-rate effects and resistance growth are left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GAS_CONSTANT_J_MOL_K = 8.314462618
SECONDS_PER_YEAR = 365.25 * 86400.0
KELVIN = 273.15

# Cycles shallower than this are counted for damage but not in the depth
# statistics (they are load ripple, not orbits).
STATS_MIN_DEPTH = 0.01

# SoC samples are rounded to this many decimals before counting, so that
# float noise while the battery sits at its limit makes no reversals.
SOC_DECIMALS = 6


@dataclass(frozen=True)
class AgeingParams:
    """Constants of the fade model (see PowerConfig for sources)."""

    cycle_life_a: float = 4350.0
    cycle_life_b: float = 1.2
    end_of_life_fade_fraction: float = 0.2
    cycle_activation_j_mol: float = 31500.0
    cycle_reference_k: float = 293.15
    calendar_k_per_year: float = 0.02
    calendar_exponent: float = 0.5
    calendar_activation_j_mol: float = 50000.0
    calendar_reference_k: float = 298.15
    samples_per_update: int = 60


def cycles_to_end_of_life(
    depth: np.ndarray | float, a: float = 4350.0, b: float = 1.2
) -> np.ndarray:
    """N(DoD) = a * DoD^-b; infinite for a zero-depth cycle."""
    d = np.asarray(depth, dtype=float)
    with np.errstate(divide="ignore", over="ignore"):
        return np.where(d > 0, a * np.power(np.maximum(d, 1e-300), -b), np.inf)


def arrhenius_factor(
    temperature_k: np.ndarray | float, activation_j_mol: float, reference_k: float
) -> np.ndarray:
    """exp(-Ea/R (1/T - 1/Tref)): how much faster than at Tref."""
    t = np.asarray(temperature_k, dtype=float)
    return np.exp(
        -activation_j_mol / GAS_CONSTANT_J_MOL_K * (1.0 / t - 1.0 / reference_k)
    )


Cycle = tuple[float, float, float, float]
"""(range, mean, count, weight): count 1 full cycle, 0.5 half cycle; weight is
the mean of the two turning points' weights."""


class StreamingRainflow:
    """Rainflow counting of one series fed turning point by turning point.

    Same rule as ``rainflow.extract_cycles``: the stack holds the residual
    (turning points not yet part of a closed cycle); :meth:`push` returns the
    cycles it closes, :meth:`residual` the half cycles the residual would
    count if the series ended now. Feed it turning points only (first
    point, reversals); each point carries a weight (e.g. a temperature
    factor) that is averaged over the cycle's two points.
    """

    __slots__ = ("values", "weights")

    def __init__(self, first: float, weight: float = 1.0) -> None:
        self.values = [float(first)]
        self.weights = [float(weight)]

    def push(self, value: float, weight: float = 1.0) -> list[Cycle]:
        """Add a turning point; return the cycles it closes."""
        values, weights = self.values, self.weights
        values.append(value)
        weights.append(weight)
        closed: list[Cycle] = []
        while len(values) >= 3:
            x = abs(values[-1] - values[-2])
            y = abs(values[-2] - values[-3])
            if x < y:
                break
            w = 0.5 * (weights[-3] + weights[-2])
            mean = 0.5 * (values[-3] + values[-2])
            if len(values) == 3:
                # The oldest point starts the range: half a cycle.
                closed.append((y, mean, 0.5, w))
                del values[0], weights[0]
            else:
                closed.append((y, mean, 1.0, w))
                del values[-3:-1], weights[-3:-1]
        return closed

    def residual(self, last: float | None = None, weight: float = 1.0) -> list[Cycle]:
        """Cycles if the series ended now (at `last`, if given), stack intact."""
        probe = StreamingRainflow.__new__(StreamingRainflow)
        probe.values = list(self.values)
        probe.weights = list(self.weights)
        cycles = probe.push(last, weight) if last is not None else []
        v, w = probe.values, probe.weights
        for i in range(len(v) - 1):
            cycles.append(
                (
                    abs(v[i + 1] - v[i]),
                    0.5 * (v[i] + v[i + 1]),
                    0.5,
                    0.5 * (w[i] + w[i + 1]),
                )
            )
        return cycles


class BatteryAgeing:
    """Capacity fade of S batteries from sampled SoC and temperature.

    Call :meth:`record` at every sampling instant; every
    `samples_per_update` samples the buffered samples are turned into
    turning points (vectorised over satellites), the turning points into
    cycles (one short Python loop per satellite with new turning points,
    about two per orbit), and the calendar clock advances. Between updates
    nothing but two array copies happens per sample.
    """

    def __init__(
        self,
        params: AgeingParams,
        n_sats: int,
        initial_soc_fraction: float | np.ndarray = 0.9,
        initial_temperature_c: float | np.ndarray = 20.0,
        initial_fade_fraction: float = 0.0,
    ) -> None:
        self.params = params
        self.n_sats = n_sats
        self.initial_fade_fraction = initial_fade_fraction
        k = params.samples_per_update
        self._soc = np.empty((n_sats, k))
        self._temp_c = np.empty((n_sats, k))
        self._dt_s = np.empty(k)
        self._n = 0

        soc0 = np.round(np.broadcast_to(initial_soc_fraction, (n_sats,)), SOC_DECIMALS)
        t0 = np.broadcast_to(np.asarray(initial_temperature_c, float), (n_sats,))
        self._last_soc = soc0.astype(float)
        self._last_temp_c = t0.astype(float)
        self._last_dir = np.zeros(n_sats, dtype=np.int8)
        f0 = self._cycle_factor(t0)
        self._stacks = [
            StreamingRainflow(float(s), float(f)) for s, f in zip(soc0, f0, strict=True)
        ]

        self.elapsed_s = 0.0
        self.equivalent_s = np.zeros(n_sats)
        self.closed_damage = np.zeros(n_sats)
        self.residual_damage = np.zeros(n_sats)
        self.cycle_count = np.zeros(n_sats)
        self.cycle_depth_sum = np.zeros(n_sats)
        self.max_cycle_depth = np.zeros(n_sats)

    def reset_temperature(self, temperature_c: np.ndarray) -> None:
        """Use this temperature for the starting point (before any sample)."""
        t = np.broadcast_to(np.asarray(temperature_c, float), (self.n_sats,))
        self._last_temp_c = t.astype(float)
        for stack, f in zip(self._stacks, self._cycle_factor(t), strict=True):
            if len(stack.values) == 1:
                stack.weights[0] = float(f)

    def record(
        self, soc_fraction: np.ndarray, temperature_c: np.ndarray, dt_s: float
    ) -> bool:
        """Buffer one sample taken `dt_s` after the previous one.

        Returns True when the sample completed an update (fade changed).
        """
        i = self._n
        self._soc[:, i] = soc_fraction
        self._temp_c[:, i] = temperature_c
        self._dt_s[i] = dt_s
        self._n = i + 1
        if self._n < self.params.samples_per_update:
            return False
        self.flush()
        return True

    def flush(self) -> None:
        """Process the buffered samples now (also at the end of a run)."""
        k = self._n
        if k == 0:
            return
        self._n = 0
        p = self.params
        soc = np.round(self._soc[:, :k], SOC_DECIMALS)
        temp_c = self._temp_c[:, :k]
        dts = self._dt_s[:k]

        # Calendar: equivalent time at the reference temperature.
        cal = arrhenius_factor(
            temp_c + KELVIN, p.calendar_activation_j_mol, p.calendar_reference_k
        )
        self.equivalent_s += cal @ dts
        self.elapsed_s += float(dts.sum())

        # Turning points: where the direction of SoC change flips. Flat runs
        # keep the direction they had; the previous window's last sample is
        # column 0, so a reversal right at the boundary is found too.
        values = np.concatenate([self._last_soc[:, None], soc], axis=1)
        temps = np.concatenate([self._last_temp_c[:, None], temp_c], axis=1)
        step = np.sign(np.diff(values, axis=1)).astype(np.int8)
        cols = np.arange(k)
        last_moved = np.maximum.accumulate(np.where(step != 0, cols, -1), axis=1)
        held = np.take_along_axis(step, np.maximum(last_moved, 0), axis=1)
        held = np.where(last_moved >= 0, held, self._last_dir[:, None])
        before = np.concatenate([self._last_dir[:, None], held[:, :-1]], axis=1)
        turning = (step != 0) & (before != 0) & (step != before)
        rows, at = np.nonzero(turning)
        if rows.size:
            self._count(rows, values[rows, at], self._cycle_factor(temps[rows, at]))

        self._last_soc = values[:, -1].copy()
        self._last_temp_c = temps[:, -1].copy()
        self._last_dir = held[:, -1].copy()
        self._update_residual()

    def _count(self, rows: np.ndarray, values: np.ndarray, factors: np.ndarray) -> None:
        a, b = self.params.cycle_life_a, self.params.cycle_life_b
        damage = self.closed_damage
        count, depth_sum, depth_max = (
            self.cycle_count,
            self.cycle_depth_sum,
            self.max_cycle_depth,
        )
        for r, v, f in zip(
            rows.tolist(), values.tolist(), factors.tolist(), strict=True
        ):
            for rng, _mean, n, w in self._stacks[r].push(v, f):
                damage[r] += n * w * rng**b / a
                if rng >= STATS_MIN_DEPTH:
                    count[r] += n
                    depth_sum[r] += n * rng
                    if rng > depth_max[r]:
                        depth_max[r] = rng

    def _update_residual(self) -> None:
        a, b = self.params.cycle_life_a, self.params.cycle_life_b
        factors = self._cycle_factor(self._last_temp_c).tolist()
        lasts = self._last_soc.tolist()
        out = self.residual_damage
        for i, stack in enumerate(self._stacks):
            out[i] = sum(
                n * w * rng**b / a
                for rng, _m, n, w in stack.residual(lasts[i], factors[i])
            )

    def _cycle_factor(self, temperature_c: np.ndarray) -> np.ndarray:
        p = self.params
        return arrhenius_factor(
            np.asarray(temperature_c, float) + KELVIN,
            p.cycle_activation_j_mol,
            p.cycle_reference_k,
        )

    @property
    def damage(self) -> np.ndarray:
        """Miner damage so far: closed cycles plus the open residual."""
        return np.asarray(self.closed_damage + self.residual_damage)

    def calendar_fade_fraction(self) -> np.ndarray:
        p = self.params
        years = self.equivalent_s / SECONDS_PER_YEAR
        return np.asarray(p.calendar_k_per_year * np.power(years, p.calendar_exponent))

    def cycle_fade_fraction(self) -> np.ndarray:
        return np.asarray(self.params.end_of_life_fade_fraction * self.damage)

    def fade_fraction(self) -> np.ndarray:
        """Capacity lost so far: initial + calendar + cycle."""
        return np.asarray(
            self.initial_fade_fraction
            + self.calendar_fade_fraction()
            + self.cycle_fade_fraction()
        )

    def mean_cycle_depth(self) -> np.ndarray:
        """Mean depth of the closed cycles at least 1 % deep (0 if none)."""
        return np.asarray(self.cycle_depth_sum / np.maximum(self.cycle_count, 1e-12))

    def projected_fade_fraction(self, years: float) -> np.ndarray:
        """Fade after `years` at the mean duty and temperatures seen so far.

        Damage and equivalent time grow at their average rates to date;
        the calendar part keeps its t^z shape. Meaningful once a few orbits
        have been recorded.
        """
        p = self.params
        if self.elapsed_s <= 0:
            return np.full(self.n_sats, self.initial_fade_fraction)
        horizon_s = years * SECONDS_PER_YEAR
        scale = horizon_s / self.elapsed_s
        cal_years = self.equivalent_s * scale / SECONDS_PER_YEAR
        calendar = p.calendar_k_per_year * np.power(cal_years, p.calendar_exponent)
        cycle = p.end_of_life_fade_fraction * self.damage * scale
        return np.asarray(self.initial_fade_fraction + calendar + cycle)
