"""The ``gateway`` command line. Results go to stdout, progress and errors to stderr;
exit 0 on success, 1 when the work failed or input was refused, 2 on usage errors."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any, TypeVar

import click

from .config import SETTINGS, Config, ConfigError
from .logs import configure_logging

__all__ = ["cli", "main"]

F = TypeVar("F", bound=Callable[..., Any])


def config_options(*names: str) -> Callable[[F], F]:
    """Add the flags of the named settings to a command; they land in ``**settings``."""
    chosen = [s for s in SETTINGS if s.name in names]
    missing = set(names) - {s.name for s in chosen}
    assert not missing, f"unknown settings {missing}"

    def decorate(func: F) -> F:
        for setting in reversed(chosen):
            default = getattr(Config(), setting.name)
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            func = click.option(
                setting.flag,
                setting.name,
                default=None,
                metavar="VALUE",
                help=f"{setting.help} [env {setting.env}; default {shown}]",
            )(func)
        return func

    return decorate


def build_config(settings: dict[str, str | None], **fixed: Any) -> Config:
    """Environment first, then flags given on the command line, then ``fixed``."""
    overrides: dict[str, Any] = {}
    by_name = {s.name: s for s in SETTINGS}
    for name, text in settings.items():
        if text is None:
            continue
        setting = by_name[name]
        try:
            overrides[name] = setting.parse(text)
        except ConfigError as exc:
            raise click.BadParameter(str(exc), param_hint=setting.flag) from None
    try:
        return Config.from_env(**overrides, **fixed)
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
@click.option("--log-level", default=None, metavar="LEVEL",
              help="debug, info, warning or error [env GATEWAY_LOG_LEVEL; default info for "
              "`up` and `run`, warning otherwise].")
@click.pass_context
def cli(ctx: click.Context, log_level: str | None) -> None:
    """Kafka-based streaming webhook gateway.

    Platform services publish chat events as Avro records to Kafka; the gateway POSTs each
    one as signed JSON to every webhook endpoint registered for its bot, retries failures
    through the retry tiers, and dead-letters what still fails.

    Every setting can also be given as a GATEWAY_* environment variable.
    """
    long_running = ctx.invoked_subcommand in ("up", "run")
    configure_logging(log_level, default="INFO" if long_running else "WARNING")


@cli.command()
@click.option("--port", type=click.IntRange(1, 65535), default=9092, show_default=True,
              help="Port to listen and advertise on, on 127.0.0.1.")
def broker(port: int) -> None:
    """Run the bundled Kafka-compatible broker (Tansu) in the foreground.

    It keeps everything in memory: stopping it loses every topic and record. Ctrl-C or
    SIGTERM stops it.
    """
    from .broker import Broker, BrokerError

    try:
        running = Broker(port=port).start()
    except BrokerError as exc:
        raise CommandError(str(exc)) from None
    click.echo(f"broker listening on {running.bootstrap} (in memory; Ctrl-C stops it)", err=True)
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
    from .topics import TopicsError, TopicStatus, create_topics

    config = build_config(settings)

    def report(status: TopicStatus) -> None:
        click.echo(f"{'created' if status.created else 'exists '}  {status.topic}")
        for problem in status.problems:
            click.echo(f"warning: {status.topic} exists with {problem}; topics create leaves it as it is",
                       err=True)

    try:
        create_topics(config, on_status=report, on_warning=lambda text: click.echo(f"warning: {text}", err=True))
    except TopicsError as exc:
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
    "group_protocol", "max_poll_interval_ms", "fetch_wait_ms",
    "allow_private_networks", "allowed_networks",
)


@cli.command()
@click.option("--tiers", default="all", show_default=True, metavar="NAMES",
              help="Comma-separated tiers to run: events, retry-1m, … or all.")
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
    from .runner import RunnerError, observe, resolve_tiers
    from .runner import run as run_workers

    config = build_config(settings)
    try:
        chosen = resolve_tiers(config, [t.strip() for t in tiers.split(",") if t.strip()])
        if workers > 1:
            from .supervisor import supervise

            code = supervise(config, workers, [t.name for t in chosen], metrics=not no_metrics)
            click.get_current_context().exit(code)
        observed = observe(config, port=None if no_metrics else config.metrics_port)
        run_workers(config, chosen, observed=observed)
    except (RunnerError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(describe_os_error(exc)) from None


@cli.command()
@click.option("--port", type=click.IntRange(1, 65535), default=9092, show_default=True,
              help="Port of the bundled broker (ignored with --bootstrap).")
@config_options(*WORKER_SETTINGS, "partitions")
def up(port: int, **settings: str | None) -> None:
    """The embedded default: broker, topics, every worker and /metrics in one command.

    Starts the bundled in-memory broker on 127.0.0.1 (unless --bootstrap or
    GATEWAY_BOOTSTRAP_SERVERS points at an existing Kafka), creates the topics, runs the
    events worker and every retry tier, and serves /metrics. Deliveries to loopback and
    private addresses are allowed unless GATEWAY_ALLOW_PRIVATE_NETWORKS=false. Ctrl-C
    stops everything.
    """
    import os

    from .broker import Broker, BrokerError
    from .runner import RunnerError, observe, resolve_tiers
    from .runner import run as run_workers
    from .topics import TopicsError, create_topics

    external = settings.get("bootstrap_servers") or os.environ.get("GATEWAY_BOOTSTRAP_SERVERS")
    broker = None
    fixed: dict[str, Any] = {}
    if "GATEWAY_ALLOW_PRIVATE_NETWORKS" not in os.environ and settings.get("allow_private_networks") is None:
        fixed["allow_private_networks"] = True
    if not external:
        try:
            broker = Broker(port=port).start()
        except BrokerError as exc:
            raise CommandError(str(exc)) from None
        fixed["bootstrap_servers"] = broker.bootstrap
        if settings.get("partitions") is None and "GATEWAY_PARTITIONS" not in os.environ:
            fixed["partitions"] = 3
    try:
        config = build_config(settings, **fixed)
        created = create_topics(config)
        observed = observe(config, port=config.metrics_port)
        tiers = resolve_tiers(config, None)

        def ready() -> None:
            where = f"bundled broker (in memory) on {config.bootstrap_servers}" if broker else config.bootstrap_servers
            click.echo(
                f"gateway up\n"
                f"  kafka     {where}\n"
                f"  topics    {', '.join(s.topic for s in created)}\n"
                f"  tiers     {', '.join(f'{t.name} ({t.delay}s)' if t.delay else t.name for t in tiers)}\n"
                f"  metrics   http://127.0.0.1:{config.metrics_port}/metrics\n"
                f"try, in another terminal:\n"
                f"  export GATEWAY_BOOTSTRAP_SERVERS={config.bootstrap_servers}\n"
                f"  gateway endpoints add --bot-id 6434515b-8541-4861-bb24-8acd6e77e8c4 --url http://127.0.0.1:8000/hook\n"
                f"  gateway publish examples/events.jsonl\n"
                f"Ctrl-C stops everything.",
                err=True,
            )

        run_workers(config, tiers, observed=observed, on_ready=ready)
    except (RunnerError, TopicsError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(describe_os_error(exc)) from None
    finally:
        if broker is not None:
            broker.stop()


@cli.group()
def endpoints() -> None:
    """Register, list, enable, disable and remove webhook endpoints; rotate their secrets."""


ENDPOINT_SETTINGS = ("bootstrap_servers", "topic_prefix", "schema_registry_url")
ADD_SETTINGS = (*ENDPOINT_SETTINGS, "allow_private_networks", "allowed_networks")


@contextmanager
def refusals() -> Iterator[None]:
    """The library's errors, which name what was wrong, become ``error: …`` and exit 1."""
    from .dlq import DlqError
    from .endpoints import EndpointError, EndpointNotFound

    try:
        yield
    except EndpointNotFound as exc:
        raise CommandError(f"{exc} (see `gateway endpoints list`)") from None
    except (EndpointError, DlqError) as exc:
        raise CommandError(str(exc)) from None


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

    from .endpoints import endpoint_json, register_endpoint

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

    from .endpoints import circuit_json, endpoint_json, list_endpoints, load_circuits

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
                   f"{circuit.state if circuit else 'closed':9}  {limits:14}  {events:28}  "
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

    from .endpoints import KEEP, endpoint_json, update_endpoint

    if all(v is None for v in (url, events, description, rate_limit, max_in_flight)):
        raise click.UsageError("nothing to change: give --url, --events, --description, --rate-limit or "
                               "--max-in-flight")
    config = build_config(settings)
    types = None if events is None else ([] if events.strip().lower() == "all" else events.split(","))
    with refusals():
        registration = update_endpoint(config, endpoint_id, url=url, event_types=types, description=description,
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
    from .endpoints import remove_endpoint

    config = build_config(settings)
    with refusals():
        remove_endpoint(config, endpoint_id)
    click.echo(f"removed {printable(endpoint_id)}", err=True)


@endpoints.command("disable")
@click.argument("endpoint_id")
@config_options(*ENDPOINT_SETTINGS)
def endpoints_disable(endpoint_id: str, **settings: str | None) -> None:
    """Stop delivering to an endpoint without removing it."""
    from .endpoints import set_endpoint_enabled

    config = build_config(settings)
    with refusals():
        set_endpoint_enabled(config, endpoint_id, False)
    click.echo(f"disabled {printable(endpoint_id)}", err=True)


@endpoints.command("enable")
@click.argument("endpoint_id")
@config_options(*ENDPOINT_SETTINGS)
def endpoints_enable(endpoint_id: str, **settings: str | None) -> None:
    """Deliver to a disabled endpoint again."""
    from .endpoints import set_endpoint_enabled

    config = build_config(settings)
    with refusals():
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
    from .endpoints import rotate_secret

    config = build_config(settings)
    try:
        (grace_seconds,) = parse_delays(grace)
    except (ValueError, ConfigError):
        raise click.BadParameter(f"{grace!r} is not a duration such as 30m, 24h or 7d",
                                 param_hint="--grace") from None
    with refusals():
        endpoint = rotate_secret(config, endpoint_id, secret=secret, grace_seconds=grace_seconds)
    click.echo(f"secret  {endpoint.secret}   (shown once; the old secret keeps signing for {grace})")


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
    from .dlq import DlqError, Filters, parse_time

    settings = {k: kwargs.pop(k) for k in DLQ_SETTINGS}
    try:
        filters = Filters(
            event_type=kwargs.pop("event_type"), bot_id=kwargs.pop("bot_id"),
            endpoint_id=kwargs.pop("endpoint_id"), reason=kwargs.pop("reason"),
            status=kwargs.pop("status"),
            since=parse_time(s, field="since") if (s := kwargs.pop("since")) else None,
            until=parse_time(u, field="until") if (u := kwargs.pop("until")) else None,
            partition=kwargs.pop("partition"), from_offset=kwargs.pop("from_offset"),
            to_offset=kwargs.pop("to_offset"), limit=kwargs.pop("limit"),
        )
    except DlqError as exc:
        hint = f"--{exc.field.replace('_', '-')}" if exc.field else None
        raise click.BadParameter(str(exc), param_hint=hint) from None
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

    from .dlq import read_dead_letters

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

    from .dlq import DlqError, find_dead_letters, parse_selector

    config = build_config(settings)
    try:
        parse_selector(selector)
    except DlqError as exc:
        raise click.BadParameter(str(exc), param_hint="SELECTOR") from None
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

    from .dlq import read_dead_letters, stats

    filters, settings = _split_dlq_args(kwargs)
    config = build_config(settings)
    with refusals():
        counts = stats(read_dead_letters(config, filters))
    if as_json:
        click.echo(json.dumps({k: dict(v) for k, v in counts.items()}))
        return
    click.echo(f"total  {sum(counts['reason'].values())}")
    for name, counter in counts.items():
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
    from .dlq import DlqError, ReplayProgress, parse_rate, plan_replay, send_replay

    filters, settings = _split_dlq_args(kwargs)
    config = build_config(settings)
    try:
        per_second = parse_rate(rate) if rate else None
    except DlqError as exc:
        raise click.BadParameter(str(exc), param_hint="--rate") from None
    with refusals():
        plan = plan_replay(config, filters, again=again, to_endpoint=to_endpoint)
    for refusal in plan.refused:
        click.echo(f"refused {printable(refusal.coordinate)}: {printable(refusal.message)}"
                   f"{REFUSAL_HINTS.get(refusal.reason, '')}", err=True)
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


def main() -> None:
    cli()
