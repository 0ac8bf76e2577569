"""Pure bookkeeping and decisions: commit positions (gateway.streaming), the retry schedule
(gateway.delivery), the endpoint table (gateway.store) and endpoint validation (gateway.ops)."""

from __future__ import annotations

import base64
import itertools
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.delivery import Delivered, GiveUp, Retry, is_due, next_step
from gateway.errors import InputError
from gateway.ops import new_endpoint
from gateway.records import Attempt, DeadLetterReason, Endpoint, Outcome
from gateway.signing import secret_key
from gateway.store import EndpointTable, Tier, Topics
from gateway.streaming import OffsetTracker

# --- OffsetTracker -------------------------------------------------------------------------


def tracker_of(*offsets: int) -> OffsetTracker:
    tracker = OffsetTracker()
    for offset in offsets:
        tracker.received(offset)
    return tracker


def test_new_tracker_has_no_position_and_is_idle() -> None:
    tracker = OffsetTracker()
    assert tracker.position is None
    assert tracker.idle
    assert tracker.unsettled == 0


def test_position_is_one_past_the_last_settled_in_order() -> None:
    tracker = tracker_of(0, 1, 2)
    assert not tracker.idle and tracker.unsettled == 3
    assert tracker.settle(0) == 1
    assert tracker.position == 1
    assert tracker.settle(1) == 2
    assert tracker.settle(2) == 3
    assert tracker.position == 3
    assert tracker.idle and tracker.unsettled == 0


def test_out_of_order_settles_hold_the_position_at_the_first_unsettled() -> None:
    tracker = tracker_of(10, 11, 12, 13)
    assert tracker.settle(12) is None
    assert tracker.position is None
    assert tracker.settle(11) is None
    assert tracker.position is None
    assert tracker.unsettled == 4
    assert tracker.settle(10) == 13  # 10, 11, 12 all settled: jumps to 13
    assert tracker.position == 13
    assert tracker.unsettled == 1
    assert tracker.settle(13) == 14
    assert tracker.position == 14
    assert tracker.idle


def test_position_does_not_move_when_a_later_offset_settles() -> None:
    tracker = tracker_of(0, 1, 2)
    tracker.settle(0)
    assert tracker.settle(2) is None
    assert tracker.position == 1


def test_gaps_in_offsets_never_let_the_position_pass_an_unsettled_offset() -> None:
    # Compacted topics and transaction markers leave gaps. The position moves to one past
    # the settled prefix; in a gap that is an offset never received, which the consumer
    # resumes from just as well as from the next received one.
    tracker = tracker_of(5, 9, 20)
    assert tracker.settle(5) == 6
    assert tracker.position == 6
    assert tracker.settle(20) is None
    assert tracker.position == 6
    assert tracker.settle(9) == 21
    assert tracker.position == 21


def test_receiving_after_everything_settled_continues() -> None:
    tracker = tracker_of(0)
    tracker.settle(0)
    tracker.received(1)
    assert tracker.position == 1
    assert not tracker.idle
    assert tracker.settle(1) == 2


@pytest.mark.parametrize("offsets", [(3, 3), (3, 2), (0, 5, 4)])
def test_received_out_of_order_raises(offsets: tuple[int, ...]) -> None:
    tracker = OffsetTracker()
    with pytest.raises(ValueError, match="received after"):
        for offset in offsets:
            tracker.received(offset)


def test_received_below_the_last_raises_even_after_it_settled() -> None:
    tracker = tracker_of(0, 1)
    tracker.settle(0)
    tracker.settle(1)
    # Nothing is left in the queue, but ordering still applies to new offsets...
    tracker.received(2)
    with pytest.raises(ValueError):
        tracker.received(2)


increasing_offsets = st.lists(
    st.integers(min_value=0, max_value=10_000), min_size=1, max_size=40, unique=True
).map(sorted)


