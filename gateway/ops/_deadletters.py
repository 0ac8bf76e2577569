"""The dead-letter tools: read, filter, count and replay what the gateway gave up on.
The ``gateway dlq`` commands and the HTTP API both call these functions; they print
nothing, return values and raise the errors of :mod:`gateway.errors`.

Reading never joins a consumer group the workers use: partitions are assigned directly,
nothing is committed, and reading stops at the end each partition had when it was first
reached, so a tool never hangs on a topic the workers keep writing to.

A replay sends each selected delivery back into the first retry tier, due now, with its
attempt counter and its deferrals reset (it gets the whole schedule and the whole
deferral age limit again), to the endpoint it failed for
(or the one named), never fanned out again. Each replayed dead letter is recorded on the
compacted ``dlq-replays`` topic, keyed by its partition:offset, and the replayed record
carries ``replay-id`` and ``replay-of`` headers; a later replay skips what was already
replayed unless told ``again``.

A replay is planned (:func:`plan_replay`: select, then decide per dead letter; what
cannot be replayed is a :class:`Refusal` with its reason, not an error) and then sent
(:func:`send_replay`, with progress through a callback). Only replays the broker
acknowledged are recorded as replayed. Planning reads the endpoint registry: an unknown
``to_endpoint`` is an :class:`~gateway.errors.InputError`.

Every read and every plan takes the caller's :class:`~gateway.ops.Access`: a bot scope
sees (and replays) its own bot's dead letters only, and only to its own endpoints; a
dead letter that holds no delivery has no bot, so only admin and read scopes see it.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from confluent_kafka import KafkaError, Producer

from ..codec import Codec
from ..config import Config
from ..errors import DecodeError, Forbidden, InputError, NotFound
from ..events import EventType, is_uuid, parse_event_types
from ..records import DEAD_LETTER_SCHEMA, DELIVERY_SCHEMA, DeadLetter, Delivery
from ..store import EndpointTable, Tier, Topics, delivery_headers, load_endpoints, read_to_end, reader_consumer
from ._access import OPERATOR, Access
from ._inputs import RecordId, StatusSelector, check_range, iso, parse_time

__all__ = [
    "REPLAY_SCHEMA",
    "DeadLetterEntry",
    "DeadLetterStats",
    "Filters",
    "PlannedReplay",
    "Refusal",
    "RefusalReason",
    "ReplayPlan",
    "ReplayProgress",
    "ReplayReport",
    "decide_replays",
    "decode_dead_letter",
    "find_dead_letters",
    "in_scope",
    "parse_selector",
    "plan_replay",
    "read_dead_letters",
    "read_replayed",
    "replay_tier",
    "send_replay",
    "stats",
]

REPLAY_SCHEMA = "gateway.Replay"


@dataclass(frozen=True)
class DeadLetterEntry:
    """One record of the dead-letter topic, where it sits, and what it holds."""

    topic: str
    partition: int
    offset: int
    dead: DeadLetter | None
    """None when the dead-letter record itself could not be read."""
    error: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> RecordId:
        """``PARTITION:OFFSET`` in the dead-letter topic: how the tools and the API name it."""
        return RecordId(self.partition, self.offset)

    @property
    def coordinate(self) -> str:
        """``TOPIC:PARTITION:OFFSET``: what the dlq-replays topic and the replayed records'
        ``replay-of`` header hold."""
        return f"{self.topic}:{self.id}"

    @property
    def reason(self) -> str:
        """The dead letter's reason, or ``unreadable`` when the record itself is not."""
        return self.dead.reason.value if self.dead else "unreadable"

    @property
    def delivery(self) -> Delivery | None:
        return self.dead.delivery if self.dead else None

    @property
    def event_type(self) -> str | None:
        return self.delivery.event_type if self.delivery else None

    @property
    def last_status(self) -> int | None:
        last = self.delivery.last_attempt if self.delivery else None
        return last.status if last else None

    @property
    def last_outcome(self) -> str:
        last = self.delivery.last_attempt if self.delivery else None
        return last.describe() if last else "-"

    def summary(self) -> dict[str, Any]:
        """The row of `dlq list`."""
        dead, delivery = self.dead, self.delivery
        last_outcome = self.last_outcome if delivery else (dead.detail if dead else self.error)
        return {
            "id": str(self.id),
            "partition": self.partition,
            "offset": self.offset,
            "deadAt": iso(dead.dead_at) if dead else None,
            "reason": self.reason,
            "eventType": delivery.event_type if delivery else None,
            "botId": delivery.bot_id if delivery else None,
            "endpointId": delivery.endpoint_id if delivery else None,
            "attempts": len(delivery.attempts) if delivery else 0,
            "lastStatus": self.last_status,
            "lastOutcome": last_outcome,
            "eventId": delivery.event_id if delivery else None,
            "replayOf": delivery.replay_of if delivery else None,
        }

    def full(self) -> dict[str, Any]:
        """Everything, for `dlq show`: the summary, the detail and the attempt log."""
        dead, delivery = self.dead, self.delivery
        result = self.summary() | {"coordinate": self.coordinate, "headers": self.headers}
        if dead is not None:
            result |= {
                "detail": dead.detail,
                "source": f"{dead.source_topic}:{dead.source_partition}:{dead.source_offset}",
                "originalKey": _text(dead.original_key),
                "originalValueBytes": len(dead.original_value) if dead.original_value else None,
            }
        else:
            result["error"] = self.error
        if delivery is not None:
            result |= {
                "sessionId": delivery.session_id,
                "occurredAt": iso(delivery.occurred_at),
                "payload": delivery.payload,
                "attemptLog": [
                    {"at": iso(a.at), "tier": a.tier, "durationMs": a.duration_ms,
                     "status": a.status, "error": a.error, "response": a.response_snippet}
                    for a in delivery.attempts
                ],
            }
        return result


