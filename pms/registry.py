"""The one list of the platform's processes.

``pms up`` starts them from here in dependency order, ``pms serve NAME`` runs one of them,
and docker-compose.yml and the infra stack are checked against (or generated from) it, so
a service is added in exactly one place.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pms.settings import Settings


class Kind(StrEnum):
    #: FastAPI app served by uvicorn; ``target`` is a ``create_app(settings)`` factory.
    ASGI = "asgi"
    #: A blocking ``run(settings)`` callable (gRPC server, stream pipeline, Streamlit).
    CALLABLE = "callable"


class Probe(StrEnum):
    HTTP = "http"  # GET <url>/ready answers 200
    GRPC = "grpc"  # grpc.health.v1 Check answers SERVING


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    name: str
    description: str
    kind: Kind
    #: "module:function" of the factory (ASGI) or the blocking runner (CALLABLE).
    target: str
    #: Settings section holding ``host`` and ``port`` (``settings.<section>.port``).
    section: str
    probe: Probe = Probe.HTTP
    probe_path: str = "/ready"
    depends_on: tuple[str, ...] = ()
    #: Reachable from outside (load balancer / published port): gateway and dashboard.
    public: bool = False
    #: Needs the broker to be up before it starts.
    needs_broker: bool = False
    #: Service databases it owns and migrates.
    databases: tuple[str, ...] = field(default_factory=tuple)

    def port(self, settings: Settings) -> int:
        return int(getattr(settings, self.section).port)

    def host(self, settings: Settings) -> str:
        return str(getattr(settings, self.section).host)

    @property
    def port_setting(self) -> str:
        return f"PMS_{self.section.upper()}__PORT"


SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec(
        name="billing",
        description="gRPC billing server: one billing account per patient",
        kind=Kind.CALLABLE,
        target="billing.server:run",
        section="billing",
        probe=Probe.GRPC,
        databases=("billing",),
    ),
    ServiceSpec(
        name="auth",
        description="login, JWTs and user management",
        kind=Kind.ASGI,
        target="api.auth.main:create_app",
        section="auth",
        databases=("auth",),
    ),
    ServiceSpec(
        name="patient",
        description="patient records, outbox relay to Kafka, billing retries",
        kind=Kind.ASGI,
        target="api.patient.main:create_app",
        section="patient",
        depends_on=("billing",),
        needs_broker=True,
        databases=("patients",),
    ),
    ServiceSpec(
        name="pipeline",
        description="Quix Streams pipeline: patient events -> analytics tables",
        kind=Kind.CALLABLE,
        target="stream_processing.app:run",
        section="pipeline",
        needs_broker=True,
        databases=("analytics",),
    ),
    ServiceSpec(
        name="analytics",
        description="read-only analytics API over the analytics tables",
        kind=Kind.ASGI,
        target="api.analytics.main:create_app",
        section="analytics",
        depends_on=("pipeline",),
    ),
    ServiceSpec(
        name="gateway",
        description="the one entry point: JWT check, roles, routing",
        kind=Kind.ASGI,
        target="api.gateway.main:create_app",
        section="gateway",
        depends_on=("auth", "patient", "analytics"),
        public=True,
    ),
    ServiceSpec(
        name="dashboard",
        description="Streamlit staff dashboard",
        kind=Kind.CALLABLE,
        target="dashboard.serve:run",
        section="dashboard",
        probe_path="/_stcore/health",
        depends_on=("gateway",),
        public=True,
    ),
)


def serve_command(spec: ServiceSpec) -> list[str]:
    """How a service process is started everywhere: this interpreter running ``pms serve NAME``."""
    return [sys.executable, "-m", "pms.cli", "serve", spec.name]


def by_name(name: str) -> ServiceSpec:
    for spec in SERVICES:
        if spec.name == name:
            return spec
    known = ", ".join(s.name for s in SERVICES)
    raise KeyError(f"unknown service {name!r}; known services: {known}")


def start_order(services: tuple[ServiceSpec, ...] = SERVICES) -> list[ServiceSpec]:
    """Services sorted so each comes after everything it depends on (stable, cycle-checked)."""
    names = {s.name for s in services}
    ordered: list[ServiceSpec] = []
    placed: set[str] = set()
    pending = list(services)
    while pending:
        progressed = False
        for spec in list(pending):
            if all(dep in placed or dep not in names for dep in spec.depends_on):
                ordered.append(spec)
                placed.add(spec.name)
                pending.remove(spec)
                progressed = True
        if not progressed:
            raise ValueError(f"dependency cycle among {[s.name for s in pending]}")
    return ordered
