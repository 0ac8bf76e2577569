"""Fair delivery across bots, measured: a slow endpoint at three times its capacity, a fast
endpoint of another bot and a down endpoint of a third, through one `gateway run` worker.

    python bench/fairness.py [--seconds 30] [--brokers tansu,kafka]

On each broker: an HTTP receiver in its own process answers /slow after 300 ms (20
connections: about 66 a second), /fast at once and /down with 503; the bots' events are
published for ``--seconds`` at 3 x 66/s, 50/s and 20/s. It prints, and writes to
bench/results/fairness-*.json with a plot (fairness-latest.png):

* the slow endpoint: delivered, dead-lettered, deferrals, attempts that failed (none
  should), the time to deliver everything;
* the fast bot: publish-to-receipt latency p50/p95/p99/max, and the seconds (since
  publishing began) in which any of its events took over 100 ms;
* the down endpoint: requests per event (its circuit opens);
* over time, per endpoint: deliveries per second and requests in flight (at the receiver).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from gateway.codec import Codec  # noqa: E402
from gateway.config import Config  # noqa: E402
from gateway.events import parse_event  # noqa: E402
from gateway.ops import new_endpoint  # noqa: E402
from gateway.publisher import Publisher  # noqa: E402
from gateway.records import DeadLetter, Delivery  # noqa: E402
from gateway.store import (  # noqa: E402
    Topics,
    create_topics,
    save_endpoint,
)
from gateway.streaming import Broker  # noqa: E402

SLOW_SECONDS = 0.3
CONNECTIONS = 20
BOTS = {"slow": "6434515b-8541-4861-bb24-8acd6e77e8c4", "fast": "0b0b0b0b-1111-4222-8333-444444444444",
        "down": "d0d0d0d0-2222-4333-8444-555555555555"}


# -- the receiver (its own process) -------------------------------------------------------------


def serve(port: int, out: str) -> None:
    """Answer /slow after 300 ms, /fast at once, /down with 503; on SIGTERM write every
    request as JSON lines: path, event id, start, end, status."""
    log: list[tuple[str, str, float, float, int]] = []

    class Http(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: Any = transport
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
                head = self.buffer[:end]
                length, event_id = 0, ""
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                    elif name.strip().lower() == b"webhook-id":
                        event_id = value.strip().decode()
                if len(self.buffer) < end + 4 + length:
                    return
                self.buffer = self.buffer[end + 4 + length:]
                path = head.split(b" ", 2)[1].decode()
                if head.startswith(b"GET"):
                    body = json.dumps({p: sum(1 for e in log if e[0] == p) for p in ("/slow", "/fast", "/down")})
                    self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: " + str(len(body)).encode()
                                         + b"\r\n\r\n" + body.encode())
                    continue
                started = time.time()
                status = 503 if path == "/down" else 204
                delay = SLOW_SECONDS if path == "/slow" else 0.0

                def answer(path: str = path, event_id: str = event_id, started: float = started,
                           status: int = status) -> None:
                    log.append((path, event_id, started, time.time(), status))
                    reason = b"No Content" if status == 204 else b"Service Unavailable"
                    self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-length: 0\r\n\r\n" % (status, reason))

                if delay:
                    asyncio.get_running_loop().call_later(delay, answer)
                else:
                    answer()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        server = await loop.create_server(Http, "127.0.0.1", port, backlog=1024)
        print("ready", flush=True)
        await stop.wait()
        server.close()
        Path(out).write_text("".join(json.dumps(entry) + "\n" for entry in log))

    asyncio.run(main())


# -- the run ---------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def counts(port: int) -> dict[str, int]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
        return json.load(r)  # type: ignore[no-any-return]


def publish_at(config: Config, bot: str, count: int, rate: float, stamps: dict[str, float]) -> None:
    base = {"event": "MESSAGE", "botId": bot, "role": "USER", "message": "hi"}
    events = [parse_event(dict(base, sessionId=str(uuid.uuid4()), messageId=str(uuid.uuid4())))
              for _ in range(count)]
    with Publisher(config) as publisher:
        # A first send waits for the producer's metadata and connections: paid here, on an
        # event for no bot, it is not counted as the gateway's latency for the first chunk.
        nobody = {"botId": str(uuid.uuid4()), "sessionId": str(uuid.uuid4()), "messageId": str(uuid.uuid4())}
        warm = parse_event(base | nobody)
        assert all(result.ok for result in publisher.publish_many([warm], timeout=60))
        chunk = max(1, int(rate / 10))
        started = time.monotonic()
        for i in range(0, count, chunk):
            wait = started + i / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            # stamped now: the latency is from publishing, not from building the events
            batch = [parse_event(e.body | {"eventId": e.event_id}) for e in events[i:i + chunk]]
            for result in publisher.publish_many(batch, timeout=60):
                assert result.ok, result.error
                stamps[result.event.event_id] = result.event.occurred_at / 1000


def run_on(broker: Any, name: str, seconds: int, workdir: Path) -> dict[str, Any]:
    out = workdir / f"requests-{name}.jsonl"
    port = free_port()
    receiver = subprocess.Popen([sys.executable, __file__, "receiver", str(port), str(out)],
                                stdout=subprocess.PIPE, text=True)
    assert receiver.stdout is not None and receiver.stdout.readline().strip() == "ready"
    config = Config(bootstrap_servers=broker.bootstrap, topic_prefix=f"fair-{uuid.uuid4().hex[:6]}", partitions=6,
                    retry_delays=(5, 10, 15), defer_delays=(1, 5, 10), session_timeout_ms=6000,
                    allow_private_networks=True)
    create_topics(config)
    endpoints = {kind: new_endpoint(bot_id=BOTS[kind], url=f"http://127.0.0.1:{port}/{kind}") for kind in BOTS}
    for endpoint in endpoints.values():
        save_endpoint(config, endpoint)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")} | config.to_env() | {
        "GATEWAY_LOG_LEVEL": "warning", "GATEWAY_ENDPOINT_CONCURRENCY": str(CONNECTIONS)}
    worker = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--no-metrics"], env=env)
    time.sleep(8)  # every tier joined its group
    capacity = CONNECTIONS / SLOW_SECONDS
    plan = {"slow": (int(3 * capacity * seconds), 3 * capacity), "fast": (50 * seconds, 50.0),
            "down": (20 * seconds, 20.0)}
    stamps: dict[str, dict[str, float]] = {kind: {} for kind in plan}
    started = time.time()
    threads = [threading.Thread(target=publish_at, args=(config, BOTS[kind], n, rate, stamps[kind]))
               for kind, (n, rate) in plan.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    deadline = time.time() + 600
    while counts(port)["/slow"] < plan["slow"][0] and time.time() < deadline:
        time.sleep(1)
    slow_done = time.time() - started
    time.sleep(5)
    worker.send_signal(signal.SIGTERM)
    worker.wait(60)
    receiver.send_signal(signal.SIGTERM)
    receiver.wait(30)
    requests = [json.loads(line) for line in out.read_text().splitlines()]

    codec = Codec()
    topics = Topics.from_config(config)
    sys.path.insert(0, str(HERE.parent))
    from tests.conftest import read_topic

    dead = [DeadLetter.from_record(codec.decode(m.value())[1]) for m in read_topic(config, topics.dlq)]
    deferrals = sum(len(read_topic(config, rung.topic, timeout=60)) for rung in topics.deferral_tiers)
    failed_slow = sum(1 for tier in topics.tiers[1:] for m in read_topic(config, tier.topic, timeout=60)
                      if Delivery.from_record(codec.decode(m.value())[1]).endpoint_id == endpoints["slow"].id)
    by_path: dict[str, list[list[Any]]] = {f"/{k}": [] for k in BOTS}
    for entry in requests:
        by_path[entry[0]].append(entry)
    fast_arrival = {e[1]: e[2] for e in by_path["/fast"]}
    latencies = sorted(fast_arrival[i] - t for i, t in stamps["fast"].items() if i in fast_arrival)
    late: dict[int, list[float]] = {}  # when the fast bot's tail happened: second published -> latencies
    for i, t in stamps["fast"].items():
        if i in fast_arrival and fast_arrival[i] - t > 0.1:
            late.setdefault(int(t - started), []).append(fast_arrival[i] - t)

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000, 1)

    horizon = int(max(e[3] for e in requests) - started) + 1
    timeline: dict[str, dict[str, list[float]]] = {}
    for path, entries in by_path.items():
        rate = [0.0] * horizon
        for e in entries:
            rate[min(horizon - 1, int(e[3] - started))] += 1
        in_flight = [float(sum(1 for e in entries if e[2] <= started + t / 10 < e[3])) for t in range(horizon * 10)]
        timeline[path] = {"per_second": rate, "in_flight_tenths": in_flight}
    slow_id = endpoints["slow"].id
    down_id = endpoints["down"].id
    return {
        "broker": name,
        "plan": {k: {"events": n, "per_second": round(r, 1)} for k, (n, r) in plan.items()},
        "slow": {"delivered": len({e[1] for e in by_path["/slow"]}), "published": plan["slow"][0],
                 "dead_lettered": sum(1 for d in dead if d.delivery and d.delivery.endpoint_id == slow_id),
                 "failed_attempts": failed_slow, "deferrals": deferrals, "all_delivered_after_s": round(slow_done, 1),
                 "max_in_flight": max(timeline["/slow"]["in_flight_tenths"])},
        "fast": {"delivered": len(fast_arrival), "published": plan["fast"][0], "p50_ms": pct(50), "p95_ms": pct(95),
                 "p99_ms": pct(99), "max_ms": round(latencies[-1] * 1000, 1),
                 "over_100ms_by_second": {second: {"events": len(v), "worst_ms": round(max(v) * 1000, 1)}
                                          for second, v in sorted(late.items())}},
        "down": {"requests": len(by_path["/down"]), "events": plan["down"][0],
                 "requests_per_event": round(len(by_path["/down"]) / plan["down"][0], 3),
                 "dead_lettered": sum(1 for d in dead if d.delivery and d.delivery.endpoint_id == down_id)},
        "timeline": timeline,
    }


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(results["brokers"].values())
    fig, axes = plt.subplots(len(runs), 2, figsize=(13, 4.2 * len(runs)), squeeze=False)
    for (ax1, ax2), run in zip(axes, runs, strict=True):
        for endpoint, series in run["timeline"].items():
            ax1.plot(range(len(series["per_second"])), series["per_second"], label=endpoint)
            tenths = series["in_flight_tenths"]
            ax2.plot([t / 10 for t in range(len(tenths))], tenths, label=endpoint, linewidth=0.8)
        ax1.set_title(f"{run['broker']}: deliveries (answers) per second, per endpoint")
        ax2.set_title(f"{run['broker']}: requests in flight at the receiver, per endpoint")
        for ax in (ax1, ax2):
            ax.set_xlabel("seconds since publishing began")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def replot(results_json: Path) -> None:
    """Draw the plot again from a results file (``--plot FILE``)."""
    plot(json.loads(results_json.read_text()), results_json.parent / "fairness-latest.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--brokers", default="tansu,kafka")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--plot", type=Path, help="only draw fairness-latest.png again from this results file")
    args = parser.parse_args()
    if args.plot:
        if not args.plot.is_file():
            parser.error(f"--plot {args.plot}: no such results file (bench/results/fairness-*.json)")
        replot(args.plot)
        return
    workdir = args.out / "tmp-fairness"
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "brokers": {},
    }
    for name in [b.strip() for b in args.brokers.split(",") if b.strip()]:
        print(f"[{name}] {args.seconds} s of slow (3x capacity), fast and down …", flush=True)
        if name == "tansu":
            with Broker(port=free_port(), log=workdir / "broker.log") as broker:
                results["brokers"][name] = run_on(broker, "bundled (Tansu)", args.seconds, workdir)
        else:
            from tests.apache_kafka import KafkaNode, kafka_version

            with KafkaNode(workdir / "kafka") as node:
                results["brokers"][name] = run_on(node, f"Apache Kafka {kafka_version()}", args.seconds, workdir)
        run = results["brokers"][name]
        print(json.dumps({k: v for k, v in run.items() if k != "timeline"}, indent=1), flush=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (args.out / f"fairness-{stamp}.json").write_text(json.dumps(results, indent=1))
    (args.out / "fairness-latest.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "fairness-latest.png")
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
    print(f"results: {args.out}/fairness-latest.json, fairness-latest.png")


if __name__ == "__main__":
    if sys.argv[1:2] == ["receiver"]:
        serve(int(sys.argv[2]), sys.argv[3])
    else:
        main()