@given(data=st.data(), offsets=increasing_offsets)
def test_position_is_first_unsettled_for_any_settle_order(
    data: st.DataObject, offsets: list[int]
) -> None:
    order = data.draw(st.permutations(offsets), label="settle order")
    tracker = tracker_of(*offsets)
    unsettled = set(offsets)
    previous: int | None = None
    for offset in order:
        moved = tracker.settle(offset)
        unsettled.discard(offset)
        expected = min(unsettled) if unsettled else offsets[-1] + 1
        if offsets[0] in unsettled:
            # Nothing committable yet: the first received offset is still in flight.
            assert tracker.position is None
            assert moved is None
        elif offsets[-1] + 1 == len(offsets) + offsets[0] or not unsettled:
            # No gaps (or all settled): exactly the first unsettled offset / last + 1.
            assert tracker.position == expected
        else:
            # With gaps: one past the settled prefix, which is at most the first unsettled
            # offset, and only gap offsets (never received) lie between the two.
            assert tracker.position is not None
            prefix_end = max(o for o in offsets if o < expected)
            assert tracker.position == prefix_end + 1
            assert tracker.position <= expected
            assert not [o for o in offsets if tracker.position <= o < expected]
        if tracker.position is not None:
            assert previous is None or tracker.position >= previous
            if moved is not None:
                assert moved == tracker.position
                assert previous is None or moved > previous
            else:
                assert tracker.position == previous
            previous = tracker.position
        assert tracker.unsettled == (len([o for o in offsets if o >= expected]) if unsettled else 0)
    assert tracker.idle
    assert tracker.position == offsets[-1] + 1


@given(data=st.data(), offsets=increasing_offsets)
def test_interleaved_receive_and_settle_never_moves_back(
    data: st.DataObject, offsets: list[int]
) -> None:
    """Receiving and settling interleaved, as a worker does: the position never passes an
    unsettled offset and never moves backwards."""
    tracker = OffsetTracker()
    pending: list[int] = []
    received: list[int] = []
    previous: int | None = None
    remaining = list(offsets)
    while remaining or pending:
        if remaining and (not pending or data.draw(st.booleans())):
            offset = remaining.pop(0)
            tracker.received(offset)
            received.append(offset)
            pending.append(offset)
        else:
            offset = data.draw(st.sampled_from(pending))
            pending.remove(offset)
            tracker.settle(offset)
        if tracker.position is not None:
            assert previous is None or tracker.position >= previous
            previous = tracker.position
            if pending:
                assert tracker.position <= min(pending)
            else:
                assert tracker.position == received[-1] + 1
    assert tracker.position == offsets[-1] + 1


# --- retry schedule ------------------------------------------------------------------------

TOPICS = Topics("t", (1, 2, 3))
TIERS = TOPICS.tiers
EVENTS, RETRY_1S, RETRY_2S, RETRY_3S = TIERS
AT = 1_700_000_000_000


def attempt(status: int | None = None, error: str | None = None, *, tier: str = "events",
            duration_ms: float = 123.7) -> Attempt:
    return Attempt(at=AT, tier=tier, duration_ms=duration_ms, outcome=Outcome.of_legacy(status, error),
                   status=status, error=error)


def test_tiers_are_named_after_their_delays() -> None:
    assert [t.name for t in TIERS] == ["events", "retry-1s", "retry-2s", "retry-3s"]
    assert [t.index for t in TIERS] == [0, 1, 2, 3]
    assert [t.delay for t in TIERS] == [0, 1, 2, 3]
    assert [t.topic for t in TIERS] == ["t.events", "t.retry-1s", "t.retry-2s", "t.retry-3s"]


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
@pytest.mark.parametrize("tier", TIERS, ids=lambda t: t.name)
def test_2xx_is_delivered_from_any_tier(status: int, tier: Tier) -> None:
    assert next_step(TIERS, tier, attempt(status, tier=tier.name)) == Delivered()


