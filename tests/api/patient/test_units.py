"""Pure pieces of the patient service: no servers needed."""

from __future__ import annotations

from datetime import timedelta

import pytest

from api.patient.dependencies import expected_version
from api.patient.fhir import _human_name
from api.patient.schemas import PatientCreate, normalize_email, normalize_phone
from api.patient.service import backoff
from pms.errors import BadRequest
from pms.settings import Settings


def test_billing_backoff_doubles_and_is_capped() -> None:
    settings = Settings(_env_file=None, jwt={"secret": "s" * 40},  # type: ignore[call-arg]
                        patient={"billing_retry_initial_s": 0.5, "billing_retry_max_s": 30.0})
    delays = [backoff(settings, n) for n in range(10)]
    assert delays[:4] == [timedelta(seconds=s) for s in (0.5, 1.0, 2.0, 4.0)]
    assert delays[-1] == timedelta(seconds=30) and backoff(settings, 10_000) == timedelta(seconds=30)


@pytest.mark.parametrize(("header", "version"), [(None, None), ("*", None), ("3", 3), ('"3"', 3), ('W/"12"', 12)])
def test_if_match_forms(header: str | None, version: int | None) -> None:
    assert expected_version(header) == version


@pytest.mark.parametrize("header", ["abc", '"-1"', "1.5", "", "9" * 12])
def test_if_match_garbage_is_a_400(header: str) -> None:
    with pytest.raises(BadRequest):
        expected_version(header)


def test_phone_and_email_normalisation() -> None:
    assert normalize_phone("(202) 555-0142") == normalize_phone("+1 202 555 0142") == "+12025550142"
    assert normalize_phone("+44 20 7946 0958") == "+442079460958"
    for bad in ("12", "+999 1234", "phone"):
        with pytest.raises(ValueError):
            normalize_phone(bad)
    assert normalize_email("Ann.Lee@Example.COM") == "Ann.Lee@example.com"
    with pytest.raises(ValueError):
        normalize_email("ann@@example.com")


def test_fhir_human_name() -> None:
    assert _human_name("Cher") == {"use": "official", "text": "Cher", "given": ["Cher"]}
    assert _human_name("Ada  Lovelace") == {"use": "official", "text": "Ada  Lovelace", "family": "Lovelace",
                                         "given": ["Ada"]}


@pytest.mark.parametrize(("utc_now", "latest"), [
    ("2026-11-26T09:59:59+00:00", "2026-11-26"),  # 23:59:59 in UTC+14: still the 26th everywhere
    ("2026-11-26T10:00:00+00:00", "2026-11-27"),  # midnight in UTC+14: the 27th has begun somewhere
])
def test_a_date_is_in_the_future_only_where_no_clinic_has_reached_it(
        monkeypatch: pytest.MonkeyPatch, utc_now: str, latest: str) -> None:
    """A clinic ahead of the server (UTC+10 against a UTC container) had today's date refused every morning."""
    from datetime import date, datetime

    from pydantic import ValidationError

    from api.patient import schemas

    monkeypatch.setattr(schemas, "_clock", lambda: datetime.fromisoformat(utc_now))
    assert schemas.latest_calendar_date() == date.fromisoformat(latest)
    body = {"name": "A B", "email": "a@b.example", "address": "1 St", "dateOfBirth": "1990-01-01"}
    assert schemas.PatientCreate.model_validate({**body, "registeredDate": latest}).registered_date
    day_after = (date.fromisoformat(latest) + timedelta(days=1)).isoformat()
    for field in ("registeredDate", "dateOfBirth"):
        with pytest.raises(ValidationError, match="Must not be in the future"):
            schemas.PatientCreate.model_validate({**body, field: day_after})


_VALID = {"name": "Ann Lee", "email": "ann@example.org", "address": "1 Road", "dateOfBirth": "1980-01-01",
          "registeredDate": "2024-01-01"}


@pytest.mark.parametrize(("change", "field", "reason"), [
    ({"name": "\u200b"}, "name", "Must contain a letter"),  # showed as a blank patient
    ({"name": "Ann \u202eeeL"}, "name", "Must not contain text-direction control characters"),
    ({"address": "1 \u2066Road"}, "address", "Must not contain text-direction control characters"),
    ({"registeredDate": "1950-01-01"}, "registeredDate", "Must not be before the date of birth"),
    ({"dateOfBirth": "1900-01-01", "registeredDate": "1899-12-31"}, "registeredDate",
     "Must not be before the date of birth"),
    ({"email": ""}, "email", "Must be a valid email address"),  # was pydantic's "at least 3 characters"
])
def test_a_patient_that_would_display_or_date_wrongly_is_refused(change: dict[str, str], field: str,
                                                                  reason: str) -> None:
    with pytest.raises(ValueError) as refused:
        PatientCreate.model_validate({**_VALID, **change})
    assert [(e["loc"], e["msg"].removeprefix("Value error, ")) for e in refused.value.errors()] == [((field,), reason)]


@pytest.mark.parametrize("name", ["\u674e \u5c0f\u9f99", "Zo\u200d\u00eb", "Mohammad \u200cRez\u0101", "O'Brien-Smith"])
def test_real_names_with_joiners_and_other_scripts_are_kept(name: str) -> None:
    assert PatientCreate.model_validate({**_VALID, "name": name}).name == name
