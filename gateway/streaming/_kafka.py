"""Apache Kafka from Maven Central's jars, as a child process: ``gateway up --data DIR``,
``gateway broker --data DIR``, and the tests' and the benchmark's broker
(``tests/apache_kafka.py`` sets test-speed settings on free ports over it).

One node in KRaft mode (broker and controller in one JVM), with no tarball and no Docker:

* :func:`kafka_jars` resolves the broker's jars with Maven from the packaged
  ``kafka/pom.xml``, once per Kafka version, into the user's cache
  (``$XDG_CACHE_HOME/webhook-gateway/kafka/<version>/``, else ``~/.cache/…``), with
  progress lines (a first fetch downloads about 45 MB: 17 s here, with Maven's own
  repository empty; a few seconds when Maven has them). The cache is the user's, not the
  data directory's: the jars are the same for every data directory, every checkout and
  every test run, they are not data to back up, and a package that moves to another
  Kafka version finds the old jars beside the new ones instead of inside someone's data.
* :class:`KafkaNode` writes ``server.properties`` into its directory (the shared settings
  of ``kafka/broker.properties``, :data:`ONE_MACHINE`, its listeners and its quorum),
  formats ``data/`` the first time only (Kafka keeps the cluster id there, in
  ``meta.properties``; a start on a formatted directory reuses it), starts the JVM and
  waits until a metadata request answers. It stops cleanly (SIGTERM, then a wait) or
  crashes (SIGKILL), and starts again on the same data.

What it needs: Java 17 or newer (``JAVA_HOME``, else ``java`` on ``PATH``) to run, and
Maven (``mvn``) the first time, to fetch the jars. Without them every entry point says
which to install; the bundled in-memory broker (:mod:`._broker`) needs neither.

Measured here (2 cores): format 0.9 s, start to ready 2-3 s, about 210 MB resident; a
clean stop 0.5 s, and a start on the same data 3 s. A start after SIGKILL recovers every
acknowledged record in 13 s, 9 of them waiting for the dead node's broker session to
expire (4 s with the tests' 2 s session; see :data:`ONE_MACHINE` for why not here).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import functools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

from ..errors import Unavailable
from ._broker import die_with_parent, port_in_use

__all__ = ["ONE_MACHINE", "KafkaNode", "broker_properties", "find_java", "jar_cache", "kafka_jars", "kafka_version",
           "new_cluster_id"]

Progress = Callable[[str], None]

JAVA_MIN = 17

NEITHER = ("`gateway up` and `gateway broker` without --data run the bundled in-memory broker, "
           "which needs neither Java nor Maven")

ONE_MACHINE = {
    # Internal topics sized for one node: the first group's join would otherwise create 50
    # partitions of consumer offsets (some 200 files) where 3 serve every group we run.
    "offsets.topic.num.partitions": "3",
    "transaction.state.log.num.partitions": "1",
    # The log cleaner's dedupe buffer: 8 MiB holds some 300,000 keys a pass, plenty for the
    # endpoints topic, instead of 128 MiB of a 768 MiB heap (the minimum is just over 1 MiB).
    "log.cleaner.dedupe.buffer.size": "8388608",
    # `gateway up --session-timeout-ms` takes what the bundled broker takes (Kafka's floor
    # is 6 s).
    "group.min.session.timeout.ms": "1000",
    # Not here: the tests' 2 s broker session. A clean restart does not wait for the old
    # session (a clean shutdown fences it), only a start after a crash does, once, for 9 s; and
    # on a busy machine a 2 s session could fence the only broker during one long pause.
}
"""Settings of a node alone on one machine, over ``kafka/broker.properties``."""

JVM = ("-Xms256m", "-Xmx768m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true")
"""Kafka's own JVM options (G1, 20 ms pauses, headless) with a smaller heap than its 1 GB."""


def kafka_files() -> Path:
    """The folder of ``pom.xml``, ``broker.properties`` and ``log4j2.properties``: inside
    the installed package (``gateway/kafka``), or at the root of a checkout (``kafka/``)."""
    here = Path(__file__).resolve().parents[1]
    for candidate in (here / "kafka", here.parent / "kafka"):
        if (candidate / "pom.xml").is_file():
            return candidate
    raise FileNotFoundError(f"no kafka/pom.xml beside {here} or its parent: reinstall webhook-gateway")


def kafka_version() -> str:
    """The Apache Kafka version ``kafka/pom.xml`` names."""
    pom = kafka_files() / "pom.xml"
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", pom.read_text())
    if match is None:
        raise FileNotFoundError(f"{pom} names no kafka.version")
    return match.group(1)


