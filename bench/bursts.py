"""Bursts: fast and fair at once, measured with the settings a user gets by default.

    python bench/bursts.py [--events 30000] [--brokers tansu,kafka] [--only burst,slow,limits,kill]

On each broker (the bundled one, then Apache Kafka from kafka/pom.xml), with a receiver
in its own process (bench/receiver.py) and real `gateway run` workers, all on 127.0.0.1,
it prints, from one run on one machine:

* burst: a backlog of ``--events`` events to one endpoint answering at once, drained by
  one worker (history on, the default), one worker with history off, and two workers:
  deliveries a second, deferrals, each worker's CPU (cores), and the ratio to the
  ceiling, aiohttp posting the same bodies to the same receiver with 50 connections and
  no Kafka (measured right before and right after the one-worker bursts, the mean used);
* slow: 3,000 events at once to an endpoint that answers in 200 ms on 5 connections
  (``maxInFlight`` 5: 25 a second, 120 s of its own time), on one worker and on two:
  delivered, dead letters, deferrals, the last delivery against the endpoint's own time,
  and how busy the endpoint was (its connections' time answering over the run's);
* limits: three workers share an endpoint limited to 20 a second and 4 in flight and
  get 1,200 events: the receiver's busiest second (sliding), its peak concurrency, dead
  letters;
* kill: 2,000 events to a fast endpoint, the worker killed (SIGKILL) at a quarter of them
  and started again: when the last arrives after the restart, and how many never did; on
  Kafka once more with the worker a static member (``GATEWAY_INSTANCE_ID``).

Writes the numbers as JSON and a plot under bench/results/ (bursts-latest.*).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from confluent_kafka import ConsumerGroupState  # noqa: E402
from confluent_kafka.admin import AdminClient  # noqa: E402
from run import (  # noqa: E402
    BOT,
    ReceiverProcess,
    _children,
    free_port,
    make_events,
    post_with_aiohttp,
    publish,
)
from run import start_workers as start_run_workers  # noqa: E402

from gateway.codec import Codec  # noqa: E402
from gateway.config import Config  # noqa: E402
from gateway.events import Event  # noqa: E402
from gateway.ops import new_endpoint  # noqa: E402
from gateway.records import Delivery  # noqa: E402
from gateway.store import Topics, create_topics, save_endpoint  # noqa: E402
from gateway.streaming import Broker  # noqa: E402
from tests.conftest import read_topic  # noqa: E402
from tests.test_limits_across_workers import busiest_second  # noqa: E402  (the test's own measure)

WARM_BOT = "0b0b0b0b-1111-4222-8333-444444444444"

DEFAULTS = {"GATEWAY_ENDPOINT_WAIT": str(Config().endpoint_wait)}
"""What bench/run.py's workers change and a user's do not: its steady-load bench lets its
one endpoint's share be the whole budget; here every worker has the default share."""


def start_workers(config: Config, n: int, env: dict[str, str] | None = None,
                  logs: Path | None = None) -> list[subprocess.Popen[bytes]]:
    """``n`` `gateway run` workers on the settings a user gets (and ``env``)."""
    return start_run_workers(config, n, env=DEFAULTS | (env or {}), logs=logs)


TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    return _cpu_of(Path(f"/proc/{pid}/stat").read_text())


def _cpu_of(stat: str) -> float:
    """The CPU seconds a ``/proc/.../stat`` line counts (utime and stime)."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


THREAD_KINDS = ("event loop", "librdkafka", "other threads")


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """A process's CPU seconds by thread kind: its event loop (the main thread),
    librdkafka's threads (named ``rdk:*``), and its other threads (the consumers' and the
    producer's poll threads, the metrics server). A thread that ended meanwhile is missed."""
    seconds = dict.fromkeys(THREAD_KINDS, 0.0)
    loop, librdkafka, other = THREAD_KINDS
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        kind = loop if int(task.name) == pid else librdkafka if name.startswith("rdk:") else other
        seconds[kind] += _cpu_of(stat)
    return seconds


def fresh(broker: Any, name: str) -> Config:
    """A configuration of the defaults, on topics of its own (127.0.0.1 allowed)."""
    config = Config(
        bootstrap_servers=broker.bootstrap, topic_prefix=f"{name}-{uuid.uuid4().hex[:6]}", allow_private_networks=True
    )
    create_topics(config)
    return config


