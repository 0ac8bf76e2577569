"""What the faces' inputs become, one rule each: times, statuses, record ids and paging
cursors. The command line and the HTTP API both call these, so they cannot differ: a
time the one refuses, the other refuses in the same words.

Every refusal is an :class:`~gateway.errors.InputError` naming the input at fault.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from ..errors import InputError
from ..records import Attempt, Outcome

__all__ = [
    "STATUS_CHOICES",
    "Cursor",
    "RecordId",
    "StatusSelector",
    "check_range",
    "iso",
    "parse_rate",
    "parse_time",
]

_RELATIVE = re.compile(r"\s*(\d+)\s*([smhd])\s*(ago)?\s*")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_time(text: str, *, field: str, now: datetime | None = None) -> int:
    """``2026-11-28T10:00:00Z``, ``2026-11-28``, ``2h ago``, ``30m`` (ago), ``1d`` → ms since
    the epoch. Refused, naming ``field``: a text that is neither, and a time out of range
    (``99999999999d ago``, or past year 9999 in UTC)."""
    now = now or datetime.now(UTC)
    try:
        match = _RELATIVE.fullmatch(text)
        if match:
            amount, unit = int(match.group(1)), match.group(2)
            return int((now - timedelta(**{_UNITS[unit]: amount})).timestamp() * 1000)
        try:
            moment = datetime.fromisoformat(text.strip())
        except ValueError:
            raise InputError(
                f"{field} {text!r} is neither ISO 8601 (2026-11-28T10:00:00Z) nor relative (2h ago)", field=field
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        ms = int(moment.timestamp() * 1000)
        iso(ms)  # every answer shows it as a UTC time: one past year 9999 there is out of range
        return ms
    except (OverflowError, OSError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{field} {text!r} is out of range", field=field) from None


def check_range(since: int | None, until: int | None) -> None:
    """Refuse a time range that ends before it begins (naming ``since``)."""
    if since is not None and until is not None and since > until:
        raise InputError(f"since ({iso(since)}) is after until ({iso(until)})", field="since")


_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*([smh]))?\s*")


def parse_rate(text: str, *, field: str) -> float:
    """``50``, ``50/s``, ``600/m``, ``36000/h`` → per second; refused, naming ``field``,
    unless a positive rate of that shape."""
    match = _RATE.fullmatch(text)
    if not match or float(match.group(1)) <= 0:
        raise InputError(f"{field.replace('_', ' ')} {text!r} is not a positive rate such as 50/s or 600/m",
                         field=field)
    return float(match.group(1)) / {"s": 1, "m": 60, "h": 3600}[match.group(2) or "s"]


def iso(ms: int) -> str:
    """A time (ms since the epoch) as every answer shows it: ISO 8601, UTC, milliseconds."""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, order=True, slots=True)
class RecordId:
    """One record of a topic the tools read (a dead letter, a line of the delivery
    history): ``PARTITION:OFFSET``, unique within its topic."""

    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.partition}:{self.offset}"

    @classmethod
    def parse(cls, text: str, *, field: str = "id") -> RecordId:
        parts = text.split(":")
        if len(parts) != 2 or not all(part.isascii() and part.isdigit() for part in parts):
            raise InputError(f"{field} {text!r} is not PARTITION:OFFSET", field=field)
        return cls(int(parts[0]), int(parts[1]))

    @classmethod
    def is_one(cls, text: str) -> bool:
        """Whether ``text`` has the shape of a record id."""
        parts = text.split(":")
        return len(parts) == 2 and all(part.isascii() and part.isdigit() for part in parts)


class Cursor:
    """Paging cursors: the sort key of the last item of a page, opaque to the client
    (URL-safe base64 of a JSON array), checked when it comes back."""

    @staticmethod
    def encode(key: Sequence[str | int]) -> str:
        return base64.urlsafe_b64encode(json.dumps(list(key), separators=(",", ":")).encode()).decode().rstrip("=")

    @staticmethod
    def decode(text: str, kinds: Sequence[type[str] | type[int]], *, field: str = "cursor") -> tuple[str | int, ...]:
        """The key ``text`` stands for, each part of the kind given; refused unless it is a
        cursor of that shape."""
        try:
            key = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        except (binascii.Error, UnicodeDecodeError, ValueError):
            key = None
        if (not isinstance(key, list) or len(key) != len(kinds)
                or not all(type(part) is kind for part, kind in zip(key, kinds, strict=True))):
            raise InputError(f"{field} {text!r} is not a cursor returned by this API", field=field)
        return tuple(key)


STATUS_CHOICES = (
    "success", "failed", "deferred", "http_error", "timeout", "connection_error", "connection", "blocked",
    "invalid_endpoint", "internal_error", "circuit_open", "2xx", "3xx", "4xx", "5xx", "NNN",
)
"""What a status filter may select (``NNN``: one HTTP status, e.g. ``404``)."""

_OUTCOMES = frozenset(o.value for o in Outcome) - {Outcome.UNKNOWN.value}
_ALIASES = {"delivered": "success", "connection": Outcome.CONNECTION_ERROR.value}


@dataclass(frozen=True, slots=True)
class StatusSelector:
    """Which attempts a status filter selects: ``success`` (or ``delivered``), ``failed``
    (every attempt that did not succeed, deferrals aside), ``deferred``, an outcome
    (``timeout``, ``connection_error`` or ``connection``, …), a class (``5xx``) or a
    status (``404``). The delivery history applies it to each attempt, the dead-letter
    tools to a dead letter's last attempt."""

    wanted: str

    @classmethod
    def parse(cls, text: str, *, field: str = "status") -> StatusSelector:
        wanted = text.strip().lower()
        wanted = _ALIASES.get(wanted, wanted)
        if wanted in ("success", "failed", "deferred") or wanted in _OUTCOMES or re.fullmatch(r"[1-5]xx|\d{3}", wanted):
            return cls(wanted)
        raise InputError(
            f"{field} {text!r} is not one of success, failed, deferred, an outcome (http_error, timeout, "
            "connection_error, blocked, …), a class such as 5xx or a code such as 404",
            field=field,
        )

    def admits(self, attempt: Attempt) -> bool:
        wanted, outcome = self.wanted, attempt.outcome
        if wanted == "success":
            return outcome is Outcome.SUCCESS
        if wanted == "failed":
            return outcome not in (Outcome.SUCCESS, Outcome.DEFERRED)
        if wanted in _OUTCOMES:
            return outcome.value == wanted
        status = attempt.status
        if status is None:
            return False
        if wanted.endswith("xx"):
            return 100 <= status <= 599 and status // 100 == int(wanted[0])
        return status == int(wanted)

    def __str__(self) -> str:
        return self.wanted
