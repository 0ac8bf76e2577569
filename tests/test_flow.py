"""Flow-control decisions with a fake clock: the rate limit, the circuit breaker, the
deferral ladder, a delivery's log of deferrals, and the sender's per-endpoint share."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import Config
from gateway.delivery import Admission, CircuitBreaker, Deferral, Sender, TokenBucket, breaker_verdict, deferral_rung
from gateway.records import Attempt, CircuitState, DeferReason, Delivery, Endpoint, Outcome
from gateway.signing import new_secret

from .raw_server import Conn, RawServer, respond

BOT = "6434515b-8541-4861-bb24-8acd6e77e8c4"


def attempt(outcome: Outcome, status: int | None = None) -> Attempt:
    return Attempt(at=0, tier="events", duration_ms=1.0, outcome=outcome, status=status)


FAIL = attempt(Outcome.HTTP_ERROR, 503)
OK = attempt(Outcome.SUCCESS, 204)


# -- the rate limit --------------------------------------------------------------------------


def test_a_rate_limit_spaces_requests_and_refuses_what_would_wait_too_long() -> None:
    bucket = TokenBucket(10)  # one every 0.1 s
    assert bucket.reserve(0.0, max_wait=1.0) == 0
    assert bucket.reserve(0.0, max_wait=1.0) == pytest.approx(0.1)
    assert bucket.reserve(0.0, max_wait=1.0) == pytest.approx(0.2)
    assert bucket.reserve(0.05, max_wait=0.1) is None  # would wait 0.25 s
    assert bucket.reserve(1.0, max_wait=0.0) == 0  # the spacing has passed


@given(st.floats(0.5, 200), st.lists(st.floats(0, 0.05), min_size=1, max_size=200))
def test_a_rate_limit_never_lets_more_through_than_its_rate(rate: float, gaps: list[float]) -> None:
    bucket = TokenBucket(rate, burst=max(1.0, rate / 10))
    now, sent = 0.0, []
    for gap in gaps:
        now += gap
        wait = bucket.reserve(now, max_wait=1.0)
        if wait is not None:
            sent.append(now + wait)
    span = max(sent) - min(sent)
    assert len(sent) <= rate * span + max(1.0, rate / 10) + 1e-6


# -- the circuit breaker ---------------------------------------------------------------------


def breaker(threshold: int = 3) -> CircuitBreaker:
    return CircuitBreaker(threshold, open_for=10.0, max_open=60.0, rng=random.Random(1))


def test_consecutive_failures_open_the_circuit_and_a_success_resets_the_count() -> None:
    b = breaker()
    assert b.record(FAIL, 0) is None and b.record(FAIL, 1) is None
    assert b.record(OK, 2) is None and b.failures == 0
    assert b.record(FAIL, 3) is None and b.record(FAIL, 4) is None
    change = b.record(FAIL, 5)
    assert change is not None and change.state is CircuitState.OPEN and change.failures == 3
    assert change.reopen_in is not None and 5 <= change.reopen_in <= 15  # 10 s, jittered ±50%
    assert b.admit(5.1) is Admission.REJECT


def test_after_the_open_period_one_probe_goes_and_a_2xx_closes_the_circuit() -> None:
    b = breaker(1)
    opened = b.record(FAIL, 0)
    assert opened is not None and opened.reopen_in is not None
    assert b.admit(opened.reopen_in - 0.01) is Admission.REJECT
    assert b.admit(opened.reopen_in) is Admission.PROBE
    assert b.state is CircuitState.HALF_OPEN
    assert b.admit(opened.reopen_in + 0.1) is Admission.REJECT  # one probe at a time
    closed = b.record(OK, opened.reopen_in + 0.2, probe=True)
    assert closed is not None and closed.state is CircuitState.CLOSED
    assert b.admit(opened.reopen_in + 0.3) is Admission.ALLOW


def test_a_failed_probe_reopens_for_longer_up_to_the_longest() -> None:
    b = breaker(1)
    now, periods = 0.0, []
    change = b.record(FAIL, now)
    for _ in range(6):
        assert change is not None and change.reopen_in is not None
        periods.append(change.reopen_in)
        now += change.reopen_in
        assert b.admit(now) is Admission.PROBE
        change = b.record(FAIL, now, probe=True)
    assert periods[1] > periods[0] * 0.6 and max(periods) <= 60 * 1.5
    assert sorted(periods[-2:]) == sorted(periods[-2:]) and periods[-1] >= 30  # at the cap, jittered


def test_a_probe_that_was_not_sent_lets_the_next_one_probe() -> None:
    b = breaker(1)
    b.record(FAIL, 0)
    assert b.admit(100) is Admission.PROBE
    b.withdraw_probe()  # deferred for the gateway's own limits
    assert b.admit(100) is Admission.PROBE


def test_what_counts_as_a_failure() -> None:
    assert breaker_verdict(OK) is True
    for failed in (FAIL, attempt(Outcome.HTTP_ERROR, 429), attempt(Outcome.HTTP_ERROR, 408),
                   attempt(Outcome.TIMEOUT), attempt(Outcome.CONNECTION_ERROR)):
        assert breaker_verdict(failed) is False
    for neither in (attempt(Outcome.HTTP_ERROR, 404), attempt(Outcome.HTTP_ERROR, 302),
                    attempt(Outcome.BLOCKED), attempt(Outcome.CIRCUIT_OPEN)):
        assert breaker_verdict(neither) is None


def test_probes_of_many_processes_spread_out() -> None:
    delays = []
    for seed in range(50):
        b = CircuitBreaker(1, 10.0, 60.0, rng=random.Random(seed))
        change = b.record(FAIL, 0)
        assert change is not None and change.reopen_in is not None
        delays.append(change.reopen_in)
    assert max(delays) - min(delays) > 5


# -- the deferral ladder and the log ---------------------------------------------------------


def test_a_delivery_deferred_again_and_again_climbs_the_ladder() -> None:
    assert [deferral_rung(n, 3) for n in range(1, 12)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2]
    assert deferral_rung(5, 1) == 0


def test_a_run_of_deferrals_keeps_one_line_and_spends_no_attempt() -> None:
    delivery = Delivery(event_id=str(uuid.uuid4()), event_type="MESSAGE", bot_id=BOT, session_id="s",
                        occurred_at=0, payload="{}", endpoint_id="e", attempt=1, due_at=0,
                        attempts=(FAIL,))
    for n in range(1, 6):
        entry = Attempt(at=1_764_000_000_000 + n, tier="retry-1m", duration_ms=0.0, outcome=Outcome.DEFERRED,
                        error=f"deferred (share_full): round {n}")
        delivery = delivery.deferred(entry, due_at=n)
    assert delivery.attempt == 1 and delivery.deferrals == 5
    assert delivery.deferred_since == 1_764_000_000_001
    assert [a.outcome for a in delivery.attempts] == [Outcome.HTTP_ERROR, Outcome.DEFERRED]
    assert delivery.attempts[-1].error is not None
    text = delivery.attempts[-1].error
    assert "round 5" in text and "deferred 5 times since 2025-11-24" in text
    retried = delivery.after(FAIL, due_at=10)
    assert retried.attempt == 2 and retried.deferrals == 0 and retried.deferred_since is None
    assert [a.outcome for a in retried.attempts] == [Outcome.HTTP_ERROR, Outcome.DEFERRED, Outcome.HTTP_ERROR]


# -- the sender's share of the process, and its breaker, on real sockets ---------------------


def endpoint(url: str, **limits: object) -> Endpoint:
    return Endpoint(id=str(uuid.uuid4()), bot_id=BOT, url=url, secret=new_secret(), created_at=0, updated_at=0,
                    **limits)  # type: ignore[arg-type]


def _config(**changes: object) -> Config:
    return Config(allow_private_networks=True, request_timeout=5.0).replace(**changes)


def test_a_slow_endpoints_share_is_what_it_serves_within_the_wait() -> None:
    """2 connections, 0.5 s answers, 1 s wait: about 4 may wait (what 2 connections serve
    in 1 s); of 20 sent at once, the rest are deferred at once, never sent."""
    def slow(conn: Conn, request: bytes) -> bool:
        conn.wait(0.5)
        return respond(204)(conn, request)

    async def go(url: str) -> tuple[list[Attempt | Deferral], float]:
        sender = Sender(_config(endpoint_concurrency=2, endpoint_wait=1.0, endpoint_queue=100))
        target = endpoint(url)
        try:
            # one first, so the pool knows the endpoint's pace
            first = await sender.send(target, str(uuid.uuid4()), b"{}", "events")
            started = time.perf_counter()
            rest = await asyncio.gather(*(sender.send(target, str(uuid.uuid4()), b"{}", "events")
                                          for _ in range(20)))
            return [first, *rest], time.perf_counter() - started
        finally:
            await sender.aclose()

    with RawServer(slow) as server:
        results, seconds = asyncio.run(go(server.url()))
    sent = [r for r in results if isinstance(r, Attempt)]
    deferred = [r for r in results if isinstance(r, Deferral)]
    assert all(a.succeeded for a in sent)
    assert 3 <= len(sent) <= 8 and len(deferred) == 21 - len(sent), (len(sent), len(deferred))
    assert {d.reason for d in deferred} <= {DeferReason.SHARE, DeferReason.BUSY}
    assert len(server.requests) == len(sent)
    assert seconds < 4, seconds


def test_an_endpoints_rate_limit_and_max_in_flight_are_kept() -> None:
    async def go(url: str) -> tuple[list[Attempt | Deferral], float]:
        sender = Sender(_config(endpoint_wait=1.0))
        target = endpoint(url, rate_limit=5.0, max_in_flight=1)
        try:
            started = time.perf_counter()
            results = await asyncio.gather(*(sender.send(target, str(uuid.uuid4()), b"{}", "events")
                                             for _ in range(12)))
            return list(results), time.perf_counter() - started
        finally:
            await sender.aclose()

    times: list[float] = []

    def timed(conn: Conn, request: bytes) -> bool:
        times.append(time.monotonic())
        return respond(204)(conn, request)

    with RawServer(timed) as server:
        results, seconds = asyncio.run(go(server.url()))
    times.sort()
    sent = [r for r in results if isinstance(r, Attempt)]
    deferred = [r for r in results if isinstance(r, Deferral)]
    # 5/s with a 1 s wait: the first at once and about five more within the wait; the rest
    # are deferred for the rate limit, never sent early.
    assert 5 <= len(sent) <= 7 and all(d.reason is DeferReason.RATE for d in deferred), results
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.2 - 0.02, gaps  # one every 0.2 s, never faster
    assert seconds < 3


def test_a_down_endpoints_circuit_opens_and_spends_attempts_without_requests() -> None:
    async def go(url: str) -> list[Attempt | Deferral]:
        sender = Sender(_config(circuit_failures=3, circuit_open_seconds=60.0))
        target = endpoint(url)
        try:
            return [await sender.send(target, str(uuid.uuid4()), b"{}", "events") for _ in range(10)]
        finally:
            await sender.aclose()

    with RawServer(respond(503)) as server:
        results = asyncio.run(go(server.url()))
        requests = len(server.requests)
    outcomes = [r.outcome for r in results if isinstance(r, Attempt)]
    assert outcomes == [Outcome.HTTP_ERROR] * 3 + [Outcome.CIRCUIT_OPEN] * 7
    assert requests == 3
    last = results[-1]
    assert isinstance(last, Attempt) and last.error is not None and "no request made" in last.error


def test_a_probe_answered_2xx_closes_the_circuit() -> None:
    answers = iter([503, 503, 204, 204, 204])

    def handler(conn: Conn, request: bytes) -> bool:
        return respond(next(answers))(conn, request)

    async def go(url: str) -> list[Outcome]:
        sender = Sender(_config(circuit_failures=2, circuit_open_seconds=0.2))
        target = endpoint(url)
        outcomes = []
        try:
            for _ in range(3):
                result = await sender.send(target, str(uuid.uuid4()), b"{}", "events")
                assert isinstance(result, Attempt)
                outcomes.append(result.outcome)
            await asyncio.sleep(0.35)  # past the open period (0.2 s, at most +50%)
            for _ in range(3):
                result = await sender.send(target, str(uuid.uuid4()), b"{}", "events")
                assert isinstance(result, Attempt)
                outcomes.append(result.outcome)
            assert sender.circuit_counts()[CircuitState.CLOSED] == 1
            return outcomes
        finally:
            await sender.aclose()

    with RawServer(handler) as server:
        outcomes = asyncio.run(go(server.url()))
    assert outcomes == [Outcome.HTTP_ERROR, Outcome.HTTP_ERROR, Outcome.CIRCUIT_OPEN,
                        Outcome.SUCCESS, Outcome.SUCCESS, Outcome.SUCCESS]