def wait_until(done: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.2)


def warm(config: Config, receiver: ReceiverProcess, workers: int) -> None:
    """Until the workers deliver (40 events of another bot's endpoint a worker) and their
    groups are stable with every worker in them: nothing moves while the clock runs."""
    save_endpoint(config, new_endpoint(bot_id=WARM_BOT, url=receiver.url_of("/warm")))
    warmups = make_events(40 * workers, bot=WARM_BOT)
    publish(config, warmups)
    wait_until(lambda: receiver.unique("/warm") >= len(warmups), 120, "the workers' warm-up")
    admin = AdminClient(config.kafka_common())
    groups = [f"{config.consumer_group}.{tier}" for tier in ("events", "deliveries")]

    def stable() -> bool:
        described = [f.result(timeout=10) for f in admin.describe_consumer_groups(groups).values()]
        # (the bundled broker does not list members: its warm-up is the evidence)
        return all(d.state is ConsumerGroupState.STABLE and len(d.members) in (0, workers) for d in described)

    wait_until(stable, 120, "stable groups")


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in processes:
        p.wait(60)


def count(config: Config, topics: list[str]) -> int:
    return sum(len(read_topic(config, topic, timeout=120)) for topic in topics)


def dead_letters(config: Config) -> int:
    return len(read_topic(config, Topics.from_config(config).dlq, timeout=60))


def deferrals(config: Config) -> int:
    return count(config, [t.topic for t in Topics.from_config(config).deferral_tiers])


def returns_due(config: Config, started: float) -> list[float]:
    """When the deferred deliveries were due back, in seconds since ``started``, sorted:
    the first says how long the endpoint waited for its first return."""
    codec = Codec()
    return sorted(round(Delivery.from_record(codec.decode(m.value())[1]).due_at / 1000 - started, 1)
                  for rung in Topics.from_config(config).deferral_tiers
                  for m in read_topic(config, rung.topic, timeout=60))


# -- the ceiling ------------------------------------------------------------------------------


def aiohttp_ceiling(url: str, events: list[Event], connections: int = 50) -> float:
    """aiohttp posting the same bodies, ``connections`` at a time, no Kafka: deliveries a
    second."""
    return asyncio.run(post_with_aiohttp(url, [(e.event_id, e.json_body()) for e in events], connections))


# -- the runs ---------------------------------------------------------------------------------


def burst(
    broker: Any, workdir: Path, events: list[Event], workers: int, env: dict[str, str] | None = None, label: str = ""
) -> dict[str, Any]:
    """Publish the backlog first, then start the workers and time the drain."""
    receiver = ReceiverProcess(workdir / f"burst-{workers}.jsonl")
    config = fresh(broker, f"burst{workers}")
    save_endpoint(config, new_endpoint(bot_id=BOT, url=receiver.url))
    publish(config, events)
    processes = start_workers(config, workers, env=env)
    # Each worker's CPU while the backlog drains (from the first delivery), in cores.
    wait_until(lambda: receiver.unique() > 0, 120, "the first delivery")
    cpu_before, since = [cpu_seconds(p.pid) for p in processes], time.time()
    threads_before = [thread_cpu_seconds(p.pid) for p in processes]
    wait_until(lambda: receiver.unique() >= len(events), 900, f"draining {len(events):,} events")
    cores = [(cpu_seconds(p.pid) - c) / (time.time() - since) for p, c in zip(processes, cpu_before, strict=True)]
    # Where a delivery's CPU goes, in µs, summed over the workers' threads of each kind
    # (from the first delivery on, so the few taken before it are counted too: a bound).
    threads = [thread_cpu_seconds(p.pid) for p in processes]
    per_delivery = {kind: round(sum(a[kind] - b[kind] for a, b in zip(threads, threads_before, strict=True))
                                * 1e6 / len(events), 1) for kind in THREAD_KINDS}
    stop(processes)
    requests = receiver.requests()
    answered = sorted(r[3] for r in requests)
    first, last = answered[0], answered[-1]
    rate = len(events) / (last - first)
    result = {
        "label": label,
        "workers": workers,
        "events": len(events),
        "env": env or {},
        "deliveries_per_second": round(rate),
        "drain_seconds": round(last - first, 2),
        "requests": len(requests),
        "deferrals": deferrals(config),
        "forwarded_to_owner": count(config, [Topics.from_config(config).deliveries]),
        "cores_per_worker": [round(c, 2) for c in cores],
        "cpu_us_per_delivery": per_delivery,
        "per_second": per_second(answered, first),
    }
    print(
        f"  {label}: {rate:,.0f}/s, deferrals {result['deferrals']}, forwarded {result['forwarded_to_owner']}, "
        f"cores {result['cores_per_worker']}, CPU a delivery: "
        + ", ".join(f"{kind} {us:.0f} µs" for kind, us in per_delivery.items()),
        flush=True,
    )
    return result


