"""Replay jobs of the management API: a planned replay sent on a thread of its own,
its progress readable while it runs.

Jobs live in the memory of the API process: a restart forgets them (what was replayed
is still recorded on the ``dlq-replays`` topic, so nothing is sent twice by a second
replay of the same selection). At most one replay runs at a time per API process (two
overlapping replays would both read "not replayed yet" and send twice); the last
:data:`KEEP` jobs are kept. A job started by a bot-scoped caller is that bot's: other
bots' callers cannot read it.

Given the API's :class:`~gateway.observability.ApiMetrics`, the jobs are counted there:
those remembered by state (read at each scrape), each job as it ends, and the dead
letters it sends as its progress reports them (a long replay's rate shows while it runs).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from ..config import Config
from ..errors import Conflict
from ..observability import ApiMetrics, bind
from ..ops import ReplayPlan, ReplayProgress, ReplayReport, iso, send_replay

__all__ = ["KEEP", "MAX_ITEMS", "MAX_REFUSALS", "JobState", "ReplayJob", "ReplayJobs", "SendReplay"]

log = logging.getLogger("gateway.api_jobs")

KEEP = 100
"""Jobs remembered (the oldest finished ones are forgotten first)."""
MAX_ITEMS = 1000
"""A dry run's planned replays listed in the job."""
MAX_REFUSALS = 100
"""Refusals listed in the job (all are counted)."""


class JobState(StrEnum):
    """Where a replay job stands."""

    DRY_RUN = "dry_run"
    """Planned only: nothing is sent."""
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    """Every planned replay acknowledged and recorded."""
    FAILED = "failed"
    """Some were not acknowledged or not recorded, or the job itself failed (``error``)."""


def _iso(seconds: float) -> str:
    return iso(int(seconds * 1000))


@dataclass(frozen=True)
class ReplayJob:
    """A replay job as it stands: a value, replaced whole as the job moves on."""

    id: str
    state: JobState
    dry_run: bool
    created_at: float
    topic: str
    rate: float | None
    selected: int
    planned: int
    skipped_already_replayed: int
    refused: tuple[dict[str, str], ...]
    refused_count: int
    items: tuple[dict[str, str], ...]
    progress: ReplayProgress | None = None
    report: ReplayReport | None = field(default=None, repr=False)
    finished_at: float | None = None
    error: str | None = None
    bot_id: str | None = None
    """The bot whose caller started it (a bot scope), or None."""

    def to_json(self) -> dict[str, Any]:
        progress, report = self.progress, self.report
        return {
            "id": self.id, "state": self.state.value, "dryRun": self.dry_run, "createdAt": _iso(self.created_at),
            "finishedAt": _iso(self.finished_at) if self.finished_at is not None else None,
            "topic": self.topic, "rate": self.rate, "selected": self.selected, "planned": self.planned,
            "skippedAlreadyReplayed": self.skipped_already_replayed, "refused": list(self.refused),
            "refusedCount": self.refused_count, "items": list(self.items),
            "progress": None if progress is None else {
                "total": progress.total, "sent": progress.sent, "acknowledged": progress.acknowledged,
                "failed": progress.failed, "seconds": round(progress.seconds, 3), "rate": round(progress.rate, 3)},
            "result": None if report is None else {
                "replayed": report.replayed, "failed": report.failed, "firstFailure": report.first_failure,
                "unrecorded": report.unrecorded, "firstUnrecorded": report.first_unrecorded,
                "seconds": round(report.seconds, 3)},
            "error": self.error,
            "botId": self.bot_id,
        }


def _job(plan: ReplayPlan, *, dry_run: bool, rate: float | None, bot_id: str | None = None) -> ReplayJob:
    return ReplayJob(
        id=plan.replay_id, state=JobState.DRY_RUN if dry_run else JobState.RUNNING, dry_run=dry_run,
        created_at=time.time(),
        topic=plan.topic, rate=rate, selected=plan.selected, planned=len(plan.planned),
        skipped_already_replayed=plan.skipped_already_replayed,
        refused=tuple({"id": str(r.entry.id), "reason": r.reason.value, "message": r.message}
                      for r in plan.refused[:MAX_REFUSALS]),
        refused_count=len(plan.refused),
        items=tuple({"deadLetter": str(p.entry.id), "eventId": p.delivery.event_id,
                     "eventType": p.delivery.event_type, "endpointId": p.delivery.endpoint_id}
                    for p in plan.planned[:MAX_ITEMS]) if dry_run else (),
        progress=ReplayProgress(total=len(plan.planned), sent=0, acknowledged=0, failed=0, seconds=0.0),
        finished_at=time.time() if dry_run else None,
        bot_id=bot_id,
    )


