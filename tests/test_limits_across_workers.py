"""An endpoint's limits hold for the whole gateway, not per process: three real workers
share one endpoint limited to 20 requests a second and 4 in flight.

Without the deliveries topic each worker would apply the limits to the events of its own
partitions: three times the rate and the concurrency its owner asked for. With it, the
worker that owns the endpoint's partition of the deliveries topic makes every attempt.
"""

from __future__ import annotations

import json
import re
import threading
import time
from typing import Any

import pytest

from gateway.config import Config
from gateway.ops import new_endpoint
from gateway.store import save_endpoint

from .receiver import Receiver
from .test_delivery import BOT, dead_letters, publish
from .test_fairness import _events

pytestmark = pytest.mark.integration

RATE = 20
IN_FLIGHT = 4
EVENTS = 300  # 15 s at the rate limit
ANSWER_SECONDS = 0.05


class Concurrency:
    """Counts the requests a receiver's path is answering at once."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self._lock = threading.Lock()

    def __call__(self, request: Any, seen: int) -> int:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        time.sleep(ANSWER_SECONDS)
        with self._lock:
            self.now -= 1
        return 204


def busiest_second(times: list[float]) -> int:
    """The most requests that arrived within any one second (a sliding window)."""
    times = sorted(times)
    most, start = 0, 0
    for end, at in enumerate(times):
        while at - times[start] >= 1.0:
            start += 1
        most = max(most, end - start + 1)
    return most


def holding(log: str, tier: str) -> list[int] | None:
    """The partitions of ``tier`` a worker holds now, from its log (None: none, or moving)."""
    last = None
    for line in log.splitlines():
        if f"tier={tier} " not in line + " ":
            continue
        if 'event="partitions assigned"' in line:
            last = json.loads(re.search(r'partitions="?(\[[^\]]*\])', line).group(1))  # type: ignore[union-attr]
        elif 'event="partitions released"' in line:
            last = None
    return last


def wait_split(workers: list[Any], tier: str, partitions: int, timeout: float = 60) -> None:
    """Until each worker holds its own part of the tier's partitions, all of them between
    them: every worker has joined, and nothing is still moving."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = [holding(w.text(), tier) for w in workers]
        if all(held) and sorted(p for h in held for p in h or ()) == list(range(partitions)):
            return
        time.sleep(0.2)
    raise AssertionError(f"the {tier} partitions were not split among {len(workers)} workers: {held}")


def test_busiest_second_counts_a_sliding_window() -> None:
    assert busiest_second([]) == 0
    assert busiest_second([0.0, 0.5, 0.99, 1.0, 1.5]) == 3
    assert busiest_second([0.9, 1.1, 1.2, 3.0]) == 3


@pytest.mark.timeout(240)
def test_three_workers_hold_an_endpoint_to_its_rate_limit_and_in_flight_cap(
    topics: Config, receiver: Receiver, worker_factory: Any
) -> None:
    concurrency = Concurrency()
    receiver.respond("/limited", concurrency)
    endpoint = new_endpoint(bot_id=BOT, url=receiver.url("/limited"), rate_limit=RATE, max_in_flight=IN_FLIGHT)
    save_endpoint(topics, endpoint)
    workers = [worker_factory(topics) for _ in range(3)]
    wait_split(workers, "deliveries", topics.partitions)
    wait_split(workers, "events", topics.partitions)

    started = time.monotonic()
    ids = publish(topics, _events(BOT, EVENTS))
    try:
        receiver.wait_for(lambda: len({r.event_id for r in receiver.at("/limited")}) >= EVENTS, 120,
                          f"all {EVENTS} events at the limited endpoint")
    except AssertionError:
        for worker in workers:
            print(worker.text()[-2000:])
        raise
    took = time.monotonic() - started
    arrivals = [r.at for r in receiver.at("/limited")]
    busiest = busiest_second(arrivals)
    print(f"\nlimits across 3 workers: {EVENTS} events in {took:.1f} s ({EVENTS / took:.1f}/s), "
          f"busiest second {busiest}, peak in flight {concurrency.peak}, requests {len(arrivals)}")

    assert {r.event_id for r in receiver.at("/limited")} == set(ids)
    # Arrival times jitter on a loaded machine: the bound leaves room for it, far below the
    # three times the limit that three processes applying it each would give.
    assert busiest <= 1.5 * RATE, f"the receiver's busiest second had {busiest} requests (limit {RATE}/s)"
    span = max(arrivals) - min(arrivals)
    assert len(arrivals) / span <= 1.1 * RATE, f"{len(arrivals) / span:.1f} requests a second on average"
    assert concurrency.peak <= IN_FLIGHT, f"{concurrency.peak} requests in flight at once (cap {IN_FLIGHT})"
    assert dead_letters(topics) == []
