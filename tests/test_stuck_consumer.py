"""A tier's consumer that stays out of its group is replaced, and nothing is lost.

The stuck state, on purpose: a TCP proxy sits between the worker and the broker (which
advertises the proxy), and in the middle of a load it blackholes the connection over which
the events tier's consumer talks to its group coordinator, and every such connection that
consumer opens again. The consumer fetches nothing once its session is gone and cannot
rejoin: without the recovery the events wait forever (seen in CI twice, after a broker
freeze). With it, the worker replaces the consumer after ``rejoin_bound`` and the new one
(its own client id, so its connections pass) rejoins; the audit reads every topic."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Config
from gateway.store import create_topics
from gateway.streaming import Broker, rejoin_bound

from .chaos_support import ChaosReceiver, Load, conclude, make_events, register
from .conftest import free_port
from .tcp_proxy import TcpProxy, group_connection_of


@contextlib.contextmanager
def proxied_broker(kind: str, where: Path) -> Iterator[TcpProxy]:
    """A broker of ``kind`` of the test's own, reached (and advertised) only through a proxy."""
    proxy_port = free_port()
    broker: Any
    if kind == "tansu":
        broker = Broker(port=free_port(), advertised_port=proxy_port, log=where / "tansu.log")
    else:
        from .apache_kafka import KafkaNode

        broker = KafkaNode(where / "kafka", settings={"advertised.listeners": f"PLAINTEXT://127.0.0.1:{proxy_port}"})
    with broker, TcpProxy(broker.port, port=proxy_port) as proxy:
        yield proxy


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_consumer_stuck_out_of_its_group_is_replaced_and_nothing_is_lost(
    broker_kind: str, tmp_path: Path, worker_factory: Any, request: pytest.FixtureRequest
) -> None:
    with proxied_broker(broker_kind, tmp_path) as proxy:
        config = Config(
            bootstrap_servers=f"127.0.0.1:{proxy.port}", topic_prefix="stuck",
            retry_delays=(1, 2, 3), defer_delays=(1, 2, 3), partitions=3,
            session_timeout_ms=2000, max_poll_interval_ms=4000, shutdown_timeout=10.0,
            request_timeout=5.0, allow_private_networks=True,
        )
        create_topics(config)
        with ChaosReceiver(seed=11) as receiver:
            endpoints = {"/hook": register(config, receiver.url("/hook"))}
            worker = worker_factory(config)
            assert worker.process is not None
            load = Load(config, make_events(800, seed=11), chunk=40, interval=0.2).start()
            receiver.wait_delivered(100, 60)
            events_consumer = f"{config.consumer_group}.events-{worker.process.pid}-1"
            proxy.blackhole_when(group_connection_of(events_consumer))
            stuck_at, delivered_at = time.monotonic(), receiver.delivered()
            # Out of its group within a session; replaced after the bound, seen within a
            # few statistics intervals (5 s) more.
            deadline = stuck_at + rejoin_bound(config) + 60
            while "consumer replaced" not in worker.text():
                assert time.monotonic() < deadline, (
                    f"the stuck consumer was not replaced; delivered {delivered_at} then "
                    f"{receiver.delivered()}:\n{worker.text()[-4000:]}")
                time.sleep(0.2)
            replaced_after = time.monotonic() - stuck_at
            assert any(c.blackholed for c in proxy.connections), "the fault never took: the test proves nothing"
            conclude("stuck-consumer", request, config, receiver, load, endpoints, [worker.log],
                     notes=f"consumer replaced {replaced_after:.1f} s after its coordinator connection was "
                           f"blackholed (bound {rejoin_bound(config):.0f} s)", drain_timeout=120)
            assert worker.text().count("consumer replaced") == 1, worker.text()[-4000:]
            assert worker.terminate() == 0, worker.text()[-3000:]
