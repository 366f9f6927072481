"""The billing gRPC server: BillingService, the standard health service, and reflection.

``pms serve billing`` calls :func:`run`: it binds the port with health ``NOT_SERVING``,
migrates the billing database (retrying while PostgreSQL is unreachable), then reports
``SERVING``. On SIGTERM/SIGINT it flips health to ``NOT_SERVING`` first (so probes and
load balancers stop sending work), lets in-flight calls finish for a grace period, and
exits 0. Tests use :func:`create_server` (or :func:`build_server`) and bind port 0.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from types import FrameType
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server
from sqlalchemy import Engine, create_engine
from sqlalchemy.pool import NullPool

from billing import servicer as billing_servicer
from billing.servicer import SERVICE_NAME, BillingServicer
from pms import db
from pms.settings import Settings

log = logging.getLogger(__name__)

#: Seconds in-flight calls get to finish after SIGTERM (the supervisor waits 10 s before SIGKILL).
GRACE_PERIOD_S = 5.0
#: Largest accepted request: a BillingRequest is a UUID and two short strings.
MAX_MESSAGE_BYTES = 64 * 1024
#: Seconds between checks of the database behind the ``billing.BillingService`` health entry.
DATABASE_CHECK_INTERVAL_S = 2.0
#: Database limits: a hung PostgreSQL must turn into UNAVAILABLE, not a stuck worker thread.
CONNECT_TIMEOUT_S = 3
STATEMENT_TIMEOUT_MS = 5000
POOL_TIMEOUT_S = 5.0
_BOUNDED = db.bounded_connection(connect_timeout_s=CONNECT_TIMEOUT_S, statement_timeout_ms=STATEMENT_TIMEOUT_MS)


@dataclass
class BillingServer:
    """A built (not yet started) billing server and the pieces its lifecycle needs."""

    server: grpc.Server
    port: int
    engine: Engine
    servicer: BillingServicer
    health: health.HealthServicer
    _stopped: threading.Event = field(default_factory=threading.Event)
    _watch: threading.Thread | None = None

    def start(self) -> None:
        self.server.start()

    def mark_serving(self, *, check_interval_s: float = DATABASE_CHECK_INTERVAL_S) -> None:
        """Accept billing calls and report SERVING (after the database is migrated).

        From then on the ``billing.BillingService`` entry follows the database (readiness: a
        call would answer UNAVAILABLE while it is NOT_SERVING), checked every ``check_interval_s``;
        the overall ``""`` entry stays SERVING while the process runs (liveness: restarting
        billing does not bring PostgreSQL back).
        """
        self.servicer.ready.set()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self._watch is None:
            self._watch = threading.Thread(target=self._follow_database, args=(check_interval_s,),
                                           name="billing-db-health", daemon=True)
            self._watch.start()

    def _follow_database(self, interval_s: float) -> None:
        # Its own connection per check, not one of the calls' pool: under full load a check would
        # wait for a pooled connection (and report a healthy database as down), or keep a call waiting.
        probe = create_engine(self.engine.url, poolclass=NullPool, connect_args=_BOUNDED)
        try:
            self._follow(probe, interval_s)
        finally:
            probe.dispose()

    def _follow(self, probe: Engine, interval_s: float) -> None:
        serving = True
        while not self._stopped.wait(interval_s):
            reachable = db.database_reachable(probe)
            if reachable == serving or self._stopped.is_set():
                continue
            serving = reachable
            if serving:
                log.info("billing database reachable again; BillingService health SERVING")
                self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
            else:
                log.warning("billing database unreachable; BillingService health NOT_SERVING")
                self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)

    def stop(self, grace: float | None = GRACE_PERIOD_S) -> None:
        """NOT_SERVING, then let in-flight calls finish within ``grace`` seconds; idempotent."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()  # first: watchers see NOT_SERVING at once
        if self._watch is not None:
            self._watch.join(timeout=CONNECT_TIMEOUT_S + 1)
        self.server.stop(grace).wait()
        self.servicer.ready.clear()
        self.engine.dispose()


