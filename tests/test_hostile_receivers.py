"""The HTTP sender against hostile receivers and hostile DNS: real sockets, real httpx.

Every receiver here is a real TCP server on a loopback address, written with raw sockets
in threads so it can misbehave in ways an HTTP framework would not let it: redirect,
answer 10 MB or forever, trickle one byte a second, never answer, ask for a Retry-After.
Name resolution is stubbed at the socket level (``socket.getaddrinfo``), and outgoing
``connect`` calls are recorded (and, for public addresses, refused so nothing leaves the
machine), so the SSRF tests show what the connection path really did, not what a mocked
HTTP client was told.

Each test is bounded to a few seconds: request timeouts here are 2 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import gzip
import ipaddress
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from gateway.codec import Codec
from gateway.config import Config
from gateway.delivery import (
    BLOCKED_PREFIX,
    SNIPPET_CHARS,
    Connection,
    Deferral,
    DestinationPolicy,
    Dispatcher,
    GiveUp,
    Retry,
    Sender,
    decide,
    next_step,
)
from gateway.errors import SenderClosed
from gateway.events import parse_event
from gateway.observability import Metrics
from gateway.records import MAX_STORED_TEXT, Attempt, DeadLetterReason, DeferReason, Delivery, Endpoint, Outcome
from gateway.signing import new_secret
from gateway.store import EndpointTable, Topics, delivery_headers

from .fakes import attempted
from .raw_server import Conn, Handler, RawServer, respond
from .receiver import Receiver

pytestmark = pytest.mark.timeout(30)

BOT = "6434515b-8541-4861-bb24-8acd6e77e8c4"
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)
TIMEOUT = 2.0
DEFAULT_TIERS = Topics.from_config(Config()).tiers  # events, retry-1m, retry-5m, retry-15m
EVENTS, RETRY_1M, RETRY_5M, RETRY_15M = DEFAULT_TIERS
PUBLIC = "93.184.216.34"
_real_getaddrinfo = socket.getaddrinfo
_real_connect = socket.socket.connect


# --- helpers -------------------------------------------------------------------------------


def endpoint(url: str) -> Endpoint:
    return Endpoint(id=str(uuid.uuid4()), bot_id=BOT, url=url, secret=new_secret(),
                    created_at=0, updated_at=0)


def config(**changes: Any) -> Config:
    """The production policy (no private networks) with loopback allowed, so every test
    goes through the guarded connection path, and a 2 s request timeout."""
    base = Config(request_timeout=TIMEOUT, allowed_networks=LOOPBACK)
    return base.replace(**changes)


@dataclass
class Sent:
    attempt: Attempt
    seconds: float
    """Wall time the send took, measured around it."""
    started_ms: int
    ended_ms: int


async def _send_all(cfg: Config, targets: list[Endpoint]) -> list[Sent]:
    sender = Sender(cfg)
    results = []
    try:
        for target in targets:
            started_ms = time.time_ns() // 1_000_000
            started = time.perf_counter()
            attempt = attempted(await sender.send(target, str(uuid.uuid4()), b'{"event":"MESSAGE"}', "events"))
            results.append(Sent(attempt, time.perf_counter() - started, started_ms,
                                time.time_ns() // 1_000_000))
    finally:
        await sender.aclose()
    return results


def send(cfg: Config, target: Endpoint | str) -> Sent:
    """One real attempt with a fresh Sender, as a worker makes it."""
    (sent,) = asyncio.run(_send_all(cfg, [endpoint(target) if isinstance(target, str) else target]))
    return sent


def send_twice(cfg: Config, target: Endpoint) -> list[Sent]:
    """Two attempts to the same endpoint through the same Sender (same lanes)."""
    return asyncio.run(_send_all(cfg, [target, target]))


# --- redirects -----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_a_failed_attempt_and_is_not_followed(status: int) -> None:
    with RawServer(respond(204)) as target, \
            RawServer(respond(status, f"location: {target.url('/stolen')}")) as redirector:
        sent = send(config(), redirector.url())
        time.sleep(0.3)  # a follow-up request would have arrived by now
        assert target.requests == [] and target.connections == []
    attempt = sent.attempt
    assert attempt.status == status
    assert not attempt.succeeded
    assert attempt.error is not None and "redirect" in attempt.error
    assert target.url("/stolen") in attempt.error and "not followed" in attempt.error
    assert len(redirector.requests) == 1
    step = next_step(DEFAULT_TIERS, EVENTS, attempt)
    assert isinstance(step, Retry) and step.tier == RETRY_1M


def test_a_huge_location_header_is_not_stored_whole() -> None:
    """Fault: the whole ``Location`` of a 3xx went into the attempt's error text, and from
    there into every retry record, its ``last-error`` header, the dead letter's detail and
    a log line: a receiver answering with a 60 KB Location got 60 KB into each. Every
    receiver-controlled text stored is cut to a bound now."""
    location = "https://elsewhere.example/" + "x" * 60_000
    with RawServer(respond(302, f"location: {location}", body=b"y" * 70_000)) as server:
        sent = send(config(), server.url())
    attempt = sent.attempt
    assert attempt.status == 302 and attempt.error is not None
    assert attempt.error.startswith("redirect to https://elsewhere.example/xxx")
    assert len(attempt.error) < MAX_STORED_TEXT + 100, len(attempt.error)
    assert "more characters cut" in attempt.error
    assert attempt.response_snippet is not None and len(attempt.response_snippet) <= SNIPPET_CHARS
    # what travels on: the retry record, its plain headers, a dead letter's detail
    tiers = DEFAULT_TIERS
    decision = decide(tiers, tiers[-1], _delivery_for(endpoint(server.url())), endpoint(server.url()),
                      attempt, b"{}")
    assert isinstance(decision.step, GiveUp) and len(decision.step.detail) < MAX_STORED_TEXT + 200
    assert decision.delivery is not None
    stored = Codec().encode("gateway.Delivery", decision.delivery.to_record(), topic="x")
    assert len(stored) < 4_000
    headers = dict(delivery_headers(decision.delivery, source=("t", 0, 0)))
    last_error = headers["last-error"]
    assert isinstance(last_error, bytes) and len(last_error) < MAX_STORED_TEXT * 4


def _delivery_for(target: Endpoint) -> Delivery:
    return Delivery(event_id=str(uuid.uuid4()), event_type="MESSAGE", bot_id=BOT, session_id=str(uuid.uuid4()),
                    occurred_at=0, payload="{}", endpoint_id=target.id, attempt=3, due_at=0)


def test_a_redirect_to_cloud_metadata_is_not_followed_either() -> None:
    metadata = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"
    with RawServer(respond(302, f"location: {metadata}")) as redirector:
        sent = send(config(), redirector.url())
    assert sent.attempt.status == 302 and not sent.attempt.succeeded
    assert sent.attempt.error == f"redirect to {metadata} (not followed)"


# --- huge responses ------------------------------------------------------------------------


def _body_of(size: int, chunk: bytes = b"A" * 65536) -> Handler:
    """A 200 whose body is ``size`` bytes, written as fast as the client takes them."""

    def handle(conn: Conn, request: bytes) -> bool:
        if not conn.send(f"HTTP/1.1 200 OK\r\ncontent-length: {size}\r\n\r\n".encode()):
            return False
        left = size
        while left > 0 and not conn.server.stopping.is_set():
            piece = chunk[:left]
            if not conn.send(piece):
                return False
            left -= len(piece)
        return True

    return handle


@pytest.mark.parametrize("size", [10 * 1024 * 1024, 1024**4], ids=["10MB", "1TB-endless"])
def test_a_huge_response_is_read_only_up_to_max_response_bytes(size: int) -> None:
    with RawServer(_body_of(size)) as server:
        # Twice through the same lane: the cut-off connection does not jam it.
        both = send_twice(config(max_response_bytes=1000, request_timeout=5.0), endpoint(server.url()))
        # The client hung up long before the body ended: the server's writes fail.
        deadline = time.monotonic() + 3
        while not all(c.closed_by_peer for c in server.connections) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(server.connections) == 2
        assert all(c.closed_by_peer and c.sent < size for c in server.connections)
    for sent in both:
        attempt = sent.attempt
        assert attempt.status == 200 and attempt.error is None and attempt.succeeded
        # Reading on would have run into the 5 s deadline (a timeout, not a 200).
        assert sent.seconds < 5.0, f"took {sent.seconds:.2f} s: the body was read beyond the limit"
        assert attempt.response_snippet == "A" * SNIPPET_CHARS


def test_the_bounded_read_returns_at_most_max_response_bytes() -> None:
    """The read itself, on a real streamed response: the limit, not a byte more."""

    async def read() -> bytes:
        connection = Connection(DestinationPolicy(allow_private=True), ssl.create_default_context())
        try:
            answer = await connection.exchange(
                httpx.URL(server.url()),
                f"POST /hook HTTP/1.1\r\nhost: 127.0.0.1:{server.port}\r\ncontent-length: 2\r\n\r\n{{}}".encode())
            try:
                return await answer.read(1000)
            finally:
                answer.close()
        finally:
            await connection.aclose()

    with RawServer(_body_of(10 * 1024 * 1024)) as server:
        raw = asyncio.run(read())
    assert raw == b"A" * 1000


def test_a_compressed_bomb_is_not_inflated() -> None:
    bomb = gzip.compress(b"\0" * (20 * 1024 * 1024), compresslevel=9)  # ~20 KB on the wire
    with RawServer(respond(500, "content-encoding: gzip", body=bomb)) as server:
        sent = send(config(max_response_bytes=4096), server.url())
    assert sent.attempt.status == 500 and sent.attempt.outcome is Outcome.HTTP_ERROR  # not cut by the deadline
    snippet = sent.attempt.response_snippet
    assert snippet is not None and len(snippet) <= SNIPPET_CHARS
    assert snippet != "\0" * SNIPPET_CHARS  # the raw gzip bytes, never the inflated body


# --- slow and silent receivers -------------------------------------------------------------


def _trickle(prefix: bytes) -> Handler:
    """Send ``prefix``, then one byte a second, forever (until the client or server quits)."""

    def handle(conn: Conn, request: bytes) -> bool:
        if prefix and not conn.send(prefix):
            return False
        while conn.send(b"x") and conn.wait(1.0):
            pass
        return False

    return handle


@pytest.mark.parametrize(
    ("prefix", "status"),
    # A valid head that never ends (a header value growing a byte a second), and a body.
    # Bytes that are not HTTP at all fail at once instead (test_protocol_garbage_...).
    [(b"HTTP/1.1 200 OK\r\nx-slow: ", None), (b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n", 200)],
    ids=["in-the-head", "in-the-body"],
)
def test_a_receiver_trickling_a_byte_a_second_is_cut_at_the_deadline(
    prefix: bytes, status: int | None
) -> None:
    # Every read gets a byte within 1 s, so no per-read timeout ever fires: only the
    # overall deadline (request_timeout, connect to last byte) can end this attempt.
    with RawServer(_trickle(prefix)) as server:
        sent = send(config(), server.url())
    attempt = sent.attempt
    assert attempt.error == f"timeout after {TIMEOUT:g} s"
    assert attempt.status == status and not attempt.succeeded
    # Never before the deadline; after it only by what a loaded machine adds (the trickle
    # itself would go on for 11 days).
    assert TIMEOUT - 0.1 <= sent.seconds <= 2 * TIMEOUT + 1.0, sent.seconds
    assert TIMEOUT * 1000 - 100 <= attempt.duration_ms <= (2 * TIMEOUT + 1.0) * 1000
    step = next_step(DEFAULT_TIERS, EVENTS, attempt)
    assert isinstance(step, Retry) and step.tier == RETRY_1M


def _silent(conn: Conn, request: bytes) -> bool:
    conn.wait(60)
    return False


@pytest.mark.parametrize("accept", [True, False], ids=["reads-never-answers", "never-accepts"])
def test_a_receiver_that_never_answers_times_out(accept: bool) -> None:
    with RawServer(_silent, accept=accept) as server:
        sent = send(config(), server.url())
    assert sent.attempt.error == f"timeout after {TIMEOUT:g} s"
    assert sent.attempt.status is None
    assert TIMEOUT - 0.1 <= sent.seconds <= 2 * TIMEOUT + 1.0, sent.seconds
    assert len(server.requests) == (1 if accept else 0)


def test_the_endpoints_lane_still_works_after_an_attempt_was_cut() -> None:
    """A cancelled request must not leave the endpoint's single-connection lane stuck."""
    trickle = _trickle(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n")
    first = threading.Event()

    def handle(conn: Conn, request: bytes) -> bool:
        if not first.is_set():
            first.set()
            return trickle(conn, request)
        return respond(204)(conn, request)

    with RawServer(handle) as server:
        timed_out, delivered = send_twice(config(endpoint_concurrency=1), endpoint(server.url()))
    assert timed_out.attempt.error == f"timeout after {TIMEOUT:g} s"
    assert delivered.attempt.status == 204 and delivered.attempt.succeeded  # a stuck lane would time out
    assert len(server.requests) == 2


def _raw(data: bytes) -> Handler:
    def handle(conn: Conn, request: bytes) -> bool:
        conn.send(data)
        return False  # and hang up

    return handle


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (b"", None),                                                      # hangs up at once
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", None),                           # not HTTP
        (b"HTTP/1.1 200 OK\r\nx-junk: " + b"a" * 200_000 + b"\r\n\r\n", None),  # endless header
        (b"HTTP/1.1 200 OK\r\nx-nul: a\x00b\r\ncontent-length: 0\r\n\r\n", None),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nZZ\r\nnope\r\n", 200),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort", 200),     # body cut short
    ],
    ids=["hang-up", "not-http", "huge-header", "nul-in-header", "bad-chunk", "short-body"],
)
def test_protocol_garbage_is_a_failed_attempt_never_an_exception(
    answer: bytes, status: int | None
) -> None:
    with RawServer(_raw(answer)) as server:
        sent = send(config(), server.url())
    attempt = sent.attempt
    assert attempt.status == status
    assert attempt.error and not attempt.succeeded, attempt
    assert attempt.outcome is Outcome.CONNECTION_ERROR, attempt  # at once, not at the deadline
    step = next_step(DEFAULT_TIERS, EVENTS, attempt)
    assert isinstance(step, Retry) and step.tier == RETRY_1M


