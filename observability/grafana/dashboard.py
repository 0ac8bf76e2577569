"""The Grafana dashboard of the gateway, as code: ``dashboards/webhook-gateway.json`` is
this script's output, provisioned by docker-compose.

    python observability/grafana/dashboard.py          # rewrite the JSON
    python observability/grafana/dashboard.py --check  # exit 1 if the JSON is stale

Edit the panels here, not in the JSON: tests/test_metrics_dashboard.py fails when the two
disagree, loads the JSON back into the SDK's model, checks the layout and every metric
name, and tests/test_prometheus.py runs every query against a real Prometheus scraping a
real gateway.

Built with Grafana's own typed builders (``grafana-foundation-sdk``, the release for the
Grafana that docker-compose runs, 11.1): a panel option that Grafana does not have, or a
value of the wrong type, is an error here rather than a panel that silently ignores it.

The dashboard is the RED view: rate (events in, deliveries by outcome), errors (success
ratio, failures by status class, retries, dead letters, decode errors), duration
(delivery latency quantiles and heatmap, end-to-end latency), then saturation (consumer
lag, in flight). Below it, the operations view, one row per thing an alert of
``prometheus/alerts.yml`` watches: deferrals and the backlogs held on the retry tiers and
deferral rungs, the consumers (readers, time out of the group, replacements), the
circuit breakers, the delivery history's writes. Last, the management API, from its own
scrape job: requests by route and status class, its error ratio, latency, and replay
jobs. Queries ``sum()`` over every worker (or API) process; gauges that each process
reports alike (endpoints, last success) use ``max()``.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import heatmap, prometheus, stat, timeseries
from grafana_foundation_sdk.builders.dashboard import Dashboard, Row, ThresholdsConfig
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models import heatmap as heatmap_model
from grafana_foundation_sdk.models import prometheus as prometheus_model

__all__ = ["API_JOB", "DATASOURCE", "JOB", "OUTPUT", "dashboard", "render"]

OUTPUT = Path(__file__).resolve().parent / "dashboards" / "webhook-gateway.json"
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="prometheus")
"""The datasource provisioned by provisioning/datasources/prometheus.yml."""
JOB = "webhook-gateway"
"""The scrape job of the gateway's workers in prometheus/prometheus.yml."""
API_JOB = "webhook-gateway-api"
"""The scrape job of the management API processes in prometheus/prometheus.yml."""

RATE = "$__rate_interval"
ATTEMPTS = "gateway_delivery_attempts_total"
HELD = 'gateway_consumer_lag_records{tier=~"deferred-.*|retry-.*"}'
"""What GatewayHeldBacklogGrowing watches: deliveries held on the retry tiers and rungs."""
API_REQUESTS = "gateway_api_requests_total"
CALLS = f'{API_REQUESTS}{{route=~"/v1/.+"}}'
"""What GatewayApiErrors watches: the API's operations, not its probes, page or document."""

Panel = timeseries.Panel | stat.Panel | heatmap.Panel


def q(expr: str, legend: str = "") -> prometheus.Dataquery:
    """A range query of the provisioned Prometheus (its refId is set by its panel)."""
    return (prometheus.Dataquery().expr(expr).legend_format(legend or "__auto").range()
            .datasource(DATASOURCE))


def quantiles(metric: str, by: str = "") -> list[prometheus.Dataquery]:
    labels = f"le, {by}" if by else "le"
    return [
        q(f"histogram_quantile({p}, sum by ({labels}) (rate({metric}_bucket[{RATE}])))",
          f"p{round(p * 100)}" + (f" {{{{{by}}}}}" if by else ""))
        for p in (0.5, 0.95, 0.99)
    ]


def ratio(selector: str = "", by: str = "") -> str:
    grouping = f" by ({by})" if by else ""
    success = f'{ATTEMPTS}{{outcome="success"{"," + selector if selector else ""}}}'
    total = f"{ATTEMPTS}{{{selector}}}" if selector else ATTEMPTS
    return f"sum{grouping} (rate({success}[{RATE}])) / sum{grouping} (rate({total}[{RATE}]))"


