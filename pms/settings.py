"""The one settings object of the platform.

Every knob lives here, read from ``PMS_*`` environment variables (nested sections use
``__``: ``PMS_PATIENT__PORT=4000``) or a ``.env`` file. Services never read
``os.environ`` themselves; they take a :class:`Settings` (via :func:`get_settings` or a
FastAPI dependency override in tests).

Embedded mode (no ``PMS_DATABASE_URL``) generates its own secrets into the data dir on
first start; any other mode refuses to start without them, so no secret ever lives in code.
"""

from __future__ import annotations

import difflib
import os
import secrets
import tempfile
from collections.abc import Mapping
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import URL, make_url

SERVICE_DATABASES = ("auth", "patients", "billing", "analytics")


class Mode(StrEnum):
    EMBEDDED = "embedded"
    EXTERNAL = "external"


class HttpService(BaseModel):
    """Where one HTTP service listens, and how others reach it."""

    host: str = "127.0.0.1"
    port: int
    #: Base URL other processes use to reach it; defaults to http://host:port.
    url: str | None = None

    @property
    def base_url(self) -> str:
        return self.url or f"http://{self.host}:{self.port}"


class PatientSettings(HttpService):
    port: int = 4000
    #: How long a create waits for billing before answering with billingStatus PENDING.
    billing_timeout_s: float = 2.0
    #: Largest accepted request body, bytes (larger -> 413).
    max_body_bytes: int = 64 * 1024
    #: Seed sample patients on the first embedded start.
    seed_demo_data: bool = True
    #: Seconds the outbox relay waits between polls when it has nothing to publish.
    outbox_poll_interval_s: float = 0.2
    #: Rows the outbox relay publishes per batch.
    outbox_batch_size: int = 500
    #: First backoff of the billing retry worker, seconds (doubles per attempt).
    billing_retry_initial_s: float = 0.5
    #: Largest backoff of the billing retry worker, seconds.
    billing_retry_max_s: float = 30.0


class AuthSettings(HttpService):
    port: int = 4005
    #: Failed logins allowed per account inside the window.
    max_failed_logins: int = 5
    #: Failed logins allowed per client address inside the window (higher: a clinic's staff share one address).
    max_failed_logins_per_address: int = 20
    #: Window, seconds, over which failed logins are counted.
    failed_login_window_s: int = 300


class GatewaySettings(HttpService):
    port: int = 4004
    #: Seconds before an upstream call is answered with 504.
    upstream_timeout_s: float = 10.0
    #: Largest accepted request body, bytes (larger -> 413).
    max_body_bytes: int = 1024 * 1024
    #: Requests per caller (token subject or client address) per minute.
    rate_limit_per_minute: int = 1200
    #: Browser origins allowed to call the gateway (CORS), a JSON list.
    cors_origins: list[str] = Field(default_factory=lambda: ["http://localhost:8501", "http://127.0.0.1:8501"])


class AnalyticsApiSettings(HttpService):
    port: int = 4002
    #: Breakdown cells with a count below this are suppressed for ANALYST callers.
    privacy_threshold: int = 10


class BillingSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 9001
    #: host:port the patient service dials; defaults to host:port.
    target: str | None = None
    #: Threads serving gRPC calls.
    max_workers: int = 16
    #: Port of billing's Prometheus metrics (plain HTTP on the billing host, any path); 0 turns them off.
    metrics_port: int = 9101

    @property
    def address(self) -> str:
        return self.target or f"{self.host}:{self.port}"


class DashboardSettings(HttpService):
    port: int = 8501
    #: Seconds a form kept from an expired session waits for its user to sign in again on that browser; an older
    #: one is dropped at the page's next run and never given back (it is patient data in the dashboard's memory).
    draft_max_age_s: float = Field(default=8 * 3600, gt=0)


