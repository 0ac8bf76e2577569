"""Flow control per endpoint: its rate limit, its circuit breaker, and what a delivery that
cannot go now becomes. Pure decisions with the time passed in; the sender keeps one of
each per endpoint and acts on them.

The rules (DESIGN, "Fairness and flow control"):

* Only an exchange with the receiver is an attempt. The gateway's own limits (the
  endpoint's share of the process while others wait, its rate limit) *defer* the delivery:
  it goes to a deferral topic without spending an attempt (:class:`Deferral`), and comes
  back when the endpoint can take it (:class:`ReturnSchedule`; :func:`deferral_rung`
  picks the topic by how long that is).
* An open circuit is the exception: a delivery to an endpoint whose circuit is open spends
  its attempt on the documented schedule with the outcome ``circuit_open`` and no request,
  so "three retries, then the dead-letter topic" still holds for a down endpoint, without
  hammering it. A delivery's last attempt is never spent so: it waits for the next probe.
* The breaker opens after ``threshold`` consecutive failures (5xx, 408, 429, timeouts,
  refused or broken connections; other 4xx answers neither count nor reset), or when at
  least ``failure_rate`` of the last :data:`FAILURE_WINDOW` requests failed, stays open
  for a jittered period that doubles on every failed probe (up to ``max_open``), then lets
  one delivery through as a probe: a 2xx closes it.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from ..records import Attempt, CircuitState, DeferReason, Outcome

__all__ = [
    "FAILURE_WINDOW",
    "Admission",
    "CircuitBreaker",
    "CircuitChange",
    "Deferral",
    "ReturnSchedule",
    "SendWindow",
    "TokenBucket",
    "breaker_verdict",
    "deferral_rung",
]


@dataclass(frozen=True, slots=True)
class Deferral:
    """The sender's answer when the gateway's own limits put a delivery off: no request
    was made, no attempt is spent."""

    reason: DeferReason
    detail: str
    after: float | None = None
    """Seconds until the endpoint can take it, when the sender knows (the next probe);
    None: the dispatcher paces it."""


def deferral_rung(wait: float, delays: Sequence[int]) -> int:
    """Which deferral topic a delivery that should wait ``wait`` seconds goes to: the rung
    of the longest delay not above the wait (the first rung for a shorter one). The rung's
    worker holds each record until its own due time, so the rung only sorts deliveries
    by how far off they are: records due within one rung's span sit together, and a
    crash repeats at most that span of them."""
    chosen = 0
    for index, delay in enumerate(delays):
        if delay <= wait:
            chosen = index
    return chosen


class ReturnSchedule:
    """When an endpoint can take back the deliveries put off for it: one slot each, at the
    endpoint's pace, after what it already has in hand, oldest first.

    Deferred deliveries that all came back after one fixed delay came back as a wave: the
    endpoint could take one share of it, and the rest were put off again (a 200 ms
    endpoint with 5 connections got 268 of 3,000 events in six minutes). Here the n-th
    delivery deferred for an endpoint serving ``pace`` a second, with ``in_hand`` already
    in flight or waiting, comes back about ``(in_hand + n) / pace`` seconds later, spread
    by up to one slot of jitter (several processes deferring for one endpoint do not
    line up), never earlier than the one deferred before it."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._next = float("-inf")

    def slot(self, now: float, in_hand: int, pace: float) -> float:
        """Seconds from ``now`` until the next delivery deferred now should come back."""
        gap = 1.0 / pace
        start = max(now + in_hand * gap, self._next)
        self._next = start + gap
        return start - now + self._rng.uniform(0.0, gap)


FAILURE_WINDOW = 20
"""Requests the failure-rate rule of a circuit looks back over."""


class TokenBucket:
    """A rate limit of ``rate`` requests a second with bursts of ``burst`` (GCRA: one
    number, the theoretical arrival time, says when the next request may go)."""

    def __init__(self, rate: float, burst: float = 1.0) -> None:
        if rate <= 0:
            raise ValueError(f"rate {rate!r} must be positive")
        self.rate = rate
        self.interval = 1.0 / rate
        self.tolerance = max(0.0, burst - 1.0) * self.interval
        self._tat = float("-inf")

    def reserve(self, now: float, max_wait: float) -> float | None:
        """Seconds to wait before the request may go (0: now), the slot reserved; or
        None when that would be longer than ``max_wait`` (nothing reserved)."""
        tat = max(self._tat, now)
        wait = tat - self.tolerance - now
        if wait > max_wait:
            return None
        self._tat = tat + self.interval
        return max(0.0, wait)


class SendWindow:
    """A rate limit's hard edge: at most ``rate`` requests written in any one second.

    The :class:`TokenBucket` paces requests as they are admitted, with a small burst; a
    request that then waits for its connection is written later than its slot, in the
    same second as the ones after it (measured: 4 at once, then 20 a second: a busiest
    second of 26 at a limit of 25). This counts requests as they are written and holds
    the next back until the oldest of the last ``rate`` is a second old."""

    def __init__(self, rate: float) -> None:
        self.limit = max(1, math.floor(rate))
        self._written: deque[float] = deque()

    def wait(self, now: float) -> float:
        """Seconds until one more request may be written (0: now)."""
        written = self._written
        while written and now - written[0] >= 1.0:
            written.popleft()
        return 0.0 if len(written) < self.limit else 1.0 - (now - written[0])

    def written(self, now: float) -> None:
        """A request was written at ``now``."""
        self._written.append(now)


