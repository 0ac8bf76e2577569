"""A real Prometheus scraping a real gateway under load, and a real management API
(`gateway api`) that callers use meanwhile: every query of the Grafana dashboard and of
the alert rules must return data, the alerts the load provokes must become active, what
the operations panels show must move (a circuit open, deferrals onto a rung, history
lines written, the API's refusals, a replay job of dead letters), and two worker
processes must add up. Plus promtool's own checks.

Prometheus runs from Debian's ``prometheus`` package (``.ci/run`` installs it); without
the binaries on PATH these tests skip.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.config import Config
from gateway.ops import new_endpoint
from gateway.store import save_endpoint

from .conftest import free_port
from .receiver import Receiver
from .test_api import OTHER_BOT, ApiProcess
from .test_metrics import BOT, GatewayProcess, documented, publish, publish_undecodable, register

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("prometheus") is None or shutil.which("promtool") is None,
        reason="prometheus/promtool not on PATH: install Debian's `prometheus` package "
               "(.ci/run does) to run the Prometheus tests",
    ),
]

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "observability" / "prometheus"
DASHBOARD_SOURCE = ROOT / "observability" / "grafana" / "dashboard.py"
DASHBOARD = ROOT / "observability" / "grafana" / "dashboards" / "webhook-gateway.json"
RATE_INTERVAL = "10s"
"""What ``$__rate_interval`` becomes here: ten 1-second scrapes."""


def dashboard_module() -> Any:
    spec = importlib.util.spec_from_file_location("gateway_dashboard", DASHBOARD_SOURCE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def dashboard_queries() -> dict[str, str]:
    """``panel title / refId`` → PromQL, Grafana's interval variable filled in."""
    queries = {}
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            queries[f"{panel['title']} / {target['refId']}"] = (
                target["expr"].replace("$__rate_interval", RATE_INTERVAL))
    return queries


def rule_queries() -> dict[str, str]:
    """``rule name`` → its expression with every comparison made a ``bool`` one, so it
    returns a result (0 or 1) whenever the series it compares exist, firing or not."""
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return {rule.get("alert") or rule["record"]: with_bool(rule["expr"])
            for group in rules["groups"] for rule in group["rules"]}


_COMPARISON = re.compile(r"==|!=|>=|<=|>|<")


def with_bool(expr: str) -> str:
    """Add ``bool`` after every comparison operator outside label matchers and strings."""
    out: list[str] = []
    depth, quote, i = 0, "", 0
    while i < len(expr):
        c = expr[i]
        if quote:
            out.append(c)
            if c == "\\":
                out.append(expr[i + 1])
                i += 1
            elif c == quote:
                quote = ""
        elif c in "\"'`":
            quote = c
            out.append(c)
        elif c in "{[":
            depth += 1
            out.append(c)
        elif c in "}]":
            depth -= 1
            out.append(c)
        elif depth == 0 and (m := _COMPARISON.match(expr, i)):
            out.append(m.group())
            i = m.end()
            if not re.match(r"\s*bool\b", expr[i:]):
                out.append(" bool")
            continue
        else:
            out.append(c)
        i += 1
    return "".join(out)


def test_with_bool_leaves_label_matchers_alone() -> None:
    assert with_bool('sum(x{a="1",b!="2",c=~"3"}) / y < 0.95 and z[5m:1m] >= bool 1') == (
        'sum(x{a="1",b!="2",c=~"3"}) / y < bool 0.95 and z[5m:1m] >= bool 1')


def test_promtool_accepts_the_config_and_the_rules_and_their_unit_tests() -> None:
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"],
                 ["test", "rules", "alerts_test.yml"]):
        result = subprocess.run(["promtool", *args], cwd=PROMETHEUS_DIR, capture_output=True,
                                text=True, timeout=30, check=False)
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def two_free_ports() -> int:
    """A port P with P+1 free too (`--workers 2` serves metrics on both)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two consecutive free ports")


class Prometheus:
    """prometheus.yml's jobs named in ``targets`` (the others dropped), each scraping the
    targets given instead of the compose stack's."""

    def __init__(self, tmp: Path, targets: dict[str, list[str]]) -> None:
        config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
        jobs = {job["job_name"]: job for job in config["scrape_configs"]}
        for name, addresses in targets.items():
            jobs[name]["static_configs"] = [{"targets": addresses}]
        config["scrape_configs"] = [jobs[name] for name in targets]
        config["global"] |= {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            ["prometheus", f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        self.log = tmp / "prometheus.log"
        deadline = time.monotonic() + 15
        while not self._ready():
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", trust_env=False, timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def api(self, path: str, **params: str) -> Any:
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, trust_env=False, timeout=10)
        body = response.json()
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str) -> list[Any]:
        data = self.api("query", query=expr)
        return data["result"] if data["resultType"] == "vector" else [data["result"]]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(15)
        self._log.close()


