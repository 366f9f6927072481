"""Acceptance (issue 7): patients through the real write path -> pipeline -> notebooks == analytics API.

Billing, the patient service, the pipeline and the analytics API run as real `pms serve`
processes on the session's PostgreSQL and broker. Patients are registered, updated and
deleted over HTTP; once the pipeline has applied every event, each notebook runs headless in
a real kernel (with only the analyst login in its environment) and the numbers it reports
must equal the analytics API's answers for the same data, and the truth we seeded.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, text

from pms import notebook as pms_notebook
from pms import process
from pms.security import encode_token
from pms.settings import Settings
from tests.fixtures.servers import ServerSet, server_data_dir, start_servers
from tests.notebooks import factories

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CITIES = ["Oslo", "Bergen", "Oslo", "Tromso", None, "Bergen", "Oslo"]
GENDERS = ["female", "male", "female", "other", None, "male"]


@pytest.fixture(scope="module")
def servers() -> Iterator[ServerSet]:
    """A private PostgreSQL + broker for this module.

    The session's servers carry other modules' outbox history and broker restarts: a fresh relay here
    would republish that history into this test's pipeline, and the counts it checks would include it.
    """
    with server_data_dir(prefix="pms-nb-acceptance-") as data_dir, start_servers(data_dir) as private:
        yield private


def stack_settings(servers: ServerSet) -> Settings:
    """Session servers, free ports, a private topic and consumer group, no demo patients."""
    port = process.free_port
    kafka = servers.settings.kafka.model_dump()
    kafka["topic"] = f"patient-nb-{uuid.uuid4().hex[:8]}"
    return servers.make_settings(
        patient={"port": port(), "seed_demo_data": False, "outbox_poll_interval_s": 0.05,
                 "billing_timeout_s": 1.0},
        billing={"port": port(), "metrics_port": port()},
        pipeline={"port": port(), "consumer_group": f"analytics-nb-{uuid.uuid4().hex[:8]}",
                  "batch_timeout_s": 0.1},
        analytics={"port": port()},
        kafka=kafka,
    )


def body(index: int, today: date) -> dict[str, Any]:
    """A patient registered ``index * 3`` days ago (some today), varied age, gender and city."""
    data: dict[str, Any] = {
        "name": f"Acceptance Patient {index}",
        "email": f"nb-{index}-{uuid.uuid4().hex[:8]}@example.com",
        "address": f"{index} Test Road",
        "dateOfBirth": date(1940 + (index * 7) % 80, 1 + index % 12, 1 + index % 27).isoformat(),
        "registeredDate": (today - timedelta(days=index * 3)).isoformat(),
    }
    if GENDERS[index % len(GENDERS)]:
        data["gender"] = GENDERS[index % len(GENDERS)]
    if CITIES[index % len(CITIES)]:
        data["city"] = CITIES[index % len(CITIES)]
    return data


@pytest.fixture
def analytics_engine(servers: ServerSet) -> Iterator[Engine]:
    """The session's analytics database (shared with other modules), emptied before and after."""
    engine = factories.migrate_analytics(servers.settings)
    factories.reset_analytics(engine)
    yield engine
    factories.reset_analytics(engine)  # runs after start_service has stopped the pipeline
    engine.dispose()


