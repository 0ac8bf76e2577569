"""Where a worker's CPU a delivery goes: the same burst taken through more and more of
what a worker does, one arm at a time, to one receiver process on 127.0.0.1.

    python bench/record_cost.py [--records 20000] [--rounds 5] [--arms sender,dispatch,decode,lines,history]

Every arm runs the records as a worker does on its defaults (1,000 at a time, taken in
in parts of 50 and each its own task, one endpoint's 20 connections), in this process
on one event loop, and
measures deliveries a second and this process's CPU a delivery: its event loop's
thread, and all its threads (librdkafka's among them). The arms take turns, round after
round (the machine's noise is large: one arm's CPU a delivery can differ by a third from
one round to the next); the medians are printed, and what each arm adds to the one
before it:

1. ``sender``: the gateway's Sender alone, the signed POST and its attempt record (what
   ``bench/http_clients.py`` compares with aiohttp);
2. ``dispatch``: + the dispatcher, records already decoded: fan-out to the bot's
   endpoints, the decision after the attempt, metrics; history off (no ownership check:
   as a lone process, it owns every endpoint);
3. ``decode``: + each record decoded and validated from its Avro bytes
   (``Dispatcher.prepare``, as a worker does on its event loop);
4. ``lines``: + each attempt's line in the delivery history, built and encoded, handed to
   a producer that acknowledges it at once (no Kafka);
5. ``history``: the same lines produced to the bundled broker, each awaited until
   acknowledged (a worker's default).

The whole worker adds its consumers, the offsets and the budget: ``bench/bursts.py``
prints its CPU a delivery ("event loop", "librdkafka", "others") for the same burst from
Kafka. One run, one machine: quote the differences between arms of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from run import BOT, ReceiverProcess, free_port, make_events  # noqa: E402

from gateway.codec import Codec  # noqa: E402
from gateway.config import Config  # noqa: E402
from gateway.delivery import Dispatcher, Job, Sender  # noqa: E402
from gateway.events import Event  # noqa: E402
from gateway.ops import new_endpoint  # noqa: E402
from gateway.records import Attempt  # noqa: E402
from gateway.store import AckedProducer, EndpointTable, Headers, Topics, create_topics  # noqa: E402
from gateway.streaming import GC_YOUNG_THRESHOLD, REFILL_PARTS, Broker, metrics_for  # noqa: E402
from tests.fakes import FakeMessage  # noqa: E402

ARMS = ("sender", "dispatch", "decode", "lines", "history")
IN_FLIGHT = Config().concurrency
"""A worker's default budget."""
REFILL = IN_FLIGHT // REFILL_PARTS
"""A full budget is refilled in parts of this many records (as a worker's consumer does)."""
T = TypeVar("T")


class Unrecorded:
    """The dispatcher's producer with the history off and nothing to retry: never used."""

    async def send(self, topic: str, key: bytes | None, value: bytes, headers: Headers, *,
                   partition: int | None = None) -> None:
        raise AssertionError(f"nothing should be produced here ({topic})")


class AtOnce:
    """A producer that acknowledges every history line at once, without Kafka."""

    def __init__(self, attempts_topic: str) -> None:
        self.topic = attempts_topic

    async def send(self, topic: str, key: bytes | None, value: bytes, headers: Headers, *,
                   partition: int | None = None) -> None:
        assert topic == self.topic, f"only history lines should be produced here ({topic})"


async def timed(records: int, prepare: Callable[[int], T],
                run: Callable[[T], Awaitable[None]]) -> tuple[float, float, float]:
    """Deliveries a second, and the CPU a delivery (µs) of the event loop's thread and of
    the whole process. Records are taken in as a worker's consumer hands them over: up to
    ``IN_FLIGHT`` in flight, the budget refilled in parts (``REFILL``), each part
    prepared together (``prepare``, on the loop) and then run, one task each (``run``)."""
    loop = asyncio.get_running_loop()
    in_flight = 0
    room = asyncio.Event()
    failures: list[BaseException] = []
    tasks: set[asyncio.Task[None]] = set()

    def finished(task: asyncio.Task[None]) -> None:
        nonlocal in_flight
        tasks.discard(task)
        in_flight -= 1
        if not task.cancelled() and task.exception() is not None:
            failures.append(task.exception())  # type: ignore[arg-type]
        if in_flight <= IN_FLIGHT - REFILL:
            room.set()

    loop_cpu, cpu, started = time.thread_time(), time.process_time(), time.perf_counter()
    taken = 0
    while taken < records and not failures:
        if in_flight > IN_FLIGHT - REFILL:
            room.clear()
            await room.wait()
        part = [prepare(i) for i in range(taken, min(records, taken + IN_FLIGHT - in_flight))]
        for job in part:
            task: asyncio.Task[None] = loop.create_task(run(job))  # type: ignore[arg-type]
            tasks.add(task)
            task.add_done_callback(finished)
        in_flight += len(part)
        taken += len(part)
    await asyncio.gather(*tasks, return_exceptions=True)
    if failures:
        raise failures[0]
    elapsed, cpu, loop_cpu = time.perf_counter() - started, time.process_time() - cpu, time.thread_time() - loop_cpu
    return records / elapsed, loop_cpu / records * 1e6, cpu / records * 1e6


