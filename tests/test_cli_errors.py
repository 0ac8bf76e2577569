"""How `gateway` reports failures it did not cause itself: which OSError is which.

These run the command line in-process (click's runner) with the slow parts replaced, so
an OSError can be raised exactly where a real one would come from.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner, Result

import gateway.cli
import gateway.store
import gateway.streaming
from gateway.cli import cli


@pytest.fixture(autouse=True)
def quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    # The command would point the root logger at the runner's captured stderr, which
    # is closed once the command returns.
    monkeypatch.setattr(gateway.cli, "configure_logging", lambda *args, **kwargs: None)
    for name in ("GATEWAY_BOOTSTRAP_SERVERS", "GATEWAY_METRICS_PORT", "GATEWAY_TOPIC_PREFIX"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def raising(exc: BaseException) -> Any:
    def fake(*args: Any, **kwargs: Any) -> Any:
        raise exc
    return fake


def never_called(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the workers ran although the metrics port could not be bound")


def test_run_names_an_oserror_that_is_not_the_metrics_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway.streaming, "run", raising(OSError(errno.EMFILE, "Too many open files")))
    result = invoke("run", "--no-metrics")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ")
    assert "Too many open files" in result.stderr
    assert "metrics" not in result.stderr


def test_run_says_when_the_metrics_port_is_taken(monkeypatch: pytest.MonkeyPatch, taken_port: int) -> None:
    monkeypatch.setattr(gateway.streaming, "run", never_called)
    result = invoke("run", "--metrics-port", str(taken_port))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: metrics port {taken_port}: ")
    assert "in use" in result.stderr


def test_up_names_an_oserror_that_is_not_the_metrics_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway.store, "create_topics",
                        raising(OSError(errno.ENOSPC, "No space left on device")))
    result = invoke("up", "--bootstrap", "127.0.0.1:1")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ")
    assert "No space left on device" in result.stderr
    assert "metrics" not in result.stderr


def test_up_says_when_the_metrics_port_is_taken(monkeypatch: pytest.MonkeyPatch, taken_port: int) -> None:
    monkeypatch.setattr(gateway.store, "create_topics", lambda config, **kwargs: [])
    monkeypatch.setattr(gateway.streaming, "run", never_called)
    result = invoke("up", "--bootstrap", "127.0.0.1:1", "--metrics-port", str(taken_port))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: metrics port {taken_port}: ")
    assert "in use" in result.stderr


def test_usage_errors_keep_exit_code_2() -> None:
    result = invoke("endpoints", "add", "--bot-id", "6434515b-8541-4861-bb24-8acd6e77e8c4")
    assert result.exit_code == 2
    assert "--url" in result.stderr
