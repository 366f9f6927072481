"""Read path: patient search and list p95 with 100,000 (``--big``: also 1,000,000) patients.

Patients come from the service's own bulk seed (``api.patient.seed``: COPY + outbox per batch).
Baselines measured in the same run:

- search: the service's own query (``repository.search``: count + one page) with the trigram GIN
  indexes, against the same query in a session where they cannot be used
  (``SET enable_bitmapscan = off``: GIN indexes are only reachable through bitmap scans, so this
  disables exactly them). Target (issue 9): <= 0.2x for selective searches of 3+ characters.
- list: the first page with the (created_at, id) index against the same query with index and
  bitmap scans off.
- HTTP: ``GET /patients?q=`` on the patient service against the same query in SQL (the ratio is
  the cost of HTTP, JWT, ORM and JSON on top of the database).
- analytics API (issue 5 target p95 <= 30 ms at 1,000,000): each endpoint against the same
  service's ``/health`` (the framework floor).

The EXPLAIN plans of the indexed and the unindexed search go into the results file.
"""

from __future__ import annotations

import os
import sys
import time

from sqlalchemy import text
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from api.patient import repository as patient_repository
from api.patient import seed as patient_seed
from api.patient import service as patient_service
from bench.harness import OPTIONS, Report, Row, http_load, percentile, pg_connect, pipeline_processed, services, timed
from pms import db, process
from pms.security import Role, encode_token
from pms.settings import Settings

BASE_SIZE = 100_000
BIG_SIZE = 1_000_000
ANALYTICS_PATHS = (
    ("summary", "/analytics/summary", None),
    ("registrations (default: 30 days by day)", "/analytics/registrations", None),
    ("registrations (11 years by month)", "/analytics/registrations", {"granularity": "month", "from": "2015-01-01",
                                                           "to": "2025-12-31"}),
    ("demographics", "/analytics/demographics", None),
    ("geography top 10", "/analytics/geography", {"top": 10}),
    ("freshness", "/analytics/freshness", None),
)


def sizes() -> list[int]:
    big = OPTIONS.get("big") or os.environ.get("PMS_BENCH_BIG") == "1"
    return [BASE_SIZE, BIG_SIZE] if big else [BASE_SIZE]


def run(settings: Settings, report: Report) -> None:
    engine = db.make_engine(settings.database_url_for("patients"), pool_size=1, max_overflow=0)
    seeded = 0
    try:
        for size in sizes():
            label = f"{size // 1000}k"
            start = time.perf_counter()
            patient_seed.run(settings, patients=size - seeded, seed=42 + seeded, show_progress=False)
            seconds = time.perf_counter() - start
            report.add(Row("read path", f"bulk seed rate to {label}", (size - seeded) / seconds, "patients/s",
                           note="api.patient.seed (COPY + outbox + audit per 10k batch)"))
            previous, seeded = seeded, size
            with pg_connect(settings, "patients") as conn:
                conn.execute("ANALYZE patients")
            terms = _search_terms(engine)
            with Session(engine) as session:
                fresh = timed(lambda s=session, q=terms["surname"]: _search(s, q), repeat=10, warmup=0)
            with pg_connect(settings, "patients") as conn:
                # The bulk COPY leaves the trigram entries in GIN's pending list until a vacuum merges it.
                conn.execute("VACUUM (ANALYZE) patients")
            with Session(engine) as session:
                vacuumed = timed(lambda s=session, q=terms["surname"]: _search(s, q), repeat=10, warmup=0)
            report.add(Row("read path", f"search p95 {label} right after the bulk seed", percentile(fresh, 95), "ms",
                           baseline=percentile(vacuumed, 95),
                           note="baseline: same search after VACUUM (GIN pending list merged)"))
            sql_p95 = _sql_search(engine, report, label=label, terms=terms, size=size)
            _sql_list(engine, report, label=label, size=size)
            _http(settings, report, label=label, size=size, new=size - previous, terms=terms, sql_p95=sql_p95)
    finally:
        engine.dispose()


def _search_terms(engine) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Selective terms taken from the data itself, plus one broad 3-character term for contrast."""
    with Session(engine) as session:
        name = session.execute(text("SELECT name FROM patients ORDER BY mrn OFFSET 777 LIMIT 1")).scalar_one()
        surname = name.split()[-1]
        # The rarest 3-character window of the surname that still matches something.
        counts = {}
        for i in range(max(1, len(surname) - 2)):
            window = surname[i:i + 3].lower()
            counts[window] = session.execute(
                text("SELECT count(*) FROM patients WHERE name ILIKE :p OR email ILIKE :p"),
                {"p": f"%{window}%"}).scalar_one()
        rare3 = min(counts, key=lambda w: counts[w])
    return {"surname": surname, "3 chars (rarest of surname)": rare3, "email fragment": ".42.4321@",
            "3 chars broad ('son')": "son"}


def _search(session: Session, q: str) -> None:
    """The service's own search (phone normalisation included), as the router calls it."""
    patient_service.search(session=session, q=q, limit=50, offset=0)


