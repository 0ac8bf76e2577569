"""The ``gateway`` command line: presentation only. A command parses its flags, calls one
function of the library (the operations layer, the embedded assembly, the workers) and
prints. Results go to stdout, progress and errors to stderr; exit 0 on success, 1 when
the work failed or input was refused, 2 on usage errors.

Errors are read by their branch of the one tree (:mod:`gateway.errors`): an
:class:`~gateway.errors.InputError` naming a flag is a usage error (exit 2), every other
:class:`~gateway.errors.GatewayError` is ``error: <message>`` and exit 1
(:func:`refusals`).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

import click

from .config import SETTINGS, Config, read_setting, setting
from .errors import ConfigError, GatewayError, InputError, NotFound
from .observability import configure_logging

__all__ = ["cli", "main"]

F = TypeVar("F", bound=Callable[..., Any])


def config_options(*names: str, aliases: Mapping[str, str] = {}) -> Callable[[F], F]:
    """Add the flags of the named settings to a command; they land in ``**settings``.
    ``aliases`` gives a setting a second flag on this command (``gateway api --port``)."""
    chosen = [s for s in SETTINGS if s.name in names]
    missing = set(names) - {s.name for s in chosen}
    assert not missing, f"unknown settings {missing}"

    def decorate(func: F) -> F:
        for option in reversed(chosen):
            assert option.flag is not None, f"{option.env} is read from the environment only"
            default = getattr(Config(), option.name)
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else \
                "unset" if default is None else default
            flags = [option.flag, *([aliases[option.name]] if option.name in aliases else [])]
            func = click.option(
                *flags,
                option.name,
                default=None,
                metavar="VALUE",
                help=f"{option.help} [env {option.env}; default {shown}]",
            )(func)
        return func

    return decorate


def parse_flags(settings: Mapping[str, str | None]) -> dict[str, Any]:
    """The settings given as flags, parsed (None for those not given); a bad value is a
    usage error naming its flag."""
    parsed: dict[str, Any] = {}
    for name, text in settings.items():
        if text is None:
            parsed[name] = None
            continue
        option = setting(name)
        try:
            parsed[name] = option.parse(text)
        except ConfigError as exc:
            raise click.BadParameter(str(exc), param_hint=option.flag) from None
    return parsed


def build_config(settings: Mapping[str, str | None]) -> Config:
    """Environment first, then flags given on the command line."""
    try:
        return Config.from_env(**parse_flags(settings))
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


class CommandError(click.ClickException):
    """The work failed or the input was refused: ``error: <message>`` on stderr, exit 1.

    Raised by commands instead of printing and exiting themselves, so every refusal takes
    click's one error path; usage errors stay click's own (exit 2).
    """

    exit_code = 1

    def show(self, file: IO[Any] | None = None) -> None:
        # Messages quote values from topics and receivers: escaped like every output.
        message = "\n".join(printable(line) for line in self.format_message().splitlines())
        click.echo(f"error: {message}", err=True, file=file)


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped (``\\x1b``, ``\\u202e``).

    Endpoint fields and dead-letter details may have been written straight to a topic
    by anyone, or come from a receiver: printed raw, an escape sequence would rewrite the
    user's terminal or hide part of a line. JSON output needs none of this (json.dumps
    escapes control characters itself).
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="webhook-gateway")
@click.option("--log-level", default=None, metavar="LEVEL", type=click.Choice(
              ["debug", "info", "warning", "error", "critical"], case_sensitive=False),
              help=f"{setting('log_level').help} [env {setting('log_level').env}]")
@click.pass_context
def cli(ctx: click.Context, log_level: str | None) -> None:
    """Kafka-based streaming webhook gateway.

    Platform services publish chat events as Avro records to Kafka; the gateway POSTs each
    one as signed JSON to every webhook endpoint registered for its bot, retries failures
    through the retry tiers, and dead-letters what still fails.

    Every setting can also be given as a GATEWAY_* environment variable.
    """
    long_running = ctx.invoked_subcommand in ("up", "run", "api")
    try:
        configure_logging(log_level, default="INFO" if long_running else "WARNING")
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


def data_option(func: F) -> F:
    """``--data DIR`` of `gateway up` and `gateway broker`: Apache Kafka, keeping its data."""
    return click.option(
        "--data", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
        help="Run Apache Kafka (KRaft, one node, from Maven Central's jars) with its log in DIR instead of "
             "the bundled in-memory broker: a restart on the same DIR keeps every topic, endpoint and dead "
             "letter. Needs Java 17+, and Maven the first time (to fetch the jars into "
             "~/.cache/webhook-gateway); its controller listens on --port + 1.",
    )(func)


@cli.command()
@click.option("--port", type=click.IntRange(1, 65535), default=9092, show_default=True,
              help="Port to listen and advertise on, on 127.0.0.1.")
@data_option
def broker(port: int, data: Path | None) -> None:
    """Run a broker in the foreground: the bundled Kafka-compatible one (Tansu), or with
    --data DIR Apache Kafka with its data in DIR.

    The bundled broker keeps everything in memory: stopping it loses every topic and
    record. Ctrl-C or SIGTERM stops it (Apache Kafka cleanly: it closes its log).
    """
    from . import streaming

    running: streaming.Broker | streaming.KafkaNode
    try:
        with refusals():
            if data is None:
                running = streaming.Broker(port=port).start()
                click.echo(f"broker listening on {running.bootstrap} (in memory; Ctrl-C stops it)", err=True)
            else:
                running = streaming.KafkaNode(data, port=port, on_progress=lambda line: click.echo(line, err=True))
                running.start()
                click.echo(f"Apache Kafka {streaming.kafka_version()} listening on {running.bootstrap} "
                           f"(data in {running.root}, kept across restarts; Ctrl-C stops it)", err=True)
    except OSError as exc:
        raise CommandError(describe_os_error(exc)) from None
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        running.terminate()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    code = running.wait()
    running.stop()
    if not stopping:
        raise CommandError(f"the broker exited by itself with code {code}")
    click.echo("broker stopped", err=True)


@cli.group()
def topics() -> None:
    """Create and check the gateway's topics."""