# --- Retry-After, 410 ----------------------------------------------------------------------


def test_429_retry_after_120_skips_to_the_tier_that_waits_at_least_that_long() -> None:
    with RawServer(respond(429, "retry-after: 120")) as server:
        sent = send(config(), server.url())
    attempt = sent.attempt
    assert attempt.status == 429 and attempt.retry_after == 120
    step = next_step(DEFAULT_TIERS, EVENTS, attempt)
    assert isinstance(step, Retry) and step.tier == RETRY_5M  # retry-1m would be too early
    assert step.due_at >= sent.started_ms + 300_000
    assert step.due_at == attempt.ended_at + 300_000
    assert step.due_at <= sent.ended_ms + 2 + 300_000  # (the end, rounded up to be never early)


def test_429_retry_after_shorter_than_the_next_tier_keeps_the_schedule() -> None:
    with RawServer(respond(429, "retry-after: 30")) as server:
        sent = send(config(), server.url())
    attempt = sent.attempt
    assert attempt.retry_after == 30
    step = next_step(DEFAULT_TIERS, EVENTS, attempt)
    # Never earlier than the schedule, even when the receiver would take it sooner.
    assert step == Retry(RETRY_1M, attempt.ended_at + 60_000)


def test_503_with_an_http_date_retry_after() -> None:
    when = email.utils.formatdate(time.time() + 200, usegmt=True)
    with RawServer(respond(503, f"retry-after: {when}")) as server:
        sent = send(config(), server.url())
    attempt = sent.attempt
    assert attempt.status == 503
    assert attempt.retry_after is not None and 195 <= attempt.retry_after <= 201
    step = next_step(DEFAULT_TIERS, EVENTS, attempt)
    assert isinstance(step, Retry) and step.tier == RETRY_5M
    assert step.due_at >= sent.started_ms + 300_000


