"""Exporters: names follow the conventions and promtool accepts the output."""

from __future__ import annotations

import math
import subprocess
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from monitoring.exposition import render
from monitoring.metrics import (
    METRICS,
    EmulatorMetrics,
    InferenceMetrics,
    SatelliteMetrics,
    serve,
)
from topology.errors import EmulationError

POWER = {
    "solar_w": 180.0,
    "load_bus_w": 40.0,
    "load_compute_w": 55.0,
    "load_radio_w": 12.0,
    "battery_w": 73.0,
    "soc_fraction": 0.64,
    "battery_energy_j": 230_000.0,
    "capacity_fade_fraction": 0.003,
    "temperature_c": 31.5,
    "throttle_factor": 1.0,
    "sunlit": 1.0,
    "energy_consumed_j": 5_000.0,
    "energy_harvested_j": 9_000.0,
}


def promtool_problems(text: bytes) -> str:
    proc = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, check=False
    )
    return (proc.stdout + proc.stderr).decode().strip() if proc.returncode else ""


def satellite_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    sat = SatelliteMetrics(registry, "s0-1")
    sat.set_power(**POWER)
    sat.observe_request(2, 5, "ok", 0.012, 0.009, 8192, 8192)
    sat.observe_request(2, 6, "error", 0.001, 0.0, 8192, 0)
    sat.set_queue_length(2)
    sat.set_shards(6, 12_582_912)
    return registry


def emulator_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    emu = EmulatorMetrics(registry, power_satellites=["s0-1", "s0-2"])
    emu.links.update(
        ["isl-0", "gsl-0"],
        ["isl", "gsl"],
        ["s0-1", "s0-2"],
        ["s0-2", "oslo"],
        delay_s=[0.0135, 0.0031],
        rate_bps=[100e6, 50e6],
        up=[True, False],
        loss_fraction=[0.0, 0.01],
        tx_bytes_ab=[1000, 0],
        tx_bytes_ba=[2000, 0],
        dropped_packets_ab=[0, 3],
        dropped_packets_ba=[0, 0],
    )
    emu.nodes.update(
        ["s0-1", "oslo"],
        ["satellite", "ground"],
        lat_deg=[45.0, 59.91],
        lon_deg=[-170.0, 10.75],
        alt_m=[780e3, 20.0],
    )
    assert emu.power is not None
    emu.power.update(**{k: [v, v] for k, v in POWER.items()})
    emu.step_done(1.77e9, 0.004, 0.001, 3, {"up": 1, "delay": 12})
    return registry


def inference_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    inf = InferenceMetrics(registry)
    inf.observe_token(0.21, {"network": 0.12, "expert_compute": 0.05}, 24_576)
    inf.count_prompt_tokens(17)
    inf.request_done("ok", 2.4)
    inf.set_placement({(0, 1): ["s0-1", "s0-2"], (1, 3): ["s0-4"]}, migrations=3)
    return registry


@pytest.mark.parametrize(
    "build", [satellite_registry, emulator_registry, inference_registry]
)
def test_promtool_accepts_each_exporter(build) -> None:  # type: ignore[no-untyped-def]
    text = generate_latest(build())
    assert b"spacemoe_" in text
    assert promtool_problems(text) == ""


def test_promtool_catches_a_bad_name() -> None:
    # The check above must be able to fail.
    bad = b"# HELP x_ms t\n# TYPE x_ms counter\nx_ms 1\n"
    assert promtool_problems(bad) != ""


def test_table_follows_naming_conventions() -> None:
    for name, spec in METRICS.items():
        assert name.startswith("spacemoe_")
        assert name.endswith("_total") == (spec.kind == "counter"), name
        assert spec.help.endswith("."), name
        assert "satellite" not in spec.labels or spec.labels[0] == "satellite"


def test_every_defined_metric_is_exported() -> None:
    exported = set()
    for build in (satellite_registry, emulator_registry, inference_registry):
        for family in text_string_to_metric_families(generate_latest(build()).decode()):
            exported.add(family.name + ("_total" if family.type == "counter" else ""))
    created = {n for n in exported if n.endswith("_created")}
    assert exported - created == set(METRICS)


