"""The HTTP sender: one signed POST of one delivery, how it ended, and each endpoint's
share of the process.

Each endpoint gets an :class:`EndpointPool`: up to ``max_in_flight`` single-connection
lanes (:class:`~gateway.transport.Connection`, one keep-alive connection each; the
endpoint's ``maxInFlight``, else ``GATEWAY_ENDPOINT_CONCURRENCY``), a short queue of
deliveries waiting for one (``GATEWAY_ENDPOINT_QUEUE``, each waiting at most
``GATEWAY_ENDPOINT_WAIT``), its rate limit and its circuit breaker
(:mod:`gateway.flow`). So an endpoint's share of the process is bounded: at most
``max_in_flight`` plus the queue of the process's in-flight records are ever its, however
slow it is. A delivery that finds its endpoint's share full, waits out the local wait,
or would have to wait longer for its rate limit, is not an attempt: :meth:`Sender.send`
returns a :class:`~gateway.flow.Deferral` and the dispatcher puts it on a deferral topic.
One whose endpoint's circuit is open spends its attempt without a request
(``circuit_open``).

Each request is built as bytes (the endpoint's request line and fixed headers once, the
signed headers and body per request) and handed to :meth:`Connection.exchange`:
``httpx.AsyncClient`` and its Request/Response objects cost more CPU than the exchange
itself (``bench/http_clients.py`` measures the options).

Every attempt is bounded by one overall deadline (``request_timeout``), connect to last
byte, so a receiver that trickles bytes cannot hold a worker. Redirects are not followed:
a 3xx is a failed attempt. At most ``max_response_bytes`` of the body are read.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections import deque
from collections.abc import Callable

import httpx

from .config import Config
from .destinations import BlockedDestination, DestinationPolicy
from .flow import Admission, CircuitBreaker, CircuitChange, CircuitState, Deferral, DeferReason, TokenBucket
from .logs import Log
from .records import Attempt, Endpoint, Outcome, bounded
from .signing import secret_key, signature_header
from .transport import KEEPALIVE_EXPIRY, Connection, check_header, head_of

__all__ = ["SNIPPET_CHARS", "EndpointPool", "Sender", "SenderClosed", "parse_retry_after"]

_log = logging.getLogger(__name__)

SNIPPET_CHARS = 512
USER_AGENT = "webhook-gateway/0.1"
MAX_OPEN_SECONDS = 300.0
"""Longest a circuit stays open between probes (it doubles from GATEWAY_CIRCUIT_OPEN)."""


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # "²".isdigit() is True too
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        return None
    return max(0.0, moment.timestamp() - (time.time() if now is None else now))


class EndpointPool:
    """One endpoint's lanes (single-connection, made as they are first needed), the
    deliveries waiting for one, its rate limit and its circuit breaker.

    Requests waiting for a lane queue in order. The wait is bounded without a timer per
    request: :meth:`expire`, called a few times a second, fails the waiters whose time
    is up (a timer per wait cost about 5% of a worker's CPU in a burst, where nearly
    every request waits)."""

    def __init__(self, url: str, limit: int, make: Callable[[], Connection], *,
                 queue_limit: int = 1_000_000, breaker: CircuitBreaker | None = None) -> None:
        self.url = url
        self.parsed = httpx.URL(url)  # parsed once, not per request
        # What every request to this endpoint starts with, up to the per-request headers.
        self.prefix = head_of("POST", self.parsed, [
            (b"host", self.parsed.netloc),
            (b"user-agent", USER_AGENT.encode()),
            (b"content-type", b"application/json"),
        ])[:-2]
        self.limit = limit
        self.queue_limit = queue_limit
        self.service_seconds: float | None = None
        self.breaker = breaker or CircuitBreaker(1_000_000, 1.0, 1.0)
        self.bucket: TokenBucket | None = None
        self.make = make
        self.lanes: list[Connection] = []
        self.idle: list[Connection] = []
        """Most recently used last: reused first, so the others can expire."""
        self._waiters: deque[tuple[asyncio.Future[Connection], float]] = deque()
        """(future, loop time it expires), in the order they came."""
        self.retired = False
        self.busy = 0
        self.waiting = 0
        self._closing: set[asyncio.Task[None]] = set()

    async def acquire(self, wait: float) -> Connection:
        """An idle lane, a new one while under the limit, or the first to come free
        within about ``wait`` seconds (else ``TimeoutError``, from :meth:`expire`)."""
        if self.idle:
            lane = self.idle.pop()
        elif len(self.lanes) < self.limit:
            lane = self.make()
            self.lanes.append(lane)
        else:
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[Connection] = loop.create_future()
            self._waiters.append((waiter, loop.time() + wait))
            self.waiting += 1
            try:
                lane = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._hand_over(waiter.result())  # handed a lane as it was cancelled
                raise
            finally:
                self.waiting -= 1
        self.busy += 1
        return lane

    def release(self, lane: Connection) -> None:
        self.busy -= 1
        if len(self.lanes) > self.limit and not self._waiters:  # its maxInFlight was lowered
            self.lanes.remove(lane)
            self._close_later(lane)
            return
        self._hand_over(lane)

    def full(self, wait: float) -> bool:
        """No lane free or to be made, and as many waiting as the endpoint can serve within
        ``wait`` seconds (at the pace its recent requests took), or the queue at its limit:
        the endpoint's share of the process is all in use. A fast endpoint may queue a
        whole burst; a slow one only what it will take before the wait is up."""
        if self.idle or len(self.lanes) < self.limit:
            return False
        room = self.queue_limit
        if self.service_seconds is not None:
            room = min(room, max(self.limit, int(self.limit * wait / max(self.service_seconds, 1e-4))))
        return self.waiting >= room

    def served(self, seconds: float) -> None:
        """A request took ``seconds``: the pace :meth:`full` expects (a moving average)."""
        previous = self.service_seconds
        self.service_seconds = seconds if previous is None else 0.8 * previous + 0.2 * seconds

    def configure(self, endpoint: Endpoint, default_limit: int) -> None:
        """Follow the endpoint record's limits (they may change while it is in use)."""
        self.limit = endpoint.max_in_flight or default_limit
        rate = endpoint.rate_limit
        if rate is None:
            self.bucket = None
        elif self.bucket is None or self.bucket.rate != rate:
            self.bucket = TokenBucket(rate, burst=max(1.0, rate / 10))

    def _hand_over(self, lane: Connection) -> None:
        while self._waiters:
            waiter, _ = self._waiters.popleft()
            if not waiter.done():  # (a cancelled or expired one is skipped)
                waiter.set_result(lane)
                return
        if self.retired:  # the endpoint's URL changed meanwhile
            self._close_later(lane)
        else:
            self.idle.append(lane)

    def expire(self, now: float) -> None:
        """Fail the waiters whose wait is up (the oldest are first)."""
        waiters = self._waiters
        while waiters and waiters[0][1] <= now:
            waiter, _ = waiters.popleft()
            if not waiter.done():
                waiter.set_exception(TimeoutError())

    def retire(self) -> None:
        """The endpoint moved to another URL: close the idle lanes now, and the busy ones
        as their requests end (closing one under its request would fail the attempt, or
        send it twice through the stale-connection retry)."""
        self.retired = True
        while self.idle:
            self._close_later(self.idle.pop())

    def reap(self) -> bool:
        """Close the lanes idle past their keep-alive expiry; True when none is left open
        and none is in use or awaited (the endpoint can be forgotten)."""
        still_open = [lane for lane in self.lanes if not lane.close_if_idle()]
        remembers = self.breaker.failures or self.breaker.state is not CircuitState.CLOSED
        return not (still_open or self.busy or self.waiting or remembers)

    @property
    def done(self) -> bool:
        """Retired and nothing left to wait for: no request, waiter or closing lane."""
        return not (self.busy or self.waiting or self._closing)

    def _close_later(self, lane: Connection) -> None:
        task = asyncio.get_running_loop().create_task(lane.aclose())
        self._closing.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        await asyncio.gather(*(lane.aclose() for lane in self.lanes), *self._closing, return_exceptions=True)


