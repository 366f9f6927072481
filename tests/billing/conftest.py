"""Billing fixtures: one migrated in-process billing server per module, on a free port."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import grpc
import pytest

from billing.client import BillingClient
from billing.server import BillingServer, build_server
from pms import db
from pms.contracts import billing_pb2_grpc
from pms.settings import Settings
from tests.fixtures.servers import ServerSet


@pytest.fixture(scope="module")
def billing_settings(servers: ServerSet) -> Settings:
    """Settings on the session's PostgreSQL with billing on port 0, database migrated."""
    settings = servers.make_settings(billing={"host": "127.0.0.1", "port": 0, "max_workers": 8})
    db.migrate(settings, "billing")
    return settings


@pytest.fixture(scope="module")
def billing_server(billing_settings: Settings) -> Iterator[BillingServer]:
    server = build_server(billing_settings)
    server.start()
    server.mark_serving()
    yield server
    server.stop(grace=1)


@pytest.fixture(scope="module")
def billing_address(billing_server: BillingServer) -> str:
    return f"127.0.0.1:{billing_server.port}"


@pytest.fixture(scope="module")
def channel(billing_address: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(billing_address) as chan:
        yield chan


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> billing_pb2_grpc.BillingServiceStub:
    return billing_pb2_grpc.BillingServiceStub(channel)


@pytest.fixture(scope="module")
def client(billing_address: str) -> Iterator[BillingClient]:
    with BillingClient(billing_address) as shared:
        yield shared


@pytest.fixture
def patient_id_factory() -> Callable[[], str]:
    """Fresh patient UUIDs, so tests sharing one database never see each other's accounts."""
    return lambda: str(uuid.uuid4())
