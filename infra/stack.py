"""The AWS stack pms wants, as plain data.

:func:`desired_stack` turns the settings and the service registry into a :class:`Stack`;
``infra.aws`` compares it with what exists and creates or updates only the difference.
Nothing here talks to AWS, so the whole shape (names, ports, environment, secret
references, routing) is checked by tests without any endpoint.

Layout: one VPC with two public subnets (load balancer and tasks, which pull the image
over the internet gateway) and two private subnets (RDS); security groups let the world
reach only the load balancer, the load balancer reach only the public services, the
services reach each other, and only the services reach PostgreSQL. Every registry service
is one Fargate task definition + ECS service, registered in a Cloud Map private DNS
namespace as ``<name>.<stack>.internal``. Secrets live in Secrets Manager and task
definitions carry only their ARNs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pms.registry import SERVICES, ServiceSpec, start_order
from pms.settings import Settings

#: Tag on every resource the stack owns; status and destroy find resources by it.
STACK_TAG = "pms:stack"
#: Paths the load balancer sends to each public service; ``None`` marks the default route.
PUBLIC_ROUTES: dict[str, tuple[str, ...] | None] = {
    "gateway": ("/api/*", "/auth/*", "/api-docs/*"),
    "dashboard": None,
}
HTTP_PORT = 80
HTTPS_PORT = 443
POSTGRES_PORT = 5432
DB_MASTER_USER = "pms_master"
HEALTH_GRACE_S = 90


def section_defaults(spec: ServiceSpec) -> Any:
    """The default settings section of ``spec`` (host/port/url) without building a Settings."""
    return Settings.model_fields[spec.section].default


def service_port(spec: ServiceSpec) -> int:
    return int(section_defaults(spec).port)


def metrics_port(spec: ServiceSpec) -> int | None:
    """The separate Prometheus port of ``spec`` (billing's, beside its gRPC port), or None.

    A service whose metrics live on its own HTTP port has none; 0 turns the port off.
    """
    port = int(getattr(section_defaults(spec), "metrics_port", 0) or 0)
    return port or None


def address_environment(services: tuple[ServiceSpec, ...], host_of: Callable[[ServiceSpec], str]) -> dict[str, str]:
    """``PMS_<SECTION>__HOST/PORT/URL/TARGET`` so every service binds 0.0.0.0 and finds the others.

    Shared by docker-compose (hosts are compose service names) and ECS (Cloud Map names).
    """
    env: dict[str, str] = {}
    for spec in services:
        port = service_port(spec)
        prefix = f"PMS_{spec.section.upper()}__"
        fields = type(section_defaults(spec)).model_fields
        env[prefix + "HOST"] = "0.0.0.0"
        env[prefix + "PORT"] = str(port)
        if "url" in fields:
            env[prefix + "URL"] = f"http://{host_of(spec)}:{port}"
        if "target" in fields:
            env[prefix + "TARGET"] = f"{host_of(spec)}:{port}"
    return env


@dataclass(frozen=True, slots=True)
class SecretSpec:
    """One Secrets Manager secret. ``derived`` ones are built from others once RDS has an endpoint."""

    key: str
    name: str
    description: str
    derived: bool = False


@dataclass(frozen=True, slots=True)
class Subnet:
    name: str
    cidr: str
    az_index: int
    public: bool


@dataclass(frozen=True, slots=True)
class Ingress:
    port_from: int
    port_to: int
    #: Name of the source security group, or None for anywhere.
    source_group: str | None = None
    cidr: str | None = None


@dataclass(frozen=True, slots=True)
class SecurityGroup:
    name: str
    description: str
    ingress: tuple[Ingress, ...]


@dataclass(frozen=True, slots=True)
class TargetGroup:
    name: str
    service: str
    port: int
    health_path: str
    #: Listener path patterns; None = the listener's default action.
    paths: tuple[str, ...] | None
    priority: int


@dataclass(frozen=True, slots=True)
class Listener:
    """A load balancer listener: it either forwards (default route + path rules) or redirects to HTTPS."""

    port: int
    protocol: str
    certificate_arn: str | None = None
    redirect_to_https: bool = False


@dataclass(frozen=True, slots=True)
class Task:
    """One container = one task definition family (+ one ECS service unless ``one_off``)."""

    name: str
    family: str
    command: tuple[str, ...]
    port: int | None
    environment: dict[str, str]
    #: env var -> key of a :class:`SecretSpec` (rendered as the secret's ARN, never its value).
    secrets: dict[str, str]
    log_group: str
    health_command: tuple[str, ...] | None
    public: bool = False
    one_off: bool = False
    #: Overrides the image's ENTRYPOINT (``pms``) when set.
    entry_point: tuple[str, ...] | None = None
    #: A second container port for Prometheus scrapes (billing), reachable from the stack's own tasks.
    metrics_port: int | None = None


@dataclass(frozen=True, slots=True)
class Database:
    identifier: str
    subnet_group: str
    instance_class: str
    allocated_storage_gb: int
    engine_version: str
    master_user: str = DB_MASTER_USER


@dataclass(frozen=True, slots=True)
class Stack:
    name: str
    region: str
    image: str
    vpc_cidr: str
    subnets: tuple[Subnet, ...]
    security_groups: tuple[SecurityGroup, ...]
    cluster: str
    namespace: str
    execution_role: str
    load_balancer: str
    listeners: tuple[Listener, ...]
    target_groups: tuple[TargetGroup, ...]
    database: Database
    secrets: tuple[SecretSpec, ...]
    tasks: tuple[Task, ...]
    desired_count: int
    task_cpu: int
    task_memory: int
    log_retention_days: int
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def services(self) -> tuple[Task, ...]:
        """The long-running tasks, in dependency order."""
        return tuple(t for t in self.tasks if not t.one_off)

    @property
    def db_init(self) -> Task:
        return next(t for t in self.tasks if t.one_off)

    @property
    def forwarding_listener(self) -> Listener:
        return next(li for li in self.listeners if not li.redirect_to_https)

    def secret(self, key: str) -> SecretSpec:
        return next(s for s in self.secrets if s.key == key)

    def log_groups(self) -> tuple[str, ...]:
        return tuple(t.log_group for t in self.tasks)

    def target_group_for(self, service: str) -> TargetGroup | None:
        return next((tg for tg in self.target_groups if tg.service == service), None)


class StackError(ValueError):
    """The settings cannot describe a deployable stack."""


def _secrets(stack: str) -> tuple[SecretSpec, ...]:
    def spec(key: str, description: str, *, derived: bool = False) -> SecretSpec:
        return SecretSpec(key=key, name=f"{stack}/{key}", description=description, derived=derived)

    return (
        spec("jwt-secret", "HMAC key that signs and verifies JWTs"),
        spec("admin-password", "password of the first admin user"),
        spec("db-master-password", "RDS master password (db-init task only)"),
        spec("db-app-password", "password of the application role pms"),
        spec("db-analyst-password", "password of the read-only role pms_analyst"),
        spec("database-url", "server-level URL of the application role", derived=True),
        spec("analyst-database-url", "URL of the read-only analyst role on analytics", derived=True),
        spec("db-master-url", "URL of the RDS master user (db-init task only)", derived=True),
    )


#: What every service container gets from Secrets Manager (env var -> secret key).
SERVICE_SECRETS = {
    "PMS_JWT__SECRET": "jwt-secret",
    "PMS_ADMIN_PASSWORD": "admin-password",
    "PMS_DATABASE_URL": "database-url",
    "PMS_ANALYST_DATABASE_URL": "analyst-database-url",
}
#: The one-off database bootstrap (roles, databases, extensions) gets the master login instead.
DB_INIT_SECRETS = {
    "PMS_DBINIT_SUPERUSER_URL": "db-master-url",
    "PMS_DB_APP_PASSWORD": "db-app-password",
    "PMS_DB_ANALYST_PASSWORD": "db-analyst-password",
}


def _subnets(stack: str, cidr: str) -> tuple[Subnet, ...]:
    import ipaddress

    network = ipaddress.ip_network(cidr)
    if network.prefixlen > 22:
        raise StackError(f"PMS_INFRA__VPC_CIDR {cidr} is too small: it needs four /24 subnets (use /22 or larger)")
    blocks = list(network.subnets(new_prefix=24))
    return (
        Subnet(f"{stack}-public-a", str(blocks[0]), 0, True),
        Subnet(f"{stack}-public-b", str(blocks[1]), 1, True),
        Subnet(f"{stack}-private-a", str(blocks[2]), 0, False),
        Subnet(f"{stack}-private-b", str(blocks[3]), 1, False),
    )


def desired_stack(settings: Settings, *, services: tuple[ServiceSpec, ...] = SERVICES) -> Stack:
    """The whole stack for ``settings`` (``settings.infra`` + the registry)."""
    infra = settings.infra
    stack = infra.stack_name
    if not stack or not stack.replace("-", "").isalnum() or not stack[0].isalpha() or len(stack) > 20:
        raise StackError("PMS_INFRA__STACK_NAME must be letters, digits and '-', start with a letter, <= 20 chars")
    if not settings.kafka_bootstrap_servers:
        raise StackError(
            "PMS_KAFKA_BOOTSTRAP_SERVERS must name the Kafka (e.g. MSK) bootstrap address the tasks can reach"
        )
    missing = [s.name for s in services if s.public and s.name not in PUBLIC_ROUTES]
    if missing:
        raise StackError(f"public services without a load balancer route in infra.stack.PUBLIC_ROUTES: {missing}")
    namespace = f"{stack}.internal"
    subnets = _subnets(stack, infra.vpc_cidr)

    env = {
        "PMS_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "PMS_ADMIN_EMAIL": settings.admin_email,
        "PMS_LOG_LEVEL": settings.log_level,
        # Internal services are reached only by the stack's own tasks (security groups): the X-Forwarded-For
        # the gateway sets is the real client, which auth's per-address login limit needs.
        "PMS_FORWARDED_ALLOW_IPS": "*",
        # The gateway and dashboard are reached through the load balancer, whose nodes live in the public
        # subnets and append the real client to X-Forwarded-For: only those hops are trusted, so uvicorn takes
        # the address the load balancer saw, never one the client wrote into the header itself.
        "PMS_PUBLIC_FORWARDED_ALLOW_IPS": ",".join(s.cidr for s in subnets if s.public),
        **address_environment(services, lambda spec: f"{spec.name}.{namespace}"),
    }
    tasks: list[Task] = []
    for spec in start_order(services):
        tasks.append(Task(
            name=spec.name,
            family=f"{stack}-{spec.name}",
            command=("serve", spec.name),
            port=service_port(spec),
            environment=dict(env),
            secrets=dict(SERVICE_SECRETS),
            log_group=f"/{stack}/{spec.name}",
            health_command=("CMD", "python", "-m", "infra.healthcheck", spec.name),
            public=spec.public,
            metrics_port=metrics_port(spec),
        ))
    tasks.append(Task(
        name="db-init",
        family=f"{stack}-db-init",
        entry_point=("python", "-m", "infra.dbinit"),
        command=(),
        port=None,
        environment={"PMS_LOG_LEVEL": settings.log_level},
        secrets=dict(DB_INIT_SECRETS),
        log_group=f"/{stack}/db-init",
        health_command=None,
        one_off=True,
    ))

    target_groups = []
    for priority, spec in enumerate((s for s in services if s.public), start=10):
        target_groups.append(TargetGroup(
            name=f"{stack}-{spec.name}"[:32],
            service=spec.name,
            port=service_port(spec),
            health_path=spec.probe_path,
            paths=PUBLIC_ROUTES[spec.name],
            priority=priority,
        ))
    if sum(1 for tg in target_groups if tg.paths is None) != 1:
        raise StackError("exactly one public service must be the load balancer's default route")

    if infra.certificate_arn:
        listeners: tuple[Listener, ...] = (
            Listener(HTTPS_PORT, "HTTPS", certificate_arn=infra.certificate_arn),
            Listener(HTTP_PORT, "HTTP", redirect_to_https=True),
        )
    else:
        listeners = (Listener(HTTP_PORT, "HTTP"),)

    # What the tasks reach on each other: every service port and every separate metrics port.
    service_ports = sorted({service_port(s) for s in services} | {p for s in services if (p := metrics_port(s))})
    public_ports = sorted({service_port(s) for s in services if s.public})
    security_groups = (
        SecurityGroup(f"{stack}-alb", "load balancer: its listener ports from anywhere",
                      tuple(Ingress(port, port, cidr="0.0.0.0/0") for port in sorted(li.port for li in listeners))),
        SecurityGroup(
            f"{stack}-services", "ECS services: from the load balancer and from each other",
            (
                *(Ingress(p, p, source_group=f"{stack}-alb") for p in public_ports),
                Ingress(min(service_ports), max(service_ports), source_group=f"{stack}-services"),
            ),
        ),
        SecurityGroup(f"{stack}-db", "PostgreSQL: from the services only",
                      (Ingress(POSTGRES_PORT, POSTGRES_PORT, source_group=f"{stack}-services"),)),
    )
    return Stack(
        name=stack,
        region=infra.region,
        image=infra.image,
        vpc_cidr=infra.vpc_cidr,
        subnets=subnets,
        security_groups=security_groups,
        cluster=stack,
        namespace=namespace,
        execution_role=f"{stack}-task-execution",
        load_balancer=f"{stack}-alb",
        listeners=listeners,
        target_groups=tuple(target_groups),
        database=Database(
            identifier=f"{stack}-postgres",
            subnet_group=f"{stack}-db",
            instance_class=infra.db_instance_class,
            allocated_storage_gb=infra.db_allocated_storage_gb,
            engine_version=infra.db_engine_version,
        ),
        secrets=_secrets(stack),
        tasks=tuple(tasks),
        desired_count=infra.desired_count,
        task_cpu=infra.task_cpu,
        task_memory=infra.task_memory,
        log_retention_days=infra.log_retention_days,
        tags={STACK_TAG: stack},
    )
