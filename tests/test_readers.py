"""No topic the gateway writes to goes silent: a worker that does not read a tier itself
checks that some process does, and says so loudly when none does."""

from __future__ import annotations

import time
from typing import Any

import pytest

from gateway.config import Config

pytestmark = pytest.mark.integration


def wait_for(worker: Any, text: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in (log := str(worker.text())):
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{log[-3000:]}"
        time.sleep(0.1)
    return log


def test_a_tier_nobody_reads_is_named_and_its_reader_noticed_when_it_comes(
    topics: Config, worker_factory: Any
) -> None:
    """Fault: a worker running only some tiers (``--tiers events``) put deliveries off onto
    deferral rungs, and failures onto retry tiers, that nobody read, and nothing said so."""
    config = topics.replace(reader_check=0.5)
    events_only = worker_factory(config, "--tiers", "events")
    log = wait_for(events_only, "no process reads")
    rung = config.topic_prefix + ".deferred-1s"
    assert f"no process reads {rung}" in log and "gateway run --tiers deferred-1s" in log
    assert "level=error" in log.split(f"no process reads {rung}")[0].rsplit("\n", 1)[-1]
    worker_factory(config, "--tiers", "retry-1s,retry-2s,retry-3s,deferred-1s,deferred-2s,deferred-3s")
    wait_for(events_only, "a process reads the tier again")
    assert events_only.terminate() == 0