def test_notebooks_match_the_analytics_api(servers: ServerSet, analytics_engine: Engine,
                                           start_service: Callable[..., Any]) -> None:
    settings = stack_settings(servers)
    engine = analytics_engine
    start_service("billing", settings)
    patient = start_service("patient", settings, timeout=90)
    start_service("pipeline", settings, timeout=90)
    analytics_api = start_service("analytics", settings)

    today = datetime.now(UTC).date()
    staff = {"Authorization": f"Bearer {encode_token(settings, sub='nb-acceptance@clinic.test', role='STAFF')}"}
    created: list[dict[str, Any]] = []
    with httpx.Client(base_url=patient.base_url, headers=staff, timeout=30) as client:
        for index in range(24):
            response = client.post("/patients", json=body(index, today))
            assert response.status_code == 201, f"{response.status_code} {response.text}\n{patient.log_tail()}"
            created.append(response.json())
        for moved in created[:3]:  # three patients move to Trondheim
            update = {k: moved[k] for k in ("name", "email", "address", "dateOfBirth")} | {"city": "Trondheim"}
            assert client.put(f"/patients/{moved['id']}", json=update).status_code == 200
        for gone in created[3:5]:
            assert client.delete(f"/patients/{gone['id']}").status_code == 204
    events = 24 + 3 + 2
    active = 24 - 2

    def caught_up() -> bool:
        with engine.connect() as conn:
            applied = conn.execute(text("SELECT events_applied FROM pipeline_status WHERE id = 1")).scalar_one()
            facts = conn.execute(text("SELECT count(*) FROM patient_facts WHERE active")).scalar_one()
        return applied == events and facts == active

    process.wait_until(caught_up, timeout=90, interval=0.2, message="the pipeline to apply every event")

    first = min(date.fromisoformat(p["registeredDate"]) for p in created)
    runs = {
        "registrations": {"start": first.isoformat(), "end": today.isoformat(), "granularity": "week"},
        "demographics": {"top_cities": 100},
        "data_quality": {},
    }
    with ThreadPoolExecutor(max_workers=len(runs)) as pool:
        futures = {name: pool.submit(pms_notebook.execute, pms_notebook.NOTEBOOK_DIR / f"{name}.ipynb", settings,
                                     parameters=params) for name, params in runs.items()}
        reports: dict[str, dict[str, Any]] = {}
        for name, future in futures.items():
            notebook, report = future.result(timeout=240)
            errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
            assert errors == [], name
            assert report is not None, name
            reports[name] = report

    admin = {"Authorization": f"Bearer {encode_token(settings, sub='nb-acceptance-admin', role='ADMIN')}"}
    with httpx.Client(base_url=analytics_api.base_url, headers=admin, timeout=30) as api:
        def get(path: str, **params: Any) -> dict[str, Any]:
            response = api.get(path, params=params)
            assert response.status_code == 200, response.text
            return response.json()

        summary = get("/analytics/summary")
        registrations = get("/analytics/registrations", **{"from": first.isoformat(), "to": today.isoformat(),
                                                            "granularity": "week"})
        demographics = get("/analytics/demographics")
        geography = get("/analytics/geography", top=100)
        freshness = get("/analytics/freshness")

    # Registrations: totals and every weekly bucket.
    reg = reports["registrations"]
    assert reg["total_registrations"] == registrations["totalRegistrations"]["value"] == 24
    assert reg["total_removals"] == registrations["totalRemovals"]["value"] == 2
    assert reg["periods"] == {b["period"]: b["registrations"] for b in registrations["buckets"]}
    assert reg["total_removals"] == summary["removedTotal"]["value"]

    # Demographics: the same active patients, by age band and by gender; cities.
    demo = reports["demographics"]
    assert demo["active_patients"] == demographics["total"]["value"] == summary["activePatients"]["value"] == active
    assert demo["as_of_year"] == demographics["referenceYear"]
    api_bands: Counter[str] = Counter()
    api_genders: Counter[str] = Counter()
    for cell in demographics["cells"]:
        api_bands[cell["ageBand"]] += cell["patients"]
        api_genders[cell["gender"]] += cell["patients"]
    assert demo["age_bands"] == dict(api_bands)
    assert {g: n for g, n in demo["by_gender"].items() if n} == dict(api_genders)
    assert demo["cities"] == {c["city"]: c["patients"] for c in geography["cities"]}
    assert geography["other"]["value"] == 0
    assert demo["cities"]["Trondheim"] == 3

    # Data quality: consistent, fresh, and the same pipeline figures as the API.
    quality = reports["data_quality"]
    assert quality["all_checks_pass"] is True, quality["checks"]
    assert quality["active_patients"] == active
    for key, api_key in (("events_processed", "eventsProcessed"), ("events_applied", "eventsApplied"),
                         ("events_stale", "eventsStale"), ("dead_letters_counter", "deadLetters"),
                         ("lag_messages", "lagMessages"), ("freshness_p50_ms", "p50Ms"),
                         ("freshness_p99_ms", "p99Ms")):
        assert quality[key] == freshness[api_key], key
    assert quality["events_applied"] == events
    assert quality["dead_letters"] == 0