def _text(data: bytes | None) -> str | None:
    return None if data is None else data.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Filters:
    """The selection shared by every dlq command and the API's dead-letter routes; empty
    fields select everything. :meth:`parse` makes one from what a user typed."""

    event_type: EventType | None = None
    bot_id: str | None = None
    """Compared in any case."""
    endpoint_id: str | None = None
    reason: str | None = None
    """A :class:`~gateway.records.DeadLetterReason` value, or ``unreadable``."""
    status: StatusSelector | None = None
    """Applied to the last attempt."""
    since: int | None = None
    until: int | None = None
    partition: int | None = None
    from_offset: int | None = None
    to_offset: int | None = None
    event_id: str | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        check_range(self.since, self.until)

    @property
    def selects_all(self) -> bool:
        """Whether these filters select every dead letter (a limit alone selects the first
        of them all): a replay of everything must be asked for in so many words."""
        return all(value is None for name, value in vars(self).items() if name != "limit")

    def scoped(self, access: Access) -> Filters:
        """These filters as ``access`` may run them: a bot scope's narrowed to its bot
        (:class:`~gateway.errors.Forbidden` when they name another)."""
        bot_id = access.bot_filter(self.bot_id)
        return self if bot_id == self.bot_id else replace(self, bot_id=bot_id)

    @classmethod
    def parse(
        cls, *, event_type: str | None = None, bot_id: str | None = None, endpoint_id: str | None = None,
        reason: str | None = None, status: str | None = None, since: str | None = None, until: str | None = None,
        partition: int | None = None, from_offset: int | None = None, to_offset: int | None = None,
        limit: int | None = None,
    ) -> Filters:
        """The filters as given by a user: event type any case, status as
        :class:`~gateway.ops.StatusSelector` reads it, times as
        :func:`~gateway.ops.parse_time` does. Refuses, naming the input."""
        types = parse_event_types([event_type], field="event_type") if event_type is not None else ()
        return cls(
            event_type=types[0] if types else None,  # (a blank type is no filter, as in every list of types)
            bot_id=bot_id, endpoint_id=endpoint_id, reason=reason,
            status=StatusSelector.parse(status) if status is not None else None,
            since=parse_time(since, field="since") if since is not None else None,
            until=parse_time(until, field="until") if until is not None else None,
            partition=partition, from_offset=from_offset, to_offset=to_offset, limit=limit,
        )

    def admits(self, entry: DeadLetterEntry) -> bool:
        dead, delivery = entry.dead, entry.delivery
        if self.reason is not None and entry.reason != self.reason:
            return False
        if self.since is not None and (dead is None or dead.dead_at < self.since):
            return False
        if self.until is not None and (dead is None or dead.dead_at > self.until):
            return False
        if self.event_type or self.bot_id or self.endpoint_id or self.event_id or self.status:
            if delivery is None:
                return False
            if self.event_type and delivery.event_type != self.event_type.value:
                return False
            if self.bot_id and delivery.bot_id.lower() != self.bot_id.lower():
                return False
            if self.endpoint_id and delivery.endpoint_id != self.endpoint_id:
                return False
            if self.event_id and delivery.event_id != self.event_id:
                return False
            last = delivery.last_attempt
            if self.status and (last is None or not self.status.admits(last)):
                return False
        if self.partition is not None and entry.partition != self.partition:
            return False
        if self.from_offset is not None and entry.offset < self.from_offset:
            return False
        return self.to_offset is None or entry.offset <= self.to_offset


