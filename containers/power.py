"""Electrical power, heat and throttling of satellites, all at once.

:class:`PowerModel` keeps the state of S satellites in numpy arrays and
advances it by one timestep in :meth:`PowerModel.step`, with no Python loop
over satellites: the emulator steps every satellite together, an agent
steps its own satellite with S = 1. :class:`PowerConfig` is the ``power``
section of a scenario; every constant carries its default and source (see
docs/power-model.md for the equations and the table).

Per step, in this order:

1. Solar array: ``S0 * eta * A * F_p * cos(theta) * (1 - d)^age`` while
   sunlit, zero in shadow (no penumbra).
2. Loads: bus baseline, accelerator ``idle + (busy - idle) * busy_fraction *
   thermal_factor`` (zero while thermally shut down), radio ``idle +
   energy_per_bit * bits / dt``.
3. Battery: surplus charges it (limited by max charge power, max SoC and
   the charge temperature window; the rest is curtailed at the array);
   deficit discharges it (limited by max discharge power and min SoC).
   What the battery cannot cover is shed: compute first, then radio, then
   the bus, and reported.
4. Heat: two lumped nodes integrated explicitly. The bus node (structure,
   battery, radiator) takes the bus, radio and battery-loss dissipation,
   sunlight, albedo and Earth IR, and radiates to 3 K space; the compute
   module is a small node tied to the bus by a conductance. The throttle
   acts on the compute node's temperature.
5. Ageing: SoC and battery temperature are sampled every
   ``ageing_sample_s`` and handed to :class:`containers.battery.BatteryAgeing`
   (rainflow + Miner cycle damage, Arrhenius calendar fade), which shrinks
   the usable capacity.

Left out (see the doc): penumbra, array temperature coefficient, battery
voltage and internal resistance as functions of SoC, heaters, attitude
(the sunlit body area is constant), the RF power that leaves the
spacecraft (all electrical power is counted as heat), and low-temperature
lithium plating.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from containers.battery import KELVIN, SECONDS_PER_YEAR, BatteryAgeing
from containers.power_config import (
    PowerConfig,
    Tracking,
    load_power_config,
)
from topology.config import to_dict
from topology.errors import ConfigError

log = logging.getLogger(__name__)

STEFAN_BOLTZMANN_W_M2_K4 = 5.670374419e-8

# Mean Earth radius: used for the Earth view factor and eclipse fraction.
EARTH_RADIUS_KM = 6371.0


def earth_view_factor(altitude_km: np.ndarray | float) -> np.ndarray:
    """Fraction of the sky Earth fills as seen from a nadir face: (R/(R+h))^2."""
    ratio = EARTH_RADIUS_KM / (EARTH_RADIUS_KM + np.asarray(altitude_km, float))
    return np.asarray(ratio * ratio)


def eclipse_fraction(
    altitude_km: np.ndarray | float, beta_deg: np.ndarray | float
) -> np.ndarray:
    """Fraction of a circular orbit spent in a cylindrical Earth shadow.

    ``acos(sqrt(h^2 + 2 R h) / ((R + h) cos beta)) / pi`` while |beta| is
    below ``asin(R / (R + h))``, else 0 (spherical Earth, no penumbra).
    """
    h = np.asarray(altitude_km, dtype=float)
    beta = np.radians(np.asarray(beta_deg, dtype=float))
    r = EARTH_RADIUS_KM + h
    cos_beta = np.maximum(np.cos(beta), 1e-12)
    ratio = np.sqrt(h * h + 2 * EARTH_RADIUS_KM * h) / (r * cos_beta)
    shadowed = np.abs(beta) < np.arcsin(EARTH_RADIUS_KM / r)
    return np.where(shadowed, np.arccos(np.minimum(ratio, 1.0)) / np.pi, 0.0)


def array_sun_cos(
    tracking: Tracking,
    beta_deg: np.ndarray | None = None,
    sun_zenith_cos: np.ndarray | None = None,
    n_sats: int = 1,
) -> np.ndarray:
    """cos(angle between the array normal and the Sun) for a tracking mode.

    two-axis: 1. single-axis (axis normal to the orbit plane): cos(beta),
    needs `beta_deg`. body-mounted (a zenith-facing panel on a nadir-pointing
    bus): max(0, r_hat . sun_hat), needs `sun_zenith_cos`.
    """
    if tracking == "two-axis":
        return np.ones(n_sats)
    if tracking == "single-axis":
        if beta_deg is None:
            raise ValueError("single-axis tracking needs the beta angle (beta_deg)")
        return np.cos(np.radians(np.asarray(beta_deg, dtype=float)))
    if sun_zenith_cos is None:
        raise ValueError("body-mounted arrays need sun_zenith_cos (r_hat . sun_hat)")
    return np.maximum(np.asarray(sun_zenith_cos, dtype=float), 0.0)


@dataclass(frozen=True, slots=True)
class PowerStep:
    """What one step did, per satellite (arrays of shape (S,), W unless named).

    `battery_w` is at the battery terminals: positive while charging.
    `throttle_factor` is the speed the accelerator may run at: 1 full speed,
    below 1 slowed (heat or power), 0 off.
    """

    solar_available_w: np.ndarray
    solar_w: np.ndarray
    curtailed_w: np.ndarray
    bus_w: np.ndarray
    compute_w: np.ndarray
    radio_w: np.ndarray
    load_w: np.ndarray
    shed_w: np.ndarray
    compute_shed_w: np.ndarray
    battery_w: np.ndarray
    battery_loss_w: np.ndarray
    soc_fraction: np.ndarray
    energy_wh: np.ndarray
    temperature_c: np.ndarray
    compute_temperature_c: np.ndarray
    throttle_factor: np.ndarray


class PowerModel:
    """Power, heat and battery state of `n_sats` satellites, stepped together.

    Use ``PowerModel(config, n_sats)`` and call :meth:`step` once per
    timestep with per-satellite arrays (scalars broadcast). State is public
    and in SI-with-units names: `energy_wh`, `capacity_wh`, `temperature_k`,
    `compute_temperature_k`, `shutdown`, `shedding` (all (S,)); cumulative
    energies are in :attr:`counters`, battery ageing in :attr:`ageing`.
    """

    def __init__(
        self,
        config: PowerConfig | None = None,
        n_sats: int = 1,
        names: list[str] | None = None,
    ) -> None:
        # Re-validate: a PowerConfig built directly skips from_dict's checks.
        config = load_power_config(to_dict(config or PowerConfig()))
        if n_sats < 1:
            raise ConfigError(f"n_sats: {n_sats!r}; a model needs at least 1")
        if names is not None and len(names) != n_sats:
            raise ConfigError(f"names: {len(names)} names for {n_sats} satellites")
        self.config = config
        self.n_sats = n_sats
        self.names = names
        self.elapsed_s = 0.0

        c = config
        self.nominal_capacity_wh = c.battery_capacity_wh
        self.capacity_wh = np.full(
            n_sats, c.battery_capacity_wh * (1 - c.initial_capacity_fade_fraction)
        )
        self.energy_wh = self.capacity_wh * c.initial_soc_fraction
        self.temperature_k = np.full(n_sats, c.initial_temperature_c + KELVIN)
        self.compute_temperature_k = self.temperature_k.copy()
        self.shutdown = np.zeros(n_sats, dtype=bool)
        self.shedding = np.zeros(n_sats, dtype=bool)
        # Wh rows: solar available, bus shed, compute, radio, shed, charge,
        # discharge; `counters` derives the rest.
        self._acc = np.zeros((7, n_sats))
        self._faded_wh = np.zeros(n_sats)
        self._zeros = np.zeros(n_sats)
        self._zeros.flags.writeable = False
        self._ones = np.ones(n_sats)
        self._ones.flags.writeable = False
        self._any_shutdown = False
        self._any_shedding = False
        self._bus_w = np.full(n_sats, config.bus_w)
        self._bus_w.flags.writeable = False
        self.ageing = BatteryAgeing(
            c.ageing_params(),
            n_sats,
            initial_soc_fraction=c.initial_soc_fraction,
            initial_temperature_c=c.initial_temperature_c,
            initial_fade_fraction=c.initial_capacity_fade_fraction,
        )
        self._since_sample_s = 0.0

        # Constants folded once, so a step is a few dozen array operations.
        self._solar_w_per_cos = (
            c.solar_constant_w_m2
            * c.cell_efficiency
            * c.panel_area_m2
            * c.packing_factor
        )
        self._eta_charge = math.sqrt(c.round_trip_efficiency)
        self._eta_discharge = self._eta_charge
        self._inv_eta_discharge = 1.0 / self._eta_discharge
        self._inv_eta_charge = 1.0 / self._eta_charge
        self._charge_loss = 1.0 - self._eta_charge
        self._discharge_loss = 1.0 / self._eta_discharge - 1.0
        self._charge_k = (c.charge_min_c + KELVIN, c.charge_max_c + KELVIN)
        self._discharge_k = (c.discharge_min_c + KELVIN, c.discharge_max_c + KELVIN)
        self._idle_w, busy_w = c.accelerator_w()
        self._span_w = busy_w - self._idle_w
        self._sun_body_w = c.absorptivity * c.sunlit_area_m2 * c.solar_constant_w_m2
        self._albedo_w = (
            c.absorptivity
            * c.earth_facing_area_m2
            * c.albedo_fraction
            * c.solar_constant_w_m2
        )
        self._ir_w = c.emissivity * c.earth_facing_area_m2 * c.earth_ir_w_m2
        self._rad_w_k4 = c.emissivity * STEFAN_BOLTZMANN_W_M2_K4 * c.radiator_area_m2
        self._space_k4 = c.space_temperature_k**4
        self._throttle_k = c.throttle_c + KELVIN
        self._shutdown_k = c.shutdown_c + KELVIN
        self._resume_k = c.resume_c + KELVIN
        self._throttle_slope = (1 - c.throttle_floor_fraction) / (
            c.shutdown_c - c.throttle_c
        )

    @property
    def soc_fraction(self) -> np.ndarray:
        """Stored energy over the current (faded) capacity."""
        return np.asarray(self.energy_wh / self.capacity_wh)

    @property
    def temperature_c(self) -> np.ndarray:
        """Bus (structure, battery, radiator) temperature."""
        return np.asarray(self.temperature_k - KELVIN)

    @property
    def compute_temperature_c(self) -> np.ndarray:
        """Compute module temperature (the throttle acts on this one)."""
        return np.asarray(self.compute_temperature_k - KELVIN)

    @property
    def capacity_fade_fraction(self) -> np.ndarray:
        """Capacity lost so far (calendar + cycling), per satellite."""
        return self.ageing.fade_fraction()

    def projected_fade_fraction(self, years: float) -> np.ndarray:
        """Fade after `years` of the duty and temperatures seen so far."""
        return self.ageing.projected_fade_fraction(years)

    def array_factor(self) -> float:
        """Remaining array output after degradation, at the current time."""
        years = self.config.mission_age_years + self.elapsed_s / SECONDS_PER_YEAR
        return float((1 - self.config.array_degradation_per_year) ** years)

    def step(
        self,
        dt_s: float,
        sunlit: np.ndarray | bool,
        sun_cos: np.ndarray | float | None,
        compute_busy_fraction: np.ndarray | float,
        radio_tx_bits: np.ndarray | float,
        radio_rx_bits: np.ndarray | float,
        altitude_km: np.ndarray | float,
        gsl_tx_bits: np.ndarray | float = 0.0,
        gsl_rx_bits: np.ndarray | float = 0.0,
    ) -> PowerStep:
        """Advance every satellite by `dt_s` seconds.

        `sun_cos` is cos(theta) of the array (see :func:`array_sun_cos`);
        None means two-axis pointing (1). `compute_busy_fraction` is the
        fraction of the step the accelerator worked, in [0, 1]. Bit counts
        are what the satellite sent/received over ISLs (`radio_*`) and the
        ground link (`gsl_*`) during this step. Power flows are held
        constant over the step; the temperatures are sub-stepped when the
        step is long compared with their time constants.
        """
        if not dt_s > 0:
            raise ValueError(f"dt_s must be positive, got {dt_s!r}")
        c = self.config
        inv_dt = 1.0 / dt_s
        if sun_cos is None:
            if c.tracking != "two-axis":
                raise ValueError(
                    f"tracking {c.tracking!r} needs sun_cos; compute it with "
                    "array_sun_cos()"
                )
            sun_cos = 1.0
        n = self.n_sats
        lit = np.asarray(sunlit, dtype=float)
        if lit.shape != (n,):
            lit = np.broadcast_to(lit, (n,))

        # Solar input and demanded loads.
        solar_avail = lit * (
            (self._solar_w_per_cos * self.array_factor())
            * np.minimum(np.maximum(sun_cos, 0.0), 1.0)
        )
        tc_k = self.compute_temperature_k
        self._update_shutdown(tc_k)
        if self._any_shutdown or float(tc_k.max()) > self._throttle_k:
            thermal = np.minimum(
                1.0,
                np.maximum(
                    c.throttle_floor_fraction,
                    1.0 - (tc_k - self._throttle_k) * self._throttle_slope,
                ),
            )
        else:
            thermal = self._ones
        idle: np.ndarray | float = self._idle_w
        if self._any_shutdown:
            thermal[self.shutdown] = 0.0
            idle = np.where(self.shutdown, 0.0, self._idle_w)
        busy = np.minimum(np.maximum(compute_busy_fraction, 0.0), 1.0)
        compute_demand = idle + self._span_w * busy * thermal
        radio_j = c.isl_tx_energy_per_bit_j * np.asarray(
            radio_tx_bits, float
        ) + c.isl_rx_energy_per_bit_j * np.asarray(radio_rx_bits, float)
        if not (isinstance(gsl_tx_bits, float) and gsl_tx_bits == 0.0):
            radio_j = radio_j + c.gsl_tx_energy_per_bit_j * np.asarray(gsl_tx_bits)
        if not (isinstance(gsl_rx_bits, float) and gsl_rx_bits == 0.0):
            radio_j = radio_j + c.gsl_rx_energy_per_bit_j * np.asarray(gsl_rx_bits)
        radio_demand = c.radio_idle_w + inv_dt * radio_j
        demand = c.bus_w + compute_demand + radio_demand
        net = solar_avail - demand

        # Battery limits for this step (W at the terminals): SoC window,
        # power limits, and no current outside the cell temperature windows.
        to_w = 3600.0 * inv_dt
        cap = self.capacity_wh
        energy = self.energy_wh
        charge_max = np.minimum(
            np.maximum((cap * c.soc_max_fraction - energy) * self._inv_eta_charge
                       * to_w, 0.0),
            c.max_charge_w,
        )  # fmt: skip
        discharge_max = np.minimum(
            np.maximum((energy - cap * c.soc_min_fraction) * self._eta_discharge
                       * to_w, 0.0),
            c.max_discharge_w,
        )  # fmt: skip
        temp_k = self.temperature_k
        lo, hi = float(temp_k.min()), float(temp_k.max())
        if lo < self._charge_k[0] or hi > self._charge_k[1]:
            charge_max[(temp_k < self._charge_k[0]) | (temp_k > self._charge_k[1])] = 0
        if lo < self._discharge_k[0] or hi > self._discharge_k[1]:
            outside = (temp_k < self._discharge_k[0]) | (temp_k > self._discharge_k[1])
            discharge_max[outside] = 0.0

        # Surplus charges, deficit discharges; what the battery cannot give
        # is shed: compute first, then radio, then the bus.
        charge = np.minimum(np.maximum(net, 0.0), charge_max)
        need = np.maximum(-net, 0.0)
        discharge = np.minimum(need, discharge_max)
        deficit = need - discharge
        throttle = thermal
        if deficit.any():
            compute_shed = np.minimum(deficit, compute_demand)
            radio_shed = np.minimum(deficit - compute_shed, radio_demand)
            bus_shed = np.minimum(deficit - compute_shed - radio_shed, c.bus_w)
            shed = compute_shed + radio_shed + bus_shed
            compute_w = compute_demand - compute_shed
            radio_w = radio_demand - radio_shed
            bus_w = c.bus_w - bus_shed
            self._acc[1] += bus_shed * (dt_s / 3600.0)
            self._acc[4] += shed * (dt_s / 3600.0)

            # The accelerator runs at the share of its dynamic power it got,
            # and not at all without its idle power.
            dynamic = np.maximum(compute_demand - idle, 1e-12)
            got = np.maximum(compute_w - idle, 0.0) / dynamic
            speed = np.where(compute_w >= idle, thermal * np.minimum(got, 1.0), 0.0)
            throttle = np.where(compute_shed > 0.0, speed, thermal)
        else:
            shed = compute_shed = self._zeros
            compute_w, radio_w, bus_w = compute_demand, radio_demand, self._bus_w
            if radio_w.shape != (n,):
                radio_w = np.full(n, float(radio_w))
        self._note_shedding(shed)
        load_w = demand - shed
        solar_w = load_w + (charge - discharge)
        self.energy_wh = energy + (
            charge * self._eta_charge - discharge * self._inv_eta_discharge
        ) * (dt_s / 3600.0)
        loss_w = charge * self._charge_loss + discharge * self._discharge_loss

        # Heat: the compute module, tied to the bus node, which carries every
        # other dissipation, the environment, and the radiator.
        ratio = EARTH_RADIUS_KM / (EARTH_RADIUS_KM + np.asarray(altitude_km, float))
        view = ratio * ratio
        env_w = self._ir_w * view + lit * (self._sun_body_w + self._albedo_w * view)
        self._integrate_heat(dt_s, bus_w + radio_w + loss_w + env_w, compute_w)

        # Counters (the rest are derived in `counters`), ageing samples.
        k = dt_s / 3600.0
        acc = self._acc
        acc[0] += solar_avail * k
        acc[2] += compute_w * k
        acc[3] += radio_w * k
        acc[5] += charge * k
        acc[6] += discharge * k
        self.elapsed_s += dt_s
        self._since_sample_s += dt_s
        if self._since_sample_s >= c.ageing_sample_s * (1 - 1e-9):
            soc = self.energy_wh / self.capacity_wh
            sampled = self.ageing.record(
                soc, self.temperature_k - KELVIN, self._since_sample_s
            )
            if sampled:
                self._apply_fade()
            self._since_sample_s = 0.0

        return PowerStep(
            solar_available_w=solar_avail,
            solar_w=solar_w,
            curtailed_w=solar_avail - solar_w,
            bus_w=bus_w,
            compute_w=compute_w,
            radio_w=radio_w,
            load_w=load_w,
            shed_w=shed,
            compute_shed_w=compute_shed,
            battery_w=charge - discharge,
            battery_loss_w=loss_w,
            soc_fraction=self.energy_wh / self.capacity_wh,
            energy_wh=self.energy_wh,
            temperature_c=self.temperature_k - KELVIN,
            compute_temperature_c=self.compute_temperature_k - KELVIN,
            throttle_factor=throttle,
        )

    @property
    def counters(self) -> dict[str, np.ndarray]:
        """Cumulative energies per satellite in Wh since the model started.

        ``solar_wh`` is solar energy used (available minus curtailed);
        ``load_wh`` = bus + compute + radio served. Over any interval
        ``solar_wh = load_wh + charge_wh - discharge_wh`` and the stored
        energy changes by ``charge_wh - discharge_wh - battery_loss_wh -
        faded_wh`` (`faded_wh`: stored energy that went with lost capacity).
        """
        avail, bus_shed, compute, radio, shed, charge, discharge = self._acc
        # The bus draws its fixed power except while it is being shed.
        bus = self.config.bus_w * (self.elapsed_s / 3600.0) - bus_shed
        load = bus + compute + radio
        solar = load + charge - discharge
        return {
            "solar_available_wh": avail.copy(),
            "solar_wh": solar,
            "curtailed_wh": avail - solar,
            "bus_wh": bus,
            "compute_wh": compute.copy(),
            "radio_wh": radio.copy(),
            "load_wh": load,
            "shed_wh": shed.copy(),
            "charge_wh": charge.copy(),
            "discharge_wh": discharge.copy(),
            "battery_loss_wh": charge * self._charge_loss
            + discharge * self._discharge_loss,
            "faded_wh": self._faded_wh.copy(),
        }

    def settle_temperature(
        self,
        sunlit_fraction: np.ndarray | float,
        compute_busy_fraction: np.ndarray | float,
        altitude_km: np.ndarray | float,
    ) -> None:
        """Set both nodes to the equilibrium of the orbit-averaged heat input.

        Starts a run near its periodic steady state instead of drifting for
        the bus's ~7 h time constant. The compute module settles where its
        (throttled) power balances the conductance to the bus; battery
        losses are left out of the average.
        """
        c = self.config
        n = self.n_sats
        view = earth_view_factor(altitude_km)
        lit = np.asarray(sunlit_fraction, dtype=float)
        busy = np.clip(np.asarray(compute_busy_fraction, dtype=float), 0.0, 1.0)
        outside_w = np.broadcast_to(
            c.bus_w
            + c.radio_idle_w
            + self._ir_w * view
            + lit * (self._sun_body_w + self._albedo_w * view),
            (n,),
        )
        busy = np.broadcast_to(busy, (n,))
        g = c.compute_conductance_w_k

        def compute_w(temp_k: np.ndarray) -> np.ndarray:
            factor = np.clip(
                1.0 - (temp_k - self._throttle_k) * self._throttle_slope,
                c.throttle_floor_fraction,
                1.0,
            )
            return np.asarray(self._idle_w + self._span_w * busy * factor)

        # The bus depends on the compute power and the compute power on its
        # temperature above the bus: a few rounds of substitution, each
        # solving the module's balance T = T_bus + P(T) / G by bisection
        # (P falls as T rises, so the root is unique).
        power = compute_w(np.zeros(n))
        for _ in range(4):
            bus_k = ((outside_w + power) / self._rad_w_k4 + self._space_k4) ** 0.25
            low, high = bus_k.copy(), bus_k + power / g + 1.0
            for _ in range(40):
                mid = 0.5 * (low + high)
                above = mid - bus_k - compute_w(mid) / g > 0
                high = np.where(above, mid, high)
                low = np.where(above, low, mid)
            power = compute_w(high)
        self.temperature_k = bus_k.astype(float)
        self.compute_temperature_k = np.asarray(high, dtype=float)
        self.ageing.reset_temperature(self.temperature_k - KELVIN)

    def _integrate_heat(
        self, dt_s: float, bus_heat_w: np.ndarray, compute_heat_w: np.ndarray
    ) -> None:
        """Advance both nodes by `dt_s`, sub-stepped where the bus needs it.

        The compute node is linear, so each sub-step solves it exactly with
        the bus held fixed (it relaxes towards bus + P/G with time constant
        C_c/G), and the bus receives the mean of that flow: stable for any
        module heat capacity, and the heat leaving one node is exactly the
        heat the other gets. The bus, with its T^4 radiator, is explicit
        Euler with sub-steps of at most a fifth of its local time constant
        (well inside Euler's limit of two).
        """
        c = self.config
        tb = self.temperature_k
        tc = self.compute_temperature_k
        g = c.compute_conductance_w_k
        rate_b = (4.0 * self._rad_w_k4 * float(tb.max()) ** 3 + g) / (
            c.bus_heat_capacity_j_k
        )
        n = max(1, math.ceil(dt_s * rate_b / 0.2))
        h = dt_s / n
        a = g * h / c.compute_heat_capacity_j_k
        decay = math.exp(-a)
        mean_pull = g * (-math.expm1(-a) / a)
        inv_cb = h / c.bus_heat_capacity_j_k
        offset = compute_heat_w / g
        for _ in range(n):
            gap = tc - tb - offset
            flow = compute_heat_w + mean_pull * gap
            tc = tb + offset + gap * decay
            tb4 = tb * tb
            tb4 = tb4 * tb4
            tb = tb + (bus_heat_w + flow - self._rad_w_k4 * (tb4 - self._space_k4)) * (
                inv_cb
            )
        self.temperature_k = tb
        self.compute_temperature_k = tc

    def _update_shutdown(self, compute_k: np.ndarray) -> None:
        if not self._any_shutdown and float(compute_k.max()) < self._shutdown_k:
            return
        was = self.shutdown
        now = (was | (compute_k >= self._shutdown_k)) & (compute_k > self._resume_k)
        if (now != was).any():
            off = np.flatnonzero(now & ~was)
            on = np.flatnonzero(was & ~now)
            if off.size:
                log.info("compute shut down (too hot) on %s", self._who(off))
            if on.size:
                log.info("compute restarted (cooled down) on %s", self._who(on))
        self.shutdown = now
        self._any_shutdown = bool(now.any())

    def _note_shedding(self, shed_w: np.ndarray) -> None:
        if shed_w is self._zeros and not self._any_shedding:
            return
        now = shed_w > 0.0
        was = self.shedding
        if (now != was).any():
            started = np.flatnonzero(now & ~was)
            ended = np.flatnonzero(was & ~now)
            if started.size:
                log.info("battery at min SoC, shedding load on %s", self._who(started))
            if ended.size:
                log.info("load shedding ended on %s", self._who(ended))
        self.shedding = now
        self._any_shedding = bool(now.any())

    def _who(self, idx: np.ndarray) -> str:
        shown = [self.names[i] if self.names else str(i) for i in idx[:5]]
        more = f" and {idx.size - 5} more" if idx.size > 5 else ""
        return ", ".join(shown) + more

    def flush_ageing(self) -> None:
        """Count the SoC samples not yet processed (e.g. at the end of a run)."""
        self.ageing.flush()
        self._apply_fade()

    def _apply_fade(self) -> None:
        # Lost capacity takes its share of the stored energy with it: the
        # state of charge is what the cell voltage keeps, not the Wh.
        fade = self.ageing.fade_fraction()
        capacity = self.nominal_capacity_wh * np.maximum(1.0 - fade, 0.05)
        energy = self.energy_wh * (capacity / self.capacity_wh)
        self._faded_wh += self.energy_wh - energy
        self.capacity_wh = capacity
        self.energy_wh = energy