@topics.command("create")
@config_options("bootstrap_servers", "topic_prefix", "retry_delays", "partitions",
                "replication_factor")
def topics_create(**settings: str | None) -> None:
    """Create the events, retry tier, dead-letter and endpoints topics.

    Idempotent: topics that already exist are left as they are and reported.
    """
    from .store import TopicStatus, create_topics

    config = build_config(settings)

    def report(status: TopicStatus) -> None:
        click.echo(f"{'created' if status.created else 'exists '}  {status.topic}")
        for problem in status.problems:
            click.echo(f"warning: {status.topic} exists with {problem}; topics create leaves it as it is",
                       err=True)

    try:
        create_topics(config, on_status=report, on_warning=lambda text: click.echo(f"warning: {text}", err=True))
    except GatewayError as exc:
        raise CommandError(f"could not create topics: {exc}") from None


@cli.command()
@click.argument("source", type=click.File("r", encoding="utf-8"), default="-")
@click.option("--skip-invalid", is_flag=True,
              help="Publish the valid events even when some are invalid (exit code is still 1).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per published event.")
@config_options("bootstrap_servers", "topic_prefix", "schema_registry_url")
def publish(source: Any, skip_invalid: bool, as_json: bool, **settings: str | None) -> None:
    """Validate events and publish them to the events topic as Avro.

    SOURCE is a file (or - for stdin) holding events in the documented JSON shape: one
    object per line, or one JSON array. An event id (UUID) and occurrence time are assigned
    unless the event carries "eventId" / "occurredAt". Each published event's id is printed
    once the broker has acknowledged it.

    If any event is invalid, nothing is published (unless --skip-invalid) and the exit
    code is 1.
    """
    import json

    from .publisher import Publisher, read_events

    config = build_config(settings)
    try:
        items = read_events(source.read())
    except UnicodeDecodeError as exc:
        raise CommandError(f"{source.name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except ValueError as exc:
        raise CommandError(f"{source.name}: {exc}") from None
    if not items:
        raise CommandError(f"{source.name}: no events in the input")
    invalid = [item for item in items if item.error]
    for item in invalid:
        click.echo(f"error: {source.name} {item.where}: {item.error}", err=True)
    if invalid and not skip_invalid:
        raise CommandError(
            f"nothing was published: {len(invalid)} of {len(items)} events are invalid "
            "(fix them, or pass --skip-invalid to publish the valid ones)"
        )
    events = [item.event for item in items if item.event is not None]
    failed = 0
    if events:
        with Publisher(config) as publisher:
            results = publisher.publish_many(events)
        for item, result in zip((i for i in items if i.event), results, strict=True):
            if result.ok:
                if as_json:
                    click.echo(json.dumps({
                        "eventId": result.event.event_id, "event": result.event.type.value,
                        "partition": result.partition, "offset": result.offset,
                    }))
                else:
                    click.echo(result.event.event_id)
            else:
                failed += 1
                click.echo(f"error: {source.name} {item.where}: not published: {result.error}", err=True)
    sent = len(events) - failed
    click.echo(
        f"published {sent} of {len(items)} events to {config.topic_prefix}.events"
        + (f"; {len(invalid)} invalid, not published" if invalid else "")
        + (f"; {failed} not acknowledged by the broker" if failed else ""),
        err=True,
    )
    if invalid or failed:
        click.get_current_context().exit(1)


def describe_os_error(exc: OSError) -> str:
    """An operating-system failure as it is (``[Errno 24] Too many open files``), with
    the file it concerns when there is one: never blamed on the metrics port."""
    return str(exc) or type(exc).__name__


WORKER_SETTINGS = (
    "bootstrap_servers", "topic_prefix", "retry_delays", "schema_registry_url", "group_id",
    "metrics_port", "concurrency", "endpoint_concurrency", "request_timeout",
    "max_response_bytes", "max_record_bytes", "shutdown_timeout", "session_timeout_ms",
    "group_protocol", "instance_id", "max_poll_interval_ms", "fetch_wait_ms",
    "allow_private_networks", "allowed_networks",
)


@cli.command()
@click.option("--tiers", default="all", show_default=True, metavar="NAMES",
              help="Comma-separated tiers to run: events, retry-1m, deferred-5s, … or all. "
                   "Every process also takes its share of the deliveries topic (the endpoints it "
                   "makes the attempts of).")
@click.option("--no-metrics", is_flag=True, help="Do not serve /metrics.")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Worker processes in the group; worker i serves metrics on --metrics-port + i.")
@config_options(*WORKER_SETTINGS)
def run(tiers: str, no_metrics: bool, workers: int, **settings: str | None) -> None:
    """Run delivery workers against an existing Kafka, until SIGTERM or Ctrl-C.

    Workers of the same group id share the partitions of each tier; run as many as the
    partitions allow. On SIGTERM a worker stops taking records, lets in-flight deliveries
    finish (up to --shutdown-timeout), commits and exits 0.
    """
    from . import streaming

    config = build_config(settings)
    try:
        with refusals(flags={"tiers": "--tiers"}):
            chosen = streaming.resolve_tiers(config, [t.strip() for t in tiers.split(",") if t.strip()])
            if workers > 1:
                code = streaming.supervise(config, workers, [t.name for t in chosen], metrics=not no_metrics)
                click.get_current_context().exit(code)
            observed = streaming.observe(config, port=None if no_metrics else config.metrics_port)
            streaming.run(config, chosen, observed=observed)
    except OSError as exc:
        raise CommandError(describe_os_error(exc)) from None


@cli.command()
@click.option("--port", type=click.IntRange(1, 65535), default=9092, show_default=True,
              help="Port of the broker up starts, on 127.0.0.1 (ignored with --bootstrap).")
@data_option
@click.option("--no-api", is_flag=True, help="Do not serve the management API.")
@config_options(*WORKER_SETTINGS, "partitions", "api_host", "api_port", "api_history_size")
def up(port: int, data: Path | None, no_api: bool, **settings: str | None) -> None:
    """The embedded default: broker, topics, every worker, /metrics and the API in one command.

    Starts the bundled in-memory broker on 127.0.0.1 (a restart forgets every endpoint and
    dead letter), or with --data DIR Apache Kafka keeping its data in DIR (unless
    --bootstrap or GATEWAY_BOOTSTRAP_SERVERS points at an existing Kafka), creates the
    topics, runs the events worker and every retry tier, serves /metrics and the
    management API (on a thread of this process; with a token generated for this run and
    printed, unless GATEWAY_API_TOKENS is set). Deliveries to loopback and private
    addresses are allowed unless GATEWAY_ALLOW_PRIVATE_NETWORKS=false. Ctrl-C stops
    everything, the broker last.
    """
    from .embedded import Started
    from .embedded import up as run_up
    from .signing import new_secret
    from .streaming import kafka_version

    demo_secret = new_secret()

    def ready(started: Started) -> None:
        config = started.config
        # The second terminal judges URLs as these workers do: with the same settings.
        exports = f"GATEWAY_BOOTSTRAP_SERVERS={config.bootstrap_servers}"
        if config.allow_private_networks:
            exports += " GATEWAY_ALLOW_PRIVATE_NETWORKS=true"
        if started.bundled_broker:
            where = f"bundled broker (in memory) on {config.bootstrap_servers}"
            kept = "  data      in memory: a restart forgets every endpoint and dead letter (--data DIR keeps them)\n"
        elif started.data is not None:
            where = f"Apache Kafka {kafka_version()} on {config.bootstrap_servers}"
            kept = f"  data      {started.data}  (a restart on it keeps every endpoint and dead letter)\n"
        else:
            where, kept = config.bootstrap_servers, ""
        metrics = f"http://127.0.0.1:{config.metrics_port}/metrics"
        if started.api is not None:
            api_line = f"{started.api.url}/v1  (OpenAPI at /openapi.json)"
            if started.api.generated_token:
                api_line += (f"\n            token {started.api.generated_token}  (generated for this run; "
                             "GATEWAY_API_TOKENS sets your own)")
            metrics += f"  (workers)\n            {started.api.url}/metrics  (API)"
        else:
            api_line = "off (--no-api)" if no_api else "not served (port taken)"
        tiers = ", ".join(f"{t.name} ({t.delay}s)" if t.delay else t.name for t in started.tiers)
        click.echo(
            f"gateway up\n"
            f"  kafka     {where}\n"
            f"{kept}"
            f"  topics    {', '.join(started.topics)}\n"
            f"  tiers     {tiers}\n"
            f"  metrics   {metrics}\n"
            f"  api       {api_line}\n"
            f"try: a receiver that verifies and prints each webhook, in another terminal:\n"
            f"  gateway listen --port 8000 --secret {demo_secret}\n"
            f"then register it and publish the documented examples, in a third:\n"
            f"  export {exports}\n"
            f"  gateway endpoints add --bot-id 6434515b-8541-4861-bb24-8acd6e77e8c4 "
            f"--url http://127.0.0.1:8000/hook --secret {demo_secret}\n"
            f"  gateway publish examples/events.jsonl\n"
            f"Ctrl-C stops everything.",
            err=True,
        )

    try:
        with refusals(flags={"data": "--data"}):
            run_up(parse_flags(settings), broker_port=port, api=not no_api, on_ready=ready,
                   on_warning=lambda text: click.echo(f"warning: {printable(text)}", err=True),
                   data=data, on_progress=lambda line: click.echo(line, err=True))
    except OSError as exc:
        raise CommandError(describe_os_error(exc)) from None


@cli.group()
def endpoints() -> None:
    """Register, list, enable, disable and remove webhook endpoints; rotate their secrets."""


ENDPOINT_SETTINGS = ("bootstrap_servers", "topic_prefix", "schema_registry_url")
ADD_SETTINGS = (*ENDPOINT_SETTINGS, "allow_private_networks", "allowed_networks")


@contextmanager
def refusals(*, flags: Mapping[str, str] | None = None, not_found: str | None = None) -> Iterator[None]:
    """The library's errors, by their branch of the tree: an input error naming one of
    ``flags`` (library name → flag) is a usage error naming that flag (exit 2); every
    other error says what was wrong (``error: …``, exit 1), a not-found one followed by
    ``not_found`` (where to look)."""
    try:
        yield
    except InputError as exc:
        if flags is not None and exc.field is not None and exc.field in flags:
            raise click.BadParameter(str(exc), param_hint=flags[exc.field]) from None
        raise CommandError(str(exc)) from None
    except NotFound as exc:
        raise CommandError(f"{exc} ({not_found})" if not_found else str(exc)) from None
    except GatewayError as exc:
        raise CommandError(str(exc)) from None


SEE_ENDPOINTS = "see `gateway endpoints list`"

FILTER_FLAGS = {name: "--" + name.replace("_", "-") for name in (
    "event_type", "bot_id", "endpoint_id", "reason", "status", "since", "until", "partition", "from_offset",
    "to_offset", "limit", "rate", "selector", "to_endpoint")}
"""The filter flags of `deliveries list` and the dlq commands, by the library's names for them."""


@endpoints.command("add")
@click.option("--bot-id", required=True, help="UUID of the bot whose events the endpoint receives.")
@click.option("--url", required=True, help="http(s) URL the events are POSTed to.")
@click.option("--events", default="", metavar="TYPES",
              help="Comma-separated event types to receive (default: all).")
@click.option("--secret", default=None, help="Signing secret whsec_<base64> (default: generated).")
@click.option("--description", default=None, help="Free text, shown by `endpoints list`.")
@click.option("--rate-limit", default=None, metavar="RATE",
              help="Most requests per second to it, per gateway process (50/s, 600/m; default: none).")
@click.option("--max-in-flight", default=None, metavar="N",
              help="Most requests in flight to it, per gateway process (default: GATEWAY_ENDPOINT_CONCURRENCY).")
@click.option("--json", "as_json", is_flag=True, help="Print the endpoint as one JSON object.")
@config_options(*ADD_SETTINGS)
def endpoints_add(bot_id: str, url: str, events: str, secret: str | None, description: str | None,
                  rate_limit: str | None, max_in_flight: str | None, as_json: bool, **settings: str | None) -> None:
    """Register an endpoint. Its signing secret is printed once: keep it."""
    import json

    from .ops import endpoint_json, register_endpoint

    config = build_config(settings)
    with refusals():
        registration = register_endpoint(config, bot_id=bot_id, url=url, event_types=events.split(","),
                                         secret=secret, description=description, rate_limit=rate_limit,
                                         max_in_flight=max_in_flight)
    if registration.warning:
        click.echo(f"warning: {printable(registration.warning)}", err=True)
    endpoint = registration.endpoint
    if as_json:
        click.echo(json.dumps(endpoint_json(endpoint, show_secret=True)))
    else:
        click.echo(f"id      {endpoint.id}\nbot     {endpoint.bot_id}\nurl     {printable(endpoint.url)}\n"
                   f"events  {','.join(endpoint.event_types) or 'all'}\n"
                   f"secret  {endpoint.secret}   (shown once)")


@endpoints.command("list")
@click.option("--bot-id", default=None, help="Only this bot's endpoints.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per endpoint.")
@click.option("--show-secrets", is_flag=True, help="Print signing secrets instead of masking them.")
@config_options(*ENDPOINT_SETTINGS)
def endpoints_list(bot_id: str | None, as_json: bool, show_secrets: bool, **settings: str | None) -> None:
    """List registered endpoints (read from the endpoints topic), with the state of their
    circuit breaker as the workers last reported it (the circuits topic)."""
    import json

    from .ops import circuit_json, endpoint_json, list_endpoints
    from .store import load_circuits

    config = build_config(settings)
    with refusals():
        rows = list_endpoints(config, bot_id=bot_id)
        circuits = load_circuits(config)
    if as_json:
        for endpoint in rows:
            click.echo(json.dumps(endpoint_json(endpoint, show_secret=show_secrets)
                                  | {"circuit": circuit_json(circuits.get(endpoint.id))}))
        return
    if not rows:
        click.echo("no endpoints", err=True)
        return
    click.echo(f"{'ID':36}  {'BOT':36}  {'STATE':8}  {'CIRCUIT':9}  {'LIMITS':14}  {'EVENTS':28}  URL")
    for e in rows:
        state = "enabled" if e.enabled else "disabled"
        events = printable(",".join(e.event_types)) or "all"
        circuit = circuits.get(e.id)
        limits = "/".join(filter(None, (f"{e.rate_limit:g}/s" if e.rate_limit else "",
                                        f"{e.max_in_flight} conc" if e.max_in_flight else ""))) or "-"
        click.echo(f"{printable(e.id):36}  {printable(e.bot_id):36}  {state:8}  "
                   f"{circuit_json(circuit)['state']:9}  {limits:14}  {events:28}  "
                   f"{printable(e.url)}" + (f"  secret={printable(e.secret)}" if show_secrets else ""))


@endpoints.command("update")
@click.argument("endpoint_id")
@click.option("--url", default=None, help="A new http(s) URL to POST to.")
@click.option("--events", default=None, metavar="TYPES",
              help="Comma-separated event types to receive ('all' for every type).")
@click.option("--description", default=None, help="New free text.")
@click.option("--rate-limit", default=None, metavar="RATE",
              help="Most requests per second, per gateway process (50/s, 600/m; 'none' removes the limit).")
@click.option("--max-in-flight", default=None, metavar="N",
              help="Most requests in flight, per gateway process ('default' for GATEWAY_ENDPOINT_CONCURRENCY).")
@click.option("--json", "as_json", is_flag=True, help="Print the endpoint as one JSON object.")
@config_options(*ADD_SETTINGS)
def endpoints_update(endpoint_id: str, url: str | None, events: str | None, description: str | None,
                     rate_limit: str | None, max_in_flight: str | None, as_json: bool,
                     **settings: str | None) -> None:
    """Change an endpoint's URL, events, description or limits; what is not given stays.

    Workers follow the change within seconds: a new URL gets new connections, new limits
    apply to the next deliveries."""
    import json

    from .ops import KEEP, endpoint_json, update_endpoint

    if all(v is None for v in (url, events, description, rate_limit, max_in_flight)):
        raise click.UsageError("nothing to change: give --url, --events, --description, --rate-limit or "
                               "--max-in-flight")
    config = build_config(settings)
    types = None if events is None else ([] if events.strip().lower() == "all" else events.split(","))
    with refusals(not_found=SEE_ENDPOINTS):
        registration = update_endpoint(config, endpoint_id, url=KEEP if url is None else url,
                                       event_types=KEEP if types is None else types,
                                       description=KEEP if description is None else description,
                                       rate_limit=KEEP if rate_limit is None else rate_limit,
                                       max_in_flight=KEEP if max_in_flight is None else max_in_flight)
    if registration.warning:
        click.echo(f"warning: {printable(registration.warning)}", err=True)
    endpoint = registration.endpoint
    if as_json:
        click.echo(json.dumps(endpoint_json(endpoint)))
    else:
        click.echo(f"updated {endpoint.id}", err=True)


@endpoints.command("remove")
@click.argument("endpoint_id")
@config_options(*ENDPOINT_SETTINGS)
def endpoints_remove(endpoint_id: str, **settings: str | None) -> None:
    """Remove an endpoint. Its pending retries are dead-lettered as endpoint_removed."""
    from .ops import remove_endpoint

    config = build_config(settings)
    with refusals(not_found=SEE_ENDPOINTS):
        remove_endpoint(config, endpoint_id)
    click.echo(f"removed {printable(endpoint_id)}", err=True)


@endpoints.command("disable")
@click.argument("endpoint_id")
@config_options(*ENDPOINT_SETTINGS)
def endpoints_disable(endpoint_id: str, **settings: str | None) -> None:
    """Stop delivering to an endpoint without removing it."""
    from .ops import set_endpoint_enabled

    config = build_config(settings)
    with refusals(not_found=SEE_ENDPOINTS):
        set_endpoint_enabled(config, endpoint_id, False)
    click.echo(f"disabled {printable(endpoint_id)}", err=True)


@endpoints.command("enable")
@click.argument("endpoint_id")
@config_options(*ENDPOINT_SETTINGS)
def endpoints_enable(endpoint_id: str, **settings: str | None) -> None:
    """Deliver to a disabled endpoint again."""
    from .ops import set_endpoint_enabled

    config = build_config(settings)
    with refusals(not_found=SEE_ENDPOINTS):
        set_endpoint_enabled(config, endpoint_id, True)
    click.echo(f"enabled {printable(endpoint_id)}", err=True)


@endpoints.command("rotate-secret")
@click.argument("endpoint_id")
@click.option("--secret", default=None, help="The new secret whsec_<base64> (default: generated).")
@click.option("--grace", default="24h", show_default=True, metavar="DURATION",
              help="How long the old secret keeps signing too (e.g. 30m, 24h, 7d).")
@config_options(*ENDPOINT_SETTINGS)
def endpoints_rotate_secret(endpoint_id: str, secret: str | None, grace: str, **settings: str | None) -> None:
    """Give an endpoint a new signing secret; the old one signs too until the grace ends.

    During the grace period every request carries two signatures, space-separated, as
    the Standard Webhooks specification allows, so the receiver can switch secrets
    without losing a request. The new secret is printed once.
    """
    from .config import parse_delays
    from .ops import rotate_secret

    config = build_config(settings)
    try:
        (grace_seconds,) = parse_delays(grace)
    except (ValueError, ConfigError):
        raise click.BadParameter(f"{grace!r} is not a duration such as 30m, 24h or 7d",
                                 param_hint="--grace") from None
    with refusals(not_found=SEE_ENDPOINTS):
        endpoint = rotate_secret(config, endpoint_id, secret=secret, grace_seconds=grace_seconds)
    click.echo(f"secret  {endpoint.secret}   (shown once; the old secret keeps signing for {grace})")


TEST_SETTINGS = (*ADD_SETTINGS, "request_timeout", "max_response_bytes")


@endpoints.command("test")
@click.argument("endpoint_id")
@click.option("--event", "event_types", multiple=True, metavar="TYPE",
              help="Send this event type's example (repeatable): MESSAGE, RATE_MESSAGE, TICKET or CREATE_LEAD.")
@click.option("--all-types", is_flag=True, help="Send the example of every event type (the default).")
@click.option("--malformed", is_flag=True,
              help="Also send a request with a bad signature and one with a stale timestamp, and report whether "
                   "the receiver refused them, as it should.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@config_options(*TEST_SETTINGS)
def endpoints_test(endpoint_id: str, event_types: tuple[str, ...], all_types: bool, malformed: bool,
                   as_json: bool, **settings: str | None) -> None:
    """Send the documented example of each event type to an endpoint now.

    Each goes through the gateway's own sender (signed with the endpoint's secret, the
    same destination rules and timeout as deliveries) with the endpoint's bot id and a
    fresh webhook-id; each answer is reported with its status, duration and the start
    of the response. Test sends are not deliveries: never retried, dead-lettered or
    recorded in the delivery history. Exit 1 unless every example got a 2xx (and, with
    --malformed, every malformed request was refused).
    """
    import asyncio
    import json

    from .ops import send_test_events

    if event_types and all_types:
        raise click.UsageError("--event and --all-types exclude each other")
    config = build_config(settings)
    with refusals(not_found=SEE_ENDPOINTS):
        report = asyncio.run(send_test_events(config, endpoint_id, event_types=event_types or None,
                                              malformed=malformed))
    endpoint = report.endpoint
    if as_json:
        click.echo(json.dumps(report.to_json()))
    else:
        click.echo(f"endpoint {printable(endpoint.id)}  {printable(endpoint.url)}"
                   + ("" if endpoint.enabled else "  (disabled: test sends go to it all the same)"))
        click.echo(f"{'REQUEST':16} {'EVENT':12} {'RESULT':10} {'STATUS':>6} {'MS':>8}  RESPONSE")
        for probe in report.probes:
            a = probe.attempt
            shown = a.response_snippet if a.status is not None else a.error
            click.echo(f"{probe.kind.value:16} {probe.event_type:12} {probe.verdict.value:10} "
                       f"{a.status if a.status is not None else '-':>6} {a.duration_ms:>8.1f}  "
                       f"{printable((shown or '').replace(chr(10), ' ')[:60])}")
        failed = [p for p in report.probes if not p.ok]
        click.echo(f"{len(report.probes) - len(failed)} of {len(report.probes)} as expected", err=True)
    if not report.ok:
        click.get_current_context().exit(1)


@cli.group()
def deliveries() -> None:
    """The delivery history: every attempt, successful or not (the attempts topic)."""


@deliveries.command("list")
@click.option("--event-id", default=None, help="Only this event's attempts.")
@click.option("--endpoint-id", default=None, help="Only attempts at this endpoint.")
@click.option("--bot-id", default=None, help="Only this bot's attempts (any case).")
@click.option("--since", default=None, help="Attempts since: ISO time (2026-11-28T10:00Z) or relative (2h ago).")
@click.option("--until", default=None, help="Attempts until: ISO time or relative.")
@click.option("--status", default=None,
              help="success, failed, deferred, an outcome (timeout, connection_error, …), a class (5xx) or a "
                   "code (404).")
@click.option("--limit", type=click.IntRange(1), default=None, help="At most this many (the newest).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per attempt.")
@config_options(*ENDPOINT_SETTINGS)
def deliveries_list(event_id: str | None, endpoint_id: str | None, bot_id: str | None, since: str | None,
                    until: str | None, status: str | None, limit: int | None, as_json: bool,
                    **settings: str | None) -> None:
    """What happened to an event, or at an endpoint: every attempt, newest first.

    Reads the attempts topic to its end (kept GATEWAY_ATTEMPTS_RETENTION, 7 days by
    default); never joins the workers' consumer groups.
    """
    import json

    from .ops import HistoryFilters, read_history
    from .records import Outcome

    config = build_config(settings)
    with refusals(flags=FILTER_FLAGS):
        filters = HistoryFilters.parse(event_id=event_id, endpoint_id=endpoint_id, bot_id=bot_id, status=status,
                                       since=since, until=until)
        entries = read_history(config, filters)
    shown = entries[:limit] if limit else entries
    for number, entry in enumerate(shown):
        row = entry.to_json()
        if as_json:
            click.echo(json.dumps(row))
            continue
        if number == 0:
            click.echo(f"{'AT':24} {'EVENT ID':36} {'TYPE':12} {'ENDPOINT':8} {'#':>2} {'TIER':10} "
                       f"{'OUTCOME':24} {'MS':>8}  NEXT")
        a = entry.line.attempt
        outcome = f"HTTP {a.status}" if a.status is not None else a.outcome.value
        if a.status is not None and a.outcome not in (Outcome.SUCCESS, Outcome.HTTP_ERROR):
            outcome = f"{a.outcome.value} ({a.status})"
        click.echo(f"{row['at']:24} {printable(row['eventId']):36} {printable(row['eventType']):12} "
                   f"{printable(row['endpointId'][:8]):8} {row['number']:>2} {printable(row['tier']):10} "
                   f"{printable(outcome)[:24]:24} {a.duration_ms:>8.1f}  {printable(row['next'])}")
    more = f" (the newest {len(shown)} shown)" if len(shown) < len(entries) else ""
    click.echo(f"{len(entries)} attempt{'s' if len(entries) != 1 else ''}{more}", err=True)


@cli.group()
def dlq() -> None:
    """Inspect, count, export and replay dead letters.

    Every dlq command takes the same filters. Reading never joins the workers' consumer
    groups and stops at the end of the topic.
    """


DLQ_SETTINGS = ("bootstrap_servers", "topic_prefix", "retry_delays", "schema_registry_url", "group_id")


def dlq_filters(func: F) -> F:
    """The selection flags shared by every dlq command."""
    options = [
        click.option("--event-type", help="MESSAGE, RATE_MESSAGE, TICKET or CREATE_LEAD."),
        click.option("--bot-id", help="Only this bot's deliveries."),
        click.option("--endpoint-id", help="Only deliveries that failed for this endpoint."),
        click.option("--reason", help="retries_exhausted, undecodable, invalid, endpoint_removed, "
                     "endpoint_disabled, blocked_destination, gone."),
        click.option("--status", help="Last attempt's outcome: 5xx, 404, timeout or connection."),
        click.option("--since", help="Dead since: ISO time (2026-11-28T10:00Z) or relative (2h ago)."),
        click.option("--until", help="Dead until: ISO time or relative."),
        click.option("--partition", type=int, help="Only this partition of the dead-letter topic."),
        click.option("--from-offset", type=click.IntRange(0), help="Start at this offset."),
        click.option("--to-offset", type=click.IntRange(0), help="Stop after this offset."),
        click.option("--limit", type=click.IntRange(1), help="At most this many dead letters."),
    ]
    for option in reversed(options):
        func = option(func)
    return config_options(*DLQ_SETTINGS)(func)


def _split_dlq_args(kwargs: dict[str, Any]) -> tuple[Any, dict[str, str | None]]:
    from .ops import Filters

    settings = {k: kwargs.pop(k) for k in DLQ_SETTINGS}
    with refusals(flags=FILTER_FLAGS):
        filters = Filters.parse(**{k: kwargs.pop(k) for k in list(kwargs) if k in FILTER_FLAGS})
    return filters, settings


@dlq.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per dead letter.")
@click.option("--raw", "raw_file", type=click.File("w"), default=None,
              help="Also write the selected records' original bytes (base64) as JSON lines to FILE.")
@dlq_filters
def dlq_list(as_json: bool, raw_file: Any, **kwargs: Any) -> None:
    """One line per dead letter: when, reason, event type, bot, endpoint, attempts, last
    outcome, event id."""
    import base64
    import json

    from .ops import read_dead_letters

    filters, settings = _split_dlq_args(kwargs)
    config = build_config(settings)
    count = 0
    with refusals():
        for entry in read_dead_letters(config, filters):
            count += 1
            row = entry.summary()
            if as_json:
                click.echo(json.dumps(row))
            else:
                if count == 1:
                    click.echo(f"{'P:OFFSET':10} {'DEAD AT':24} {'REASON':20} {'EVENT':12} {'BOT':8} "
                               f"{'ENDPOINT':8} {'N':>2} {'LAST':24} EVENT ID")
                # Every field but the offsets came from a record: printed escaped.
                click.echo(
                    f"{entry.partition}:{entry.offset:<8} {row['deadAt'] or '-':24} "
                    f"{printable(row['reason']):20} {printable(row['eventType'] or '-'):12} "
                    f"{printable((row['botId'] or '-')[:8]):8} "
                    f"{printable((row['endpointId'] or '-')[:8]):8} {row['attempts']:>2} "
                    f"{printable(str(row['lastOutcome'])[:24]):24} {printable(row['eventId'] or '-')}"
                )
            if raw_file is not None:
                dead = entry.dead
                raw_file.write(json.dumps({
                    "coordinate": entry.coordinate, "reason": row["reason"],
                    "detail": dead.detail if dead else entry.error,
                    "key": base64.b64encode(dead.original_key).decode() if dead and dead.original_key else None,
                    "value": base64.b64encode(dead.original_value).decode() if dead and dead.original_value else None,
                }) + "\n")
    click.echo(f"{count} dead letters", err=True)


@dlq.command("show")
@click.argument("selector")
@config_options(*DLQ_SETTINGS)
def dlq_show(selector: str, **settings: str | None) -> None:
    """The whole record with its attempt log. SELECTOR is an event id (every dead letter
    of that event) or PARTITION:OFFSET."""
    import json

    from .ops import find_dead_letters, parse_selector

    config = build_config(settings)
    with refusals(flags={"selector": "SELECTOR", "id": "SELECTOR"}):
        parse_selector(selector)
    with refusals():
        entries = find_dead_letters(config, selector)
    for entry in entries:
        click.echo(json.dumps(entry.full(), indent=2))


@dlq.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as one JSON object.")
@dlq_filters
def dlq_stats(as_json: bool, **kwargs: Any) -> None:
    """Counts of the selected dead letters by reason, event type, endpoint and hour."""
    import json

    from .ops import read_dead_letters, stats

    filters, settings = _split_dlq_args(kwargs)
    config = build_config(settings)
    with refusals():
        counts = stats(read_dead_letters(config, filters))
    if as_json:
        click.echo(json.dumps(counts.to_json()))
        return
    click.echo(f"total  {counts.total}")
    for name, counter in counts.by().items():
        click.echo(f"\nby {name}")
        for key, n in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])):
            click.echo(f"  {n:>7}  {printable(key)}")


