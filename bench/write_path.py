"""Write path: patients created per second through the gateway vs a bare FastAPI + psycopg insert.

Target (issue 9): gateway >= 0.5x of the bare endpoint at 16 in flight.

The creates are realistic patients (``pms seed``'s generator: Faker names, birth dates over a
century, 80% with a phone), as a clinic registers them. Until 2026-11-26 every bench patient had
one birth date and a name differing only by a number ("Bench Patient c16 123"): the worst case
of the duplicate check, which then ranks every earlier bench patient (2.8 ms of PostgreSQL per
create at ~1,300, measured with pg_stat_statements, against ~27 patients per birth date in a
clinic of a million). That case is still measured, as its own row.

The creates go into a clinic that already has patients (:data:`EXISTING` from the same generator,
with their billing accounts) and PostgreSQL statistics on them, as every running system has.
Starting from an empty table measured something else: the create pool's connections prepare the
create's read while the table is empty, PostgreSQL keeps that plan until autovacuum's first
ANALYZE (naptime 1 min, longer than the bench), and the read grew from 0.3 to 2 ms of PostgreSQL
per create over the first 2,000 creates; after an ANALYZE, 0.1 ms.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import httpx
import psutil
import psycopg

from api.auth.service import admin_password
from api.patient import seed as patient_seed
from api.patient.seed import PatientFaker
from bench.harness import LoadResult, Report, Row, cpu_per_request, cpu_seconds, merged, post_load, run_load, services
from pms import probe, process
from pms.embedded import libpq_dsn
from pms.settings import Settings

CONCURRENCY = (1, 16, 64)
#: Alternating bare / gateway rounds at 16 in flight (the target's level): one bare round of 400 creates
#: lasts under a second, so a single pair took its ratio from whichever second the box was busier.
ROUNDS_AT_16 = 3
#: Patients registered before the measured creates (see the module docstring).
EXISTING = 2_000
#: Processes whose CPU per create the bench reports at 16 in flight (children of this process).
CPU_SERVICES = ("patient", "billing", "gateway")
#: Seconds a create may take before it counts as an error (either client).
TIMEOUT_S = 30.0
#: The report's name for this process's own CPU while it sends the creates.
LOAD_GENERATOR = "load generator"


def _existing_clinic(settings: Settings) -> int:
    """Register :data:`EXISTING` patients, wait until the service has caught up with them (billing
    accounts opened by its retry worker, events published by its relay: neither may run during
    the measurement) and ANALYZE."""
    seeded = patient_seed.run(settings, patients=EXISTING, seed=1, show_progress=False)
    dsn = libpq_dsn(settings.database_url_for("patients"))

    def caught_up() -> bool:
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT (SELECT count(*) FROM patients WHERE billing_status = 'PENDING')"
                               " + (SELECT count(*) FROM patient_outbox WHERE sent_at IS NULL)").fetchone()
            return row is not None and row[0] == 0

    process.wait_until(caught_up, timeout=120, interval=0.5,
                       message="billing accounts and events of the existing patients")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ANALYZE patients")
    return seeded


def _patients(count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` realistic create bodies (made before the clock starts, so the client pays nothing)."""
    faker = PatientFaker(seed)
    return [faker.patient(i).model_dump(mode="json", by_alias=True, exclude_none=True) for i in range(count)]


def _near_identical(i: int, tag: str) -> dict[str, str]:
    """The duplicate check's worst case: one birth date, names differing only by a number."""
    return {
        "name": f"Bench Patient {tag}{i}",
        "email": f"bench.{tag}.{i}@example.org",
        "address": f"{i} Bench Street",
        "dateOfBirth": "1980-01-01",
        "registeredDate": "2024-01-01",
    }


def _login(settings: Settings) -> dict[str, str]:
    """Log in once through the gateway as the first admin (the password auth generated into the data dir)."""
    reply = httpx.post(settings.gateway.base_url + "/auth/login", timeout=30,
                       json={"email": settings.admin_email, "password": admin_password(settings)})
    reply.raise_for_status()
    return {"Authorization": f"Bearer {reply.json()['token']}"}


def _load(url: str, bodies: list[dict[str, Any]], headers: dict[str, str], concurrency: int) -> LoadResult:
    """Create ``bodies`` at ``url``: :func:`bench.harness.post_load`, or with ``PMS_BENCH_WRITE_CLIENT=threads``
    the httpx client in a thread per request in flight that this bench used until 2026-11-26 (for comparison:
    it costs the shared cores ~2 ms per request and held the bare endpoint to its speed)."""
    if os.environ.get("PMS_BENCH_WRITE_CLIENT", "asyncio") != "threads":
        return post_load(url, bodies, headers=headers, concurrency=concurrency, timeout_s=TIMEOUT_S)
    local = threading.local()
    clients: list[httpx.Client] = []

    def create(i: int) -> bool:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=TIMEOUT_S, headers=headers)
            clients.append(local.client)
        return local.client.post(url, json=bodies[i]).status_code == 201

    try:
        return run_load(create, total=len(bodies), concurrency=concurrency)
    finally:
        for client in clients:
            client.close()


