"""Billing as the launcher runs it: ``pms serve billing`` in its own process, stopped by SIGTERM."""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from billing.client import BillingClient
from billing.server import GRACE_PERIOD_S, SERVICE_NAME
from pms.settings import Settings

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


def test_sigint_stops_it_too(start_service, settings: Settings) -> None:
    svc = start_service("billing", settings)
    assert svc.proc is not None
    os.kill(svc.proc.pid, signal.SIGINT)
    assert svc.proc.wait(timeout=GRACE_PERIOD_S + 5) == 0, svc.log_tail()