class Sender:
    """Sends deliveries to endpoints. One per process, used from its event loop."""

    def __init__(self, config: Config, *, keepalive_expiry: float = KEEPALIVE_EXPIRY,
                 on_circuit: Callable[[Endpoint, CircuitChange], None] | None = None) -> None:
        self.config = config
        self.on_circuit = on_circuit
        """Told of every circuit transition (the runner writes them to the circuits topic)."""
        self.keepalive_expiry = keepalive_expiry
        # How often waits for a lane are checked: they end at most this late.
        self._tick_every = min(0.25, config.request_timeout / 4)
        self._ticker: asyncio.TimerHandle | None = None
        self._next_reap = 0.0
        self._closed = False
        self._lanes: dict[str, EndpointPool] = {}
        self._keys: dict[str, bytes] = {}
        self._retired: list[EndpointPool] = []
        self.policy = DestinationPolicy(
            allow_private=config.allow_private_networks, allowed=config.allowed_networks
        )
        self._ssl = httpx.create_ssl_context()  # one for every lane: building one costs ms

    def _connection(self) -> Connection:
        return Connection(self.policy, self._ssl, keepalive_expiry=self.keepalive_expiry)

    def _tick(self) -> None:
        """A few times a second: fail the waits for a lane that are up. Every
        ``keepalive_expiry``: close connections idle that long (a server that keeps them
        open forever would otherwise cost a socket each, up to ``endpoint_concurrency``
        per endpoint ever sent to), and forget endpoints left with nothing open or in
        flight (removed ones, quiet ones)."""
        loop = asyncio.get_running_loop()
        self._ticker = loop.call_later(self._tick_every, self._tick)  # first: whatever happens below
        now = loop.time()
        for lanes in self._lanes.values():
            if lanes.waiting:
                lanes.expire(now)
        for lanes in self._retired:
            lanes.expire(now)
        if now >= self._next_reap:
            self._next_reap = now + self.keepalive_expiry
            for endpoint_id, lanes in list(self._lanes.items()):
                if lanes.reap():
                    del self._lanes[endpoint_id]

    def _new_lanes(self, endpoint: Endpoint, old: EndpointPool | None) -> EndpointPool:
        """Lanes for an endpoint seen for the first time, or again after it was forgotten
        or its URL changed. Raises ``httpx.InvalidURL``/``ValueError`` for an unusable URL."""
        config = self.config
        lanes = EndpointPool(
            endpoint.url, config.endpoint_concurrency, self._connection, queue_limit=config.endpoint_queue,
            breaker=CircuitBreaker(config.circuit_failures, config.circuit_open_seconds, MAX_OPEN_SECONDS),
        )
        if old is not None:  # the URL changed: the old connections go
            old.retire()
            self._retired = [r for r in self._retired if not r.done] + [old]
        self._lanes[endpoint.id] = lanes
        if self._ticker is None:  # the first lanes: from now on there are waits to bound
            loop = asyncio.get_running_loop()
            self._next_reap = loop.time() + self.keepalive_expiry
            self._ticker = loop.call_later(self._tick_every, self._tick)
        return lanes

    def _key(self, secret: str) -> bytes:
        key = self._keys.get(secret)
        if key is None:
            key = self._keys[secret] = secret_key(secret)
        return key

    async def send(
        self, endpoint: Endpoint, event_id: str, body: bytes, tier: str, *, log: Log = _log
    ) -> Attempt | Deferral:
        """POST ``body`` to ``endpoint`` once, or say why the gateway's own limits put it
        off (a :class:`~gateway.flow.Deferral`: no request, no attempt spent). Never raises
        for what the receiver does.

        Raises :class:`SenderClosed` once :meth:`aclose` ran (the caller leaves its record
        unsettled, for the next owner), and :class:`~gateway.signing.InvalidSecret` for an
        endpoint record with an unusable secret. ``log`` carries the caller's context
        (event and endpoint ids)."""
        lanes = self._lanes.get(endpoint.id)
        if lanes is None or lanes.url != endpoint.url:  # (aclose forgets every endpoint)
            if self._closed:  # a connection made now would never be closed
                raise SenderClosed("the sender is closed")
            try:
                lanes = self._new_lanes(endpoint, lanes)
            except (httpx.InvalidURL, ValueError) as exc:  # an endpoint record not written by the CLI
                return _unsent(tier, Outcome.INVALID_ENDPOINT, f"invalid endpoint URL: {exc}")
        lanes.configure(endpoint, self.config.endpoint_concurrency)
        loop = asyncio.get_running_loop()
        admission = lanes.breaker.admit(loop.time())
        if admission is Admission.REJECT:
            return self._circuit_open(lanes, tier, loop.time())
        probe = admission is Admission.PROBE
        wait = self.config.endpoint_wait
        if lanes.full(wait):
            return self._defer(lanes, probe, DeferReason.SHARE,
                               f"the endpoint's share of this process is full ({lanes.limit} in flight, "
                               f"{lanes.waiting} waiting)")
        if lanes.bucket is not None:
            delay = lanes.bucket.reserve(loop.time(), wait)
            if delay is None:
                return self._defer(lanes, probe, DeferReason.RATE,
                                   f"its rate limit ({lanes.bucket.rate:g}/s) allows no request within {wait:g} s")
            if delay > 0:
                lanes.waiting += 1
                try:
                    await asyncio.sleep(delay)
                finally:
                    lanes.waiting -= 1
        try:
            lane = await lanes.acquire(wait)
        except TimeoutError:
            return self._defer(lanes, probe, DeferReason.BUSY,
                               f"its {lanes.limit} connections stayed busy for {wait:g} s")
        if not probe and lanes.breaker.admit(loop.time()) is not Admission.ALLOW:
            # The circuit opened while this one waited for a connection.
            lanes.release(lane)
            lanes.breaker.withdraw_probe()
            return self._circuit_open(lanes, tier, loop.time())
        try:
            attempt = await self._exchange(lanes, lane, endpoint, event_id, body, tier)
        except BaseException:
            if probe:  # (an unusable secret, a cancellation): the next delivery probes
                lanes.breaker.withdraw_probe()
            raise
        if attempt.outcome.reached_network:
            lanes.served(attempt.duration_ms / 1000)
        change = lanes.breaker.record(attempt, loop.time(), probe=probe)
        if change is not None:
            self._circuit_changed(endpoint, change, log)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("attempt", extra={"outcome": attempt.outcome.value, "status": attempt.status,
                                        "duration_ms": attempt.duration_ms, "probe": probe})
        return attempt

    def _defer(self, lanes: EndpointPool, probe: bool, reason: DeferReason, detail: str) -> Deferral:
        if probe:
            lanes.breaker.withdraw_probe()
        return Deferral(reason, detail)

    @staticmethod
    def _circuit_open(lanes: EndpointPool, tier: str, now: float) -> Attempt:
        breaker = lanes.breaker
        return _unsent(tier, Outcome.CIRCUIT_OPEN,
                       f"circuit open after {breaker.failures} consecutive failures; no request made "
                       f"(next probe in {max(0.0, breaker.reopen_at - now):.0f} s)")

    def _circuit_changed(self, endpoint: Endpoint, change: CircuitChange, log: Log) -> None:
        if change.state is CircuitState.OPEN:
            log.warning("circuit opened: deliveries spend their attempts without requests until a probe "
                        "answers 2xx",
                        extra={"failures": change.failures, "probe_in_s": round(change.reopen_in or 0, 1)})
        else:
            log.warning("circuit closed: the endpoint answered a probe with 2xx")
        if self.on_circuit is not None:
            self.on_circuit(endpoint, change)

    def circuit_counts(self) -> dict[CircuitState, int]:
        """Endpoints this process knows, by circuit state."""
        counts = dict.fromkeys(CircuitState, 0)
        for lanes in self._lanes.values():
            counts[lanes.breaker.state] += 1
        return counts

    async def _exchange(self, lanes: EndpointPool, lane: Connection, endpoint: Endpoint, event_id: str,
                        body: bytes, tier: str) -> Attempt:
        try:
            started_at = time.time_ns() // 1_000_000
            started = time.perf_counter()
            timestamp = int(time.time())
            keys = tuple(self._key(s) for s in endpoint.secrets_at(started_at))
            outcome = Outcome.CONNECTION_ERROR
            status: int | None = None
            error: str | None = None
            snippet: str | None = None
            retry_after: float | None = None
            try:
                request = self._request(lanes, keys, event_id, timestamp, body)
                async with asyncio.timeout(self.config.request_timeout):
                    answer = await lane.exchange(lanes.parsed, request)
                    try:
                        status = answer.status
                        if status in (429, 503):
                            retry_after = parse_retry_after(answer.header(b"retry-after"))
                        raw = await answer.read(self.config.max_response_bytes)
                    finally:
                        answer.close()
                snippet = raw[:SNIPPET_CHARS * 4].decode("utf-8", errors="replace")[:SNIPPET_CHARS] or None
                outcome = Outcome.SUCCESS if 200 <= status < 300 else Outcome.HTTP_ERROR
                if 300 <= status < 400:
                    error = f"redirect to {answer.header(b'location') or '?'} (not followed)"
            except BlockedDestination as exc:
                outcome, error = Outcome.BLOCKED, str(exc)
            except TimeoutError:  # (with a status when the head came and the body did not)
                outcome, error = Outcome.TIMEOUT, f"timeout after {self.config.request_timeout:g} s"
            except httpx.ConnectError as exc:
                error = f"connection error: {exc or type(exc).__name__}"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
            except OSError as exc:
                error = f"connection error: {exc}"
            duration_ms = (time.perf_counter() - started) * 1000
        finally:
            lanes.release(lane)
        return Attempt(
            at=started_at, tier=tier, duration_ms=round(duration_ms, 3), outcome=outcome, status=status,
            error=bounded(error), response_snippet=snippet, retry_after=retry_after,
        )

    @staticmethod
    def _request(lanes: EndpointPool, keys: tuple[bytes, ...], event_id: str, timestamp: int, body: bytes) -> bytes:
        """The whole request in bytes: the endpoint's prefix, the signed headers, the body."""
        webhook_id = event_id.encode()
        check_header(b"webhook-id", webhook_id)  # a retry record's id comes from Kafka
        return b"".join((
            lanes.prefix,
            b"webhook-id: ", webhook_id,
            b"\r\nwebhook-timestamp: ", str(timestamp).encode(),
            b"\r\nwebhook-signature: ", signature_header(keys, event_id, timestamp, body).encode(),
            b"\r\ncontent-length: ", str(len(body)).encode(),
            b"\r\n\r\n", body,
        ))

    async def aclose(self) -> None:
        self._closed = True
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        every = [*self._lanes.values(), *self._retired]
        self._lanes, self._retired = {}, []
        for lanes in every:  # a connection a running request makes from now on goes when it ends
            lanes.retire()
        await asyncio.gather(*(lanes.aclose() for lanes in every), return_exceptions=True)
        await self.policy.aclose()


def _unsent(tier: str, outcome: Outcome, error: str) -> Attempt:
    """A failed attempt that never reached the network."""
    return Attempt(at=time.time_ns() // 1_000_000, tier=tier, duration_ms=0.0, outcome=outcome,
                   error=bounded(error))


class SenderClosed(RuntimeError):
    """A send after :meth:`Sender.aclose`: nothing was attempted."""