def _own_cpu() -> float:
    """CPU seconds of this process: the load generator, during a load."""
    times = psutil.Process().cpu_times()
    return times.user + times.system


def run(settings: Settings, report: Report, *, total: int | None = None) -> None:
    total = total or int(os.environ.get("PMS_BENCH_WRITE_TOTAL", "400"))
    bare_port = process.free_port()
    bare = process.spawn([sys.executable, "-m", "bench.bare_app",
                          libpq_dsn(settings.database_url_for("patients")), str(bare_port)],
                         log_path=settings.logs_dir / "bare.log")
    bare_url = f"http://127.0.0.1:{bare_port}"
    try:
        with services(settings, ["billing", "auth", "patient", "gateway"]):
            process.wait_until(lambda: probe.http_ready(bare_url + "/ready"), timeout=30, message="bare app")
            existing = _existing_clinic(settings)
            report.add(Row("write path", "patients registered before the creates", existing, "patients",
                           note="same generator, billing accounts opened, ANALYZE"))
            headers = _login(settings)
            gateway = settings.gateway.base_url + "/api/patients"
            for concurrency in CONCURRENCY:
                rounds = ROUNDS_AT_16 if concurrency == 16 else 1
                bodies = _patients(total * rounds, seed=1000 + concurrency)  # never the existing patients (seed 1)
                measure_cpu = concurrency == 16
                bare_rounds: list[LoadResult] = []
                real_rounds: list[LoadResult] = []
                bare_cpu: dict[str, float] = {}
                real_cpu: dict[str, float] = {}
                for r in range(rounds):
                    batch = bodies[r * total:(r + 1) * total]
                    cpu0 = cpu_seconds(CPU_SERVICES) if measure_cpu else {}
                    bare_rounds.append(_load(bare_url + "/patients", batch, headers, concurrency))
                    cpu1 = cpu_seconds(CPU_SERVICES) if measure_cpu else {}
                    own = _own_cpu()
                    real_rounds.append(_load(gateway, batch, headers, concurrency))
                    own = _own_cpu() - own
                    cpu2 = cpu_seconds(CPU_SERVICES) if measure_cpu else {}
                    if measure_cpu:
                        for into, spent in ((bare_cpu, cpu_per_request(cpu0, cpu1, total)),
                                            (real_cpu, cpu_per_request(cpu1, cpu2, total))):
                            for key, ms in spent.items():
                                into[key] = into.get(key, 0.0) + ms / rounds
                        real_cpu[LOAD_GENERATOR] = real_cpu.get(LOAD_GENERATOR, 0.0) + own * 1000 / total / rounds
                base, real = merged(bare_rounds), merged(real_rounds)
                if measure_cpu:
                    bare_total = bare_cpu.get("bare app", 0.0) + bare_cpu.get("postgres", 0.0)
                    for key in (*CPU_SERVICES, "postgres"):
                        report.add(Row("write path", f"CPU per create @16: {key}", real_cpu.get(key, 0.0), "ms",
                                       note="psutil user+system over the gateway load"))
                    gateway_total = sum(real_cpu.get(key, 0.0) for key in (*CPU_SERVICES, "postgres"))
                    report.add(Row("write path", "CPU per create @16: services + postgres", gateway_total, "ms",
                                   baseline=bare_total, note="baseline: bare app + postgres over the bare load"))
                    report.add(Row("write path", f"CPU per create @16: {LOAD_GENERATOR} (context)",
                                   real_cpu[LOAD_GENERATOR], "ms",
                                   note="this process over the gateway load; it shares the cores with the servers"))
                per_round = ", ".join(f"{g.qps / b.qps:.2f}x" for b, g in zip(bare_rounds, real_rounds, strict=True)
                                      if b.qps)
                target = ">= 0.5x" if concurrency == 16 else ""
                report.add(Row("write path", f"creates/s via gateway @{concurrency}", real.qps, "req/s",
                               baseline=base.qps, target=target,
                               note=f"errors {real.errors}; baseline bare FastAPI+psycopg insert"
                                    + (f"; {rounds} alternating rounds of {total}: {per_round}" if rounds > 1 else "")))
                report.add(Row("write path", f"create p50 @{concurrency}", real.p50, "ms", baseline=base.p50))
                report.add(Row("write path", f"create p99 @{concurrency}", real.p99, "ms", baseline=base.p99))
                if concurrency == 16:
                    worst = _load(gateway, [_near_identical(i, "dup") for i in range(total)], headers, concurrency)
                    report.add(Row("write path", "creates/s via gateway @16, one birth date + near-identical names",
                                   worst.qps, "req/s", baseline=base.qps,
                                   note=f"errors {worst.errors}; the duplicate check's worst case"))
    finally:
        process.stop(bare)