def _read_to_end(
    config: Config, topic: str, *, partition: int | None = None, start: int = 0
) -> Iterator[Any]:
    consumer = reader_consumer(config, "dlq-reader")
    try:
        yield from read_to_end(consumer, config, topic, partition=partition, start=start)
    finally:
        consumer.close()


def read_dead_letters(
    config: Config, filters: Filters = Filters(), *, codec: Codec | None = None, access: Access = OPERATOR,
) -> Iterator[DeadLetterEntry]:
    """The dead letters ``filters`` selects (within ``access``'s scope), in partition
    order of arrival."""
    filters = filters.scoped(access)
    codec = codec or Codec(config.schema_registry_url)
    topic = Topics.from_config(config).dlq
    matched = 0
    for msg in _read_to_end(config, topic, partition=filters.partition, start=filters.from_offset or 0):
        entry = decode_dead_letter(codec, topic, msg)
        if filters.admits(entry):
            yield entry
            matched += 1
            if filters.limit is not None and matched >= filters.limit:
                return


def decode_dead_letter(codec: Codec, topic: str, msg: Any) -> DeadLetterEntry:
    """The entry a record of the dead-letter topic makes (one that cannot be read is an
    entry too, with its error: a dead letter is never hidden)."""
    headers = {k: (v or b"").decode(errors="replace") for k, v in (msg.headers() or [])}
    try:
        name, record = codec.decode(msg.value())
        if name != DEAD_LETTER_SCHEMA:
            raise DecodeError(f"a {name} record, not a dead letter")
        return DeadLetterEntry(topic, int(msg.partition() or 0), int(msg.offset() or 0),
                               DeadLetter.from_record(record), headers=headers)
    except (DecodeError, KeyError, TypeError, ValueError) as exc:
        return DeadLetterEntry(topic, int(msg.partition() or 0), int(msg.offset() or 0), None, error=str(exc),
                               headers=headers)


def read_replayed(config: Config, *, codec: Codec | None = None) -> set[str]:
    """Coordinates of the dead letters already replayed."""
    codec = codec or Codec(config.schema_registry_url)
    replayed: set[str] = set()
    for msg in _read_to_end(config, Topics.from_config(config).dlq_replays):
        key = (msg.key() or b"").decode()
        if msg.value() is None:
            replayed.discard(key)
        else:
            replayed.add(key)
    return replayed