class Admission(StrEnum):
    ALLOW = "allow"
    PROBE = "probe"
    """Send it: it tells whether the endpoint is back."""
    REJECT = "reject"
    """The circuit is open: spend the attempt without a request."""


@dataclass(frozen=True, slots=True)
class CircuitChange:
    """A transition, for the logs, the metrics and the circuits topic."""

    state: CircuitState
    failures: int
    """Consecutive failures behind it."""
    reopen_in: float | None = None
    """Seconds until the next probe, when it opened."""
    why: str | None = None
    """Why it opened, in words."""


def breaker_verdict(attempt: Attempt) -> bool | None:
    """True: the receiver is fine; False: a failure the breaker counts; None: neither
    (another 4xx says nothing about the endpoint's health, and an attempt that made no
    request says nothing at all)."""
    outcome = attempt.outcome
    if outcome is Outcome.SUCCESS:
        return True
    if outcome in (Outcome.TIMEOUT, Outcome.CONNECTION_ERROR):
        return False
    if outcome is Outcome.HTTP_ERROR and attempt.status is not None:
        return False if attempt.status >= 500 or attempt.status in (408, 429) else None
    return None


class CircuitBreaker:
    """One endpoint's circuit in one process.

    Two rules open it, whichever comes first: ``threshold`` consecutive failures (a down
    endpoint), or at least ``failure_rate`` of the last ``window`` requests failed (an
    endpoint failing one request in two never fails five in a row, yet is struggling)."""

    def __init__(self, threshold: int, open_for: float, max_open: float, *, failure_rate: float = 0.0,
                 window: int = FAILURE_WINDOW, rng: random.Random | None = None) -> None:
        self.threshold = threshold
        self.open_for = open_for
        self.max_open = max_open
        self.failure_rate = failure_rate
        """0: the consecutive-failure rule alone."""
        self._rng = rng or random.Random()
        self._recent: deque[bool] = deque(maxlen=window)
        """The verdicts of the last ``window`` requests (True: failed), while closed."""
        self.state = CircuitState.CLOSED
        self.failures = 0
        self.opened_at: float | None = None
        """When the circuit last left closed (on the caller's clock); None while closed. A
        failed probe opens it again but keeps this: it has been open since."""
        self._trips = 0
        self._reopen_at = 0.0
        self._probing = False

    def admit(self, now: float) -> Admission:
        """May a delivery go now? (Time in seconds, any clock; the same one throughout.)"""
        if self.state is CircuitState.CLOSED:
            return Admission.ALLOW
        if self.state is CircuitState.OPEN and now >= self._reopen_at:
            self.state = CircuitState.HALF_OPEN
        if self.state is CircuitState.HALF_OPEN and not self._probing:
            self._probing = True
            return Admission.PROBE
        return Admission.REJECT

    def withdraw_probe(self) -> None:
        """The probe admitted was not sent after all (deferred): the next delivery probes."""
        self._probing = False

    @property
    def reopen_at(self) -> float:
        """When (on the caller's clock) the next probe may go, while open."""
        return self._reopen_at

    def record(self, attempt: Attempt, now: float, *, probe: bool = False) -> CircuitChange | None:
        """An attempt that was sent ended; returns the transition it caused, if any."""
        verdict = breaker_verdict(attempt)
        if probe:
            self._probing = False
        if verdict is None:
            return None
        if self.state is CircuitState.CLOSED:
            self._recent.append(not verdict)
        if verdict:
            self.failures = 0
            if self.state is CircuitState.CLOSED:
                return None
            self.state, self._trips, self.opened_at = CircuitState.CLOSED, 0, None
            self._recent.clear()
            return CircuitChange(CircuitState.CLOSED, 0)
        self.failures += 1
        if self.state is CircuitState.CLOSED and self.failures < self.threshold and not self._failing_often():
            return None
        if self.state is CircuitState.OPEN or (self.state is CircuitState.HALF_OPEN and not probe):
            return None  # (an attempt that was already on its way when the circuit opened)
        self._trips += 1
        if self.opened_at is None:
            self.opened_at = now
        base = min(self.max_open, self.open_for * 2 ** (self._trips - 1))
        delay = base * self._rng.uniform(0.5, 1.5)  # probes of many processes spread out
        self.state, self._reopen_at = CircuitState.OPEN, now + delay
        return CircuitChange(CircuitState.OPEN, self.failures, delay, self.why)

    def _failing_often(self) -> bool:
        recent = self._recent
        return bool(self.failure_rate) and len(recent) == recent.maxlen and \
            sum(recent) >= self.failure_rate * len(recent)

    @property
    def why(self) -> str:
        """Why the circuit is open, in words."""
        if self.failures >= self.threshold or not self._recent:
            return f"{self.failures} consecutive failures"
        return f"{sum(self._recent)} of the last {len(self._recent)} requests failed"
