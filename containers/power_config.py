"""The ``power`` section of a scenario: constants of the satellite power model.

Every field has a default that runs and a help text naming its source, or
"assumption" where none was found; docs/power-model.md explains the
choices. The scenario keeps ``power`` as a plain mapping;
:func:`load_power_config` validates it (unknown keys, types, bounds, and the
relations between fields) and names the offending field on error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from containers.battery import KELVIN, AgeingParams
from topology.config import from_dict, spec
from topology.errors import ConfigError

# Accelerator presets: (idle W, busy W).
ACCELERATORS: dict[str, tuple[float, float]] = {
    # NVIDIA Jetson AGX Orin power modes 15-60 W (NVIDIA via Fixstars).
    "orin-agx": (15.0, 60.0),
    # NVIDIA Jetson Orin Nano 7-25 W (NVIDIA datasheet).
    "orin-nano": (7.0, 25.0),
    # H100 SXM 700 W (NVIDIA); idle at 10 % of that is an assumption.
    "h100-sxm": (70.0, 700.0),
}

Tracking = Literal["two-axis", "single-axis", "body-mounted"]
Accelerator = Literal["orin-agx", "orin-nano", "h100-sxm", "custom"]


def _c(
    default: Any, help: str, min: float | None = None, max: float | None = None
) -> Any:
    """A config field: default, bounds and the help text with its source."""
    return field(default=default, metadata=spec(min=min, max=max, help=help))


@dataclass(frozen=True)
class PowerConfig:
    """Power, heat and battery constants of one satellite (all satellites alike).

    Defaults: a ~150 kg bus carrying one Jetson AGX Orin in the default
    780 km scenario, with the array, battery and radiator sized for it.
    """

    # Solar array.
    solar_constant_w_m2: float = _c(1361.0, "Kopp & Lean 2011, GRL 38", 0, 5000)
    panel_area_m2: float = _c(
        1.0, "derived: SMAD array sizing for 150 W at 780 km, 5-yr EOL", 0, 1e4
    )
    cell_efficiency: float = _c(0.29, "AM0 BOL, Spectrolab XTJ (Fetzer)", 0.01, 0.6)
    packing_factor: float = _c(0.85, "cell packing and wiring (assumption)", 0.01, 1)
    array_degradation_per_year: float = _c(0.0075, "assumption (0.5-1 %/yr)", 0, 0.5)
    mission_age_years: float = _c(0.0, "array age at scenario start", 0, 50)
    tracking: Tracking = _c(
        "two-axis",
        "two-axis: cos 1; single-axis: cos(beta); body-mounted: zenith panel",
    )

    # Loads.
    bus_w: float = _c(80.0, "assumption: 60-100 W for a 100-300 kg bus", 0, 1e5)
    accelerator: Accelerator = _c("orin-agx", "preset; custom needs both *_w below")
    accelerator_idle_w: float | None = _c(None, "overrides the preset", 0, 1e5)
    accelerator_busy_w: float | None = _c(None, "overrides the preset", 0, 1e5)
    radio_idle_w: float = _c(10.0, "terminals tracking, listening (assumption)", 0)
    isl_tx_energy_per_bit_j: float = _c(5e-9, "assumption: 50 W at 10 Gbit/s", 0)
    isl_rx_energy_per_bit_j: float = _c(1e-9, "assumption: 1/5 of transmit", 0)
    gsl_tx_energy_per_bit_j: float = _c(85e-9, "derived: CubeLCT 8.5 W/100 Mbit/s", 0)
    gsl_rx_energy_per_bit_j: float = _c(1e-9, "assumption", 0)

    # Battery.
    battery_capacity_wh: float = _c(
        450.0, "derived: 35 min eclipse at ~150 W = 20 % DoD", 1e-3, 1e7
    )
    initial_capacity_fade_fraction: float = _c(0.0, "already lost at start", 0, 0.9)
    initial_soc_fraction: float = _c(0.9, "assumption", 0, 1)
    soc_min_fraction: float = _c(0.2, "loads shed below (assumption)", 0, 1)
    soc_max_fraction: float = _c(0.95, "charging stops here (assumption)", 0, 1)
    round_trip_efficiency: float = _c(
        0.95, "assumption 0.90-0.97, incl. coulombic 0.995 (BU-808c)", 0.1, 1
    )
    max_charge_w: float = _c(225.0, "0.5 C of the default pack (assumption)", 0)
    max_discharge_w: float = _c(450.0, "1 C of the default pack (assumption)", 0)
    charge_min_c: float = _c(0.0, "18650 datasheets", -60, 100)
    charge_max_c: float = _c(45.0, "18650 datasheets", -60, 100)
    discharge_min_c: float = _c(-20.0, "18650 datasheets", -60, 100)
    discharge_max_c: float = _c(60.0, "18650 datasheets", -60, 100)

    # Heat.
    bus_heat_capacity_j_k: float = _c(1.35e5, "derived: 150 kg Al, 900 J/kg K", 1)
    compute_heat_capacity_j_k: float = _c(5e3, "derived: ~5 kg Al", 1)
    compute_conductance_w_k: float = _c(
        1.5, "compute module to bus (assumption: 40 K at 60 W)", 1e-3
    )
    radiator_area_m2: float = _c(
        0.75, "derived: bus near 20 C at half load, default orbit", 1e-3
    )
    emissivity: float = _c(0.90, "white silicate paint (Fortescue 4e)", 0.01, 1)
    absorptivity: float = _c(0.12, "white silicate paint (Fortescue 4e)", 0, 1)
    sunlit_area_m2: float = _c(0.5, "body area facing the Sun (assumption)", 0)
    earth_facing_area_m2: float = _c(0.5, "body area facing Earth (assumption)", 0)
    earth_ir_w_m2: float = _c(237.0, "common design value (150-350)", 0, 1000)
    albedo_fraction: float = _c(0.30, "common design value (0.18-0.55)", 0, 1)
    space_temperature_k: float = _c(3.0, "deep space", 0, 400)
    initial_temperature_c: float = _c(20.0, "assumption", -150, 200)
    throttle_c: float = _c(85.0, "assumption; Orin device-tree trip", -50, 200)
    shutdown_c: float = _c(105.0, "assumption; Orin device-tree trip", -50, 250)
    resume_c: float = _c(80.0, "restart after shutdown (assumption)", -50, 250)
    throttle_floor_fraction: float = _c(
        0.25, "speed just below shutdown_c, linear from 1 (assumption)", 0, 1
    )

    # Battery ageing.
    cycle_life_a: float = _c(
        4350.0, "N(DoD)=a DoD^-b to 80 %: fit to BLAST-Lite Kokam NMC, 20 C", 1
    )
    cycle_life_b: float = _c(1.2, "same fit", 0.1, 5)
    end_of_life_fade_fraction: float = _c(0.2, "fade at which N counts", 0.01, 1)
    cycle_activation_j_mol: float = _c(
        31500.0, "assumption: order of Wang 2011 (JPS 196, LFP)", 0, 2e5
    )
    cycle_reference_c: float = _c(20.0, "temperature of the N(DoD) fit", -50, 100)
    calendar_k_per_year: float = _c(
        0.02, "fade after 1 yr at calendar_reference_c (assumption)", 0, 1
    )
    calendar_exponent: float = _c(
        0.5, "t^z, sqrt(t) (Wang 2014, JPS 269); range 0.36-0.75", 0.1, 1.5
    )
    calendar_activation_j_mol: float = _c(50000.0, "fact sheet: 46-58 kJ/mol", 0, 2e5)
    calendar_reference_c: float = _c(25.0, "temperature of k", -50, 100)
    ageing_sample_s: float = _c(60.0, "SoC sampling for rainflow", 0.1, 86400)
    ageing_update_samples: int = _c(60, "samples between fade updates", 1, 100000)

    def accelerator_w(self) -> tuple[float, float]:
        """Idle and busy power of the accelerator in W."""
        idle, busy = ACCELERATORS.get(self.accelerator, (math.nan, math.nan))
        if self.accelerator_idle_w is not None:
            idle = self.accelerator_idle_w
        if self.accelerator_busy_w is not None:
            busy = self.accelerator_busy_w
        return idle, busy

    def validate(self, where: str) -> None:
        """Check the relations between fields (bounds are checked on load)."""
        pre = f"{where}." if where else ""
        if self.accelerator == "custom" and (
            self.accelerator_idle_w is None or self.accelerator_busy_w is None
        ):
            raise ConfigError(
                f"{pre}accelerator: 'custom' needs accelerator_idle_w and "
                "accelerator_busy_w; give both, or pick a preset "
                f"({', '.join(ACCELERATORS)})"
            )
        idle, busy = self.accelerator_w()
        if busy < idle:
            raise ConfigError(
                f"{pre}accelerator_busy_w: {busy!r} W is below the idle power "
                f"{idle!r} W; busy power must be at least the idle power"
            )
        _below(pre, "soc_min_fraction", self.soc_min_fraction, "soc_max_fraction",
               self.soc_max_fraction)  # fmt: skip
        lo, hi = self.soc_min_fraction, self.soc_max_fraction
        if not lo <= self.initial_soc_fraction <= hi:
            raise ConfigError(
                f"{pre}initial_soc_fraction: {self.initial_soc_fraction!r} is "
                f"outside [soc_min_fraction, soc_max_fraction] = [{lo!r}, {hi!r}]; "
                "start inside that range"
            )
        _below(pre, "charge_min_c", self.charge_min_c, "charge_max_c",
               self.charge_max_c)  # fmt: skip
        _below(pre, "discharge_min_c", self.discharge_min_c, "discharge_max_c",
               self.discharge_max_c)  # fmt: skip
        _below(pre, "throttle_c", self.throttle_c, "shutdown_c", self.shutdown_c)
        _below(pre, "resume_c", self.resume_c, "shutdown_c", self.shutdown_c)

    def ageing_params(self) -> AgeingParams:
        """The ageing constants in the form the battery model takes."""
        return AgeingParams(
            cycle_life_a=self.cycle_life_a,
            cycle_life_b=self.cycle_life_b,
            end_of_life_fade_fraction=self.end_of_life_fade_fraction,
            cycle_activation_j_mol=self.cycle_activation_j_mol,
            cycle_reference_k=self.cycle_reference_c + KELVIN,
            calendar_k_per_year=self.calendar_k_per_year,
            calendar_exponent=self.calendar_exponent,
            calendar_activation_j_mol=self.calendar_activation_j_mol,
            calendar_reference_k=self.calendar_reference_c + KELVIN,
            samples_per_update=self.ageing_update_samples,
        )


def _below(pre: str, low_name: str, low: float, high_name: str, high: float) -> None:
    if not low < high:
        raise ConfigError(
            f"{pre}{low_name}: {low!r} must be below {high_name} ({high!r}); "
            f"lower {low_name} or raise {high_name}"
        )


def load_power_config(data: Any, where: str = "power") -> PowerConfig:
    """Validate a scenario's ``power`` mapping (None: defaults) into a config."""
    return from_dict(PowerConfig, data, where)