def parse_selector(selector: str) -> Filters:
    """What ``dlq show`` and ``GET /v1/dead-letters/{id}`` select: an event id (every dead
    letter of that event) or ``PARTITION:OFFSET`` (one dead letter)."""
    if is_uuid(selector):
        return Filters(event_id=selector)
    if RecordId.is_one(selector):
        chosen = RecordId.parse(selector)
        return Filters(partition=chosen.partition, from_offset=chosen.offset, to_offset=chosen.offset)
    raise InputError(f"selector {selector!r} is neither an event id (UUID) nor PARTITION:OFFSET",
                     field="selector")


def find_dead_letters(
    config: Config, selector: str, *, codec: Codec | None = None, access: Access = OPERATOR,
) -> list[DeadLetterEntry]:
    """The dead letters ``selector`` names (see :func:`parse_selector`);
    :class:`~gateway.errors.NotFound` if there are none, :class:`~gateway.errors.Forbidden`
    if there are, but none in ``access``'s scope."""
    found = list(read_dead_letters(config, parse_selector(selector), codec=codec))
    if not found:
        raise NotFound(f"no dead letter matches {selector!r}", field="selector")
    return in_scope(found, access, selector=selector)


def in_scope(entries: list[DeadLetterEntry], access: Access, *, selector: str) -> list[DeadLetterEntry]:
    """The dead letters ``selector`` found that ``access`` may see;
    :class:`~gateway.errors.Forbidden` when it found some, but none of them."""
    mine = [entry for entry in entries if access.sees_bot(entry.delivery.bot_id if entry.delivery else None)]
    if entries and not mine:
        raise Forbidden(f"this token is scoped to bot {access.bot_id}: dead letter {selector} is out of its scope")
    return mine


@dataclass(frozen=True)
class DeadLetterStats:
    """Counts of dead letters by reason, event type, endpoint and hour (UTC)."""

    reason: Counter[str] = field(default_factory=Counter)
    event_type: Counter[str] = field(default_factory=Counter)
    endpoint_id: Counter[str] = field(default_factory=Counter)
    hour: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.reason.values())

    def by(self) -> dict[str, Counter[str]]:
        """Each count by what it counts, as the JSON names it."""
        return {"reason": self.reason, "eventType": self.event_type, "endpointId": self.endpoint_id,
                "hour": self.hour}

    def to_json(self) -> dict[str, Any]:
        """As ``dlq stats --json`` and ``GET /v1/dead-letters/stats`` answer."""
        return {"total": self.total} | {name: dict(counts) for name, counts in self.by().items()}


def stats(entries: Iterable[DeadLetterEntry]) -> DeadLetterStats:
    """Counts by reason, event type, endpoint and hour (UTC)."""
    counts = DeadLetterStats()
    for entry in entries:
        row = entry.summary()
        counts.reason[row["reason"]] += 1
        counts.event_type[row["eventType"] or "-"] += 1
        counts.endpoint_id[row["endpointId"] or "-"] += 1
        counts.hour[(row["deadAt"] or "-")[:13]] += 1
    return counts


# --- replay ----------------------------------------------------------------------------------


class RefusalReason(StrEnum):
    """Why a selected dead letter cannot be replayed."""

    NOT_A_DELIVERY = "not_a_delivery"
    """An undecodable or invalid record (or an unreadable dead letter): no endpoint to
    send to. Its original bytes can be exported instead."""
    ENDPOINT_NOT_REGISTERED = "endpoint_not_registered"
    """The endpoint it failed for has been removed; name another one to replay to it."""
    UNKNOWN_TARGET = "unknown_target"
    """The endpoint named to replay to is not registered."""


@dataclass(frozen=True)
class Refusal:
    """A selected dead letter the replay will not send, and why."""

    entry: DeadLetterEntry
    reason: RefusalReason
    message: str
    """The reason in words, with the values concerned."""

    @property
    def coordinate(self) -> str:
        return self.entry.coordinate


@dataclass(frozen=True)
class PlannedReplay:
    """A dead letter and the delivery a replay sends for it."""

    entry: DeadLetterEntry
    delivery: Delivery
    """Due now, attempt counter reset, to the endpoint it failed for (or the one named)."""


