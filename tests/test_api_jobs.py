"""Replay jobs without a broker: one running at a time, progress while it runs, and a
job that fails reports why instead of taking the API down."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from gateway.api import ReplayJobs
from gateway.config import Config
from gateway.errors import Conflict
from gateway.ops import DeadLetterEntry, ReplayPlan, ReplayProgress, ReplayReport, decide_replays
from gateway.records import DeadLetter, DeadLetterReason, Delivery


def plan(count: int) -> ReplayPlan:
    entries = [DeadLetterEntry("t.dlq", 0, offset, DeadLetter(
        reason=DeadLetterReason.RETRIES_EXHAUSTED, detail="", dead_at=0, source_topic="t.retry-3s", source_partition=0,
        source_offset=offset, delivery=Delivery(event_id=f"e{offset}", event_type="MESSAGE", bot_id="b",
                                                session_id="s", occurred_at=0, payload="{}", endpoint_id="p1",
                                                attempt=4, due_at=0)))
               for offset in range(count)]
    return decide_replays(entries, topic="t.retry-1s", known_endpoints={"p1"})


def wait_for(check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_one_replay_at_a_time_with_its_progress_reported() -> None:
    release = threading.Event()

    def send(config: Config, sent: ReplayPlan, *, rate: float | None,
             on_progress: Callable[[ReplayProgress], None]) -> ReplayReport:
        on_progress(ReplayProgress(total=3, sent=2, acknowledged=1, failed=0, seconds=0.5))
        release.wait(5)
        return ReplayReport(sent, replayed=3, seconds=1.0)

    jobs = ReplayJobs(Config(), send=send)
    first = plan(3)
    job = jobs.start(first, rate=5.0)
    assert job.state == "running" and job.id == first.replay_id and job.planned == 3 and job.items == ()
    wait_for(lambda: (current := jobs.get(job.id)) is not None and current.progress is not None
             and current.progress.sent == 2)
    with pytest.raises(Conflict, match=job.id):
        jobs.start(plan(1))
    dry = jobs.start(plan(2), dry_run=True)  # a dry run sends nothing: allowed meanwhile
    assert dry.state == "dry_run" and [i["deadLetter"] for i in dry.items] == ["0:0", "0:1"]
    release.set()
    wait_for(lambda: (current := jobs.get(job.id)) is not None and current.state == "succeeded")
    done: Any = jobs.get(job.id)
    shown = done.to_json()
    assert shown["result"]["replayed"] == 3 and shown["progress"]["acknowledged"] == 3
    assert shown["rate"] == 5.0 and shown["finishedAt"] is not None and shown["error"] is None
    assert jobs.start(plan(1)).state == "running"  # the next one may run now
    jobs.join(5)


def test_a_job_that_fails_says_why() -> None:
    def send(config: Config, sent: ReplayPlan, **kwargs: Any) -> ReplayReport:
        raise RuntimeError("broker gone")

    jobs = ReplayJobs(Config(), send=send)
    job = jobs.start(plan(1))
    wait_for(lambda: (current := jobs.get(job.id)) is not None and current.state == "failed")
    failed: Any = jobs.get(job.id)
    assert failed.error == "RuntimeError: broker gone"

    def partial(config: Config, sent: ReplayPlan, **kwargs: Any) -> ReplayReport:
        return ReplayReport(sent, replayed=1, failed=1, first_failure="0:1: timed out")

    jobs = ReplayJobs(Config(), send=partial)
    job = jobs.start(plan(2))
    wait_for(lambda: (current := jobs.get(job.id)) is not None and current.state == "failed")
    assert jobs.get(job.id).error == "0:1: timed out"  # type: ignore[union-attr]
