"""`gateway up --data DIR` and `gateway broker --data DIR`: Apache Kafka from its jars, keeping
its data across restarts; the in-memory default saying, in its banner, that it does not;
and the errors a user meets without Java or Maven, with a port taken, or with --data and
--bootstrap at once."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.config import Config
from gateway.errors import Unavailable
from gateway.store import Topics
from gateway.streaming import KafkaNode, find_java, kafka_jars, kafka_version, port_in_use

from .conftest import free_port, processes_mentioning, run_gateway
from .receiver import Receiver

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "events.jsonl"
BOT = "6434515b-8541-4861-bb24-8acd6e77e8c4"
TOKEN = "up-data-token-" + "z" * 24


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return env | {"PYTHONUNBUFFERED": "1"} | extra


def broker_port() -> int:
    """A free port whose next one (Apache Kafka's controller) is free too."""
    while True:
        port = free_port()
        if port < 65535 and not port_in_use("127.0.0.1", port + 1):
            return port


class Running:
    """A `gateway` command run as a user runs it, in its own process group (a Ctrl-C in a
    terminal signals the whole group), its output in a file."""

    def __init__(self, log: Path, *args: str, env: dict[str, str]) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "gateway", *args], stdout=out,
                                            stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.text():
            assert self.process.poll() is None, self.text()
            assert time.monotonic() < deadline, self.text()
            time.sleep(0.1)
        return self.text()

    def interrupt(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
        return self.process.wait(timeout)


@pytest.fixture
def running() -> Iterator[list[Running]]:
    """Every command a test starts, interrupted at its end if the test did not stop it."""
    started: list[Running] = []
    yield started
    for command in started:
        if command.process.poll() is None:
            command.interrupt()


# -- keeping the data -------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.brokers("kafka")
@pytest.mark.timeout(180)
def test_up_with_data_keeps_the_endpoint_and_the_dead_letter_across_a_restart(
    broker_kind: str, tmp_path: Path, receiver: Receiver, running: list[Running]
) -> None:
    """Register an endpoint, let an event to it fail into the dead-letter topic, stop
    `gateway up --data DIR` with Ctrl-C and start it again on DIR: the endpoint and the
    dead letter are there, for the command line and the API, and nothing is sent again."""
    data = tmp_path / "data"
    port, metrics_port, api_port = broker_port(), free_port(), free_port()
    args = ("up", "--data", str(data), "--port", str(port), "--metrics-port", str(metrics_port),
            "--api-port", str(api_port))
    env = clean_env(GATEWAY_RETRY_DELAYS="1,2", GATEWAY_API_TOKENS=TOKEN)
    config = Config(bootstrap_servers=f"127.0.0.1:{port}", retry_delays=(1, 2), allow_private_networks=True)
    receiver.respond("/hook", lambda request, seen: 400)
    one_event = tmp_path / "event.jsonl"
    one_event.write_text(EXAMPLES.read_text().splitlines()[0] + "\n")

    first = Running(tmp_path / "first.log", *args, env=env)
    running.append(first)
    banner = first.wait_for("Ctrl-C stops everything", 120)
    assert f"Apache Kafka {kafka_version()} on 127.0.0.1:{port}" in banner, banner
    assert f"{data.resolve()}  (a restart on it keeps every endpoint and dead letter)" in banner
    assert "formatting" in banner and "forgets" not in banner

    added = run_gateway(config, "endpoints", "add", "--json", "--bot-id", BOT, "--url", receiver.url("/hook"))
    assert added.returncode == 0, added.stderr
    endpoint = json.loads(added.stdout)
    published = run_gateway(config, "publish", str(one_event))
    assert published.returncode == 0, published.stderr
    (event_id,) = published.stdout.split()
    deadline = time.monotonic() + 60
    while True:
        listed = run_gateway(config, "dlq", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        if listed.stdout.strip():
            break
        assert time.monotonic() < deadline, first.text()[-3000:]
        time.sleep(1)
    (dead,) = map(json.loads, listed.stdout.splitlines())
    assert len(receiver.at("/hook")) == 3  # the attempt and two retries, each answered 400

    assert first.interrupt() == 0, first.text()[-3000:]
    assert processes_mentioning(str(data.resolve() / "server.properties")) == []  # the broker stopped too

    second = Running(tmp_path / "second.log", *args, env=env)
    running.append(second)
    banner = second.wait_for("Ctrl-C stops everything", 90)
    assert "formatting" not in banner  # the same cluster, on the same log
    endpoints = run_gateway(config, "endpoints", "list", "--json")
    assert endpoints.returncode == 0, endpoints.stderr
    assert [(e["id"], e["url"], e["enabled"]) for e in map(json.loads, endpoints.stdout.splitlines())] == [
        (endpoint["id"], receiver.url("/hook"), True)]
    again = run_gateway(config, "dlq", "list", "--json")
    assert again.returncode == 0, again.stderr
    assert list(map(json.loads, again.stdout.splitlines())) == [dead]
    assert event_id in again.stdout
    with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=30,
                      headers={"authorization": f"Bearer {TOKEN}"}) as api:
        listed_by_api, dead_by_api = api.get("/v1/endpoints"), api.get("/v1/dead-letters")
    assert listed_by_api.status_code == 200, listed_by_api.text
    assert [e["id"] for e in listed_by_api.json()["data"]] == [endpoint["id"]]
    assert dead_by_api.status_code == 200, dead_by_api.text
    assert len(dead_by_api.json()["data"]) == 1
    assert len(receiver.at("/hook")) == 3  # every offset was committed: nothing is sent again
    assert second.interrupt() == 0, second.text()[-3000:]


@pytest.mark.integration
@pytest.mark.brokers("kafka")
@pytest.mark.timeout(120)
def test_gateway_broker_with_data_keeps_its_topics_and_stops_cleanly(
    broker_kind: str, tmp_path: Path, running: list[Running]
) -> None:
    data = tmp_path / "data"
    port = broker_port()
    config = Config(bootstrap_servers=f"127.0.0.1:{port}", topic_prefix="kept", partitions=2)
    topics = len(Topics.from_config(config).all())
    for turn, expected in ((1, "created"), (2, "exists")):
        broker = Running(tmp_path / f"broker-{turn}.log", "broker", "--data", str(data), "--port", str(port),
                         env=clean_env())
        running.append(broker)
        broker.wait_for(f"Apache Kafka {kafka_version()} listening on 127.0.0.1:{port}", 90)
        created = run_gateway(config, "topics", "create")
        assert created.returncode == 0, created.stderr
        assert created.stdout.count(expected) == topics, created.stdout
        broker.process.send_signal(signal.SIGTERM)
        assert broker.process.wait(60) == 0, broker.text()
        assert "broker stopped" in broker.text()
        assert not port_in_use("127.0.0.1", port) and not port_in_use("127.0.0.1", port + 1)


# -- the in-memory default says so -------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.brokers("tansu")
def test_up_in_memory_says_in_one_line_that_a_restart_forgets_everything(
    broker_kind: str, tmp_path: Path, running: list[Running]
) -> None:
    up = Running(tmp_path / "up.log", "up", "--port", str(free_port()), "--metrics-port", str(free_port()),
                 "--no-api", env=clean_env())
    running.append(up)
    banner = up.wait_for("Ctrl-C stops everything", 45)
    [line] = [line for line in banner.splitlines() if "forgets" in line]
    assert line.strip() == ("data      in memory: a restart forgets every endpoint and dead letter "
                            "(--data DIR keeps them)")
    assert up.interrupt() == 0, up.text()


# -- what a user meets without Java or Maven, or with a port taken --------------------------------


def fake_java(folder: Path, version: str) -> Path:
    """A `java` that only says its version, as `java -version` does (on stderr)."""
    folder.mkdir(parents=True, exist_ok=True)
    java = folder / "java"
    java.write_text(f"#!/bin/sh\necho 'openjdk version \"{version}\" 2021-01-19' >&2\n")
    java.chmod(java.stat().st_mode | stat.S_IEXEC)
    return java


@pytest.mark.parametrize("command", ["up", "broker"])
def test_without_java_data_says_what_to_install_and_that_the_default_needs_none(
    tmp_path: Path, command: str
) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    data = tmp_path / "data"
    env = {k: v for k, v in clean_env(PATH=str(empty)).items() if k != "JAVA_HOME"}
    result = subprocess.run([sys.executable, "-m", "gateway", command, "--data", str(data), "--port",
                             str(broker_port())], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 1, result.stderr
    assert "error: Apache Kafka needs Java 17 or newer, and no java was found" in result.stderr
    assert "apt install openjdk-17-jre-headless" in result.stderr
    assert "without --data run the bundled in-memory broker, which needs neither Java nor Maven" in result.stderr
    assert "Traceback" not in result.stderr
    assert not data.exists()  # refused before anything was made


def test_an_older_java_is_refused_with_its_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_java(tmp_path / "path", "11.0.2")
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(Unavailable, match=r"needs Java 17 or newer, and .*/path/java is Java 11: install"):
        find_java()
    fake_java(tmp_path / "home" / "bin", "1.8.0_292")  # JAVA_HOME first, as Kafka's scripts do
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "home"))
    with pytest.raises(Unavailable, match="is Java 8: install"):
        find_java()
    fake_java(tmp_path / "new" / "bin", "21.0.1")
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "new"))
    assert find_java() == str(tmp_path / "new" / "bin" / "java")


