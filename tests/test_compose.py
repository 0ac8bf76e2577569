"""docker-compose.yml, read as a file (no Docker engine needed): it parses, everything it
mounts or builds from exists, and every service agrees with the others and with the
gateway's own configuration: ports, topics, scrape targets, datasource, dashboards."""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.config import SETTINGS, Config
from gateway.store import Topics

from .apache_kafka import broker_properties, kafka_version

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]  # type: ignore[no-any-return]


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path → host path of the service's bind mounts."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        assert source.startswith("./"), f"{volume}: only bind mounts of repository files"
        found[target] = ROOT / source
    return found


def published(service: dict[str, Any]) -> dict[int, int]:
    """Container port → host port."""
    ports: dict[int, int] = {}
    for entry in service.get("ports", []):
        parts = str(entry).split(":")  # [ip:]host:container, or just container
        container, host = parts[-1], parts[-2] if len(parts) > 1 else parts[-1]
        host_range, container_range = _ports(host), _ports(container)
        assert len(host_range) == len(container_range), entry
        ports.update(zip(container_range, host_range, strict=True))
    return ports


def _ports(text: str) -> list[int]:
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def gateway_config(service: dict[str, Any]) -> Config:
    return Config.from_env({k: str(v) for k, v in service["environment"].items()})


# The services that run the gateway's image, with its configuration.
GATEWAY_SERVICES = ("topics", "gateway", "api")


def option(command: list[str], flag: str, default: str) -> str:
    return command[command.index(flag) + 1] if flag in command else default


def test_the_stack_has_kafka_topics_gateway_api_prometheus_and_grafana(services: dict[str, Any]) -> None:
    assert set(services) == {"kafka", "topics", "gateway", "api", "prometheus", "grafana"}
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image version"


def test_every_mounted_file_and_the_build_context_exist(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for target, source in mounts(service).items():
            assert source.exists(), f"{name} mounts {source} at {target}: it does not exist"
    for name in GATEWAY_SERVICES:
        assert services[name]["build"] == "."
    dockerfile = (ROOT / "Dockerfile").read_text()
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, re.MULTILINE)
    assert copied
    for sources in copied:
        for source in sources.split():
            assert (ROOT / source).exists(), f"the Dockerfile copies {source}: it does not exist"
            assert source.rstrip("/") not in ignored, f"{source} is copied but .dockerignore drops it"
    assert 'CMD ["gateway", "run"]' in dockerfile


