"""Signing secrets end to end: rotation signs with both secrets during the grace, and no
secret ever shows up where it should not (worker logs, metrics, retry and dead-letter
records, `endpoints list`, `dlq` output, exception messages). Also: a 410 Gone disables
its endpoint for good.

Real broker, real `gateway run` processes, real HTTP receiver.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.codec import Codec
from gateway.config import Config
from gateway.events import parse_event
from gateway.ops import new_endpoint
from gateway.publisher import Publisher
from gateway.records import DeadLetter, Endpoint
from gateway.signing import new_secret, secret_key
from gateway.store import save_endpoint
from gateway.verify import WebhookVerificationError, verify

from .conftest import free_port, gateway_env, read_topic, run_gateway
from .receiver import Receiver, Request

# Signing, rotation and a 410's disabling are the gateway's own logic over HTTP; the
# endpoint table they write is shown on Apache Kafka by test_endpoints_cli, test_manage and
# the compaction test. Run on the bundled broker only, to keep CI within its time.
pytestmark = [pytest.mark.integration, pytest.mark.brokers("tansu")]

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "events.jsonl"
BOT = "6434515b-8541-4861-bb24-8acd6e77e8c4"
OTHER_BOT = "0b0b0b0b-1111-4222-8333-444444444444"


def documented() -> list[dict[str, Any]]:
    return [json.loads(line) for line in EXAMPLES.read_text().splitlines() if line.strip()]


def register(config: Config, url: str, secret: str, *, bot: str = BOT) -> Endpoint:
    endpoint = new_endpoint(bot_id=bot, url=url, secret=secret)
    save_endpoint(config, endpoint)
    return endpoint


def publish(config: Config, events: list[dict[str, Any]]) -> list[str]:
    with Publisher(config) as publisher:
        results = publisher.publish_many([parse_event(e) for e in events])
    assert all(r.ok for r in results)
    return [r.event.event_id for r in results]


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def updates_of(log: str, endpoint_id: str) -> list[str]:
    """The worker's "endpoint updated" log lines for one endpoint."""
    return [line for line in log.splitlines()
            if "endpoint updated" in line and f"endpoint_id={endpoint_id}" in line]


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.1)


def signatures(request: Request) -> list[str]:
    return request.headers["webhook-signature"].split(" ")


def needles(secret: str) -> dict[str, bytes]:
    """Every form a leaked secret could take in text or in raw record bytes."""
    encoded = secret.removeprefix("whsec_")
    key = base64.b64decode(encoded)
    return {"secret": secret.encode(), "base64 key": encoded.encode(), "key bytes": key,
            "key hex": key.hex().encode()}


class MetricsWorker:
    """A `gateway run` of the retry tiers with /metrics and DEBUG logs: worker_factory
    always passes --no-metrics and logs at INFO."""

    def __init__(self, config: Config, log: Path, tiers: str) -> None:
        self.port = free_port()
        self.log = log
        self._file = open(log, "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--tiers", tiers, "--metrics-port", str(self.port)],
            stdout=self._file, stderr=subprocess.STDOUT,
            env=gateway_env(config, GATEWAY_LOG_LEVEL="debug"),
        )
        wait_until(lambda: self.text().count("partitions assigned") >= len(tiers.split(",")), 30,
                   "the metrics worker's partitions")

    def text(self) -> str:
        assert self.process.poll() is None, self.log.read_text()
        return self.log.read_bytes().decode(errors="replace")

    def scrape(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.port}/metrics", trust_env=False, timeout=5).text

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._file.close()


@pytest.fixture
def metrics_worker(topics: Config, tmp_path: Path) -> Iterator[Any]:
    started: list[MetricsWorker] = []

    def make(tiers: str, config: Config | None = None) -> MetricsWorker:
        worker = MetricsWorker(config or topics, tmp_path / f"metrics-worker-{len(started)}.log", tiers)
        started.append(worker)
        return worker

    yield make
    for worker in started:
        worker.stop()


