"""The patient as a FHIR R4 ``Patient`` resource (http://hl7.org/fhir/R4/patient.html)."""

from __future__ import annotations

from datetime import UTC
from typing import Any

from api.patient.models import Patient

MRN_SYSTEM = "urn:pms:mrn"
ID_SYSTEM = "urn:pms:patient-id"
_GENDERS = {"male", "female", "other", "unknown"}


def _human_name(full: str) -> dict[str, Any]:
    parts = full.split()
    name: dict[str, Any] = {"use": "official", "text": full}
    if len(parts) > 1:
        name["family"] = parts[-1]
        name["given"] = parts[:-1]
    elif parts:
        name["given"] = parts
    return name


def to_fhir(patient: Patient) -> dict[str, Any]:
    """Map a patient row to an R4 Patient resource (JSON form)."""
    telecom: list[dict[str, Any]] = [{"system": "email", "value": patient.email, "use": "home"}]
    if patient.phone:
        telecom.append({"system": "phone", "value": patient.phone, "use": "mobile"})
    address: dict[str, Any] = {"use": "home", "type": "physical", "text": patient.address,
                               "line": [patient.address]}
    if patient.city:
        address["city"] = patient.city
    resource: dict[str, Any] = {
        "resourceType": "Patient",
        "id": str(patient.id),
        "meta": {
            "versionId": str(patient.version),
            "lastUpdated": patient.updated_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        },
        "identifier": [
            {
                "use": "usual",
                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                     "code": "MR", "display": "Medical record number"}],
                         "text": "MRN"},
                "system": MRN_SYSTEM,
                "value": patient.mrn,
            },
            {"use": "secondary", "system": ID_SYSTEM, "value": str(patient.id)},
        ],
        "active": patient.deleted_at is None,
        "name": [_human_name(patient.name)],
        "telecom": telecom,
        "birthDate": patient.date_of_birth.isoformat(),
        "address": [address],
    }
    if patient.gender in _GENDERS:
        resource["gender"] = patient.gender
    return resource