def test_kafka_is_a_single_kraft_node_the_gateway_reaches(services: dict[str, Any]) -> None:
    kafka = services["kafka"]["environment"]
    assert set(kafka["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    listeners = dict(entry.split("://") for entry in kafka["KAFKA_LISTENERS"].split(","))
    advertised = dict(entry.split("://") for entry in kafka["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert kafka["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    assert kafka["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{kafka['KAFKA_NODE_ID']}@kafka{listeners['CONTROLLER']}"
    protocols = dict(e.split(":") for e in kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(protocols) == set(listeners)
    assert kafka["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"  # `topics` creates them
    for name in GATEWAY_SERVICES:
        bootstrap = gateway_config(services[name]).bootstrap_servers
        assert bootstrap in advertised.values(), f"{name} bootstraps from {bootstrap}: not advertised"
        listener = next(k for k, v in advertised.items() if v == bootstrap)
        assert listeners[listener].endswith(":" + bootstrap.rsplit(":", 1)[1])
    host = advertised["HOST"]
    assert host.startswith("localhost:")
    port = int(host.rsplit(":", 1)[1])
    assert published(services["kafka"]) == {port: port}
    assert listeners["HOST"] == f":{port}"


# The settings each place has its own of: where the broker listens and who it is.
_NODE_OWN = {"listeners", "advertised.listeners", "listener.security.protocol.map", "controller.quorum.voters"}


def test_kafka_runs_the_tested_version_with_the_tested_settings(services: dict[str, Any]) -> None:
    """The compose Kafka is the one the tests run: the same version (kafka/pom.xml) and
    the same broker settings (kafka/broker.properties), listeners aside."""
    image = services["kafka"]["image"]
    assert image == f"apache/kafka:{kafka_version()}", f"{image}: the tests run Apache Kafka {kafka_version()}"
    environment = services["kafka"]["environment"]
    compose = {name.removeprefix("KAFKA_").lower().replace("_", "."): str(value)
               for name, value in environment.items() if name.startswith("KAFKA_")}
    shared = broker_properties()
    assert {k: v for k, v in compose.items() if k not in _NODE_OWN} == shared
    assert not _NODE_OWN & set(shared)


def test_topics_gateway_and_api_share_one_configuration(services: dict[str, Any]) -> None:
    known = {s.env for s in SETTINGS}
    sources = "\n".join(p.read_text() for p in (ROOT / "gateway").glob("*.py"))
    known |= set(re.findall(r"\bGATEWAY_[A-Z_]+\b", sources))
    for name in GATEWAY_SERVICES:
        unknown = set(services[name]["environment"]) - known
        assert not unknown, f"{name} sets variables the gateway never reads: {unknown}"
    topics, gateway, api = (gateway_config(services[name]) for name in GATEWAY_SERVICES)
    assert Topics.from_config(topics) == Topics.from_config(gateway) == Topics.from_config(api)
    assert topics.partitions == gateway.partitions
    # The API judges test sends' destinations as the workers judge deliveries'.
    assert (api.allow_private_networks, api.allowed_networks) == (gateway.allow_private_networks,
                                                                 gateway.allowed_networks)
    assert services["topics"]["command"] == ["gateway", "topics", "create"]
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert services["gateway"]["depends_on"]["topics"]["condition"] == "service_completed_successfully"


def test_prometheus_scrapes_every_worker_port_the_gateway_serves(services: dict[str, Any]) -> None:
    gateway = services["gateway"]
    command = gateway["command"]
    assert command[:2] == ["gateway", "run"]
    workers = int(option(command, "--workers", "1"))
    port = int(option(command, "--metrics-port", str(gateway_config(gateway).metrics_port)))
    worker_ports = [port + i for i in range(workers)]
    assert workers >= 2  # the demo shows that several processes add up

    prometheus = services["prometheus"]
    files = mounts(prometheus)
    config_path = PurePosixPath(option(prometheus.get("command", []), "--config.file",
                                       "/etc/prometheus/prometheus.yml"))
    config = yaml.safe_load(files[str(config_path)].read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [t for c in jobs["webhook-gateway"]["static_configs"] for t in c["targets"]]
    assert sorted(targets) == [f"gateway:{p}" for p in worker_ports]
    assert jobs["webhook-gateway"].get("metrics_path", "/metrics") == "/metrics"
    for rule_file in config["rule_files"]:
        assert str(config_path.parent / rule_file) in files, f"rule file {rule_file} is not mounted"

    assert set(worker_ports) <= set(published(gateway))
    probe = " ".join(gateway["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/readyz" in probe


def test_prometheus_scrapes_the_api_on_the_port_it_serves(services: dict[str, Any]) -> None:
    """The API serves its own /metrics (no token) on the port of its command; Prometheus
    scrapes it there, in a job of its own (the dashboard's API panels read that job)."""
    api = services["api"]
    port = int(option(api["command"], "--port", str(gateway_config(api).api_port)))
    prometheus = services["prometheus"]
    config = yaml.safe_load(mounts(prometheus)["/etc/prometheus/prometheus.yml"].read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [t for c in jobs["webhook-gateway-api"]["static_configs"] for t in c["targets"]]
    assert targets == [f"api:{port}"]
    assert jobs["webhook-gateway-api"].get("metrics_path", "/metrics") == "/metrics"
    assert "authorization" not in jobs["webhook-gateway-api"] and "bearer_token" not in jobs["webhook-gateway-api"]


def test_the_api_is_opt_in_serves_its_published_port_and_takes_its_token_from_the_host(
        services: dict[str, Any]) -> None:
    """`docker compose up` starts no API (it would refuse to start without a token); with
    `--profile api` it serves on the port it publishes, on the host's loopback only, and
    the healthcheck probes the route that needs no token."""
    api = services["api"]
    assert api["profiles"] == ["api"]
    command = api["command"]
    assert command[:2] == ["gateway", "api"]
    assert option(command, "--host", "127.0.0.1") == "0.0.0.0"  # reachable from the host's side of the bridge
    port = int(option(command, "--port", "8080"))
    assert published(api) == {port: 8080}
    (mapping,) = api["ports"]
    assert mapping.startswith("127.0.0.1:"), "plain HTTP: publish it on the host's loopback only"
    # From the host's environment, and never `${…:?}`: compose interpolates every service,
    # profile or not, so a required variable would stop `docker compose up` too.
    assert api["environment"]["GATEWAY_API_TOKENS"] == "${GATEWAY_API_TOKENS:-}"
    probe = " ".join(api["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/healthz" in probe
    assert api["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## The management API"):]
    assert "docker compose --profile api up" in section


def test_grafana_reads_the_provisioned_prometheus_and_dashboard(services: dict[str, Any]) -> None:
    grafana, prometheus = services["grafana"], services["prometheus"]
    files = mounts(grafana)
    datasources_dir = files["/etc/grafana/provisioning/datasources"]
    (datasource,) = yaml.safe_load((datasources_dir / "prometheus.yml").read_text())["datasources"]
    url = urlsplit(datasource["url"])
    assert url.hostname == "prometheus" and url.port in published(prometheus)
    prometheus_config = yaml.safe_load(mounts(prometheus)["/etc/prometheus/prometheus.yml"].read_text())
    assert datasource["jsonData"]["timeInterval"] == prometheus_config["global"]["scrape_interval"]

    providers = yaml.safe_load(
        (files["/etc/grafana/provisioning/dashboards"] / "webhook-gateway.yml").read_text())["providers"]
    (provider,) = providers
    dashboards_dir = files[provider["options"]["path"]]
    dashboards = sorted(dashboards_dir.glob("*.json"))
    assert [d.name for d in dashboards] == ["webhook-gateway.json"]
    for dashboard in dashboards:
        uids = {p["datasource"]["uid"] for p in json.loads(dashboard.read_text())["panels"]
                if "datasource" in p}
        assert uids == {datasource["uid"]}, dashboard
    home = PurePosixPath(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert (files[str(home.parent)] / home.name).exists()
    assert 3000 in published(grafana)


def test_the_readme_says_how_to_start_it_and_what_to_open(services: dict[str, Any]) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Observability"):]
    assert "docker compose up" in section
    for service, port in (("grafana", 3000), ("prometheus", 9090)):
        assert port in published(services[service])
        assert f"http://localhost:{port}" in section, service