def test_retry_after_beyond_the_longest_tier_goes_to_the_last_tier() -> None:
    when = email.utils.formatdate(time.time() + 7200, usegmt=True)
    with RawServer(respond(503, f"retry-after: {when}")) as server:
        sent = send(config(), server.url())
    step = next_step(DEFAULT_TIERS, EVENTS, sent.attempt)
    assert isinstance(step, Retry) and step.tier == RETRY_15M
    # From the last retry tier, nothing is left: a Retry-After does not extend the schedule.
    last = next_step(DEFAULT_TIERS, RETRY_15M, sent.attempt)
    assert isinstance(last, GiveUp) and last.reason is DeadLetterReason.RETRIES_EXHAUSTED


@pytest.mark.parametrize(
    ("status", "value"),
    [(500, "120"), (429, "soon"), (429, "-5"), (503, "1.5"), (429, "")],
)
def test_retry_after_is_only_taken_from_429_and_503_in_a_valid_form(status: int, value: str) -> None:
    with RawServer(respond(status, f"retry-after: {value}")) as server:
        sent = send(config(), server.url())
    assert sent.attempt.status == status and sent.attempt.retry_after is None
    assert next_step(DEFAULT_TIERS, EVENTS, sent.attempt) == Retry(
        RETRY_1M, sent.attempt.ended_at + 60_000
    )


