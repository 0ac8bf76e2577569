"""`gateway up`, the embedded default, as a user runs it: one command, Ctrl-C stops all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Config

from .conftest import free_port, processes_mentioning, run_gateway
from .receiver import Receiver

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "events.jsonl"


def test_gateway_up_delivers_end_to_end_and_sigint_stops_everything(
    tmp_path: Path, receiver: Receiver
) -> None:
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(GATEWAY_RETRY_DELAYS="1,2,3", PYTHONUNBUFFERED="1")  # (the session: up's own choice)
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "gateway", "up", "--port", str(port), "--metrics-port", str(metrics_port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 30
            while log.read_text().count("partitions assigned") < 4:
                assert up.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            text = log.read_text()
            assert f"127.0.0.1:{port}" in text and f":{metrics_port}/metrics" in text
            assert "gateway endpoints add" in text  # the next commands to try
            # No session set: the workers chose one for the bundled broker, a single node.
            assert 'event="consumer session chosen" session_ms=10000' in text, text
            config = Config(bootstrap_servers=f"127.0.0.1:{port}", retry_delays=(1, 2, 3))
            added = run_gateway(config, "endpoints", "add", "--json", "--bot-id",
                                "6434515b-8541-4861-bb24-8acd6e77e8c4", "--url", receiver.url("/up"))
            assert added.returncode == 0, added.stderr
            time.sleep(1)
            published = run_gateway(config, "publish", str(EXAMPLES))
            assert published.returncode == 0, published.stderr
            receiver.wait_for(lambda: len(receiver.at("/up")) >= 4, 20, "4 deliveries via gateway up")
            assert {r.event_id for r in receiver.at("/up")} == set(published.stdout.split())
            import urllib.request

            metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
            assert 'gateway_delivery_attempts_total{outcome="success"' in metrics
            assert len(processes_mentioning(f"tcp://127.0.0.1:{port}")) == 1  # the broker
        finally:
            # Ctrl-C in a terminal signals the whole foreground process group.
            os.killpg(up.pid, signal.SIGINT)
            code = up.wait(60)
    text = log.read_text()
    assert code == 0, text
    assert "stopped" in text
    assert processes_mentioning(f"tcp://127.0.0.1:{port}") == []
    json.dumps(text)  # the log is text


def test_gateway_up_refuses_a_taken_port(broker: Any) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "up", "--port", str(broker.port)],
        capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
    )
    assert result.returncode == 1
    assert "already in use" in result.stderr
