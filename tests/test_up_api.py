"""`gateway up` with its API and the first-delivery walk-through, run as a newcomer runs
it: the commands the banner prints, copied, give a verified webhook within a minute, with
no warning on the way; the API answers with the token the banner shows, and serves the
metrics the banner lists."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from .conftest import free_port
from .test_listen import ListenProcess

ROOT = Path(__file__).resolve().parents[1]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return env | {"PYTHONUNBUFFERED": "1"} | extra


def test_the_banners_walk_through_gives_a_verified_webhook_within_a_minute(tmp_path: Path) -> None:
    started = time.monotonic()
    port, metrics_port, api_port, listen_port = free_port(), free_port(), free_port(), free_port()
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "gateway", "up", "--port", str(port), "--metrics-port", str(metrics_port),
             "--api-port", str(api_port)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env=clean_env(GATEWAY_RETRY_DELAYS="1,2,3", GATEWAY_SESSION_TIMEOUT_MS="2000"))
    listener = None
    try:
        deadline = time.monotonic() + 45
        while "Ctrl-C stops everything" not in log.read_text():
            assert up.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        banner = log.read_text()
        starts = ("gateway listen", "export ", "gateway endpoints", "gateway publish")
        commands = [line.strip() for line in banner.splitlines() if line.strip().startswith(starts)]
        listen, export, add, publish = commands
        token = re.search(r"token (\S+)", banner)
        assert token is not None and f"http://127.0.0.1:{api_port}/v1" in banner
        assert f"http://127.0.0.1:{metrics_port}/metrics" in banner and f"http://127.0.0.1:{api_port}/metrics" in banner
        assert "GATEWAY_ALLOW_PRIVATE_NETWORKS=true" in export and f"127.0.0.1:{port}" in export

        # Second terminal: the listener, as printed (on a port of the test's own).
        args = shlex.split(listen)
        assert args[:4] == ["gateway", "listen", "--port", "8000"]
        listener = ListenProcess(tmp_path, None, *args[4:], port=listen_port)
        env = dict(item.split("=", 1) for item in shlex.split(export)[1:])

        # Third terminal: register and publish, exactly as printed.
        added = subprocess.run(
            [sys.executable, "-m", "gateway", *shlex.split(add.replace(":8000/", f":{listen_port}/"))[1:]],
            capture_output=True, text=True, timeout=60, env=clean_env(**env))
        assert added.returncode == 0, added.stderr
        assert "warning" not in added.stderr.lower() and "blocked" not in added.stderr, added.stderr
        published = subprocess.run([sys.executable, "-m", "gateway", *shlex.split(publish)[1:]], cwd=ROOT,
                                   capture_output=True, text=True, timeout=60, env=clean_env(**env))
        assert published.returncode == 0, published.stderr
        got = listener.wait_for(4, 30)
        assert all(r["verified"] for r in got), got
        assert sorted(r["webhookId"] for r in got) == sorted(published.stdout.split())
        assert time.monotonic() - started < 60

        # The API, with the banner's token.
        with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=30) as api:
            assert api.get("/v1/endpoints").status_code == 401
            auth = {"authorization": f"Bearer {token.group(1)}"}
            [endpoint] = api.get("/v1/endpoints", headers=auth).json()["data"]
            assert endpoint["url"] == f"http://127.0.0.1:{listen_port}/hook"
            deadline = time.monotonic() + 15
            while len(api.get("/v1/deliveries", headers=auth, params={"status": "success"}).json()["data"]) < 4:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            tested = api.post(f"/v1/endpoints/{endpoint['id']}/test", headers=auth, json={"malformed": True}).json()
            assert tested["ok"] is True, json.dumps(tested)
            # The API's metrics, as the banner lists them: no token, its requests counted.
            scraped = api.get("/metrics")
            assert scraped.status_code == 200
            assert 'gateway_api_requests_total{method="GET",route="/v1/endpoints",status="401"} 1.0' in scraped.text
            assert 'route="/v1/endpoints/{id}/test",status="200"} 1.0' in scraped.text
    finally:
        if listener is not None:
            listener.stop()
        os.killpg(up.pid, signal.SIGINT)
        code = up.wait(60)
    assert code == 0, log.read_text()


def test_up_refuses_an_api_off_loopback_without_tokens(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "up", "--port", str(free_port()), "--metrics-port", str(free_port()),
         "--api-host", "0.0.0.0", "--api-port", str(free_port())],
        capture_output=True, text=True, timeout=90, env=clean_env())
    assert result.returncode == 1, result.stderr
    assert "needs GATEWAY_API_TOKENS" in result.stderr