@pytest.mark.parametrize("value", ["\u00b2", "\u00b9\u00b2\u00b3"], ids=["superscript-2", "superscript-123"])
def test_a_hostile_retry_after_never_makes_the_sender_raise(value: str) -> None:
    """Fails: ``send`` must never raise for what the receiver does, but
    ``parse_retry_after`` (gateway/sender.py) tests ``value.isdigit()``, which is true for
    superscript digits that ``float`` refuses. A receiver answering 429 with
    ``Retry-After: ²`` (one latin-1 byte, 0xB2) makes ``Sender.send`` raise ValueError;
    ``Dispatcher.run`` then dead-letters the source record as ``invalid`` ("internal
    error while processing: ValueError(...)"), as raw bytes without a delivery: that
    endpoint's delivery is never retried and `dlq replay` refuses the dead letter (the
    bot's other endpoints are still attempted). ASCII-only digits (``value.isascii()``)
    or a try/except around ``float`` would fix it."""
    with RawServer(respond(429, f"retry-after: {value}")) as server:
        sent = send(config(), server.url())
    assert sent.attempt.status == 429 and sent.attempt.retry_after is None


@pytest.mark.parametrize("tier", DEFAULT_TIERS, ids=lambda t: t.name)
def test_410_gone_gives_up_at_once_as_gone(tier: Any) -> None:
    with RawServer(respond(410, body=b"this webhook was deleted")) as server:
        sent = send(config(), server.url())
    attempt = sent.attempt
    assert attempt.status == 410 and not attempt.succeeded
    assert attempt.response_snippet == "this webhook was deleted"
    step = next_step(DEFAULT_TIERS, tier, attempt)
    assert isinstance(step, GiveUp) and step.reason is DeadLetterReason.GONE


@dataclass
class _Msg:
    value_: bytes

    def value(self) -> bytes:
        return self.value_

    def key(self) -> bytes:
        return b"session"

    def topic(self) -> str:
        return "gone.events"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return 7


class _Producer:
    """Stands in for the AckedProducer: records what the dispatcher writes."""

    def __init__(self) -> None:
        self.records: list[tuple[str, Any]] = []

    async def send(self, topic: str, key: bytes | None, value: bytes, headers: Any, *,
                   partition: int | None = None) -> None:
        self.records.append((topic, Codec().decode(value)[1]))


