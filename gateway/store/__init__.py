"""Kafka, the gateway's only store: its topics and what reads and writes them.

Every other package sits above this one; it is where the delivery side and the streaming
side meet Kafka, so neither has to import the other to name a topic or write a record.

* ``_topics``: the one place that names topics, and the tiers workers consume.
* ``_admin``: creating the topics with the settings each needs (``gateway topics create``).
* ``_io``: the acknowledged producer; reading a topic to its end, or from a time, and
  following it.
* ``_headers``: the plain headers of retry, deferral and dead-letter records.
* ``_registry``: the endpoint registry (the endpoints topic as a table every worker routes
  by) and the circuits topic read back.

The modules are private: import from ``gateway.store``.
"""

from ._admin import (
    DAY_MS,
    TopicSpec,
    TopicsPlan,
    TopicStatus,
    cluster_metadata,
    create_topics,
    plan_replication,
    topic_specs,
)
from ._headers import Headers, dead_letter_headers, delivery_headers, due_at_of, record_header
from ._io import AckedProducer, TopicFollower, offsets_at, read_to_end, reader_consumer
from ._registry import (
    EndpointRegistry,
    EndpointTable,
    delete_endpoint,
    load_circuits,
    load_endpoints,
    save_endpoint,
)
from ._topics import Tier, Topics, delay_label, endpoint_partition

__all__ = [
    "DAY_MS",
    "AckedProducer",
    "EndpointRegistry",
    "EndpointTable",
    "Headers",
    "Tier",
    "TopicFollower",
    "TopicSpec",
    "TopicStatus",
    "Topics",
    "TopicsPlan",
    "cluster_metadata",
    "create_topics",
    "dead_letter_headers",
    "delay_label",
    "delete_endpoint",
    "delivery_headers",
    "due_at_of",
    "endpoint_partition",
    "load_circuits",
    "load_endpoints",
    "offsets_at",
    "plan_replication",
    "read_to_end",
    "reader_consumer",
    "record_header",
    "save_endpoint",
    "topic_specs",
]