class PipelineSettings(BaseModel):
    #: Kafka consumer group of the analytics pipeline.
    consumer_group: str = "analytics"
    #: Port of the pipeline's /health, /ready and /metrics endpoint.
    host: str = "127.0.0.1"
    port: int = 4010
    #: Largest batch the sink writes in one transaction.
    batch_size: int = 5000
    #: Seconds the sink waits to fill a batch before writing what it has.
    batch_timeout_s: float = 0.2
    #: Longest a consumer fetch waits for new events (librdkafka fetch.wait.max.ms). Tansu answers a fetch only
    #: when this runs out, not when events arrive, so it adds to freshness: 500 (the default) doubled the p50.
    fetch_wait_ms: int = Field(default=50, ge=1, le=5000)
    #: Window (events) over which freshness p50/p99 are computed.
    freshness_window: int = 1000
    #: Seconds the consumer may stay outside its group, starved of partitions while events wait, or failing
    #: every offset commit, before the process exits (code 70) to be restarted; a new consumer is tried at half.
    stall_timeout_s: float = 60.0
    #: Seconds between a consuming pipeline's heartbeats in pipeline_status (written with each beat); the
    #: analytics API reports the pipeline as not running after three missed ones (figures may be out of date).
    heartbeat_s: float = Field(default=5.0, gt=0, le=300)


class KafkaSettings(BaseModel):
    #: Address the embedded Tansu broker listens on (PMS_KAFKA_BOOTSTRAP_SERVERS overrides it for clients).
    bootstrap_servers: str = "127.0.0.1:9092"
    #: Topic of the patient events (protobuf PatientEvent, key = patient id).
    topic: str = "patient"
    #: Partitions of the patient topic when pms creates it.
    partitions: int = 3
    #: Consumer group timings that make groups join in seconds on Tansu (DESIGN.md section 5).
    session_timeout_ms: int = 6000
    #: Consumer heartbeat interval; short, so a group notices a lost member quickly.
    heartbeat_interval_ms: int = 500
    #: Topic retention passed explicitly because Tansu does not report it (-1 = keep forever).
    retention_ms: int = -1


class JWTSettings(BaseModel):
    #: HMAC key, at least 32 bytes. Generated into the data dir in embedded mode.
    secret: SecretStr | None = None
    #: Signing algorithm; verifiers accept this one only.
    algorithm: str = "HS256"
    #: Token lifetime, seconds.
    ttl_s: int = 3600
    #: ``iss`` claim the auth service signs and every verifier requires.
    issuer: str = "pms-auth"
    #: ``aud`` claim the auth service signs and every verifier requires.
    audience: str = "pms"

    def key(self) -> str:
        """The signing key, which validated settings always hold (generated in embedded mode,
        required otherwise: ``Settings._secrets_present``)."""
        if self.secret is None:
            raise RuntimeError("JWT secret missing")
        return self.secret.get_secret_value()
    #: Seconds between fetches of auth's token revocation list (logout, deactivation, role/password
    #: change) by every verifier: the gateway, the patient and the analytics services.
    revocation_refresh_s: float = 2.0


class PostgresSettings(BaseModel):
    """Embedded PostgreSQL: where it listens (only used when no database URL is given)."""

    host: str = "127.0.0.1"
    port: int = 5432


class InfraSettings(BaseModel):
    """AWS deployment (``pms infra``): the knobs of the desired stack in ``infra/stack.py``."""

    #: Name prefix of every AWS resource of the stack.
    stack_name: str = "pms"
    #: AWS region.
    region: str = "us-east-1"
    #: Image every task runs (an ECR URI on real AWS).
    image: str = "pms:latest"
    #: Tasks per ECS service.
    desired_count: int = 1
    #: CPU units per task (1024 = one vCPU).
    task_cpu: int = 512
    #: Memory per task, MiB.
    task_memory: int = 1024
    #: Address range of the stack's VPC.
    vpc_cidr: str = "10.80.0.0/16"
    #: RDS instance class of the PostgreSQL database.
    db_instance_class: str = "db.t4g.micro"
    #: RDS storage, GiB.
    db_allocated_storage_gb: int = 20
    #: RDS PostgreSQL major version.
    db_engine_version: str = "18"
    #: CloudWatch log retention, days.
    log_retention_days: int = 30
    #: ACM certificate for HTTPS on the load balancer (port 80 then only redirects); unset = plain HTTP.
    certificate_arn: str | None = None
    #: How long deploy waits for RDS and for every ECS service to reach steady state.
    wait_timeout_s: float = 1200.0
    #: Seconds between status polls while deploy waits.
    poll_interval_s: float = 5.0


