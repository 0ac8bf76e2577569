"""Each endpoint's share of a process: its connections (the per-endpoint in-flight cap),
the deliveries waiting for one, its rate limit, its circuit breaker, and when the
deliveries put off for it should come back.

An :class:`EndpointPool` holds up to ``limit`` single-connection lanes
(:class:`~gateway.delivery.Connection`, one keep-alive connection each): the
endpoint's ``maxInFlight``, else ``GATEWAY_ENDPOINT_CONCURRENCY``. That is the cap on
requests in flight to one endpoint. Beyond it, deliveries wait for a lane, in order.

How many may wait is work-conserving: while no other work is short of room in the
process (the in-flight budget has room for every record fetched), an endpoint may have
as many waiting as the budget holds, and none is deferred. When others are short of room
(:meth:`full`, :meth:`shed`), an endpoint keeps what it serves within
``GATEWAY_ENDPOINT_WAIT`` at its measured pace, or its fair share of the budget (the
budget over the endpoints holding records, max-min), whichever is more; the rest of its
waiters, the youngest first, are deferred (no attempt spent) and come back paced
(:class:`~gateway.delivery.ReturnSchedule`), when the endpoint can take them.
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections import deque
from collections.abc import Callable

import httpx

from ..records import CircuitState, Endpoint
from ..signing import secret_key
from ._flow import CircuitBreaker, ReturnSchedule, SendWindow, TokenBucket
from ._transport import Connection, head_of

__all__ = ["UNTIMED_SECONDS", "USER_AGENT", "EndpointPool"]

USER_AGENT = "webhook-gateway/0.1"
UNTIMED_SECONDS = 0.05
"""What a request to an endpoint is taken to cost before one was timed (seconds)."""
THROUGHPUT_WINDOW = 1.0
"""Seconds over which an endpoint's completed requests are counted (:meth:`EndpointPool.pace`)."""


def _was_shed(waiter: asyncio.Future[Connection]) -> bool:
    """Whether :meth:`EndpointPool.shed` put this waiter off."""
    return waiter.done() and not waiter.cancelled() and isinstance(waiter.exception(), TimeoutError)