def test_failure_on_events_goes_to_the_first_retry_tier() -> None:
    step = next_step(TIERS, EVENTS, attempt(503))
    assert step == Retry(RETRY_1S, AT + 125 + 1000)


def test_failure_on_retry_1s_goes_to_retry_2s() -> None:
    step = next_step(TIERS, RETRY_1S, attempt(500, tier="retry-1s", duration_ms=40.0))
    assert step == Retry(RETRY_2S, AT + 42 + 2000)


def test_failure_on_retry_2s_goes_to_retry_3s() -> None:
    step = next_step(TIERS, RETRY_2S, attempt(429, tier="retry-2s", duration_ms=0.9))
    assert step == Retry(RETRY_3S, AT + 2 + 3000)


def test_due_at_is_never_before_failure_end_plus_delay() -> None:
    for current, following in itertools.pairwise(TIERS):
        a = attempt(502, tier=current.name, duration_ms=15_000.0)
        step = next_step(TIERS, current, a)
        assert isinstance(step, Retry)
        assert step.tier == following
        assert step.due_at >= a.at + a.duration_ms + 1 + following.delay * 1000
        assert not is_due(step.due_at, step.due_at - 1)
        assert is_due(step.due_at, step.due_at)


def test_failure_on_the_last_tier_gives_up_with_the_last_outcome() -> None:
    step = next_step(TIERS, RETRY_3S, attempt(503, tier="retry-3s"))
    assert isinstance(step, GiveUp)
    assert step.reason == DeadLetterReason.RETRIES_EXHAUSTED
    assert "HTTP 503" in step.detail
    assert "3 retries" in step.detail


def test_timeout_on_the_last_tier_gives_up_naming_the_timeout() -> None:
    step = next_step(TIERS, RETRY_3S, attempt(None, "timeout after 5.0 s", tier="retry-3s"))
    assert isinstance(step, GiveUp)
    assert step.reason == DeadLetterReason.RETRIES_EXHAUSTED
    assert "timeout after 5.0 s" in step.detail


@pytest.mark.parametrize("tier", TIERS, ids=lambda t: t.name)
def test_410_gives_up_as_gone_from_any_tier(tier: Tier) -> None:
    step = next_step(TIERS, tier, attempt(410, tier=tier.name))
    assert isinstance(step, GiveUp)
    assert step.reason == DeadLetterReason.GONE
    assert "410" in step.detail


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirect_is_retried(status: int) -> None:
    a = attempt(status, "redirect to https://elsewhere.example/ (not followed)")
    assert not a.succeeded
    assert next_step(TIERS, EVENTS, a) == Retry(RETRY_1S, AT + 125 + 1000)


@pytest.mark.parametrize("error", ["timeout after 5.0 s", "connection refused"])
def test_no_response_is_retried(error: str) -> None:
    assert next_step(TIERS, EVENTS, attempt(None, error)) == Retry(RETRY_1S, AT + 125 + 1000)
    assert next_step(TIERS, RETRY_1S, attempt(None, error, tier="retry-1s")) == Retry(
        RETRY_2S, AT + 125 + 2000
    )


@pytest.mark.parametrize("status", [400, 401, 403, 404, 429, 500, 502, 503, 504])
def test_4xx_and_5xx_other_than_410_are_retried(status: int) -> None:
    assert isinstance(next_step(TIERS, EVENTS, attempt(status)), Retry)


def test_a_2xx_with_an_error_is_not_delivered() -> None:
    # e.g. a response body over the size limit: the attempt carries an error.
    step = next_step(TIERS, EVENTS, attempt(200, "response larger than 65536 bytes"))
    assert isinstance(step, Retry)


def test_a_single_tier_schedule_gives_up_after_the_events_attempt() -> None:
    tiers = Topics("t", ()).tiers
    step = next_step(tiers, tiers[0], attempt(500))
    assert isinstance(step, GiveUp)
    assert step.reason == DeadLetterReason.RETRIES_EXHAUSTED


