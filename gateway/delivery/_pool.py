"""Each endpoint's share of a process: its connections (the per-endpoint in-flight cap),
the deliveries waiting for one, its rate limit and its circuit breaker.

An :class:`EndpointPool` holds up to ``limit`` single-connection lanes
(:class:`~gateway.delivery.Connection`, one keep-alive connection each): the
endpoint's ``maxInFlight``, else ``GATEWAY_ENDPOINT_CONCURRENCY``. That is the cap on
requests in flight to one endpoint from one process. Beyond it, a short queue of
deliveries wait for a lane (``GATEWAY_ENDPOINT_QUEUE``, each for at most
``GATEWAY_ENDPOINT_WAIT``; fewer for a slow endpoint: what it serves within the wait).
So an endpoint's share of the process is bounded, however slow it is: :meth:`full` says
when it is all in use, and the sender then defers the delivery (no attempt spent).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

import httpx

from ..records import CircuitState, Endpoint
from ._flow import CircuitBreaker, TokenBucket
from ._transport import Connection, head_of

__all__ = ["USER_AGENT", "EndpointPool"]

USER_AGENT = "webhook-gateway/0.1"


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
