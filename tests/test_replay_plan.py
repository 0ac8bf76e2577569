"""Replay decisions without I/O (gateway.ops.decide_replays), the dead-letter selectors and
the errors that name their field, and how `gateway dlq replay` prints what the library
returns."""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

import pytest
from click.testing import CliRunner

import gateway.cli
import gateway.ops
from gateway.cli import cli
from gateway.errors import InputError
from gateway.events import EventType
from gateway.ops import (
    DeadLetterEntry,
    Filters,
    RefusalReason,
    ReplayReport,
    decide_replays,
    parse_rate,
    parse_selector,
    parse_time,
)
from gateway.records import Attempt, DeadLetter, DeadLetterReason, Delivery, Outcome

BOT = "6434515b-8541-4861-bb24-8acd6e77e8c4"
KNOWN, GONE, OTHER = "e-known", "e-gone", "e-other"


def delivery(endpoint_id: str) -> Delivery:
    return Delivery(event_id=str(uuid.uuid4()), event_type="TICKET", bot_id=BOT, session_id="s",
                    occurred_at=1, payload="{}", endpoint_id=endpoint_id, attempt=4, due_at=5,
                    attempts=(Attempt(at=2, tier="retry-15m", duration_ms=3.0, outcome=Outcome.HTTP_ERROR,
                                      status=503),))


def entry(offset: int, carried: Delivery | None, *, reason: str = "retries_exhausted",
          readable: bool = True) -> DeadLetterEntry:
    dead = DeadLetter(reason=DeadLetterReason(reason), detail="x", dead_at=1, source_topic="t", source_partition=0,
                      source_offset=offset, delivery=carried) if readable else None
    return DeadLetterEntry("p.dlq", 0, offset, dead, error=None if readable else "bad magic byte")


def test_each_dead_letter_is_planned_skipped_or_refused_with_its_reason() -> None:
    entries = [
        entry(0, delivery(KNOWN)),
        entry(1, None, reason="undecodable"),
        entry(2, None, readable=False),
        entry(3, delivery(GONE)),
        entry(4, delivery(KNOWN)),  # replayed before
    ]
    plan = decide_replays(entries, topic="p.retry-1m", known_endpoints={KNOWN, OTHER},
                          already_replayed={"p.dlq:0:4"}, replay_id="r-1", now_ms=1_000)
    assert (plan.replay_id, plan.topic, plan.selected) == ("r-1", "p.retry-1m", 5)
    assert plan.skipped_already_replayed == 1
    [planned] = plan.planned
    assert planned.entry is entries[0]
    original = entries[0].delivery
    assert original is not None
    assert planned.delivery.endpoint_id == KNOWN
    assert (planned.delivery.attempt, planned.delivery.due_at) == (0, 1_000)
    assert planned.delivery.replay_of == "p.dlq:0:0"
    assert planned.delivery.attempts == original.attempts  # the log is kept
    assert [(r.coordinate, r.reason) for r in plan.refused] == [
        ("p.dlq:0:1", RefusalReason.NOT_A_DELIVERY),
        ("p.dlq:0:2", RefusalReason.NOT_A_DELIVERY),
        ("p.dlq:0:3", RefusalReason.ENDPOINT_NOT_REGISTERED),
    ]
    undecodable, unreadable, gone = plan.refused
    assert "undecodable" in undecodable.message and "not a delivery" in undecodable.message
    assert "bad magic byte" in unreadable.message
    assert GONE in gone.message and "no longer registered" in gone.message


def test_a_replay_starts_the_deliverys_deferral_state_over() -> None:
    """Fault: a replay kept ``deferrals`` and ``deferred_since``, so a ``deferral_expired``
    dead letter, replayed, was past the age limit again at its first deferral and expired
    at once."""
    expired = replace(delivery(KNOWN), deferrals=40, deferred_since=1)
    [planned] = decide_replays([entry(0, expired, reason="deferral_expired")], topic="t",
                               known_endpoints={KNOWN}, now_ms=7_200_000).planned
    assert (planned.delivery.deferrals, planned.delivery.deferred_since) == (0, None)
    assert planned.delivery.attempts == expired.attempts  # the log is kept


def test_a_replay_to_another_endpoint_goes_there_or_is_refused_as_unknown() -> None:
    entries = [entry(0, delivery(GONE)), entry(1, delivery(KNOWN))]
    plan = decide_replays(entries, topic="t", known_endpoints={KNOWN, OTHER}, to_endpoint=OTHER)
    assert [p.delivery.endpoint_id for p in plan.planned] == [OTHER, OTHER]
    assert plan.refused == ()
    unknown = decide_replays(entries, topic="t", known_endpoints={KNOWN}, to_endpoint="e-nope")
    assert unknown.planned == ()
    assert {r.reason for r in unknown.refused} == {RefusalReason.UNKNOWN_TARGET}
    assert all("e-nope" in r.message for r in unknown.refused)


