"""docker-compose.yml, generated from the service registry.

``python -m infra.compose`` rewrites docker-compose.yml; ``python -m infra.compose --check``
exits 1 when the committed file has drifted from the registry (a test runs the same
comparison). Adding a service to ``pms.registry.SERVICES`` and regenerating is all it takes
to get it into compose, so the two can never disagree.

Every service container runs the same image with ``pms serve <name>``, binds 0.0.0.0 inside
its container, and finds the others by compose service name through ``PMS_<SECTION>__URL`` /
``PMS_BILLING__TARGET``. Secrets come from ``.env`` (see ``.env.example``), never from here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from infra.stack import address_environment, service_port
from pms.embedded import ANALYST_ROLE, APP_ROLE, PRIVATE_LOG_SETTINGS, postgres_options
from pms.registry import SERVICES, ServiceSpec

COMPOSE_FILE = Path(__file__).resolve().parent.parent / "docker-compose.yml"
IMAGE = "${PMS_IMAGE:-pms:latest}"
NETWORK = "pms"
POSTGRES_IMAGE = "postgres:18"
KAFKA_IMAGE = "apache/kafka:4.1.1"
LOCALSTACK_IMAGE = "localstack/localstack:4.9"
KAFKA_INTERNAL = "kafka:9092"

HEADER = """\
# GENERATED from pms/registry.py by `python -m infra.compose` -- do not edit by hand;
# tests/infra/test_compose.py fails when this file and the registry disagree.
#
#   cp .env.example .env   # then replace every change-me value
#   docker compose up --build
#
# Dashboard: http://localhost:8501   Gateway (REST): http://localhost:4004   LocalStack: http://localhost:4566
"""


def service_environment(services: tuple[ServiceSpec, ...] = SERVICES) -> dict[str, str]:
    """``PMS_*`` variables shared by every service container: servers, secrets, addresses."""
    env: dict[str, str] = {
        "PMS_DATABASE_URL": (
            f"postgresql+psycopg://{APP_ROLE}:${{PMS_DB_APP_PASSWORD:?set it in .env}}@postgres:5432/postgres"
        ),
        "PMS_ANALYST_DATABASE_URL": (
            f"postgresql+psycopg://{ANALYST_ROLE}:${{PMS_DB_ANALYST_PASSWORD:?set it in .env}}@postgres:5432/analytics"
        ),
        "PMS_KAFKA_BOOTSTRAP_SERVERS": KAFKA_INTERNAL,
        "PMS_JWT__SECRET": "${PMS_JWT__SECRET:?set it in .env}",
        "PMS_ADMIN_EMAIL": "${PMS_ADMIN_EMAIL:-admin@pms.local}",
        "PMS_ADMIN_PASSWORD": "${PMS_ADMIN_PASSWORD:?set it in .env}",
        "PMS_LOG_LEVEL": "${PMS_LOG_LEVEL:-INFO}",
    }
    # Containers reach each other by compose service name.
    return env | address_environment(services, lambda spec: spec.name)


def _healthcheck(test: list[str], *, interval: str = "10s", retries: int = 10, start: str = "30s") -> dict[str, Any]:
    return {"test": test, "interval": interval, "timeout": "5s", "retries": retries, "start_period": start}


def _infrastructure() -> dict[str, dict[str, Any]]:
    return {
        "postgres": {
            "image": POSTGRES_IMAGE,
            "environment": {
                "POSTGRES_USER": "postgres",
                "POSTGRES_DB": "postgres",
                "POSTGRES_PASSWORD": "${PMS_POSTGRES_PASSWORD:?set it in .env}",
                # Read by docker/postgres/10-pms-databases.sh on the first start only.
                "PMS_DB_APP_PASSWORD": "${PMS_DB_APP_PASSWORD:?set it in .env}",
                "PMS_DB_ANALYST_PASSWORD": "${PMS_DB_ANALYST_PASSWORD:?set it in .env}",
            },
            # Same server settings as the embedded one: statements can carry patient data, never log them.
            "command": [
                "postgres",
                "-c", "shared_preload_libraries=pg_stat_statements",
                "-c", "max_connections=200",
                *postgres_options(PRIVATE_LOG_SETTINGS),
            ],
            "volumes": [
                # postgres:18 keeps PGDATA in a versioned folder below /var/lib/postgresql.
                "postgres-data:/var/lib/postgresql",
                "./docker/postgres:/docker-entrypoint-initdb.d:ro",
            ],
            "ports": ["127.0.0.1:${PMS_POSTGRES_PUBLISHED_PORT:-5432}:5432"],
            # Over TCP, so it only turns healthy after the init scripts ran (they use the socket).
            "healthcheck": _healthcheck(
                ["CMD-SHELL", "pg_isready -h 127.0.0.1 -U postgres -d analytics"], interval="5s"
            ),
            "networks": [NETWORK],
            "restart": "unless-stopped",
        },
        "kafka": {
            "image": KAFKA_IMAGE,
            "environment": {
                "KAFKA_NODE_ID": "1",
                "KAFKA_PROCESS_ROLES": "broker,controller",
                "KAFKA_LISTENERS": "PLAINTEXT://:9092,CONTROLLER://:9093,HOST://:29092",
                "KAFKA_ADVERTISED_LISTENERS": (
                    "PLAINTEXT://kafka:9092,HOST://localhost:${PMS_KAFKA_PUBLISHED_PORT:-29092}"
                ),
                "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,HOST:PLAINTEXT",
                "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
                "KAFKA_INTER_BROKER_LISTENER_NAME": "PLAINTEXT",
                "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@kafka:9093",
                "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
                "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
                "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
                "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
                "KAFKA_NUM_PARTITIONS": "3",
                "KAFKA_LOG_DIRS": "/var/lib/kafka/data",
            },
            "volumes": ["kafka-data:/var/lib/kafka/data"],
            "ports": ["127.0.0.1:${PMS_KAFKA_PUBLISHED_PORT:-29092}:29092"],
            "healthcheck": _healthcheck(
                [
                    "CMD-SHELL",
                    "/opt/kafka/bin/kafka-broker-api-versions.sh --bootstrap-server localhost:9092 >/dev/null 2>&1",
                ]
            ),
            "networks": [NETWORK],
            "restart": "unless-stopped",
        },
        "localstack": {
            "image": LOCALSTACK_IMAGE,
            "environment": {
                "SERVICES": "ec2,ecs,elbv2,rds,secretsmanager,logs,servicediscovery,iam,sts",
                # ECS, ELBv2, RDS and Cloud Map need a LocalStack licence; empty runs the free edition.
                "LOCALSTACK_AUTH_TOKEN": "${LOCALSTACK_AUTH_TOKEN:-}",
            },
            "volumes": ["localstack-data:/var/lib/localstack"],
            "ports": ["127.0.0.1:${PMS_LOCALSTACK_PUBLISHED_PORT:-4566}:4566"],
            "healthcheck": _healthcheck(["CMD-SHELL", "curl -fsS http://localhost:4566/_localstack/health"]),
            "networks": [NETWORK],
        },
    }


def _service(spec: ServiceSpec, env: dict[str, str]) -> dict[str, Any]:
    depends: dict[str, dict[str, str]] = {}
    if spec.databases:
        depends["postgres"] = {"condition": "service_healthy"}
    if spec.needs_broker:
        depends["kafka"] = {"condition": "service_healthy"}
    for name in spec.depends_on:
        depends[name] = {"condition": "service_healthy"}
    service: dict[str, Any] = {
        "image": IMAGE,
        "build": {"context": ".", "dockerfile": "Dockerfile"},
        "command": ["serve", spec.name],
        # tini as PID 1: signals reach pms and zombies are reaped.
        "init": True,
        "environment": dict(env),
        "healthcheck": _healthcheck(["CMD", "python", "-m", "infra.healthcheck", spec.name]),
        "networks": [NETWORK],
        "restart": "unless-stopped",
    }
    if not spec.public:
        # Reachable only from the other containers: trust the gateway's X-Forwarded-For so auth counts failed
        # logins per real client. Published services (gateway, dashboard) trust no one's header.
        service["environment"]["PMS_FORWARDED_ALLOW_IPS"] = "*"
    if depends:
        service["depends_on"] = depends
    if spec.public:
        port = service_port(spec)
        service["ports"] = [f"${{PMS_{spec.name.upper()}_PUBLISHED_PORT:-{port}}}:{port}"]
    return service


def compose_spec(services: tuple[ServiceSpec, ...] = SERVICES) -> dict[str, Any]:
    """The whole compose document as data."""
    env = service_environment(services)
    spec: dict[str, Any] = {"name": "pms", "services": _infrastructure()}
    for service in services:
        spec["services"][service.name] = _service(service, env)
    spec["networks"] = {NETWORK: {"name": NETWORK}}
    spec["volumes"] = {"postgres-data": {}, "kafka-data": {}, "localstack-data": {}}
    return spec


class _Dumper(yaml.SafeDumper):
    """Plain YAML: no anchors for repeated blocks, so each service reads on its own."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _short_lists_inline(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    inline = all(isinstance(item, str | int) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=inline)


_Dumper.add_representer(list, _short_lists_inline)


def render(services: tuple[ServiceSpec, ...] = SERVICES) -> str:
    body = yaml.dump(compose_spec(services), Dumper=_Dumper, sort_keys=False, width=120, default_flow_style=False)
    return HEADER + "\n" + body


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    expected = render()
    if "--check" in args:
        current = COMPOSE_FILE.read_text() if COMPOSE_FILE.exists() else ""
        if current != expected:
            sys.stderr.write(f"{COMPOSE_FILE.name} is out of date: run `python -m infra.compose`\n")
            return 1
        return 0
    COMPOSE_FILE.write_text(expected)
    sys.stdout.write(f"wrote {COMPOSE_FILE}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
