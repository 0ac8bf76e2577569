"""Time, as the worker and the consumer pump read and wait on it: one object, passed in.

Two clocks in one: the wall clock (:meth:`Clock.now_ms`, milliseconds since the epoch:
when a retry is due, when an attempt was made; the time records carry) and a monotonic
one (:meth:`Clock.monotonic`: how long something has lasted, never set back). Timers and
waits go through the clock too (:meth:`Clock.call_later`, :meth:`Clock.sleep`,
:meth:`Clock.wait`), so a test can run the worker's timers on a fake clock it advances
itself, with no real waits: ``tests/fakes.py`` has one. :data:`SYSTEM` is the real one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection
from typing import Protocol

__all__ = ["SYSTEM", "Clock", "SystemClock", "Timer"]


class Timer(Protocol):
    """A callback scheduled by :meth:`Clock.call_later`."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    def now_ms(self) -> int:
        """Wall-clock time in milliseconds since the Unix epoch."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (only differences mean anything)."""

    def call_later(self, delay: float, callback: Callable[[], object]) -> Timer:
        """Run ``callback`` on the running event loop after ``delay`` seconds."""

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``."""

    async def wait(self, tasks: Collection[asyncio.Task[None]], within: float) -> None:
        """Wait until every one of ``tasks`` is done, or ``within`` seconds passed."""


class SystemClock:
    """The real clocks and the event loop's timers."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic(self) -> float:
        return time.monotonic()

    def call_later(self, delay: float, callback: Callable[[], object]) -> Timer:
        return asyncio.get_running_loop().call_later(delay, callback)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def wait(self, tasks: Collection[asyncio.Task[None]], within: float) -> None:
        if tasks:
            await asyncio.wait(tasks, timeout=within)


SYSTEM: Clock = SystemClock()
"""The clock a process runs on."""