def per_second(times: list[float], origin: float) -> list[int]:
    series = [0] * (int(max(times, default=origin) - origin) + 1)
    for t in times:
        series[max(0, int(t - origin))] += 1
    return series


def slow(
    broker: Any, workdir: Path, workers: int, events: int = 3000, seconds: float = 0.2, connections: int = 5
) -> dict[str, Any]:
    receiver = ReceiverProcess(workdir / f"slow-{workers}.jsonl", delays={"/slow": seconds})
    config = fresh(broker, f"slow{workers}")
    save_endpoint(config, new_endpoint(bot_id=BOT, url=receiver.url_of("/slow"), max_in_flight=connections))
    processes = start_workers(config, workers)
    warm(config, receiver, workers)
    batch = make_events(events)
    started = time.time()
    publish(config, batch)
    own_time = events * seconds / connections
    wait_until(lambda: receiver.unique("/slow") >= events, 3 * own_time + 120, f"{events} slow deliveries")
    stop(processes)
    requests = [r for r in receiver.requests() if r[0] == "/slow"]
    last = max(r[3] for r in requests) - started
    busy = sum(r[3] - r[2] for r in requests) / (connections * last)
    due = returns_due(config, started)  # one record a deferral: they are the count too
    result = {
        "workers": workers,
        "events": events,
        "answer_seconds": seconds,
        "connections": connections,
        "own_time_s": own_time,
        "delivered": len({r[1] for r in requests}),
        "requests": len(requests),
        "last_after_s": round(last, 1),
        "of_own_time": round(last / own_time, 2),
        "busy": round(busy, 3),
        "dead_letters": dead_letters(config),
        "deferrals": len(due),
        "per_second": per_second([r[3] for r in requests], started),
    }
    if due:
        result["returns_due_s"] = {"first": due[0], "median": due[len(due) // 2], "last": due[-1]}
    print(
        f"  slow, {workers} worker(s): {result['delivered']}/{events} delivered, last at {last:.1f} s "
        f"({result['of_own_time']}x of {own_time:.0f} s), busy {busy:.0%}, dead letters "
        f"{result['dead_letters']}, deferrals {result['deferrals']}"
        + (f", returns due {due[0]:.1f} to {due[-1]:.1f} s after publishing" if due else ""),
        flush=True,
    )
    return result


def peak_concurrency(requests: list[tuple[str, str, float, float]]) -> int:
    edges = sorted([(r[2], 1) for r in requests] + [(r[3], -1) for r in requests], key=lambda e: (e[0], e[1]))
    now = peak = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


def limits(
    broker: Any, workdir: Path, workers: int = 3, events: int = 1200, rate: float = 20, in_flight: int = 4
) -> dict[str, Any]:
    receiver = ReceiverProcess(workdir / "limits.jsonl", delays={"/limited": 0.05})
    config = fresh(broker, "limits")
    save_endpoint(
        config, new_endpoint(bot_id=BOT, url=receiver.url_of("/limited"), rate_limit=rate, max_in_flight=in_flight)
    )
    processes = start_workers(config, workers, env={"GATEWAY_LOG_LEVEL": "info"}, logs=workdir / "limits")
    warm(config, receiver, workers)
    started = time.time()
    publish(config, make_events(events))
    wait_until(lambda: receiver.unique("/limited") >= events, events / rate * 3 + 120, f"{events} limited")
    stop(processes)
    requests = [r for r in receiver.requests() if r[0] == "/limited"]
    result = {
        "workers": workers,
        "events": events,
        "rate_limit": rate,
        "max_in_flight": in_flight,
        "delivered": len({r[1] for r in requests}),
        "requests": len(requests),
        "busiest_second": busiest_second([r[2] for r in requests]),
        "peak_concurrency": peak_concurrency(requests),
        "took_s": round(max(r[3] for r in requests) - started, 1),
        "dead_letters": dead_letters(config),
        "forwarded_to_owner": count(config, [Topics.from_config(config).deliveries]),
        "per_second": per_second([r[2] for r in requests], started),
    }
    print(
        f"  limits, {workers} workers: busiest second {result['busiest_second']} (limit {rate:.0f}/s), "
        f"peak in flight {result['peak_concurrency']} (cap {in_flight}), {result['delivered']}/{events} "
        f"delivered in {result['took_s']} s, dead letters {result['dead_letters']}",
        flush=True,
    )
    return result


def kill(broker: Any, workdir: Path, events: int = 2000, *, instance_id: str | None = None) -> dict[str, Any]:
    """``instance_id``: the worker is a static member under that name, before and after."""
    receiver = ReceiverProcess(workdir / "kill.jsonl")
    config = fresh(broker, "kill")
    save_endpoint(config, new_endpoint(bot_id=BOT, url=receiver.url))
    named = {"GATEWAY_INSTANCE_ID": instance_id} if instance_id else None
    processes = start_workers(config, 1, env=named)
    warm(config, receiver, 1)
    batch = make_events(events)
    ids = {e.event_id for e in batch}
    publish(config, batch)
    wait_until(lambda: receiver.unique("/hook") >= events // 4, 120, "a quarter of the burst")
    processes[0].kill()
    processes[0].wait()
    at_kill = receiver.unique("/hook")
    restarted = time.time()
    processes = start_workers(config, 1, env=named)
    try:
        wait_until(lambda: receiver.unique("/hook") >= events, 180, "the rest of the burst after the restart")
    except RuntimeError as exc:
        print(f"  {exc}", flush=True)
    stop(processes)
    requests = [r for r in receiver.requests() if r[0] == "/hook"]
    seen = {r[1] for r in requests}
    last = max(r[3] for r in requests)
    result = {
        "events": events,
        "instance_id": instance_id,
        "delivered_at_kill": at_kill,
        "delivered": len(seen & ids),
        "lost": len(ids - seen),
        "requests": len(requests),
        "last_after_restart_s": round(last - restarted, 1),
        "deferrals": deferrals(config),
        "dead_letters": dead_letters(config),
    }
    print(
        f"  kill -9 at {at_kill}/{events}{' (static member)' if instance_id else ''}: "
        f"last {result['last_after_restart_s']} s after the restart, "
        f"lost {result['lost']}, requests {len(requests)} (sent twice: {len(requests) - len(seen)})",
        flush=True,
    )
    return result


def run_on(broker: Any, name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    only = set(args.only.split(","))
    results: dict[str, Any] = {"broker": name}
    if "burst" in only:
        events = make_events(args.events)

        def ceiling() -> float:
            receiver = ReceiverProcess(workdir / "ceiling.jsonl")
            try:
                return aiohttp_ceiling(receiver.url, events)
            finally:
                receiver.requests()

        print(f"[{name}] burst of {args.events:,} to one fast endpoint …", flush=True)
        before = ceiling()
        one = burst(broker, workdir, events, 1, label="1 worker, history on")
        off = burst(broker, workdir, events, 1, env={"GATEWAY_RECORD_ATTEMPTS": "false"}, label="1 worker, history off")
        after = ceiling()
        aiohttp = (before + after) / 2
        print(f"  aiohttp alone {before:,.0f}/s before, {after:,.0f}/s after", flush=True)
        two = burst(broker, workdir, events, 2, label="2 workers, history on")
        results["burst"] = {
            "aiohttp_per_second": round(aiohttp),
            "aiohttp_before_and_after": [round(before), round(after)],
            "runs": [one, off, two],
            "ratio_history_on": round(one["deliveries_per_second"] / aiohttp, 3),
            "ratio_history_off": round(off["deliveries_per_second"] / aiohttp, 3),
            "two_over_one": round(two["deliveries_per_second"] / one["deliveries_per_second"], 3),
        }
    if "slow" in only:
        print(f"[{name}] slow: 3,000 events at once to 25/s …", flush=True)
        results["slow"] = [slow(broker, workdir, 1), slow(broker, workdir, 2)]
    if "limits" in only:
        print(f"[{name}] limits: 3 workers, 20/s and 4 in flight, 1,200 events …", flush=True)
        results["limits"] = limits(broker, workdir)
    if "kill" in only:
        print(f"[{name}] kill -9 mid-burst …", flush=True)
        results["kill"] = kill(broker, workdir)
        if not isinstance(broker, Broker):  # the bundled broker fails with group.instance.id
            print(f"[{name}] kill -9 mid-burst, the worker a static member (GATEWAY_INSTANCE_ID) …", flush=True)
            results["kill_static"] = kill(broker, workdir, instance_id="bench-0")
    return results


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(results["brokers"].values())
    fig, axes = plt.subplots(len(runs), 3, figsize=(16, 4.2 * len(runs)), squeeze=False)
    for (ax1, ax2, ax3), run in zip(axes, runs, strict=True):
        if "burst" in run:
            for burst_run in run["burst"]["runs"]:
                ax1.plot(burst_run["per_second"], label=burst_run["label"])
            ax1.axhline(run["burst"]["aiohttp_per_second"], color="grey", linestyle="--", label="aiohttp, no Kafka")
            ax1.set_title(f"{run['broker']}: a backlog to one fast endpoint, deliveries/s")
            ax1.set_xlabel("seconds since the first delivery")
            ax1.legend()
        if "slow" in run:
            for slow_run in run["slow"]:
                ax2.plot(slow_run["per_second"], label=f"{slow_run['workers']} worker(s), busy {slow_run['busy']:.0%}")
            ax2.axhline(25, color="grey", linestyle="--", label="the endpoint's pace")
            ax2.set_title(f"{run['broker']}: 3,000 at once to 25/s, deliveries/s")
            ax2.set_xlabel("seconds since publishing")
            ax2.legend()
        if "limits" in run:
            ax3.plot(run["limits"]["per_second"], label="3 workers")
            ax3.axhline(20, color="grey", linestyle="--", label="the rate limit")
            ax3.set_title(f"{run['broker']}: an endpoint limited to 20/s, requests/s")
            ax3.set_xlabel("seconds since publishing")
            ax3.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument(
        "--brokers",
        default="tansu,kafka",
        help="where to measure, in order: tansu (bundled), kafka (one Apache Kafka node), kafka-cluster "
        "(a controller and three Apache Kafka brokers on this machine, as tests/kafka_cluster.py runs them)",
    )
    parser.add_argument("--only", default="burst,slow,limits,kill", help="which runs, comma-separated")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    workdir = args.out / "tmp-bursts"
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "brokers": {},
    }
    try:
        for name in [b.strip() for b in args.brokers.split(",") if b.strip()]:
            if name == "tansu":
                with Broker(port=free_port(), log=workdir / "broker.log") as broker:
                    results["brokers"][name] = run_on(broker, "bundled (Tansu)", args, workdir)
            elif name == "kafka":
                from tests.apache_kafka import KafkaNode, kafka_version

                with KafkaNode(workdir / "kafka") as node:
                    results["brokers"][name] = run_on(node, f"Apache Kafka {kafka_version()}", args, workdir)
            elif name == "kafka-cluster":
                from tests.apache_kafka import kafka_version
                from tests.kafka_cluster import KafkaCluster

                print("[cluster] starting a controller and three brokers …", flush=True)
                with KafkaCluster(workdir / "cluster") as cluster:
                    label = f"Apache Kafka {kafka_version()}, 3 brokers"
                    results["brokers"][name] = run_on(cluster, label, args, workdir)
            else:
                parser.error(f"--brokers: unknown broker {name!r} (tansu, kafka, kafka-cluster)")
    finally:
        for child in _children:
            if child.poll() is None:
                child.kill()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (args.out / f"bursts-{stamp}.json").write_text(json.dumps(results, indent=1))
    (args.out / "bursts-latest.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "bursts-latest.png")
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"results: {args.out}/bursts-latest.json, bursts-latest.png")


if __name__ == "__main__":
    main()
