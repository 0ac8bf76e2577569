"""The ``gateway`` command line. Results go to stdout, progress and errors to stderr;
exit 0 on success, 1 when the work failed or input was refused, 2 on usage errors."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from .config import SETTINGS, Config, ConfigError
from .logs import configure_logging

__all__ = ["main", "cli"]

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


def fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


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
        fail(str(exc))
        return
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
        fail(f"the broker exited by itself with code {code}")
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

    try:
        create_topics(config, on_status=report)
    except TopicsError as exc:
        fail(f"could not create topics: {exc}")


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
        fail(f"{source.name}: not UTF-8 text ({exc.reason} at byte {exc.start})")
        return
    except ValueError as exc:
        fail(f"{source.name}: {exc}")
        return
    if not items:
        fail(f"{source.name}: no events in the input")
    invalid = [item for item in items if item.error]
    for item in invalid:
        click.echo(f"error: {source.name} {item.where}: {item.error}", err=True)
    if invalid and not skip_invalid:
        fail(
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
        sys.exit(1)


WORKER_SETTINGS = (
    "bootstrap_servers", "topic_prefix", "retry_delays", "schema_registry_url", "group_id",
    "metrics_port", "concurrency", "endpoint_concurrency", "request_timeout",
    "max_response_bytes", "shutdown_timeout", "session_timeout_ms",
    "allow_private_networks", "allowed_networks",
)


@cli.command()
@click.option("--tiers", default="all", show_default=True, metavar="NAMES",
              help="Comma-separated tiers to run: events, retry-1m, … or all.")
@click.option("--no-metrics", is_flag=True, help="Do not serve /metrics.")
@config_options(*WORKER_SETTINGS)
def run(tiers: str, no_metrics: bool, **settings: str | None) -> None:
    """Run delivery workers against an existing Kafka, until SIGTERM or Ctrl-C.

    Workers of the same group id share the partitions of each tier; run as many as the
    partitions allow. On SIGTERM a worker stops taking records, lets in-flight deliveries
    finish (up to --shutdown-timeout), commits and exits 0.
    """
    from .metrics import serve_metrics
    from .runner import RunnerError, resolve_tiers
    from .runner import run as run_workers

    config = build_config(settings)
    try:
        chosen = resolve_tiers(config, [t.strip() for t in tiers.split(",") if t.strip()])
        if not no_metrics:
            serve_metrics(config.metrics_port)
        run_workers(config, chosen)
    except (RunnerError, ValueError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"metrics port {config.metrics_port}: {exc.strerror or exc}")


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
    from .metrics import serve_metrics
    from .runner import RunnerError, resolve_tiers
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
            fail(str(exc))
            return
        fixed["bootstrap_servers"] = broker.bootstrap
        if settings.get("partitions") is None and "GATEWAY_PARTITIONS" not in os.environ:
            fixed["partitions"] = 3
    try:
        config = build_config(settings, **fixed)
        created = create_topics(config)
        serve_metrics(config.metrics_port)
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

        run_workers(config, tiers, on_ready=ready)
    except (RunnerError, TopicsError, ValueError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"metrics port: {exc.strerror or exc}")
    finally:
        if broker is not None:
            broker.stop()


@cli.group()
def endpoints() -> None:
    """Register, list, enable, disable and remove webhook endpoints."""


ENDPOINT_SETTINGS = ("bootstrap_servers", "topic_prefix", "schema_registry_url")
ADD_SETTINGS = (*ENDPOINT_SETTINGS, "allow_private_networks")


def _endpoint_json(endpoint: Any, *, show_secret: bool) -> dict[str, Any]:
    from .endpoints import mask_secret

    return {
        "id": endpoint.id,
        "botId": endpoint.bot_id,
        "url": endpoint.url,
        "events": list(endpoint.event_types),
        "enabled": endpoint.enabled,
        "description": endpoint.description,
        "secret": endpoint.secret if show_secret else mask_secret(endpoint.secret),
        "createdAt": endpoint.created_at,
        "updatedAt": endpoint.updated_at,
    }


@endpoints.command("add")
@click.option("--bot-id", required=True, help="UUID of the bot whose events the endpoint receives.")
@click.option("--url", required=True, help="http(s) URL the events are POSTed to.")
@click.option("--events", default="", metavar="TYPES",
              help="Comma-separated event types to receive (default: all).")
@click.option("--secret", default=None, help="Signing secret whsec_<base64> (default: generated).")
@click.option("--description", default=None, help="Free text, shown by `endpoints list`.")
@click.option("--json", "as_json", is_flag=True, help="Print the endpoint as one JSON object.")
@config_options(*ADD_SETTINGS)
def endpoints_add(bot_id: str, url: str, events: str, secret: str | None, description: str | None,
                  as_json: bool, **settings: str | None) -> None:
    """Register an endpoint. Its signing secret is printed once: keep it."""
    import json

    from .endpoints import EndpointError, is_private_destination, new_endpoint, save_endpoint

    config = build_config(settings)
    try:
        endpoint = new_endpoint(bot_id=bot_id, url=url, event_types=events.split(","),
                                secret=secret, description=description)
        if is_private_destination(url) and not config.allow_private_networks:
            click.echo(f"warning: {url} is not a public address; deliveries to it are refused "
                       "unless GATEWAY_ALLOW_PRIVATE_NETWORKS=true or GATEWAY_ALLOWED_NETWORKS "
                       "covers it", err=True)
        save_endpoint(config, endpoint)
    except EndpointError as exc:
        fail(str(exc))
        return
    if as_json:
        click.echo(json.dumps(_endpoint_json(endpoint, show_secret=True)))
    else:
        click.echo(f"id      {endpoint.id}\nbot     {endpoint.bot_id}\nurl     {endpoint.url}\n"
                   f"events  {','.join(endpoint.event_types) or 'all'}\n"
                   f"secret  {endpoint.secret}   (shown once)")


@endpoints.command("list")
@click.option("--bot-id", default=None, help="Only this bot's endpoints.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per endpoint.")
@click.option("--show-secrets", is_flag=True, help="Print signing secrets instead of masking them.")
@config_options(*ENDPOINT_SETTINGS)
def endpoints_list(bot_id: str | None, as_json: bool, show_secrets: bool, **settings: str | None) -> None:
    """List registered endpoints (read from the endpoints topic)."""
    import json

    from .endpoints import EndpointError, load_endpoints

    config = build_config(settings)
    try:
        table = load_endpoints(config)
    except EndpointError as exc:
        fail(str(exc))
        return
    rows = [e for e in table.all() if bot_id is None or e.bot_id == bot_id]
    if as_json:
        for endpoint in rows:
            click.echo(json.dumps(_endpoint_json(endpoint, show_secret=show_secrets)))
        return
    if not rows:
        click.echo("no endpoints", err=True)
        return
    click.echo(f"{'ID':36}  {'BOT':36}  {'STATE':8}  {'EVENTS':28}  URL")
    for e in rows:
        state = "enabled" if e.enabled else "disabled"
        click.echo(f"{e.id:36}  {e.bot_id:36}  {state:8}  {','.join(e.event_types) or 'all':28}  {e.url}"
                   + (f"  secret={e.secret}" if show_secrets else ""))


def _change_endpoint(endpoint_id: str, settings: dict[str, str | None], action: str) -> None:
    from .endpoints import EndpointError, load_endpoints, remove_endpoint, save_endpoint, set_enabled

    config = build_config(settings)
    try:
        endpoint = load_endpoints(config).get(endpoint_id)
        if endpoint is None:
            fail(f"no endpoint with id {endpoint_id!r} (see `gateway endpoints list`)")
            return
        if action == "remove":
            remove_endpoint(config, endpoint_id)
        else:
            save_endpoint(config, set_enabled(endpoint, action == "enable"))
    except EndpointError as exc:
        fail(str(exc))
        return
    click.echo(f"{action}d {endpoint_id}", err=True)


@endpoints.command("remove")
@click.argument("endpoint_id")
@config_options(*ENDPOINT_SETTINGS)
def endpoints_remove(endpoint_id: str, **settings: str | None) -> None:
    """Remove an endpoint. Its pending retries are dead-lettered as endpoint_removed."""
    _change_endpoint(endpoint_id, settings, "remove")


@endpoints.command("disable")
@click.argument("endpoint_id")
@config_options(*ENDPOINT_SETTINGS)
def endpoints_disable(endpoint_id: str, **settings: str | None) -> None:
    """Stop delivering to an endpoint without removing it."""
    _change_endpoint(endpoint_id, settings, "disable")


@endpoints.command("enable")
@click.argument("endpoint_id")
@config_options(*ENDPOINT_SETTINGS)
def endpoints_enable(endpoint_id: str, **settings: str | None) -> None:
    """Deliver to a disabled endpoint again."""
    _change_endpoint(endpoint_id, settings, "enable")


def main() -> None:
    cli()