def _sql_search(engine, report: Report, *, label: str, terms: dict[str, str], size: int  # type: ignore[no-untyped-def]
                ) -> dict[str, float]:
    """Indexed vs unindexed p95 of the service's search query; returns the indexed p95 per term."""
    indexed_repeat, plain_repeat = (40, 8) if size <= BASE_SIZE else (20, 3)
    result = {}
    for kind, q in terms.items():
        with Session(engine) as session:
            _replan_every_time(session)
            matches = patient_repository.search(session, q=q, phone=None, limit=1, offset=0)[1]
            indexed = timed(lambda q=q, s=session: _search(s, q), repeat=indexed_repeat)
            plan_indexed = _explain(session, q)
            session.execute(text("SET enable_bitmapscan = off"))
            plain = timed(lambda q=q, s=session: _search(s, q), repeat=plain_repeat, warmup=1)
            plan_plain = _explain(session, q)
            session.execute(text("RESET enable_bitmapscan"))
        selective = not kind.endswith("broad ('son')")
        report.add(Row("read path", f"search p95 {label}, {kind} ({matches} hits)", percentile(indexed, 95), "ms",
                       baseline=percentile(plain, 95), target="<= 0.2x" if selective else "",
                       note="baseline: same query, trigram indexes unusable (enable_bitmapscan off)"))
        result[kind] = percentile(indexed, 95)
        if kind == "surname":
            report.section(f"EXPLAIN search count {label}, q=<surname>, trigram indexes usable", plan_indexed)
            report.section(f"EXPLAIN search count {label}, q=<surname>, enable_bitmapscan off", plan_plain)
    return result


def _replan_every_time(session: Session) -> None:
    """Plan each execution with the planner settings of the moment.

    psycopg prepares a statement from its 5th execution, and PostgreSQL may then keep one generic
    plan for it; a later ``SET enable_bitmapscan = off`` does not invalidate that plan. At 1M the
    "without the trigram index" baseline silently reused the indexed plan (22 ms instead of
    ~900 ms, seen in a run of this session); forcing custom plans keeps the two sides honest.
    """
    session.execute(text("SET plan_cache_mode = force_custom_plan"))


def _explain(session: Session, q: str) -> str:
    condition = patient_repository.search_condition(q, phone=None)
    statement = patient_repository.count_statement(condition)
    sql = str(statement.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
    sql = sql.replace("%%", "%")  # the compiler escapes % for a DBAPI that is not given parameters here
    rows = session.execute(text(f"EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY ON) {sql}")).scalars().all()
    # The term itself is a (synthetic) name: keep it out of the published plan.
    return "\n".join(rows).replace(q, "<q>").replace(q.lower(), "<q>").replace(q.upper(), "<q>")


def _sql_list(engine, report: Report, *, label: str, size: int) -> None:  # type: ignore[no-untyped-def]
    repeat = 30 if size <= BASE_SIZE else 10
    with Session(engine) as session:
        _replan_every_time(session)
        indexed = timed(lambda: _search(session, ""), repeat=repeat)
        session.execute(text("SET enable_indexscan = off"))
        session.execute(text("SET enable_bitmapscan = off"))
        session.execute(text("SET enable_indexonlyscan = off"))
        plain = timed(lambda: _search(session, ""), repeat=max(3, repeat // 3), warmup=1)
        session.execute(text("RESET ALL"))
    report.add(Row("read path", f"list page 1 p95 {label} (count + 50 rows)", percentile(indexed, 95), "ms",
                   baseline=percentile(plain, 95), note="baseline: index scans off"))


def _http(settings: Settings, report: Report, *, label: str, size: int, new: int, terms: dict[str, str],
          sql_p95: dict[str, float]) -> None:
    token = encode_token(settings, sub="bench@pms.local", role=Role.ADMIN, ttl_s=3600)
    headers = {"Authorization": f"Bearer {token}"}
    start = time.perf_counter()
    with services(settings, ["patient", "pipeline", "analytics"]):
        patients_url = settings.patient.base_url + "/patients"
        for kind in ("surname", "email fragment"):
            load = http_load(patients_url, headers=headers, total=60, params={"q": terms[kind]})
            report.add(Row("read path", f"GET /patients?q= p95 {label}, {kind}", load.p95, "ms",
                           baseline=sql_p95[kind], note=f"errors {load.errors}; baseline: same query in SQL"))
        load = http_load(patients_url, headers=headers, total=60, params={"limit": 50})
        report.add(Row("read path", f"GET /patients (page 1) p95 {label}", load.p95, "ms",
                       note=f"errors {load.errors}"))

        # Analytics must hold every seeded patient before its endpoints are measured.
        process.wait_until(lambda: pipeline_processed(settings) >= size, timeout=60 + size / 500, interval=0.5,
                           message=f"pipeline to process {size} events")
        fill = time.perf_counter() - start
        # Only the patients seeded since the last size are new to the relay and the pipeline.
        report.add(Row("read path", f"analytics filled up to {label}: new events applied", new / fill, "events/s",
                       note=f"{new} new events; services start -> relay -> broker -> pipeline -> analytics"))
        analytics = settings.analytics.base_url
        floor = http_load(analytics + "/health", headers=headers, total=100)
        for name, path, params in ANALYTICS_PATHS:
            load = http_load(analytics + path, headers=headers, total=100, params=params)
            report.add(Row("read path", f"analytics {name} p95 {label}", load.p95, "ms", baseline=floor.p95,
                           target="<= 30 ms (issue 5)" if size >= BIG_SIZE else "",
                           note=f"errors {load.errors}; baseline: /health of the same service"))
    print(f"  read path {label}: services stopped", file=sys.stderr)
