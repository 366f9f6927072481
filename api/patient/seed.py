"""Synthetic patients for development and benchmarks (``pms seed --patients N --seed S``).

Deterministic: the same seed gives the same patients (names, emails, dates...), whatever
the day it runs. Patients go through the service layer's bulk path
(:func:`api.patient.service.create_many`: COPY, outbox and audit in one transaction per
batch), so every seeded patient has its PATIENT_CREATED event, and the billing retry worker
opens their accounts once the service runs. Seeding the same seed twice adds nothing:
emails collide and are skipped.
"""

from __future__ import annotations

import random
import re
from datetime import date, timedelta

from faker import Faker
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from api.patient import service as patient_service
from api.patient.schemas import PatientCreate
from pms import db
from pms.settings import Settings

SEED_ACTOR = "system:seed"
BATCH_SIZE = 10_000
#: Real US area codes, so generated phones pass the same validation as the API's.
_AREA_CODES = (201, 202, 203, 206, 212, 213, 214, 215, 303, 305, 312, 404, 415, 503, 512, 617, 702, 713, 718,
               801, 919)
_BIRTH_START = date(1925, 1, 1)
_BIRTH_DAYS = (date(2024, 12, 31) - _BIRTH_START).days
_REGISTERED_START = date(2015, 1, 1)
_REGISTERED_DAYS = (date(2025, 12, 31) - _REGISTERED_START).days
_GENDERS = ("female", "male", "other", "unknown")
_GENDER_WEIGHTS = (49, 49, 1, 1)
_NOT_LOCAL = re.compile(r"[^a-z0-9]+")


class PatientFaker:
    """Builds one deterministic stream of realistic patients.

    Faker draws pools of names, streets and cities once; each patient combines them with a
    seeded ``random.Random``. Drawing every value from Faker costs ~1 ms per patient, which
    would make a million patients take a quarter of an hour instead of a couple of minutes.
    Values are built valid by construction, so only every ``VALIDATE_EVERY``-th patient pays for
    full schema validation (email and phone parsing), as a guard against a generator bug.
    """

    VALIDATE_EVERY = 100

    def __init__(self, seed: int, *, pool_size: int = 2000) -> None:
        fake = Faker("en_US")
        fake.seed_instance(seed)
        self.first_names = [fake.first_name() for _ in range(pool_size)]
        self.last_names = [fake.last_name() for _ in range(pool_size)]
        self.streets = [fake.street_address() for _ in range(pool_size)]
        self.cities = [fake.city() for _ in range(max(50, pool_size // 10))]
        self.rng = random.Random(seed)
        self.seed = seed

    def patient(self, index: int) -> PatientCreate:
        rng = self.rng
        first, last = rng.choice(self.first_names), rng.choice(self.last_names)
        local = _NOT_LOCAL.sub(".", f"{first}.{last}".lower()).strip(".")
        city = rng.choice(self.cities)
        birth = _BIRTH_START + timedelta(days=rng.randrange(_BIRTH_DAYS))
        registered = max(birth, _REGISTERED_START + timedelta(days=rng.randrange(_REGISTERED_DAYS)))
        phone = None
        if rng.random() < 0.8:
            phone = f"+1{rng.choice(_AREA_CODES)}{rng.randrange(200, 1000)}{rng.randrange(10000):04d}"
        values = {
            "name": f"{first} {last}",
            "email": f"{local}.{self.seed}.{index}@example.org",
            "address": f"{rng.choice(self.streets)}, {city}",
            "city": city,
            "date_of_birth": birth,
            "registered_date": registered,
            "gender": rng.choices(_GENDERS, _GENDER_WEIGHTS)[0],
            "phone": phone,
        }
        if index % self.VALIDATE_EVERY == 0:
            return PatientCreate(**values)
        return PatientCreate.model_construct(**values)


def run(settings: Settings, *, patients: int, seed: int = 42, batch_size: int = BATCH_SIZE,
        show_progress: bool = True) -> int:
    """Create ``patients`` synthetic patients; return how many were new.

    Raises:
        ValueError: ``patients`` is negative or ``batch_size`` is not positive.
    """
    if patients < 0 or batch_size < 1:
        raise ValueError("patients must be >= 0 and batch_size >= 1")
    db.migrate(settings, "patients")
    engine = db.make_engine(settings.database_url_for("patients"), pool_size=1, max_overflow=0)
    factory = db.session_factory(engine)
    maker = PatientFaker(seed)
    created = 0
    columns = (TextColumn("[bold]seeding patients"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    try:
        with Progress(*columns, disable=not show_progress) as progress:
            task = progress.add_task("seed", total=patients)
            for start in range(0, patients, batch_size):
                items = [maker.patient(i) for i in range(start, min(patients, start + batch_size))]
                with factory() as session:
                    created += patient_service.create_many(session=session, items=items, actor=SEED_ACTOR)
                progress.advance(task, len(items))
    finally:
        engine.dispose()
    return created