def test_rotation_signs_with_both_secrets_and_no_secret_leaks_anywhere(
    topics: Config, receiver: Receiver, worker_factory: Any, metrics_worker: Any
) -> None:
    receiver.respond("/fail", lambda request, seen: 500)
    secrets = {"ok": new_secret(), "fail": new_secret(), "rotated": new_secret()}
    ok_ep = register(topics, receiver.url("/ok"), secrets["ok"])
    register(topics, receiver.url("/fail"), secrets["fail"])
    rot_ep = register(topics, receiver.url("/rot"), secrets["rotated"])
    # A registration the platform wrote around `endpoints add`: its secret's key is too
    # short to sign with. Sending raises InvalidSecret, whose message must not carry it.
    secrets["broken"] = "whsec_" + base64.b64encode(b"leaky-secret-1").decode()
    broken = Endpoint(id=str(uuid.uuid4()), bot_id=OTHER_BOT, url=receiver.url("/broken"),
                      secret=secrets["broken"], created_at=1, updated_at=1)
    save_endpoint(topics, broken)

    # /fail fails every request: its circuit must stay closed for its 16 attempts to be made.
    topics = topics.replace(circuit_failures=1000, circuit_failure_rate=0.0)
    events_worker = worker_factory(topics, "--tiers", "events")
    retry_tiers = ",".join(f"retry-{d}s" for d in topics.retry_delays)
    retry_worker = metrics_worker(retry_tiers, topics)

    docs = documented()
    first_ids = publish(topics, docs)
    publish(topics, [dict(docs[0], botId=OTHER_BOT)])

    # Successes, and failures all the way to the dead-letter topic (delays 1, 2, 3 s).
    receiver.wait_for(lambda: len(receiver.at("/ok")) >= 4 and len(receiver.at("/rot")) >= 4, 20,
                      "the first deliveries")
    receiver.wait_for(lambda: len(receiver.at("/fail")) >= 16, 30, "4 attempts of 4 events at /fail")
    dead = [DeadLetter.from_record(Codec().decode(m.value())[1])
            for m in read_topic(topics, f"{topics.topic_prefix}.dlq", expect=5, timeout=20)]
    assert sorted(d.reason for d in dead) == ["internal_error"] + ["retries_exhausted"] * 4
    assert receiver.at("/broken") == []
    for request in receiver.at("/ok"):
        assert len(signatures(request)) == 1
        verify(secrets["ok"], request.headers, request.body)
    for request in receiver.at("/rot"):
        verify(secrets["rotated"], request.headers, request.body)

    # Rotate /rot's secret (generated, 1 h grace) and /ok's (given, 2 s grace).
    rotated = ok(run_gateway(topics, "endpoints", "rotate-secret", rot_ep.id, "--grace", "1h"))
    match = re.search(r"secret\s+(whsec_\S+)", rotated.stdout)
    assert match, rotated.stdout
    secrets["rotated-new"] = match.group(1)
    assert secrets["rotated-new"] != secrets["rotated"]
    secret_key(secrets["rotated-new"])  # a usable secret
    secrets["ok-new"] = new_secret()
    rotated_ok = ok(run_gateway(topics, "endpoints", "rotate-secret", ok_ep.id,
                                "--secret", secrets["ok-new"], "--grace", "2s"))
    rotated_at = time.monotonic()
    assert secrets["ok-new"] in rotated_ok.stdout  # printed once, as documented
    wait_until(lambda: len(updates_of(events_worker.text(), rot_ep.id)) >= 2
               and len(updates_of(events_worker.text(), ok_ep.id)) >= 2, 15,
               "the events worker to apply both rotations")
    time.sleep(max(0.0, 2.5 - (time.monotonic() - rotated_at)))  # /ok's grace is over

    (second_id,) = publish(topics, [dict(docs[0], messageId=str(uuid.uuid4()))])
    receiver.wait_for(lambda: any(r.event_id == second_id for r in receiver.at("/rot"))
                      and any(r.event_id == second_id for r in receiver.at("/ok")), 15,
                      "deliveries after the rotation")
    (during_grace,) = [r for r in receiver.at("/rot") if r.event_id == second_id]
    assert len(signatures(during_grace)) == 2
    assert all(s.startswith("v1,") for s in signatures(during_grace))
    verify(secrets["rotated"], during_grace.headers, during_grace.body)      # the old secret
    verify(secrets["rotated-new"], during_grace.headers, during_grace.body)  # and the new one
    with pytest.raises(WebhookVerificationError):
        verify(secrets["ok"], during_grace.headers, during_grace.body)
    (after_grace,) = [r for r in receiver.at("/ok") if r.event_id == second_id]
    assert len(signatures(after_grace)) == 1
    verify(secrets["ok-new"], after_grace.headers, after_grace.body)
    with pytest.raises(WebhookVerificationError):
        verify(secrets["ok"], after_grace.headers, after_grace.body)

    # Let the second event's failures reach the retry tiers, then look everywhere.
    receiver.wait_for(lambda: sum(r.event_id == second_id for r in receiver.at("/fail")) >= 2, 15,
                      "a retry of the second event")
    texts: dict[str, str] = {
        "events worker log": events_worker.text(),
        "retry worker log (debug)": retry_worker.text(),
        "metrics": retry_worker.scrape(),
        "rotate-secret stderr": rotated.stderr + rotated_ok.stderr,
    }
    # Which worker attempts an endpoint's deliveries is its owner's business (the deliveries
    # topic): either may have dead-lettered /fail's events and tried /broken.
    assert 'gateway_dead_letters_total{reason="retries_exhausted"}' in texts["metrics"], texts["metrics"]
    assert "attempt failed inside the gateway" in texts["events worker log"] + texts["retry worker log (debug)"]
    commands = [("endpoints", "list"), ("endpoints", "list", "--json"),
                ("endpoints", "list", "--bot-id", BOT, "--json"),
                ("dlq", "list"), ("dlq", "list", "--json"), ("dlq", "stats", "--json"),
                ("dlq", "show", first_ids[0]), ("dlq", "replay", "--dry-run")]
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        results = list(pool.map(lambda args: run_gateway(topics, *args), commands))
    for args, result in zip(commands, results, strict=True):
        assert result.returncode in (0, 1), (args, result.stderr)
        texts[" ".join(args)] = result.stdout + result.stderr
    assert "retries_exhausted" in texts["dlq show " + first_ids[0]]
    records: dict[str, bytes] = {}
    for tier in ("dlq", *retry_tiers.split(",")):
        messages = read_topic(topics, f"{topics.topic_prefix}.{tier}")
        assert messages, tier
        records[tier] = b"\n".join(
            (m.key() or b"") + (m.value() or b"") + b"".join(k.encode() + v for k, v in m.headers() or [])
            for m in messages
        )

    # Rotation output shows the new secret once, never the old one.
    assert secrets["rotated"] not in rotated.stdout and secrets["ok"] not in rotated_ok.stdout
    leaks = []
    for name, secret in secrets.items():
        for form, needle in needles(secret).items():
            for where, text in texts.items():
                if form != "key bytes" and needle.decode() in text:
                    leaks.append(f"{name} secret ({form}) in {where}")
            for where, raw in records.items():
                if needle in raw:
                    leaks.append(f"{name} secret ({form}) in the raw records of {where}")
    assert leaks == []

    # The searches can find a secret where one is meant to be: the endpoints topic holds
    # them, and `list --show-secrets` prints the current ones.
    stored = b"".join(m.value() or b"" for m in read_topic(topics, f"{topics.topic_prefix}.endpoints"))
    shown = ok(run_gateway(topics, "endpoints", "list", "--show-secrets")).stdout
    for name in ("ok-new", "fail", "rotated-new", "broken"):
        assert secrets[name].encode() in stored and secrets[name] in shown, name
    assert secrets["rotated"].encode() in stored  # kept as the previous secret for the grace


