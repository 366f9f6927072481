"""Catch-up: how long until analytics are whole again after the embedded broker restarts empty.

N patients are bulk-seeded (``--patients N``, default 20,000; issue 5 asks for 1,000,000), the
patient service and the pipeline fill analytics from empty (the baseline, same run). Then, as a
restart of ``pms up`` does, they stop, the Tansu broker restarts -- empty: it forgets topics and
committed offsets (DESIGN.md section 5) -- and they start again. The relay notices the reset and
republishes the outbox; the pipeline re-reads it from the start and skips every event as already
applied. Measured: services ready -> the pipeline has processed all N republished events; the
analytics tables are checked to be exactly what they were.

(A broker restart under a *running* pipeline is different: the consumer keeps its in-memory
positions, and since the republished log has the same length per partition, it re-reads
nothing -- which is right, analytics already hold every event.)
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

    # As a restart of `pms up` does: the broker comes back empty, services start again.
    broker = CURRENT["broker"]
    broker.stop()
    broker.start()
    with services(settings, ["patient", "pipeline"]):
        start = time.perf_counter()
        try:
            process.wait_until(lambda: pipeline_processed(settings) >= processed + patients,
                               timeout=120 + patients / 200, interval=0.2,
                               message="catch-up after the broker restart")
        except TimeoutError:
            report.section("catch-up FAILED: state after the timeout", _diagnose(settings, processed))
            report.add(Row("catch-up", f"restart with an empty broker -> caught up, {patients} patients",
                           float("nan"), "s", baseline=fill, note="NOT caught up within the deadline"))
            return
        catchup = time.perf_counter() - start
        with pg_connect(settings, "analytics") as conn:
            after = conn.execute(_SNAPSHOT).fetchone()
    exact = "tables unchanged" if after == before else f"TABLES CHANGED {before} -> {after}"
    report.add(Row("catch-up", f"restart with an empty broker -> caught up, {patients} patients", catchup, "s",
                   baseline=fill, note=f"{exact}; both from services ready -> every event processed; "
                                       "baseline: first fill of empty analytics"))
    report.add(Row("catch-up", "republished events re-read per second", patients / catchup, "events/s"))


def _diagnose(settings: Settings, processed_before: int) -> str:
    """Counters and log tails that say which side (relay or pipeline) did not catch up."""
    lines = [f"pipeline events_processed before the restart: {processed_before}, now: {pipeline_processed(settings)}"]
    with pg_connect(settings, "patients") as conn:
        unsent, sent = conn.execute("SELECT count(*) FILTER (WHERE sent_at IS NULL), count(*) FILTER"
                                    " (WHERE sent_at IS NOT NULL) FROM patient_outbox").fetchone()
        lines.append(f"outbox: unsent {unsent}, sent {sent}")
        state = conn.execute("SELECT partition, high_watermark FROM patient_relay_state").fetchall()
        lines.append(f"relay state (partition, high watermark): {state}")
    for name in ("patient", "pipeline"):
        log = settings.logs_dir / f"{name}.log"
        tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else ["(no log)"]
        lines += [f"--- {name}.log (last lines)", *tail]
    return "\n".join(lines)
