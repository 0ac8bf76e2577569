"""The HTTP sender: one signed POST of one delivery, and how it ended.

Each endpoint gets an :class:`~gateway.delivery.EndpointPool` (its connections up to
its in-flight cap, the deliveries waiting for one, its rate limit and its circuit
breaker). A delivery that finds its endpoint's share full, waits out the local wait, or
would have to wait longer for its rate limit, is not an attempt: :meth:`Sender.send`
returns a :class:`~gateway.delivery.Deferral` and the dispatcher puts it on a
deferral topic. One whose endpoint's circuit is open spends its attempt without a request
(``circuit_open``).

How an exchange ends is decided here, once (:meth:`Sender.send`): a 2xx within the
deadline is a success, any other status a failed attempt (a 3xx too: redirects are not
followed), and each way of getting no answer has its outcome. Test sends go through the
same code, their malformed requests signed as they ask (:class:`Signing`).

Each request is built as bytes (the endpoint's request line and fixed headers once, the
signed headers and body per request) and handed to :meth:`Connection.exchange`:
``httpx.AsyncClient`` and its Request/Response objects cost more CPU than the exchange
itself (``bench/http_clients.py`` measures the options).

Every attempt is bounded by one overall deadline (``request_timeout``), connect to last
byte, so a receiver that trickles bytes cannot hold a worker. At most
``max_response_bytes`` of the body are read.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from ..config import Config
from ..errors import BlockedDestination, LookupQueued, SenderClosed
from ..observability import Log
from ..records import Attempt, CircuitState, DeferReason, Endpoint, Outcome, bounded
from ..signing import signature_header
from ._destinations import DestinationPolicy
from ._flow import Admission, CircuitBreaker, CircuitChange, Deferral, SendWindow
from ._pool import EndpointPool
from ._transport import KEEPALIVE_EXPIRY, Connection, check_header

__all__ = ["ALONE_WAITS", "JUDGE_GAP", "MAX_OPEN_SECONDS", "MIN_PROBE_WAIT", "SHED_SLICE", "SNIPPET_CHARS", "Sender",
           "Signing", "parse_retry_after"]

_log = logging.getLogger("gateway.sender")

SNIPPET_CHARS = 512
SHED_SLICE = 64
"""Most waiters put off at once; the rest a moment later, after what else is ready to run
(the records of other endpoints among it): each put-off costs event-loop time (its
deferral's writes), and a slow endpoint's excess can be hundreds."""
JUDGE_GAP = 0.05
"""Shortest time between two judgements of the shares made because records wait for room
(:meth:`Sender.judge_soon`; the tick judges four times a second whatever happens)."""
ALONE_WAITS = 5
"""An endpoint alone at work in the process (no other endpoint holds deliveries or answered
within the last second) keeps what it serves within this many GATEWAY_ENDPOINT_WAITs
while records wait for room: they are most likely its own, and putting its burst off
then helps nobody. Whoever else's records wait behind it wait that long at most (or it
keeps its fair share of the budget, whichever is more, as any endpoint does)."""
MAX_OPEN_SECONDS = 300.0
"""Longest a circuit stays open between probes (it doubles from GATEWAY_CIRCUIT_OPEN)."""
MIN_PROBE_WAIT = 1.0
"""Shortest a last attempt waits for a probe (seconds): the probe may be in flight now."""


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


@dataclass(frozen=True, slots=True)
class Signing:
    """How to sign one request other than as a delivery is: a test send's malformed
    requests (a key that is not the endpoint's, a stale timestamp)."""

    timestamp: int
    """The ``webhook-timestamp`` sent (Unix seconds)."""
    keys: tuple[bytes, ...]
    """The HMAC keys to sign with."""


class Sender:
    """Sends deliveries to endpoints. One per process, used from its event loop."""

    def __init__(self, config: Config, *, keepalive_expiry: float = KEEPALIVE_EXPIRY,
                 on_circuit: Callable[[Endpoint, CircuitChange], None] | None = None,
                 policy: DestinationPolicy | None = None,
                 contended: Callable[[], bool] | None = None,
                 registered: Callable[[str], bool] | None = None) -> None:
        self.config = config
        self.on_circuit = on_circuit
        """Told of every circuit transition (the runner writes them to the circuits topic)."""
        self.contended = contended
        """Whether work of this process is short of room in its in-flight budget (records
        fetched wait for room): only then do endpoints' shares shrink. None: never."""
        self.registered = registered
        """Whether an endpoint is still registered: a removed one is forgotten with its
        circuit. None: every one is."""
        self.keepalive_expiry = keepalive_expiry
        # How often shares are judged and waiters shed: they wait at most this much more.
        self._tick_every = min(0.25, config.request_timeout / 4)
        self._ticker: asyncio.TimerHandle | None = None
        self._next_reap = 0.0
        self._closed = False
        self._pools: dict[str, EndpointPool] = {}
        self._retired: list[EndpointPool] = []
        self.fair_share: int | None = None
        """While others are short of room: the in-flight budget over the endpoints holding
        records (and the records waiting to come in); None while nobody is."""
        self.alone: EndpointPool | None = None
        """The one endpoint at work in the process, when only one is (:data:`ALONE_WAITS`)."""
        self._judging_again = False
        self.judging_soon = False
        """A judgement asked for by :meth:`judge_soon` is pending."""
        self._judged_at = float("-inf")
        self.policy = policy or DestinationPolicy(
            allow_private=config.allow_private_networks, allowed=config.allowed_networks,
            # Waiting for a lookup's turn is the gateway's own limit: deferred, not timed out.
            queue_wait=min(config.endpoint_wait, config.request_timeout / 2),
        )
        """The SSRF guard every connection of this sender goes through (closed with it)."""
        self._ssl = httpx.create_ssl_context()  # one for every lane: building one costs ms

    def _connection(self) -> Connection:
        return Connection(self.policy, self._ssl, keepalive_expiry=self.keepalive_expiry)

    def _tick(self) -> None:
        """A few times a second: judge the shares (:meth:`judge_shares`). Every
        ``keepalive_expiry``: close connections idle that long (a server that keeps them
        open forever would otherwise cost a socket each, up to ``endpoint_concurrency``
        per endpoint ever sent to), and forget endpoints left with nothing open or in
        flight (quiet ones, and removed ones whatever their circuit)."""
        loop = asyncio.get_running_loop()
        self._ticker = loop.call_later(self._tick_every, self._tick)  # first: whatever happens below
        now = loop.time()
        self.judge_shares()
        if now >= self._next_reap:
            self._next_reap = now + self.keepalive_expiry
            registered = self.registered
            for endpoint_id, pool in list(self._pools.items()):
                if pool.reap(registered=registered is None or registered(endpoint_id)):
                    del self._pools[endpoint_id]

    def judge_shares(self) -> int:
        """Work-conserving shares: while nobody is short of room, nothing is put off. While
        someone is (:attr:`contended`), each endpoint keeps its allowance of waiters
        (:meth:`EndpointPool.allowance`: what it serves within ``GATEWAY_ENDPOINT_WAIT``, or
        its max-min fair share of the budget) and its youngest other waiters are put off,
        to come back paced. At most :data:`SHED_SLICE` are put off at once, the rest right
        after what is ready to run. Returns how many were put off. Called a few times a
        second, and soon after records wait for room (:meth:`judge_soon`)."""
        self._judged_at = asyncio.get_running_loop().time()
        for pool in self._retired:  # their URL changed: they come back to the new one
            pool.shed(0)
        if self.contended is None or not self.contended():
            self.fair_share = self.alone = None
            return 0
        holding = sum(1 for pool in self._pools.values() if pool.in_hand)
        # One share more than the endpoints holding records: the records waiting to come
        # in may be another endpoint's.
        self.fair_share = fair = self.config.concurrency // (holding + 1)
        now = asyncio.get_running_loop().time()
        at_work = [pool for pool in self._pools.values() if pool.at_work(now)]
        self.alone = at_work[0] if len(at_work) == 1 else None
        shed = 0
        for pool in self._pools.values():
            if pool.waiting and shed < SHED_SLICE:
                shed += pool.shed(pool.allowance(self._share_wait(pool), fair), SHED_SLICE - shed)
        if shed >= SHED_SLICE and not self._judging_again:  # more to put off: after what is ready
            self._judging_again = True
            asyncio.get_running_loop().call_soon(self._judge_again)
        return shed

    def judge_soon(self) -> None:
        """Records wait for room: judge the shares now rather than at the next tick, at
        most once every :data:`JUDGE_GAP` (the excess a slow endpoint's burst holds is put
        off while other bots' records wait behind it, not up to a tick later)."""
        if self.judging_soon or self._closed:
            return
        self.judging_soon = True
        loop = asyncio.get_running_loop()
        loop.call_later(max(0.0, self._judged_at + JUDGE_GAP - loop.time()), self._judge_soon)

    def _judge_soon(self) -> None:
        self.judging_soon = False
        if not self._closed:
            self.judge_shares()

    def _share_wait(self, pool: EndpointPool) -> float:
        """How long an endpoint's waiters may take to serve while others are short of room:
        ``GATEWAY_ENDPOINT_WAIT``, or :data:`ALONE_WAITS` of it for an endpoint alone at work."""
        wait = self.config.endpoint_wait
        return wait * ALONE_WAITS if pool is self.alone else wait

    def _judge_again(self) -> None:
        self._judging_again = False
        if not self._closed:
            self.judge_shares()

    @property
    def known_endpoints(self) -> int:
        """Endpoints this sender holds a pool for (the others were never sent to, or were
        forgotten once nothing of theirs was open or in flight)."""
        return len(self._pools)

    def _new_pool(self, endpoint: Endpoint, old: EndpointPool | None) -> EndpointPool:
        """The pool of an endpoint seen for the first time, or again after it was forgotten
        or its URL changed. Raises ``httpx.InvalidURL``/``ValueError`` for an unusable URL."""
        config = self.config
        pool = EndpointPool(
            endpoint.url, config.endpoint_concurrency, self._connection,
            breaker=CircuitBreaker(config.circuit_failures, config.circuit_open_seconds, MAX_OPEN_SECONDS,
                                   failure_rate=config.circuit_failure_rate),
        )
        if old is not None:  # the URL changed: the old connections go
            old.retire()
            self._retired = [r for r in self._retired if not r.done] + [old]
        self._pools[endpoint.id] = pool
        if self._ticker is None:  # the first pool: from now on there are waits to bound
            loop = asyncio.get_running_loop()
            self._next_reap = loop.time() + self.keepalive_expiry
            self._ticker = loop.call_later(self._tick_every, self._tick)
        return pool

    async def send(
        self, endpoint: Endpoint, event_id: str, body: bytes, tier: str, *, log: Log = _log,
        signing: Signing | None = None, last: bool = False,
    ) -> Attempt | Deferral:
        """POST ``body`` to ``endpoint`` once, or say why the gateway's own limits put it
        off (a :class:`~gateway.delivery.Deferral`: no request, no attempt spent).
        Never raises for what the receiver does.

        Raises :class:`~gateway.errors.SenderClosed` once :meth:`aclose` ran (the caller
        leaves its record unsettled, for the next owner), and
        :class:`~gateway.errors.InvalidSecret` for an endpoint record with an unusable
        secret. ``log`` carries the caller's context (event and endpoint ids). ``signing``
        replaces the endpoint's own signature (test sends only). ``last``: the delivery's
        last attempt, which an open circuit defers rather than spends."""
        pool = self._pools.get(endpoint.id)
        if pool is None or pool.url != endpoint.url:  # (aclose forgets every endpoint)
            if self._closed:  # a connection made now would never be closed
                raise SenderClosed("the sender is closed")
            try:
                pool = self._new_pool(endpoint, pool)
            except (httpx.InvalidURL, ValueError) as exc:  # an endpoint record not written by the CLI
                return _unsent(tier, Outcome.INVALID_ENDPOINT, f"invalid endpoint URL: {exc}")
        pool.configure(endpoint, self.config.endpoint_concurrency)
        loop = asyncio.get_running_loop()
        admission = pool.breaker.admit(loop.time())
        if admission is Admission.REJECT:
            return self._rejected(pool, tier, loop.time(), last)
        probe = admission is Admission.PROBE
        recorded = False
        try:
            wait = self.config.endpoint_wait
            fair, share_wait = self.fair_share, self._share_wait(pool)
            if fair is not None and pool.full(share_wait, fair):
                # Back after what the endpoint keeps, not after its excess still waiting to
                # be put off (its pace may have been judged only since the last judgement).
                return Deferral(DeferReason.SHARE, f"the endpoint's share of this process is full while others wait "
                                f"({pool.busy} in flight, {pool.waiting} waiting)",
                                pool.return_after(loop.time(), keep=pool.allowance(share_wait, fair)))
            if pool.bucket is not None:
                delay = pool.bucket.reserve(loop.time(), wait)
                if delay is None:
                    return Deferral(DeferReason.RATE,
                                    f"its rate limit ({pool.bucket.rate:g}/s) allows no request within {wait:g} s",
                                    pool.return_after(loop.time()))
                if delay > 0:
                    pool.waiting += 1
                    try:
                        await asyncio.sleep(delay)
                    finally:
                        pool.waiting -= 1
            try:
                lane = await pool.acquire()
            except TimeoutError:  # shed: its share shrank while others wait
                return Deferral(DeferReason.BUSY, f"its {pool.limit} connections are busy while others wait for "
                                "room", pool.return_after(loop.time()))
            if not probe:
                # The circuit may have opened while this one waited. Asked again: this one
                # goes on, or goes as the probe, or is refused; a probe in flight is another
                # delivery's and is left alone.
                again = pool.breaker.admit(loop.time())
                if again is Admission.REJECT:
                    pool.release(lane)
                    return self._rejected(pool, tier, loop.time(), last)
                probe = again is Admission.PROBE
            try:
                attempt = await self._exchange(pool, lane, endpoint, event_id, body, tier, signing)
            except LookupQueued as exc:
                return Deferral(DeferReason.DNS, str(exc), self.config.endpoint_wait)
            if attempt.outcome.reached_network:
                pool.served(attempt.duration_ms / 1000, loop.time())
            change = pool.breaker.record(attempt, loop.time(), probe=probe)
            recorded = True
        finally:
            if probe and not recorded:  # deferred, cancelled, or an unusable secret: the next one probes
                pool.breaker.withdraw_probe()
        if change is not None:
            self._circuit_changed(endpoint, change, log)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("attempt", extra={"outcome": attempt.outcome.value, "status": attempt.status,
                                        "duration_ms": attempt.duration_ms, "probe": probe})
        return attempt

    @staticmethod
    def _rejected(pool: EndpointPool, tier: str, now: float, last: bool) -> Attempt | Deferral:
        """A delivery the open circuit refuses: it spends its attempt without a request
        (``circuit_open``), unless it is the delivery's last: that one always makes a
        request, so it waits for the next probe (a deferral, no attempt spent)."""
        breaker = pool.breaker
        probe_in = max(0.0, breaker.reopen_at - now)
        if last:
            return Deferral(DeferReason.PROBE, f"its circuit is open: the last attempt waits for the next probe "
                            f"(in {probe_in:.0f} s)", after=max(probe_in, MIN_PROBE_WAIT))
        return _unsent(tier, Outcome.CIRCUIT_OPEN,
                       f"circuit open ({breaker.why}); no request made "
                       f"(next probe in {probe_in:.0f} s)")

    def _circuit_changed(self, endpoint: Endpoint, change: CircuitChange, log: Log) -> None:
        if change.state is CircuitState.OPEN:
            log.warning("circuit opened: deliveries spend their attempts without requests until a probe "
                        "answers 2xx", extra={"failures": change.failures, "why": change.why,
                                              "probe_in_s": round(change.reopen_in or 0, 1)})
        else:
            log.warning("circuit closed: the endpoint answered a probe with 2xx")
        if self.on_circuit is not None:
            self.on_circuit(endpoint, change)

    def oldest_open_circuit(self, counts: Callable[[str], bool] | None = None) -> float:
        """Seconds since the circuit open longest (of the endpoints ``counts`` admits, by
        id; None: every one) opened, 0 when none is open. Safe from another thread (the
        metrics scrape): the loop's clock is ``time.monotonic``."""
        opened = [at for endpoint_id, pool in list(self._pools.items())
                  if (at := pool.breaker.opened_at) is not None and (counts is None or counts(endpoint_id))]
        return max(0.0, time.monotonic() - min(opened)) if opened else 0.0

    def circuit_counts(self) -> dict[CircuitState, int]:
        """Endpoints this process knows, by circuit state."""
        counts = dict.fromkeys(CircuitState, 0)
        for pool in self._pools.values():
            counts[pool.breaker.state] += 1
        return counts

    @staticmethod
    async def _in_turn(pool: EndpointPool, window: SendWindow, lane: Connection) -> float:
        """A rate-limited endpoint's request: connected first, then written only when
        the last second's requests leave room (:class:`~gateway.delivery.SendWindow`);
        the seconds waited for room (they count in the request timeout, not in its
        duration)."""
        await lane.connect(pool.parsed)
        loop = asyncio.get_running_loop()
        waited = 0.0
        while (hold := window.wait(loop.time())) > 0:
            await asyncio.sleep(hold)
            waited += hold
        window.written(loop.time())
        return waited

    async def _exchange(self, pool: EndpointPool, lane: Connection, endpoint: Endpoint, event_id: str,
                        body: bytes, tier: str, signing: Signing | None) -> Attempt:
        try:
            started_at = time.time_ns() // 1_000_000
            started = time.perf_counter()
            if signing is None:
                timestamp = int(time.time())
                keys = pool.keys(endpoint, started_at)
            else:
                timestamp, keys = signing.timestamp, signing.keys
            outcome = Outcome.CONNECTION_ERROR
            status: int | None = None
            error: str | None = None
            snippet: str | None = None
            retry_after: float | None = None
            try:
                request = self._request(pool, keys, event_id, timestamp, body)
                async with asyncio.timeout(self.config.request_timeout):
                    if pool.window is not None:
                        started += await self._in_turn(pool, pool.window, lane)
                    answer = await lane.exchange(pool.parsed, request)
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
            pool.release(lane)
        return Attempt(
            at=started_at, tier=tier, duration_ms=round(duration_ms, 3), outcome=outcome, status=status,
            error=bounded(error), response_snippet=snippet, retry_after=retry_after,
        )

    @staticmethod
    def _request(pool: EndpointPool, keys: tuple[bytes, ...], event_id: str, timestamp: int, body: bytes) -> bytes:
        """The whole request in bytes: the endpoint's prefix, the signed headers, the body."""
        webhook_id = event_id.encode()
        check_header(b"webhook-id", webhook_id)  # a retry record's id comes from Kafka
        return b"".join((
            pool.prefix,
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
        every = [*self._pools.values(), *self._retired]
        self._pools, self._retired = {}, []
        for pool in every:  # a connection a running request makes from now on goes when it ends
            pool.retire()
        await asyncio.gather(*(pool.aclose() for pool in every), return_exceptions=True)
        await self.policy.aclose()


def _unsent(tier: str, outcome: Outcome, error: str) -> Attempt:
    """A failed attempt that never reached the network."""
    return Attempt.unsent(time.time_ns() // 1_000_000, tier, outcome, error)
