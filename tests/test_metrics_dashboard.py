"""The Grafana dashboard, the alert rules and the runbook, read as files: the JSON is what
its generator writes and Grafana's own SDK reads it back whole, the panels cover the RED
view, the operations view and the management API, the layout fits, every metric a query names is one the
gateway exports, every alert has a unit test that fires it and a runbook section.
(tests/test_prometheus.py runs the queries against a real gateway.) Plus the values the
operations panels read that no other test pins down: how long a circuit has been open,
deferrals by rung, history writes."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import random
import re
import sys
import uuid
from pathlib import Path
from typing import Any

import yaml
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models import dashboard as grafana
from grafana_foundation_sdk.models import heatmap, prometheus, stat, timeseries

from gateway.api import ApiService, Tokens
from gateway.config import Config
from gateway.delivery import CircuitBreaker, Sender
from gateway.observability import Metrics
from gateway.records import Attempt, Endpoint, Outcome
from gateway.signing import new_secret
from gateway.store import Topics

from .conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "observability" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "webhook-gateway.json"
PROMETHEUS = ROOT / "observability" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
ALERT_TESTS = PROMETHEUS / "alerts_test.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"

RED_PANELS = {
    "Events in per second by type": ("timeseries", "gateway_events_consumed_total"),
    "Deliveries per second by outcome": ("timeseries", "gateway_delivery_attempts_total"),
    "Success ratio": ("timeseries", "gateway_delivery_attempts_total"),
    "Delivery latency": ("timeseries", "gateway_delivery_duration_seconds_bucket"),
    "Delivery latency heatmap": ("heatmap", "gateway_delivery_duration_seconds_bucket"),
    "End-to-end latency": ("timeseries", "gateway_end_to_end_latency_seconds_bucket"),
    "Retries scheduled per tier": ("timeseries", "gateway_retries_scheduled_total"),
    "Dead letters per reason": ("timeseries", "gateway_dead_letters_total"),
    "Consumer lag by topic": ("timeseries", "gateway_consumer_lag_records"),
    "In flight": ("timeseries", "gateway_deliveries_in_flight"),
}

OPERATIONS_PANELS = {
    "Deferrals per second by reason and rung": ("timeseries", "gateway_deferred_total"),
    "Held on retry tiers and deferral rungs": ("timeseries", "gateway_consumer_lag_records"),
    "Time out of the consumer group": ("timeseries", "gateway_consumer_out_of_group_seconds"),
    "Tiers without a reader": ("stat", "gateway_tier_readers"),
    "Consumers replaced (1h)": ("stat", "gateway_consumer_replacements_total"),
    "Circuit breakers by state": ("timeseries", "gateway_circuit_breakers"),
    "Longest-open circuit": ("timeseries", "gateway_circuit_oldest_open_seconds"),
    "History lines written per second": ("timeseries", "gateway_history_writes_total"),
    "History writes waiting for the broker": ("timeseries", "gateway_history_writes_waiting"),
}

API_PANELS = {
    "API requests per second by route and status class": ("timeseries", "gateway_api_requests_total"),
    "API error ratio": ("timeseries", "gateway_api_requests_total"),
    "API latency p95 by route": ("timeseries", "gateway_api_request_duration_seconds_bucket"),
    "Replay jobs by state": ("timeseries", "gateway_api_replay_jobs"),
    "Replay jobs finished (1h) by result": ("timeseries", "gateway_api_replay_jobs_finished_total"),
    "Dead letters replayed per second": ("timeseries", "gateway_api_replayed_records_total"),
    "API processes": ("stat", "up"),
}


def generator() -> Any:
    spec = importlib.util.spec_from_file_location("gateway_dashboard", GRAFANA / "dashboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def exported_names() -> set[str]:
    """Every series name the gateway's registries (the workers', the API's) can expose,
    labelled children or not."""
    metrics = Metrics([t.name for t in Topics.from_config(Config()).tiers])
    api = ApiService(Config(), Tokens(())).metrics
    names = {"up"}
    for family in [*metrics.registry.collect(), *api.registry.collect()]:
        names |= {s.name for s in family.samples}
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"],
                    "info": ["_info"]}.get(family.type, [""])
        names |= {family.name + s for s in suffixes}
    return names


def metric_names(expr: str) -> set[str]:
    without_labels = re.sub(r"\{[^}]*\}", "", expr)
    return set(re.findall(r"\b(gateway_\w+|up)\b(?!\s*\()", without_labels))


def test_the_json_is_what_the_generator_writes() -> None:
    assert DASHBOARD.read_text() == generator().render(), (
        "run `python observability/grafana/dashboard.py` and commit the JSON")


def test_the_json_reads_back_whole_into_grafanas_own_model() -> None:
    """Grafana's SDK decodes the JSON into its typed model (each panel's options into its
    plugin's options, each query into a Prometheus query), and encoding that model again
    gives the same JSON: nothing in the file is unknown to Grafana's schema."""
    register_default_plugins()  # (idempotent) the panel and query kinds the decoder knows
    data = json.loads(DASHBOARD.read_text())
    model = grafana.Dashboard.from_json(data)
    assert json.loads(json.dumps(model, cls=JSONEncoder)) == data
    assert model.uid == "webhook-gateway" and model.panels
    options = {"timeseries": timeseries.Options, "stat": stat.Options, "heatmap": heatmap.Options}
    for panel in model.panels:
        if isinstance(panel, grafana.RowPanel):
            continue
        assert panel.type_val in options, panel.title
        assert isinstance(panel.options, options[panel.type_val]), panel.title
        assert panel.targets, panel.title
        for target in panel.targets:
            assert isinstance(target, prometheus.Dataquery), panel.title
            assert target.datasource is not None and target.datasource.uid == generator().DATASOURCE.uid
    built = json.loads(json.dumps(generator().dashboard(), cls=JSONEncoder))
    assert built == data