def broker_properties() -> dict[str, str]:
    """The shared settings of ``kafka/broker.properties`` (also ``docker-compose.yml``'s)."""
    settings = {}
    for line in (kafka_files() / "broker.properties").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def jar_cache() -> Path:
    """Where the jars of every Kafka version go: ``$XDG_CACHE_HOME/webhook-gateway/kafka``,
    or ``~/.cache/webhook-gateway/kafka``."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".cache"
    return root / "webhook-gateway" / "kafka"


def find_java() -> str:
    """The ``java`` to run Kafka with: ``$JAVA_HOME/bin/java``, else the one on ``PATH``;
    refused unless it is Java 17 or newer."""
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home and (Path(home) / "bin" / "java").is_file() else None
    java = java or shutil.which("java")
    if java is None:
        raise Unavailable(
            f"Apache Kafka needs Java {JAVA_MIN} or newer, and no java was found (on PATH, or in "
            f"JAVA_HOME): install a Java {JAVA_MIN}+ runtime (Debian and Ubuntu: apt install "
            f"openjdk-17-jre-headless; macOS: brew install openjdk@17). {NEITHER}.")
    major = _java_major(java)
    if major < JAVA_MIN:
        raise Unavailable(
            f"Apache Kafka needs Java {JAVA_MIN} or newer, and {java} is Java {major}: install a "
            f"Java {JAVA_MIN}+ runtime and put it first on PATH or in JAVA_HOME. {NEITHER}.")
    return java


@functools.lru_cache(maxsize=8)
def _java_major(java: str) -> int:
    """The major version ``java -version`` reports (8 for ``1.8.0_292``); 0 when it says none."""
    try:
        shown = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60, check=False)
    except OSError as exc:
        raise Unavailable(f"{java} could not be run ({exc}): install a Java {JAVA_MIN}+ runtime. {NEITHER}.") from None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', shown.stderr + shown.stdout)
    if match is None:
        return 0
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def kafka_jars(cache: Path | None = None, *, on_progress: Progress | None = None) -> Path:
    """The folder of the broker's jars (``cache/<version>``, the :func:`jar_cache` when
    None), resolved with Maven the first time; ``on_progress`` gets a line now and then
    while Maven works. Safe to call from two processes at once: each resolves into a
    folder of its own and the first to finish wins."""
    version = kafka_version()
    folder = (cache if cache is not None else jar_cache()) / version
    if (folder / ".complete").exists():
        return folder
    mvn = shutil.which("mvn")
    if mvn is None:
        raise Unavailable(
            f"Apache Kafka {version}'s jars are not in {folder} yet, and fetching them (once) needs "
            "Maven, which is not on PATH: install it (Debian and Ubuntu: apt install maven; macOS: "
            f"brew install maven). Running the broker then needs Java {JAVA_MIN}+. {NEITHER}.")
    find_java()  # Maven runs on it; say so now rather than in Maven's words
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{version}.partial-", dir=folder.parent))
    try:
        _resolve(mvn, version, partial, folder, on_progress or (lambda text: None))
        (partial / ".complete").touch()
        try:
            partial.rename(folder)
        except OSError:
            if not (folder / ".complete").exists():  # a leftover, not another process's result
                shutil.rmtree(folder, ignore_errors=True)
                partial.rename(folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def _resolve(mvn: str, version: str, into: Path, folder: Path, progress: Progress, *,
             timeout: float = 900.0) -> None:
    """``mvn dependency:copy-dependencies`` into ``into`` (to become ``folder``), a progress
    line every 10 s."""
    started = time.monotonic()
    progress(f"fetching Apache Kafka {version}'s jars from Maven Central with Maven into {folder} "
             "(the first time only: about 45 MB)")
    process = subprocess.Popen(
        [mvn, "-B", "-f", str(kafka_files() / "pom.xml"), "dependency:copy-dependencies",
         "-DincludeScope=runtime", f"-DoutputDirectory={into}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        errors="replace",
    )
    assert process.stdout is not None
    output = process.stdout
    last: collections.deque[str] = collections.deque(maxlen=40)
    downloaded = [0]

    def read() -> None:
        for line in output:
            last.append(line.rstrip())
            if "Downloaded from" in line:
                downloaded[0] += 1

    reader = threading.Thread(target=read, name="maven-output", daemon=True)
    reader.start()
    try:
        while True:
            try:
                code = process.wait(10)
                break
            except subprocess.TimeoutExpired:
                elapsed = time.monotonic() - started
                if elapsed > timeout:
                    raise Unavailable(f"Maven did not fetch Apache Kafka {version} within {timeout:g} s; its "
                                      "last lines:\n" + "\n".join(last)) from None
                progress(f"  still fetching: {downloaded[0]} files downloaded in {elapsed:.0f} s")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(10)
        output.close()
    if code != 0:
        raise Unavailable(
            f"Maven could not fetch Apache Kafka {version} (exit {code}; is Maven Central reachable, "
            "or a mirror set in ~/.m2/settings.xml?); its last lines:\n" + "\n".join(last))
    jars = list(into.glob("*.jar"))
    size = sum(jar.stat().st_size for jar in jars) / 1e6
    progress(f"  fetched {len(jars)} jars ({size:.0f} MB) in {time.monotonic() - started:.0f} s; "
             "later starts reuse them")


def new_cluster_id() -> str:
    """A new cluster id, as Kafka makes them: URL-safe base64 of 16 random bytes, no
    padding, never starting with '-', never one of the two reserved ids. (Every node of a
    cluster is formatted with the same one.)"""
    while True:
        raw = uuid.uuid4().bytes
        text = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        if not text.startswith("-") and raw not in (bytes(16), bytes(15) + b"\x01"):
            return text


class KafkaNode:
    """One Apache Kafka node on ``host``, broker and controller in one JVM, everything of
    it in ``root``: ``server.properties``, ``data/`` (the log) and ``broker.log`` (its
    output).

    ``port`` is the broker's listener (what clients bootstrap from) and
    ``controller_port`` the controller's (``port`` + 1 when None, or ``port`` - 1 for
    65535). For a cluster, give each node its own ``node_id``, ports and ``root``, the same
    ``voters`` (``controller.quorum.voters``; this node alone when None) and the same
    ``cluster_id``, and anything else in ``settings`` (they win over every other setting).
    ``cache`` is where the jars are (:func:`jar_cache` when None). The JVM gets
    ``on_parent_death`` when the thread that started it exits (Linux), so no broker
    outlives its gateway: SIGTERM shuts it down cleanly.
    """

    kind = "kafka"

    def __init__(
        self,
        root: Path,
        *,
        port: int = 9092,
        controller_port: int | None = None,
        host: str = "127.0.0.1",
        node_id: int = 1,
        voters: str | None = None,
        cluster_id: str | None = None,
        settings: Mapping[str, str] | None = None,
        cache: Path | None = None,
        on_parent_death: int = signal.SIGTERM,
        on_progress: Progress | None = None,
    ) -> None:
        self.root = root.resolve()
        self.data = self.root / "data"
        self.log = self.root / "broker.log"
        self.properties = self.root / "server.properties"
        self.host = host
        self.port = port
        self.controller_port = controller_port if controller_port is not None else (
            port + 1 if port < 65535 else port - 1)
        self.node_id = node_id
        self.cluster_id = cluster_id
        """Used when the data directory is formatted (a new one when None); a formatted
        directory keeps its own, in ``data/meta.properties``."""
        self.settings = {
            **broker_properties(),
            **ONE_MACHINE,
            "node.id": str(node_id),
            "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{host}:{port}",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "controller.quorum.voters": voters or f"{node_id}@{host}:{self.controller_port}",
            "log.dirs": str(self.data),
            **(settings or {}),
        }
        self.cache = cache
        self.on_parent_death = on_parent_death
        self._progress: Progress = on_progress or (lambda text: None)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        """Whether the JVM runs (started, and neither stopped nor dead)."""
        return self._process is not None and self._process.poll() is None

    @property
    def formatted(self) -> bool:
        """Whether ``data/`` holds a formatted log (then a start keeps it and its cluster id)."""
        return (self.data / "meta.properties").is_file()

    def listener_ports(self) -> list[tuple[str, int]]:
        """``(listener name, port)`` of each listener this node opens."""
        return [(name, int(port)) for name, port in
                re.findall(r"([A-Za-z0-9_]+)://[^,]*:(\d+)", self.settings.get("listeners", ""))]

    def start(self, *, timeout: float = 90.0) -> Self:
        """Start the node (formatting its data directory the first time) and wait until it
        answers a metadata request. Refused, saying what to do, when a port is taken, Java
        17+ is missing, or the jars are not cached and Maven is missing."""
        self.launch()
        self.wait_ready(timeout)
        return self

    def launch(self) -> Self:
        """:meth:`start` without the wait: the JVM runs when it returns. A node of a
        cluster answers only once a quorum of its controllers runs (and a controller alone
        never answers a metadata request), so a cluster launches every node, then waits
        (:meth:`wait_ready`). The JVM gets ``on_parent_death`` when the thread that called
        this exits: call it from a thread that outlives the node."""
        if self._process is not None and self._process.poll() is None:
            raise Unavailable("the broker is already running")
        for name, port in self.listener_ports():
            if port_in_use(self.host, port):
                raise Unavailable(
                    f"port {port} on {self.host} (Apache Kafka's {name} listener) is already in use: stop "
                    "what listens there, or choose another port (--port; the controller takes the next one)")
        java, jars = self.format()
        with open(self.log, "ab") as log:
            log.write(f"\n===== start {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                self._java(java, jars, "kafka.Kafka", str(self.properties), heap=JVM),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.root,
                # Its own session: a Ctrl-C in the terminal reaches the gateway, which stops
                # the broker only after the workers have drained and committed.
                start_new_session=True, preexec_fn=die_with_parent(self.on_parent_death),
            )
        return self

    def format(self) -> tuple[str, Path]:
        """Write ``server.properties`` and format ``data/`` unless it is formatted already
        (what :meth:`launch` does first; a cluster formats its nodes at once, each a JVM of
        a few seconds); the java and the jars it ran with."""
        java = find_java()
        jars = kafka_jars(self.cache, on_progress=self._progress)
        self.root.mkdir(parents=True, exist_ok=True)
        self.properties.write_text("".join(f"{k}={v}\n" for k, v in self.settings.items()))
        if not self.formatted:
            self._format(java, jars)
        return java, jars

    def _java(self, java: str, jars: Path, main: str, *args: str, heap: tuple[str, ...]) -> list[str]:
        return [java, *heap, f"-Dlog4j2.configurationFile={kafka_files() / 'log4j2.properties'}",
                "-cp", str(jars / "*"), main, *args]

    def _format(self, java: str, jars: Path) -> None:
        cluster = self.cluster_id or new_cluster_id()
        self._progress(f"formatting {self.data} for Apache Kafka (cluster {cluster}; the first time only)")
        formatted = subprocess.run(
            self._java(java, jars, "kafka.tools.StorageTool", "format", "-t", cluster, "-c", str(self.properties),
                       heap=("-Xmx256m",)),
            capture_output=True, text=True, timeout=120, check=False)
        if formatted.returncode != 0:
            raise Unavailable(f"formatting {self.data} failed:\n{formatted.stdout}{formatted.stderr}")

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Wait until the broker answers a metadata request; stopped (no broker left
        behind) when it exits, is interrupted or takes longer than ``timeout``."""
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop(timeout=30)  # refused, interrupted or too slow: leave no broker behind
            raise

    def _wait_ready(self, timeout: float) -> None:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0,
                             "reconnect.backoff.ms": 50, "reconnect.backoff.max.ms": 200})
        deadline = time.monotonic() + timeout
        assert self._process is not None
        while True:
            if self._process.poll() is not None:
                raise Unavailable(f"Apache Kafka exited with {self._process.returncode} at start; the end of "
                                  f"{self.log}:\n{self.tail()}")
            with contextlib.suppress(Exception):  # not listening yet
                if admin.list_topics(timeout=1.0).brokers:
                    return
            if time.monotonic() > deadline:
                raise Unavailable(f"Apache Kafka did not answer on {self.bootstrap} within {timeout:g} s; the end "
                                  f"of {self.log}:\n{self.tail()}")
            time.sleep(0.1)

    def stop(self, *, timeout: float = 60.0) -> int:
        """A clean shutdown: SIGTERM, then wait (SIGKILL after ``timeout``); the exit code."""
        return self._signal(signal.SIGTERM, timeout)

    def kill(self) -> int:
        """A crash (SIGKILL): nothing is flushed or closed."""
        return self._signal(signal.SIGKILL, 30.0)

    def restart(self, *, crash: bool = False) -> Self:
        """Stop (or kill) and start again on the same data directory and ports."""
        self.kill() if crash else self.stop()
        return self.start()

    def terminate(self) -> None:
        """Ask the broker to stop (SIGTERM) without waiting; safe in a signal handler."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)

    def wait(self) -> int:
        """Wait until the broker exits; its exit code."""
        assert self._process is not None, "broker not started"
        return self._process.wait()

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
        """The last lines of ``broker.log``."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop(timeout=20)
