"""A real single-node Apache Kafka broker for the tests and the benchmark: KRaft, broker
and controller in one JVM, run from Maven Central's jars (``kafka/pom.xml``), with no
tarball and no Docker.

* :func:`kafka_jars` resolves the jars with Maven into ``.cache/kafka/<version>/`` (git
  ignores it; the first time takes a few seconds, later runs reuse it).
* :class:`KafkaNode` picks free ports, writes ``server.properties`` (the shared settings of
  ``kafka/broker.properties``, the listeners, and the test-speed settings below) into a
  fresh data directory, formats it, starts the broker and waits until a real client's
  metadata request answers. It stops it cleanly (SIGTERM) or kills it (SIGKILL), and starts
  it again on the same data directory and ports.

Measured here (2 cores): format 0.9 s, start to ready 2-3 s, about 210 MB resident; a
restart after SIGKILL recovers every acknowledged record in about 4 s.

``python tests/apache_kafka.py jars`` resolves the jars (``.ci/run`` does, so a missing
Java or Maven fails CI before any test); ``python tests/apache_kafka.py run`` runs a
broker in the foreground until Ctrl-C.
"""

from __future__ import annotations

import base64
import contextlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import TracebackType

__all__ = ["TEST_SPEED", "KafkaError", "KafkaNode", "broker_properties", "kafka_jars", "kafka_version"]

ROOT = Path(__file__).resolve().parents[1]
KAFKA = ROOT / "kafka"
CACHE = ROOT / ".cache" / "kafka"

TEST_SPEED = {
    # A restart after SIGKILL is refused (DUPLICATE_BROKER_REGISTRATION) until the old
    # broker session expires: 9 s by default, 2 s here (measured: restart 12 s -> 4 s).
    "broker.session.timeout.ms": "2000",
    "broker.heartbeat.interval.ms": "500",
    # The tests' workers use a 2 s session (Kafka's minimum is 6 s) so that a killed
    # worker's partitions move within seconds.
    "group.min.session.timeout.ms": "1000",
    # KIP-848 groups: the broker sets heartbeat and session.
    "group.consumer.min.heartbeat.interval.ms": "500",
    "group.consumer.heartbeat.interval.ms": "500",
    "group.consumer.min.session.timeout.ms": "6000",
    "group.consumer.session.timeout.ms": "10000",
    # Internal topics small and quick.
    "offsets.topic.num.partitions": "3",
    "transaction.state.log.num.partitions": "1",
    # The log cleaner: a small buffer (the minimum is just over 1 MiB; the default 128 MiB
    # of heap), and a short back-off so compaction is seen within seconds (default 15 s).
    "log.cleaner.dedupe.buffer.size": "8388608",
    "log.cleaner.backoff.ms": "500",
}
"""Settings only the test broker has: they make failures and compaction quick to see."""

JVM = ["-Xms256m", "-Xmx768m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true"]


class KafkaError(RuntimeError):
    """The broker could not be fetched or started; the message says what to do."""


def kafka_version() -> str:
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", (KAFKA / "pom.xml").read_text())
    assert match is not None, "kafka/pom.xml names no kafka.version"
    return match.group(1)


