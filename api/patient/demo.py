"""Sample patients for the first embedded start (like the seed tutorial's data.sql)."""

from __future__ import annotations

import logging
from datetime import date

from sqlalchemy.orm import Session, sessionmaker

from api.patient import repository as patient_repository
from api.patient import service as patient_service
from api.patient.schemas import PatientCreate
from pms.settings import Mode, Settings

log = logging.getLogger(__name__)

DEMO_FLAG = "demo_seeded"
DEMO_ACTOR = "system:demo-data"

_DEMO = [
    ("John Doe", "john.doe@example.com", "123 Main St, Springfield", "1985-06-15", "2024-01-10", "male", "Springfield"),
    ("Jane Smith", "jane.smith@example.com", "456 Elm St, Shelbyville", "1990-09-23", "2023-12-01", "female",
     "Shelbyville"),
    ("Alice Johnson", "alice.johnson@example.com", "789 Oak St, Capital City", "1978-03-12", "2022-06-20",
     "female", "Capital City"),
    ("Bob Brown", "bob.brown@example.com", "321 Pine St, Springfield", "1982-11-30", "2023-05-14", "male",
     "Springfield"),
    ("Emily Davis", "emily.davis@example.com", "654 Maple St, Shelbyville", "1995-02-05", "2024-03-01", "female",
     "Shelbyville"),
    ("Michael Green", "michael.green@example.com", "987 Cedar St, Springfield", "1988-07-25", "2024-02-15", "male",
     "Springfield"),
    ("Sarah Taylor", "sarah.taylor@example.com", "123 Birch St, Shelbyville", "1992-04-18", "2022-10-10", "female",
     "Shelbyville"),
    ("David Wilson", "david.wilson@example.com", "456 Ash St, Capital City", "1975-01-11", "2023-08-25", "male",
     "Capital City"),
    ("Laura White", "laura.white@example.com", "789 Palm St, Springfield", "1989-09-02", "2024-04-20", "female",
     "Springfield"),
    ("James Harris", "james.harris@example.com", "321 Cherry St, Shelbyville", "1993-11-15", "2023-06-30", "male",
     "Shelbyville"),
]


def demo_patients() -> list[PatientCreate]:
    return [
        PatientCreate(name=name, email=email, address=address, date_of_birth=date.fromisoformat(dob),
                      registered_date=date.fromisoformat(registered), gender=gender, city=city)
        for name, email, address, dob, registered, gender, city in _DEMO
    ]


def seed_once(settings: Settings, factory: sessionmaker[Session]) -> int:
    """Insert the sample patients once per database (embedded mode, unless disabled)."""
    if settings.mode is not Mode.EMBEDDED or not settings.patient.seed_demo_data:
        return 0
    with factory() as session:
        # The flag and the patients commit together: exactly one process ever seeds.
        if not patient_repository.claim_flag(session, DEMO_FLAG):
            session.rollback()
            return 0
        count = patient_service.create_many(session=session, items=demo_patients(), actor=DEMO_ACTOR)
    log.info("demo patients created", extra={"fields": {"count": count}})
    return count