@given(
    tier_index=st.integers(min_value=0, max_value=len(TIERS) - 1),
    status=st.one_of(st.none(), st.integers(min_value=100, max_value=599)),
    at=st.integers(min_value=0, max_value=2**42),
    duration=st.floats(min_value=0, max_value=120_000, allow_nan=False),
)
def test_next_step_property(tier_index: int, status: int | None, at: int, duration: float) -> None:
    current = TIERS[tier_index]
    error = None if status is not None else "timeout"
    a = Attempt(at=at, tier=current.name, duration_ms=duration, outcome=Outcome.of_legacy(status, error),
                status=status, error=error)
    step = next_step(TIERS, current, a)
    if status is not None and 200 <= status < 300:
        assert step == Delivered()
    elif status == 410:
        assert isinstance(step, GiveUp) and step.reason == DeadLetterReason.GONE
    elif tier_index == len(TIERS) - 1:
        assert isinstance(step, GiveUp) and step.reason == DeadLetterReason.RETRIES_EXHAUSTED
        assert a.describe() in step.detail
    else:
        assert isinstance(step, Retry)
        assert step.tier == TIERS[tier_index + 1]
        assert step.due_at == a.ended_at + step.tier.delay * 1000
        assert step.due_at >= at + duration + 1 + step.tier.delay * 1000  # never early


# --- EndpointTable -------------------------------------------------------------------------

BOT_A = "6434515b-8541-4861-bb24-8acd6e77e8c4"
BOT_B = "0b8c7f7e-2f5a-4c55-9a3b-6a4c0e0f1d2e"
SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()


def endpoint(id: str, bot: str = BOT_A, *, types: tuple[str, ...] = (), enabled: bool = True,
             created: int = 1) -> Endpoint:
    return Endpoint(id=id, bot_id=bot, url=f"https://example.com/{id}", secret=SECRET,
                    created_at=created, updated_at=created, event_types=types, enabled=enabled)


def ids(endpoints: list[Endpoint]) -> list[str]:
    return [e.id for e in endpoints]


def test_empty_table() -> None:
    table = EndpointTable()
    assert len(table) == 0
    assert table.get("x") is None
    assert table.for_event(BOT_A, "MESSAGE") == []
    assert table.all() == []


def test_apply_adds_replaces_and_removes() -> None:
    table = EndpointTable()
    table.apply("e1", endpoint("e1"))
    table.apply("e2", endpoint("e2", created=2))
    assert len(table) == 2
    assert ids(table.for_event(BOT_A, "MESSAGE")) == ["e1", "e2"]

    changed = endpoint("e1", types=("TICKET",))
    table.apply("e1", changed)
    assert len(table) == 2
    assert table.get("e1") is changed
    assert ids(table.for_event(BOT_A, "MESSAGE")) == ["e2"]

    table.apply("e1", None)
    assert table.get("e1") is None
    assert len(table) == 1
    assert ids(table.for_event(BOT_A, "TICKET")) == ["e2"]

    table.apply("e2", None)
    assert len(table) == 0
    assert table.for_event(BOT_A, "TICKET") == []


def test_removing_an_unknown_id_is_harmless() -> None:
    table = EndpointTable()
    table.apply("e1", endpoint("e1"))
    table.apply("nope", None)
    assert ids(table.all()) == ["e1"]


def test_for_event_honours_enabled() -> None:
    table = EndpointTable()
    table.apply("e1", endpoint("e1", enabled=False))
    table.apply("e2", endpoint("e2"))
    assert ids(table.for_event(BOT_A, "MESSAGE")) == ["e2"]
    table.apply("e1", endpoint("e1", enabled=True))
    table.apply("e2", endpoint("e2", enabled=False))
    assert ids(table.for_event(BOT_A, "MESSAGE")) == ["e1"]
    # Disabled endpoints are still registered.
    assert table.get("e2") is not None and len(table) == 2


