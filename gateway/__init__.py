"""A Kafka-based streaming webhook gateway.

Producers: :class:`Publisher` (or :func:`publish`) validates the platform's documented
events and publishes them as Avro. Receivers: :func:`verify` checks a webhook's
signature. Everything else is the ``gateway`` command line, over the packages below.

The tree, from the bottom up (a package only imports those below it)::

    config, errors, clock, events, records, codec, signing, verify   the shared vocabulary
    store/          Kafka, the only store: topics, producer, readers, the endpoint registry
    observability/  logs, metrics, health
    delivery/       one delivery: dispatcher, retry, flow, sender, pool, transport, SSRF guard
    streaming/      consumers, workers, partitions, offsets, the process, the bundled broker
    ops/            the operations layer the CLI, the API and the page call
    api/            the HTTP management API
    publisher, embedded, cli                                         the faces
"""

from .config import Config
from .errors import ConfigError, GatewayError, InvalidEvent, PublishError, WebhookVerificationError
from .events import Event, EventType, parse_event
from .publisher import Publisher, publish
from .verify import verify

__all__ = [
    "Config",
    "ConfigError",
    "Event",
    "EventType",
    "GatewayError",
    "InvalidEvent",
    "PublishError",
    "Publisher",
    "WebhookVerificationError",
    "parse_event",
    "publish",
    "verify",
]
