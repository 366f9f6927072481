"""Billing over real gRPC: accounts on create, PENDING while billing is down, retries after."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from billing.client import BillingClient
from pms import process
from pms.embedded import libpq_dsn
from pms.settings import Settings
from tests.api.patient.conftest import Api, new_patient_body, patient_settings, start_patient
from tests.fixtures.servers import ServerSet
from tests.fixtures.services import ServiceProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _orphan_accounts(settings: Settings) -> set[str]:
    """Billing accounts whose patient does not exist (the databases are separate: compared here).

    Counting all accounts would race the retry worker, which opens accounts for patients other
    tests left PENDING in the shared database.
    """
    with psycopg.connect(libpq_dsn(settings.database_url_for("billing"))) as conn:
        accounts = {str(row[0]) for row in conn.execute("SELECT patient_id FROM billing_accounts")}
    with psycopg.connect(libpq_dsn(settings.database_url_for("patients"))) as conn:
        patients = {str(row[0]) for row in conn.execute("SELECT id FROM patients WHERE id = ANY(%s::uuid[])",
                                                        (list(accounts),))}
    return accounts - patients


def test_billing_outage_leaves_patients_pending_until_the_retry_worker_opens_one_account_each(
    servers: ServerSet, start_service: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    settings: Settings = patient_settings(servers)
    billing = start_service("billing", settings)
    patient_svc = start_patient(settings, tmp_path)
    try:
        with Api(settings, patient_svc.base_url).client() as client:
            online = client.post("/patients", json=new_patient_body())
            assert online.status_code == 201
            assert online.json()["billingStatus"] == "ACTIVE" and online.json()["billingAccountId"]
            assert online.json()["version"] == 1  # the account was opened inside the create

            # A taken email is a 409 decided before billing is called: no account is opened for it.
            orphans_before = _orphan_accounts(settings)
            taken = client.post("/patients", json=new_patient_body(email=online.json()["email"].upper()))
            assert taken.status_code == 409 and taken.json()["errors"] == {"email": "Already used by another patient"}
            assert _orphan_accounts(settings) == orphans_before

            billing.stop()
            created = []
            token = uuid.uuid4().hex[:8]
            for i in range(100):
                response = client.post("/patients", json=new_patient_body(name=f"Unbilled {token} {i}"))
                assert response.status_code == 201, response.text
                assert response.json()["billingStatus"] == "PENDING"
                assert response.json()["billingAccountId"] is None
                created.append(response.json()["id"])

            billing = start_service("billing", settings)

            def billed() -> list[dict[str, Any]]:
                return client.get("/patients", params={"q": token, "limit": 500}).json()

            process.wait_until(lambda: all(p["billingStatus"] == "ACTIVE" for p in billed()), timeout=60,
                               interval=0.2, message="every patient billed")
            patients = billed()
            assert sorted(p["id"] for p in patients) == sorted(created)
        accounts = [p["billingAccountId"] for p in patients]
        assert len(set(accounts)) == 100 and all(accounts)
        assert all(p["version"] == 2 for p in patients)  # activation is a change: new version + event
        with BillingClient(billing.address) as billing_client:
            for patient in patients[:: 10]:
                account = billing_client.get_account(patient_id=patient["id"], timeout=5)
                assert account is not None and account.account_id == patient["billingAccountId"]
            # Idempotent: asking again returns the same account, never a second one.
            again = billing_client.create_account(patient_id=patients[0]["id"], name="x", email="x@example.com",
                                                  timeout=5)
            assert again.account_id == patients[0]["billingAccountId"] and not again.created
        with Api(settings, patient_svc.base_url).client("ADMIN") as admin:
            trail = admin.get(f"/patients/{created[0]}/audit").json()
        assert [(e["action"], e["actor"], e["fields"]) for e in trail][-1] == (
            "update", "system:billing-retry", ["billingAccountId", "billingStatus"])
    finally:
        patient_svc.stop()


def test_stuck_billing_costs_one_deadline_then_creates_stay_fast(servers: ServerSet, tmp_path: Path) -> None:
    # Fault injection: a port that accepts TCP connections and never answers (a hung billing server).
    with socket.socket() as stuck:
        stuck.bind(("127.0.0.1", 0))
        stuck.listen(64)
        settings = patient_settings(servers, billing_timeout_s=1.0, billing_retry_initial_s=1.0,
                                    billing_retry_max_s=30.0)
        settings = settings.model_copy(update={"billing": settings.billing.model_copy(
            update={"port": stuck.getsockname()[1]})})
        svc = start_patient(settings, tmp_path)
        try:
            with Api(settings, svc.base_url).client() as client:
                first = client.post("/patients", json=new_patient_body())
                assert first.status_code == 201 and first.json()["billingStatus"] == "PENDING"
                started = time.monotonic()
                statuses = [client.post("/patients", json=new_patient_body()).status_code for _ in range(10)]
                elapsed = time.monotonic() - started
        finally:
            svc.stop()
    assert statuses == [201] * 10
    # Without the breaker each create would wait for the 1 s deadline (>= 10 s in all).
    assert elapsed < 5.0, elapsed
