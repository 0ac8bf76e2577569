"""Test sends: the documented example of each event type, POSTed to one endpoint now.

What ``gateway endpoints test`` and ``POST /v1/endpoints/{id}/test`` call. Each example
goes through the real :class:`~gateway.sender.Sender` (signature, SSRF guard, deadline,
bounded response), exactly as a delivery would, with the endpoint's bot id in place of
the example's and a fresh ``webhook-id``. Test sends are not deliveries: nothing is
written to Kafka, so they are never retried, never dead-lettered, never in the delivery
history and never in the metrics.

With ``malformed``, two more requests check that the receiver verifies what it gets, as
the platform's documentation asks: one signed with a key that is not the endpoint's
(:attr:`ProbeKind.BAD_SIGNATURE`) and one correctly signed but stamped
:data:`STALE_SECONDS` in the past (:attr:`ProbeKind.STALE_TIMESTAMP`), outside the
5-minute tolerance of the Standard Webhooks specification. The sender only ever signs
correctly, so these go through a client of their own, over the same transport and the
same destination policy (the addresses checked are the ones connected to).
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

import httpx

from .config import Config
from .destinations import BlockedDestination, DestinationPolicy
from .events import EventType, parse_event
from .records import Attempt, Endpoint, Outcome, bounded
from .sender import SNIPPET_CHARS, USER_AGENT, Sender
from .signing import InvalidSecret, secret_key, signature_header
from .transport import Connection

__all__ = [
    "STALE_SECONDS",
    "TEST_TIER",
    "Probe",
    "ProbeKind",
    "ProbeReport",
    "example_body",
    "examples",
    "examples_file",
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
    def verdict(self) -> str:
        """In words: ``delivered``, ``failed``, ``rejected`` (as it should be), ``accepted``
        (it should not be) or ``no answer``."""
        if self.kind is ProbeKind.EXAMPLE:
            return "delivered" if self.ok else "failed"
        if self.attempt.status is None:
            return "no answer"
        return "rejected" if self.ok else "accepted"

    def to_json(self) -> dict[str, Any]:
        a = self.attempt
        return {
            "kind": self.kind.value, "eventType": self.event_type, "eventId": self.event_id,
            "ok": self.ok, "verdict": self.verdict, "outcome": a.outcome.value, "status": a.status,
            "durationMs": a.duration_ms, "error": a.error, "response": a.response_snippet,
        }


@dataclass(frozen=True)
class ProbeReport:
    """Every test request sent to one endpoint."""

    endpoint_id: str
    url: str
    probes: tuple[Probe, ...]

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.probes)

    def to_json(self) -> dict[str, Any]:
        return {"endpointId": self.endpoint_id, "url": self.url, "ok": self.ok,
                "results": [p.to_json() for p in self.probes]}


def examples_file() -> Path:
    """``examples/events.jsonl``: inside the installed package, or at the root of a checkout."""
    here = Path(__file__).resolve().parent
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
    """The types asked for (any case), in the documented order; all of them for None.
    Raises ValueError naming the unknown one."""
    if event_types is None:
        return list(EventType)
    wanted = {t.strip().upper() for t in event_types if t.strip()}
    known = {t.value for t in EventType}
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(f"event type {unknown[0]!r} is unknown; expected some of {', '.join(sorted(known))}")
    if not wanted:
        raise ValueError("no event type given; expected some of " + ", ".join(sorted(known)))
    return [t for t in EventType if t.value in wanted]


async def send_tests(
    config: Config,
    endpoint: Endpoint,
    *,
    event_types: Sequence[str] | None = None,
    malformed: bool = False,
) -> ProbeReport:
    """Send the example of each of ``event_types`` (every type when None) to
    ``endpoint``, one after the other, and with ``malformed`` the two requests a receiver
    should refuse. Never raises for what the receiver does; ValueError for an unknown
    event type, before anything is sent."""
    types = _types(event_types)
    probes: list[Probe] = []
    sender = Sender(config)
    try:
        for event_type in types:
            event_id = str(uuid.uuid4())
            try:
                sent = await sender.send(endpoint, event_id, example_body(event_type, endpoint), TEST_TIER)
            except InvalidSecret as exc:  # an endpoint record not written by the gateway's tools
                sent = _unsent(Outcome.INTERNAL_ERROR, f"the endpoint's secret cannot sign: {exc}")
            if not isinstance(sent, Attempt):  # a sender that put it off sent nothing
                sent = _unsent(Outcome.INTERNAL_ERROR, "not sent")
            probes.append(Probe(ProbeKind.EXAMPLE, event_type.value, event_id, sent))
    finally:
        await sender.aclose()
    if malformed and all(p.attempt.outcome is not Outcome.INTERNAL_ERROR for p in probes):
        probes += await _malformed(config, endpoint, types[0])
    return ProbeReport(endpoint.id, endpoint.url, tuple(probes))


async def _malformed(config: Config, endpoint: Endpoint, event_type: EventType) -> list[Probe]:
    body = example_body(event_type, endpoint)
    now = int(time.time())
    wrong_key = secrets.token_bytes(32)
    keys = tuple(secret_key(s) for s in endpoint.secrets_at(now * 1000))
    policy = DestinationPolicy(allow_private=config.allow_private_networks, allowed=config.allowed_networks)
    probes = []
    try:
        for kind, stamp, signing_keys in ((ProbeKind.BAD_SIGNATURE, now, (wrong_key,)),
                                          (ProbeKind.STALE_TIMESTAMP, now - STALE_SECONDS, keys)):
            event_id = str(uuid.uuid4())
            headers = {
                "user-agent": USER_AGENT, "content-type": "application/json",
                "webhook-id": event_id, "webhook-timestamp": str(stamp),
                "webhook-signature": signature_header(signing_keys, event_id, stamp, body),
            }
            attempt = await _post(config, policy, endpoint.url, headers, body)
            probes.append(Probe(kind, event_type.value, event_id, attempt))
    finally:
        await policy.aclose()
    return probes


async def _post(config: Config, policy: DestinationPolicy, url: str, headers: dict[str, str],
                body: bytes) -> Attempt:
    """One POST through a connection of its own, bounded like the sender's attempts."""
    started_at = time.time_ns() // 1_000_000
    started = time.perf_counter()
    status: int | None = None
    snippet: str | None = None
    error: str | None = None
    outcome = Outcome.CONNECTION_ERROR
    transport = Connection(policy, httpx.create_ssl_context())
    try:
        async with httpx.AsyncClient(transport=transport, follow_redirects=False) as client:
            async with asyncio.timeout(config.request_timeout):
                async with client.stream("POST", url, headers=headers, content=body) as response:
                    status = response.status_code
                    raw = bytearray()
                    async for chunk in response.aiter_raw():
                        raw += chunk
                        if len(raw) >= config.max_response_bytes:
                            break
            snippet = bytes(raw[:SNIPPET_CHARS * 4]).decode("utf-8", errors="replace")[:SNIPPET_CHARS] or None
            outcome = Outcome.SUCCESS if 200 <= status < 300 else Outcome.HTTP_ERROR
    except BlockedDestination as exc:
        outcome, error = Outcome.BLOCKED, str(exc)
    except TimeoutError:
        outcome, error = Outcome.TIMEOUT, f"timeout after {config.request_timeout:g} s"
    except (httpx.HTTPError, OSError) as exc:
        error = f"connection error: {exc or type(exc).__name__}"
    duration_ms = (time.perf_counter() - started) * 1000
    return Attempt(at=started_at, tier=TEST_TIER, duration_ms=round(duration_ms, 3), outcome=outcome,
                   status=status, error=bounded(error), response_snippet=snippet)


def _unsent(outcome: Outcome, error: str) -> Attempt:
    return Attempt(at=time.time_ns() // 1_000_000, tier=TEST_TIER, duration_ms=0.0, outcome=outcome, error=error)