@pytest.mark.timeout(120)
def test_every_dashboard_and_alert_query_returns_data_from_a_real_gateway(
    topics: Config, receiver: Receiver, tmp_path: Path
) -> None:
    started = time.monotonic()
    receiver.respond("/fail", lambda request, seen: 500)
    register(topics, receiver.url("/ok"))
    failing = register(topics, receiver.url("/fail"), events=("TICKET",))  # 4 failed attempts each
    # 5 MESSAGE events a second to an endpoint limited to 1 a second: the rest are deferred.
    save_endpoint(topics, new_endpoint(bot_id=BOT, url=receiver.url("/limited"), event_types=("MESSAGE",),
                                       rate_limit=1.0))
    port, dead_port, dead_api_port = two_free_ports(), free_port(), free_port()
    stop_load, published = threading.Event(), [0]
    loader = threading.Thread(target=_publish_loop, args=(topics, stop_load, published), daemon=True)
    gateway = GatewayProcess(topics, tmp_path / "gateway.log", port, "--workers", "2")
    prometheus = api = None
    try:
        api = ApiProcess(topics, tmp_path / "api.log")
        callers = ApiCallers(api, failing.id)
        dashboard = dashboard_module()
        # The dead targets stand for a worker and an API process that are down: up == 0,
        # GatewayWorkerDown and GatewayApiDown.
        prometheus = Prometheus(tmp_path, {dashboard.JOB: [f"127.0.0.1:{p}" for p in (port, port + 1, dead_port)],
                                           dashboard.API_JOB: [f"127.0.0.1:{p}" for p in (api.port, dead_api_port)]})
        gateway.wait_ready([port, port + 1])
        publish_undecodable(topics)
        loader.start()

        queries = dashboard_queries() | rule_queries()
        expected_alerts = {"GatewayDeadLetters", "GatewayDeliverySuccessRatioLow", "GatewayWorkerDown",
                           "GatewayApiDown"}
        missing: dict[str, str] = {}
        still: dict[str, str] = {}
        active: set[str] = set()
        for attempt in itertools.count():
            callers.call()
            missing = {name: expr for name, expr in queries.items() if not prometheus.query(expr)}
            still = {name: expr for name, expr in MOVING.items() if not _scalar(prometheus, expr) > 0}
            active = {a["labels"]["alertname"] for a in prometheus.api("alerts")["alerts"]}
            if not missing and not still and expected_alerts <= active:
                break
            assert time.monotonic() - started < 60, (
                f"after {attempt} rounds, no data for {json.dumps(missing, indent=1)}; "
                f"still at zero: {json.dumps(still, indent=1)}; "
                f"active alerts {sorted(active)}; replay job {callers.job}\ngateway log:\n{gateway.text()[-1500:]}"
                f"\napi log:\n{api.log.read_text(errors='replace')[-1500:]}")
            time.sleep(1)
        # The API counted each refusal under its route's template, never a raw path.
        routes = {r["metric"]["route"] for r in prometheus.query("sum by (route) (gateway_api_requests_total)")}
        assert {"/v1/endpoints", "/v1/endpoints/{id}", "/v1/dead-letters", "/v1/dead-letters/replay",
                "/v1/tokens"} <= routes, routes
        assert not any(failing.id in route for route in routes), routes
        statuses = {r["metric"]["status"] for r in prometheus.query(
            'sum by (status) (gateway_api_requests_total{route="/v1/endpoints/{id}"})')}
        assert {"401", "403", "404"} <= statuses, statuses
        rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        assert {r["name"] for r in rules} == set(rule_queries())
        assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]

        # Two processes, one registry each, two targets: each consumes part of the load
        # (a batch lands on one partition, chosen by its key: the load goes on until both
        # workers had some), and Prometheus' sum() adds up to what was published (the
        # undecodable record counts as one event consumed).
        deadline = time.monotonic() + 20
        while not (len(per_worker := prometheus.query("sum by (instance) (gateway_events_consumed_total)")) == 2
                   and all(float(r["value"][1]) > 0 for r in per_worker)):
            assert time.monotonic() < deadline, per_worker
            time.sleep(0.5)
        stop_load.set()
        loader.join(10)
        assert len(prometheus.query('up{job="webhook-gateway"} == 1')) == 2
        deadline = time.monotonic() + 10
        while (consumed := _scalar(prometheus, "sum(gateway_events_consumed_total)")) != published[0] + 1:
            assert time.monotonic() < deadline, (consumed, published[0] + 1)
            time.sleep(0.5)
    finally:
        stop_load.set()
        if prometheus is not None:
            prometheus.stop()
        api_code = api.stop() if api is not None else 0
        code = gateway.stop()
    assert code == 0, gateway.text()[-3000:]
    assert api is not None and api_code == 0, api.log.read_text()[-3000:]


