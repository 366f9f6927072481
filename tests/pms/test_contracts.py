"""The protobuf contracts: stubs are generated from proto/ and importable as pms.contracts."""

from __future__ import annotations

from pms.contracts import _build, billing_pb2, billing_pb2_grpc, patient_events_pb2


def test_stubs_are_generated_and_current() -> None:
    assert not _build.is_stale()


def test_billing_messages_and_service() -> None:
    request = billing_pb2.BillingRequest(patient_id="p-1", name="n", email="e@example.org")
    assert billing_pb2.BillingRequest.FromString(request.SerializeToString()) == request
    service = billing_pb2.DESCRIPTOR.services_by_name["BillingService"]
    assert {"CreateBillingAccount", "GetBillingAccount"} <= set(service.methods_by_name)
    assert hasattr(billing_pb2_grpc, "BillingServiceStub")
    assert hasattr(billing_pb2_grpc, "add_BillingServiceServicer_to_server")


def test_patient_event_fields() -> None:
    fields = set(patient_events_pb2.PatientEvent.DESCRIPTOR.fields_by_name)
    assert {"event_id", "event_type", "patient_id", "version", "occurred_at", "name", "email", "gender",
            "date_of_birth", "registered_date", "city"} <= fields
    names = set(patient_events_pb2.EventType.keys())
    assert {"PATIENT_CREATED", "PATIENT_UPDATED", "PATIENT_DELETED"} <= names
    assert patient_events_pb2.PATIENT_DELETED == 3
    event = patient_events_pb2.PatientEvent(patient_id="p-1", version=3)
    assert patient_events_pb2.PatientEvent.FromString(event.SerializeToString()).version == 3
