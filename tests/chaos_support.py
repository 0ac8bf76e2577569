"""Tools of the chaos suite (tests/test_chaos.py): a receiver whose behaviour changes on
command, a paced background publisher, a wait for the pipeline to be drained, and the
audit that accounts for every published event and checks that no retry came early.

Everything listens and connects on 127.0.0.1 only.

How the audit decides "nothing was delivered before its retry was due"
----------------------------------------------------------------------

The receiver sees every attempt that reaches it, but not which tier made it, and some
attempts never reach it (a refused connection). Kills and rebalances legitimately repeat
an attempt of the *same* tier (the record was not committed yet), so a rule on the
receiver's arrival times alone cannot tell a legitimate repeat from an early retry: an
event's record read again after a ``kill -9`` may be attempted 10 ms after the failure of
its first try, and that is a repeat, not an early retry.

What identifies the tier of an attempt is the gateway's own trail, read back from the
topics once the pipeline is drained: every retry record (tiers 1..3) and every dead letter
carries the log of the attempts of its lineage (start time, duration, tier, status), and
its ``due_at``. A repeated attempt starts a new lineage, with its own records. The audit
checks, for every (event, endpoint) pair:

1. *Every logged chain keeps the schedule.* In each record's attempt log, attempt ``i``
   is made by tier ``i`` and starts no earlier than the end of attempt ``i-1`` plus tier
   ``i``'s delay (1 s, 2 s, 3 s here), minus ``TOLERANCE``; a retry record's ``due_at`` is
   no earlier than its last attempt's end plus its tier's delay. This covers the failed
   attempts, including those that never reached the receiver.
2. *The logs are what really happened.* Every logged attempt that got an HTTP status
   must match an arrival at the receiver for the same pair, answered with that status,
   between the attempt's start and end (± ``TOLERANCE``). So the times checked in 1 are
   confirmed by an independent observer.
3. *A successful retry is not early either.* A retry record whose attempt is not logged
   in any later record (no child in the next tier or the dead-letter topic) was attempted
   with success: there must be a 2xx arrival for the pair no earlier than the record's
   ``due_at`` (minus ``TOLERANCE``). An early successful retry would leave only 2xx
   arrivals before ``due_at``.

Root attempts (the events topic) are due at once, so any number of them, at any time, is
fine: those are the repeats that at-least-once allows, and they are counted.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from gateway.codec import Codec
from gateway.config import Config
from gateway.events import parse_event
from gateway.ops import new_endpoint
from gateway.publisher import Publisher
from gateway.records import Attempt, DeadLetter, Delivery, Endpoint, Outcome
from gateway.store import Topics, save_endpoint

__all__ = [
    "TOLERANCE",
    "Arrival",
    "Audit",
    "ChaosReceiver",
    "Load",
    "audit",
    "chaos_port",
    "conclude",
    "drain",
    "lag",
    "log_trouble",
    "make_events",
    "register",
]

TOLERANCE = 0.05
"""Seconds an attempt may seem early by: clock reads in two processes, ms rounding."""

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "events.jsonl"


def make_events(count: int, *, sessions: int = 40, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` MESSAGE events of the documented shape, spread over ``sessions`` sessions
    (so over every partition), each with its own event id."""
    base = next(
        e for e in (json.loads(line) for line in EXAMPLES.read_text().splitlines() if line.strip())
        if e["event"] == "MESSAGE"
    )
    rng = random.Random(seed)

    def uid() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    session_ids = [uid() for _ in range(sessions)]
    return [
        dict(base, sessionId=session_ids[i % sessions], messageId=uid(), eventId=uid(),
             message=f"chaos {i}")
        for i in range(count)
    ]