def broker_properties() -> dict[str, str]:
    """The shared settings of ``kafka/broker.properties``."""
    settings = {}
    for line in (KAFKA / "broker.properties").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def kafka_jars() -> Path:
    """The folder of the broker's jars, resolved with Maven the first time."""
    libs = CACHE / kafka_version()
    if (libs / ".complete").exists():
        return libs
    for tool in ("java", "mvn"):
        if shutil.which(tool) is None:
            raise KafkaError(f"{tool} is not installed: the Apache Kafka tests need Java 17+ and Maven "
                             "(or run the tests with --brokers tansu)")
    partial = libs.with_name(libs.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    result = subprocess.run(
        ["mvn", "-B", "-q", "-f", str(KAFKA / "pom.xml"), "dependency:copy-dependencies",
         "-DincludeScope=runtime", f"-DoutputDirectory={partial}"],
        capture_output=True, text=True, timeout=600, check=False,
    )
    if result.returncode != 0:
        raise KafkaError(f"Maven could not resolve Apache Kafka {kafka_version()}:\n"
                         f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
    (partial / ".complete").touch()
    shutil.rmtree(libs, ignore_errors=True)
    partial.rename(libs)
    return libs


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cluster_id() -> str:
    """As Kafka makes them: URL-safe base64 of 16 random bytes, no padding, never starting
    with '-', never one of the two reserved ids."""
    while True:
        raw = uuid.uuid4().bytes
        text = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        if not text.startswith("-") and raw not in (bytes(16), bytes(15) + b"\x01"):
            return text


class KafkaNode:
    """One Apache Kafka broker (and controller) on 127.0.0.1, its data in ``root``."""

    kind = "kafka"

    def __init__(self, root: Path, *, settings: dict[str, str] | None = None) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.data = self.root / "data"
        self.log = self.root / "broker.log"
        self.port = _free_port()
        self.controller_port = _free_port()
        while self.controller_port == self.port:
            self.controller_port = _free_port()
        self.settings = {
            **broker_properties(),
            **TEST_SPEED,
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "log.dirs": str(self.data),
            **(settings or {}),
        }
        self.properties = self.root / "server.properties"
        self._process: subprocess.Popen[bytes] | None = None
        self._formatted = False

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _java(self, main: str, *args: str, heap: list[str]) -> list[str]:
        return ["java", *heap, f"-Dlog4j2.configurationFile={KAFKA / 'log4j2.properties'}",
                "-cp", str(kafka_jars() / "*"), main, *args]

    def start(self, *, timeout: float = 90.0) -> KafkaNode:
        """Start the broker (formatting its data directory the first time) and wait until
        it answers a metadata request."""
        if self._process is not None and self._process.poll() is None:
            raise KafkaError("the broker is already running")
        if not self._formatted:
            self.properties.write_text("".join(f"{k}={v}\n" for k, v in self.settings.items()))
            formatted = subprocess.run(
                self._java("kafka.tools.StorageTool", "format", "-t", _cluster_id(), "-c", str(self.properties),
                           heap=["-Xmx256m"]),
                capture_output=True, text=True, timeout=120, check=False)
            if formatted.returncode != 0:
                raise KafkaError(f"formatting {self.data} failed:\n{formatted.stdout}{formatted.stderr}")
            self._formatted = True
        with open(self.log, "ab") as log:
            log.write(f"\n===== start {time.strftime('%H:%M:%S')}\n".encode())
            self._process = subprocess.Popen(
                self._java("kafka.Kafka", str(self.properties), heap=JVM),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.root,
                start_new_session=True, preexec_fn=_die_with_parent,
            )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0,
                             "reconnect.backoff.ms": 50, "reconnect.backoff.max.ms": 200})
        deadline = time.monotonic() + timeout
        assert self._process is not None
        while True:
            if self._process.poll() is not None:
                raise KafkaError(f"the broker exited with {self._process.returncode} at start:\n{self.tail()}")
            try:
                if admin.list_topics(timeout=1.0).brokers:
                    return
            except Exception:  # not listening yet
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise KafkaError(f"the broker did not answer within {timeout:g} s:\n{self.tail()}")
            time.sleep(0.1)

    def stop(self, *, timeout: float = 60.0) -> int:
        """A clean shutdown (SIGTERM); returns the exit code."""
        return self._signal(signal.SIGTERM, timeout)

    def kill(self) -> int:
        """A crash (SIGKILL): nothing is flushed or closed."""
        return self._signal(signal.SIGKILL, 30.0)

    def restart(self, *, crash: bool = False) -> KafkaNode:
        """Stop (or kill) and start again on the same data directory and ports."""
        self.kill() if crash else self.stop()
        return self.start()

    def _signal(self, signum: int, timeout: float) -> int:
        process = self._process
        if process is None or process.poll() is not None:
            return process.returncode if process is not None else 0
        process.send_signal(signum)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> KafkaNode:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop(timeout=20)


def _die_with_parent() -> None:
    """The broker gets SIGKILL when the test process that started it dies."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def main(argv: list[str]) -> int:
    if argv[:1] == ["jars"]:
        print(kafka_jars())
        return 0
    if argv[:1] == ["run"]:
        import tempfile

        with KafkaNode(Path(tempfile.mkdtemp(prefix="kafka-"))) as node:
            print(f"Apache Kafka {kafka_version()} on {node.bootstrap} (data in {node.root}); Ctrl-C stops it",
                  flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
        return 0
    print("usage: python tests/apache_kafka.py jars|run", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
