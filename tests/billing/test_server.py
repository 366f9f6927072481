"""BillingService over a real gRPC server and the real billing database."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from sqlalchemy import text

from billing import repository as billing_repository
from billing.server import SERVICE_NAME, BillingServer, build_server
from pms import db, process
from pms.contracts import billing_pb2, billing_pb2_grpc
from pms.settings import Settings

pytestmark = pytest.mark.integration


def _create(stub: billing_pb2_grpc.BillingServiceStub, patient_id: str, **fields: str) -> billing_pb2.BillingResponse:
    request = billing_pb2.BillingRequest(patient_id=patient_id, name=fields.get("name", "Jane Roe"),
                                         email=fields.get("email", "jane@example.org"))
    return stub.CreateBillingAccount(request, timeout=5)


def _accounts_of(settings: Settings, patient_id: str) -> int:
    with db.session_scope(db.session_factory(db.engine_for(settings, "billing"))) as session:
        return billing_repository.count_for_patient(session, patient_id=uuid.UUID(patient_id))


def test_create_opens_an_active_account(stub, patient_id_factory, billing_settings) -> None:
    patient_id = patient_id_factory()
    before = datetime.now(UTC)
    reply = _create(stub, patient_id)
    assert reply.created is True
    assert reply.status == "ACTIVE"
    assert reply.patient_id == patient_id
    assert uuid.UUID(reply.account_id).version == 4
    created_at = datetime.fromisoformat(reply.created_at)
    assert created_at.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=5) <= created_at <= datetime.now(UTC) + timedelta(seconds=5)
    assert _accounts_of(billing_settings, patient_id) == 1


def test_retry_returns_the_same_account(stub, patient_id_factory, billing_settings) -> None:
    patient_id = patient_id_factory()
    first = _create(stub, patient_id)
    again = _create(stub, patient_id, name="Other Name", email="other@example.org")
    assert again.created is False
    assert (again.account_id, again.status, again.created_at) == (first.account_id, first.status, first.created_at)
    assert _accounts_of(billing_settings, patient_id) == 1


def test_uppercase_uuid_is_the_same_patient(stub, patient_id_factory) -> None:
    patient_id = patient_id_factory()
    first = _create(stub, patient_id.upper())
    again = _create(stub, patient_id)
    assert first.patient_id == patient_id  # normalised to lower case
    assert again.account_id == first.account_id and again.created is False


def test_32_concurrent_creates_for_one_patient_open_one_account(stub, patient_id_factory, billing_settings) -> None:
    patient_id = patient_id_factory()
    barrier = threading.Barrier(32)

    def create_one(_: int) -> billing_pb2.BillingResponse:
        barrier.wait(timeout=10)
        return _create(stub, patient_id)

    with ThreadPoolExecutor(max_workers=32) as pool:
        replies = list(pool.map(create_one, range(32)))
    assert len({r.account_id for r in replies}) == 1
    assert sum(r.created for r in replies) == 1
    assert _accounts_of(billing_settings, patient_id) == 1


def test_get_returns_the_account(stub, patient_id_factory) -> None:
    patient_id = patient_id_factory()
    created = _create(stub, patient_id)
    got = stub.GetBillingAccount(billing_pb2.GetBillingAccountRequest(patient_id=patient_id), timeout=5)
    assert (got.account_id, got.status, got.patient_id, got.created_at) == (
        created.account_id, "ACTIVE", patient_id, created.created_at)
    assert got.created is False


def test_get_unknown_patient_is_not_found(stub, patient_id_factory) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetBillingAccount(billing_pb2.GetBillingAccountRequest(patient_id=patient_id_factory()), timeout=5)
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND


BAD_PATIENT_IDS = [
    pytest.param("", "required", id="empty"),
    pytest.param("not-a-uuid", "must be a UUID", id="garbage"),
    pytest.param("12345", "must be a UUID", id="seed-style-number"),
    pytest.param(" " + str(uuid.UUID(int=1)), "must be a UUID", id="leading-space"),
    pytest.param(str(uuid.UUID(int=1)) + "\n", "must be a UUID", id="trailing-newline"),
    pytest.param("{" + str(uuid.UUID(int=1)) + "}", "must be a UUID", id="braces"),
    pytest.param(uuid.UUID(int=1).hex, "must be a UUID", id="no-hyphens"),
    pytest.param("urn:uuid:" + str(uuid.UUID(int=1)), "must be a UUID", id="urn"),
    pytest.param("00000000-0000-0000-0000-00000000000g", "must be a UUID", id="non-hex"),
    pytest.param("00000000-0000-0000-0000-000000000000", "nil UUID", id="nil"),
    pytest.param("x" * 10_000, "must be a UUID", id="long"),
    pytest.param("'; DROP TABLE billing_accounts; --", "must be a UUID", id="sql"),
]


@pytest.mark.parametrize(("patient_id", "why"), BAD_PATIENT_IDS)
def test_create_rejects_a_malformed_patient_id(stub, patient_id: str, why: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _create(stub, patient_id)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert why in caught.value.details()
    assert "DROP" not in caught.value.details()  # the bad value is never echoed back


@pytest.mark.parametrize(("patient_id", "why"), BAD_PATIENT_IDS[:3])
def test_get_rejects_a_malformed_patient_id(stub, patient_id: str, why: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetBillingAccount(billing_pb2.GetBillingAccountRequest(patient_id=patient_id), timeout=5)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert why in caught.value.details()


@pytest.mark.parametrize(("field", "value"), [("name", "n" * 256), ("email", "e" * 321)])
def test_create_rejects_oversized_contact_fields(stub, patient_id_factory, billing_settings, field, value) -> None:
    patient_id = patient_id_factory()
    with pytest.raises(grpc.RpcError) as caught:
        _create(stub, patient_id, **{field: value})
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert field in caught.value.details()
    assert _accounts_of(billing_settings, patient_id) == 0


def test_huge_request_is_refused_before_the_handler(stub, patient_id_factory, billing_settings) -> None:
    patient_id = patient_id_factory()
    with pytest.raises(grpc.RpcError) as caught:
        _create(stub, patient_id, name="n" * 100_000)
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _accounts_of(billing_settings, patient_id) == 0


@pytest.mark.parametrize("method", ["CreateBillingAccount", "GetBillingAccount"])
@pytest.mark.parametrize("raw", [
    pytest.param(b"\x0a\x02\xff\xfe", id="invalid-utf8-string"),
    pytest.param(b"\xff\xff\xff", id="garbage"),
    pytest.param(b"\x0a\x05ab", id="truncated"),
])
def test_undecodable_bytes_are_invalid_argument(channel, method: str, raw: bytes) -> None:
    call = channel.unary_unary(f"/billing.BillingService/{method}")
    with pytest.raises(grpc.RpcError) as caught:
        call(raw, timeout=5)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed" in caught.value.details()


def test_unknown_fields_are_ignored_as_protobuf_says(channel, patient_id_factory) -> None:
    """Forward compatibility: a newer client's extra field does not break an older server."""
    patient_id = patient_id_factory()
    raw = billing_pb2.BillingRequest(patient_id=patient_id).SerializeToString() + b"\x50\x01"  # field 10 = 1
    reply = billing_pb2.BillingResponse.FromString(
        channel.unary_unary("/billing.BillingService/CreateBillingAccount")(raw, timeout=5))
    assert reply.patient_id == patient_id and reply.created is True