def test_without_maven_the_first_fetch_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_java(tmp_path / "bin", "17.0.15")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no jars cached there
    with pytest.raises(Unavailable, match=r"jars are not in .*/cache/webhook-gateway/kafka/.* yet, and fetching "
                                          r"them \(once\) needs Maven, which is not on PATH: install it"):
        kafka_jars()
    with pytest.raises(Unavailable, match="needs Maven"):
        KafkaNode(tmp_path / "data", port=broker_port()).start()
    assert not (tmp_path / "data").exists()


def test_a_taken_port_is_refused_before_java_is_looked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no java: the port is what the user hears of
    port = broker_port()
    for taken, listener in ((port, "PLAINTEXT"), (port + 1, "CONTROLLER")):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", taken))
            sock.listen()
            with pytest.raises(Unavailable, match=f"port {taken} on 127.0.0.1 .Apache Kafka's {listener} listener. "
                                                  "is already in use"):
                KafkaNode(tmp_path / "data", port=port).start()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        result = subprocess.run([sys.executable, "-m", "gateway", "up", "--data", str(tmp_path / "data"),
                                 "--port", str(port)], capture_output=True, text=True, timeout=60, env=clean_env())
    assert result.returncode == 1 and "already in use" in result.stderr, result.stderr


def test_data_with_an_existing_kafka_is_a_usage_error(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "gateway", "up", "--data", str(tmp_path / "data"),
                             "--bootstrap", f"127.0.0.1:{free_port()}"],
                            capture_output=True, text=True, timeout=60, env=clean_env())
    assert result.returncode == 2, result.stderr
    assert "--data" in result.stderr and "cannot be combined with --bootstrap" in result.stderr


def test_an_instance_id_with_the_bundled_broker_is_refused_with_the_reason(tmp_path: Path) -> None:
    """The bundled broker fails with static group membership: `gateway up` says so rather
    than start workers whose groups misbehave."""
    result = subprocess.run([sys.executable, "-m", "gateway", "up", "--instance-id", "gw-0",
                             "--port", str(free_port())],
                            capture_output=True, text=True, timeout=60, env=clean_env(), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "static group membership" in result.stderr and "GATEWAY_INSTANCE_ID" in result.stderr, result.stderr
