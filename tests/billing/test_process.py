"""Billing as the launcher runs it: ``pms serve billing`` in its own process, stopped by SIGTERM."""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr

from billing.client import BillingClient, BillingUnavailable
from billing.server import GRACE_PERIOD_S, SERVICE_NAME
from pms import process
from pms.settings import Settings, child_env
from tests.fixtures.servers import ServerSet

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAME = "Quentin Zyxwvut"
EMAIL = "quentin.zyxwvut@example.org"


def test_serve_billing_process_serves_then_stops_cleanly_on_sigterm(
    start_service, settings: Settings, patient_id_factory
) -> None:
    started = time.monotonic()
    svc = start_service("billing", settings)  # waits for the grpc health probe to say SERVING
    startup_s = time.monotonic() - started
    assert svc.proc is not None

    patient_id = patient_id_factory()
    with BillingClient(svc.address) as client:
        first = client.create_account(patient_id=patient_id, name=NAME, email=EMAIL, timeout=5)
        again = client.create_account(patient_id=patient_id, name=NAME, email=EMAIL, timeout=5)
        assert first.created and not again.created and again.account_id == first.account_id
        with pytest.raises(ValueError):
            client.create_account(patient_id=NAME, name=NAME, email=EMAIL, timeout=5)

    # Prometheus metrics on their own port: calls by method and status code, accounts opened.
    metrics = httpx.get(f"http://127.0.0.1:{settings.billing.metrics_port}/metrics", timeout=5).text
    assert 'billing_calls_total{code="OK",method="CreateBillingAccount"} 2.0' in metrics
    assert 'billing_calls_total{code="INVALID_ARGUMENT",method="CreateBillingAccount"} 1.0' in metrics
    assert "billing_accounts_opened_total 1.0" in metrics
    assert 'billing_call_duration_seconds_count{method="CreateBillingAccount"} 3.0' in metrics

    with grpc.insecure_channel(svc.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING

        os.kill(svc.proc.pid, signal.SIGTERM)
        stopping = time.monotonic()
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()  # an open watch would otherwise hold the server for the whole grace period

    returncode = svc.proc.wait(timeout=GRACE_PERIOD_S + 5)
    stop_s = time.monotonic() - stopping
    assert returncode == 0, svc.log_tail()
    assert stop_s < GRACE_PERIOD_S
    log = svc.log_path.read_text()
    assert '"billing stopped"' in log and '"signal": "SIGTERM"' in log
    # Neither name nor email (nor the bad "patient id" holding the name) ever reaches the log.
    assert "Zyxwvut" not in log and "zyxwvut" not in log.lower()
    print(f"billing process: ready in {startup_s:.2f}s, stopped in {stop_s:.2f}s")

    # Restarted at once on the same port (what the patient service's retry worker waits for),
    # it still knows the account.
    again_svc = start_service("billing", settings)
    with BillingClient(again_svc.address) as client:
        found = client.get_account(patient_id=patient_id, timeout=5)
    assert found is not None and found.account_id == first.account_id


def test_sigint_stops_it_too(start_service, settings: Settings) -> None:
    svc = start_service("billing", settings)
    assert svc.proc is not None
    os.kill(svc.proc.pid, signal.SIGINT)
    assert svc.proc.wait(timeout=GRACE_PERIOD_S + 5) == 0, svc.log_tail()


def test_database_down_at_start_keeps_it_alive_not_serving_until_stopped(
    servers: ServerSet, tmp_path: Path
) -> None:
    """No crash loop when PostgreSQL is not there yet: it keeps retrying the migration, NOT_SERVING."""
    dead_db = f"postgresql://pms:unused@127.0.0.1:{process.free_port()}/postgres"
    settings = servers.make_settings(
        database_url=SecretStr(dead_db), billing={"host": "127.0.0.1", "port": process.free_port()})
    address = f"127.0.0.1:{settings.billing.port}"
    log_path = tmp_path / "billing.log"
    env = child_env(settings)
    proc = process.spawn([sys.executable, "-m", "pms.cli", "serve", "billing"], log_path=log_path, env=env)
    try:
        alive = lambda: proc.poll() is None  # noqa: E731
        process.wait_until(lambda: _health(address) == health_pb2.HealthCheckResponse.NOT_SERVING,
                           timeout=60, interval=0.1, message="billing to answer NOT_SERVING", alive=alive)
        process.wait_until(lambda: log_path.read_text().count("billing migration failed; retrying") >= 2,
                           timeout=30, message="two failed migration attempts", alive=alive)
        assert _health(address) == health_pb2.HealthCheckResponse.NOT_SERVING
        with BillingClient(address) as client, pytest.raises(BillingUnavailable):
            client.get_account(patient_id=str(uuid.uuid4()), timeout=5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=GRACE_PERIOD_S + 5) == 0, log_path.read_text()[-2000:]
        assert "unused" not in log_path.read_text()  # the database password never reaches the log
    finally:
        process.stop(proc, timeout=5)


def _health(address: str) -> int | None:
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            return reply.status
    except grpc.RpcError:
        return None


def test_a_taken_metrics_port_costs_the_metrics_not_billing(start_service, settings: Settings,
                                                             patient_id_factory) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        svc = start_service("billing", settings.model_copy(
            update={"billing": settings.billing.model_copy(update={"metrics_port": port})}))
        with BillingClient(svc.address) as client:
            assert client.create_account(patient_id=patient_id_factory(), name=NAME, email=EMAIL, timeout=5).created
        assert "billing metrics not served: port unavailable" in svc.log_path.read_text()