def test_refusal_reasons_are_strings_an_api_can_return() -> None:
    assert {r.value for r in RefusalReason} == {"not_a_delivery", "endpoint_not_registered",
                                                "unknown_target"}


def test_selectors() -> None:
    event_id = str(uuid.uuid4())
    assert parse_selector(event_id) == Filters(event_id=event_id)
    assert parse_selector("2:17") == Filters(partition=2, from_offset=17, to_offset=17)
    for bad in ("2:", "x:1", "1:2:3", "not-an-id"):
        with pytest.raises(InputError) as info:
            parse_selector(bad)
        assert info.value.field == "selector" and repr(bad) in str(info.value)


def test_dlq_errors_name_their_field_and_value() -> None:
    with pytest.raises(InputError) as info:
        parse_rate("fast", field="rate")
    assert info.value.field == "rate" and "'fast'" in str(info.value)
    with pytest.raises(InputError) as info:
        parse_time("yesterday", field="since")
    assert info.value.field == "since" and "since 'yesterday'" in str(info.value)
    with pytest.raises(InputError) as info:
        Filters.parse(status="teapot")
    assert info.value.field == "status" and "'teapot'" in str(info.value)
    with pytest.raises(InputError) as info:
        Filters.parse(event_type="LEAD")
    assert info.value.field == "event_type" and "'LEAD'" in str(info.value)


def test_a_blank_dead_letter_event_type_is_no_filter() -> None:
    """Found by schemathesis: an eventType of control characters that strip to nothing
    was a 500 (an IndexError), not "no filter" as a blank in any list of types is."""
    assert Filters.parse(event_type=" \x1f\x0c").event_type is None
    assert Filters.parse(event_type=" message ").event_type is EventType.MESSAGE


# --- what the command prints ------------------------------------------------------------------


@pytest.fixture
def fake_replay(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """`dlq replay` against a plan and a report of the test's choosing."""
    monkeypatch.setattr(gateway.cli, "configure_logging", lambda *args, **kwargs: None)
    chosen: dict[str, Any] = {}
    monkeypatch.setattr(gateway.ops, "plan_replay", lambda config, filters, **kwargs: chosen["plan"])
    monkeypatch.setattr(gateway.ops, "send_replay", lambda config, plan, **kwargs: chosen["report"](plan))
    return chosen


def test_replay_prints_refusals_with_what_to_do(fake_replay: dict[str, Any]) -> None:
    fake_replay["plan"] = decide_replays(
        [entry(0, None, reason="invalid"), entry(1, delivery(GONE)), entry(2, delivery(KNOWN))],
        topic="p.retry-1m", known_endpoints={KNOWN})
    fake_replay["report"] = lambda plan: ReplayReport(plan, replayed=1, seconds=1.0)
    result = CliRunner().invoke(cli, ["dlq", "replay"])
    assert result.exit_code == 1  # something was refused
    lines = result.stderr.splitlines()
    assert any(line.startswith("refused p.dlq:0:0: not a delivery") and "--raw FILE" in line
               for line in lines), result.stderr
    assert any(line.startswith("refused p.dlq:0:1: endpoint e-gone is no longer registered")
               and "--to-endpoint" in line for line in lines), result.stderr
    assert "replayed 1 of 3 selected into p.retry-1m" in result.stderr


def test_replay_reports_unacknowledged_replays_as_an_error(fake_replay: dict[str, Any]) -> None:
    fake_replay["plan"] = decide_replays([entry(0, delivery(KNOWN)), entry(1, delivery(KNOWN))],
                                         topic="p.retry-1m", known_endpoints={KNOWN})
    fake_replay["report"] = lambda plan: ReplayReport(
        plan, replayed=1, failed=1, first_failure="p.dlq:0:1: not acknowledged within 60 s",
        seconds=60.0)
    result = CliRunner().invoke(cli, ["dlq", "replay"])
    assert result.exit_code == 1
    assert "replayed 1 of 2 selected" in result.stderr
    assert "error: 1 of 2 replays were not acknowledged by the broker" in result.stderr
    assert "p.dlq:0:1: not acknowledged within 60 s" in result.stderr


def test_replay_dry_run_sends_nothing(fake_replay: dict[str, Any]) -> None:
    fake_replay["plan"] = decide_replays([entry(0, delivery(KNOWN))], topic="p.retry-1m",
                                         known_endpoints={KNOWN})
    fake_replay["report"] = lambda plan: pytest.fail("a dry run sent")
    result = CliRunner().invoke(cli, ["dlq", "replay", "--dry-run"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("would replay p.dlq:0:0")
    assert "nothing sent" in result.stderr