def test_secrets_stay_out_of_reprs_and_cli_errors(topics: Config) -> None:
    old, new = new_secret(), new_secret()
    endpoint = Endpoint(id="e", bot_id=BOT, url="https://example.com/hook", secret=new,
                        created_at=1, updated_at=1, previous_secret=old,
                        previous_secret_expires_at=2)
    for text in (repr(endpoint), str(endpoint), f"{endpoint!r}", repr([endpoint])):
        for secret in (old, new):
            assert secret not in text and secret.removeprefix("whsec_") not in text

    registered = register(topics, "https://example.com/hook", old)
    # A mistyped secret is refused without being echoed.
    not_base64 = "whsec_" + "not-base64!" + new.removeprefix("whsec_")
    too_short = "whsec_" + base64.b64encode(b"short-but-secret").decode()[:-4]
    for bad in (not_base64, too_short, new.removeprefix("whsec_")):
        for args in (("endpoints", "rotate-secret", registered.id, "--secret", bad),
                     ("endpoints", "add", "--bot-id", BOT, "--url", "https://example.com/h",
                      "--secret", bad)):
            result = run_gateway(topics, *args)
            assert result.returncode != 0, (args, result.stdout)
            output = result.stdout + result.stderr
            assert "error" in output
            assert bad not in output and bad.removeprefix("whsec_") not in output, output