class SupervisorSettings(BaseModel):
    """``pms up``: how children that die are restarted, how they are stopped, how their logs are kept."""

    #: Restarts of one child allowed within restart_window_s; its next death stops everything (exit 1).
    max_restarts: int = Field(default=5, ge=0)
    #: Window, seconds, over which the restarts of one child are counted.
    restart_window_s: float = Field(default=60.0, gt=0)
    #: Delay before restarting a child that died, seconds; doubles with every recent restart.
    backoff_initial_s: float = Field(default=0.5, ge=0)
    #: Longest delay before a restart, seconds.
    backoff_max_s: float = Field(default=30.0, ge=0)
    #: Seconds a child may take to exit after SIGTERM on stop before it is killed (a second Ctrl-C kills at once).
    stop_timeout_s: float = Field(default=10.0, gt=0)
    #: Seconds a service may take to answer its readiness probe before the start fails.
    ready_timeout_s: float = Field(default=120.0, gt=0)
    #: A child's log in <data_dir>/logs is rotated (copy-truncate) once larger than this, bytes.
    log_max_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    #: Rotated copies kept per log (<name>.log.1 is the newest); 0 only truncates.
    log_backups: int = Field(default=3, ge=0)


class Settings(BaseSettings):
    """All configuration of the platform, one instance per process."""

    model_config = SettingsConfigDict(
        env_prefix="PMS_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
    )

    #: Where embedded data, generated secrets and logs live.
    data_dir: Path = Path(".pms")
    #: Server-level SQLAlchemy URL (any database name); each service swaps in its own database.
    #: Unset -> embedded mode: pms starts its own PostgreSQL.
    database_url: SecretStr | None = None
    #: Read-only analyst login for notebooks and the analytics API (database ``analytics``).
    analyst_database_url: SecretStr | None = None
    #: Unset -> embedded mode: pms starts its own Tansu broker.
    kafka_bootstrap_servers: str | None = None
    kafka: KafkaSettings = KafkaSettings()
    jwt: JWTSettings = JWTSettings()
    #: First admin; in embedded mode generated and printed once by ``pms up`` when unset.
    admin_email: str = "admin@pms.local"
    #: Password of the first admin; unset in embedded mode: generated into <data_dir>/secrets/admin.password.
    admin_password: SecretStr | None = None
    #: Log level of every process (JSON lines on stderr; never patient data).
    log_level: str = "INFO"
    #: Comma-separated proxy addresses or networks whose X-Forwarded-For the internal services trust
    #: (uvicorn's forwarded_allow_ips): the gateway's, so auth counts failed logins per real client.
    #: "*" only on a private network.
    forwarded_allow_ips: str = "127.0.0.1"
    #: The same for the public services (the gateway, and the dashboard's Streamlit): the load balancer in
    #: front of them, e.g. its subnets' CIDR. Empty (the default): they are the edge and believe no
    #: X-Forwarded-For, since a client that chose its own address would get a fresh rate limit and login
    #: counter per request.
    public_forwarded_allow_ips: str = ""

    postgres: PostgresSettings = PostgresSettings()
    patient: PatientSettings = PatientSettings()
    auth: AuthSettings = AuthSettings()
    gateway: GatewaySettings = GatewaySettings()
    analytics: AnalyticsApiSettings = AnalyticsApiSettings()
    billing: BillingSettings = BillingSettings()
    dashboard: DashboardSettings = DashboardSettings()
    pipeline: PipelineSettings = PipelineSettings()
    infra: InfraSettings = InfraSettings()
    supervisor: SupervisorSettings = SupervisorSettings()

    @property
    def mode(self) -> Mode:
        return Mode.EMBEDDED if self.database_url is None else Mode.EXTERNAL

    @property
    def secrets_dir(self) -> Path:
        return self.data_dir / "secrets"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def bootstrap_servers(self) -> str:
        return self.kafka_bootstrap_servers or self.kafka.bootstrap_servers

    @model_validator(mode="after")
    def _secrets_present(self) -> Settings:
        if self.mode is Mode.EMBEDDED:
            if self.jwt.secret is None:
                self.jwt.secret = SecretStr(read_or_create_secret(self.secrets_dir / "jwt.key", nbytes=32))
        elif self.jwt.secret is None:
            raise ValueError("PMS_JWT__SECRET is required when PMS_DATABASE_URL is set (external mode)")
        if len(self.jwt.secret.get_secret_value().encode()) < 32:
            raise ValueError("PMS_JWT__SECRET must be at least 32 bytes (256 bits)")
        return self

    def server_url(self) -> URL:
        """The server-level database URL (embedded one when unset)."""
        if self.database_url is not None:
            return make_url(self.database_url.get_secret_value())
        from pms.embedded import embedded_database_url

        return embedded_database_url(self)

    def database_url_for(self, database: str) -> URL:
        """SQLAlchemy URL of one service database (``auth``, ``patients``, ``billing``, ``analytics``)."""
        if database not in SERVICE_DATABASES:
            raise ValueError(f"unknown service database {database!r}; expected one of {SERVICE_DATABASES}")
        return _with_psycopg(self.server_url().set(database=database))

    def analyst_url(self) -> URL:
        """URL of the read-only analyst role on the analytics database."""
        if self.analyst_database_url is not None:
            return _with_psycopg(make_url(self.analyst_database_url.get_secret_value()))
        from pms.embedded import embedded_analyst_url

        return _with_psycopg(embedded_analyst_url(self))


