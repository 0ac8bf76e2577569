"""The management API's own metrics, read from its ``/metrics`` as Prometheus reads them:
each request counted under its route's template (never the path a caller sent), with the
status it got, refusals and unknown paths included and scrapes left out; the replay jobs
by state as one runs and ends, and the dead letters it sends. (tests/test_prometheus.py
scrapes a real ``gateway api`` with a real Prometheus.)"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from gateway.api import METRICS_PATH, UNMATCHED, ApiService, JobState, ReplayJobs, Tokens, create_app, openapi_document
from gateway.config import Config
from gateway.ops import ReplayPlan, ReplayProgress, ReplayReport

from .test_api import BOT, TOKEN, Served, eventually, served
from .test_api_access import write_dead_letters
from .test_api_jobs import plan, wait_for

AUTH = {"authorization": f"Bearer {TOKEN}"}


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of ``name`` in an exposition: sorted label pairs → value."""
    return {tuple(sorted(s.labels.items())): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name}


def requests(text: str) -> dict[tuple[str, str, str], float]:
    """``gateway_api_requests_total`` by (method, route, status)."""
    return {(labels["method"], labels["route"], labels["status"]): value
            for pairs, value in samples(text, "gateway_api_requests_total").items()
            for labels in [dict(pairs)]}


def by(text: str, name: str, label: str) -> dict[str, float]:
    return {dict(pairs)[label]: value for pairs, value in samples(text, name).items()}


@pytest.fixture
def service() -> ApiService:
    """Not started (no broker): what needs the endpoint table answers 503."""
    return ApiService(Config(), Tokens([TOKEN]))


@pytest.fixture
def app(service: ApiService) -> Iterator[TestClient]:
    """The real application of ``service``."""
    with TestClient(create_app(service)) as client:
        yield client


def test_metrics_need_no_token_and_are_not_in_the_document(app: TestClient, service: ApiService) -> None:
    answer = app.get(METRICS_PATH)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=")
    assert "# TYPE gateway_api_requests_total counter" in answer.text
    assert "process_resident_memory_bytes" in answer.text  # the API process's own
    assert METRICS_PATH not in openapi_document(create_app(service))["paths"]


def test_every_request_counts_under_its_routes_template_with_its_status(app: TestClient) -> None:
    ids = [str(uuid.uuid4()) for _ in range(3)]
    assert app.get("/healthz").status_code == 200
    for endpoint_id in ids:
        assert app.get(f"/v1/endpoints/{endpoint_id}").status_code == 401  # refused before routing
        assert app.get(f"/v1/endpoints/{endpoint_id}", headers=AUTH).status_code == 503  # no table: not started
    assert app.get("/v1/event-types", headers=AUTH).status_code == 200
    assert app.delete("/v1/event-types", headers=AUTH).status_code == 405
    assert app.get(f"/v1/nothing/{ids[0]}", headers=AUTH).status_code == 404
    assert app.get(f"/nothing/{ids[1]}").status_code == 401
    assert app.request("BREW", "/v1/event-types", headers=AUTH).status_code == 405
    assert app.get("/settings/webhooks").status_code == 200
    assert app.get("/settings/webhooks/static/page.js").status_code == 200
    assert app.get("/openapi.json").status_code == 401
    for _ in range(3):
        assert app.get(METRICS_PATH).status_code == 200

    text = app.get(METRICS_PATH).text
    assert requests(text) == {
        ("GET", "/healthz", "200"): 1,
        ("GET", "/v1/endpoints/{id}", "401"): 3,
        ("GET", "/v1/endpoints/{id}", "503"): 3,
        ("GET", "/v1/event-types", "200"): 1,
        ("DELETE", "/v1/event-types", "405"): 1,
        ("GET", UNMATCHED, "404"): 1,
        ("GET", UNMATCHED, "401"): 1,
        ("other", "/v1/event-types", "405"): 1,
        ("GET", "/settings/webhooks", "200"): 1,
        ("GET", "/settings/webhooks/static/{file}", "200"): 1,
        ("GET", "/openapi.json", "401"): 1,
    }  # and no scrape of /metrics
    assert not any(endpoint_id in text for endpoint_id in ids)
    counts = by(text, "gateway_api_request_duration_seconds_count", "route")
    assert counts["/v1/endpoints/{id}"] == 6 and METRICS_PATH not in counts
    durations = samples(text, "gateway_api_request_duration_seconds_sum")
    assert all(0 < seconds < 30 for seconds in durations.values())


def test_the_labels_stay_bounded_whatever_callers_send(app: TestClient) -> None:
    """A thousand different paths and methods make a handful of series."""
    for number in range(200):
        app.get(f"/v1/endpoints/{uuid.uuid4()}")
        app.get(f"/random/{number}")
        app.request(f"M{number}", "/v1/endpoints")
    text = app.get(METRICS_PATH).text
    assert set(requests(text)) == {("GET", "/v1/endpoints/{id}", "401"), ("GET", UNMATCHED, "401"),
                                   ("other", "/v1/endpoints", "401")}


