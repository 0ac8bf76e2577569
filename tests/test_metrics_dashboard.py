"""The Grafana dashboard and the alert rules, read as files: the JSON is what its
generator writes, the panels cover the RED view, the layout fits, and every metric a
query names is one the gateway exports. (tests/test_prometheus.py runs the queries.)"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from gateway.config import Config
from gateway.observability import Metrics
from gateway.store import Topics

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "observability" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "webhook-gateway.json"
ALERTS = ROOT / "observability" / "prometheus" / "alerts.yml"

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
    """Every series name the gateway's registry can expose, labelled children or not."""
    metrics = Metrics([t.name for t in Topics.from_config(Config()).tiers])
    names = {"up"}
    for family in metrics.registry.collect():
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