def test_the_dashboard_shows_the_red_view() -> None:
    panels = {p["title"]: p for p in dashboard()["panels"] if p["type"] != "row"}
    for title, (kind, metric) in RED_PANELS.items():
        assert title in panels, f"no panel {title!r}"
        assert panels[title]["type"] == kind, title
        assert any(metric in t["expr"] for t in panels[title]["targets"]), (title, metric)
    legends = {t["legendFormat"] for t in panels["Delivery latency"]["targets"]}
    assert legends == {"p50", "p95", "p99"}
    assert all(t.get("format") == "heatmap" for t in panels["Delivery latency heatmap"]["targets"])
    assert "by (topic)" in panels["Consumer lag by topic"]["targets"][0]["expr"]


def test_the_dashboard_shows_the_operations_view() -> None:
    panels = {p["title"]: p for p in dashboard()["panels"] if p["type"] != "row"}
    for title, (kind, metric) in OPERATIONS_PANELS.items():
        assert title in panels, f"no panel {title!r}"
        assert panels[title]["type"] == kind, title
        assert any(metric in t["expr"] for t in panels[title]["targets"]), (title, metric)
    assert "by (reason, rung)" in panels["Deferrals per second by reason and rung"]["targets"][0]["expr"]


def test_the_dashboard_shows_the_management_api_and_its_replay_jobs() -> None:
    rows = [p["title"] for p in dashboard()["panels"] if p["type"] == "row"]
    assert "Management API" in rows
    panels = {p["title"]: p for p in dashboard()["panels"] if p["type"] != "row"}
    for title, (kind, metric) in API_PANELS.items():
        assert title in panels, f"no panel {title!r}"
        assert panels[title]["type"] == kind, title
        assert any(metric in t["expr"] for t in panels[title]["targets"]), (title, metric)
    assert f'job="{generator().API_JOB}"' in panels["API processes"]["targets"][0]["expr"]
    requests = panels["API requests per second by route and status class"]["targets"][0]["expr"]
    assert "by (route, status_class)" in requests
    ratios = {t["legendFormat"]: t["expr"] for t in panels["API error ratio"]["targets"]}
    assert set(ratios) == {"5xx", "4xx"} and 'status=~"5.."' in ratios["5xx"] and 'status=~"4.."' in ratios["4xx"]
    # The alert and the panel's 5xx line compute one ratio.
    alert = alerts()["GatewayApiErrors"]["expr"]
    assert "gateway_api_requests_total" in alert and 'route=~"/v1/.+"' in alert and 'status=~"5.."' in alert


def test_panels_fit_the_grid_and_name_the_provisioned_datasource() -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = datasources["datasources"][0]["uid"]
    panels = dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid and target["expr"].strip(), panel["title"]