def api_error_ratio(status: str) -> str:
    """The share of the API's /v1 requests answered ``status`` (a regex: ``5..``); 0, not
    no data, when none was (as GatewayApiErrors computes it)."""
    matching = f'{API_REQUESTS}{{route=~"/v1/.+", status=~"{status}"}}'
    return (f"(sum(rate({matching}[{RATE}])) or 0 * sum(rate({CALLS}[{RATE}]))) "
            f"/ sum(rate({CALLS}[{RATE}]))")


def thresholds(*steps: tuple[float | None, str]) -> ThresholdsConfig:
    """Absolute thresholds: (from value, colour) steps, the first from None (-∞)."""
    return ThresholdsConfig().mode(model.ThresholdsMode.ABSOLUTE).steps(
        [model.Threshold(value=value, color=color) for value, color in steps])


def _targets(panel: Panel, queries: list[prometheus.Dataquery]) -> None:
    for i, query in enumerate(queries):
        panel.with_target(query.ref_id(chr(ord("A") + i)))


def graph(title: str, *queries: prometheus.Dataquery, unit: str = "short",
          description: str = "", width: int = 12, height: int = 8, bound: float | None = None,
          low: float | None = None, high: float | None = None) -> timeseries.Panel:
    """A time series panel; ``bound``: a red line where an alert's threshold is."""
    panel = (
        timeseries.Panel().title(title).datasource(DATASOURCE).unit(unit).span(width).height(height)
        .draw_style(common.GraphDrawStyle.LINE).line_width(1).fill_opacity(10)
        .show_points(common.VisibilityMode.NEVER).span_nulls(False)
        .legend(common_builders.VizLegendOptions().display_mode(common.LegendDisplayMode.LIST)
                .placement(common.LegendPlacement.BOTTOM).show_legend(True))
        .tooltip(common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI)
                 .sort(common.SortOrder.DESCENDING))
    )
    if description:
        panel.description(description)
    if bound is not None:
        panel.thresholds(thresholds((None, "green"), (bound, "red"))).thresholds_style(
            common_builders.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.LINE))
    if low is not None:
        panel.min(low)
    if high is not None:
        panel.max(high)
    _targets(panel, list(queries))
    return panel


def single(title: str, *queries: prometheus.Dataquery, unit: str = "short", description: str = "",
           width: int = 4, height: int = 4,
           steps: tuple[tuple[float | None, str], ...] = ((None, "green"),)) -> stat.Panel:
    """A stat panel of the last value."""
    panel = (
        stat.Panel().title(title).datasource(DATASOURCE).unit(unit).span(width).height(height)
        .thresholds(thresholds(*steps))
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False))
        .color_mode(common.BigValueColorMode.VALUE).graph_mode(common.BigValueGraphMode.AREA)
        .justify_mode(common.BigValueJustifyMode.AUTO).orientation(common.VizOrientation.AUTO)
        .text_mode(common.BigValueTextMode.AUTO)
    )
    if description:
        panel.description(description)
    _targets(panel, list(queries))
    return panel


def cells(title: str, query: prometheus.Dataquery, *, unit: str, width: int = 12,
          height: int = 8) -> heatmap.Panel:
    """A heatmap of a histogram's buckets, as Prometheus gives them (no calculation)."""
    panel = (
        heatmap.Panel().title(title).datasource(DATASOURCE).unit(unit).span(width).height(height)
        .calculate(False).cell_gap(1)
        .y_axis(heatmap.YAxisConfig().axis_placement(common.AxisPlacement.LEFT).unit(unit))
        .rows_frame(heatmap.RowsHeatmapOptions().layout(common.HeatmapCellLayout.AUTO))
        .color(heatmap.HeatmapColorOptions().mode(heatmap_model.HeatmapColorMode.SCHEME).scheme("Oranges")
               .scale(heatmap_model.HeatmapColorScale.EXPONENTIAL).exponent(0.5).steps(64).reverse(False))
        .mode(common.TooltipDisplayMode.SINGLE).hide_y_histogram().show_legend()
        # Grafana's own default, spelled out: without it the JSON has no field config of the
        # panel's own, and reading it back into the SDK's model adds an empty one.
        .hide_from(common_builders.HideSeriesConfig().legend(False).tooltip(False).viz(False))
    )
    _targets(panel, [query.format(prometheus_model.PromQueryFormat.HEATMAP)])
    return panel


