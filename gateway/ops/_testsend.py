"""Test sends: the documented example of each event type, POSTed to one endpoint now.

What ``gateway endpoints test`` and ``POST /v1/endpoints/{id}/test`` call. Each example
goes through the real :class:`~gateway.delivery.Sender` (signature, SSRF guard, deadline,
bounded response), exactly as a delivery would, with the endpoint's bot id in place of
the example's and a fresh ``webhook-id``. Test sends are not deliveries: nothing is
written to Kafka, so they are never retried, never dead-lettered, never in the delivery
history and never in the metrics.

With ``malformed``, two more requests check that the receiver verifies what it gets, as
the platform's documentation asks: one signed with a key that is not the endpoint's
(:attr:`ProbeKind.BAD_SIGNATURE`) and one correctly signed but stamped
:data:`STALE_SECONDS` in the past (:attr:`ProbeKind.STALE_TIMESTAMP`), outside the
5-minute tolerance of the Standard Webhooks specification. They go through the same
sender, signed as they ask (:class:`~gateway.delivery.Signing`): how an answer becomes an
outcome is the sender's rule, written once.
"""

from __future__ import annotations

import asyncio
import functools
import json
import secrets
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from ..config import Config
from ..delivery import Sender, Signing
from ..errors import InputError, InvalidSecret
from ..events import EventType, parse_event, parse_event_types
from ..records import Attempt, Endpoint, Outcome
from ..signing import secret_key
from ..store import EndpointTable
from ._access import OPERATOR, Access
from ._endpoints import get_endpoint

__all__ = [
    "STALE_SECONDS",
    "TEST_TIER",
    "Probe",
    "ProbeKind",
    "ProbeReport",
    "Verdict",
    "example_body",
    "examples",
    "examples_file",
    "send_test_events",
    "send_tests",
]

TEST_TIER = "test"
"""The tier name test sends carry (in the sender's logs)."""

STALE_SECONDS = 10 * 60
"""How old the stale-timestamp request's timestamp is: twice the 5-minute tolerance."""


class ProbeKind(StrEnum):
    EXAMPLE = "example"
    """A documented example, correctly signed: the receiver should answer 2xx."""
    BAD_SIGNATURE = "bad_signature"
    """Signed with a key that is not the endpoint's: the receiver should refuse it."""
    STALE_TIMESTAMP = "stale_timestamp"
    """Correctly signed, timestamp 10 minutes old: the receiver should refuse it."""


class Verdict(StrEnum):
    """A test request's result in words."""

    DELIVERED = "delivered"
    """An example answered 2xx."""
    FAILED = "failed"
    """An example not answered 2xx."""
    REJECTED = "rejected"
    """A malformed request refused, as it should be."""
    ACCEPTED = "accepted"
    """A malformed request answered 2xx: the receiver does not verify."""
    NO_ANSWER = "no answer"
    """A malformed request got no HTTP answer at all, which proves nothing."""


@dataclass(frozen=True)
class Probe:
    """One test request and how it ended."""

    kind: ProbeKind
    event_type: str
    event_id: str
    """The ``webhook-id`` sent (a fresh UUID per request)."""
    attempt: Attempt
    """Outcome, status, duration and the start of the response, as a delivery records them."""

    @property
    def ok(self) -> bool:
        """An example answered 2xx; a malformed request refused with an HTTP status
        other than 2xx (no answer at all proves nothing, so it is not ok either)."""
        if self.kind is ProbeKind.EXAMPLE:
            return self.attempt.succeeded
        return self.attempt.status is not None and not 200 <= self.attempt.status < 300

    @property
    def verdict(self) -> Verdict:
        if self.kind is ProbeKind.EXAMPLE:
            return Verdict.DELIVERED if self.ok else Verdict.FAILED
        if self.attempt.status is None:
            return Verdict.NO_ANSWER
        return Verdict.REJECTED if self.ok else Verdict.ACCEPTED

    def to_json(self) -> dict[str, Any]:
        a = self.attempt
        return {
            "kind": self.kind.value, "eventType": self.event_type, "eventId": self.event_id,
            "ok": self.ok, "verdict": self.verdict.value, "outcome": a.outcome.value, "status": a.status,
            "durationMs": a.duration_ms, "error": a.error, "response": a.response_snippet,
        }


@dataclass(frozen=True)
class ProbeReport:
    """Every test request sent to one endpoint."""

    endpoint: Endpoint
    """As it was registered when the requests went."""
    probes: tuple[Probe, ...]

    @property
    def endpoint_id(self) -> str:
        return self.endpoint.id

    @property
    def url(self) -> str:
        return self.endpoint.url

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.probes)

    def to_json(self) -> dict[str, Any]:
        return {"endpointId": self.endpoint_id, "url": self.url, "ok": self.ok,
                "results": [p.to_json() for p in self.probes]}


