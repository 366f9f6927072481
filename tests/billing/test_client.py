"""billing.client.BillingClient against a real billing server, a dead port and a stuck server."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from billing.client import BillingAccount, BillingClient, BillingUnavailable
from billing.server import BillingServer, build_server
from pms import process
from pms.contracts import billing_pb2, billing_pb2_grpc
from pms.settings import Settings

pytestmark = pytest.mark.integration


def test_create_then_get_round_trip(client: BillingClient, patient_id_factory) -> None:
    patient_id = patient_id_factory()
    account = client.create_account(patient_id=patient_id, name="Jane Roe", email="jane@example.org", timeout=5)
    assert isinstance(account, BillingAccount)
    assert account.created is True and account.status == "ACTIVE" and account.patient_id == patient_id
    assert client.get_account(patient_id=patient_id, timeout=5) == BillingAccount(
        account_id=account.account_id, status="ACTIVE", patient_id=patient_id, created=False)
    with pytest.raises(AttributeError):
        account.status = "CLOSED"  # type: ignore[misc]  # frozen


def test_retry_returns_the_same_account(client: BillingClient, patient_id_factory) -> None:
    patient_id = patient_id_factory()
    first = client.create_account(patient_id=patient_id, name="A", email="a@example.org", timeout=5)
    again = client.create_account(patient_id=patient_id, name="A", email="a@example.org", timeout=5)
    assert again.account_id == first.account_id and again.created is False


def test_get_unknown_patient_is_none(client: BillingClient, patient_id_factory) -> None:
    assert client.get_account(patient_id=patient_id_factory(), timeout=5) is None


def test_one_client_shared_by_32_threads(client: BillingClient, patient_id_factory) -> None:
    """The patient service shares one client; concurrent creates for one patient agree."""
    patient_id = patient_id_factory()
    barrier = threading.Barrier(32)

    def create_one(_: int) -> BillingAccount:
        barrier.wait(timeout=10)
        return client.create_account(patient_id=patient_id, name="N", email="n@example.org", timeout=10)

    with ThreadPoolExecutor(max_workers=32) as pool:
        accounts = list(pool.map(create_one, range(32)))
    assert len({a.account_id for a in accounts}) == 1
    assert sum(a.created for a in accounts) == 1


@pytest.mark.parametrize("patient_id", ["", "not-a-uuid", "00000000-0000-0000-0000-000000000000"])
def test_invalid_argument_is_a_value_error(client: BillingClient, patient_id: str) -> None:
    with pytest.raises(ValueError, match="patient_id"):
        client.create_account(patient_id=patient_id, name="N", email="n@example.org", timeout=5)
    with pytest.raises(ValueError, match="patient_id"):
        client.get_account(patient_id=patient_id, timeout=5)


def test_invalid_argument_is_not_billing_unavailable(client: BillingClient) -> None:
    with pytest.raises(ValueError) as caught:
        client.create_account(patient_id="x", name="N", email="n@example.org", timeout=5)
    assert not isinstance(caught.value, BillingUnavailable)


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan")])
def test_non_positive_timeout_is_a_value_error(client: BillingClient, timeout: float, patient_id_factory) -> None:
    with pytest.raises(ValueError, match="timeout"):
        client.get_account(patient_id=patient_id_factory(), timeout=timeout)


def test_server_down_raises_billing_unavailable_quickly(patient_id_factory) -> None:
    with BillingClient(f"127.0.0.1:{process.free_port()}") as dead:
        for call in (
            lambda: dead.create_account(patient_id=patient_id_factory(), name="N", email="n@e.org", timeout=5),
            lambda: dead.get_account(patient_id=patient_id_factory(), timeout=5),
        ):
            started = time.monotonic()
            with pytest.raises(BillingUnavailable) as caught:
                call()
            assert time.monotonic() - started < 1.0  # connection refused: no waiting for the deadline
            assert caught.value.code is grpc.StatusCode.UNAVAILABLE


def test_unresolvable_address_is_billing_unavailable(patient_id_factory) -> None:
    with BillingClient("billing.invalid:9001") as dead, pytest.raises(BillingUnavailable):
        dead.get_account(patient_id=patient_id_factory(), timeout=3)


class _StuckBilling(billing_pb2_grpc.BillingServiceServicer):
    """Fault injection: a billing server that never answers until released."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def CreateBillingAccount(self, request, context):
        self.release.wait(10)
        return billing_pb2.BillingResponse()

    GetBillingAccount = CreateBillingAccount


