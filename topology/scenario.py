"""Scenario files: what constellation to build and how to emulate it.

A scenario is one YAML file (see `topology/scenarios/default.yaml`, which
documents every field). Every section is a frozen dataclass validated on
load by :func:`topology.config.from_dict`; the sections that belong to the
inference controller (`moe`) and to the satellite power model (`power`) are
kept as mappings here and validated by their owners' dataclasses, so this
module does not depend on torch.

Times are UTC. Distances are kilometres, rates bits per second, delays
seconds, angles degrees, as the field names say.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml

from topology.config import from_dict, spec, to_dict
from topology.errors import ConfigError

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
DEFAULT_SCENARIO = SCENARIO_DIR / "default.yaml"

# Node names become part of namespace names (`smoe-<name>`), so keep them
# short and shell-safe.
NODE_NAME = re.compile(r"^[a-z][a-z0-9-]{0,15}$")


@dataclass(frozen=True)
class TimeConfig:
    start_utc: str = field(
        default="2026-03-20T12:00:00Z",
        metadata=spec(help="scenario epoch, ISO 8601 in UTC"),
    )
    step_s: float = field(
        default=1.0, metadata=spec(min=0.01, max=3600, help="timestep length")
    )
    speed: float = field(
        default=1.0,
        metadata=spec(min=0.01, max=10000, help="scenario seconds per wall second"),
    )
    duration_s: float | None = field(
        default=None,
        metadata=spec(min=0, help="stop after this much scenario time; null: run on"),
    )

    def start(self) -> datetime:
        """The epoch as an aware UTC datetime."""
        text = self.start_utc.replace("Z", "+00:00")
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            raise ConfigError(
                f"time.start_utc: {self.start_utc!r} is not an ISO 8601 time; "
                "write it like '2026-03-20T12:00:00Z'"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return when.astimezone(UTC)

    def validate(self, where: str) -> None:
        self.start()


@dataclass(frozen=True)
class ShellConfig:
    """One shell of satellites: Walker parameters, or a TLE file."""

    kind: Literal["walker-delta", "walker-star", "tle"] = "walker-delta"
    planes: int = field(default=6, metadata=spec(min=1, max=1000))
    sats_per_plane: int = field(default=11, metadata=spec(min=1, max=1000))
    phasing: int = field(
        default=1,
        metadata=spec(min=0, help="Walker F: relative phase between adjacent planes"),
    )
    altitude_km: float = field(default=780.0, metadata=spec(min=160, max=40000))
    inclination_deg: float = field(default=86.4, metadata=spec(min=0, max=180))
    raan_offset_deg: float = field(default=0.0, metadata=spec(min=-360, max=360))
    tle_file: str | None = field(
        default=None, metadata=spec(help="path to a TLE file, for kind: tle")
    )

    def validate(self, where: str) -> None:
        if self.kind == "tle" and not self.tle_file:
            raise ConfigError(
                f"{where}.tle_file: a shell of kind 'tle' needs tle_file; "
                "give the path of a two- or three-line element file"
            )
        if self.kind != "tle" and self.phasing >= self.planes:
            raise ConfigError(
                f"{where}.phasing: {self.phasing} must be below planes "
                f"({self.planes}); Walker phasing F runs from 0 to planes-1"
            )


@dataclass(frozen=True)
class GroundStationConfig:
    name: str = "gs"
    lat_deg: float = field(default=0.0, metadata=spec(min=-90, max=90))
    lon_deg: float = field(default=0.0, metadata=spec(min=-180, max=180))
    alt_m: float = field(default=0.0, metadata=spec(min=-500, max=9000))
    partition: int | None = field(
        default=None,
        metadata=spec(
            min=0,
            help="host (index into emulation.partitions) that runs this station; "
            "null: station i goes to host i mod hosts",
        ),
    )

    def validate(self, where: str) -> None:
        if not NODE_NAME.match(self.name) or self.name.startswith("s"):
            raise ConfigError(
                f"{where}.name: {self.name!r} is not a usable station name; use "
                "1-16 lowercase letters, digits or '-', starting with a letter "
                "other than 's' (names starting with 's' are kept for satellites)"
            )


@dataclass(frozen=True)
class IslConfig:
    enabled: bool = True
    rate_bps: float = field(default=100e6, metadata=spec(min=1e3, max=1e12))
    loss_fraction: float = field(default=0.0, metadata=spec(min=0, max=1))
    max_range_km: float = field(default=5000.0, metadata=spec(min=1))
    grazing_altitude_km: float = field(
        default=80.0,
        metadata=spec(min=0, help="line of sight must clear Earth by this height"),
    )
    max_latitude_deg: float | None = field(
        default=None,
        metadata=spec(
            min=0, max=90, help="inter-plane links switch off above this latitude"
        ),
    )
    cross_seam: bool = field(
        default=False,
        metadata=spec(
            help="link counter-rotating planes across the seam (walker-star)"
        ),
    )


@dataclass(frozen=True)
class GslConfig:
    rate_bps: float = field(default=50e6, metadata=spec(min=1e3, max=1e12))
    loss_fraction: float = field(default=0.0, metadata=spec(min=0, max=1))
    min_elevation_deg: float = field(default=25.0, metadata=spec(min=0, max=90))
    handover: Literal["nearest", "sticky"] = field(
        default="sticky",
        metadata=spec(
            help="nearest: always the closest visible satellite; "
            "sticky: keep a satellite until it sets below min elevation"
        ),
    )


@dataclass(frozen=True)
class EmulationConfig:
    shaping: Literal["auto", "netem", "delayline"] = field(
        default="auto",
        metadata=spec(
            help="auto: netem where the kernel has it, else tbf + user-space delay line"
        ),
    )
    nodes: Literal["namespace", "docker"] = field(
        default="namespace",
        metadata=spec(
            help="namespace: each node a named network namespace; docker: each "
            "node a container of our own dockerd (topology/dockernodes.py)"
        ),
    )
    node_cpus: float | None = field(
        default=None,
        metadata=spec(
            min=0.01, help="docker nodes: CPUs per container (--cpus); null: no limit"
        ),
    )
    node_memory_bytes: int | None = field(
        default=None,
        metadata=spec(
            min=6 * 2**20,
            help="docker nodes: memory per container (--memory); null: no limit",
        ),
    )
    delay_threshold_s: float = field(
        default=1e-4,
        metadata=spec(min=0, help="skip delay changes smaller than this"),
    )
    route_hysteresis_fraction: float = field(
        default=0.05,
        metadata=spec(
            min=0, max=1, help="keep a route unless another is this much shorter"
        ),
    )
    route_hysteresis_s: float = field(
        default=2e-4,
        metadata=spec(min=0, help="... and at least this many seconds shorter"),
    )
    route_refresh_steps: int = field(
        default=1,
        metadata=spec(
            min=1,
            max=100,
            help="recompute 1/k of the shortest-path trees per step (plus every "
            "tree a link change touches); 1 recomputes all every step",
        ),
    )
    node_prefix: str = field(
        default="198.18.0.0/17", metadata=spec(help="stable /32 node addresses")
    )
    management_prefix: str = field(
        default="198.18.128.0/17",
        metadata=spec(help="out-of-band management network (never shaped)"),
    )
    link_prefix: str = field(
        default="198.19.0.0/16", metadata=spec(help="one /31 per link")
    )
    partitions: list[str] = field(
        default_factory=list,
        metadata=spec(
            help="underlay IPv4 address of each host that runs a share of the "
            "nodes; empty: one machine runs everything"
        ),
    )
    partition_index: int = field(
        default=0,
        metadata=spec(
            min=0, help="which of `partitions` this host is (`up --partition`)"
        ),
    )
    vxlan_port: int = field(
        default=4789,
        metadata=spec(min=1, max=65535, help="UDP port of cross-host VXLAN links"),
    )

    def validate(self, where: str) -> None:
        if self.nodes != "docker":
            for name in ("node_cpus", "node_memory_bytes"):
                if getattr(self, name) is not None:
                    raise ConfigError(
                        f"{where}.{name}: {getattr(self, name)!r} limits a "
                        "container, but nodes is 'namespace'; set nodes: docker "
                        f"or remove {name}"
                    )
        seen: set[ipaddress.IPv4Address] = set()
        for i, text in enumerate(self.partitions):
            try:
                address = ipaddress.IPv4Address(text)
            except ValueError:
                raise ConfigError(
                    f"{where}.partitions[{i}]: {text!r} is not an IPv4 address; "
                    "give each host's underlay address, like '10.0.0.11'"
                ) from None
            if address.is_unspecified or address.is_multicast:
                raise ConfigError(
                    f"{where}.partitions[{i}]: {text} cannot be a host's unicast "
                    "underlay address; give the address the host's VXLAN traffic "
                    "leaves from"
                )
            if address in seen:
                raise ConfigError(
                    f"{where}.partitions: {text} appears twice; each host needs "
                    "its own address"
                )
            seen.add(address)
        hosts = max(len(self.partitions), 1)
        if self.partition_index >= hosts:
            raise ConfigError(
                f"{where}.partition_index: {self.partition_index} is out of range "
                f"for {len(self.partitions)} partitions; use 0 to {hosts - 1}"
            )


@dataclass(frozen=True)
class Scenario:
    name: str = "default"
    time: TimeConfig = TimeConfig()
    shells: list[ShellConfig] = field(default_factory=lambda: [ShellConfig()])
    ground_stations: list[GroundStationConfig] = field(default_factory=list)
    isl: IslConfig = IslConfig()
    gsl: GslConfig = GslConfig()
    emulation: EmulationConfig = EmulationConfig()
    moe: dict[str, Any] = field(default_factory=dict)
    power: dict[str, Any] = field(default_factory=dict)
    source: str = field(default="", metadata=spec(help="set by the loader"))

    def validate(self, where: str) -> None:
        if not self.shells:
            raise ConfigError("shells: at least one shell is needed")
        names = [g.name for g in self.ground_stations]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(
                f"ground_stations: duplicate names {dupes}; give each station "
                "its own name"
            )
        hosts = max(len(self.emulation.partitions), 1)
        for i, station in enumerate(self.ground_stations):
            if station.partition is not None and station.partition >= hosts:
                raise ConfigError(
                    f"ground_stations[{i}].partition: {station.partition} is out "
                    f"of range for {len(self.emulation.partitions)} partitions; "
                    f"use 0 to {hosts - 1} or null"
                )

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as written next to each run's results."""
        data: dict[str, Any] = to_dict(self)
        return data


def load_scenario(path: str | Path | None = None) -> Scenario:
    """Read and validate a scenario file; `None` loads the built-in default.

    Relative `tle_file` paths are taken relative to the scenario file.
    """
    path = Path(path) if path is not None else DEFAULT_SCENARIO
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(
            f"scenario {str(path)!r}: cannot read it ({exc.strerror}); "
            "give the path of a scenario YAML file"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"scenario {str(path)!r}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"scenario {str(path)!r}: expected a mapping at top level")

    for shell in data.get("shells") or []:
        tle = isinstance(shell, dict) and shell.get("tle_file")
        if isinstance(tle, str) and not Path(tle).is_absolute():
            shell["tle_file"] = str((path.parent / tle).resolve())
    data["source"] = str(path.resolve())
    return from_dict(Scenario, data)
