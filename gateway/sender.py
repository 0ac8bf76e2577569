"""The HTTP sender: one signed POST of one delivery, and how it ended.

Each endpoint gets ``endpoint_concurrency`` lanes: one
:class:`~gateway.transport.Connection` (an httpx transport holding a single keep-alive
connection) each. A request takes an idle lane or waits for one, so the lanes are also
the endpoint's concurrency limit, and a slow endpoint can only ever fill its own lanes,
never another endpoint's. The wait is bounded too (``request_timeout``): deliveries
queued for an endpoint slower than its own stream of events hold the process's in-flight
slots, and past that bound they fail as a timeout and move on to the retry tiers rather
than make every other endpoint go at that endpoint's pace.

Each request is built as bytes (the endpoint's request line and fixed headers once, the
signed headers and body per request) and handed to :meth:`Connection.exchange`:
``httpx.AsyncClient`` and its Request/Response objects cost more CPU than the exchange
itself (``bench/http_clients.py`` measures the options).

Every attempt is bounded by one overall deadline (``request_timeout``), connect to last
byte read, so a receiver that trickles bytes cannot hold a worker. Redirects are not
followed: a 3xx is a failed attempt. At most ``max_response_bytes`` of the body are read.
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
from .logs import Log
from .records import Attempt, Endpoint, Outcome, bounded
from .signing import secret_key, signature_header
from .transport import KEEPALIVE_EXPIRY, Connection, check_header, head_of

__all__ = ["SNIPPET_CHARS", "Sender", "SenderClosed", "parse_retry_after"]

_log = logging.getLogger(__name__)

SNIPPET_CHARS = 512
USER_AGENT = "webhook-gateway/0.1"


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


class _Lanes:
    """The single-connection lanes of one endpoint, made as they are first needed.

    Requests waiting for a lane queue in order. The wait is bounded without a timer per
    request: :meth:`expire`, called a few times a second, fails the waiters whose time
    is up (a timer per wait cost about 5% of a worker's CPU in a burst, where nearly
    every request waits)."""

    def __init__(self, url: str, limit: int, make: Callable[[], Connection]) -> None:
        self.url = url
        self.parsed = httpx.URL(url)  # parsed once, not per request
        # What every request to this endpoint starts with, up to the per-request headers.
        self.prefix = head_of("POST", self.parsed, [
            (b"host", self.parsed.netloc),
            (b"user-agent", USER_AGENT.encode()),
            (b"content-type", b"application/json"),
        ])[:-2]
        self.limit = limit
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
        self._hand_over(lane)

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
        return not (still_open or self.busy or self.waiting)

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

    def __init__(self, config: Config, *, keepalive_expiry: float = KEEPALIVE_EXPIRY) -> None:
        self.config = config
        self.keepalive_expiry = keepalive_expiry
        # How often waits for a lane are checked: they end at most this late.
        self._tick_every = min(0.25, config.request_timeout / 4)
        self._ticker: asyncio.TimerHandle | None = None
        self._next_reap = 0.0
        self._closed = False
        self._lanes: dict[str, _Lanes] = {}
        self._keys: dict[str, bytes] = {}
        self._retired: list[_Lanes] = []
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

    def _new_lanes(self, endpoint: Endpoint, old: _Lanes | None) -> _Lanes:
        """Lanes for an endpoint seen for the first time, or again after it was forgotten
        or its URL changed. Raises ``httpx.InvalidURL``/``ValueError`` for an unusable URL."""
        lanes = _Lanes(endpoint.url, self.config.endpoint_concurrency, self._connection)
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
    ) -> Attempt:
        """POST ``body`` to ``endpoint`` once; never raises for what the receiver does.

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
        try:
            lane = await lanes.acquire(self.config.request_timeout)
        except TimeoutError:
            # Deliveries waiting for a slow endpoint's connections hold the process's
            # in-flight slots: bounded, they go on to the retry tiers instead of making
            # every other endpoint wait at that endpoint's pace.
            return _unsent(tier, Outcome.TIMEOUT, f"timeout after {self.config.request_timeout:g} s waiting "
                                                  f"for one of the endpoint's {lanes.limit} connections (all busy)")
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
        attempt = Attempt(
            at=started_at, tier=tier, duration_ms=round(duration_ms, 3), outcome=outcome, status=status,
            error=bounded(error), response_snippet=snippet, retry_after=retry_after,
        )
        if log.isEnabledFor(logging.DEBUG):
            log.debug("attempt", extra={"outcome": outcome.value, "status": status,
                                        "duration_ms": attempt.duration_ms})
        return attempt

    @staticmethod
    def _request(lanes: _Lanes, keys: tuple[bytes, ...], event_id: str, timestamp: int, body: bytes) -> bytes:
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
