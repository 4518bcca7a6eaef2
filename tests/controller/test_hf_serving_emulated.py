"""A local Hugging Face MoE directory served across the emulated constellation.

The default scenario comes up in the private sandbox; run_inference (what
`spacemoe infer` does) cuts the directory into shards, places the experts
on the satellites nearest home, and generates through brokers inside the
satellites' namespaces. Tokens must equal the original model's, and each
step must take at least the propagation time to the nearest holder.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.deployment import run_inference
from controller.inference import MoeConfig
from tests.controller.hf_support import COMMON, save_hf_checkpoint

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A tiny Qwen3-MoE directory, built before the sandbox is entered.

    The sandbox can only leave its mount namespace from a process with no
    thread started inside it, so the threads torch and transformers start
    on first use (model construction, progress bars) must start out here.
    """
    import transformers

    source = tmp_path_factory.mktemp("hf") / "qwen3"
    save_hf_checkpoint(source, "qwen3_moe")
    transformers.utils.logging.disable_progress_bar()
    try:
        yield source
    finally:
        transformers.utils.logging.enable_progress_bar()


@pytest.fixture
def emulator(hf_dir: Path, net_sandbox: None) -> Iterator[object]:
    from topology.emulator import Emulator
    from topology.scenario import load_scenario

    emulator = Emulator(load_scenario(None))
    emulator.up()
    try:
        yield emulator
    finally:
        emulator.down()
        _join_helper_threads()


def _join_helper_threads(timeout_s: float = 10.0) -> None:
    """Wait for thread pools that transformers left to be collected."""
    gc.collect()
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join(timeout_s)


def test_hf_directory_across_the_emulated_constellation(hf_dir: Path, emulator) -> None:  # type: ignore[no-untyped-def]
    config = MoeConfig(checkpoint=str(hf_dir), k=4)

    report = run_inference("def main():", 6, config, emulator=emulator)

    assert report["reference"]["tokens_identical"]
    assert report["reference"]["max_abs_logit_diff"] <= 1e-5
    assert len(report["tokens"]) == 6
    nearest_s = min(report["path_delay_s"].values())
    for row in report["rows"]:
        # Each MoE layer waits for at least one round trip to a satellite.
        assert row["total_s"] > COMMON["num_hidden_layers"] * 2 * nearest_s
        assert row["network_s"] > 0
