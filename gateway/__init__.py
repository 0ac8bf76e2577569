"""A Kafka-based streaming webhook gateway.

Producers: :class:`Publisher` (or :func:`publish`) validates the platform's documented
events and publishes them as Avro. Everything else is the ``gateway`` command line.
"""

from .config import Config, ConfigError
from .events import Event, EventType, InvalidEvent, parse_event
from .publisher import Publisher, PublishError, publish

__all__ = [
    "Config",
    "ConfigError",
    "Event",
    "EventType",
    "InvalidEvent",
    "PublishError",
    "Publisher",
    "parse_event",
    "publish",
]
