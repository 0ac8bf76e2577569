"""Flow control per endpoint: its rate limit, its circuit breaker, and what a delivery that
cannot go now becomes. Pure decisions with the time passed in; the sender keeps one of
each per endpoint and acts on them.

The rules (DESIGN, "Fairness and flow control"):

* Only an exchange with the receiver is an attempt. The gateway's own limits (the
  endpoint's connections all busy past a short wait, its share of the process full, its
  rate limit) *defer* the delivery: it goes to a deferral topic without spending an
  attempt (:class:`Deferral`; :func:`deferral_rung` picks the topic).
* An open circuit is the exception: a delivery to an endpoint whose circuit is open spends
  its attempt on the documented schedule with the outcome ``circuit_open`` and no request,
  so "three retries, then the dead-letter topic" still holds for a down endpoint, without
  hammering it.
* The breaker opens after ``threshold`` consecutive failures (5xx, 408, 429, timeouts,
  refused or broken connections; other 4xx answers neither count nor reset), stays open
  for a jittered period that doubles on every failed probe (up to ``max_open``), then lets
  one delivery through as a probe: a 2xx closes it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum

from ..records import Attempt, CircuitState, DeferReason, Outcome

__all__ = [
    "Admission",
    "CircuitBreaker",
    "CircuitChange",
    "Deferral",
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


def deferral_rung(deferrals: int, rungs: int) -> int:
    """Which deferral topic a delivery deferred ``deferrals`` times (this one included)
    goes to: the shortest delay three times, then each longer one three times, then the
    longest. A delivery its endpoint can take soon is back soon; one that keeps finding
    no room costs a Kafka round trip every few minutes, not every few seconds."""
    return min(rungs - 1, max(0, deferrals - 1) // 3)


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
    """One endpoint's circuit in one process."""

    def __init__(self, threshold: int, open_for: float, max_open: float, *,
                 rng: random.Random | None = None) -> None:
        self.threshold = threshold
        self.open_for = open_for
        self.max_open = max_open
        self._rng = rng or random.Random()
        self.state = CircuitState.CLOSED
        self.failures = 0
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
        if verdict:
            self.failures = 0
            if self.state is CircuitState.CLOSED:
                return None
            self.state, self._trips = CircuitState.CLOSED, 0
            return CircuitChange(CircuitState.CLOSED, 0)
        self.failures += 1
        if self.state is CircuitState.CLOSED and self.failures < self.threshold:
            return None
        if self.state is CircuitState.OPEN or (self.state is CircuitState.HALF_OPEN and not probe):
            return None  # (an attempt that was already on its way when the circuit opened)
        self._trips += 1
        base = min(self.max_open, self.open_for * 2 ** (self._trips - 1))
        delay = base * self._rng.uniform(0.5, 1.5)  # probes of many processes spread out
        self.state, self._reopen_at = CircuitState.OPEN, now + delay
        return CircuitChange(CircuitState.OPEN, self.failures, delay)