def billing_engine(settings: Settings) -> Engine:
    """The billing database engine: a pool as large as the worker pool, bounded waits everywhere.

    No ping per checkout (a third of a call's database time, py-spy): after a PostgreSQL restart
    one call answers UNAVAILABLE, which every caller retries (billing is idempotent).
    """
    return db.make_engine(
        settings.database_url_for("billing"),
        pool_size=settings.billing.max_workers,
        max_overflow=0,
        pre_ping=False,
        pool_timeout=POOL_TIMEOUT_S,
        connect_args=_BOUNDED,
    )


def build_server(settings: Settings, *, port: int | None = None, engine: Engine | None = None) -> BillingServer:
    """Bind a billing server on ``settings.billing.host`` and ``port`` (default: the setting; 0 = any free).

    Health starts NOT_SERVING and billing calls answer UNAVAILABLE until :meth:`BillingServer.mark_serving`.

    Raises:
        RuntimeError: the port cannot be bound.
    """
    engine = engine if engine is not None else billing_engine(settings)
    servicer = BillingServicer(engine)
    health_servicer = health.HealthServicer(
        experimental_non_blocking=True,
        experimental_thread_pool=futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="billing-health"),
    )
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.billing.max_workers, thread_name_prefix="billing"),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    billing_servicer.add_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"{settings.billing.host}:{settings.billing.port if port is None else port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        engine.dispose()
        raise RuntimeError(f"billing cannot listen on {address}") from exc
    if bound == 0:
        engine.dispose()
        raise RuntimeError(f"billing cannot listen on {address}")
    return BillingServer(server=server, port=bound, engine=engine, servicer=servicer, health=health_servicer)


def create_server(settings: Settings, *, port: int | None = None) -> tuple[grpc.Server, int]:
    """Migrate the billing database and return a ready, not yet started server and its bound port.

    The caller starts it (``server.start()``) and stops it (``server.stop(grace)``).
    """
    db.migrate(settings, "billing")
    built = build_server(settings, port=port)
    built.mark_serving()
    return built.server, built.port


def migrate_until_done(settings: Settings, *, stop: threading.Event, max_backoff_s: float = 5.0) -> bool:
    """Migrate the billing database, retrying while it is unreachable; False if ``stop`` came first."""
    backoff = 0.2
    while not stop.is_set():
        try:
            db.migrate(settings, "billing")
            return True
        except Exception as exc:  # PostgreSQL not up yet, or restarting
            log.warning("billing migration failed; retrying",
                        extra={"fields": {"exc_type": type(exc).__name__, "retry_in_s": backoff}})
            stop.wait(backoff)
            backoff = min(backoff * 2, max_backoff_s)
    return False


def serve_metrics(billing: BillingServer, settings: Settings) -> WSGIServer | None:
    """Serve the Prometheus metrics on ``settings.billing.metrics_port`` (a daemon thread).

    A port that cannot be bound costs the metrics, with a warning, never billing itself.
    """
    port = settings.billing.metrics_port
    if not port:
        return None
    try:
        server, _thread = start_http_server(port, addr=settings.billing.host,
                                            registry=billing.servicer.metrics.registry)
    except OSError as exc:
        log.warning("billing metrics not served: port unavailable",
                    extra={"fields": {"port": port, "error": type(exc).__name__}})
        return None
    log.info("billing metrics served", extra={"fields": {"port": port}})
    return server


def run(settings: Settings) -> None:
    """Serve billing until SIGTERM/SIGINT (the registry's ``billing.server:run``)."""
    stop_requested = threading.Event()
    received: list[int] = []

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        # Only record it here: logging from a signal handler can interleave with the main thread's.
        received.append(signum)
        stop_requested.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    billing = build_server(settings)
    metrics = serve_metrics(billing, settings)
    try:
        billing.start()
        log.info("billing listening", extra={"fields": {"port": billing.port}})
        started = time.monotonic()
        if migrate_until_done(settings, stop=stop_requested):
            billing.mark_serving()
            log.info("billing serving", extra={"fields": {"migrated_in_s": round(time.monotonic() - started, 3)}})
        stop_requested.wait()
        log.info("billing stopping", extra={"fields": {"signal": signal.Signals(received[0]).name}})
    finally:
        billing.stop(GRACE_PERIOD_S)
        if metrics is not None:
            metrics.shutdown()
            metrics.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.info("billing stopped")
