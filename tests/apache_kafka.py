"""A real single-node Apache Kafka broker for the tests and the benchmark: the gateway's own
(:class:`gateway.streaming.KafkaNode`, what ``gateway up --data DIR`` runs), on free ports,
with the test-speed settings below.

* :func:`kafka_jars` resolves the jars with Maven into the user's cache
  (``~/.cache/webhook-gateway/kafka/<version>/``, shared with ``gateway up --data``; the
  first time takes a minute, later runs reuse it).
* :class:`KafkaNode` picks free ports and a fresh data directory, formats it, starts the
  broker and waits until a real client's metadata request answers. It stops it cleanly
  (SIGTERM) or kills it (SIGKILL), and starts it again on the same data directory and ports.

``python tests/apache_kafka.py jars`` resolves the jars (``.ci/run`` does, so a missing
Java or Maven fails CI before any test); ``python tests/apache_kafka.py run`` runs a
broker in the foreground until Ctrl-C.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
from pathlib import Path
from typing import Self

from gateway import streaming
from gateway.errors import Unavailable
from gateway.streaming import broker_properties, kafka_version

__all__ = ["TEST_SPEED", "KafkaError", "KafkaNode", "broker_properties", "kafka_jars", "kafka_version"]

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

KafkaError = Unavailable
"""What the broker raises when it cannot be fetched or started; the message says what to do."""

TESTS_WITHOUT_KAFKA = "(or run the tests with --brokers tansu)"


def kafka_jars() -> Path:
    """The folder of the broker's jars, resolved with Maven the first time."""
    try:
        return streaming.kafka_jars(on_progress=lambda line: print(line, file=sys.stderr, flush=True))
    except Unavailable as exc:
        raise KafkaError(f"{exc} {TESTS_WITHOUT_KAFKA}") from None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class KafkaNode(streaming.KafkaNode):
    """One Apache Kafka broker (and controller) on 127.0.0.1, its data in ``root``, on free
    ports, with :data:`TEST_SPEED` under ``settings``. It dies (SIGKILL) with the test
    process that started it."""

    def __init__(self, root: Path, *, settings: dict[str, str] | None = None) -> None:
        port = _free_port()
        controller_port = _free_port()
        while controller_port == port:
            controller_port = _free_port()
        super().__init__(root, port=port, controller_port=controller_port, settings={**TEST_SPEED, **(settings or {})},
                         on_parent_death=signal.SIGKILL)

    def start(self, *, timeout: float = 90.0) -> Self:
        try:  # the tests' own hint when Java or Maven is missing
            streaming.find_java()
        except Unavailable as exc:
            raise KafkaError(f"{exc} {TESTS_WITHOUT_KAFKA}") from None
        kafka_jars()
        return super().start(timeout=timeout)


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