class EndpointPool:
    """One endpoint's lanes (single-connection, made as they are first needed), the
    deliveries waiting for one, its rate limit, its circuit breaker and its return
    schedule. Used from the event loop only."""

    def __init__(self, url: str, limit: int, make: Callable[[], Connection], *,
                 breaker: CircuitBreaker | None = None, rng: random.Random | None = None) -> None:
        self.url = url
        self.parsed = httpx.URL(url)  # parsed once, not per request
        # What every request to this endpoint starts with, up to the per-request headers.
        self.prefix = head_of("POST", self.parsed, [
            (b"host", self.parsed.netloc),
            (b"user-agent", USER_AGENT.encode()),
            (b"content-type", b"application/json"),
        ])[:-2]
        self.limit = limit
        self.service_seconds: float | None = None
        self.throughput = 0.0
        """Requests completed a second, over the last :data:`THROUGHPUT_WINDOW` counted, or
        the current one so far when higher (from a quarter of it on)."""
        self._counted_since = float("-inf")
        self._counted = 0
        self.answered_at = float("-inf")
        """When its last request ended (the loop's clock)."""
        self._timed_since: float | None = None
        """When its first request ended (the loop's clock)."""
        self.breaker = breaker or CircuitBreaker(1_000_000, 1.0, 1.0)
        self.bucket: TokenBucket | None = None
        self.window: SendWindow | None = None
        """With a rate limit: the requests written in the last second (its hard edge)."""
        self.returns = ReturnSchedule(rng)
        """When the deliveries deferred for this endpoint come back."""
        self.make = make
        self.lanes: list[Connection] = []
        self.idle: list[Connection] = []
        """Most recently used last: reused first, so the others can expire."""
        self._waiters: deque[asyncio.Future[Connection]] = deque()
        """Waiting for a lane, oldest first."""
        self._keys: tuple[tuple[str, ...], tuple[bytes, ...]] | None = None
        self.retired = False
        self.busy = 0
        self.waiting = 0
        """Waiting for a lane or for the rate limit's slot."""
        self._keeping: int | None = None
        """While :meth:`shed` has more to put off: how many waiters it keeps."""
        self._closing: set[asyncio.Task[None]] = set()

    async def acquire(self) -> Connection:
        """An idle lane, a new one while under the limit, or the first to come free (else
        ``TimeoutError`` when :meth:`shed` puts this waiter off)."""
        if self.idle:
            lane = self.idle.pop()
        elif len(self.lanes) < self.limit:
            lane = self.make()
            self.lanes.append(lane)
        else:
            waiter: asyncio.Future[Connection] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            self.waiting += 1
            try:
                lane = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._hand_over(waiter.result())  # handed a lane as it was cancelled
                raise
            finally:
                if not _was_shed(waiter):  # (shed stopped counting it at once)
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

    @property
    def in_hand(self) -> int:
        """Deliveries this process holds for the endpoint: in flight or waiting."""
        return self.busy + self.waiting

    def pace(self) -> float:
        """Deliveries a second the endpoint takes now: its lanes over the time its recent
        requests took, or the requests it completed a second (over the last second, or the
        part of one counted so far past a quarter) when more; its rate limit when lower.
        Before any request was timed, an optimistic guess (:data:`UNTIMED_SECONDS` a
        request).

        Both measures fall short of what the endpoint can take, in different cases: the
        completed requests when it has less work than lanes, the lanes over the time a
        request took when this process is the bottleneck (a busy event loop adds its own
        delay to every request's time, so 20 lanes timed at 20 ms read as 1,000 a second
        whatever the endpoint completes). The larger is the better guess. (Measured: it
        does not keep a lone endpoint's burst from being partly put off on a machine
        loaded several times over; see the README.)"""
        service = UNTIMED_SECONDS if self.service_seconds is None else max(self.service_seconds, 1e-4)
        pace = max(self.limit / service, self.throughput)
        return min(pace, self.bucket.rate) if self.bucket is not None else pace

    @property
    def settled(self) -> bool:
        """Whether its requests were timed over a whole :data:`THROUGHPUT_WINDOW`: only then is
        its pace judged (:meth:`allowance`)."""
        return self._timed_since is not None and self.answered_at - self._timed_since >= THROUGHPUT_WINDOW

    def at_work(self, now: float) -> bool:
        """Holding deliveries, or answered within the last :data:`THROUGHPUT_WINDOW`: the
        records waiting for room may be its own."""
        return bool(self.in_hand) or now - self.answered_at < THROUGHPUT_WINDOW

    def allowance(self, wait: float, fair_share: int) -> int:
        """How many may wait while others are short of room: what the endpoint serves
        within ``wait`` seconds, or what its fair share of the process leaves beside its
        requests in flight, whichever is more. No limit before its requests were timed over
        a whole :data:`THROUGHPUT_WINDOW` (:attr:`settled`): nothing is put off on a guess
        of its pace, nor on its first answers alone, which come while the event loop takes
        in the burst that made them and read slow (a 25/s endpoint's first answers read
        about 11/s, and its excess was scheduled back 25 s after it could take it)."""
        if not self.settled:
            return sys.maxsize
        return max(int(self.pace() * wait), fair_share - self.busy, 0)

    def full(self, wait: float, fair_share: int) -> bool:
        """Whether a new delivery must be put off while others are short of room (the
        caller asks only then: a lone endpoint may use the whole budget): no lane free or
        to be made, and this endpoint already has its allowance waiting."""
        if self.idle or len(self.lanes) < self.limit:
            return False
        return self.waiting >= self.allowance(wait, fair_share)

    def shed(self, keep: int, most: int | None = None) -> int:
        """Put off the youngest waiters beyond ``keep`` (they would wait longest; the
        oldest are next for a lane), at most ``most`` of them; returns how many."""
        shed = 0
        while len(self._waiters) > keep and (most is None or shed < most):
            waiter = self._waiters.pop()
            if not waiter.done():
                waiter.set_exception(TimeoutError())
                # No longer in hand from now on, not from when its task next runs: the
                # return slots of the ones shed with it start after what the endpoint keeps.
                self.waiting -= 1
                shed += 1
        # While more beyond ``keep`` is left to put off (the next slice), the ones put off
        # now take their return slots after what the endpoint keeps, not after that rest.
        self._keeping = keep if len(self._waiters) > keep else None
        return shed

    def served(self, seconds: float, now: float) -> None:
        """A request took ``seconds`` and ended at ``now``: the pace :meth:`pace` reads (a
        moving average of the time, and the requests completed a second)."""
        self.answered_at = now
        if self._timed_since is None:
            self._timed_since = now
        previous = self.service_seconds
        self.service_seconds = seconds if previous is None else 0.8 * previous + 0.2 * seconds
        counted_for = now - self._counted_since
        if counted_for >= THROUGHPUT_WINDOW:
            self.throughput = self._counted / counted_for
            self._counted_since, self._counted = now, 0
        self._counted += 1
        if THROUGHPUT_WINDOW / 4 <= counted_for < THROUGHPUT_WINDOW:
            # The window so far, when it is the higher rate: a burst's first second would
            # otherwise be judged on its lanes' times alone.
            self.throughput = max(self.throughput, self._counted / counted_for)

    def return_after(self, now: float, keep: int | None = None) -> float:
        """Seconds until a delivery deferred now for this endpoint should come back: its
        slot in the return schedule, after what the endpoint has in hand, or after the
        ``keep`` waiters it keeps when more wait (the rest are put off too, and take the
        slots after this one)."""
        kept = [k for k in (self._keeping, keep) if k is not None]
        in_hand = min(self.in_hand, self.busy + min(kept)) if kept else self.in_hand
        return self.returns.slot(now, in_hand, self.pace())

    def keys(self, endpoint: Endpoint, now_ms: int) -> tuple[bytes, ...]:
        """The HMAC keys to sign with now (the current secret, and the previous one in its
        grace), kept for as long as the secrets do not change: forgotten with the pool."""
        secrets = endpoint.secrets_at(now_ms)
        if self._keys is None or self._keys[0] != secrets:
            self._keys = (secrets, tuple(secret_key(s) for s in secrets))
        return self._keys[1]

    def configure(self, endpoint: Endpoint, default_limit: int) -> None:
        """Follow the endpoint record's limits (they may change while it is in use)."""
        self.limit = endpoint.max_in_flight or default_limit
        rate = endpoint.rate_limit
        if rate is None:
            self.bucket = self.window = None
        elif self.bucket is None or self.bucket.rate != rate:
            self.bucket = TokenBucket(rate, burst=max(1.0, rate / 10))
            self.window = SendWindow(rate)

    def _hand_over(self, lane: Connection) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():  # (a cancelled or shed one is skipped)
                waiter.set_result(lane)
                return
        if self.retired:  # the endpoint's URL changed meanwhile
            self._close_later(lane)
        else:
            self.idle.append(lane)

    def retire(self) -> None:
        """The endpoint moved to another URL: close the idle lanes now, and the busy ones
        as their requests end (closing one under its request would fail the attempt, or
        send it twice through the stale-connection retry)."""
        self.retired = True
        while self.idle:
            self._close_later(self.idle.pop())

    def reap(self, *, registered: bool = True) -> bool:
        """Close the lanes idle past their keep-alive expiry; True when the endpoint can be
        forgotten: none is left open, in use or awaited, and its circuit is closed (an
        endpoint no longer ``registered`` is forgotten with its circuit, whatever state)."""
        still_open = [lane for lane in self.lanes if not lane.close_if_idle()]
        remembers = registered and (self.breaker.failures or self.breaker.state is not CircuitState.CLOSED)
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
