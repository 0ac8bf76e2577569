"""The delivery history: its filters and cursors without a broker, the index built from
a real attempts topic (bounded, following it), and `gateway deliveries list` on the real
pipeline, successes included."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from gateway.codec import Codec
from gateway.config import Config
from gateway.errors import InputError
from gateway.ops import Cursor, HistoryEntry, HistoryFilters, HistoryIndex, parse_time, read_history
from gateway.records import DELIVERY_ATTEMPT_SCHEMA, Attempt, DeliveryAttempt, Next, Outcome
from gateway.store import Topics

from .conftest import run_gateway
from .receiver import Receiver

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "events.jsonl"
BOT = "6434515b-8541-4861-bb24-8acd6e77e8c4"


def line(at: int, *, event: str = "e1", endpoint: str = "p1", bot: str = BOT, outcome: Outcome = Outcome.SUCCESS,
         status: int | None = 200, number: int = 1, next: str = "delivered") -> DeliveryAttempt:
    return DeliveryAttempt(event_id=event, event_type="MESSAGE", bot_id=bot, endpoint_id=endpoint,
                           occurred_at=at - 5, number=number,
                           attempt=Attempt(at=at, tier="events", duration_ms=1.5, outcome=outcome, status=status),
                           next=Next.read(next))


def test_filters_select_by_event_endpoint_bot_time_and_status() -> None:
    ok = line(1000)
    failed = line(2000, outcome=Outcome.HTTP_ERROR, status=503, next="retry:retry-1m")
    timeout = line(3000, outcome=Outcome.TIMEOUT, status=None, endpoint="p2", event="e2")
    deferred = line(4000, outcome=Outcome.DEFERRED, status=None, next="deferred:x")
    assert HistoryFilters(event_id="e1").admits(ok) and not HistoryFilters(event_id="e1").admits(timeout)
    assert HistoryFilters(endpoint_id="p2").admits(timeout) and not HistoryFilters(endpoint_id="p2").admits(ok)
    assert HistoryFilters(bot_id=BOT.upper()).admits(ok)
    assert [HistoryFilters(since=2000, until=3000).admits(x) for x in (ok, failed, timeout, deferred)] == [
        False, True, True, False]
    cases = {"success": [True, False, False, False], "delivered": [True, False, False, False],
             "failed": [False, True, True, False], "deferred": [False, False, False, True],
             "5xx": [False, True, False, False], "503": [False, True, False, False],
             "2xx": [True, False, False, False], "timeout": [False, False, True, False],
             "HTTP_ERROR": [False, True, False, False]}
    for status, expected in cases.items():
        chosen = HistoryFilters.parse(status=status)
        assert [chosen.admits(x) for x in (ok, failed, timeout, deferred)] == expected, status
    for bad in ("ok", "6xx", "50", "5xxx"):
        with pytest.raises(InputError) as refused:
            HistoryFilters.parse(status=bad)
        assert refused.value.field == "status"
    with pytest.raises(InputError) as backwards:
        HistoryFilters(since=2, until=1)
    assert backwards.value.field == "since"


def test_times_and_cursors_are_refused_with_their_field() -> None:
    assert parse_time("2026-11-28T10:00:00Z", field="since") == 1795860000000
    for text in ("yesterday", "99999999999d ago", "9999999999999999999999h", "9999-12-31T23:00:00-05:00"):
        with pytest.raises(InputError) as refused:
            parse_time(text, field="until")
        assert refused.value.field == "until"
    entry = HistoryEntry(2, 17, line(1234))
    assert Cursor.decode(Cursor.encode(entry.sort_key), (int, int, int)) == (1234, 2, 17)
    for bad in ("", "!!", "bm9wZQ", "MTox", Cursor.encode(("a", 2, 17)), Cursor.encode((1, 2))):
        with pytest.raises(InputError) as refused:
            Cursor.decode(bad, (int, int, int))
        assert refused.value.field == "cursor"


def write_lines(config: Config, lines: list[DeliveryAttempt]) -> None:
    topic = Topics.from_config(config).attempts
    codec = Codec()
    producer = Producer({"bootstrap.servers": config.bootstrap_servers, "linger.ms": 20,
                         "queue.buffering.max.messages": 200_000})
    for number, item in enumerate(lines):
        producer.produce(topic, key=item.endpoint_id.encode(),
                         value=codec.encode(DELIVERY_ATTEMPT_SCHEMA, item.to_record(), topic=topic))
        if number % 1000 == 0:
            producer.poll(0)
    assert producer.flush(60) == 0


@pytest.mark.integration
def test_the_index_keeps_the_newest_attempts_and_follows_the_topic(topics: Config) -> None:
    now = int(time.time() * 1000)
    # Written out of time order, over several endpoints (so several partitions).
    lines = [line(now - 100_000 + (i * 7919) % 50, event=f"e{i % 10}", endpoint=f"p{i % 4}") for i in range(50)]
    write_lines(topics, lines)
    index = HistoryIndex(topics, capacity=20).start(timeout=30)
    try:
        assert len(index) == 20
        newest = sorted((x.attempt.at for x in lines), reverse=True)[:20]
        page = index.query(limit=1000)
        assert [e.line.attempt.at for e in page.entries] == newest
        assert page.complete_since == newest[-1] and page.next_cursor is None

        # Pages of 7, newest first, no entry twice.
        seen: list[str] = []
        cursor = None
        while True:
            part = index.query(limit=7, cursor=cursor)
            seen += [str(e.id) for e in part.entries]
            cursor = part.next_cursor
            if cursor is None:
                break
        assert seen == [str(e.id) for e in page.entries]

        # Following: new attempts come in, the oldest go, the secondary indexes agree.
        fresh = [line(now + i, event="late", endpoint=f"p{i % 4}") for i in range(5)]
        write_lines(topics, fresh)
        deadline = time.monotonic() + 15
        while len(index.query(HistoryFilters(event_id="late")).entries) < 5:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert len(index) == 20
        kept = index.query(limit=1000).entries
        for endpoint in ("p0", "p1", "p2", "p3"):
            by_endpoint = index.query(HistoryFilters(endpoint_id=endpoint), limit=1000).entries
            assert by_endpoint == tuple(e for e in kept if e.line.endpoint_id == endpoint)
        for event in ("late", *(f"e{i}" for i in range(10))):
            by_event = index.query(HistoryFilters(event_id=event), limit=1000).entries
            assert by_event == tuple(e for e in kept if e.line.event_id == event)
    finally:
        index.stop()
    whole = HistoryIndex(topics, capacity=1000).start(follow=False)
    try:
        assert len(whole) == 55 and whole.query().complete_since is None
    finally:
        whole.stop()


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_the_index_builds_from_100k_attempts_in_seconds(topics: Config) -> None:
    """The figure the README quotes: a fresh API process reads 100,000 attempts."""
    now = int(time.time() * 1000)
    write_lines(topics, [line(now - 100_000 + i, event=str(uuid.uuid4()), endpoint=f"p{i % 97}",
                              outcome=Outcome.SUCCESS if i % 5 else Outcome.HTTP_ERROR)
                         for i in range(100_000)])
    index = HistoryIndex(topics, capacity=100_000)
    started = time.monotonic()
    index.start(timeout=60, follow=False)
    elapsed = time.monotonic() - started
    try:
        print(f"\nhistory index: 100,000 attempts built in {elapsed:.2f} s")
        assert len(index) == 100_000
        assert elapsed < 60, f"built in {elapsed:.1f} s"
        started = time.monotonic()
        failed = index.query(HistoryFilters.parse(status="failed"), limit=1000)
        by_endpoint = index.query(HistoryFilters(endpoint_id="p3", since=now - 50_000), limit=1000)
        query_seconds = time.monotonic() - started
        print(f"history index: two queries over 100,000 in {query_seconds * 1000:.0f} ms")
        assert len(failed.entries) == 1000
        assert all(e.line.attempt.outcome is Outcome.HTTP_ERROR for e in failed.entries)
        assert all(e.line.endpoint_id == "p3" for e in by_endpoint.entries)
        assert query_seconds < 5
    finally:
        index.stop()


@pytest.mark.integration
def test_deliveries_list_shows_successes_retries_and_dead_letters(
    topics: Config, receiver: Receiver, worker_factory: Any
) -> None:
    added = [run_gateway(topics, "endpoints", "add", "--bot-id", BOT, "--url", receiver.url(path), "--json")
             for path in ("/ok", "/flaky")]
    ok_id, flaky_id = (json.loads(a.stdout)["id"] for a in added)
    # /flaky fails each event's first two attempts, then takes it.
    receiver.respond("/flaky", lambda request, seen: 500 if sum(
        r.event_id == request.event_id for r in receiver.at("/flaky")) <= 2 else 200)
    worker_factory(topics.replace(circuit_failures=1000, circuit_failure_rate=0.0))  # every retry reaches /flaky
    published = run_gateway(topics, "publish", str(EXAMPLES))
    assert published.returncode == 0, published.stderr
    first, *_ = ids = published.stdout.split()
    receiver.wait_for(lambda: len(receiver.at("/flaky")) >= 12, 30, "3 attempts of each event at /flaky")
    time.sleep(1)

    def listed(*args: str) -> list[dict[str, Any]]:
        result = run_gateway(topics, "deliveries", "list", "--json", *args)
        assert result.returncode == 0, result.stderr
        return [json.loads(row) for row in result.stdout.splitlines()]

    deadline = time.monotonic() + 20
    while len(rows := listed("--event-id", first)) < 4:  # the history is written as attempts settle
        assert time.monotonic() < deadline, rows
        time.sleep(0.5)
    by_endpoint = {ok_id: [r for r in rows if r["endpointId"] == ok_id],
                   flaky_id: [r for r in rows if r["endpointId"] == flaky_id]}
    assert [(r["number"], r["outcome"], r["status"], r["next"]) for r in by_endpoint[ok_id]] == [
        (1, "success", 204, "delivered")]
    assert [(r["number"], r["tier"], r["status"], r["next"]) for r in by_endpoint[flaky_id]] == [
        (3, "retry-2s", 200, "delivered"), (2, "retry-1s", 500, "retry:retry-2s"),
        (1, "events", 500, "retry:retry-1s")]
    assert all(r["eventId"] == first and r["botId"] == BOT for r in rows)

    assert {r["eventId"] for r in listed("--endpoint-id", ok_id)} == set(ids)
    assert len(listed("--endpoint-id", flaky_id, "--status", "5xx")) == 8
    assert len(listed("--bot-id", BOT.upper(), "--status", "success")) == 8
    assert listed("--since", "1h ago", "--status", "timeout") == []
    table = run_gateway(topics, "deliveries", "list", "--event-id", first, "--limit", "2")
    assert table.returncode == 0 and len(table.stdout.splitlines()) == 3
    assert "4 attempts (the newest 2 shown)" in table.stderr
    bad = run_gateway(topics, "deliveries", "list", "--status", "fine")
    assert bad.returncode == 2 and "--status" in bad.stderr

    direct = read_history(topics, HistoryFilters(event_id=first))
    assert [e.to_json() for e in direct] == rows
