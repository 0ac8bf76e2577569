"""The ``gateway`` command line. Results go to stdout, progress and errors to stderr;
exit 0 on success, 1 when the work failed or input was refused, 2 on usage errors."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Any, TypeVar

import click

from .config import SETTINGS, Config, ConfigError
from .logs import configure_logging

if TYPE_CHECKING:
    from .api import ApiThread

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
              "`up`, `run` and `api`, warning otherwise].")
@click.pass_context
def cli(ctx: click.Context, log_level: str | None) -> None:
    """Kafka-based streaming webhook gateway.

    Platform services publish chat events as Avro records to Kafka; the gateway POSTs each
    one as signed JSON to every webhook endpoint registered for its bot, retries failures
    through the retry tiers, and dead-letters what still fails.

    Every setting can also be given as a GATEWAY_* environment variable.
    """
    long_running = ctx.invoked_subcommand in ("up", "run", "api")
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
@click.option("--api-host", default="127.0.0.1", show_default=True, envvar="GATEWAY_API_HOST",
              help="Address of the management API [env GATEWAY_API_HOST]; off loopback it needs "
                   "GATEWAY_API_TOKENS.")
@click.option("--api-port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              envvar="GATEWAY_API_PORT", help="Port of the management API [env GATEWAY_API_PORT].")
@click.option("--no-api", is_flag=True, help="Do not serve the management API.")
@config_options(*WORKER_SETTINGS, "partitions")
def up(port: int, api_host: str, api_port: int, no_api: bool, **settings: str | None) -> None:
    """The embedded default: broker, topics, every worker, /metrics and the API in one command.

    Starts the bundled in-memory broker on 127.0.0.1 (unless --bootstrap or
    GATEWAY_BOOTSTRAP_SERVERS points at an existing Kafka), creates the topics, runs the
    events worker and every retry tier, serves /metrics and the management API (on a
    thread of this process; with a token generated for this run and printed, unless
    GATEWAY_API_TOKENS is set). Deliveries to loopback and private addresses are allowed
    unless GATEWAY_ALLOW_PRIVATE_NETWORKS=false. Ctrl-C stops everything.
    """
    import os

    from .broker import Broker, BrokerError
    from .runner import RunnerError, observe, resolve_tiers
    from .runner import run as run_workers
    from .signing import new_secret
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
    api = None
    try:
        config = build_config(settings, **fixed)
        created = create_topics(config)
        observed = observe(config, port=config.metrics_port)
        tiers = resolve_tiers(config, None)
        api, api_line = (None, "off (--no-api)") if no_api else _start_api(config, api_host, api_port)
        # The second terminal judges URLs as these workers do: with the same settings.
        exports = f"GATEWAY_BOOTSTRAP_SERVERS={config.bootstrap_servers}"
        if config.allow_private_networks:
            exports += " GATEWAY_ALLOW_PRIVATE_NETWORKS=true"
        demo_secret = new_secret()

        def ready() -> None:
            where = f"bundled broker (in memory) on {config.bootstrap_servers}" if broker else config.bootstrap_servers
            click.echo(
                f"gateway up\n"
                f"  kafka     {where}\n"
                f"  topics    {', '.join(s.topic for s in created)}\n"
                f"  tiers     {', '.join(f'{t.name} ({t.delay}s)' if t.delay else t.name for t in tiers)}\n"
                f"  metrics   http://127.0.0.1:{config.metrics_port}/metrics\n"
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

        run_workers(config, tiers, observed=observed, on_ready=ready)
    except (RunnerError, TopicsError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(describe_os_error(exc)) from None
    finally:
        if api is not None:
            api.stop()
        if broker is not None:
            broker.stop()


def _start_api(config: Config, host: str, port: int) -> tuple[ApiThread | None, str]:
    """The management API on a thread of `gateway up`, and its banner line. Without
    GATEWAY_API_TOKENS it serves only on loopback, with a token generated for this run.
    A port already taken is a warning, not a failure: the workers are what `up` is for."""
    import os

    from .api import ApiService, ApiThread, Tokens, TokensError, bind, is_loopback

    try:
        tokens = Tokens.from_env()
    except TokensError as exc:
        raise CommandError(str(exc)) from None
    generated = None
    if not tokens:
        if not is_loopback(host):
            raise CommandError(f"the API on {host} needs GATEWAY_API_TOKENS: a token is generated only for a "
                               "loopback address (or pass --no-api)")
        generated = Tokens.generate()
        tokens = Tokens([generated])
    try:
        sock = bind(host, port)
    except OSError as exc:
        click.echo(f"warning: API not served: {host}:{port}: {exc.strerror or exc} (choose another with "
                   "--api-port)", err=True)
        return None, "not served (port taken)"
    size = os.environ.get("GATEWAY_API_HISTORY_SIZE", "100000")
    if not size.isdigit() or int(size) < 1:
        sock.close()
        raise CommandError(f"GATEWAY_API_HISTORY_SIZE {size!r} is not a whole number of 1 or more")
    service = ApiService(config, tokens, history_capacity=int(size))
    try:
        with refusals():
            service.start()
    except BaseException:
        sock.close()
        service.stop()
        raise
    bound_host, bound_port = sock.getsockname()[:2]
    line = f"http://{bound_host}:{bound_port}/v1  (OpenAPI at /openapi.json)"
    if generated:
        line += f"\n            token {generated}  (generated for this run; GATEWAY_API_TOKENS sets your own)"
    return ApiThread(service, sock).start(), line


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

    from .endpoints import get_endpoint, validate_event_types
    from .testsend import send_tests

    if event_types and all_types:
        raise click.UsageError("--event and --all-types exclude each other")
    config = build_config(settings)
    with refusals():
        types = validate_event_types(event_types) if event_types else None
        endpoint = get_endpoint(config, endpoint_id)
    report = asyncio.run(send_tests(config, endpoint, event_types=types, malformed=malformed))
    if as_json:
        click.echo(json.dumps(report.to_json()))
    else:
        click.echo(f"endpoint {printable(endpoint.id)}  {printable(endpoint.url)}"
                   + ("" if endpoint.enabled else "  (disabled: test sends go to it all the same)"))
        click.echo(f"{'REQUEST':16} {'EVENT':12} {'RESULT':10} {'STATUS':>6} {'MS':>8}  RESPONSE")
        for probe in report.probes:
            a = probe.attempt
            shown = a.response_snippet if a.status is not None else a.error
            click.echo(f"{probe.kind.value:16} {probe.event_type:12} {probe.verdict:10} "
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

    from .history import HistoryError, HistoryFilters, parse_moment, read_history

    config = build_config(settings)
    try:
        filters = HistoryFilters(
            event_id=event_id, endpoint_id=endpoint_id, bot_id=bot_id, status=status,
            since=parse_moment(since, field="since") if since else None,
            until=parse_moment(until, field="until") if until else None)
    except HistoryError as exc:
        raise click.BadParameter(str(exc), param_hint=f"--{exc.field}" if exc.field else None) from None
    try:
        entries = read_history(config, filters)
    except HistoryError as exc:
        raise CommandError(str(exc)) from None
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
        if a.status is not None and a.outcome.value not in ("success", "http_error"):
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


API_SETTINGS = ("bootstrap_servers", "topic_prefix", "retry_delays", "schema_registry_url", "group_id",
                "request_timeout", "max_response_bytes", "allow_private_networks", "allowed_networks")


def api_options(func: F) -> F:
    """The API's own settings (its address and its index), kept apart from the workers'."""
    options = [
        click.option("--host", "api_host", default="127.0.0.1", show_default=True, envvar="GATEWAY_API_HOST",
                     help="Address to serve the API on [env GATEWAY_API_HOST]."),
        click.option("--port", "api_port", type=click.IntRange(0, 65535), default=8080, show_default=True,
                     envvar="GATEWAY_API_PORT", help="Port to serve the API on [env GATEWAY_API_PORT]."),
        click.option("--history-size", type=click.IntRange(1), default=100_000, show_default=True,
                     envvar="GATEWAY_API_HISTORY_SIZE",
                     help="Newest attempts the API keeps in memory for /v1/deliveries [env GATEWAY_API_HISTORY_SIZE]."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@cli.command()
@api_options
@click.option("--openapi", "print_openapi", is_flag=True,
              help="Print the OpenAPI document (what openapi.json holds) and exit.")
@config_options(*API_SETTINGS)
def api(api_host: str, api_port: int, history_size: int, print_openapi: bool, **settings: str | None) -> None:
    """Serve the HTTP management API until SIGTERM or Ctrl-C.

    Endpoints, test sends, the delivery history and dead letters, as JSON under /v1; the
    OpenAPI document at /openapi.json. Every route but /healthz needs a bearer token
    from GATEWAY_API_TOKENS (comma-separated, 16 characters at least): without one the
    API does not start.
    """
    import json

    from .api import ApiService, Tokens, TokensError, bind, create_app, openapi_document, server
    from .endpoints import EndpointsUnavailable

    if print_openapi:
        app = create_app(ApiService(build_config(settings), Tokens(())))
        click.echo(json.dumps(openapi_document(app), indent=2))
        return
    try:
        tokens = Tokens.from_env()
    except TokensError as exc:
        raise CommandError(str(exc)) from None
    if not tokens:
        raise CommandError(
            "GATEWAY_API_TOKENS is not set (or empty): the API serves nobody without a token. Set it to one or more "
            "comma-separated tokens of 16 characters or more, e.g. "
            "GATEWAY_API_TOKENS=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')")
    config = build_config(settings)
    try:
        sock = bind(api_host, api_port)
    except OSError as exc:
        raise CommandError(f"API address {api_host}:{api_port}: {exc.strerror or exc}; stop what listens there "
                           "or choose another (--port)") from None
    service = ApiService(config, tokens, history_capacity=history_size)
    try:
        with refusals():
            service.start()
        host, port = sock.getsockname()[:2]
        click.echo(f"api listening on http://{host}:{port} (OpenAPI at /openapi.json; "
                   f"{len(tokens)} token{'s' if len(tokens) != 1 else ''}); Ctrl-C stops it", err=True)
        # uvicorn stops on SIGTERM/SIGINT and then raises the signal again for the handler
        # it found: this one lets the command stop in order (the tables let go) and exit 0.
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        signal.signal(signal.SIGINT, lambda signum, frame: None)
        server(create_app(service), sock).run(sockets=[sock])
        click.echo("api stopped", err=True)
    except EndpointsUnavailable as exc:
        raise CommandError(str(exc)) from None
    finally:
        sock.close()
        service.stop()


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
    import os
    import sys

    from .endpoints import EndpointError, validate_secret
    from .listen import Behaviour, Listener, Received, render
    from .signing import new_secret

    chosen = list(secrets) or [s for s in os.environ.get("GATEWAY_LISTEN_SECRET", "").split(",") if s.strip()]
    generated = not chosen
    for secret in chosen:
        try:
            validate_secret(secret.strip())
        except EndpointError as exc:
            raise click.BadParameter(str(exc), param_hint="--secret") from None
    chosen = [s.strip() for s in chosen] or [new_secret()]
    import threading

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