@pytest.fixture
def stuck_address() -> Iterator[str]:
    stuck = _StuckBilling()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    billing_pb2_grpc.add_BillingServiceServicer_to_server(stuck, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    stuck.release.set()
    server.stop(0).wait()


def test_slow_server_hits_the_deadline_as_billing_unavailable(stuck_address: str, patient_id_factory) -> None:
    with BillingClient(stuck_address) as slow:
        started = time.monotonic()
        with pytest.raises(BillingUnavailable) as caught:
            slow.create_account(patient_id=patient_id_factory(), name="N", email="n@e.org", timeout=0.3)
        elapsed = time.monotonic() - started
    assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.25 <= elapsed < 2.0


def test_client_reconnects_soon_after_billing_comes_back(billing_settings: Settings, patient_id_factory) -> None:
    """After failures the channel backs off; billing must still be seen within seconds of its return."""
    port = process.free_port()
    with BillingClient(f"127.0.0.1:{port}") as client_:
        for _ in range(5):  # drive the channel into reconnect backoff
            with pytest.raises(BillingUnavailable):
                client_.get_account(patient_id=patient_id_factory(), timeout=1)
        server: BillingServer = build_server(billing_settings, port=port)
        server.start()
        server.mark_serving()
        try:
            started = time.monotonic()

            def answers() -> bool:
                try:
                    client_.get_account(patient_id=patient_id_factory(), timeout=1)
                    return True
                except BillingUnavailable:
                    return False

            process.wait_until(answers, timeout=10, interval=0.05, message="billing to be reachable again")
            assert time.monotonic() - started < 4.0
        finally:
            server.stop(grace=0)


def test_closed_client_raises_billing_unavailable(billing_address: str, patient_id_factory) -> None:
    closing = BillingClient(billing_address)
    assert closing.get_account(patient_id=patient_id_factory(), timeout=5) is None
    closing.close()
    closing.close()  # idempotent
    with pytest.raises(BillingUnavailable, match="closed"):
        closing.get_account(patient_id=patient_id_factory(), timeout=5)
    with pytest.raises(BillingUnavailable, match="closed"):
        closing.create_account(patient_id=str(uuid.uuid4()), name="N", email="n@e.org", timeout=5)


# -- AsyncBillingClient (grpc.aio): the patient create's client, same errors -------------------

def _on_a_loop(address: str, call):
    """Run ``call(client)`` with a fresh AsyncBillingClient on a fresh event loop, then close it."""
    import asyncio

    from billing.client import AsyncBillingClient

    async def main():
        client_ = AsyncBillingClient(address)
        try:
            return await call(client_)
        finally:
            await client_.close()

    return asyncio.run(main())


def test_async_create_opens_one_account_per_patient(billing_address: str, patient_id_factory) -> None:
    pid = patient_id_factory()

    async def twice(client_):
        first = await client_.create_account(patient_id=pid, name="N", email="n@e.org", timeout=5)
        again = await client_.create_account(patient_id=pid, name="N", email="n@e.org", timeout=5)
        return first, again

    first, again = _on_a_loop(billing_address, twice)
    assert first.created and not again.created
    assert first.account_id == again.account_id and first.patient_id == pid and first.status == "ACTIVE"


def test_async_invalid_argument_is_a_value_error(billing_address: str) -> None:
    async def bad(client_):
        await client_.create_account(patient_id="not-a-uuid", name="N", email="n@e.org", timeout=5)

    with pytest.raises(ValueError, match="patient_id") as caught:
        _on_a_loop(billing_address, bad)
    assert not isinstance(caught.value, BillingUnavailable)


def test_async_server_down_and_deadline_are_billing_unavailable(stuck_address: str, patient_id_factory) -> None:
    async def create(client_, timeout=5.0):
        await client_.create_account(patient_id=patient_id_factory(), name="N", email="n@e.org", timeout=timeout)

    with pytest.raises(BillingUnavailable) as down:
        _on_a_loop(f"127.0.0.1:{process.free_port()}", create)
    assert down.value.code is grpc.StatusCode.UNAVAILABLE
    started = time.monotonic()
    with pytest.raises(BillingUnavailable) as slow:
        _on_a_loop(stuck_address, lambda client_: create(client_, timeout=0.3))
    assert slow.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.25 <= time.monotonic() - started < 2.0


def test_async_closed_client_raises_billing_unavailable(billing_address: str, patient_id_factory) -> None:
    async def closed(client_):
        await client_.close()
        await client_.close()  # idempotent
        await client_.create_account(patient_id=patient_id_factory(), name="N", email="n@e.org", timeout=5)

    with pytest.raises(BillingUnavailable, match="closed"):
        _on_a_loop(billing_address, closed)


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan")])
def test_async_non_positive_timeout_is_a_value_error(billing_address: str, timeout: float,
                                                     patient_id_factory) -> None:
    async def create(client_):
        await client_.create_account(patient_id=patient_id_factory(), name="N", email="n@e.org", timeout=timeout)

    with pytest.raises(ValueError, match="timeout"):
        _on_a_loop(billing_address, create)
