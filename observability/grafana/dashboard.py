"""The Grafana dashboard of the gateway, as code: ``dashboards/webhook-gateway.json`` is
this script's output, provisioned by docker-compose.

    python observability/grafana/dashboard.py          # rewrite the JSON
    python observability/grafana/dashboard.py --check  # exit 1 if the JSON is stale

Edit the panels here, not in the JSON: tests/test_metrics_dashboard.py fails when the two
disagree, checks the layout and every metric name, and tests/test_prometheus.py runs
every query against a real Prometheus scraping a real gateway.

The dashboard is the RED view: rate (events in, deliveries by outcome), errors (success
ratio, failures by status class, retries, dead letters, decode errors), duration
(delivery latency quantiles and heatmap, end-to-end latency), then saturation (consumer
lag, in flight). Queries ``sum()`` over every worker process; gauges that each process
reports alike (endpoints, last success) use ``max()``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DATASOURCE", "JOB", "OUTPUT", "dashboard", "render"]

OUTPUT = Path(__file__).resolve().parent / "dashboards" / "webhook-gateway.json"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
"""The datasource provisioned by provisioning/datasources/prometheus.yml."""
JOB = "webhook-gateway"
"""The scrape job of the gateway's workers in prometheus/prometheus.yml."""

RATE = "$__rate_interval"
ATTEMPTS = "gateway_delivery_attempts_total"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    kind: str  # "timeseries", "stat" or "heatmap"
    queries: tuple[Query, ...]
    unit: str = "short"
    description: str = ""
    width: int = 12
    height: int = 8
    options: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)


def q(expr: str, legend: str = "") -> Query:
    return Query(expr, legend)


def quantiles(metric: str, by: str = "") -> tuple[Query, ...]:
    labels = f"le, {by}" if by else "le"
    return tuple(
        q(f"histogram_quantile({p}, sum by ({labels}) (rate({metric}_bucket[{RATE}])))",
          f"p{round(p * 100)}" + (f" {{{{{by}}}}}" if by else ""))
        for p in (0.5, 0.95, 0.99)
    )


def ratio(selector: str = "", by: str = "") -> str:
    grouping = f" by ({by})" if by else ""
    success = f'{ATTEMPTS}{{outcome="success"{"," + selector if selector else ""}}}'
    total = f"{ATTEMPTS}{{{selector}}}" if selector else ATTEMPTS
    return f"sum{grouping} (rate({success}[{RATE}])) / sum{grouping} (rate({total}[{RATE}]))"


ROWS: tuple[tuple[str, tuple[Panel, ...]], ...] = (
    ("Overview", (
        Panel("Events in", "stat", (q(f"sum(rate(gateway_events_consumed_total[{RATE}]))"),),
              unit="ops", width=4, height=4,
              description="Records read from the events topic per second, all workers."),
        Panel("Deliveries", "stat", (q(f"sum(rate({ATTEMPTS}[{RATE}]))"),), unit="reqps",
              width=4, height=4, description="HTTP attempts per second, every tier."),
        Panel("Success ratio", "stat", (q(ratio()),), unit="percentunit", width=4, height=4,
              description="Share of attempts answered 2xx.",
              defaults={"thresholds": {"mode": "absolute", "steps": [
                  {"color": "red", "value": None}, {"color": "orange", "value": 0.9},
                  {"color": "green", "value": 0.95}]}}),
        Panel("Dead letters (1h)", "stat", (q("sum(increase(gateway_dead_letters_total[1h]))"),),
              width=4, height=4, description="Records written to the dead-letter topic in the last hour.",
              defaults={"thresholds": {"mode": "absolute", "steps": [
                  {"color": "green", "value": None}, {"color": "red", "value": 1}]}}),
        Panel("Since last success", "stat",
              (q("time() - max(gateway_last_success_timestamp_seconds > 0)"),), unit="s",
              width=4, height=4, description="Time since any worker got a 2xx (no data: none yet)."),
        Panel("Workers", "stat", (q(f'sum(up{{job="{JOB}"}})', "up"), q("sum(gateway_ready)", "ready")),
              width=4, height=4,
              description="Worker processes Prometheus scrapes, and how many answer /readyz with 200."),
    )),
    ("Rate", (
        Panel("Events in per second by type", "timeseries",
              (q(f"sum by (event_type) (rate(gateway_events_consumed_total[{RATE}]))", "{{event_type}}"),),
              unit="ops",
              description="undecodable and invalid are records that were dead-lettered at once."),
        Panel("Deliveries per second by outcome", "timeseries",
              (q(f"sum by (outcome) (rate({ATTEMPTS}[{RATE}]))", "{{outcome}}"),), unit="reqps"),
        Panel("Success ratio", "timeseries",
              (q(ratio(), "all tiers"), q(ratio(by="tier"), "{{tier}}")), unit="percentunit",
              description="Share of attempts answered 2xx, overall and per tier.",
              defaults={"min": 0, "max": 1}),
        Panel("Failed attempts by outcome and status class", "timeseries",
              (q(f'sum by (outcome, status_class) (rate({ATTEMPTS}{{outcome!="success"}}[{RATE}]))',
                 "{{outcome}} {{status_class}}"),), unit="reqps"),
    )),
    ("Errors", (
        Panel("Retries scheduled per tier", "timeseries",
              (q(f"sum by (tier) (rate(gateway_retries_scheduled_total[{RATE}]))", "{{tier}}"),),
              unit="ops", description="Deliveries sent on to a retry tier (the tier named)."),
        Panel("Dead letters per reason", "timeseries",
              (q(f"60 * sum by (reason) (rate(gateway_dead_letters_total[{RATE}]))", "{{reason}}"),),
              unit="opm", description="Dead letters per minute; inspect with `gateway dlq list`."),
        Panel("Decode errors", "timeseries",
              (q(f"sum by (tier, reason) (rate(gateway_decode_errors_total[{RATE}]))",
                 "{{tier}} {{reason}}"),), unit="ops",
              description="Records that could not be decoded or validated (dead-lettered with their bytes)."),
        Panel("Endpoints", "timeseries",
              (q('max(gateway_endpoints{state="enabled"})', "enabled"),
               q("sum(max by (state) (gateway_endpoints))", "known")),
              description="Registered endpoints (every worker reads the same table: max)."),
    )),
    ("Duration", (
        Panel("Delivery latency", "timeseries", quantiles("gateway_delivery_duration_seconds"),
              unit="s", description="One HTTP attempt, connect to last byte."),
        Panel("Delivery latency heatmap", "heatmap",
              (q(f"sum by (le) (increase(gateway_delivery_duration_seconds_bucket[{RATE}]))", "{{le}}"),),
              unit="s"),
        Panel("End-to-end latency", "timeseries", quantiles("gateway_end_to_end_latency_seconds"),
              unit="s", description="From the event's occurrence to its 2xx, across retries: "
              "steps at 1m, 6m and 21m are deliveries that needed the 1st, 2nd or 3rd retry."),
        Panel("End-to-end latency p95 by event type", "timeseries",
              (q(f"histogram_quantile(0.95, sum by (le, event_type) "
                 f"(rate(gateway_end_to_end_latency_seconds_bucket[{RATE}])))", "{{event_type}}"),),
              unit="s"),
    )),
    ("Saturation", (
        Panel("Consumer lag by topic", "timeseries",
              (q("sum by (topic) (gateway_consumer_lag_records)", "{{topic}}"),),
              description="Records not settled yet (high watermark minus stored offset). "
              "Retry tiers hold records until due, so their lag is normal up to a delay's worth."),
        Panel("In flight", "timeseries",
              (q("sum by (tier) (gateway_deliveries_in_flight)", "deliveries {{tier}}"),
               q("sum(gateway_in_flight_records)", "records")),
              description="HTTP deliveries in progress per tier, and records in progress "
              "(bounded by GATEWAY_CONCURRENCY per worker)."),
    )),
)