@dataclass(frozen=True)
class ReplayPlan:
    """What a replay would do; :func:`send_replay` does it. A dry run stops here."""

    replay_id: str
    topic: str
    """The first retry tier's topic, where replays go."""
    selected: int
    planned: tuple[PlannedReplay, ...]
    skipped_already_replayed: int
    refused: tuple[Refusal, ...]


@dataclass(frozen=True)
class ReplayProgress:
    """Where a replay stands, as reported to ``on_progress`` while it is sent."""

    total: int
    sent: int
    """Handed to the producer so far."""
    acknowledged: int
    failed: int
    seconds: float

    @property
    def rate(self) -> float:
        """Replays sent per second so far."""
        return self.sent / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class ReplayReport:
    """What a replay did."""

    plan: ReplayPlan
    replayed: int
    """Acknowledged by the broker: these are in the retry tier, and recorded as replayed
    unless counted in ``unrecorded``."""
    failed: int = 0
    """Not acknowledged (an error, or no answer within the timeout): not recorded as
    replayed, so the same replay sends them again. Some may have reached the tier anyway;
    receivers dedupe on ``webhook-id``."""
    first_failure: str | None = None
    unrecorded: int = 0
    """Acknowledged, but their record on the ``dlq-replays`` topic was not: a later
    replay would send them again."""
    first_unrecorded: str | None = None
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.replayed / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        """Everything planned was replayed and recorded."""
        return self.failed == 0 and self.unrecorded == 0


def replay_tier(config: Config) -> Tier:
    """The first retry tier, where replays go; an :class:`~gateway.errors.InputError` if
    there is none."""
    tiers = Topics.from_config(config).tiers
    if len(tiers) < 2:
        raise InputError("there is no retry tier to replay into (GATEWAY_RETRY_DELAYS is empty)",
                         field="retry_delays")
    return tiers[1]


def decide_replays(
    entries: Iterable[DeadLetterEntry],
    *,
    topic: str,
    known_endpoints: Collection[str],
    already_replayed: Collection[str] = frozenset(),
    to_endpoint: str | None = None,
    replay_id: str | None = None,
    now_ms: int | None = None,
) -> ReplayPlan:
    """The plan for ``entries``, decided without I/O: each dead letter is planned, skipped
    (its coordinate is in ``already_replayed``) or refused with its reason."""
    now = now_ms if now_ms is not None else time.time_ns() // 1_000_000
    planned: list[PlannedReplay] = []
    refused: list[Refusal] = []
    selected = skipped = 0
    for entry in entries:
        selected += 1
        delivery = entry.delivery
        if delivery is None:
            why = (f"not a delivery: the dead-letter record cannot be read ({entry.error})"
                   if entry.dead is None else
                   f"not a delivery: a {entry.dead.reason} record has no endpoint to send to; "
                   "its original bytes can be exported instead")
            refused.append(Refusal(entry, RefusalReason.NOT_A_DELIVERY, why))
            continue
        if entry.coordinate in already_replayed:
            skipped += 1
            continue
        target = to_endpoint or delivery.endpoint_id
        if target not in known_endpoints:
            if to_endpoint is None:
                refused.append(Refusal(entry, RefusalReason.ENDPOINT_NOT_REGISTERED,
                                       f"endpoint {target} is no longer registered"))
            else:
                refused.append(Refusal(entry, RefusalReason.UNKNOWN_TARGET,
                                       f"target endpoint {target} is not registered"))
            continue
        planned.append(PlannedReplay(entry, replace(
            delivery, endpoint_id=target, attempt=0, due_at=now, replay_of=entry.coordinate,
            deferrals=0, deferred_since=None,  # a fresh start: the age limit counts from now
        )))
    return ReplayPlan(
        replay_id=replay_id or str(uuid.uuid4()), topic=topic, selected=selected,
        planned=tuple(planned), skipped_already_replayed=skipped, refused=tuple(refused),
    )


