"""``gateway up``: the embedded default, assembled in one process tree.

A broker on 127.0.0.1 (unless a Kafka is named: ``--bootstrap`` or
``GATEWAY_BOOTSTRAP_SERVERS``), the topics, every tier's workers, ``/metrics``, and the
management API on a thread (unless told not to). The broker is the bundled in-memory one
(a restart forgets every endpoint and dead letter), or, given a data directory, Apache
Kafka from its jars with its log there (a restart on the same directory finds them all).
``up`` has defaults of its own, under whatever the user sets: deliveries to loopback and
private addresses are allowed (the demo receiver is on 127.0.0.1), and the topics of the
broker it starts get 3 partitions.

Stop order: the workers drain and commit, then the API lets its tables go, then the
broker stops (SIGTERM, and a wait: Apache Kafka closes its log cleanly). What ``up``
prints (the banner, the walk-through) is the command line's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import store, streaming
from .api import ApiThread, Listening, start_thread
from .config import Config, given_settings
from .errors import InputError
from .store import Tier

__all__ = ["Started", "up"]


@dataclass(frozen=True)
class Started:
    """What ``gateway up`` runs, once its workers are ready."""

    config: Config
    bundled_broker: bool
    """The bundled in-memory broker (a restart forgets everything), not a Kafka of the user's."""
    data: Path | None
    """The data directory of the Apache Kafka ``up`` runs (a restart on it forgets nothing);
    None with the bundled broker or a Kafka of the user's."""
    topics: tuple[str, ...]
    tiers: tuple[Tier, ...]
    api: Listening | None
    """Where the API answers; None when it is off or its address was taken."""


def up(
    overrides: Mapping[str, Any],
    *,
    broker_port: int,
    api: bool,
    on_ready: Callable[[Started], None],
    on_warning: Callable[[str], None],
    data: Path | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> None:
    """Run everything until SIGTERM or SIGINT, then stop it in order. ``overrides`` are the
    settings given as flags (parsed; None for those not given). With ``data``, the broker
    is Apache Kafka with its log in that directory (``on_progress`` hears of its first
    jar fetch and format), else the bundled in-memory one. Blocks."""
    given = given_settings(overrides=overrides)
    if data is not None and "bootstrap_servers" in given:
        raise InputError("--data runs a broker of its own; it cannot be combined with --bootstrap or "
                         "GATEWAY_BOOTSTRAP_SERVERS, which name a Kafka already running", field="data")
    defaults: dict[str, Any] = {"allow_private_networks": True}
    fixed: dict[str, Any] = {}
    broker: streaming.Broker | streaming.KafkaNode | None = None
    thread: ApiThread | None = None
    try:
        if "bootstrap_servers" not in given:
            if data is None:
                broker = streaming.Broker(port=broker_port)
            else:
                broker = streaming.KafkaNode(data, port=broker_port, on_progress=on_progress)
            broker.start()
            fixed["bootstrap_servers"] = broker.bootstrap
            defaults["partitions"] = 3
        config = Config.from_env(defaults=defaults, **{**overrides, **fixed})
        if isinstance(broker, streaming.Broker) and config.instance_id is not None:
            raise InputError("the bundled broker does not support static group membership "
                             "(GATEWAY_INSTANCE_ID); use it with Apache Kafka (--data, or --bootstrap)",
                             field="instance_id")
        created = store.create_topics(config)
        observed = streaming.observe(config, port=config.metrics_port)
        tiers = streaming.resolve_tiers(config, None)
        listening = None
        if api:
            started = start_thread(config, on_address_taken=lambda why: on_warning(f"API not served: {why}"))
            if started is not None:
                thread, listening = started
        ready = Started(config, isinstance(broker, streaming.Broker),
                        broker.root if isinstance(broker, streaming.KafkaNode) else None,
                        tuple(s.topic for s in created), tuple(tiers), listening)
        streaming.run(config, tiers, observed=observed, on_ready=lambda: on_ready(ready))
    finally:
        if thread is not None:
            thread.stop()
        if broker is not None:
            broker.stop()
