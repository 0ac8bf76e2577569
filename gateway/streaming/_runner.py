"""One gateway process: the endpoint table, the tier workers, the sender, the producer, and
an orderly shutdown on SIGTERM or SIGINT.

Start order matters: the endpoint table is loaded to the end of its topic before any
worker subscribes, so no event is routed against a partial table. Stop order too: the
workers drain and commit first, then the producer flushes, then the HTTP clients close.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._metadata import TopicMetadata

from ..codec import Codec
from ..config import Config
from ..delivery import CircuitChange, Dispatcher, Ownership, Sender
from ..errors import RegistryUnavailable, Unavailable
from ..observability import ENDPOINTS_LOADED, Health, Metrics, assigned, serve_metrics
from ..records import CIRCUIT_SCHEMA, Circuit, Endpoint
from ..store import AckedProducer, EndpointRegistry, EndpointTable, Tier, Topics, cluster_metadata
from ._capacity import Capacity
from ._readers import TierReaders
from ._session import settle_session
from ._statistics import ClusterContact
from ._worker import TierWorker

__all__ = [
    "GC_YOUNG_THRESHOLD", "CircuitReporter", "Observed", "flow_control", "metrics_for", "observe", "resolve_tiers",
    "run", "serve", "tier_workers",
]

log = logging.getLogger("gateway.runner")

GC_YOUNG_THRESHOLD = 10_000
"""Objects allocated (less those freed) between two young collections in a worker."""


def resolve_tiers(config: Config, names: Sequence[str] | None) -> list[Tier]:
    """The tiers named (``events``, ``retry-1m``, …; ``all`` or nothing for every tier),
    and the deliveries topic whatever the names: every process takes its share of the
    endpoints to own (:class:`~gateway.delivery.Ownership`), or the deliveries
    forwarded to the endpoints it would own would wait for another."""
    topics = Topics.from_config(config)
    if not names or list(names) == ["all"]:
        return list(topics.worker_tiers)
    chosen = [topics.tier(name) for name in dict.fromkeys(names)]
    owner = topics.deliveries_tier
    return chosen if owner in chosen else [*chosen, owner]


def _check_topics(config: Config, tiers: Sequence[Tier], existing: Mapping[str, TopicMetadata]) -> int:
    """Refuse to start without the topics this process reads or may write (``existing``:
    the cluster's, by name); returns the deliveries topic's partition count (what an
    endpoint's owner is derived from)."""
    topics = Topics.from_config(config)
    wanted = {t.topic for t in tiers} | {topics.dlq, topics.endpoints, topics.deliveries}
    wanted |= {t.topic for t in topics.deferral_tiers}  # any worker may put a delivery off
    if config.record_attempts:
        wanted.add(topics.attempts)
    schedule = [t.index for t in tiers if not t.routes]
    wanted |= {t.topic for t in topics.tiers if t.index > min(schedule, default=0)}
    missing = sorted(wanted - set(existing))
    if missing:
        raise Unavailable(
            f"topics missing on {config.bootstrap_servers}: {', '.join(missing)}; "
            "run `gateway topics create` with the same prefix and retry delays"
        )
    return len(existing[topics.deliveries].partitions)


class CircuitReporter:
    """Writes every circuit breaker change of this process to the circuits topic (what
    `endpoints list` shows). Reporting never holds up a delivery: each write is a task of
    its own."""

    def __init__(self, config: Config, codec: Codec, producer: AckedProducer) -> None:
        self.topic = Topics.from_config(config).circuits
        self.codec = codec
        self.producer = producer
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self._writes: set[asyncio.Task[None]] = set()

    def report(self, endpoint: Endpoint, change: CircuitChange) -> None:
        now = time.time_ns() // 1_000_000
        probe_at = now + int(change.reopen_in * 1000) if change.reopen_in is not None else None
        circuit = Circuit(endpoint.id, change.state, change.failures, now, probe_at, self.worker)
        value = self.codec.encode(CIRCUIT_SCHEMA, circuit.to_record(), topic=self.topic)
        task = asyncio.get_running_loop().create_task(
            self.producer.send(self.topic, endpoint.id.encode(), value, []))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def drain(self, grace: float) -> None:
        """Let the writes under way finish (up to ``grace`` seconds): stopping."""
        if self._writes:
            await asyncio.wait(self._writes, timeout=grace)


async def _register_schemas(codec: Codec, stop: asyncio.Event) -> None:
    """With a schema registry: register the schemas this process writes before it
    delivers anything, retrying while the registry is away (the process is not ready
    meanwhile), so that no write has to wait for the registry later."""
    wait = 0.5
    while not stop.is_set():
        try:
            await asyncio.to_thread(codec.register_schemas)
            return
        except RegistryUnavailable as exc:
            log.warning("schema registry unavailable; not starting the workers yet",
                        extra={"error": str(exc), "retry_in_s": wait})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
            wait = min(wait * 2, 30.0)


def metrics_for(config: Config, health: Health | None = None) -> Metrics:
    """The metrics of a process of ``config``, every known series at zero."""
    topics = Topics.from_config(config)
    return Metrics([t.name for t in topics.tiers],
                   deferrals=[topics.deliveries_tier.name, *(t.name for t in topics.deferral_tiers)],
                   rungs=[t.name for t in topics.deferral_tiers], health=health)


def _count_endpoints(metrics: Metrics) -> Callable[[EndpointTable], None]:
    def count(table: EndpointTable) -> None:
        enabled, disabled = table.counts()
        metrics.endpoints.labels("enabled").set(enabled)
        metrics.endpoints.labels("disabled").set(disabled)

    return count


def flow_control(
    config: Config,
    tiers: Sequence[Tier],
    loop: asyncio.AbstractEventLoop,
    *,
    on_circuit: Callable[[Endpoint, CircuitChange], None] | None = None,
    registered: Callable[[str], bool] | None = None,
) -> tuple[Capacity, Sender]:
    """The process's in-flight budget over ``tiers`` and its HTTP sender, wired together:
    endpoints' shares shrink only while records wait for room in the budget, and are
    judged at once when a consumer finds none (not at the sender's next tick)."""
    capacity = Capacity(config.concurrency, [t.name for t in tiers])
    sender = Sender(config, on_circuit=on_circuit, contended=capacity.contended, registered=registered)
    capacity.on_short = _judge_soon(loop, sender)
    return capacity, sender


def _judge_soon(loop: asyncio.AbstractEventLoop, sender: Sender) -> Callable[[], None]:
    """What a consumer thread calls when its records wait for room: the sender judges the
    shares on the event loop (one wake-up while a judgement is pending, not one a claim)."""

    def on_short() -> None:
        if sender.judging_soon:  # (read across threads: a stale read costs one more wake-up)
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: the process is stopping
            loop.call_soon_threadsafe(sender.judge_soon)

    return on_short


def tier_workers(
    config: Config,
    tiers: Sequence[Tier],
    dispatcher: Dispatcher,
    capacity: Capacity,
    loop: asyncio.AbstractEventLoop,
    *,
    metrics: Metrics,
    health: Health,
    ownership: Ownership,
) -> list[TierWorker]:
    """The process's workers, one a tier, wired as :func:`serve` runs them: one
    dispatcher and one in-flight budget for all; the endpoints owned here follow the
    deliveries tier's partitions; and each tier's consumer is judged stuck by what the
    process's other consumers reach too (one :class:`ClusterContact`), so one left hunting
    for a coordinator while the cluster answers the others is replaced."""
    contact = ClusterContact()
    return [TierWorker(tier, config, dispatcher, capacity, loop, metrics=metrics, health=health,
                       ownership=ownership if tier.owner else None, contact=contact)
            for tier in tiers]


async def serve(
    config: Config,
    tiers: Sequence[Tier],
    stop: asyncio.Event,
    *,
    metrics: Metrics | None = None,
    health: Health | None = None,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Run the workers of ``tiers`` until ``stop`` is set; then drain, commit and return.

    ``metrics`` and ``health`` are what the process serves on its metrics port (made here
    when not given)."""
    loop = asyncio.get_running_loop()
    health = health or Health()
    metrics = metrics or metrics_for(config, health)
    health.expect([ENDPOINTS_LOADED, *(assigned(t.name) for t in tiers)])
    admin = AdminClient(config.kafka_common())
    metadata = await asyncio.to_thread(functools.partial(cluster_metadata, admin, config, timeout=15))
    config = await asyncio.to_thread(functools.partial(settle_session, config, cluster=(admin, metadata)))
    partitions = _check_topics(config, tiers, metadata.topics)
    codec = Codec(config.schema_registry_url)
    await _register_schemas(codec, stop)
    registry = EndpointRegistry(config, codec=codec, on_change=_count_endpoints(metrics))
    await asyncio.to_thread(registry.start)
    health.met(ENDPOINTS_LOADED)
    producer = AckedProducer(config, loop)
    circuits = CircuitReporter(config, codec, producer)
    table = registry.table
    capacity, sender = flow_control(config, tiers, loop, on_circuit=circuits.report,
                                    registered=lambda endpoint_id: table.get(endpoint_id) is not None)
    metrics.count_circuits(sender.circuit_counts)
    # A disabled endpoint's circuit stays open (nothing probes it): not one to alert on.
    metrics.time_open_circuits(lambda: sender.oldest_open_circuit(
        lambda endpoint_id: (endpoint := table.get(endpoint_id)) is not None and endpoint.enabled))
    ownership = Ownership(partitions)
    dispatcher = Dispatcher(config, codec=codec, endpoints=table, sender=sender,
                            producer=producer, metrics=metrics, ownership=ownership)
    workers = tier_workers(config, tiers, dispatcher, capacity, loop, metrics=metrics, health=health,
                           ownership=ownership)
    # What exists now lives as long as the process (modules, the endpoint table): out of
    # the collector's sight, a full collection no longer walks it each time. Measured in
    # a 30,000-event burst: full collections held the loop 37 to 80 ms, 25 to 28 ms after.
    gc.collect()  # (what is garbage already is not kept for good)
    gc.freeze()
    # A record in flight holds a few dozen objects (its job, task, coroutines, futures)
    # for as long as it takes: at Python's default threshold (700) they outlive young
    # collections, get promoted and make older ones run. Measured in a 20,000-event
    # burst: 580 to 610 young, 52 to 54 middle and 5 full collections, 276 to 412 ms,
    # 14 to 21 µs a delivery; at 10,000: 11 or 12 young ones, no other, under 1 µs a
    # delivery. Garbage in cycles waits a little longer for its collection (at most
    # 10,000 objects more).
    gc.set_threshold(GC_YOUNG_THRESHOLD)
    for worker in workers:
        worker.start()
    readers = TierReaders(config, tiers, metrics.tier_readers)
    watching = loop.create_task(readers.watch(stop, config.reader_check))
    log.info("workers started", extra={"tiers": ",".join(t.name for t in tiers),
                                       "bootstrap": config.bootstrap_servers})
    try:
        if on_ready is not None:
            on_ready()
        await stop.wait()
    finally:
        health.stopping()
        log.info("stopping: draining in-flight deliveries",
                 extra={"timeout_s": config.shutdown_timeout})
        # Draining is bounded by shutdown_timeout; closing the consumers (leave the group,
        # final commit) gets a little more. A broker that is gone cannot make us hang.
        bound = config.shutdown_timeout + 10
        try:
            await asyncio.wait_for(asyncio.gather(*(w.stop() for w in workers)), bound)
            await circuits.drain(5)
            await asyncio.wait_for(asyncio.to_thread(producer.close), 15)
        except TimeoutError:
            raise Unavailable(
                f"shutdown did not finish within {bound:g} s (is the broker reachable?); "
                "uncommitted records will be delivered again after a restart"
            ) from None
        finally:
            watching.cancel()
            await sender.aclose()
            registry.stop()
        log.info("stopped")


@dataclass(frozen=True)
class Observed:
    """What a process reports about itself: its metrics and its health, served on its
    metrics port."""

    metrics: Metrics
    health: Health


def observe(config: Config, *, port: int | None) -> Observed:
    """Make the process's metrics and health, and serve them on ``port`` (not served
    when None). Raises :class:`~gateway.errors.Unavailable` naming the port when it cannot be bound."""
    health = Health()
    metrics = metrics_for(config, health)
    if port is not None:
        try:
            serve_metrics(metrics, health, port)
        except OSError as exc:
            raise Unavailable(f"metrics port {port}: {exc.strerror or exc}; stop what listens there or "
                              "choose another port (--metrics-port)") from None
    return Observed(metrics, health)


def run(
    config: Config,
    tiers: Sequence[Tier],
    *,
    observed: Observed | None = None,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Run until SIGTERM or SIGINT, then shut down in order. Blocks."""
    observed = observed or observe(config, port=None)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve(config, tiers, stop, metrics=observed.metrics, health=observed.health, on_ready=on_ready)

    asyncio.run(main())