def test_a_410_for_an_endpoint_removed_meanwhile_does_not_bring_it_back() -> None:
    """Fails: ``Dispatcher._disable`` (gateway/dispatcher.py) falls back to the endpoint
    the attempt was made with when the table no longer has it
    (``self.endpoints.get(endpoint.id) or endpoint``), and writes it back, disabled, to the
    endpoints topic. An endpoint removed (`gateway endpoints remove`, a tombstone) while an
    attempt to it was in flight comes back as a registration, its signing secret stored
    again on the compacted topic, when that attempt answers 410. Expected: nothing is
    written for an endpoint that is no longer registered."""
    removed = threading.Event()

    def handle(conn: Conn, request: bytes) -> bool:
        removed.wait(5)  # answer once the removal reached the worker's table
        return respond(410)(conn, request)

    async def main(url: str) -> _Producer:
        cfg = config(topic_prefix="gone")
        table = EndpointTable()
        gone = endpoint(url)
        table.apply(gone.id, gone)
        producer = _Producer()
        sender = Sender(cfg)
        dispatcher = Dispatcher(cfg, codec=Codec(), endpoints=table, sender=sender,
                                producer=producer, metrics=Metrics([t.name for t in Topics.from_config(cfg).tiers]))
        tier = Topics.from_config(cfg).tiers[0]
        doc = {"event": "MESSAGE", "botId": BOT, "sessionId": str(uuid.uuid4()), "role": "USER",
               "message": "hi", "messageId": str(uuid.uuid4())}
        value = Codec().encode("gateway.events.Message", parse_event(doc).to_record(), topic="x")
        job = dispatcher.prepare(tier, _Msg(value))
        running = asyncio.create_task(dispatcher.run(tier, job))
        while not server.requests:
            await asyncio.sleep(0.01)
        table.apply(gone.id, None)  # the tombstone, applied by the registry thread
        removed.set()
        await running
        await sender.aclose()
        return producer

    with RawServer(handle) as server:
        producer = asyncio.run(main(server.url()))
    assert [r["reason"] for t, r in producer.records if t == "gone.dlq"] == ["gone"]
    assert [t for t, _ in producer.records if t == "gone.endpoints"] == []


def test_the_deadline_covers_a_name_that_takes_long_to_resolve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def slow_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "slow.customer.test":
            time.sleep(3)
        return _real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow_getaddrinfo)
    sent = send(config(request_timeout=1.0), "http://slow.customer.test/hook")
    assert sent.attempt.error == "timeout after 1 s"
    assert 0.9 <= sent.seconds < 2.8, sent.seconds  # the lookup takes 3 s


# --- the SSRF guard, in the connection path ------------------------------------------------



@dataclass
class Network:
    """Stubbed DNS for chosen names, and a record of every TCP connect the process makes."""

    names: dict[str, Callable[[int], list[str]]] = field(default_factory=dict)
    """host → (how many times it was resolved before) → addresses."""
    resolved: list[str] = field(default_factory=list)
    connects: list[tuple[str, int]] = field(default_factory=list)

    def getaddrinfo(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name not in self.names:
            return _real_getaddrinfo(host, port, *args, **kwargs)
        addresses = self.names[name](self.resolved.count(name))
        self.resolved.append(name)
        infos: list[tuple[Any, ...]] = []
        for address in addresses:
            if ":" in address:
                infos.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, int(port), 0, 0)))
            else:
                infos.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, int(port))))
        return infos

    def connect(self, sock: socket.socket, address: Any) -> Any:
        if isinstance(address, tuple) and sock.family in (socket.AF_INET, socket.AF_INET6):
            self.connects.append((address[0], address[1]))
            if address[0] == PUBLIC:  # nothing leaves the machine: a public host that is down
                raise ConnectionRefusedError(111, "Connection refused (stubbed public host)")
        return _real_connect(sock, address)

    def to(self, host: str, port: int) -> list[tuple[str, int]]:
        return [c for c in self.connects if c == (host, port)]


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch) -> Iterator[Network]:
    net = Network()
    monkeypatch.setattr(socket, "getaddrinfo", net.getaddrinfo)

    def connect(sock: socket.socket, address: Any) -> Any:
        return net.connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    yield net


def assert_blocked(sent: Sent, *fragments: str) -> None:
    attempt = sent.attempt
    assert attempt.error is not None and attempt.error.startswith(BLOCKED_PREFIX), attempt
    for fragment in fragments:
        assert fragment in attempt.error, attempt.error
    assert attempt.status is None and attempt.outcome is Outcome.BLOCKED
    assert sent.seconds < TIMEOUT  # nothing waited for
    step = next_step(DEFAULT_TIERS, EVENTS, attempt)
    assert isinstance(step, GiveUp) and step.reason is DeadLetterReason.BLOCKED_DESTINATION


def test_a_name_resolving_to_loopback_is_refused_before_any_connection(
    network: Network, receiver: Receiver
) -> None:
    network.names["hooks.customer.test"] = lambda n: ["127.0.0.1"]
    sent = send(Config(request_timeout=TIMEOUT), f"http://hooks.customer.test:{receiver.port}/hook")
    assert_blocked(sent, "hooks.customer.test is 127.0.0.1 (loopback)")
    assert network.resolved == ["hooks.customer.test"]
    assert network.connects == []
    time.sleep(0.2)
    assert receiver.requests == []


def test_the_same_name_is_delivered_when_its_network_is_allowed(
    network: Network, receiver: Receiver
) -> None:
    """Proves the guard sits in the connection path: the connection goes to the address
    the guard resolved and checked, and the request still names the host."""
    network.names["hooks.customer.test"] = lambda n: ["127.0.0.1"]
    sent = send(config(), f"http://hooks.customer.test:{receiver.port}/hook")
    assert sent.attempt.status == 204 and sent.attempt.succeeded, sent.attempt
    assert network.resolved == ["hooks.customer.test"]
    assert network.connects == [("127.0.0.1", receiver.port)]
    (request,) = receiver.at("/hook")
    assert request.headers["host"] == f"hooks.customer.test:{receiver.port}"


