"""Records through Kafka, inside a process and across processes: the consumer side.

* ``_consumer``: the consumer pump, the one thread that calls a tier's Kafka consumer;
  the rebalance contract.
* ``_worker``: a tier's worker on the event loop: its partitions, timers and tasks; the
  offset contract.
* ``_partitions``: pure: one partition's held records, its pause and its revoke.
* ``_offsets``: pure: which offset of a partition may be committed.
* ``_capacity``: the process's in-flight budget, shared fairly between tiers.
* ``_statistics``: librdkafka's statistics: consumer lag, and a consumer out of its group.
* ``_runner``: one process's workers: startup order, metrics, orderly shutdown.
* ``_session``: the consumer session a worker chooses from the cluster when none is set.
* ``_supervisor``: ``gateway run --workers N``: N worker processes, restarted when one dies.
* ``_broker``: the bundled broker (Tansu) as a child process.
* ``_kafka``: Apache Kafka from its jars as a child process (``--data DIR``, the tests' broker).

The modules are private: import from ``gateway.streaming``.
"""

from ._broker import Broker, broker_binary, die_with_parent, port_in_use
from ._capacity import Capacity, fair_room
from ._consumer import (
    BATCH,
    REFILL_PARTS,
    Command,
    ConsumerLike,
    ConsumerPump,
    Key,
    PartitionOwner,
    Pause,
    Renewal,
    Resume,
    in_turns,
)
from ._kafka import KafkaNode, broker_properties, find_java, jar_cache, kafka_jars, kafka_version, new_cluster_id
from ._offsets import OffsetTracker
from ._partitions import HOLD_LIMIT, PartitionState
from ._readers import TierReaders
from ._runner import (
    GC_YOUNG_THRESHOLD,
    CircuitReporter,
    Observed,
    flow_control,
    metrics_for,
    observe,
    resolve_tiers,
    run,
    serve,
    tier_workers,
)
from ._session import Session, brokers_in, session_for, session_ms, settle_session
from ._statistics import (
    GROUP_WARN_AFTER,
    LAG_INTERVAL_MS,
    ClusterContact,
    ConsumerLag,
    GroupWatch,
    lag_from_stats,
    read_statistics,
)
from ._supervisor import supervise, worker_config
from ._worker import SCHEMA_RETRY_MAX, TierWorker, consumer_settings, coordinator_bound, rejoin_bound

__all__ = [
    "BATCH",
    "GC_YOUNG_THRESHOLD",
    "GROUP_WARN_AFTER",
    "HOLD_LIMIT",
    "LAG_INTERVAL_MS",
    "REFILL_PARTS",
    "SCHEMA_RETRY_MAX",
    "Broker",
    "Capacity",
    "CircuitReporter",
    "ClusterContact",
    "Command",
    "ConsumerLag",
    "ConsumerLike",
    "ConsumerPump",
    "GroupWatch",
    "KafkaNode",
    "Key",
    "Observed",
    "OffsetTracker",
    "PartitionOwner",
    "PartitionState",
    "Pause",
    "Renewal",
    "Resume",
    "Session",
    "TierReaders",
    "TierWorker",
    "broker_binary",
    "broker_properties",
    "brokers_in",
    "consumer_settings",
    "coordinator_bound",
    "die_with_parent",
    "fair_room",
    "find_java",
    "flow_control",
    "in_turns",
    "jar_cache",
    "kafka_jars",
    "kafka_version",
    "lag_from_stats",
    "metrics_for",
    "new_cluster_id",
    "observe",
    "port_in_use",
    "read_statistics",
    "rejoin_bound",
    "resolve_tiers",
    "run",
    "serve",
    "session_for",
    "session_ms",
    "settle_session",
    "supervise",
    "tier_workers",
    "worker_config",
]