def _with_psycopg(url: URL) -> URL:
    if url.drivername in ("postgresql", "postgres"):
        return url.set(drivername="postgresql+psycopg")
    return url


def read_or_create_secret(path: Path, *, nbytes: int) -> str:
    """Return the secret stored at ``path``, creating it (mode 0600) on first use."""
    if not path.exists():
        install_secret(path, secrets.token_urlsafe(nbytes))
    return path.read_text().strip()


def install_secret(path: Path, value: str) -> bool:
    """Store ``value`` at ``path`` (mode 0600) unless a secret is there already; True if this call stored it.

    The value is written and synced under a temporary name and then hard-linked into place, which
    fails if the name exists: when two processes race on first start exactly one secret wins, and
    nobody can read a half-written (or, after a crash, empty) file under the real name.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(value)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False  # another process won the race: its secret stands
        except OSError:  # a filesystem without hard links (vfat, some network mounts): exclusive create
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as handle:
                handle.write(value)
        return True
    finally:
        os.unlink(tmp)


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (cached; tests build their own ``Settings`` instead).

    Raises:
        UnknownSettingsError: a ``PMS_<SECTION>__<NAME>`` variable names no setting.
    """
    check_environment({**_dotenv(Path(".env")), **os.environ})
    return Settings()


def _dotenv(path: Path) -> dict[str, str]:
    """The variables of a ``.env`` file (read as pydantic-settings reads it), for the same check."""
    if not path.is_file():
        return {}
    from dotenv import dotenv_values

    return {key: value or "" for key, value in dotenv_values(path).items()}


#: Settings that were renamed: the old variable would otherwise be silently ignored.
RENAMED_VARIABLES = {"PMS_GATEWAY__REVOCATION_REFRESH_S": "PMS_JWT__REVOCATION_REFRESH_S"}


class UnknownSettingsError(ValueError):
    """Environment variables in the settings' nested form that name no setting."""


def nested_fields() -> dict[str, Any]:
    """``PMS_<SECTION>__<NAME>`` of every nested setting, with its field (the one walk of the sections)."""
    return {f"PMS_{name.upper()}__{sub.upper()}": sub_field for name, field in Settings.model_fields.items()
            if isinstance(field.default, BaseModel) for sub, sub_field in type(field.default).model_fields.items()}


def nested_variables() -> frozenset[str]:
    """Every ``PMS_<SECTION>__<NAME>`` variable a setting reads."""
    return frozenset(nested_fields())


def top_level_variables() -> frozenset[str]:
    """Every single-underscore ``PMS_<NAME>`` variable a setting reads (not the sections)."""
    return frozenset(f"PMS_{(field.alias or name).upper()}" for name, field in Settings.model_fields.items()
                     if not isinstance(field.default, BaseModel))