def plan_replay(
    config: Config,
    filters: Filters = Filters(),
    *,
    again: bool = False,
    to_endpoint: str | None = None,
    endpoints: EndpointTable | None = None,
    codec: Codec | None = None,
    access: Access = OPERATOR,
) -> ReplayPlan:
    """Select dead letters with ``filters`` and plan their replay (:func:`decide_replays`):
    to ``to_endpoint`` if given, else each to the endpoint it failed for; dead letters
    replayed before are skipped unless ``again``.

    ``endpoints`` is the registry to check against (default: the topic, read now).
    Raises an :class:`~gateway.errors.InputError` naming ``to_endpoint`` if it is not
    registered, before reading any dead letter. A bot scope replays its own bot's dead
    letters, to its own endpoints (:class:`~gateway.errors.Forbidden` otherwise).
    """
    tier = replay_tier(config)
    filters = filters.scoped(access)
    codec = codec or Codec(config.schema_registry_url)
    table = endpoints if endpoints is not None else load_endpoints(config)
    named = table.get(filters.endpoint_id) if filters.endpoint_id is not None else None
    if named is not None:  # a filter naming another bot's endpoint: out of scope, not "none of them"
        access.check_endpoint(named)
    if to_endpoint is not None:
        target = table.get(to_endpoint)
        if target is None:
            raise InputError(f"no endpoint with id {to_endpoint!r}", field="to_endpoint")
        access.check_endpoint(target)
    registered = {e.id for e in table.all() if access.sees_bot(e.bot_id)}
    entries = list(read_dead_letters(config, filters, codec=codec))
    replayed = set() if again else read_replayed(config, codec=codec)
    return decide_replays(entries, topic=tier.topic, known_endpoints=registered,
                          already_replayed=replayed, to_endpoint=to_endpoint)


def send_replay(
    config: Config,
    plan: ReplayPlan,
    *,
    rate: float | None = None,
    on_progress: Callable[[ReplayProgress], None] | None = None,
    timeout: float = 60.0,
    codec: Codec | None = None,
) -> ReplayReport:
    """Send ``plan``'s deliveries into the first retry tier (at most ``rate`` per second)
    and record the acknowledged ones on the ``dlq-replays`` topic.

    Each replay has ``timeout`` seconds from when it is handed to the producer to be
    acknowledged; at the end, whatever is still unanswered is withdrawn and counted as
    failed, so every replay is either acknowledged (and recorded) or failed (and not
    recorded, so the same replay sends it again). A withdrawn replay may have reached
    the broker all the same: receivers dedupe on ``webhook-id``.

    Failures are values in the report, not exceptions: a replay job reports what it
    did. ``on_progress`` is called after each send and while waiting.
    """
    codec = codec or Codec(config.schema_registry_url)
    total = len(plan.planned)
    if not total:
        return ReplayReport(plan, replayed=0)
    producer = Producer(config.kafka_common() | {
        "acks": "all", "enable.idempotence": True, "linger.ms": 5,
        # librdkafka gives up on a message when we stop waiting for it, not minutes later.
        "message.timeout.ms": max(1, int(timeout * 1000)),
    })
    errors: list[str] = []
    acked: list[PlannedReplay] = []

    def on_delivery(item: PlannedReplay) -> Callable[[KafkaError | None, Any], None]:
        def callback(err: KafkaError | None, msg: Any) -> None:
            if err is None:
                acked.append(item)
            else:
                errors.append(f"{item.entry.coordinate}: {_describe(err, timeout)}")
        return callback

    started = time.monotonic()

    def progress(sent: int) -> None:
        if on_progress is not None:
            on_progress(ReplayProgress(total=total, sent=sent, acknowledged=len(acked),
                                       failed=len(errors), seconds=time.monotonic() - started))

    for index, item in enumerate(plan.planned):
        if rate:
            # Never ahead of the schedule `rate` allows, measured from the start.
            wait = started + index / rate - time.monotonic()
            if wait > 0:
                producer.poll(0)
                time.sleep(wait)
        entry, delivery = item.entry, item.delivery
        headers: list[tuple[str, str | bytes | None]] = [
            *delivery_headers(delivery, source=(entry.topic, entry.partition, entry.offset)),
            ("replay-id", plan.replay_id.encode()), ("replay-of", entry.coordinate.encode()),
        ]
        value = codec.encode(DELIVERY_SCHEMA, delivery.to_record(), topic=plan.topic)
        _produce(producer, plan.topic, key=delivery.endpoint_id.encode(), value=value,
                 headers=headers, on_delivery=on_delivery(item))
        producer.poll(0)
        progress(index + 1)
    _settle(producer, timeout, on_wait=lambda: progress(total))
    # Counted once every report is in: nothing is acknowledged after this point.
    replayed = list(acked)
    seconds = time.monotonic() - started
    failed = total - len(replayed)
    first_failure = errors[0] if errors else (
        f"not acknowledged within {timeout:g} s" if failed else None)
    unrecorded, first_unrecorded = _record(config, producer, codec, plan, replayed, timeout)
    return ReplayReport(plan, replayed=len(replayed), failed=failed, first_failure=first_failure,
                        unrecorded=unrecorded, first_unrecorded=first_unrecorded, seconds=seconds)


