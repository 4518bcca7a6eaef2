"""A circular orbit with a fixed Sun: controlled geometry for power tests.

Each satellite flies a circle of radius R + h in the x-y plane (phases
spread by `phase_deg`); the Sun sits at elevation beta above that plane.
Shadow is Earth's cylinder of radius R, the same rule the eclipse-fraction
formula assumes, so eclipse lengths are known in closed form.
"""

from __future__ import annotations

import math

import numpy as np

from containers.power import EARTH_RADIUS_KM

MU_KM3_S2 = 398600.4418
AU_KM = 149597870.7


class CircularOrbit:
    """Satisfies containers.fastforward.SunGeometry."""

    def __init__(
        self,
        n_sats: int = 1,
        altitude_km: float = 780.0,
        beta_deg: float | np.ndarray = 0.0,
        phase_deg: float | np.ndarray = 0.0,
    ) -> None:
        self.n_sats = n_sats
        self.names = [f"c{i}" for i in range(n_sats)]
        self.radius_km = EARTH_RADIUS_KM + altitude_km
        self.rate_rad_s = math.sqrt(MU_KM3_S2 / self.radius_km**3)
        self.period_s = 2 * math.pi / self.rate_rad_s
        self.beta_deg = np.broadcast_to(np.asarray(beta_deg, float), (n_sats,))
        self.phase_rad = np.radians(np.broadcast_to(phase_deg, (n_sats,)))

    def _sun_dirs(self) -> np.ndarray:
        b = np.radians(self.beta_deg)
        return np.stack([np.cos(b), np.zeros_like(b), np.sin(b)], axis=1)

    def positions_km(self, t_s: float) -> np.ndarray:
        angle = self.phase_rad + self.rate_rad_s * t_s
        return self.radius_km * np.stack(
            [np.cos(angle), np.sin(angle), np.zeros_like(angle)], axis=1
        )

    def sunlit(self, t_s: float) -> np.ndarray:
        r = self.positions_km(t_s)
        s = self._sun_dirs()
        along = np.einsum("ij,ij->i", r, s)
        across = np.linalg.norm(r - along[:, None] * s, axis=1)
        return np.asarray((along > 0) | (across > EARTH_RADIUS_KM))

    def sun_beta_deg(self, t_s: float) -> np.ndarray:
        return self.beta_deg.copy()

    def sun_position_km(self, t_s: float) -> np.ndarray:
        # Only meaningful when every satellite shares one beta.
        return np.asarray(self._sun_dirs()[0] * AU_KM)
