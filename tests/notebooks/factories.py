"""Synthetic analytics rows, consistent the way the pipeline keeps them, for helper/export tests.

``analytics_rows`` derives facts and every aggregate from one list of synthetic patients
exactly as docs/readme/analytics.md defines them, so a notebook's consistency checks hold
on this data unless a test breaks them on purpose. No names, emails or addresses: the
analytics tables never hold any.
"""

from __future__ import annotations

import hashlib
import random
import uuid
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, insert, text

from pms import db
from pms.settings import Settings
from stream_processing import models as analytics_models

TABLES = ("patient_facts", "daily_registrations", "demographics", "geography", "billing_status_counts",
          "pipeline_partitions", "dead_letters")
CITIES = ("London", "Leeds", "Bristol", "York", "")
GENDERS = ("female", "male", "other", "unknown")


def migrate_analytics(settings: Settings) -> Engine:
    """Migrate the analytics database and return an app-role engine (the pipeline's privileges)."""
    db.migrate(settings, "analytics")
    return db.make_engine(settings.database_url_for("analytics"), pool_size=1, max_overflow=1)


def reset_analytics(engine: Engine) -> None:
    """Empty every analytics table (the session's database is shared by test modules)."""
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE " + ", ".join(TABLES)))
        conn.execute(text(
            "UPDATE pipeline_status SET events_processed = 0, events_applied = 0, events_stale = 0, "
            "dead_letters = 0, last_event_at = NULL, last_commit_at = NULL, lag_messages = NULL, "
            "freshness_p50_ms = NULL, freshness_p99_ms = NULL, freshness_samples = 0"
        ))


def analytics_rows(*, patients: int, deleted: int = 0, seed: int = 7,
                   start: date = date(2026, 1, 5)) -> dict[str, list[dict[str, Any]]]:
    """Facts for ``patients`` synthetic patients (the first ``deleted`` removed) and their aggregates."""
    rng = random.Random(seed)
    now = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
    facts = []
    for index in range(patients):
        registered = start + timedelta(days=rng.randrange(0, 300))
        birth = date(rng.randrange(1935, 2024), rng.randrange(1, 13), rng.randrange(1, 29))
        unknown_birth = rng.random() < 0.05
        active = index >= deleted
        facts.append({
            "patient_id": uuid.UUID(int=rng.getrandbits(128)),
            "version": 1 if active else 2,
            "active": active,
            "gender": rng.choice(GENDERS),
            "birth_date": None if unknown_birth else birth,
            "birth_year": None if unknown_birth else birth.year,
            "city": rng.choice(CITIES),
            "registered_date": registered,
            "billing_status": rng.choice(("ACTIVE", "ACTIVE", "PENDING")),
            "removed_on": None if active else registered + timedelta(days=3),
            "last_event_at": now,
            "updated_at": now,
        })
    live = [f for f in facts if f["active"]]
    registrations = Counter(f["registered_date"] for f in facts)
    removals = Counter(f["removed_on"] for f in facts if f["removed_on"] is not None)
    days = sorted(set(registrations) | set(removals))
    return {
        "patient_facts": facts,
        "daily_registrations": [{"day": d, "registrations": registrations[d], "removals": removals[d]} for d in days],
        "demographics": [{"birth_year": y, "gender": g, "patients": n}
                         for (y, g), n in Counter((f["birth_year"], f["gender"]) for f in live).items()],
        "geography": [{"city": c, "patients": n} for c, n in Counter(f["city"] for f in live).items()],
        "billing_status_counts": [{"billing_status": s, "patients": n}
                                  for s, n in Counter(f["billing_status"] for f in live).items()],
    }


def dead_letter(offset: int, reason: str = "not a PatientEvent") -> dict[str, Any]:
    raw = f"garbage-{offset}".encode()
    return {"topic": "patient", "partition": 0, "kafka_offset": offset, "reason": reason, "raw": raw,
            "raw_digest": hashlib.md5(raw, usedforsecurity=False).hexdigest()}


def load(engine: Engine, rows: dict[str, list[dict[str, Any]]], *, dead_letters: int = 0,
         events: int | None = None) -> None:
    """Write ``rows`` (and ``dead_letters`` bad messages, a pipeline status) in one transaction."""
    facts = rows["patient_facts"]
    with engine.begin() as conn:
        for name, table_rows in rows.items():
            if table_rows:
                conn.execute(insert(analytics_models.metadata.tables[name]), table_rows)
        if dead_letters:
            conn.execute(insert(analytics_models.dead_letters), [dead_letter(i) for i in range(dead_letters)])
        applied = sum(int(f["version"]) for f in facts)
        conn.execute(
            text("UPDATE pipeline_status SET events_processed = :processed, events_applied = :applied, "
                 "dead_letters = :dead, last_event_at = :at, last_commit_at = :at, lag_messages = 0, "
                 "freshness_p50_ms = 40, freshness_p99_ms = 180, freshness_samples = :applied WHERE id = 1"),
            {"processed": events if events is not None else applied + dead_letters, "applied": applied,
             "dead": dead_letters, "at": datetime(2026, 11, 20, 12, 0, 1, tzinfo=UTC)},
        )
        conn.execute(insert(analytics_models.pipeline_partitions), [
            {"topic": "patient", "partition": p, "next_offset": 10 * p, "high_watermark": 10 * p, "lag": 0,
             "consumer": "test:1"} for p in range(3)
        ])