def test_for_event_honours_the_event_type_filter() -> None:
    table = EndpointTable()
    table.apply("all", endpoint("all"))
    table.apply("tickets", endpoint("tickets", types=("TICKET",)))
    table.apply("chat", endpoint("chat", types=("MESSAGE", "RATE_MESSAGE")))
    assert sorted(ids(table.for_event(BOT_A, "TICKET"))) == ["all", "tickets"]
    assert sorted(ids(table.for_event(BOT_A, "MESSAGE"))) == ["all", "chat"]
    assert sorted(ids(table.for_event(BOT_A, "RATE_MESSAGE"))) == ["all", "chat"]
    assert ids(table.for_event(BOT_A, "CREATE_LEAD")) == ["all"]


def test_for_event_only_returns_the_bots_endpoints() -> None:
    table = EndpointTable()
    table.apply("a", endpoint("a", BOT_A))
    table.apply("b", endpoint("b", BOT_B))
    assert ids(table.for_event(BOT_A, "MESSAGE")) == ["a"]
    assert ids(table.for_event(BOT_B, "MESSAGE")) == ["b"]
    assert table.for_event(str(uuid.uuid4()), "MESSAGE") == []


def test_moving_an_endpoint_to_another_bot_updates_both_indexes() -> None:
    table = EndpointTable()
    table.apply("e1", endpoint("e1", BOT_A))
    table.apply("e2", endpoint("e2", BOT_A, created=2))
    table.apply("e1", endpoint("e1", BOT_B))
    assert ids(table.for_event(BOT_A, "MESSAGE")) == ["e2"]
    assert ids(table.for_event(BOT_B, "MESSAGE")) == ["e1"]
    table.apply("e2", endpoint("e2", BOT_B, created=2))
    assert table.for_event(BOT_A, "MESSAGE") == []
    assert sorted(ids(table.for_event(BOT_B, "MESSAGE"))) == ["e1", "e2"]
    assert len(table) == 2


def test_all_is_sorted_by_bot_then_creation() -> None:
    table = EndpointTable()
    table.apply("late", endpoint("late", BOT_A, created=5))
    table.apply("b", endpoint("b", BOT_B, created=1))
    table.apply("early", endpoint("early", BOT_A, created=2))
    assert ids(table.all()) == ["b", "early", "late"]  # BOT_B sorts before BOT_A


@given(st.lists(st.tuples(st.sampled_from(["e1", "e2", "e3"]),
                          st.one_of(st.none(), st.sampled_from([BOT_A, BOT_B])),
                          st.booleans()), max_size=30))
def test_table_matches_a_plain_dict_model(ops: list[tuple[str, str | None, bool]]) -> None:
    table = EndpointTable()
    model: dict[str, Endpoint] = {}
    for endpoint_id, bot, enabled in ops:
        value = None if bot is None else endpoint(endpoint_id, bot, enabled=enabled)
        table.apply(endpoint_id, value)
        if value is None:
            model.pop(endpoint_id, None)
        else:
            model[endpoint_id] = value
        assert len(table) == len(model)
        on = sum(1 for e in model.values() if e.enabled)
        assert table.counts() == (on, len(model) - on)
        for b in (BOT_A, BOT_B):
            expected = sorted(i for i, e in model.items() if e.bot_id == b and e.enabled)
            assert sorted(ids(table.for_event(b, "MESSAGE"))) == expected


# --- new_endpoint validation ---------------------------------------------------------------


def test_new_endpoint_builds_a_registration() -> None:
    e = new_endpoint(bot_id=BOT_A, url="https://example.com/hook", description="crm", now_ms=42)
    assert uuid.UUID(e.id).version == 4
    assert e.bot_id == BOT_A
    assert e.url == "https://example.com/hook"
    assert e.event_types == ()
    assert e.enabled
    assert e.description == "crm"
    assert e.created_at == e.updated_at == 42
    assert e.previous_secret is None
    assert len(secret_key(e.secret)) == 32
    other = new_endpoint(bot_id=BOT_A, url="https://example.com/hook")
    assert other.id != e.id and other.secret != e.secret