def chaos_port() -> int:
    """A free port below the kernel's ephemeral range.

    The receiver closes its listening socket and later listens again on the same port.
    Meanwhile the gateway keeps connecting to it; a port inside the ephemeral range could
    be picked as the local port of one of those connects (a TCP self-connect on loopback)
    and then the receiver could not listen again.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


# -- the receiver ------------------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    """One request that reached the receiver, and what it was answered."""

    path: str
    event_id: str
    at: float
    """time.time() when the request had been read."""
    status: int | None
    """The status the receiver wrote; None when the connection was dropped unanswered
    (refusing) or the answer could not be written (the gateway had hung up)."""


Policy = Callable[[random.Random], tuple[float, int | None]]
"""Returns (seconds to wait before answering, status or None to drop the connection)."""


class ChaosReceiver:
    """An HTTP receiver on a fixed 127.0.0.1 port whose behaviour can change at any time:
    healthy, failing a fraction at random, slow, or refusing connections altogether.

    An arrival is recorded once its answer was written, so a 2xx recorded was sent."""

    def __init__(self, *, seed: int = 0) -> None:
        self.port = chaos_port()
        self.arrivals: list[Arrival] = []
        self.seed = seed
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._policy: Policy = lambda rng: (0.0, 204)
        self._refusing = False
        self._connections: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- behaviours

    def healthy(self) -> None:
        self._policy = lambda rng: (0.0, 204)

    def flaky(self, failure_rate: float, status: int = 500) -> None:
        """Fail ``failure_rate`` of the requests at random with ``status``, answer 204 to
        the others."""
        self._policy = lambda rng: (0.0, status if rng.random() < failure_rate else 204)

    def slow(self, low: float, high: float, *, too_slow_rate: float = 0.0,
             too_slow: float = 0.0) -> None:
        """Answer 204 after ``low``..``high`` seconds; ``too_slow_rate`` of the requests
        wait ``too_slow`` seconds (past the gateway's timeout) and then answer 503, so a
        request the gateway gave up on is never recorded as delivered."""
        def policy(rng: random.Random) -> tuple[float, int | None]:
            if rng.random() < too_slow_rate:
                return too_slow, 503
            return rng.uniform(low, high), 204
        self._policy = policy

    def refuse(self) -> None:
        """Stop listening (new connections are refused) and cut the open ones; a request
        that still arrives on a connection is dropped unanswered."""
        self._refusing = True
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def accept(self) -> None:
        """Listen again on the same port."""
        self._refusing = False
        self._listen()

    # -- queries

    def at(self, path: str | None = None) -> list[Arrival]:
        with self._lock:
            return [a for a in self.arrivals if path is None or a.path == path]

    def delivered(self) -> int:
        """Distinct (path, event) pairs answered 2xx so far."""
        with self._lock:
            return len({(a.path, a.event_id) for a in self.arrivals
                        if a.status is not None and 200 <= a.status < 300})

    def wait_delivered(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.delivered() < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {self.delivered()} of {count} deliveries within {timeout} s")
            time.sleep(0.05)

    # -- plumbing

    def _answer(self) -> tuple[float, int | None]:
        with self._lock:
            return self._policy(self._rng)

    def _record(self, arrival: Arrival) -> None:
        with self._lock:
            self.arrivals.append(arrival)

    def _listen(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with receiver._lock:
                    receiver._connections.add(self.connection)

            def finish(self) -> None:
                with receiver._lock:
                    receiver._connections.discard(self.connection)
                with contextlib.suppress(OSError):
                    super().finish()

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                self.rfile.read(length)
                arrived = time.time()
                event_id = self.headers.get("webhook-id", "")
                if receiver._refusing:
                    self._drop()
                    receiver._record(Arrival(self.path, event_id, arrived, None))
                    return
                delay, status = receiver._answer()
                if delay:
                    time.sleep(delay)
                if status is None or receiver._refusing:
                    self._drop()
                    receiver._record(Arrival(self.path, event_id, arrived, None))
                    return
                try:
                    self.send_response(status)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    self.wfile.flush()
                except OSError:
                    self.close_connection = True
                    status = None
                receiver._record(Arrival(self.path, event_id, arrived, status))

            def _drop(self) -> None:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               b"\x01\x00\x00\x00\x00\x00\x00\x00")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 512
            daemon_threads = True
            allow_reuse_address = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # clients killed mid-request, connections cut on purpose

        deadline = time.monotonic() + 10
        while True:
            try:
                server = Server(("127.0.0.1", self.port), Handler)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True, name="chaos-receiver")
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> Self:
        self._listen()
        return self

    def __exit__(self, *exc: object) -> None:
        self.refuse()


# -- the load ----------------------------------------------------------------------------


class Load:
    """Publishes events in a background thread, ``chunk`` at a time every ``interval``
    seconds, with the real :class:`~gateway.publisher.Publisher`. An event counts as
    published once the broker acknowledged it."""

    def __init__(self, config: Config, events: list[dict[str, Any]], *, chunk: int = 100,
                 interval: float = 0.25) -> None:
        self.config = config
        self.events = events
        self.chunk = chunk
        self.interval = interval
        self.published: list[str] = []
        self.failed: list[tuple[str, str]] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="chaos-load")
        self.started_at = 0.0
        self.finished_at = 0.0

    def start(self) -> Load:
        self.started_at = time.monotonic()
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            with Publisher(self.config) as publisher:
                for i in range(0, len(self.events), self.chunk):
                    batch = [parse_event(e) for e in self.events[i:i + self.chunk]]
                    for result in publisher.publish_many(batch, timeout=60):
                        if result.ok:
                            self.published.append(result.event.event_id)
                        else:
                            self.failed.append((result.event.event_id, result.error or "?"))
                    time.sleep(self.interval)
        except BaseException as exc:
            self.error = exc
        finally:
            self.finished_at = time.monotonic()

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"publishing did not finish within {timeout} s")
        if self.error is not None:
            raise AssertionError(f"publishing failed: {self.error!r}")


# -- reading topics ----------------------------------------------------------------------


def read_all(config: Config, topic: str, *, timeout: float = 20.0) -> list[Any]:
    """Every record of ``topic``, from a plain consumer outside the gateway's groups."""
    return _read(config, topic, timeout)[1]


def _read(config: Config, topic: str, timeout: float = 20.0) -> tuple[list[int], list[Any]]:
    consumer = Consumer({
        "bootstrap.servers": config.bootstrap_servers,
        "group.id": f"chaos-reader-{time.monotonic_ns()}",
        "enable.partition.eof": True,
        "fetch.wait.max.ms": 25,  # the end is the first empty fetch: the broker holds it this long
        "enable.auto.commit": False,
        "allow.auto.create.topics": False,
    })
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        at_end: set[int | None] = set()
        records: list[Any] = []
        deadline = time.monotonic() + timeout
        while len(at_end) < len(partitions):
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {topic} to its end within {timeout} s")
            for msg in consumer.consume(1000, 0.2):
                error = msg.error()
                if error is None:
                    at_end.discard(msg.partition())
                    records.append(msg)
                elif error.code() == KafkaError._PARTITION_EOF:
                    at_end.add(msg.partition())
                else:
                    raise AssertionError(f"reading {topic}: {error.str()}")
        return list(partitions), records
    finally:
        consumer.close()


def _ends(config: Config, topic: str) -> tuple[dict[int, int], dict[tuple[int, int], Any]]:
    """The end offset of every partition of ``topic``, and its records by (partition, offset)."""
    partitions, records = _read(config, topic)
    ends = dict.fromkeys(partitions, 0)
    for msg in records:
        ends[msg.partition()] = max(ends[msg.partition()], msg.offset() + 1)
    return ends, {(m.partition(), m.offset()): m for m in records}


_COORDINATOR_MOVING = frozenset({
    KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.COORDINATOR_NOT_AVAILABLE,
})


def _committed(config: Config, group: str, topic: str, partitions: Iterable[int],
               *, timeout: float = 60.0) -> dict[int, int]:
    """The group's committed offsets. A group coordinator that moves meanwhile (a broker
    killed, or the cluster's preferred leaders restored between two tests) answers
    NOT_COORDINATOR or is still loading: asked again, up to ``timeout``. (Seen in CI:
    librdkafka's committed() returned NOT_COORDINATOR and the drain failed the test.)"""
    wanted = [TopicPartition(topic, p) for p in partitions]
    deadline = time.monotonic() + timeout
    while True:
        consumer = Consumer({
            "bootstrap.servers": config.bootstrap_servers,
            "group.id": group,
            "enable.auto.commit": False,
            "allow.auto.create.topics": False,
        })
        try:
            got = consumer.committed(wanted, timeout=10)
            return {tp.partition: max(tp.offset, 0) for tp in got}
        except KafkaException as exc:
            if exc.args[0].code() not in _COORDINATOR_MOVING or time.monotonic() > deadline:
                raise
        finally:
            consumer.close()
        time.sleep(0.5)


def lag(config: Config, stuck: list[str] | None = None,
        ends_seen: dict[str, dict[int, int]] | None = None) -> dict[str, int]:
    """Records not yet committed by the gateway, per topic a worker consumes: the schedule's
    tiers, then the deferral rungs (a delivery put off waits there, on no other topic).
    ``stuck`` gets a line per lagging partition; ``ends_seen`` each topic's end offsets.

    One pass is not a snapshot: a record can move to a topic the pass has already read (a
    deferred delivery comes back to its retry tier). :func:`drain` therefore also asks
    that no topic grew between its quiet passes."""
    result = {}
    codec = Codec(config.schema_registry_url)
    now = time.time()
    for tier in Topics.from_config(config).worker_tiers:
        ends, records = _ends(config, tier.topic)
        if ends_seen is not None:
            ends_seen[tier.topic] = ends
        committed = _committed(config, f"{config.consumer_group}.{tier.name}", tier.topic, ends)
        result[tier.name] = sum(max(0, end - committed.get(p, 0)) for p, end in ends.items())
        for p, end in sorted(ends.items()):
            position = committed.get(p, 0)
            if stuck is None or position >= end:
                continue
            line = f"{tier.name}[{p}]: committed {position} of {end}"
            head = records.get((p, position))
            if head is not None and (tier.index > 0 or tier.deferral):  # a Delivery, with its due time
                due = Delivery.from_record(codec.decode(head.value())[1]).due_at / 1000
                line += f", its first uncommitted record was due {now - due:.1f} s ago"
            stuck.append(line)
    return result


def drain(config: Config, *, timeout: float, settle: int = 2) -> float:
    """Wait until every topic a worker consumes has been committed to its end, ``settle``
    passes in a row with no topic growing in between; returns the seconds waited. Fails (a
    hang) after ``timeout``.

    Why that is enough: a record is committed only once it settled, and it settles only
    once what it turned into (retries, deferrals) was acknowledged. A record still in the
    pipeline during a quiet pass lies past its topic's committed offset, so it was written
    after the pass read that topic; its source was settled, so it was written before the
    pass read the source's topic. Follow the sources back: one of them was written between
    the previous pass's read of its topic and this pass's, and that topic grew."""
    started = time.monotonic()
    deadline = started + timeout
    quiet = 0
    previous: dict[str, dict[int, int]] = {}
    while True:
        stuck: list[str] = []
        ends: dict[str, dict[int, int]] = {}
        last = lag(config, stuck, ends)
        if any(last.values()):
            quiet = 0
        elif quiet and ends == previous:
            quiet += 1
        else:
            quiet = 1  # the first quiet pass, or a topic grew since the last one: count from here
        previous = ends
        if quiet >= settle:
            return time.monotonic() - started
        if time.monotonic() > deadline:
            raise AssertionError(
                f"HANG: the pipeline did not drain within {timeout} s of the end of the load; "
                f"uncommitted records per topic: {last}\n  " + "\n  ".join(stuck))
        time.sleep(1.0)


# -- the audit ---------------------------------------------------------------------------

Pair = tuple[str, str]
"""(event id, endpoint id)"""


@dataclass
class Audit:
    pairs: int
    """(event, endpoint) deliveries due: published events × endpoints."""
    delivered: set[Pair]
    dead: set[Pair]
    lost: set[Pair]
    repeated: int
    """2xx answers beyond the first for a pair."""
    arrivals: int
    dead_reasons: dict[str, int]
    retry_records: int
    violations: list[str] = field(default_factory=list)
    """Broken promises other than loss: early attempts, logs the receiver contradicts,
    unexpected dead letters."""
    deferred_records: int = 0
    """Records written to the deferral rungs (deliveries put off, no attempt spent)."""
    notes: list[str] = field(default_factory=list)
    """What is worth a look but breaks no promise, e.g. a pair both delivered and
    dead-lettered (a repeated lineage), with its arrivals and attempt log."""

    @property
    def both(self) -> int:
        return len(self.delivered & self.dead)

    def line(self, scenario: str) -> str:
        return (f"chaos {scenario}: published {self.pairs}, delivered {len(self.delivered)}, "
                f"dead-lettered {len(self.dead)}, repeated {self.repeated}, lost {len(self.lost)}"
                + (f", deferred {self.deferred_records}" if self.deferred_records else ""))


def audit(config: Config, receiver: ChaosReceiver, published: Iterable[str],
          endpoints: dict[str, str], *, unacked: Iterable[str] = ()) -> Audit:
    """Account for every published event at every endpoint (``endpoints``: receiver path
    → endpoint id) and check the retry schedule (see the module docstring)."""
    published = set(published)
    unacked = set(unacked)
    topics = Topics.from_config(config)
    tiers = topics.tiers
    codec = Codec(config.schema_registry_url)
    violations: list[str] = []

    by_pair: dict[Pair, list[Arrival]] = defaultdict(list)
    for arrival in receiver.at():
        endpoint_id = endpoints.get(arrival.path)
        if endpoint_id is None:
            violations.append(f"request to an unregistered path {arrival.path}")
            continue
        if arrival.event_id not in published and arrival.event_id not in unacked:
            violations.append(f"delivery of an event never published: {arrival.event_id}")
        by_pair[(arrival.event_id, endpoint_id)].append(arrival)
    for arrivals in by_pair.values():
        arrivals.sort(key=lambda a: a.at)

    ok = [(pair, a) for pair, arrivals in by_pair.items() for a in arrivals
          if a.status is not None and 200 <= a.status < 300]
    delivered = {pair for pair, _ in ok}

    dead: set[Pair] = set()
    reasons: dict[str, int] = defaultdict(int)
    chains: dict[Pair, list[tuple[int, Delivery]]] = defaultdict(list)
    """Every record carrying an attempt log: (tier index, delivery); the dead-letter topic
    counts as index len(tiers)."""
    for msg in read_all(config, topics.dlq):
        letter = DeadLetter.from_record(codec.decode(msg.value())[1])
        reasons[letter.reason] += 1
        if letter.delivery is None:
            violations.append(f"dead letter without a delivery: {letter.reason}: {letter.detail}")
            continue
        pair = (letter.delivery.event_id, letter.delivery.endpoint_id)
        dead.add(pair)
        if letter.reason != "retries_exhausted":
            violations.append(f"dead letter {pair} for {letter.reason}: {letter.detail}")
        chains[pair].append((len(tiers), letter.delivery))
    retry_records = 0
    for tier in tiers[1:]:
        for msg in read_all(config, tier.topic):
            delivery = Delivery.from_record(codec.decode(msg.value())[1])
            chains[(delivery.event_id, delivery.endpoint_id)].append((tier.index, delivery))
            retry_records += 1
    deferred_records = 0
    for rung in topics.deferral_tiers:  # deferred deliveries: index DEFERRED in the chain
        for msg in read_all(config, rung.topic):
            delivery = Delivery.from_record(codec.decode(msg.value())[1])
            chains[(delivery.event_id, delivery.endpoint_id)].append((DEFERRED, delivery))
            deferred_records += 1

    due = {(e, ep) for e in published for ep in endpoints.values()}
    lost = due - delivered - dead
    repeated = len(ok) - len(delivered)

    for pair, records in chains.items():
        violations += _check_chain(pair, records, by_pair.get(pair, []), tiers)
    notes = []
    for pair in sorted(delivered & dead):
        logs = [[(a.tier, a.at, a.status, a.error) for a in d.attempts]
                for i, d in chains[pair] if i == len(tiers)]
        notes.append(f"{pair} delivered and dead-lettered: arrivals "
                     f"{[(round(a.at * 1000), a.status) for a in by_pair[pair]]}, dead letter "
                     f"attempts {logs}")

    return Audit(
        pairs=len(due), delivered=delivered & due, dead=dead & due, lost=lost,
        repeated=repeated, arrivals=sum(len(a) for a in by_pair.values()),
        dead_reasons=dict(reasons), retry_records=retry_records, violations=violations,
        notes=notes, deferred_records=deferred_records,
    )


def _end_ms(attempt: Attempt) -> int:
    return attempt.at + int(attempt.duration_ms)


DEFERRED = -1
"""The chain index of a record on a deferral rung."""


def _attempts(delivery: Delivery) -> list[Attempt]:
    """The attempts of a delivery's log, without the lines of its runs of deferrals."""
    return [a for a in delivery.attempts if a.outcome is not Outcome.DEFERRED]


def _follows(child: Delivery, parent: Delivery) -> bool:
    """``child`` is a later record of ``parent``'s lineage: its attempts begin with the
    parent's, and it has more of them, or it was deferred more times since. (A run of
    deferrals keeps one log line, rewritten each time, so the logs themselves are not
    prefixes of one another.)"""
    mine, theirs = _attempts(parent), _attempts(child)
    if theirs[:len(mine)] != mine:
        return False
    return len(theirs) > len(mine) or (len(theirs) == len(mine) and child.deferrals > parent.deferrals)


def _check_chain(pair: Pair, records: list[tuple[int, Delivery]], arrivals: list[Arrival],
                 tiers: tuple[Any, ...]) -> list[str]:
    problems: list[str] = []
    tol_ms = TOLERANCE * 1000
    logged: dict[tuple[int, str], Attempt] = {}
    for index, delivery in records:
        attempts = _attempts(delivery)
        kind = "the dlq" if index == len(tiers) else "a deferral rung" if index == DEFERRED else tiers[index].name
        where = f"{pair} record of {kind}"
        if 0 <= index < len(tiers) and len(attempts) != index:
            problems.append(f"{where} logs {len(attempts)} attempts, expected {index}")
        for i, attempt in enumerate(attempts):
            logged[(attempt.at, attempt.tier)] = attempt
            if i >= len(tiers) or attempt.tier != tiers[i].name:
                problems.append(f"{where}: attempt {i} made by {attempt.tier}")
                continue
            if i == 0:
                continue
            earliest = _end_ms(attempts[i - 1]) + tiers[i].delay * 1000
            if attempt.at < earliest - tol_ms:
                problems.append(
                    f"EARLY: {where}: attempt {i} ({attempt.tier}) at {attempt.at} is "
                    f"{(earliest - attempt.at) / 1000:.3f} s before it was due ({earliest})")
        if 0 <= index < len(tiers) and attempts:
            earliest = _end_ms(attempts[-1]) + tiers[index].delay * 1000
            if delivery.due_at < earliest - tol_ms:
                problems.append(f"EARLY: {where}: due_at {delivery.due_at} before {earliest}")

    # 2. every logged attempt that got an answer was seen by the receiver, in its window
    for attempt in logged.values():
        if attempt.status is None:
            continue
        start, end = attempt.at / 1000 - TOLERANCE, _end_ms(attempt) / 1000 + TOLERANCE
        if not any(a.status == attempt.status and start <= a.at <= end for a in arrivals):
            problems.append(
                f"{pair}: logged attempt {attempt.tier} at {attempt.at} answered "
                f"{attempt.status} has no matching arrival at the receiver "
                f"(arrivals: {[(round(a.at, 3), a.status) for a in arrivals]})")

    # 3. a retry record (or a deferred one) with no later record of its lineage succeeded:
    # not before due_at
    for index, delivery in records:
        if index >= len(tiers):
            continue
        if any(_follows(other, delivery) for _, other in records):
            continue
        due_s = delivery.due_at / 1000 - TOLERANCE
        if not any(a.status is not None and 200 <= a.status < 300 and a.at >= due_s
                   for a in arrivals):
            kind = tiers[index].name if index >= 0 else "deferred"
            problems.append(
                f"EARLY: {pair} {kind} record due at {delivery.due_at} has no "
                f"later attempt logged and no 2xx at or after its due time (arrivals: "
                f"{[(round(a.at, 3), a.status) for a in arrivals]})")
    return problems


def log_trouble(*logs: Path, limit: int = 40) -> str:
    """The error-level and worse lines of worker logs, for failure messages."""
    lines = []
    for path in logs:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            if "level=error" in line or "level=critical" in line or "Traceback" in line:
                lines.append(f"{path.name}: {line[:300]}")
    return "\n".join(lines[-limit:])


# -- a whole scenario --------------------------------------------------------------------

BOT = "6434515b-8541-4861-bb24-8acd6e77e8c4"


def register(config: Config, url: str) -> Endpoint:
    endpoint = new_endpoint(bot_id=BOT, url=url)
    save_endpoint(config, endpoint)
    return endpoint


def conclude(
    scenario: str,
    request: pytest.FixtureRequest,
    config: Config,
    receiver: ChaosReceiver,
    load: Load,
    endpoints: dict[str, Endpoint],
    logs: list[Path],
    *,
    notes: str = "",
    drain_timeout: float = 60,
) -> Audit:
    """Wait for the load and the pipeline to finish, audit, report, assert."""
    load.join(90)
    by_path = {p: e.id for p, e in endpoints.items()}
    unacked = [event_id for event_id, _ in load.failed]
    try:
        waited = drain(config, timeout=drain_timeout)
    except AssertionError as exc:
        so_far = audit(config, receiver, load.published, by_path, unacked=unacked)
        tails = "\n".join(f"--- the last lines of {p.name}:\n" + "\n".join(
            line[:300] for line in p.read_text(errors="replace").splitlines()[-25:]) for p in logs if p.exists())
        raise AssertionError(
            f"{exc}\nso far (lost = not delivered yet): {so_far.line(scenario)}\n"
            f"{log_trouble(*logs)}\n{tails}") from None
    result = audit(config, receiver, load.published, by_path, unacked=unacked)
    line = result.line(scenario)
    detail = (f"  {len(endpoints)} endpoint(s), {result.arrivals} requests seen, "
              f"{result.retry_records} retry records, dead letters {result.dead_reasons or {}}, "
              f"delivered and also dead-lettered {result.both}, drained {waited:.1f} s after "
              f"the load; {notes}")
    print(f"\n{line}\n{detail}")
    for note in result.notes[:5]:
        print(f"  note: {note}")
    request.node.user_properties.append(("chaos", line))
    critical = [l for l in log_trouble(*logs).splitlines() if "level=critical" in l]
    assert not load.failed, f"the broker did not acknowledge {len(load.failed)} events: {load.failed[:3]}"
    assert not result.lost, (
        f"{line}\nLOST {len(result.lost)} deliveries, e.g. {sorted(result.lost)[:5]}\n{log_trouble(*logs)}")
    assert not result.violations, "\n".join(result.violations[:20]) + f"\n({len(result.violations)} in all)"
    assert not critical, "\n".join(critical)
    assert result.pairs == len(result.delivered | result.dead)
    return result
