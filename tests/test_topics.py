"""`gateway topics create`: production settings per topic (pure), and what a real cluster
gets (integration)."""

from __future__ import annotations

import pytest
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._config import ConfigResource
from confluent_kafka.admin._resource import ResourceType

from gateway.config import Config
from gateway.store import DAY_MS, Topics, plan_replication, topic_specs

from .conftest import run_gateway


def test_replication_is_three_copies_or_one_per_broker_below_that() -> None:
    assert plan_replication(None, 5).replication_factor == 3
    assert plan_replication(None, 3) == plan_replication(None, 3)
    assert plan_replication(None, 3).warnings == ()
    small = plan_replication(None, 1)
    assert small.replication_factor == 1 and "not for production" in small.warnings[0]


def test_asking_for_more_copies_than_brokers_is_warned_about() -> None:
    plan = plan_replication(3, 1)
    assert plan.replication_factor == 3
    assert plan.warnings == ("--replication-factor 3 asks for more copies than the cluster's 1 broker: "
                             "Kafka refuses to create such topics",)
    assert plan_replication(2, 3).warnings == ()


@pytest.mark.parametrize(("replicas", "isr"), [(1, "1"), (2, "1"), (3, "2"), (5, "2")])
def test_min_insync_replicas_leaves_one_broker_to_lose(replicas: int, isr: str) -> None:
    assert {s.settings["min.insync.replicas"] for s in topic_specs(Config(), replicas)} == {isr}


def test_retry_tiers_keep_records_far_longer_than_their_delay() -> None:
    config = Config(retry_delays=(60, 300, 900, 3 * 86400))
    specs = {s.name: s for s in topic_specs(config, 3)}
    for tier in Topics.from_config(config).tiers[1:]:
        retention = int(specs[tier.topic].settings["retention.ms"])
        assert retention >= 7 * DAY_MS and retention >= 10 * tier.delay * 1000, tier.name
    topics = Topics.from_config(config)
    assert specs[topics.endpoints].settings["cleanup.policy"] == "compact"
    assert "retention.ms" not in specs[topics.endpoints].settings  # registrations never expire
    assert specs[topics.dlq_replays].settings["cleanup.policy"] == "compact,delete"
    assert specs[topics.dlq_replays].settings["retention.ms"] == specs[topics.dlq].settings["retention.ms"]
    assert set(specs) == set(topics.all())


@pytest.mark.integration
def test_topics_create_makes_and_then_checks_every_topic(config: Config) -> None:
    created = run_gateway(config, "topics", "create")
    assert created.returncode == 0, created.stderr
    names = Topics.from_config(config).all()
    assert [line.split()[-1] for line in created.stdout.splitlines()] == list(names)
    assert all(line.startswith("created") for line in created.stdout.splitlines())
    assert "1 broker" in created.stderr and "not for production" in created.stderr
    again = run_gateway(config, "topics", "create")
    assert again.returncode == 0 and all(line.startswith("exists") for line in again.stdout.splitlines())
    admin = AdminClient({"bootstrap.servers": config.bootstrap_servers})
    topics = Topics.from_config(config)
    resource = ConfigResource(ResourceType.TOPIC, topics.endpoints)
    described = admin.describe_configs([resource])[resource].result(10)
    assert described["cleanup.policy"].value == "compact"


@pytest.mark.integration
def test_an_existing_topic_that_differs_is_reported(config: Config, broker_kind: str) -> None:
    admin = AdminClient({"bootstrap.servers": config.bootstrap_servers})
    from confluent_kafka.cimpl import NewTopic

    endpoints = Topics.from_config(config).endpoints
    admin.create_topics([NewTopic(endpoints, num_partitions=1, replication_factor=1)])[endpoints].result(10)
    result = run_gateway(config, "topics", "create")
    assert result.returncode == 0, result.stderr
    assert f"warning: {endpoints} exists with 1 partitions, not {config.partitions}" in result.stderr
    if broker_kind == "kafka":  # (the bundled broker describes no topic configuration)
        assert "cleanup.policy=delete, not compact" in result.stderr
