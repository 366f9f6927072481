"""The analytics API on the real analytics database, through the analyst (read-only) role."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import DBAPIError

from pms.security import Role, encode_token
from pms.settings import Settings
from stream_processing import transforms
from stream_processing.sink import FreshnessWindow, Record, apply_records
from tests.fixtures.services import ServiceProcess
from tests.stream_processing.helpers import Event, PatientState, history

pytestmark = pytest.mark.integration

TODAY = datetime.now(UTC).date()


def feed(engine: Engine, events: list[Event]) -> None:
    records = [Record("patient", 0, i, transforms.parse_event(e.raw())) for i, e in enumerate(events)]
    apply_records(engine, records=records, freshness=FreshnessWindow(size=100), watermarks=lambda t, p: len(events))


def patients(count: int, *, city: str = "Oslo", gender: str = "female", dob: str = "1980-05-05",
             registered: date = TODAY, billing: str = "ACTIVE") -> list[Event]:
    return [e for _ in range(count) for e in history(
        str(uuid.uuid4()), [PatientState(gender=gender, dob=dob, city=city, registered=registered.isoformat(),
                                         billing=billing)], start=datetime.now(UTC) - timedelta(seconds=5))]


@pytest.fixture
def auth(api_settings: Settings) -> Callable[[Role], dict[str, str]]:
    def headers(role: Role) -> dict[str, str]:
        return {"Authorization": f"Bearer {encode_token(api_settings, sub='someone@pms.local', role=role)}"}

    return headers


@pytest.fixture
def population(analytics: Engine) -> Engine:
    """40 in Oslo (female, born 1980), 12 in Bergen (male, 1950), 3 in Tromsø (other, 2015),
    2 in Bodø deleted today; 5 of the Oslo ones registered 10 days ago."""
    events = patients(35, city="Oslo") + patients(5, city="Oslo", registered=TODAY - timedelta(days=10))
    events += patients(12, city="Bergen", gender="male", dob="1950-01-01", billing="PENDING")
    events += patients(3, city="Tromsø", gender="other", dob="2015-03-03")
    removed = [e for e in patients(2, city="Bodø")]
    events += removed
    events += [Event(e.patient_id, 2, "DELETED", e.state, datetime.now(UTC)) for e in removed]
    feed(analytics, events)
    return analytics


def test_every_route_refuses_a_missing_or_forged_token(client: TestClient, population: Engine) -> None:
    for path in ("summary", "registrations", "demographics", "geography", "billing", "freshness"):
        response = client.get(f"/analytics/{path}")
        assert response.status_code == 401
        assert response.json() == {"message": "Missing bearer token", "errors": {}}
        forged = client.get(f"/analytics/{path}", headers={"Authorization": "Bearer not.a.token"})
        assert forged.status_code == 401


def test_summary_for_staff_is_exact(client: TestClient, auth, population: Engine) -> None:  # type: ignore[no-untyped-def]
    body = client.get("/analytics/summary", headers=auth(Role.STAFF)).json()
    assert body["activePatients"] == {"value": 55, "suppressed": False}
    assert body["newToday"]["value"] == 52  # 35 + 12 + 3 + the 2 removed (they did register today)
    assert body["new7d"]["value"] == 52
    assert body["new30d"]["value"] == 57
    assert body["removedTotal"] == {"value": 2, "suppressed": False}
    assert body["suppression"] == {"applied": False, "threshold": 10}
    with population.connect() as conn:
        as_of = conn.execute(text("SELECT last_commit_at FROM pipeline_status")).scalar_one()
    assert datetime.fromisoformat(body["asOf"]) == as_of


def test_summary_for_analysts_hides_small_counts(client: TestClient, auth, population: Engine) -> None:  # type: ignore[no-untyped-def]
    body = client.get("/analytics/summary", headers=auth(Role.ANALYST)).json()
    assert body["activePatients"]["value"] == 55
    assert body["removedTotal"] == {"value": None, "suppressed": True}
    assert body["suppression"]["applied"] is True


def test_demographics_bands_and_suppression(client: TestClient, auth, population: Engine) -> None:  # type: ignore[no-untyped-def]
    staff = client.get("/analytics/demographics", headers=auth(Role.ADMIN)).json()
    year = TODAY.year
    cells = {(c["ageBand"], c["gender"]): c["patients"] for c in staff["cells"]}
    assert cells == {("35-49" if year - 1980 < 50 else "50-64", "female"): 40, ("65-79", "male"): 12,
                     ("0-17", "other"): 3}
    assert staff["total"]["value"] == 55 and staff["referenceYear"] == year
    analyst = client.get("/analytics/demographics", headers=auth(Role.ANALYST)).json()
    hidden = {(c["ageBand"], c["gender"]) for c in analyst["cells"] if c["suppressed"]}
    # 3 is hidden, and so is the next smallest (12) so that 55 - 40 does not give the 3 back.
    assert hidden == {("0-17", "other"), ("65-79", "male")}
    assert all(c["patients"] is None for c in analyst["cells"] if c["suppressed"])
    assert analyst["total"]["value"] == 55


def test_geography_top_and_no_differencing_of_hidden_cities(client: TestClient, auth, population: Engine) -> None:  # type: ignore[no-untyped-def]
    staff = client.get("/analytics/geography?top=2", headers=auth(Role.STAFF)).json()
    assert [(c["city"], c["patients"]) for c in staff["cities"]] == [("Oslo", 40), ("Bergen", 12)]
    assert staff["other"]["value"] == 3
    answers = [client.get(f"/analytics/geography?top={n}", headers=auth(Role.ANALYST)).json() for n in (1, 2, 3, 10)]
    for body in answers:
        assert "Tromsø" not in [c["city"] for c in body["cities"]]
        listed = sum(c["patients"] for c in body["cities"])
        assert listed + body["other"]["value"] == body["total"]["value"] == 55
    assert [c["city"] for c in answers[-1]["cities"]] == ["Oslo"]  # Bergen hidden as the complement
    assert {a["other"]["value"] for a in answers} == {15}  # the same for every top: nothing to subtract


def test_geography_rejects_bad_top(client: TestClient, auth, population: Engine) -> None:  # type: ignore[no-untyped-def]
    for bad in ("0", "-1", "abc", "100000"):
        response = client.get(f"/analytics/geography?top={bad}", headers=auth(Role.STAFF))
        assert response.status_code == 400
        assert "top" in response.json()["errors"]


def test_billing_counts(client: TestClient, auth, population: Engine) -> None:  # type: ignore[no-untyped-def]
    body = client.get("/analytics/billing", headers=auth(Role.STAFF)).json()
    assert {s["billingStatus"]: s["patients"] for s in body["statuses"]} == {"ACTIVE": 43, "PENDING": 12}


def test_registrations_fill_gaps_and_roll_up(client: TestClient, auth, population: Engine) -> None:  # type: ignore[no-untyped-def]
    start = TODAY - timedelta(days=12)
    body = client.get(f"/analytics/registrations?from={start}&to={TODAY}", headers=auth(Role.STAFF)).json()
    assert len(body["buckets"]) == 13
    by_day = {b["period"]: (b["registrations"], b["removals"]) for b in body["buckets"]}
    assert by_day[str(TODAY)] == (52, 2)
    assert by_day[str(TODAY - timedelta(days=10))] == (5, 0)
    assert by_day[str(TODAY - timedelta(days=1))] == (0, 0)
    assert body["totalRegistrations"]["value"] == 57
    month = client.get(f"/analytics/registrations?from={TODAY.replace(day=1)}&to={TODAY}&granularity=month",
                       headers=auth(Role.STAFF)).json()
    assert [b["period"] for b in month["buckets"]] == [str(TODAY.replace(day=1))]
    week = client.get(f"/analytics/registrations?from={start}&to={TODAY}&granularity=week",
                      headers=auth(Role.STAFF)).json()
    assert sum(b["registrations"] for b in week["buckets"]) == 57
    assert all(date.fromisoformat(b["period"]).weekday() == 0 for b in week["buckets"])


def test_registrations_for_analysts_hide_small_buckets_and_the_total(
    client: TestClient, auth, population: Engine  # type: ignore[no-untyped-def]
) -> None:
    start = TODAY - timedelta(days=12)
    body = client.get(f"/analytics/registrations?from={start}&to={TODAY}", headers=auth(Role.ANALYST)).json()
    by_day = {b["period"]: b for b in body["buckets"]}
    assert by_day[str(TODAY - timedelta(days=10))]["registrationsSuppressed"] is True
    assert by_day[str(TODAY)]["removals"] is None
    assert body["totalRegistrations"] == {"value": None, "suppressed": True}


def test_registrations_reject_bad_input(client: TestClient, auth, population: Engine) -> None:  # type: ignore[no-untyped-def]
    cases = {
        f"from={TODAY}&to={TODAY - timedelta(days=1)}": "from",
        "from=not-a-date": "from",
        "granularity=hour": "granularity",
        "from=1900-01-01&to=2026-01-01": "from",
    }
    for query, field in cases.items():
        response = client.get(f"/analytics/registrations?{query}", headers=auth(Role.STAFF))
        assert response.status_code == 400, query
        assert field in response.json()["errors"], query


def test_freshness_reports_the_pipeline(client: TestClient, auth, population: Engine) -> None:  # type: ignore[no-untyped-def]
    body = client.get("/analytics/freshness", headers=auth(Role.ANALYST)).json()
    assert body["eventsProcessed"] == 59 and body["eventsApplied"] == 59
    assert body["samples"] == 59 and 0 < body["p50Ms"] <= body["p99Ms"] < 60_000
    assert body["partitions"] == [{"topic": "patient", "partition": 0, "nextOffset": 59, "highWatermark": 59,
                                   "lag": 0, "updatedAt": body["partitions"][0]["updatedAt"]}]


def test_the_pipeline_counts_as_running_while_it_beats(  # type: ignore[no-untyped-def]
    client: TestClient, auth, population: Engine,
) -> None:
    """Lag and p99 keep their last values after a pipeline stops; the heartbeat says whether they are current.

    The beat is judged by the interval the pipeline wrote with it (not the API's own setting) and by the
    database's clock, which stamped it."""
    def pipeline(path: str) -> dict[str, object]:
        return client.get(f"/analytics/{path}", headers=auth(Role.ANALYST)).json()["pipeline"]

    assert pipeline("freshness") == {"running": False, "heartbeatAt": None}  # never beat (fed without a pipeline)
    for interval, age_s, expected in ((5.0, 0.0, True), (5.0, 13.0, True), (5.0, 17.0, False), (60.0, 170.0, True)):
        with population.begin() as conn:
            conn.execute(text("UPDATE pipeline_status SET heartbeat_at = now() - make_interval(secs => :age),"
                              " heartbeat_interval_s = :interval"), {"age": age_s, "interval": interval})
        for path in ("freshness", "summary"):
            state = pipeline(path)
            assert state["running"] is expected, (path, interval, age_s)
            assert state["heartbeatAt"] is not None


def test_empty_analytics_answer_with_zeros(client: TestClient, auth, analytics: Engine) -> None:  # type: ignore[no-untyped-def]
    body = client.get("/analytics/summary", headers=auth(Role.ANALYST)).json()
    assert body["activePatients"] == {"value": 0, "suppressed": False}
    assert client.get("/analytics/demographics", headers=auth(Role.ANALYST)).json()["cells"] == []


def test_the_analyst_role_cannot_write(api_settings: Settings, analytics: Engine) -> None:
    engine = create_engine(api_settings.analyst_url())
    try:
        with engine.begin() as conn, pytest.raises(DBAPIError):
            conn.execute(text("DELETE FROM geography"))
    finally:
        engine.dispose()


@pytest.mark.slow
def test_served_as_the_registered_analytics_process(
    settings: Settings, population: Engine, start_service: Callable[..., ServiceProcess]
) -> None:
    import httpx

    service = start_service("analytics", settings)
    token = encode_token(settings, sub="a@pms.local", role=Role.ANALYST)
    response = httpx.get(f"{service.base_url}/analytics/geography", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200 and response.json()["total"]["value"] == 55
    assert httpx.get(f"{service.base_url}/openapi.json").json()["paths"].keys() >= {
        "/analytics/summary", "/analytics/registrations", "/analytics/demographics", "/analytics/geography",
        "/analytics/freshness"}