def _panel(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    targets = []
    for i, query in enumerate(panel.queries):
        target: dict[str, Any] = {
            "refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": query.expr,
            "legendFormat": query.legend or "__auto", "range": True, "instant": False,
        }
        if panel.kind == "heatmap":
            target["format"] = "heatmap"
        targets.append(target)
    defaults: dict[str, Any] = {"unit": panel.unit}
    options: dict[str, Any]
    if panel.kind == "timeseries":
        defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10,
                              "showPoints": "never", "spanNulls": False}
        options = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                   "tooltip": {"mode": "multi", "sort": "desc"}}
    elif panel.kind == "stat":
        defaults["thresholds"] = {"mode": "absolute", "steps": [{"color": "green", "value": None}]}
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                   "colorMode": "value", "graphMode": "area", "justifyMode": "auto",
                   "orientation": "auto", "textMode": "auto"}
    elif panel.kind == "heatmap":
        options = {"calculate": False, "cellGap": 1, "yAxis": {"axisPlacement": "left", "unit": panel.unit},
                   "rowsFrame": {"layout": "auto"},
                   "color": {"mode": "scheme", "scheme": "Oranges", "scale": "exponential",
                             "exponent": 0.5, "steps": 64, "reverse": False},
                   "tooltip": {"mode": "single", "yHistogram": False},
                   "legend": {"show": True}}
    else:
        raise ValueError(f"panel {panel.title!r}: unknown kind {panel.kind!r}")
    defaults.update(panel.defaults)
    options.update(panel.options)
    result: dict[str, Any] = {
        "id": panel_id, "type": panel.kind, "title": panel.title, "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []}, "options": options,
        "targets": targets,
    }
    if panel.description:
        result["description"] = panel.description
    return result


def dashboard() -> dict[str, Any]:
    """The dashboard model Grafana provisions."""
    panels: list[dict[str, Any]] = []
    y = 0
    for title, row in ROWS:
        panels.append({"id": len(panels) + 1, "type": "row", "title": title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        y += 1
        x, line_height = 0, 0
        for panel in row:
            if x + panel.width > 24:
                x, y, line_height = 0, y + line_height, 0
            panels.append(_panel(panel, len(panels) + 1, x, y))
            x += panel.width
            line_height = max(line_height, panel.height)
        y += line_height
    return {
        "uid": "webhook-gateway",
        "title": "Webhook gateway",
        "description": "Events in, deliveries out, retries, dead letters and lag of every "
                       "gateway worker. Generated by observability/grafana/dashboard.py.",
        "tags": ["webhooks", "kafka"],
        "timezone": "browser",
        "editable": False,
        "graphTooltip": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "schemaVersion": 39,
        "version": 1,
        "annotations": {"list": []},
        "templating": {"list": []},
        "links": [],
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is stale: run python {Path(__file__).as_posix()}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