def examples_file() -> Path:
    """``examples/events.jsonl``: inside the installed package, or at the root of a checkout."""
    here = Path(__file__).resolve().parents[1]  # gateway/
    for candidate in (here / "examples" / "events.jsonl", here.parent / "examples" / "events.jsonl"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no examples/events.jsonl beside {here} or its parent")


def examples() -> dict[EventType, dict[str, Any]]:
    """The documented example of each event type, by type, in the documented order (a
    copy: the caller may change it)."""
    return {event_type: dict(document) for event_type, document in _examples().items()}


@functools.cache
def _examples() -> dict[EventType, dict[str, Any]]:
    found: dict[EventType, dict[str, Any]] = {}
    for line in examples_file().read_text(encoding="utf-8").splitlines():
        if line.strip():
            document = json.loads(line)
            found.setdefault(EventType(document["event"]), document)
    missing = set(EventType) - set(found)
    if missing:  # a broken installation, not a user's input
        raise RuntimeError(f"{examples_file()} lacks an example of {', '.join(sorted(missing))}")
    return found


def example_body(event_type: EventType, endpoint: Endpoint) -> bytes:
    """The example of ``event_type`` as the gateway would POST it to ``endpoint``: the
    documented document with the endpoint's bot id, encoded as deliveries are."""
    document = _examples()[event_type] | {"botId": endpoint.bot_id}
    return parse_event(document).json_body()


def _types(event_types: Iterable[str] | None) -> list[EventType]:
    """The types asked for (any case), in the documented order; all of them for None."""
    if event_types is None:
        return list(EventType)
    wanted = parse_event_types(event_types)
    if not wanted:
        raise InputError("no event type given; expected some of " + ", ".join(t.value for t in EventType),
                         field="event_types")
    return [t for t in EventType if t in wanted]


async def send_tests(
    config: Config,
    endpoint: Endpoint,
    *,
    event_types: Iterable[str] | None = None,
    malformed: bool = False,
) -> ProbeReport:
    """Send the example of each of ``event_types`` (every type when None) to
    ``endpoint``, one after the other, and with ``malformed`` the two requests a receiver
    should refuse. Never raises for what the receiver does; an
    :class:`~gateway.errors.InputError` for an unknown event type, before anything is sent."""
    types = _types(event_types)
    probes: list[Probe] = []
    # Every request is reported as it ended: no circuit opens between two of them.
    sender = Sender(config.replace(circuit_failures=1_000_000))
    try:
        for event_type in types:
            probes.append(await _probe(sender, endpoint, ProbeKind.EXAMPLE, event_type))
        if malformed and all(p.attempt.outcome is not Outcome.INTERNAL_ERROR for p in probes):
            now = int(time.time())
            keys = tuple(secret_key(s) for s in endpoint.secrets_at(now * 1000))
            probes.append(await _probe(sender, endpoint, ProbeKind.BAD_SIGNATURE, types[0],
                                       Signing(now, (secrets.token_bytes(32),))))
            probes.append(await _probe(sender, endpoint, ProbeKind.STALE_TIMESTAMP, types[0],
                                       Signing(now - STALE_SECONDS, keys)))
    finally:
        await sender.aclose()
    return ProbeReport(endpoint, tuple(probes))


async def _probe(sender: Sender, endpoint: Endpoint, kind: ProbeKind, event_type: EventType,
                 signing: Signing | None = None) -> Probe:
    """One test request through the sender, as a delivery would go (or signed as asked)."""
    event_id = str(uuid.uuid4())
    try:
        sent = await sender.send(endpoint, event_id, example_body(event_type, endpoint), TEST_TIER, signing=signing)
    except InvalidSecret as exc:  # an endpoint record not written by the gateway's tools
        sent = _unsent(f"the endpoint's secret cannot sign: {exc}")
    if not isinstance(sent, Attempt):  # a sender that put it off sent nothing
        sent = _unsent(f"not sent: {sent.detail}")
    return Probe(kind, event_type.value, event_id, sent)


async def send_test_events(
    config: Config,
    endpoint_id: str,
    *,
    event_types: Sequence[str] | None = None,
    malformed: bool = False,
    table: EndpointTable | None = None,
    access: Access = OPERATOR,
) -> ProbeReport:
    """What ``gateway endpoints test`` and ``POST /v1/endpoints/{id}/test`` do: the event
    types checked, the endpoint looked up (in ``table``, else the topic: off the event
    loop) within ``access``'s scope (a read-only caller sends nothing), then
    :func:`send_tests`. An empty ``event_types`` means every type."""
    access.require_write("a test send")
    types = _types(event_types) if event_types else None
    endpoint = await asyncio.to_thread(get_endpoint, config, endpoint_id, table=table, access=access)
    return await send_tests(config, endpoint, event_types=types, malformed=malformed)


def _unsent(error: str) -> Attempt:
    return Attempt.unsent(time.time_ns() // 1_000_000, TEST_TIER, Outcome.INTERNAL_ERROR, error)
