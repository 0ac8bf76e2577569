"""The consumer session a worker chooses when none is set (``streaming.session_for``):
the rule, and what a real broker makes of it."""

from __future__ import annotations

import logging
import socket
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.config import Config
from gateway.errors import Unavailable
from gateway.store import Topics
from gateway.streaming import (
    Session,
    brokers_in,
    consumer_settings,
    session_for,
    session_ms,
    settle_session,
)

from .conftest import fresh_config


def test_one_broker_gets_ten_seconds_whatever_it_says() -> None:
    assert session_for(1, None).ms == 10_000
    assert session_for(1, 9000).ms == 10_000
    assert "one broker" in session_for(1, 9000).why


def test_several_brokers_get_three_of_their_broker_sessions() -> None:
    chosen = session_for(3, 9000)
    assert chosen.ms == 27_000
    assert "3 times their broker.session.timeout.ms (9000 ms)" in chosen.why
    assert session_for(5, 2000).ms == 6000


def test_several_brokers_that_do_not_say_get_the_conservative_session() -> None:
    assert session_for(3, None) == Session(30_000, "3 brokers that do not describe their broker.session.timeout.ms")


def test_the_choice_is_held_to_the_brokers_group_session_bounds() -> None:
    assert session_for(1, None, group_min_ms=12_000).ms == 12_000
    high = session_for(3, 9000, group_min_ms=6000, group_max_ms=20_000)
    assert high.ms == 20_000
    assert "held to the brokers' group session bounds (6000-20000 ms)" in high.why
    assert session_for(3, 9000, group_min_ms=6000, group_max_ms=1_800_000).ms == 27_000


def _metadata(live: list[int], replicas: list[list[int]]) -> SimpleNamespace:
    partitions = {i: SimpleNamespace(replicas=r) for i, r in enumerate(replicas)}
    return SimpleNamespace(brokers=dict.fromkeys(live), topics={"t": SimpleNamespace(partitions=partitions)})


def test_a_broker_down_while_a_worker_starts_still_counts() -> None:
    """Metadata lists only the brokers that answer; the partitions' copies name the others
    (one broker of two down must not make a cluster look like a single broker)."""
    assert brokers_in(_metadata([1], [[1, 2], [2, 1]])) == 2
    assert brokers_in(_metadata([1, 2, 3], [[1, 2, 3]])) == 3
    assert brokers_in(_metadata([7], [])) == 1  # (no topics yet)


def test_with_kip_848_the_broker_sets_the_session_and_nothing_is_asked() -> None:
    config = Config(bootstrap_servers="127.0.0.1:1", group_protocol="consumer")
    assert settle_session(config) is config  # (no broker listens there: it was not asked)


def test_a_session_the_user_set_is_kept_without_asking_the_cluster() -> None:
    config = Config(bootstrap_servers="127.0.0.1:1", session_timeout_ms=4321)
    assert settle_session(config) is config  # (no broker listens there: it was not asked)
    assert consumer_settings(config, Topics.from_config(config).tier("events"))["session.timeout.ms"] == 4321


def test_a_configuration_never_settled_gets_the_conservative_session() -> None:
    config = Config()
    assert config.session_timeout_ms is None
    assert session_ms(config) == 30_000
    assert consumer_settings(config, Topics.from_config(config).tier("events"))["session.timeout.ms"] == 30_000


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_worker_on_a_single_broker_chooses_ten_seconds_and_says_why(
    broker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The test brokers are single nodes (the bundled one describes no configuration at
    all; Kafka says its 2 s broker session): one broker has no follower to stall a commit."""
    config = fresh_config(broker.bootstrap, "s").replace(session_timeout_ms=None)
    with caplog.at_level(logging.INFO, logger="gateway.session"):
        settled = settle_session(config)
    assert settled.session_timeout_ms == 10_000
    chosen = [r for r in caplog.records if r.getMessage() == "consumer session chosen"]
    assert len(chosen) == 1
    assert getattr(chosen[0], "session_ms", None) == 10_000
    assert "one broker" in getattr(chosen[0], "why", "")


@pytest.mark.timeout(60)
def test_a_cluster_that_does_not_answer_is_said_so_at_once() -> None:
    """Nothing listens: the worker stops with the address it tried, as its topic check
    would (one wait for the cluster, not two)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(Unavailable, match=f"no Kafka broker answered at 127.0.0.1:{port}"):
        settle_session(Config(bootstrap_servers=f"127.0.0.1:{port}"), timeout=2)
