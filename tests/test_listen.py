"""`gateway listen`: its decisions without a socket, and the real command receiving the
real pipeline's webhooks (verified, failed on purpose, retried)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Config
from gateway.ops import Behaviour, Listener, Received, judge, render
from gateway.signing import new_secret, secret_key, signature_header

from .conftest import free_port, gateway_env, run_gateway

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "events.jsonl"
BOT = "6434515b-8541-4861-bb24-8acd6e77e8c4"


def signed(secret: str, body: bytes, *, stamp: int | None = None, msg_id: str = "msg_1") -> dict[str, str]:
    stamp = int(time.time()) if stamp is None else stamp
    return {"Webhook-Id": msg_id, "Webhook-Timestamp": str(stamp),
            "Webhook-Signature": signature_header((secret_key(secret),), msg_id, stamp, body)}


def test_judge_verifies_with_any_of_the_secrets() -> None:
    old, new = new_secret(), new_secret()
    body = b'{"event":"MESSAGE"}'
    assert judge([old, new], "POST", "/hook", signed(new, body), body).verified
    assert judge([old, new], "POST", "/hook", signed(old, body), body).verified
    other = judge([old], "POST", "/hook", signed(new, body), body)
    assert not other.verified and other.reason == "no matching signature"
    stale = judge([old], "POST", "/hook", signed(old, body, stamp=int(time.time()) - 600), body)
    assert not stale.verified and stale.reason == "message timestamp too old"
    bare = judge([old], "POST", "/hook", {}, body)
    assert not bare.verified and "missing" in (bare.reason or "")
    assert judge([old], "POST", "/hook", signed(old, body), body).event_type == "MESSAGE"


def test_behaviour_answers_401_to_rejected_and_fails_the_share_asked() -> None:
    assert Behaviour().answer(False) == 401
    assert Behaviour(status=500).answer(True) == 500
    behaviour = Behaviour(fail_rate=0.3, rng=random.Random(7))
    answers = [behaviour.answer(True) for _ in range(2000)]
    assert set(answers) == {200, 500}
    assert 0.25 < answers.count(500) / len(answers) < 0.35
    assert all(Behaviour(fail_rate=1.0).answer(True) == 500 for _ in range(10))
    for bad in ({"fail_rate": 1.5}, {"status": 42}, {"delay_ms": -1}):
        with pytest.raises(ValueError):
            Behaviour(**bad)


def test_render_escapes_what_would_rewrite_the_terminal() -> None:
    body = json.dumps({"event": "MESSAGE", "message": "hi \x1b[2J\u202e\x9b"}, ensure_ascii=False).encode()
    received = Received(at=0.0, method="POST", path="/hook", headers={"webhook-id": "id\x1b]0;x\x07"}, body=body,
                        verified=True, reason=None, status=200)
    text = render(received)
    assert "\x1b" not in text and "\u202e" not in text and "\x9b" not in text and "\x07" not in text
    assert "VERIFIED" in text and "MESSAGE" in text and "\\x1b" in text
    assert "\x1b[32m" in render(received, color=True)  # the mark alone is colored


def test_listener_serves_keep_alive_and_answers_as_told() -> None:
    import http.client

    secret = new_secret()
    got: list[Received] = []
    listener = Listener(host="127.0.0.1", port=0, secrets=[secret], behaviour=Behaviour(status=202),
                        on_request=got.append).start()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", listener.port, timeout=5)
        body = b'{"event":"TICKET"}'
        for headers, expected in ((signed(secret, body), 202), ({}, 401), (signed(secret, body), 202)):
            connection.request("POST", "/hook", body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            assert response.status == expected
        connection.close()
    finally:
        listener.stop()
    assert [r.verified for r in got] == [True, False, True]
    assert [r.status for r in got] == [202, 401, 202]


class ListenProcess:
    """A real `gateway listen --json` subprocess; its requests read from its stdout."""

    def __init__(self, tmp: Path, config: Config | None, *args: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.out = tmp / f"listen-{self.port}.out"
        self.err = tmp / f"listen-{self.port}.err"
        env = gateway_env(config) if config else {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway", "listen", "--json", "--port", str(self.port), *args],
                stdout=out, stderr=err, env=env)
        deadline = time.monotonic() + 20
        while "listening on" not in self.err.read_text():
            assert self.process.poll() is None, self.err.read_text()
            assert time.monotonic() < deadline, self.err.read_text()
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def requests(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]

    def wait_for(self, count: int, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.requests()) < count:
            assert time.monotonic() < deadline, f"{len(self.requests())} of {count} requests:\n{self.out.read_text()}"
            time.sleep(0.1)
        return self.requests()

    def stop(self) -> str:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(10)
        return self.err.read_text()


@pytest.mark.integration
def test_listen_verifies_the_pipelines_webhooks_and_fails_on_demand(
    topics: Config, worker_factory: Any, tmp_path: Path
) -> None:
    """The first-delivery walk-through on the real pipeline: a listener with the
    endpoint's secret sees the four documented events, verified; a second listener told
    to fail (--status 503) sees the same event again on each retry, and its secret-less
    twin rejects what it cannot verify."""
    secret = new_secret()
    ok = ListenProcess(tmp_path, topics, "--secret", secret)
    failing = ListenProcess(tmp_path, topics, "--secret", secret, "--status", "503", "--delay", "50")
    wrong = ListenProcess(tmp_path, topics, "--secret", new_secret())
    try:
        for listener in (ok, failing, wrong):
            added = run_gateway(topics, "endpoints", "add", "--bot-id", BOT, "--url", listener.url,
                                "--secret", secret)
            assert added.returncode == 0, added.stderr
            assert "warning" not in added.stderr  # the tests' config allows loopback, like `gateway up`
        # Every retry reaches the listener: its circuit never opens.
        worker_factory(topics.replace(circuit_failures=1000, circuit_failure_rate=0.0))
        published = run_gateway(topics, "publish", str(EXAMPLES))
        assert published.returncode == 0, published.stderr
        ids = published.stdout.split()

        got = ok.wait_for(4, 30)
        assert sorted(r["webhookId"] for r in got) == sorted(ids)
        assert all(r["verified"] and r["status"] == 200 for r in got)
        assert {r["event"] for r in got} == {"MESSAGE", "RATE_MESSAGE", "TICKET", "CREATE_LEAD"}
        assert all(r["body"]["botId"] == BOT for r in got)

        rejected = wrong.wait_for(4, 30)
        assert all(not r["verified"] and r["status"] == 401 and r["reason"] == "no matching signature"
                   for r in rejected)

        # Retry delays are 1, 2 and 3 s: each event comes 4 times, then is dead-lettered.
        seen = failing.wait_for(16, 40)
        assert all(r["verified"] and r["status"] == 503 for r in seen)
        assert {i: sum(r["webhookId"] == i for r in seen) for i in ids} == dict.fromkeys(ids, 4)
    finally:
        summaries = [listener.stop() for listener in (ok, failing, wrong)]
    assert "4 verified, 0 rejected" in summaries[0]
    assert "stopped: 0 verified, " in summaries[2]  # (a 401 is retried like any failure)


def test_listen_without_a_secret_generates_one_and_prints_the_registration(tmp_path: Path) -> None:
    config = Config(topic_prefix=f"listen-{uuid.uuid4().hex[:6]}")
    listener = ListenProcess(tmp_path, config)
    text = listener.stop()
    assert "signing secret (generated): whsec_" in text
    secret = text.split("signing secret (generated): ")[1].split()[0]
    assert f"--url {listener.url} --secret {secret}" in text
    bad = subprocess.run([sys.executable, "-m", "gateway", "listen", "--secret", "nope"], capture_output=True,
                         text=True, timeout=30, env={k: v for k, v in os.environ.items()
                                                      if not k.startswith("GATEWAY_")})
    assert bad.returncode == 2 and "whsec_" in bad.stderr