def test_empty_name_and_email_are_accepted(stub, patient_id_factory) -> None:
    reply = _create(stub, patient_id_factory(), name="", email="")
    assert reply.created is True


def test_name_and_email_are_not_stored(stub, patient_id_factory, billing_settings) -> None:
    patient_id = patient_id_factory()
    _create(stub, patient_id, name="Zebulon Quackenbush", email="zq-unique-marker@example.org")
    with db.engine_for(billing_settings, "billing").connect() as conn:
        columns = {row[0] for row in conn.execute(text(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'billing_accounts'"))}
        row = conn.execute(text("SELECT to_jsonb(a)::text FROM billing_accounts a WHERE patient_id = :p"),
                           {"p": patient_id}).scalar_one()
    assert columns == {"id", "patient_id", "status", "created_at"}
    assert "Quackenbush" not in row and "zq-unique-marker" not in row


def test_unique_constraint_is_in_the_database(billing_settings, patient_id_factory) -> None:
    """Idempotency does not depend on the server: a second raw INSERT is refused by PostgreSQL."""
    from sqlalchemy.exc import IntegrityError

    patient_id = patient_id_factory()
    engine = db.engine_for(billing_settings, "billing")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO billing_accounts (patient_id) VALUES (:p)"), {"p": patient_id})
    with pytest.raises(IntegrityError, match="uq_billing_accounts_patient_id"), engine.begin() as conn:
        conn.execute(text("INSERT INTO billing_accounts (patient_id) VALUES (:p)"), {"p": patient_id})


def test_health_reports_serving(channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as caught:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_service(channel) -> None:
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert {"billing.BillingService", "grpc.health.v1.Health"} <= services
    from google.protobuf.descriptor_pool import DescriptorPool

    pool = DescriptorPool(database)
    service = pool.FindServiceByName("billing.BillingService")
    assert {m.name for m in service.methods} == {"CreateBillingAccount", "GetBillingAccount"}
    assert service.methods_by_name["CreateBillingAccount"].input_type.full_name == "billing.BillingRequest"


# --- failure paths: database down, not yet migrated, port taken ---------------------------------


@pytest.fixture(scope="module")
def dead_db_server(billing_settings: Settings) -> BillingServer:
    """A billing server whose database URL points at a port where no PostgreSQL listens."""
    dead_url = billing_settings.database_url_for("billing").set(
        host="127.0.0.1", port=process.free_port(), query={})
    engine = db.make_engine(dead_url, connect_args={"connect_timeout": 2})
    server = build_server(billing_settings, port=0, engine=engine)
    server.start()
    server.mark_serving()
    yield server
    server.stop(grace=1)


@pytest.mark.parametrize("method", ["create", "get"])
def test_database_down_is_unavailable_not_a_crash(dead_db_server: BillingServer, method: str) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{dead_db_server.port}") as chan:
        stub = billing_pb2_grpc.BillingServiceStub(chan)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            if method == "create":
                _create(stub, str(uuid.uuid4()))
            else:
                stub.GetBillingAccount(billing_pb2.GetBillingAccountRequest(patient_id=str(uuid.uuid4())), timeout=5)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert caught.value.details() == "billing database unavailable"
        assert time.monotonic() - started < 4
        # bad input is still judged without the database
        with pytest.raises(grpc.RpcError) as bad:
            _create(stub, "nope")
        assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_after_the_database_connections_break_at_most_one_call_fails_then_billing_serves(
    billing_settings: Settings, patient_id_factory
) -> None:
    """No ping per checkout (billing.server.billing_engine): a broken pool costs one UNAVAILABLE, not one per
    pooled connection, and never a crash."""
    from billing.server import billing_engine
    from tests.api.patient.tcp_proxy import TcpProxy

    proxy = TcpProxy(billing_settings.postgres.host, billing_settings.postgres.port)
    settings = billing_settings.model_copy(
        update={"postgres": billing_settings.postgres.model_copy(update={"port": proxy.port})})
    server = build_server(settings, port=0, engine=billing_engine(settings))
    server.start()
    server.mark_serving()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as chan:
            stub = billing_pb2_grpc.BillingServiceStub(chan)
            with ThreadPoolExecutor(8) as pool:  # fill the pool with several open connections
                list(pool.map(lambda _: _create(stub, patient_id_factory()), range(32)))
            proxy.cut()
            proxy.restore()
            failures = 0
            for _ in range(12):
                try:
                    assert _create(stub, patient_id_factory()).status == "ACTIVE"
                except grpc.RpcError as exc:
                    assert exc.code() is grpc.StatusCode.UNAVAILABLE
                    failures += 1
            assert failures <= 1, failures
    finally:
        server.stop(grace=1)
        proxy.close()


def test_billing_service_health_follows_the_database_while_the_process_stays_serving(
    billing_settings: Settings,
) -> None:
    """Readiness (the BillingService entry) goes NOT_SERVING while PostgreSQL is unreachable and back
    after; liveness (the overall entry, what probes and restarts use) stays SERVING throughout."""
    from billing.server import billing_engine
    from tests.api.patient.tcp_proxy import TcpProxy

    proxy = TcpProxy(billing_settings.postgres.host, billing_settings.postgres.port)
    settings = billing_settings.model_copy(
        update={"postgres": billing_settings.postgres.model_copy(update={"port": proxy.port})})
    server = build_server(settings, port=0, engine=billing_engine(settings))
    server.start()
    server.mark_serving(check_interval_s=0.1)
    serving = health_pb2.HealthCheckResponse.SERVING
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as chan:
            health_stub = health_pb2_grpc.HealthStub(chan)

            def status(service: str) -> int:
                return health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

            assert status(SERVICE_NAME) == serving
            proxy.cut()
            process.wait_until(lambda: status(SERVICE_NAME) != serving, timeout=15, interval=0.05,
                               message="BillingService NOT_SERVING while the database is cut off")
            assert status("") == serving
            proxy.restore()
            process.wait_until(lambda: status(SERVICE_NAME) == serving, timeout=15, interval=0.05,
                               message="BillingService SERVING again")
    finally:
        server.stop(grace=1)
        proxy.close()


def test_not_yet_migrated_server_is_not_serving_and_unavailable(billing_settings: Settings) -> None:
    server = build_server(billing_settings, port=0)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as chan:
            reply = health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as caught:
                _create(billing_pb2_grpc.BillingServiceStub(chan), str(uuid.uuid4()))
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=0)


def test_stop_flips_health_to_not_serving_for_watchers(billing_settings: Settings) -> None:
    server = build_server(billing_settings, port=0)
    server.start()
    server.mark_serving()
    stopper = None
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as chan:
            watch = health_pb2_grpc.HealthStub(chan).Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                                          timeout=10)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            stopper = threading.Thread(target=server.stop, kwargs={"grace": 2})
            stopper.start()
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
    finally:
        if stopper is not None:
            stopper.join(timeout=10)
        server.stop(grace=0)
    assert not server.servicer.ready.is_set()


def test_port_in_use_is_a_clear_error(billing_server: BillingServer, billing_settings: Settings) -> None:
    with pytest.raises(RuntimeError, match="cannot listen"):
        build_server(billing_settings, port=billing_server.port)


def test_create_racing_an_uncommitted_insert_waits_and_returns_the_winner(
    stub, patient_id_factory, billing_settings: Settings
) -> None:
    """Deterministic version of the race: a competing transaction holds the patient's row uncommitted.

    The create must block on the unique index, then return the winner's account with created=False
    (a check-then-insert would instead fail with a unique violation once the winner commits).
    """
    patient_id = patient_id_factory()
    engine = db.engine_for(billing_settings, "billing")
    with engine.connect() as winner:
        winner_tx = winner.begin()
        winner_account = winner.execute(
            text("INSERT INTO billing_accounts (patient_id) VALUES (:p) RETURNING id"), {"p": patient_id}
        ).scalar_one()
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(_create, stub, patient_id)

            def create_is_blocked_on_the_row() -> bool:
                with engine.connect() as probe:
                    return bool(probe.execute(text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = 'billing' AND wait_event_type = 'Lock'"
                        " AND query LIKE 'INSERT INTO billing_accounts%'")).scalar_one())

            process.wait_until(create_is_blocked_on_the_row, timeout=10, message="create to wait on the row lock")
            assert not pending.done()
            winner_tx.commit()
            reply = pending.result(timeout=10)
    assert reply.created is False
    assert reply.account_id == str(winner_account)
    assert _accounts_of(billing_settings, patient_id) == 1


def test_create_server_returns_a_migrated_server_on_a_free_port(billing_settings: Settings, patient_id_factory) -> None:
    """The interface other teams' tests use: ``create_server(settings) -> (server, port)``."""
    from billing.server import create_server

    server, port = create_server(billing_settings)  # billing.port is 0 in these settings
    assert port > 0
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as chan:
            health = health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            assert _create(billing_pb2_grpc.BillingServiceStub(chan), patient_id_factory()).created is True
    finally:
        server.stop(0).wait()