def test_the_replay_jobs_gauge_moves_as_a_job_runs_and_ends(app: TestClient, service: ApiService) -> None:
    """Running while it sends, then succeeded; the dead letters counted as the job's
    progress reports them; a dry run and a failed job counted as they end."""
    release = threading.Event()

    def send(config: Config, sent: ReplayPlan, *, rate: float | None,
             on_progress: Callable[[ReplayProgress], None]) -> ReplayReport:
        on_progress(ReplayProgress(total=3, sent=2, acknowledged=1, failed=0, seconds=0.5))
        release.wait(5)
        return ReplayReport(sent, replayed=2, failed=1, first_failure="0:2: timed out", seconds=1.0)

    jobs = service.jobs = ReplayJobs(service.config, send=send, metrics=service.metrics)

    def jobs_by_state() -> dict[str, float]:
        return by(app.get(METRICS_PATH).text, "gateway_api_replay_jobs", "state")

    assert jobs_by_state() == dict.fromkeys(JobState, 0.0)
    job = jobs.start(plan(3))
    wait_for(lambda: by(app.get(METRICS_PATH).text, "gateway_api_replayed_records_total", "result")
             == {"acknowledged": 1, "failed": 0})
    assert jobs_by_state() == dict.fromkeys(JobState, 0.0) | {"running": 1.0}
    jobs.start(plan(2), dry_run=True)
    assert jobs_by_state()["dry_run"] == 1
    release.set()
    wait_for(lambda: (current := jobs.get(job.id)) is not None and current.state is JobState.FAILED)
    text = app.get(METRICS_PATH).text
    assert by(text, "gateway_api_replay_jobs", "state") == {"dry_run": 1, "running": 0, "succeeded": 0, "failed": 1}
    assert by(text, "gateway_api_replay_jobs_finished_total", "result") == {"dry_run": 1, "succeeded": 0, "failed": 1}
    assert by(text, "gateway_api_replayed_records_total", "result") == {"acknowledged": 2, "failed": 1}

    def broken(config: Config, sent: ReplayPlan, **kwargs: Any) -> ReplayReport:
        raise RuntimeError("broker gone")

    jobs = service.jobs = ReplayJobs(service.config, send=broken, metrics=service.metrics)
    second = jobs.start(plan(1))
    wait_for(lambda: (current := jobs.get(second.id)) is not None and current.state is JobState.FAILED)
    assert by(app.get(METRICS_PATH).text, "gateway_api_replay_jobs_finished_total", "result")["failed"] == 2


# --- a real API on a real broker, over HTTP ---------------------------------------------------


@pytest.fixture
def api_http(topics: Config) -> Iterator[Served]:
    with served(topics) as api:
        yield api


@pytest.mark.integration
def test_a_replay_of_real_dead_letters_counts_over_http(api_http: Served, topics: Config) -> None:
    client = api_http.client()
    made = client.post("/v1/endpoints", json={"botId": BOT, "url": "https://example.com/hook"})
    assert made.status_code == 201, made.text
    endpoint = made.json()
    assert client.patch(f"/v1/endpoints/{endpoint['id']}", json={"description": "x"}).status_code == 428
    write_dead_letters(topics, (BOT, endpoint["id"]), (BOT, endpoint["id"]))
    eventually(lambda: len(client.get("/v1/dead-letters", params={"endpointId": endpoint["id"]}).json()["data"])
               == 2, "the dead letters in the API's index")
    started = client.post("/v1/dead-letters/replay", json={"endpointId": endpoint["id"]})
    assert started.status_code == 202, started.text
    job_id = started.json()["id"]
    eventually(lambda: client.get(f"/v1/replays/{job_id}").json()["state"] == "succeeded", "the replay job")

    scraped = httpx.get(f"{api_http.url}{METRICS_PATH}", timeout=10)  # no token
    assert scraped.status_code == 200
    text = scraped.text
    counted = requests(text)
    assert counted[("POST", "/v1/endpoints", "201")] == 1
    assert counted[("PATCH", "/v1/endpoints/{id}", "428")] == 1
    assert counted[("POST", "/v1/dead-letters/replay", "202")] == 1
    assert counted[("GET", "/v1/replays/{id}", "200")] >= 1
    assert not any(endpoint["id"] in route or job_id in route for _, route, _ in counted)
    assert by(text, "gateway_api_replay_jobs", "state")["succeeded"] == 1
    assert by(text, "gateway_api_replay_jobs_finished_total", "result")["succeeded"] == 1
    assert by(text, "gateway_api_replayed_records_total", "result") == {"acknowledged": 2, "failed": 0}