def test_410_gone_dead_letters_once_and_disables_the_endpoint(
    topics: Config, receiver: Receiver, worker_factory: Any
) -> None:
    receiver.respond("/gone", lambda request, seen: 410)
    gone = register(topics, receiver.url("/gone"), new_secret())
    register(topics, receiver.url("/ok"), new_secret())
    worker = worker_factory(topics)
    (first_id,) = publish(topics, documented()[:1])

    receiver.wait_for(lambda: len(receiver.at("/gone")) >= 1 and len(receiver.at("/ok")) >= 1, 20,
                      "the first event at both endpoints")
    messages = read_topic(topics, f"{topics.topic_prefix}.dlq", expect=1, timeout=15)
    (dead,) = [DeadLetter.from_record(Codec().decode(m.value())[1]) for m in messages]
    assert dead.reason == "gone"
    assert dead.detail == "the endpoint answered 410 Gone"
    assert dead.delivery is not None
    assert (dead.delivery.endpoint_id, dead.delivery.event_id) == (gone.id, first_id)
    assert [(a.tier, a.status) for a in dead.delivery.attempts] == [("events", 410)]

    def listed_enabled() -> bool | None:
        rows = [json.loads(line) for line in
                ok(run_gateway(topics, "endpoints", "list", "--json")).stdout.splitlines()]
        (row,) = [r for r in rows if r["id"] == gone.id]
        assert row["url"] == gone.url and row["secret"] != gone.secret
        return bool(row["enabled"])

    deadline = time.monotonic() + 10
    while listed_enabled():
        assert time.monotonic() < deadline, "the endpoint was not disabled within 10 s"
        time.sleep(0.5)
    wait_until(lambda: any("enabled=False" in line for line in updates_of(worker.text(), gone.id)),
               10, "the worker to apply the disabled endpoint")

    (later_id,) = publish(topics, documented()[1:2])
    receiver.wait_for(lambda: any(r.event_id == later_id for r in receiver.at("/ok")), 15,
                      "the later event at the healthy endpoint")
    time.sleep(4)  # a retry tier (1, 2, 3 s) would have tried again by now
    assert [r.event_id for r in receiver.at("/gone")] == [first_id]  # exactly one attempt, ever
    assert [DeadLetter.from_record(Codec().decode(m.value())[1]).reason
            for m in read_topic(topics, f"{topics.topic_prefix}.dlq")] == ["gone"]
    assert read_topic(topics, f"{topics.topic_prefix}.retry-1s") == []
    assert "endpoint disabled: it answered 410 Gone" in worker.text()
