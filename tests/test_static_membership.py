"""Static group membership (``GATEWAY_INSTANCE_ID``): a worker killed with SIGKILL and
started again under the same name takes its partitions back at once, not after the
consumer session; a second process under a name already in use fences the first, which
says so and stops consuming.

Apache Kafka only: the bundled broker fails with ``group.instance.id``
(../shared/reference/tansu.md), and `gateway up` refuses the setting with it.

Without the name, the restarted worker is a new member: the killed one keeps its
partitions until its session (30 s here, set) expires, so nothing can arrive in
the first 15 s after the restart that the bound below asks for."""

from __future__ import annotations

import time
from typing import Any

import pytest

from gateway.config import Config
from gateway.store import Topics
from gateway.streaming import consumer_settings, worker_config

from .receiver import Receiver
from .test_delivery import BOT, publish, register
from .test_fairness import _events

SESSION_MS = 30_000


def test_a_named_worker_joins_its_groups_as_a_static_member() -> None:
    config = Config(bootstrap_servers="127.0.0.1:9")
    events = Topics.from_config(config).worker_tiers[0]
    assert "group.instance.id" not in consumer_settings(config, events)
    named = config.replace(instance_id="gw-0")
    assert consumer_settings(named, events)["group.instance.id"] == "gw-0"


def test_a_supervisors_workers_get_a_name_each_the_same_after_a_restart() -> None:
    config = Config(bootstrap_servers="127.0.0.1:9", instance_id="gw")
    assert [worker_config(config, i).instance_id for i in (0, 1, 0)] == ["gw-0", "gw-1", "gw-0"]
    assert [worker_config(config, i).metrics_port for i in (0, 1)] == [config.metrics_port, config.metrics_port + 1]
    assert worker_config(config.replace(instance_id=None), 1).instance_id is None


def named_worker(topics: Config, receiver: Receiver, worker_factory: Any, name: str,
                 session_ms: int) -> tuple[Config, Any]:
    """A configuration with ``session_ms``, an endpoint on ``receiver``, and a worker
    started under ``name`` (assigned)."""
    config = topics.replace(session_timeout_ms=session_ms)
    register(config, receiver.url("/hook"))
    return config, worker_factory(config, "--instance-id", name)


@pytest.mark.integration
@pytest.mark.brokers("kafka")
@pytest.mark.timeout(180)
def test_a_worker_killed_and_restarted_under_its_name_resumes_before_its_session_ends(
    topics: Config, receiver: Receiver, worker_factory: Any
) -> None:
    config, worker = named_worker(topics, receiver, worker_factory, "gw-a", SESSION_MS)
    ids = publish(config, _events(BOT, 1500))
    receiver.wait_for(lambda: len(receiver.at("/hook")) >= 200, 60, "200 deliveries")
    worker.kill()
    restarted = time.monotonic()
    worker_factory(config, "--instance-id", "gw-a", wait_assigned=False)
    receiver.wait_for(lambda: {r.event_id for r in receiver.at("/hook")} >= set(ids), 120, "every event")
    last = max(r.at for r in receiver.at("/hook"))
    after = time.monotonic() - restarted - (time.time() - last)
    print(f"\nstatic member: the last event {after:.1f} s after the restart (session {SESSION_MS / 1000:.0f} s)")
    assert after < SESSION_MS / 2000, f"the last event came {after:.1f} s after the restart: the session was waited out"


@pytest.mark.integration
@pytest.mark.brokers("kafka")
@pytest.mark.timeout(180)
def test_a_second_worker_under_the_same_name_fences_the_first_which_says_so(
    topics: Config, receiver: Receiver, worker_factory: Any
) -> None:
    config, first = named_worker(topics, receiver, worker_factory, "gw-b", 6000)
    second = worker_factory(config, "--instance-id", "gw-b", wait_assigned=False)
    receiver.wait_for(lambda: "consumer loop failed" in first.text(), 60, "the first worker fenced")
    # librdkafka's own words, not the gateway's hint
    assert "Static consumer fenced by other consumer" in first.text(), first.text()[-3000:]
    ids = publish(config, _events(BOT, 50))
    receiver.wait_for(lambda: {r.event_id for r in receiver.at("/hook")} >= set(ids), 60,
                      "every event, delivered by the second worker")
    assert second.process is not None and second.process.poll() is None