MOVING = {
    "an open circuit's age": "max(gateway_circuit_oldest_open_seconds)",  # the failing endpoint's
    "deferrals onto a rung": 'sum(gateway_deferred_total{reason="rate_limit", rung=~"deferred-.+"})',
    "history lines written": 'sum(gateway_history_writes_total{result="written"})',
    "the API's refusals": 'sum(gateway_api_requests_total{status=~"4.."})',
    "a replay job finished": 'sum(gateway_api_replay_jobs_finished_total{result="succeeded"})',
    "dead letters replayed": 'sum(gateway_api_replayed_records_total{result="acknowledged"})',
}
"""What the load must make more than 0 (a query of a series at 0 already returns data)."""


class ApiCallers:
    """What callers of the management API do, a round at a time: reads that succeed, an
    unknown id (404), no token (401), a bot token on another bot's endpoint (403); and,
    once the failing endpoint has dead letters, one replay job of them, followed to its
    end."""

    def __init__(self, api: ApiProcess, endpoint_id: str) -> None:
        self.api = api
        self.endpoint_id = endpoint_id
        minted = api.http.post("/v1/tokens", json={"botId": OTHER_BOT})
        assert minted.status_code == 201, minted.text
        self.other_bot = {"authorization": f"Bearer {minted.json()['token']}"}
        self.job: dict[str, Any] | None = None

    def call(self) -> None:
        http, endpoint = self.api.http, f"/v1/endpoints/{self.endpoint_id}"
        assert http.get("/v1/endpoints").status_code == 200
        assert http.get(endpoint).status_code == 200
        assert http.get(f"/v1/endpoints/{uuid.uuid4()}").status_code == 404
        assert http.get(endpoint, headers={"authorization": "Bearer nope"}).status_code == 401
        assert http.get(endpoint, headers=self.other_bot).status_code == 403
        if self.job is None or (self.job["state"] == "succeeded" and self.job["planned"] == 0):
            dead = http.get("/v1/dead-letters", params={"endpointId": self.endpoint_id})
            assert dead.status_code == 200, dead.text
            if dead.json()["data"]:
                started = http.post("/v1/dead-letters/replay", json={"endpointId": self.endpoint_id})
                assert started.status_code == 202, started.text
                self.job = started.json()
        elif self.job["state"] == "running":
            answer = http.get(f"/v1/replays/{self.job['id']}")
            assert answer.status_code == 200, answer.text
            self.job = answer.json()


def _publish_loop(config: Config, stop: threading.Event, published: list[int]) -> None:
    """4 events every 0.2 s until ``stop``; ``published[0]`` counts the acknowledged ones.
    Each batch has a session of its own (the record key): batches spread over the partitions."""
    while not stop.wait(0.2):
        session = str(uuid.uuid4())
        publish(config, [event | {"sessionId": session} for event in documented()])
        published[0] += 4


def _scalar(prometheus: Prometheus, expr: str) -> float:
    result = prometheus.query(expr)
    return float(result[0]["value"][1]) if result else float("nan")
