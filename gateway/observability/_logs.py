"""Structured logs: one event per line, ``key=value`` pairs (or JSON with
``GATEWAY_LOG_FORMAT=json``).

Each module logs under a stable name (``gateway.dispatcher``, ``gateway.consumer``, …),
not its module path: log filters and dashboards keep working when code moves.

Call sites log an event name and its fields. Fields that hold for a whole piece of work
(the event and endpoint ids of a delivery) are bound once: ``log = bind(logger,
event_id=..., endpoint_id=...)``, then ``log.info("retry scheduled", extra={"next_tier":
...})``. Signing secrets are never passed.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any

from ..config import read_setting

__all__ = ["BoundLogger", "JsonFormatter", "KeyValueFormatter", "Log", "bind", "configure_logging"]

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, object]:
    fields: dict[str, object] = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        + f".{int(record.msecs):03d}Z",
        "level": record.levelname.lower(),
        "logger": record.name,
        "event": record.getMessage(),
    }
    fields.update((k, v) for k, v in record.__dict__.items() if k not in _STANDARD)
    if record.exc_info:
        fields["error"] = logging.Formatter().formatException(record.exc_info)
    return fields


def _quote(value: object) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\n\t'):
        return text
    return json.dumps(text)


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_quote(v)}" for k, v in _fields(record).items())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record), default=str)


def configure_logging(level: str | None = None, *, default: str = "WARNING", log_format: str | None = None) -> None:
    """Log to stderr at ``level`` (else ``GATEWAY_LOG_LEVEL``, else ``default``), as
    ``log_format`` (else ``GATEWAY_LOG_FORMAT``, else text). A bad value of either variable
    is a :class:`~gateway.errors.ConfigError` naming it."""
    handler = logging.StreamHandler(sys.stderr)
    as_json = (log_format or read_setting("log_format") or "text") == "json"
    handler.setFormatter(JsonFormatter() if as_json else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or read_setting("log_level") or default).upper())
    # One line per request at INFO would drown the gateway's own events.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


class BoundLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger that adds the fields it was bound with to every line, and keeps the
    ``extra`` of each call too (the standard adapter drops those)."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = kwargs.get("extra")
        kwargs["extra"] = dict(self.extra or {}, **extra) if extra else self.extra
        return msg, kwargs

    def bind(self, **fields: object) -> BoundLogger:
        """This logger's fields and ``fields``."""
        return BoundLogger(self.logger, dict(self.extra or {}, **fields))


def bind(logger: logging.Logger, **fields: object) -> BoundLogger:
    """``logger`` with ``fields`` (event id, endpoint id, tier…) on every line it writes."""
    return BoundLogger(logger, fields)


Log = logging.Logger | BoundLogger
"""What a function that logs for its caller accepts: a plain or a bound logger."""