async def arm(name: str, config: Config, url: str, events: list[Event],
              values: list[bytes]) -> tuple[float, float, float]:
    codec = Codec()
    endpoint = new_endpoint(bot_id=BOT, url=url)
    sender = Sender(config)
    if name == "sender":
        async def send(event: Event) -> None:
            attempt = await sender.send(endpoint, event.event_id, event.json_body(), "events")
            assert isinstance(attempt, Attempt) and attempt.succeeded, attempt
        try:
            return await timed(len(events), events.__getitem__, send)
        finally:
            await sender.aclose()
    table = EndpointTable()
    table.apply(endpoint.id, endpoint)
    history = name == "history"
    lines = history or name == "lines"
    arm_config = config if lines else config.replace(record_attempts=False)
    producer: Any = (AckedProducer(config, asyncio.get_running_loop()) if history
                     else AtOnce(Topics.from_config(config).attempts) if lines else Unrecorded())
    dispatcher = Dispatcher(arm_config, codec=codec, endpoints=table, sender=sender, producer=producer,
                            metrics=metrics_for(config))
    tier = Topics.from_config(config).tiers[0]
    messages = [FakeMessage(tier.topic, 0, i, value) for i, value in enumerate(values)]
    decoded = name == "dispatch"

    def prepare(i: int) -> Job:
        return Job(messages[i], events[i], 0) if decoded else dispatcher.prepare(tier, messages[i])

    async def run(job: Job) -> None:
        await dispatcher.run(tier, job)

    try:
        return await timed(len(events), prepare, run)
    finally:
        await sender.aclose()
        if history:
            await asyncio.to_thread(producer.close)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    args = parser.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)}; known: {', '.join(ARMS)}")
    events = make_events(args.records)
    codec = Codec()
    values = [codec.encode(e.schema_name, e.to_record(), topic="events") for e in events]
    gc.collect()  # the garbage collector as a worker sets it (gateway.streaming.serve)
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD)
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in arms}
    with tempfile.TemporaryDirectory() as workdir, Broker(port=free_port(), log=Path(workdir) / "broker.log") as broker:
        config = Config(bootstrap_servers=broker.bootstrap, topic_prefix="cost", allow_private_networks=True)
        create_topics(config)
        receiver = ReceiverProcess(Path(workdir) / "receiver.jsonl")
        try:
            print(f"{args.records:,} records to one endpoint ({config.endpoint_concurrency} connections, "
                  f"{IN_FLIGHT} in flight), receiver and bundled broker on 127.0.0.1")
            for round_ in range(args.rounds):
                for name in arms:
                    runs[name].append(asyncio.run(arm(name, config, receiver.url, events, values)))
                print(f"  round {round_ + 1}: " + ", ".join(
                    f"{name} {runs[name][-1][0]:,.0f}/s {runs[name][-1][2]:.0f} µs" for name in arms), flush=True)
        finally:
            receiver.requests()  # (stops it)
    print(f"medians of {args.rounds} rounds: deliveries a second; CPU a delivery, event loop and all threads")
    result: dict[str, Any] = {"records": args.records, "rounds": args.rounds, "arms": {}}
    before: tuple[float, float] | None = None
    for name in arms:
        rate, loop_cpu, cpu = (statistics.median(r[k] for r in runs[name]) for k in range(3))
        step = "" if before is None else f"  (+{loop_cpu - before[0]:.0f}, +{cpu - before[1]:.0f} µs)"
        before = loop_cpu, cpu
        print(f"  {name:<9} {rate:>8,.0f}/s  {loop_cpu:5.0f} µs  {cpu:5.0f} µs{step}", flush=True)
        result["arms"][name] = {"deliveries_per_second": round(rate), "loop_us": round(loop_cpu, 1),
                                "all_threads_us": round(cpu, 1), "rounds": runs[name]}
    out = HERE / "results" / f"record-cost-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
