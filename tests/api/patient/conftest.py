"""Fixtures of the patient service tests: a running service, tokens, clients, a patient factory.

Each module that needs a running service gets its own ``pms serve patient`` process (module
scope: one start per module), on its own event topic so event assertions never see
another module's traffic.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer, TopicPartition

from pms import process
from pms.contracts import patient_events_pb2
from pms.embedded import EmbeddedBroker
from pms.security import encode_token
from pms.settings import Settings
from tests.fixtures.servers import ServerSet
from tests.fixtures.services import ServiceProcess

_counter = itertools.count()


def patient_settings(servers: ServerSet, *, bootstrap: str | None = None, **patient: Any) -> Settings:
    """Settings on the session servers with free ports, a private topic and test-speed knobs."""
    kafka = servers.settings.kafka.model_dump()
    kafka["topic"] = f"patient-test-{uuid.uuid4().hex[:10]}"
    if bootstrap:
        kafka["bootstrap_servers"] = bootstrap
    knobs = {"port": process.free_port(), "seed_demo_data": False, "outbox_poll_interval_s": 0.05,
             "billing_retry_initial_s": 0.2, "billing_retry_max_s": 1.0, "billing_timeout_s": 1.0}
    knobs.update(patient)
    billing = {"port": process.free_port(), "metrics_port": process.free_port()}
    return servers.make_settings(patient=knobs, billing=billing, kafka=kafka)


def start_patient(settings: Settings, log_dir: Path, *, name: str = "patient") -> ServiceProcess:
    return ServiceProcess("patient", settings, log_dir / f"{name}-{next(_counter)}.log").start(timeout=90)


@dataclass
class Api:
    """An httpx client on a running patient service, with a token per role."""

    settings: Settings
    base_url: str

    def token(self, role: str = "STAFF", sub: str = "staff@clinic.test") -> str:
        return encode_token(self.settings, sub=sub, role=role)

    def client(self, role: str | None = "STAFF", sub: str = "staff@clinic.test") -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token(role, sub)}"} if role else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30)


def new_patient_body(**overrides: Any) -> dict[str, Any]:
    """The seed tutorial's create payload with a unique email."""
    body = {
        "name": "Test Patient",
        "email": f"p-{uuid.uuid4().hex[:12]}@example.com",
        "address": "1 Test Road, Springfield",
        "dateOfBirth": "1980-05-17",
        "registeredDate": "2024-02-01",
    }
    body.update(overrides)
    return body


@pytest.fixture(scope="module")
def service_settings(servers: ServerSet) -> Settings:
    return patient_settings(servers)


@pytest.fixture(scope="module")
def patient_service(service_settings: Settings, tmp_path_factory: pytest.TempPathFactory
                    ) -> Iterator[ServiceProcess]:
    svc = start_patient(service_settings, tmp_path_factory.mktemp("patient-logs"))
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def api(patient_service: ServiceProcess, service_settings: Settings) -> Api:
    return Api(service_settings, patient_service.base_url)


@pytest.fixture(scope="module")
def staff(api: Api) -> Iterator[httpx.Client]:
    with api.client("STAFF") as client:
        yield client


@pytest.fixture
def patient_factory(staff: httpx.Client) -> Callable[..., dict[str, Any]]:
    """Create a patient over HTTP and return its JSON."""

    def _create(**overrides: Any) -> dict[str, Any]:
        response = staff.post("/patients", json=new_patient_body(**overrides))
        assert response.status_code == 201, response.text
        return response.json()

    return _create


# -- events -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Received:
    key: str
    partition: int
    event: patient_events_pb2.PatientEvent


def read_events(settings: Settings, *, until: Callable[[list[Received]], bool], timeout: float = 30.0
                ) -> list[Received]:
    """Read the settings' topic from the start until ``until(events)`` holds (or time out)."""
    topic = settings.kafka.topic
    consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": f"t-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest", "log_level": 3})
    received: list[Received] = []
    try:
        # The relay creates the topic; a consumer asking too early sees none (and must not create it).
        def _partitions() -> list[int]:
            metadata = consumer.list_topics(topic, timeout=5).topics.get(topic)
            return [] if metadata is None or metadata.error is not None else list(metadata.partitions)

        process.wait_until(lambda: bool(_partitions()), timeout=timeout, interval=0.1, message=f"topic {topic}")
        consumer.assign([TopicPartition(topic, p, 0) for p in _partitions()])

        def _done() -> bool:
            for message in consumer.consume(num_messages=1000, timeout=0.2):
                if message.error() is None:
                    event = patient_events_pb2.PatientEvent.FromString(message.value())
                    received.append(Received(message.key().decode(), message.partition(), event))
            return until(received)

        process.wait_until(_done, timeout=timeout, interval=0.01, message="events on the topic")
    finally:
        consumer.close()
    return received


def has_versions(expected: dict[str, int]) -> Callable[[list[Received]], bool]:
    """``until`` predicate: every patient id has events up to its expected version."""

    def _check(events: list[Received]) -> bool:
        seen: dict[str, set[int]] = {}
        for item in events:
            seen.setdefault(item.event.patient_id, set()).add(item.event.version)
        return all(set(range(1, v + 1)) <= seen.get(pid, set()) for pid, v in expected.items())

    return _check


@pytest.fixture(scope="module")
def private_broker(servers: ServerSet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """A broker of this module alone, so stopping it never disturbs other tests."""
    settings = servers.make_settings(
        data_dir=tmp_path_factory.mktemp("broker"),
        kafka={**servers.settings.kafka.model_dump(), "bootstrap_servers": f"127.0.0.1:{process.free_port()}"},
    )
    broker = EmbeddedBroker(settings)
    broker.start()
    yield broker
    broker.stop()