# What a user of the command line can do about each refusal, after the library's words.
REFUSAL_HINTS = {
    "not_a_delivery": "; export it with `gateway dlq list --raw FILE`",
    "endpoint_not_registered": "; replay it to another endpoint with --to-endpoint",
    "unknown_target": "; see `gateway endpoints list`",
}


@dlq.command("replay")
@click.option("--dry-run", is_flag=True, help="Print what would be replayed; send nothing.")
@click.option("--rate", default=None, metavar="N/s", help="At most this many replays per second (e.g. 50/s).")
@click.option("--to-endpoint", default=None, metavar="ID", help="Replay to this endpoint instead.")
@click.option("--again", is_flag=True, help="Also replay dead letters that were replayed before.")
@dlq_filters
def dlq_replay(dry_run: bool, rate: str | None, to_endpoint: str | None, again: bool, **kwargs: Any) -> None:
    """Send the selected deliveries back into the first retry tier, due now.

    Each goes only to the endpoint it failed for (or --to-endpoint), with its attempt
    counter reset so it gets the whole retry schedule again, and headers replay-id and
    replay-of. Dead letters replayed before are skipped unless --again. Records that are
    not deliveries (undecodable or invalid events) are refused: export them with
    `dlq list --raw FILE`.
    """
    from .ops import ReplayProgress, parse_rate, plan_replay, send_replay

    filters, settings = _split_dlq_args(kwargs)
    config = build_config(settings)
    with refusals(flags=FILTER_FLAGS):
        per_second = parse_rate(rate, field="rate") if rate else None
    with refusals():
        plan = plan_replay(config, filters, again=again, to_endpoint=to_endpoint)
    for refusal in plan.refused:
        click.echo(f"refused {printable(refusal.coordinate)}: {printable(refusal.message)}"
                   f"{REFUSAL_HINTS.get(refusal.reason.value, '')}", err=True)
    if dry_run:
        for item in plan.planned:
            delivery = item.delivery
            click.echo(f"would replay {printable(item.entry.coordinate)}  event {printable(delivery.event_id)}  "
                       f"{printable(delivery.event_type)}  to endpoint {printable(delivery.endpoint_id)}")
        click.echo(
            f"dry run: {len(plan.planned)} of {plan.selected} selected would be replayed into "
            f"{plan.topic}; {plan.skipped_already_replayed} already replayed "
            f"(--again to include); {len(plan.refused)} refused; nothing sent", err=True)
        click.get_current_context().exit(1 if plan.refused else 0)
    with refusals():
        if not plan.planned:
            report = send_replay(config, plan)  # sends nothing: the empty report
        else:
            with click.progressbar(length=len(plan.planned), label="replaying", file=sys.stderr,
                                   show_pos=True, show_eta=True,
                                   item_show_func=lambda rate: rate) as bar:
                shown = 0

                def progress(now: ReplayProgress) -> None:
                    nonlocal shown
                    bar.update(now.sent - shown, f"{now.rate:,.0f}/s")
                    shown = now.sent

                report = send_replay(config, plan, rate=per_second, on_progress=progress)
    click.echo(
        f"replayed {report.replayed} of {plan.selected} selected into {plan.topic} "
        f"in {report.seconds:.1f} s ({report.rate:.1f}/s), replay id {plan.replay_id}; "
        f"{plan.skipped_already_replayed} skipped as already replayed (--again to include); "
        f"{len(plan.refused)} refused",
        err=True,
    )
    if report.failed:
        raise CommandError(
            f"{report.failed} of {len(plan.planned)} replays were not acknowledged by the broker "
            f"(first: {printable(report.first_failure or '?')}); they are not recorded as replayed, "
            "so the same command sends them again")
    if report.unrecorded:
        raise CommandError(
            f"{report.unrecorded} replays were sent but not recorded as replayed "
            f"({printable(report.first_unrecorded or '?')}); a later replay sends them again "
            "unless you filter them out")
    if plan.refused:
        click.get_current_context().exit(1)


