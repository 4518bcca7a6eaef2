"""A JSON-able picture of the constellation at one moment.

:func:`snapshot` is stateless: it builds the geometry afresh, so ground
stations take the nearest visible satellite at `t_s` (a running emulator
with sticky handover may hold an older one). :func:`state_to_dict` turns
a :class:`GeometryState` from a running `Geometry` into the same form, for
the run directory's ``state.json``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from topology.links import GSL, Geometry, GeometryState
from topology.orbits import Constellation
from topology.scenario import Scenario

KIND_NAMES = {0: "isl", 1: "gsl"}


def snapshot(scenario: Scenario, t_s: float) -> dict[str, Any]:
    """Every node and link of `scenario` at `t_s` seconds after its start."""
    stateless = replace(scenario, gsl=replace(scenario.gsl, handover="nearest"))
    geometry = Geometry(stateless)
    state = geometry.step(t_s)
    data = state_to_dict(geometry.constellation, state)
    data["scenario"] = scenario.name
    return data


def state_to_dict(constellation: Constellation, state: GeometryState) -> dict[str, Any]:
    """Plain data for one step: nodes and links, named, in scenario units."""
    c = constellation
    nodes = []
    for i, name in enumerate(c.names):
        satellite = i < c.n_sats
        node: dict[str, Any] = {
            "name": name,
            "kind": "satellite" if satellite else "ground",
            "label": c.labels[i],
            "position_km": [round(float(v), 4) for v in state.positions_km[i]],
            "lat_deg": round(float(state.lat_deg[i]), 5),
            "lon_deg": round(float(state.lon_deg[i]), 5),
            "alt_km": round(float(state.alt_km[i]), 4),
            "sunlit": bool(state.sunlit[i]),
        }
        if satellite:
            node["shell"] = int(c.shell[i])
            node["plane"] = int(c.plane[i])
            node["slot"] = int(c.slot[i])
        nodes.append(node)

    links = state.links
    link_list = [
        {
            "a": c.names[int(links.a[j])],
            "b": c.names[int(links.b[j])],
            "kind": KIND_NAMES[int(links.kind[j])],
            "up": bool(links.up[j]),
            "range_km": round(float(links.range_km[j]), 4),
            "delay_s": float(links.delay_s[j]),
            "rate_bps": float(links.rate_bps[j]),
            "loss_fraction": float(links.loss_fraction[j]),
        }
        for j in range(len(links))
    ]
    return {
        "t_s": state.t_s,
        "utc": state.when.isoformat().replace("+00:00", "Z"),
        "nodes": nodes,
        "links": link_list,
        "gsl_count": int((links.kind == GSL).sum()),
    }