def test_agent_and_vectorised_power_export_the_same_series() -> None:
    agent = generate_latest(satellite_registry()).decode()
    central = generate_latest(emulator_registry()).decode()
    line = 'spacemoe_battery_soc_ratio{satellite="s0-1"} 0.64'
    assert line in agent and line in central
    assert 'spacemoe_load_power_watts{satellite="s0-2",subsystem="compute"} 55.0' in (
        central
    )


def test_link_rates_are_exported_in_bytes_per_second() -> None:
    text = generate_latest(emulator_registry()).decode()
    assert (
        'spacemoe_link_rate_bytes_per_second{a="s0-1",b="s0-2",kind="isl",'
        'link="isl-0"} 1.25e+07' in text
    )
    assert 'spacemoe_link_up{a="s0-2",b="oslo",kind="gsl",link="gsl-0"} 0.0' in text
    assert (
        'spacemoe_link_transmit_bytes_total{dst="s0-1",kind="isl",link="isl-0",'
        'src="s0-2"} 2000.0' in text
    )


def test_link_update_rejects_misaligned_arrays() -> None:
    emu = EmulatorMetrics(CollectorRegistry())
    with pytest.raises(ValueError, match="delay_s: got 1 values, expected 2"):
        emu.links.update(
            ["l0", "l1"], ["isl"] * 2, ["a", "b"], ["b", "c"],
            delay_s=[0.01], rate_bps=[1e6, 1e6], up=[1, 1],
        )  # fmt: skip


def test_placement_forgets_moved_replicas() -> None:
    registry = CollectorRegistry()
    inf = InferenceMetrics(registry)
    inf.set_placement({(0, 0): ["s0-1"]})
    inf.set_placement({(0, 0): ["s0-2"]}, migrations=1)
    text = generate_latest(registry).decode()
    assert 'node="s0-2"' in text
    assert 'node="s0-1"' not in text


def test_unknown_latency_component_is_rejected() -> None:
    inf = InferenceMetrics(CollectorRegistry())
    with pytest.raises(ValueError, match="unknown latency components"):
        inf.observe_token(0.1, {"netwrok": 0.1}, 100)


def test_nothing_is_registered_globally() -> None:
    from prometheus_client import REGISTRY

    SatelliteMetrics(CollectorRegistry(), "s9-9")
    names = {m.name for m in REGISTRY.collect()}
    assert not any(n.startswith("spacemoe_") for n in names)


def test_serve_exposes_the_registry_and_stops() -> None:
    exporter = serve(satellite_registry(), "127.0.0.1", 0)
    try:
        url = f"http://{exporter.target}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read()
        assert promtool_problems(body) == ""
        assert b'spacemoe_expert_requests_total{expert="5"' in body
        assert b"_created" not in body
        with pytest.raises(EmulationError, match="cannot serve metrics"):
            serve(CollectorRegistry(), "127.0.0.1", exporter.port)
    finally:
        exporter.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{exporter.target}/metrics", timeout=2)


@pytest.mark.parametrize(
    "build", [satellite_registry, emulator_registry, inference_registry]
)
def test_fast_rendering_equals_prometheus_client(build) -> None:  # type: ignore[no-untyped-def]
    registry = build()
    fast = render(registry)
    assert promtool_problems(fast) == ""
    assert _samples(fast) == _samples(generate_latest(registry))


def test_fast_rendering_escapes_labels_and_spells_non_finite_values() -> None:
    registry = CollectorRegistry()
    emu = EmulatorMetrics(registry)
    emu.nodes.update(
        ['odd"name\\x'], ["ground"], lat_deg=[math.nan], lon_deg=[math.inf], alt_m=[0]
    )
    text = render(registry)
    assert b'node="odd\\"name\\\\x"' in text
    assert b" NaN\n" in text and b" +Inf\n" in text
    assert _samples(text) == _samples(generate_latest(registry))


def _samples(text: bytes) -> set[tuple[str, tuple[tuple[str, str], ...], str]]:
    out = set()
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            # NaN != NaN, so compare values by their spelling.
            out.add((s.name, tuple(sorted(s.labels.items())), repr(s.value)))
    return out
