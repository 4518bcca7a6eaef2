"""A real Mosquitto per node: starts, answers MQTT 5, stops without leftovers."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from containers.broker import Broker, stop_recorded_brokers
from containers.netns import call_in_namespace
from tests.containers.support import free_port
from topology.commands import run
from topology.errors import EmulationError


def mqtt5_connects(host: str, port: int) -> bool:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5
    )
    try:
        client.connect(host, port, keepalive=5)
    except OSError:
        return False
    try:
        deadline = time.monotonic() + 3
        while not client.is_connected() and time.monotonic() < deadline:
            client.loop(timeout=0.05)
        return client.is_connected()
    finally:
        client.disconnect()


def port_is_free(port: int) -> bool:
    """Nothing listens on `port` (a closed connection in TIME_WAIT is fine)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_start_answers_mqtt5_and_stop_leaves_nothing(private_run_dir: Path) -> None:
    port = free_port()
    broker = Broker("t1", "127.0.0.1", port, namespace=None)
    broker.start()
    try:
        pid = broker.pid
        assert pid is not None and broker.is_running()
        assert mqtt5_connects("127.0.0.1", port)
        conf = broker.conf_path.read_text()
        assert f"listener {port} 127.0.0.1" in conf
        assert "persistence false" in conf and "set_tcp_nodelay true" in conf
    finally:
        broker.stop()
    assert not Path(f"/proc/{pid}").exists()
    assert not broker.pid_path.exists()
    assert port_is_free(port)
    assert broker.directory == private_run_dir / "brokers" / "t1"
    assert "running" in broker.log_tail()


def test_start_on_a_foreign_address_fails_with_the_log_tail() -> None:
    # 192.0.2.0/24 is TEST-NET-1: never configured here, so bind() fails.
    broker = Broker("t2", "192.0.2.1", free_port(), namespace=None)
    with pytest.raises(EmulationError, match=r"exited with status .*log tail:\n.*"):
        broker.start(timeout_s=5)
    assert not broker.is_running()
    assert "Cannot assign requested address" in broker.log_tail()


def test_starting_twice_is_refused() -> None:
    broker = Broker("t3", "127.0.0.1", free_port(), namespace=None).start()
    try:
        with pytest.raises(EmulationError, match="already running"):
            broker.start()
    finally:
        broker.stop()


def test_stop_never_kills_a_process_that_is_not_its_broker() -> None:
    broker = Broker("t4", "127.0.0.1", free_port(), namespace=None)
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        broker.directory.mkdir(parents=True)
        broker.pid_path.write_text(f"{bystander.pid}\n")
        broker.stop()
        assert bystander.poll() is None
        assert not broker.pid_path.exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_stop_recorded_brokers_stops_brokers_started_elsewhere() -> None:
    brokers = [
        Broker(f"r{i}", "127.0.0.1", free_port(), namespace=None).start()
        for i in range(2)
    ]
    pids = [b.pid for b in brokers]
    assert sorted(stop_recorded_brokers()) == ["r0", "r1"]
    for pid in pids:
        assert pid is not None
        deadline = time.monotonic() + 2
        while Path(f"/proc/{pid}/cmdline").exists() and time.monotonic() < deadline:
            if not Path(f"/proc/{pid}/cmdline").read_bytes():
                break  # a zombie of this process: gone as far as anyone cares
            time.sleep(0.01)
    for broker in brokers:
        broker.stop()


@pytest.fixture
def namespace() -> Iterator[str]:
    """A throwaway namespace smoe-tb<pid> with 198.18.0.1/32 on lo."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    name = f"smoe-tb{os.getpid()}"
    run(["ip", "netns", "add", name])
    try:
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        run(["ip", "-n", name, "addr", "add", "198.18.0.1/32", "dev", "lo"])
        yield name
    finally:
        run(["ip", "netns", "del", name])


@pytest.mark.root
def test_broker_in_a_namespace_listens_only_on_the_data_plane_address(
    namespace: str,
) -> None:
    broker = Broker("tb", "198.18.0.1", 1883, namespace=namespace).start()
    try:
        assert call_in_namespace(namespace, lambda: mqtt5_connects("198.18.0.1", 1883))
        assert not call_in_namespace(
            namespace, lambda: mqtt5_connects("127.0.0.1", 1883)
        )
        # Outside the namespace the address does not exist at all.
        assert not mqtt5_connects("198.18.0.1", 1883)
    finally:
        broker.stop()
    assert not broker.is_running()