API_SETTINGS = ("bootstrap_servers", "topic_prefix", "retry_delays", "schema_registry_url", "group_id",
                "request_timeout", "max_response_bytes", "allow_private_networks", "allowed_networks")


API_LIMITS = ("api_dead_letters_size", "api_concurrency", "api_header_timeout", "api_keepalive",
              "api_max_header_bytes", "api_max_body_bytes")


@cli.command()
@click.option("--openapi", "print_openapi", is_flag=True,
              help="Print the OpenAPI document (what openapi.json holds) and exit.")
@click.option("--mint-token", "mint_for", default=None, metavar="BOT_ID",
              help="Print a token scoped to this bot, signed with the key of GATEWAY_API_TOKENS, and exit.")
@click.option("--token-ttl", default="15m", show_default=True, metavar="DURATION",
              help="How long a token of --mint-token is valid (e.g. 15m, 2h; at most 24h).")
@config_options(*API_SETTINGS, "api_host", "api_port", "api_history_size", *API_LIMITS,
                aliases={"api_host": "--host", "api_port": "--port", "api_history_size": "--history-size"})
def api(print_openapi: bool, mint_for: str | None, token_ttl: str, **settings: str | None) -> None:
    """Serve the HTTP management API until SIGTERM or Ctrl-C.

    Endpoints, test sends, stats, event types, the delivery history and dead letters, as
    JSON under /v1; the OpenAPI document at /openapi.json; Prometheus metrics at /metrics.
    Every route but /healthz, /readyz and /metrics needs a bearer token: one of
    GATEWAY_API_TOKENS (comma-separated, 16 characters at least; admin:, read: or
    bot:BOT_ID: before one gives its scope, plain is admin), or a bot token minted by an
    admin (POST /v1/tokens, or --mint-token).
    Without a token the API does not start.
    """
    import json

    from .api import ApiService, Listening, Tokens, create_app, openapi_document, serve
    from .config import parse_delays

    config = build_config(settings)
    if print_openapi:
        click.echo(json.dumps(openapi_document(create_app(ApiService(config, Tokens(())))), indent=2))
        return
    if mint_for is not None:
        try:
            (ttl,) = parse_delays(token_ttl)
        except (ValueError, ConfigError):
            raise click.BadParameter(f"{token_ttl!r} is not a duration such as 15m or 2h",
                                     param_hint="--token-ttl") from None
        with refusals(flags={"bot_id": "--mint-token", "ttl_seconds": "--token-ttl"}):
            minted = Tokens.from_config(config).mint(mint_for, ttl=ttl)
        click.echo(minted.token)
        click.echo(f"scoped to bot {minted.bot_id}, valid for {token_ttl}", err=True)
        return

    def listening(where: Listening) -> None:
        click.echo(f"api listening on {where.url} (OpenAPI at /openapi.json, metrics at /metrics; "
                   f"{where.tokens} token{'s' if where.tokens != 1 else ''}); Ctrl-C stops it", err=True)

    with refusals():
        serve(config, on_listening=listening)
    click.echo("api stopped", err=True)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port to listen on.")
