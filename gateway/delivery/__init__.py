"""One delivery: what happens to a record, the HTTP attempt, and what follows it.

* ``_dispatcher``: what happens to one record of the events topic or of a retry tier:
  fan-out, the attempt, and carrying out what follows it.
* ``_retry``: pure: the retry schedule, and what follows an attempt (:func:`decide`).
* ``_flow``: pure: rate limits, circuit breakers, the deferral ladder.
* ``_sender``: the signed POST and how it ended (its outcome, decided once).
* ``_pool``: each endpoint's share of a process: its connections up to its in-flight cap,
  the deliveries waiting for one, its rate limit and its circuit breaker.
* ``_transport``: one HTTP/1.1 connection (an httpx transport of our own).
* ``_destinations``: the SSRF guard (which addresses deliveries may reach) and the
  per-domain caps on name lookups.

The modules are private: import from ``gateway.delivery``.
"""

from ._destinations import (
    BLOCKED_PREFIX,
    DOMAIN_QUEUE_LIMIT,
    LOOKUPS_PER_DOMAIN,
    RESOLVER_THREADS,
    Address,
    DestinationPolicy,
    Network,
    registrable_domain,
)
from ._dispatcher import MIN_DEFERRAL, SCHEDULE_HEADER, BadRecord, Dispatcher, Job, Pending, RecordWriter
from ._flow import (
    FAILURE_WINDOW,
    Admission,
    CircuitBreaker,
    CircuitChange,
    Deferral,
    ReturnSchedule,
    SendWindow,
    TokenBucket,
    breaker_verdict,
    deferral_rung,
)
from ._pool import UNTIMED_SECONDS, USER_AGENT, EndpointPool
from ._retry import Decision, Delivered, GiveUp, Retry, Step, decide, first_delivery, is_due, next_step
from ._routing import Ownership
from ._sender import (
    ALONE_WAITS,
    JUDGE_GAP,
    MAX_OPEN_SECONDS,
    MIN_PROBE_WAIT,
    SHED_SLICE,
    SNIPPET_CHARS,
    Sender,
    Signing,
    parse_retry_after,
)
from ._transport import KEEPALIVE_EXPIRY, MAX_HEAD_BYTES, Answer, Connection, check_header, destination, head, head_of

__all__ = [
    "ALONE_WAITS",
    "BLOCKED_PREFIX",
    "DOMAIN_QUEUE_LIMIT",
    "FAILURE_WINDOW",
    "JUDGE_GAP",
    "KEEPALIVE_EXPIRY",
    "LOOKUPS_PER_DOMAIN",
    "MAX_HEAD_BYTES",
    "MAX_OPEN_SECONDS",
    "MIN_DEFERRAL",
    "MIN_PROBE_WAIT",
    "RESOLVER_THREADS",
    "SCHEDULE_HEADER",
    "SHED_SLICE",
    "SNIPPET_CHARS",
    "UNTIMED_SECONDS",
    "USER_AGENT",
    "Address",
    "Admission",
    "Answer",
    "BadRecord",
    "CircuitBreaker",
    "CircuitChange",
    "Connection",
    "Decision",
    "Deferral",
    "Delivered",
    "DestinationPolicy",
    "Dispatcher",
    "EndpointPool",
    "GiveUp",
    "Job",
    "Network",
    "Ownership",
    "Pending",
    "RecordWriter",
    "Retry",
    "ReturnSchedule",
    "SendWindow",
    "Sender",
    "Signing",
    "Step",
    "TokenBucket",
    "breaker_verdict",
    "check_header",
    "decide",
    "deferral_rung",
    "destination",
    "first_delivery",
    "head",
    "head_of",
    "is_due",
    "next_step",
    "parse_retry_after",
    "registrable_domain",
]