SendReplay = Callable[..., ReplayReport]
"""What sends a plan: :func:`~gateway.ops.send_replay` (a test may pass another)."""


class ReplayJobs:
    """The API process's replay jobs, counted in ``metrics`` when given. Thread-safe."""

    def __init__(self, config: Config, *, send: SendReplay = send_replay, metrics: ApiMetrics | None = None) -> None:
        self.config = config
        self._send = send
        self._metrics = metrics
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, ReplayJob] = OrderedDict()
        self._threads: dict[str, threading.Thread] = {}
        if metrics is not None:
            metrics.count_jobs(self.counts)

    def start(self, plan: ReplayPlan, *, rate: float | None = None, dry_run: bool = False,
              bot_id: str | None = None) -> ReplayJob:
        """Record the job (``bot_id``'s, when a bot-scoped caller starts it) and, unless a
        dry run, send the plan on a thread. Raises :class:`~gateway.errors.Conflict` while
        another replay runs."""
        job = _job(plan, dry_run=dry_run, rate=rate, bot_id=bot_id)
        with self._lock:
            running = [j.id for j in self._jobs.values() if j.state is JobState.RUNNING]
            if running and not dry_run:
                raise Conflict(f"replay {running[0]} is still running; wait for it (GET /v1/replays/{running[0]})")
            self._remember(job)
            if dry_run and self._metrics is not None:
                self._metrics.job_finished(JobState.DRY_RUN)
            if not dry_run:
                thread = threading.Thread(target=self._run, args=(plan, rate), name=f"replay-{plan.replay_id[:8]}",
                                          daemon=True)
                self._threads[job.id] = thread
                thread.start()
        return job

    def _remember(self, job: ReplayJob) -> None:
        self._jobs[job.id] = job
        while len(self._jobs) > KEEP:
            oldest = next((k for k, j in self._jobs.items() if j.state is not JobState.RUNNING), None)
            if oldest is None:
                break
            del self._jobs[oldest]

    def _update(self, job_id: str, **changes: Any) -> None:
        with self._lock:
            current = self._jobs.get(job_id)
            if current is None:
                return
            self._jobs[job_id] = updated = replace(current, **changes)
        if self._metrics is not None:
            before, after = current.progress, updated.progress
            if after is not None and after is not before:
                self._metrics.replayed(acknowledged=after.acknowledged - (before.acknowledged if before else 0),
                                       failed=after.failed - (before.failed if before else 0))
            if current.state is JobState.RUNNING and updated.state is not JobState.RUNNING:
                self._metrics.job_finished(updated.state)

    def _run(self, plan: ReplayPlan, rate: float | None) -> None:
        job_id = plan.replay_id
        bound = bind(log, replay_id=job_id)
        try:
            report = self._send(self.config, plan, rate=rate,
                                on_progress=lambda progress: self._update(job_id, progress=progress))
        except Exception as exc:  # the job reports it; the API process goes on
            bound.exception("replay job failed")
            self._update(job_id, state=JobState.FAILED, error=f"{type(exc).__name__}: {exc}", finished_at=time.time())
        else:
            final = ReplayProgress(total=len(plan.planned), sent=len(plan.planned), acknowledged=report.replayed,
                                   failed=report.failed, seconds=report.seconds)
            self._update(job_id, state=JobState.SUCCEEDED if report.ok else JobState.FAILED, report=report,
                         progress=final, finished_at=time.time(),
                         error=None if report.ok else (report.first_failure or report.first_unrecorded))
            bound.info("replay job finished", extra={"replayed": report.replayed, "failed": report.failed})
        finally:
            with self._lock:
                self._threads.pop(job_id, None)

    def get(self, job_id: str) -> ReplayJob | None:
        with self._lock:
            return self._jobs.get(job_id)

    def counts(self) -> dict[str, int]:
        """The jobs remembered, by state."""
        with self._lock:
            return dict(Counter(job.state.value for job in self._jobs.values()))

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the running jobs (a stopping API)."""
        with self._lock:
            threads = list(self._threads.values())
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