def test_one_refused_address_among_several_refuses_the_name(
    network: Network, receiver: Receiver
) -> None:
    network.names["hooks.customer.test"] = lambda n: [PUBLIC, "127.0.0.1"]
    sent = send(Config(request_timeout=TIMEOUT), f"http://hooks.customer.test:{receiver.port}/hook")
    assert_blocked(sent, "127.0.0.1 (loopback)")
    assert network.connects == []  # not even the public address was tried
    assert receiver.requests == []


def test_dns_rebinding_cannot_reach_loopback(network: Network, receiver: Receiver) -> None:
    """Public when the guard resolves it, 127.0.0.1 on every later lookup. The guard
    resolves once per connection and connects to the address it checked, so nothing
    that resolves the name again (there is nothing) can be steered to loopback; the
    next connection resolves afresh and is refused."""
    network.names["rebind.customer.test"] = lambda n: [PUBLIC] if n == 0 else ["127.0.0.1"]
    target = endpoint(f"http://rebind.customer.test:{receiver.port}/hook")
    first, second = send_twice(Config(request_timeout=TIMEOUT), target)

    assert first.attempt.error is not None and first.attempt.error.startswith("connection error")
    assert network.to(PUBLIC, receiver.port) == [(PUBLIC, receiver.port)]
    assert_blocked(second, "rebind.customer.test is 127.0.0.1 (loopback)")
    assert network.resolved == ["rebind.customer.test"] * 2  # once per connection
    assert network.to("127.0.0.1", receiver.port) == []
    time.sleep(0.2)
    assert receiver.requests == []


def test_dns_rebinding_between_two_loopback_addresses_reaches_only_the_checked_one(
    network: Network,
) -> None:
    """Entirely local: 127.0.0.2 is allowed, 127.0.0.1 is not. The name resolves to
    127.0.0.2 when checked and to 127.0.0.1 afterwards; a trap listens on 127.0.0.1 on
    the same port. The request must land on 127.0.0.2."""
    for _ in range(20):
        with contextlib.ExitStack() as stack:
            good = stack.enter_context(RawServer(respond(204), host="127.0.0.2"))
            try:
                trap = stack.enter_context(RawServer(respond(204), port=good.port))
            except OSError:
                continue  # that port is taken on 127.0.0.1: pick another
            network.names["rebind.customer.test"] = (
                lambda n: ["127.0.0.2"] if n == 0 else ["127.0.0.1"]
            )
            cfg = Config(request_timeout=TIMEOUT,
                         allowed_networks=(ipaddress.ip_network("127.0.0.2/32"),))
            sent = send(cfg, f"http://rebind.customer.test:{good.port}/hook")
            time.sleep(0.2)
            assert sent.attempt.status == 204 and sent.attempt.succeeded, sent.attempt
            assert len(good.requests) == 1
            assert trap.requests == [] and trap.connections == []
            assert network.resolved == ["rebind.customer.test"]
            assert network.connects == [("127.0.0.2", good.port)]
            return
    pytest.fail("no port free on both 127.0.0.1 and 127.0.0.2")


@pytest.mark.parametrize(
    ("host", "fragment"),
    [
        ("169.254.169.254", "169.254.169.254 (link-local)"),
        ("[::1]", "::1 (loopback)"),
        ("[::ffff:127.0.0.1]", "(loopback)"),
        ("[::ffff:169.254.169.254]", "(link-local)"),
        ("[fe80::1]", "(link-local)"),
        ("[fd00::1]", "(private)"),
        ("0.0.0.0", "0.0.0.0 (unspecified)"),
        ("10.0.0.1", "(private)"),
        ("192.168.1.1", "(private)"),
        ("100.64.0.1", "(not public)"),
        ("224.0.0.1", "(multicast)"),
        ("240.0.0.1", "(reserved)"),
        # Names the system resolver turns into loopback: judged by what they resolve to.
        ("localhost", "(loopback)"),
        ("2130706433", "127.0.0.1 (loopback)"),
        ("0x7f000001", "127.0.0.1 (loopback)"),
        ("127.1", "127.0.0.1 (loopback)"),
        ("0", "0.0.0.0 (unspecified)"),
    ],
)
def test_non_public_literals_and_names_are_refused_without_connecting(
    network: Network, receiver: Receiver, host: str, fragment: str
) -> None:
    sent = send(Config(request_timeout=TIMEOUT), f"http://{host}:{receiver.port}/latest/meta-data/")
    assert_blocked(sent, fragment)
    assert network.connects == []
    assert receiver.requests == []


def test_allowed_networks_open_only_what_they_name(network: Network, receiver: Receiver) -> None:
    only_10 = Config(request_timeout=TIMEOUT, allowed_networks=(ipaddress.ip_network("10.0.0.0/8"),))
    assert_blocked(send(only_10, receiver.url("/hook")), "127.0.0.1 (loopback)")
    assert receiver.requests == [] and network.connects == []
    ok = send(config(), receiver.url("/hook"))
    assert ok.attempt.succeeded and len(receiver.at("/hook")) == 1


@pytest.mark.parametrize("url", ["http://[::1/hook", "http://127.0.0.1:99999/hook", "ftp://127.0.0.1/hook",
                                 f"http://{'a' * 64}.test/hook"],
                         ids=["unparsable", "port-out-of-range", "not-http", "label-too-long-to-resolve"])