def test_every_metric_the_dashboard_and_the_rules_name_is_exported() -> None:
    known = exported_names()
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    rules = yaml.safe_load(ALERTS.read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    for expr in exprs:
        names = metric_names(expr)
        assert names, expr
        assert names <= known, f"{sorted(names - known)} in {expr!r} is not a gateway metric"


def test_the_alerts_the_issue_asks_for_exist() -> None:
    rules = {r["alert"]: r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    assert {"GatewayDeadLetters", "GatewayDeliverySuccessRatioLow", "GatewayConsumerLagGrowing",
            "GatewayNoSuccessfulDelivery", "GatewayWorkerDown"} <= set(rules)
    job = generator().JOB
    assert f'up{{job="{job}"}}' in rules["GatewayWorkerDown"]["expr"]
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def alerts() -> dict[str, Any]:
    return {r["alert"]: r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    """Each alert of alerts.yml is named in alerts_test.yml with at least one case where it
    fires (a test that only says it stays quiet proves nothing), and no case names an
    alert that does not exist."""
    cases = [case for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
             for case in test.get("alert_rule_test", [])]
    tested = {case["alertname"] for case in cases}
    fired = {case["alertname"] for case in cases if case.get("exp_alerts")}
    names = set(alerts())
    assert not names - tested, f"alerts without a test in alerts_test.yml: {sorted(names - tested)}"
    assert not names - fired, f"alerts no test case fires: {sorted(names - fired)}"
    assert not tested - names, f"alerts_test.yml tests alerts that do not exist: {sorted(tested - names)}"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped,
    spaces made hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_links_its_section_of_the_runbook() -> None:
    """``runbook_url`` is ``docs/runbook.md#anchor`` (relative to the repository: it works
    on any host of it), the anchor is a heading of the runbook, and the runbook has a
    section for each alert and for nothing else."""
    text = RUNBOOK.read_text()
    sections = {github_anchor(h): h for h in re.findall(r"^## (.+)$", text, re.MULTILINE)}
    linked = set()
    for name, rule in alerts().items():
        url = rule["annotations"].get("runbook_url", "")
        match = re.fullmatch(r"docs/runbook\.md#([\w-]+)", url)
        assert match, f"{name}: runbook_url {url!r} is not docs/runbook.md#<section>"
        assert match.group(1) in sections, f"{name}: docs/runbook.md has no heading for #{match.group(1)}"
        assert sections[match.group(1)] == name, f"{name} links the section of {sections[match.group(1)]}"
        linked.add(match.group(1))
    assert set(sections) == linked, f"runbook sections of no alert: {sorted(set(sections) - linked)}"
    for anchor in re.findall(r"\]\(#([\w-]+)\)", text):
        assert anchor in sections, f"the runbook links #{anchor}, which is not one of its headings"


def test_github_anchor() -> None:
    assert github_anchor("GatewayDeadLetters") == "gatewaydeadletters"
    assert github_anchor("What to do, now!") == "what-to-do-now"


# -- what the operations panels read -----------------------------------------------------


def failure(status: int = 503) -> Attempt:
    return Attempt(at=0, tier="events", duration_ms=1.0, outcome=Outcome.HTTP_ERROR, status=status)


def success() -> Attempt:
    return Attempt(at=0, tier="events", duration_ms=1.0, outcome=Outcome.SUCCESS, status=200)


def test_a_circuit_is_open_since_it_left_closed_through_failed_probes() -> None:
    breaker = CircuitBreaker(2, open_for=10.0, max_open=60.0, rng=random.Random(1))
    breaker.record(failure(), 100.0)
    assert breaker.opened_at is None
    breaker.record(failure(), 101.0)
    assert breaker.opened_at == 101.0
    breaker.admit(200.0)  # its probe
    breaker.record(failure(), 201.0, probe=True)  # failed: open again, open since 101
    assert breaker.opened_at == 101.0
    breaker.admit(400.0)
    breaker.record(success(), 401.0, probe=True)
    assert breaker.opened_at is None
    breaker.record(failure(), 402.0)
    breaker.record(failure(), 403.0)
    assert breaker.opened_at == 403.0


def test_the_oldest_open_circuit_counts_the_endpoints_it_is_told_to() -> None:
    """Two endpoints that refuse connections open their circuits (one failure is enough
    here) 0.2 s apart; the age is the older one's, or that of those ``counts`` admits."""
    async def go() -> tuple[float, float, float, float]:
        sender = Sender(Config(allow_private_networks=True, request_timeout=2.0, circuit_failures=1))
        first, second = (Endpoint(id=str(uuid.uuid4()), bot_id=str(uuid.uuid4()), url=f"http://127.0.0.1:{free_port()}/",
                                  secret=new_secret(), created_at=0, updated_at=0) for _ in range(2))
        try:
            before = sender.oldest_open_circuit()
            assert isinstance(await sender.send(first, str(uuid.uuid4()), b"{}", "events"), Attempt)
            await asyncio.sleep(0.2)
            assert isinstance(await sender.send(second, str(uuid.uuid4()), b"{}", "events"), Attempt)
            return (before, sender.oldest_open_circuit(), sender.oldest_open_circuit(lambda i: i == second.id),
                    sender.oldest_open_circuit(lambda i: False))
        finally:
            await sender.aclose()

    before, both, second, neither = asyncio.run(go())
    assert before == 0.0 and neither == 0.0
    assert 0.0 <= second < 0.2 <= both < 5


def test_deferrals_by_rung_and_history_writes_start_at_zero() -> None:
    topics = Topics.from_config(Config())
    rungs = [t.name for t in topics.deferral_tiers]
    metrics = Metrics([t.name for t in topics.tiers], rungs=rungs)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in metrics.registry.collect() for s in family.samples}
    for rung in rungs:
        assert samples[("gateway_deferred_total", (("reason", "share_full"), ("rung", rung)))] == 0
    for result in ("written", "failed"):
        assert samples[("gateway_history_writes_total", (("result", result),))] == 0
    assert samples[("gateway_history_writes_waiting", ())] == 0
    assert samples[("gateway_circuit_oldest_open_seconds", ())] == 0