#: How alike (difflib ratio) a single-underscore name must be to a top-level setting to count as its typo.
#: Tool variables sharing the prefix (compose's PMS_POSTGRES_PASSWORD, db-init's PMS_DB_APP_PASSWORD, the
#: bench's PMS_BENCH_*) stay at or below 0.76; the typos seen (PMS_LOGLEVEL, PMS_DATABASE_ULR) are >= 0.86.
TYPO_RATIO = 0.85


def check_environment(environ: Mapping[str, str]) -> None:
    """Refuse ``PMS_*`` variables that are meant as a setting but name none, saying what was meant.

    pydantic-settings drops unknown keys without a word, so a typo
    (``PMS_PATIENT__OUTBOX_POLL_INTERVAL``) or a renamed setting would leave its default in
    force while the operator believes it changed; for a security setting that is a silent
    hole. Every nested name (with ``__``) is checked. Single-underscore ``PMS_*`` names are
    also used by docker-compose, db-init and the bench, which are not settings, so one of
    those is refused only when it is plainly a setting mistyped: a section's setting with one
    underscore for two (``PMS_JWT_SECRET``), or a near miss of a top-level setting
    (``PMS_LOGLEVEL``).
    """
    known = nested_variables()
    top_level = top_level_variables()
    problems = []
    for variable in sorted(key.upper() for key in environ if key.upper().startswith("PMS_")):
        if variable in known or variable in top_level:
            continue
        if variable in RENAMED_VARIABLES:
            problems.append(f"{variable} was renamed {RENAMED_VARIABLES[variable]}")
        elif "__" in variable:
            close = difflib.get_close_matches(variable, known, n=1)
            problems.append(f"{variable} is not a setting" + (f" (did you mean {close[0]}?)" if close else ""))
        elif meant := _meant_by_single_underscore(variable, known, top_level):
            problems.append(f"{variable} is not a setting (did you mean {meant}?)")
    if problems:
        raise UnknownSettingsError("; ".join(problems))


def _meant_by_single_underscore(variable: str, nested: frozenset[str], top_level: frozenset[str]) -> str | None:
    """The setting a single-underscore ``variable`` plainly mistypes, or None for a name of some other tool."""
    parts = variable.split("_")
    for cut in range(2, len(parts)):  # PMS_JWT_SECRET -> PMS_JWT__SECRET
        candidate = "_".join(parts[:cut]) + "__" + "_".join(parts[cut:])
        if candidate in nested:
            return candidate
    close = difflib.get_close_matches(variable, top_level, n=1, cutoff=TYPO_RATIO)
    return close[0] if close else None


def _env_value(value: object) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, (list, dict)):
        import json

        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def to_env(settings: Settings) -> dict[str, str]:
    """The ``PMS_*`` variables that recreate ``settings`` in a child process.

    The supervisor and the test fixtures hand this to every service they start, so a
    child sees exactly the parent's configuration (including generated secrets).
    """
    env: dict[str, str] = {}
    for name, field in Settings.model_fields.items():
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, BaseModel):
            for sub_name in type(value).model_fields:
                sub_value = getattr(value, sub_name)
                if sub_value is not None:
                    env[f"PMS_{name.upper()}__{sub_name.upper()}"] = _env_value(sub_value)
        else:
            env[f"PMS_{(field.alias or name).upper()}"] = _env_value(value)
    env["PMS_DATA_DIR"] = str(settings.data_dir.resolve())
    return env


def _secret_variables() -> tuple[str, ...]:
    """The ``PMS_*`` names of every secret setting (each ``SecretStr`` field, nested ones included)."""
    fields = {f"PMS_{name.upper()}": field for name, field in Settings.model_fields.items()} | nested_fields()
    return tuple(name for name, field in fields.items() if "SecretStr" in str(field.annotation))


#: Variables that carry secrets; children that must not hold them (dashboard, notebook kernels) drop these.
SECRET_VARIABLES = _secret_variables()


def child_env(settings: Settings) -> dict[str, str]:
    """The environment for a child process: ours without any ``PMS_*``, plus ``settings`` as ``PMS_*``.

    Dropping our own ``PMS_*`` first means a variable the parent happens to have can never
    override what ``settings`` says.
    """
    base = {key: value for key, value in os.environ.items() if not key.startswith("PMS_")}
    return {**base, **to_env(settings)}