# Delivery reports that mean "no answer in time" rather than a refusal by the broker.
_UNANSWERED = {KafkaError._MSG_TIMED_OUT, KafkaError._TIMED_OUT, KafkaError._PURGE_QUEUE,
               KafkaError._PURGE_INFLIGHT}


def _describe(err: KafkaError, timeout: float) -> str:
    if err.code() in _UNANSWERED:
        return f"not acknowledged within {timeout:g} s ({err.str()})"
    return str(err.str())


def _produce(producer: Producer, topic: str, **message: Any) -> None:
    """Produce, waiting while the producer's local queue is full: acknowledgements (or
    message timeouts) make room."""
    while True:
        try:
            producer.produce(topic, **message)
            return
        except BufferError:
            producer.poll(0.1)


def _settle(producer: Producer, timeout: float, *, on_wait: Callable[[], None] | None = None) -> None:
    """Wait up to ``timeout`` seconds for every message's delivery report, then withdraw
    the messages still unanswered: their reports come back as purged, so after this no
    report is pending and none can arrive later."""
    deadline = time.monotonic() + timeout
    while len(producer) and (left := deadline - time.monotonic()) > 0:
        producer.flush(min(left, 0.5))
        if on_wait is not None:
            on_wait()
    if len(producer):
        producer.purge()
        producer.flush(5)  # serves the purged messages' reports; no broker needed


def _record(config: Config, producer: Producer, codec: Codec, plan: ReplayPlan,
            replayed: list[PlannedReplay], timeout: float) -> tuple[int, str | None]:
    """Record ``replayed`` on the dlq-replays topic: (how many were not recorded, first why)."""
    if not replayed:
        return 0, None
    topic = Topics.from_config(config).dlq_replays
    now = time.time_ns() // 1_000_000
    errors: list[str] = []
    recorded = 0

    def on_delivery(err: KafkaError | None, msg: Any) -> None:
        nonlocal recorded
        if err is None:
            recorded += 1
        else:
            errors.append(f"{topic}: {_describe(err, timeout)}")

    for item in replayed:
        entry, delivery = item.entry, item.delivery
        record = {"deadLetter": entry.coordinate, "replayId": plan.replay_id, "replayedAt": now,
                  "eventId": delivery.event_id, "endpointId": delivery.endpoint_id}
        _produce(producer, topic, key=entry.coordinate.encode(),
                 value=codec.encode(REPLAY_SCHEMA, record, topic=topic), on_delivery=on_delivery)
        producer.poll(0)
    _settle(producer, timeout)
    unrecorded = len(replayed) - recorded
    return unrecorded, (errors[0] if errors else (
        f"{topic}: not acknowledged within {timeout:g} s" if unrecorded else None))