@click.option("--secret", "secrets", multiple=True, metavar="whsec_…",
              help="The endpoint's signing secret (repeatable, during a rotation); generated and printed when "
                   "not given. [env GATEWAY_LISTEN_SECRET]")
@click.option("--status", type=click.IntRange(100, 599), default=200, show_default=True,
              help="Status answered to verified webhooks (e.g. 500 to fail them all).")
@click.option("--fail-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of verified webhooks answered 500 instead, at random (e.g. 0.3).")
@click.option("--delay", "delay_ms", type=click.IntRange(0), default=0, show_default=True, metavar="MS",
              help="Wait this many milliseconds before each answer (past the gateway's timeout, a failure).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per request.")
def listen(host: str, port: int, secrets: tuple[str, ...], status: int, fail_rate: float, delay_ms: int,
           as_json: bool) -> None:
    """A local webhook receiver for development: verifies and prints each webhook.

    Each request's signature is verified with the secret (gateway.verify, as a receiver
    should) and the event printed, marked VERIFIED or REJECTED; rejected requests are
    answered 401. --status, --fail-rate and --delay make it fail or slow down, to watch
    the gateway's retries. Ctrl-C stops it.
    """
    import json
    import threading

    from .ops import Behaviour, Listener, Received, render, validate_secret
    from .signing import new_secret

    with refusals(flags={"listen_secret": "--secret", "secret": "--secret"}):
        chosen = [s.strip() for s in secrets if s.strip()] or list(read_setting("listen_secret") or ())
        for secret in chosen:
            validate_secret(secret)
    generated = not chosen
    chosen = chosen or [new_secret()]

    color = sys.stdout.isatty()
    counts = {"verified": 0, "rejected": 0}
    printing = threading.Lock()  # one connection thread per request: whole blocks, counted right

    def report(received: Received) -> None:
        with printing:
            counts["verified" if received.verified else "rejected"] += 1
            click.echo(json.dumps(received.to_json()) if as_json else render(received, color=color) + "\n")

    try:
        listener = Listener(host=host, port=port, secrets=chosen, behaviour=Behaviour(
            status=status, fail_rate=fail_rate, delay_ms=delay_ms), on_request=report)
    except OSError as exc:
        raise CommandError(f"{host}:{port}: {exc.strerror or exc}; choose another port (--port)") from None
    url = listener.url + "hook"
    click.echo(f"listening on {url} (Ctrl-C stops)", err=True)
    if generated:
        click.echo(f"signing secret (generated): {chosen[0]}", err=True)
    click.echo("register it, with the gateway's settings exported (see `gateway up`), in another terminal:\n"
               f"  gateway endpoints add --bot-id 6434515b-8541-4861-bb24-8acd6e77e8c4 --url {url} "
               f"--secret {chosen[0]}", err=True)
    behaviour = []
    if status != 200:
        behaviour.append(f"answers {status}")
    if fail_rate:
        behaviour.append(f"fails {fail_rate:.0%} with 500")
    if delay_ms:
        behaviour.append(f"waits {delay_ms} ms")
    if behaviour:
        click.echo("behaviour: " + ", ".join(behaviour), err=True)
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM ends it like Ctrl-C: the summary is printed

    signal.signal(signal.SIGTERM, interrupt)
    try:
        listener.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        listener.stop()
    click.echo(f"\nstopped: {counts['verified']} verified, {counts['rejected']} rejected", err=True)


def main() -> None:
    cli()