def test_new_endpoint_keeps_a_given_secret() -> None:
    e = new_endpoint(bot_id=BOT_A, url="http://example.com/", secret=SECRET)
    assert e.secret == SECRET


def test_event_types_are_upper_cased_and_deduplicated() -> None:
    e = new_endpoint(bot_id=BOT_A, url="https://example.com/",
                     event_types=["ticket", " message ", "TICKET", "", "Message"])
    assert e.event_types == ("TICKET", "MESSAGE")


@pytest.mark.parametrize(
    "bot_id",
    [
        "not-a-uuid",
        "",
        "6434515b85414861bb248acd6e77e8c4",
        "{6434515b-8541-4861-bb24-8acd6e77e8c4}",
        "6434515b-8541-4861-bb24",
    ],
)
def test_bot_id_must_be_a_uuid(bot_id: str) -> None:
    with pytest.raises(InputError, match="bot id") as info:
        new_endpoint(bot_id=bot_id, url="https://example.com/")
    assert repr(bot_id) in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/hook",
        "example.com/hook",
        "https://",
        "mailto:x@example.com",
        "javascript:alert(1)",
        "file:///etc/passwd",
    ],
)
def test_url_must_be_http_with_a_host(url: str) -> None:
    with pytest.raises(InputError, match="http") as info:
        new_endpoint(bot_id=BOT_A, url=url)
    assert url in str(info.value)


@pytest.mark.parametrize("url", ["https://user:pass@example.com/hook", "http://user@example.com/"])
def test_url_must_not_carry_credentials(url: str) -> None:
    with pytest.raises(InputError, match="credentials") as info:
        new_endpoint(bot_id=BOT_A, url=url)
    # The host is named so the user can find the URL; the credentials are not echoed.
    assert "example.com" in str(info.value)
    assert "pass" not in str(info.value) and "user" not in str(info.value)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000/hook", "https://example.com", "HTTPS://example.com/x?y=1"]
)
def test_valid_urls_are_accepted(url: str) -> None:
    assert new_endpoint(bot_id=BOT_A, url=url).url == url


def test_unknown_event_type_is_refused_by_name() -> None:
    with pytest.raises(InputError, match="event type") as info:
        new_endpoint(bot_id=BOT_A, url="https://example.com/", event_types=["MESSAGE", "nope"])
    assert "'NOPE'" in str(info.value)
    assert "MESSAGE" in str(info.value)  # lists the known types


@pytest.mark.parametrize(
    "secret",
    [
        "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",  # no whsec_ prefix
        "whsec_not base64 at all!!",
        "whsec_" + base64.b64encode(b"short").decode(),
        "whsec_",
    ],
)
def test_bad_secret_is_refused_without_showing_it(secret: str) -> None:
    with pytest.raises(InputError, match="secret") as info:
        new_endpoint(bot_id=BOT_A, url="https://example.com/", secret=secret)
    encoded = secret.removeprefix("whsec_")
    if encoded:
        assert encoded not in str(info.value)


def test_endpoint_repr_hides_the_secrets() -> None:
    e = new_endpoint(bot_id=BOT_A, url="https://example.com/", secret=SECRET)
    previous = "whsec_" + base64.b64encode(b"p" * 32).decode()
    rotated = Endpoint(id=e.id, bot_id=e.bot_id, url=e.url, secret=e.secret, created_at=1,
                       updated_at=1, previous_secret=previous)
    for shown in (repr(e), str(e), repr([e]), f"{e}", repr(rotated)):
        assert SECRET not in shown
        assert SECRET.removeprefix("whsec_") not in shown
        assert rotated.previous_secret is not None
        assert rotated.previous_secret.removeprefix("whsec_") not in shown
        assert e.id in shown
