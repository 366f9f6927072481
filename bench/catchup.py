"""Catch-up: how long until analytics are whole again after the embedded broker restarts empty.

N patients are bulk-seeded (``--patients N``, default 20,000; issue 5 asks for 1,000,000), the
patient service and the pipeline fill analytics from empty (the baseline, same run), then the
Tansu broker is stopped and started again -- it forgets topics and offsets (DESIGN.md section
5). The relay notices the reset and republishes the outbox; the pipeline re-reads it and skips
every event as already applied. Measured: broker restart -> pipeline has processed all N
republished events, and the analytics tables are checked to be exactly what they were.
"""

from __future__ import annotations

import time

from api.patient import seed as patient_seed
from bench.harness import CURRENT, OPTIONS, Report, Row, pg_connect, pipeline_processed, services
from pms import process
from pms.settings import Settings

DEFAULT_PATIENTS = 20_000
_SNAPSHOT = """
SELECT (SELECT count(*) FROM patient_facts WHERE active),
       (SELECT coalesce(sum(patients), 0) FROM geography),
       (SELECT coalesce(sum(patients), 0) FROM demographics),
       (SELECT coalesce(sum(registrations), 0) FROM daily_registrations),
       (SELECT md5(string_agg(city || ':' || patients, ',' ORDER BY city)) FROM geography)
"""


def run(settings: Settings, report: Report) -> None:
    patients = int(OPTIONS.get("patients") or DEFAULT_PATIENTS)
    patient_seed.run(settings, patients=patients, seed=5, show_progress=False)
    with services(settings, ["patient", "pipeline"]):
        start = time.perf_counter()
        process.wait_until(lambda: pipeline_processed(settings) >= patients, timeout=120 + patients / 300,
                           interval=0.2, message="first fill of analytics")
        fill = time.perf_counter() - start
        with pg_connect(settings, "analytics") as conn:
            before = conn.execute(_SNAPSHOT).fetchone()
        processed = pipeline_processed(settings)

        broker = CURRENT["broker"]
        start = time.perf_counter()
        broker.stop()
        broker.start()
        process.wait_until(lambda: pipeline_processed(settings) >= processed + patients,
                           timeout=180 + patients / 200, interval=0.2, message="catch-up after the broker restart")
        catchup = time.perf_counter() - start
        with pg_connect(settings, "analytics") as conn:
            after = conn.execute(_SNAPSHOT).fetchone()
    exact = "tables unchanged" if after == before else f"TABLES CHANGED {before} -> {after}"
    report.add(Row("catch-up", f"broker restart -> analytics caught up, {patients} patients", catchup, "s",
                   baseline=fill, note=f"{exact}; baseline: first fill from empty (service start -> all applied)"))
    report.add(Row("catch-up", "republished events re-read per second", patients / catchup, "events/s"))