def rows() -> Iterator[tuple[str, list[Panel]]]:
    """Each row's title and panels, left to right; each line of a row is 24 wide."""
    yield "Overview", [
        single("Events in", q(f"sum(rate(gateway_events_consumed_total[{RATE}]))"), unit="ops",
               description="Records read from the events topic per second, all workers."),
        single("Deliveries", q(f"sum(rate({ATTEMPTS}[{RATE}]))"), unit="reqps",
               description="HTTP attempts per second, every tier."),
        single("Success ratio", q(ratio()), unit="percentunit", description="Share of attempts answered 2xx.",
               steps=((None, "red"), (0.9, "orange"), (0.95, "green"))),
        single("Dead letters (1h)", q("sum(increase(gateway_dead_letters_total[1h]))"),
               description="Records written to the dead-letter topic in the last hour.",
               steps=((None, "green"), (1, "red"))),
        single("Since last success", q("time() - max(gateway_last_success_timestamp_seconds > 0)"), unit="s",
               description="Time since any worker got a 2xx (no data: none yet)."),
        single("Workers", q(f'sum(up{{job="{JOB}"}})', "up"), q("sum(gateway_ready)", "ready"),
               description="Worker processes Prometheus scrapes, and how many answer /readyz with 200."),
    ]
    yield "Rate", [
        graph("Events in per second by type",
              q(f"sum by (event_type) (rate(gateway_events_consumed_total[{RATE}]))", "{{event_type}}"),
              unit="ops", description="undecodable and invalid are records that were dead-lettered at once."),
        graph("Deliveries per second by outcome", q(f"sum by (outcome) (rate({ATTEMPTS}[{RATE}]))", "{{outcome}}"),
              unit="reqps"),
        graph("Success ratio", q(ratio(), "all tiers"), q(ratio(by="tier"), "{{tier}}"), unit="percentunit",
              description="Share of attempts answered 2xx, overall and per tier.", low=0, high=1),
        graph("Failed attempts by outcome and status class",
              q(f'sum by (outcome, status_class) (rate({ATTEMPTS}{{outcome!="success"}}[{RATE}]))',
                "{{outcome}} {{status_class}}"), unit="reqps"),
    ]
    yield "Errors", [
        graph("Retries scheduled per tier", q(f"sum by (tier) (rate(gateway_retries_scheduled_total[{RATE}]))",
                                              "{{tier}}"),
              unit="ops", description="Deliveries sent on to a retry tier (the tier named)."),
        graph("Dead letters per reason",
              q(f"60 * sum by (reason) (rate(gateway_dead_letters_total[{RATE}]))", "{{reason}}"),
              unit="opm", description="Dead letters per minute; inspect with `gateway dlq list`."),
        graph("Decode errors", q(f"sum by (tier, reason) (rate(gateway_decode_errors_total[{RATE}]))",
                                 "{{tier}} {{reason}}"),
              unit="ops", description="Records that could not be decoded or validated "
              "(dead-lettered with their bytes)."),
        graph("Endpoints", q('max(gateway_endpoints{state="enabled"})', "enabled"),
              q("sum(max by (state) (gateway_endpoints))", "known"),
              description="Registered endpoints (every worker reads the same table: max)."),
    ]
    yield "Duration", [
        graph("Delivery latency", *quantiles("gateway_delivery_duration_seconds"), unit="s",
              description="One HTTP attempt, connect to last byte."),
        cells("Delivery latency heatmap",
              q(f"sum by (le) (increase(gateway_delivery_duration_seconds_bucket[{RATE}]))", "{{le}}"), unit="s"),
        graph("End-to-end latency", *quantiles("gateway_end_to_end_latency_seconds"), unit="s",
              description="From the event's occurrence to its 2xx, across retries: steps at 1m, 6m and 21m "
              "are deliveries that needed the 1st, 2nd or 3rd retry."),
        graph("End-to-end latency p95 by event type",
              q(f"histogram_quantile(0.95, sum by (le, event_type) "
                f"(rate(gateway_end_to_end_latency_seconds_bucket[{RATE}])))", "{{event_type}}"), unit="s"),
    ]
    yield "Saturation", [
        graph("Consumer lag by topic", q("sum by (topic) (gateway_consumer_lag_records)", "{{topic}}"),
              description="Records not settled yet (high watermark minus stored offset). Retry tiers and "
              "deferral rungs hold records until due, so their lag is normal up to a delay's worth."),
        graph("Oldest record age by tier", q("max by (tier) (gateway_oldest_record_age_seconds)", "{{tier}}"),
              unit="s", description="Age of the oldest record a worker took from each tier and has not settled "
              "(from its Kafka timestamp). Retry tiers and deferral rungs hold records until due, so there it "
              "is normal up to the tier's delay; on the events tier it is how far delivery is behind."),
        graph("In flight", q("sum by (tier) (gateway_deliveries_in_flight)", "deliveries {{tier}}"),
              q("sum(gateway_in_flight_records)", "records"),
              description="HTTP deliveries in progress per tier, and records in progress "
              "(bounded by GATEWAY_CONCURRENCY per worker)."),
    ]
    yield "Deferrals and held deliveries", [
        graph("Deferrals per second by reason and rung",
              q(f"sum by (reason, rung) (rate(gateway_deferred_total[{RATE}]))", "{{reason}}, {{rung}}"),
              unit="ops", description="Deliveries put off for the gateway's own limits (no attempt spent), "
              "why, and the rung that holds them until their endpoint can take them."),
        graph("Held on retry tiers and deferral rungs", q(f"sum by (tier) ({HELD})", "{{tier}}"),
              bound=1000, description="Deliveries waiting on each retry tier and deferral rung. Above the "
              "line and still growing for 15 minutes: GatewayHeldBacklogGrowing."),
    ]
    yield "Consumers", [
        graph("Time out of the consumer group", q("max by (tier) (gateway_consumer_out_of_group_seconds)",
                                                  "{{tier}}"),
              unit="s", bound=120, description="How long each tier's consumer (the worst process) has been out "
              "of its consumer group, fetching nothing. Above the line for a minute: GatewayConsumerOutOfGroup."),
        single("Tiers without a reader",
               q("count(max by (tier) (gateway_tier_readers) == 0) or vector(0)"), width=6, height=8,
               description="Tiers no process reads: what is sent there waits (GatewayTierWithoutReader).",
               steps=((None, "green"), (1, "red"))),
        single("Consumers replaced (1h)", q("sum(increase(gateway_consumer_replacements_total[1h]))"),
               width=6, height=8, description="Consumers closed and made anew because they stayed out of "
               "their group past the bound, in the last hour.", steps=((None, "green"), (1, "orange"))),
    ]
    yield "Circuit breakers", [
        graph("Circuit breakers by state", q("sum by (state) (gateway_circuit_breakers)", "{{state}}"),
              description="Endpoints the workers know, by the state of their circuit. While open, deliveries "
              "spend their attempts without a request until a probe answers 2xx."),
        graph("Longest-open circuit", q("max by (instance) (gateway_circuit_oldest_open_seconds)",
                                        "{{instance}}"),
              unit="s", bound=1800, description="Since when the circuit of an enabled endpoint open longest "
              "has been open, per worker. Above the line: GatewayCircuitOpenTooLong; "
              "`gateway endpoints list` names the endpoints."),
    ]
    yield "Delivery history", [
        graph("History lines written per second",
              q(f"sum by (result) (rate(gateway_history_writes_total[{RATE}]))", "{{result}}"), unit="ops",
              description="Lines of the delivery history (the attempts topic): written, or failed (lost; its "
              "delivery was dead-lettered as internal_error)."),
        graph("History writes waiting for the broker",
              q("sum by (instance) (gateway_history_writes_waiting)", "{{instance}}"),
              description="Lines sent and not acknowledged yet; a write the broker refuses is retried, and its "
              "record waits. Waiting while none is written: GatewayHistoryWritesFailing."),
    ]

    yield "Management API", [
        graph("API requests per second by route and status class",
              q(f'sum by (route, status_class) (label_replace(rate({API_REQUESTS}[{RATE}]), "status_class", '
                f'"${{1}}xx", "status", "([0-9]).."))', "{{route}} {{status_class}}"),
              unit="reqps", description="Requests each API process answered, by route template (unmatched: a "
              "path no route has) and status class: 401 and 403 are tokens and scopes, 404 unknown ids, 503 "
              "Kafka out of reach. Scrapes of /metrics are not counted."),
        graph("API error ratio", q(api_error_ratio("5.."), "5xx"), q(api_error_ratio("4.."), "4xx"),
              unit="percentunit", low=0, bound=0.05,
              description="Share of the /v1 requests answered 5xx (the API's side: above the line for 10 "
              "minutes, GatewayApiErrors) and 4xx (the callers': a rise is a client sending what the API "
              "refuses, or tokens that expired)."),
        graph("API latency p95 by route",
              q(f"histogram_quantile(0.95, sum by (le, route) "
                f"(rate(gateway_api_request_duration_seconds_bucket[{RATE}])))", "{{route}}"),
              unit="s", description="From a request's arrival to the end of its answer. Writes wait until the "
              "API's table shows them (up to 10 s), test sends for the receiver."),
        graph("Replay jobs by state", q("sum by (state) (gateway_api_replay_jobs)", "{{state}}"),
              description="Replay jobs the API processes remember (the last 100 each), by state; at most one "
              "runs at a time per process."),
        graph("Replay jobs finished (1h) by result",
              q("sum by (result) (increase(gateway_api_replay_jobs_finished_total[1h]))", "{{result}}"),
              width=8, description="Replay jobs that ended in the last hour: succeeded (every planned dead "
              "letter acknowledged and recorded), failed (the job says why: GET /v1/replays/ID), dry_run."),
        graph("Dead letters replayed per second",
              q(f"sum by (result) (rate(gateway_api_replayed_records_total[{RATE}]))", "{{result}}"),
              unit="ops", width=8, description="Dead letters replay jobs sent back to the first retry tier: "
              "acknowledged by the broker, or failed (the same replay sends them again)."),
        single("API processes", q(f'sum(up{{job="{API_JOB}"}})', "up"), width=8, height=8,
               description="Management API processes Prometheus scrapes and reaches."),
    ]


def dashboard() -> model.Dashboard:
    """The dashboard model Grafana provisions."""
    ids = itertools.count(1)
    builder = (
        Dashboard("Webhook gateway").uid("webhook-gateway")
        .description("Events in, deliveries out, retries, dead letters and lag of every gateway worker, "
                     "and what the alerts watch. Generated by observability/grafana/dashboard.py.")
        .tags(["webhooks", "kafka"]).timezone("browser").readonly()
        .tooltip(model.DashboardCursorSync.CROSSHAIR).refresh("30s").time("now-1h", "now").version(1)
    )
    for title, panels in rows():
        builder.with_row(Row(title).id(next(ids)).collapsed(False))
        for panel in panels:
            builder.with_panel(panel.id(next(ids)))
    return builder.build()


def render() -> str:
    return json.dumps(dashboard(), cls=JSONEncoder, indent=2) + "\n"


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