def test_an_unusable_url_in_an_endpoint_record_is_a_failed_attempt_not_an_exception(url: str) -> None:
    """The CLI refuses such URLs, but an endpoint record can be written by anything."""
    sent = send(config(), url)
    assert sent.attempt.error and sent.attempt.status is None and not sent.attempt.succeeded


def test_an_international_name_is_resolved_as_it_goes_on_the_wire(network: Network) -> None:
    """IDNA 2008 (what httpx encodes to, and what DNS holds) maps "faß" to "xn--fa-hia";
    Python's socket and ssl modules, given the Unicode name, would use IDNA 2003 and ask
    for "fass", another domain."""
    network.names["xn--fa-hia.test"] = lambda n: ["127.0.0.1"]
    with RawServer(respond(204)) as server:
        sent = send(config(), server.url(host="faß.test"))
    assert sent.attempt.succeeded, sent.attempt
    assert network.resolved == ["xn--fa-hia.test"]
    assert f"host: xn--fa-hia.test:{server.port}".encode() in server.requests[0].lower()


def test_a_name_whose_dns_hangs_does_not_hold_up_other_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight attempts to a name whose lookup hangs share one lookup (one resolver
    thread), so a healthy endpoint's lookup is not queued behind them."""
    lookups: list[str] = []

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        lookups.append(host)
        if host == "slow.customer.test":
            time.sleep(2.5)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        if host == "fast.customer.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", int(port)))]
        return _real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)

    async def go(fast_url: str) -> tuple[Attempt, float, list[Attempt]]:
        sender = Sender(config(request_timeout=1.0))
        try:
            slow = [asyncio.create_task(sender.send(endpoint("http://slow.customer.test/hook"),
                                                    str(uuid.uuid4()), b"{}", "events")) for _ in range(8)]
            await asyncio.sleep(0.2)
            started = time.perf_counter()
            fast = attempted(await sender.send(endpoint(fast_url), str(uuid.uuid4()), b"{}", "events"))
            return fast, time.perf_counter() - started, [attempted(r) for r in await asyncio.gather(*slow)]
        finally:
            await sender.aclose()

    with RawServer(respond(204)) as server:
        fast, seconds, slow = asyncio.run(go(server.url(host="fast.customer.test")))
    assert fast.succeeded and seconds < 0.9, (fast, seconds)  # waiting on a lookup would take 1 s
    assert [a.error for a in slow] == ["timeout after 1 s"] * 8
    assert lookups.count("slow.customer.test") == 1


def test_an_endpoint_moved_mid_request_gets_its_request_answered_once() -> None:
    """The endpoint's URL changes while a request to the old one is in flight: that
    request ends normally on its connection (closed after), and the next goes to the
    new URL. Closing the old connections at once failed it, or sent it twice."""
    def slow_a(conn: Conn, request: bytes) -> bool:
        if request.startswith(b"POST /a "):
            conn.wait(0.5)
        return respond(200)(conn, request)

    async def go(server: RawServer) -> list[Attempt]:
        sender = Sender(config())
        try:
            old = endpoint(server.url("/a"))
            first = asyncio.create_task(sender.send(old, str(uuid.uuid4()), b"{}", "events"))
            await asyncio.sleep(0.2)
            moved = dataclasses.replace(old, url=server.url("/b"))
            second = attempted(await sender.send(moved, str(uuid.uuid4()), b"{}", "events"))
            return [attempted(await first), second]
        finally:
            await sender.aclose()

    with RawServer(slow_a) as server:
        first, second = asyncio.run(go(server))
        assert (first.status, first.error, second.status, second.error) == (200, None, 200, None)
        assert sorted(r.split(b" ")[1] for r in server.requests) == [b"/a", b"/b"]


def test_a_busy_endpoints_waiters_wait_alone_and_are_deferred_only_while_others_need_room() -> None:
    """One connection, each answer 0.8 s. Nobody else waiting: four deliveries wait their
    turn and are all sent (fairness costs nothing alone). Others short of room (a budget
    of 2, another endpoint at work), once the endpoint's pace was timed over a whole
    second (an endpoint is not judged before: three answers, 1.25 a second, so one waiter
    is what it serves within the 1 s local wait): the youngest waiters beyond that one are
    deferred, without a request and without spending an attempt, and told when to come
    back."""
    def slow(conn: Conn, request: bytes) -> bool:
        conn.wait(0.8)
        return respond(204)(conn, request)

    async def four(url: str, contended: bool) -> list[tuple[Attempt | Deferral, float]]:
        sender = Sender(config(endpoint_concurrency=1, endpoint_wait=1.0, concurrency=2),
                        contended=lambda: contended)
        target = endpoint(url)
        if contended:  # its pace timed over a whole second first
            for _ in range(3):
                assert isinstance(await sender.send(target, str(uuid.uuid4()), b"{}", "events"), Attempt)
        started = time.perf_counter()

        async def one() -> tuple[Attempt | Deferral, float]:
            attempt = await sender.send(target, str(uuid.uuid4()), b"{}", "events")
            return attempt, time.perf_counter() - started

        async def one_other() -> tuple[Attempt | Deferral, float]:  # another endpoint at work
            attempt = await sender.send(endpoint(url), str(uuid.uuid4()), b"{}", "events")
            return attempt, time.perf_counter() - started

        try:
            others = [one_other()] if contended else []
            return list(await asyncio.gather(one(), one(), one(), one(), *others))[:4]
        finally:
            await sender.aclose()

    with RawServer(slow) as server:
        alone = asyncio.run(four(server.url(), contended=False))
        assert [a.status for a, _ in alone if isinstance(a, Attempt)] == [204] * 4, alone
        assert len(server.requests) == 4

    with RawServer(slow) as server:
        (first, _), (second, _), (third, at_third), (fourth, at) = asyncio.run(four(server.url(), contended=True))
        assert [a.status for a in (first, second) if isinstance(a, Attempt)] == [204] * 2, (first, second)
        for put_off in (third, fourth):
            assert isinstance(put_off, Deferral) and put_off.reason is DeferReason.BUSY, put_off
            assert put_off.after is not None and put_off.after > 0
        assert max(at, at_third) < 2.2, (at_third, at)  # shed, not sent (a sent one is answered 2.4 s on)
        time.sleep(0.3)
        assert len(server.requests) == 3 + 2 + 1  # the timing, two sent, and the other endpoint's


def test_idle_connections_are_closed_and_quiet_endpoints_forgotten() -> None:
    """A server that never closes idle connections: the sender closes them after the
    keep-alive expiry, and keeps nothing for the endpoint until it is sent to again."""
    hung_up: list[float] = []

    async def keeps_everything_open(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(2)
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        except asyncio.IncompleteReadError:
            hung_up.append(time.monotonic())
        finally:
            writer.close()

    async def go() -> tuple[float, int, int]:
        server = await asyncio.start_server(keeps_everything_open, "127.0.0.1", 0)
        sender = Sender(config(), keepalive_expiry=0.3)
        target = endpoint(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook")
        try:
            assert attempted(await sender.send(target, str(uuid.uuid4()), b"{}", "events")).succeeded
            sent_at = time.monotonic()
            await asyncio.sleep(1.5)
            remembered = sender.known_endpoints
            again = attempted(await sender.send(target, str(uuid.uuid4()), b"{}", "events"))
            assert again.succeeded, again
            return hung_up[0] - sent_at, remembered, sender.known_endpoints
        finally:
            await sender.aclose()
            server.close()
            await server.wait_closed()

    after, remembered, now = asyncio.run(go())
    assert 0.2 <= after <= 1.5, after  # (expiry 0.3 s; checked every 0.3 s; the test looks at 1.5 s)
    assert (remembered, now) == (0, 1)


def test_a_lane_handed_to_a_waiter_that_is_cancelled_meanwhile_is_not_lost() -> None:
    from gateway.delivery import EndpointPool

    async def go() -> None:
        lanes = EndpointPool("http://127.0.0.1:9/hook", 1,
                       lambda: Connection(DestinationPolicy(allow_private=True), ssl.create_default_context()))
        lane = await lanes.acquire()
        waiting = asyncio.create_task(lanes.acquire())
        await asyncio.sleep(0)
        assert lanes.waiting == 1
        lanes.release(lane)  # handed to the waiter ...
        waiting.cancel()  # ... which is cancelled before it runs again
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert (lanes.idle, lanes.busy, lanes.waiting) == ([lane], 0, 0)

        lane = await lanes.acquire()
        shed = asyncio.create_task(lanes.acquire())
        await asyncio.sleep(0)
        assert lanes.shed(0) == 1
        with pytest.raises(TimeoutError):
            await shed
        lanes.release(lane)
        assert (lanes.idle, lanes.busy, lanes.waiting) == ([lane], 0, 0)

    asyncio.run(go())


def test_closing_the_sender_while_a_lookup_waits_neither_raises_nor_leaks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Closing the sender (a worker shutting down) while a lookup is still queued on the
    resolver: every send ends in an attempt, and a connection made after the close is
    closed when its request ends."""
    def slow_getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if str(host).endswith(".customer.test"):
            time.sleep(0.3)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", int(port)))]
        return _real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow_getaddrinfo)

    async def go(port: int) -> list[Attempt]:
        sender = Sender(config(), policy=DestinationPolicy(allow_private=True, resolver_threads=1))
        sends = [asyncio.create_task(sender.send(endpoint(f"http://h{i}.customer.test:{port}/hook"),
                                                 str(uuid.uuid4()), b"{}", "events")) for i in range(2)]
        await asyncio.sleep(0.1)
        await sender.aclose()
        attempts = [attempted(r) for r in await asyncio.gather(*sends)]
        with pytest.raises(SenderClosed):  # the caller leaves its record for the next owner
            await sender.send(endpoint(f"http://127.0.0.1:{port}/hook"), str(uuid.uuid4()), b"{}", "events")
        await asyncio.sleep(0.2)  # the connections made after the close are closing
        return attempts

    with RawServer(respond(204)) as server:
        attempts = asyncio.run(go(server.port))
        time.sleep(0.2)
        assert [a.status for a in attempts] == [204, 204], attempts
        # The server's side closes once it reads our close.
        assert len(server.connections) == 2 and all(c.sock.fileno() == -1 for c in server.connections)
