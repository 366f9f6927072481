"""gRPC transport of billing: parse the request, call the service, map errors to status codes.

Every failure becomes a status, never a crash or a stack trace on the wire: bad input
``INVALID_ARGUMENT``, unknown patient ``NOT_FOUND``, database unreachable (or billing not
migrated yet) ``UNAVAILABLE`` -- which callers retry -- and anything else ``INTERNAL``.
Logs carry ids, codes and exception types only, never names, emails or request values.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC
from typing import NoReturn, TypeVar

import grpc
import psycopg
from google.protobuf.message import DecodeError, Message
from prometheus_client import CollectorRegistry, Counter, Histogram
from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc

from billing import service as billing_service
from pms.contracts import billing_pb2, billing_pb2_grpc
from pms.errors import BadRequest, NotFound, PMSError, ServiceUnavailable, is_database_outage

log = logging.getLogger(__name__)

T = TypeVar("T")

SERVICE_NAME: str = billing_pb2.DESCRIPTOR.services_by_name["BillingService"].full_name

#: pms.errors class -> gRPC status code (the gRPC twin of the HTTP error handler).
_STATUS_CODES: dict[type[PMSError], grpc.StatusCode] = {
    BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    ServiceUnavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_code_for(error: PMSError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in _STATUS_CODES:
            return _STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL


class BillingMetrics:
    """Prometheus metrics of the billing calls (served on ``settings.billing.metrics_port``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.calls = Counter("billing_calls_total", "BillingService calls by method and gRPC status code",
                             ["method", "code"], registry=self.registry)
        self.latency = Histogram("billing_call_duration_seconds", "BillingService call latency", ["method"],
                                 registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5))
        self.opened = Counter("billing_accounts_opened_total", "Billing accounts opened (not found existing)",
                              registry=self.registry)


class BillingServicer(billing_pb2_grpc.BillingServiceServicer):
    """BillingService over the billing database's engine; answers UNAVAILABLE until ``ready`` is set."""

    def __init__(self, engine: Engine, *, ready: threading.Event | None = None,
                 metrics: BillingMetrics | None = None) -> None:
        self._engine = engine
        self._ready = ready if ready is not None else threading.Event()
        self.metrics = metrics or BillingMetrics()

    @property
    def ready(self) -> threading.Event:
        return self._ready

    def CreateBillingAccount(  # noqa: N802 (generated gRPC method name)
        self, request: billing_pb2.BillingRequest | _Malformed, context: grpc.ServicerContext
    ) -> billing_pb2.BillingResponse:
        with self._measured(context, "CreateBillingAccount"):
            if isinstance(request, _Malformed):
                _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "malformed BillingRequest")
            account = self._run(context, "CreateBillingAccount", lambda: billing_service.create(
                engine=self._engine, patient_id=request.patient_id, name=request.name, email=request.email,
            ))
        if account.created:
            self.metrics.opened.inc()
            # DEBUG: one INFO line per call was a fifth of a call's CPU under load (contention on the
            # log handler's lock); the patient row keeps its account id.
            log.debug("billing account opened", extra={"fields": {"account_id": account.account_id}})
        return _response(account)

    def GetBillingAccount(  # noqa: N802 (generated gRPC method name)
        self, request: billing_pb2.GetBillingAccountRequest | _Malformed, context: grpc.ServicerContext
    ) -> billing_pb2.BillingResponse:
        with self._measured(context, "GetBillingAccount"):
            if isinstance(request, _Malformed):
                _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "malformed GetBillingAccountRequest")
            account = self._run(context, "GetBillingAccount", lambda: billing_service.get_or_raise(
                engine=self._engine, patient_id=request.patient_id,
            ))
        return _response(account)

    @contextmanager
    def _measured(self, context: grpc.ServicerContext, method: str) -> Iterator[None]:
        """Count the call by its final status code (``context.abort`` sets it) and time it."""
        started = time.perf_counter()
        failed = False
        try:
            yield
        except BaseException:
            failed = True  # context.abort raises too, with the code set; anything else is UNKNOWN
            raise
        finally:
            code = context.code() or (grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK)
            self.metrics.calls.labels(method, code.name).inc()
            self.metrics.latency.labels(method).observe(time.perf_counter() - started)

    def _run(self, context: grpc.ServicerContext, method: str, call: Callable[[], T]) -> T:
        if not self._ready.is_set():
            _abort(context, grpc.StatusCode.UNAVAILABLE, "billing is starting or stopping")
        try:
            return call()
        except PMSError as error:
            code = status_code_for(error)
            details = error.message
            if error.errors:
                details += ": " + "; ".join(f"{field} {why}" for field, why in sorted(error.errors.items()))
            _abort(context, code, details)
        except (sa_exc.SQLAlchemyError, psycopg.Error) as error:
            if is_database_outage(error):
                log.warning("billing database unavailable",
                            extra={"fields": {"method": method, "exc_type": type(error).__name__}})
                _abort(context, grpc.StatusCode.UNAVAILABLE, "billing database unavailable")
            log.error("billing database error",
                      extra={"fields": {"method": method, "exc_type": type(error).__name__}})
            _abort(context, grpc.StatusCode.INTERNAL, "internal error")
        except Exception as error:
            # Type only: exception text can carry request values.
            log.error("unhandled error", extra={"fields": {"method": method, "exc_type": type(error).__name__}})
            _abort(context, grpc.StatusCode.INTERNAL, "internal error")


class _Malformed:
    """Stands in for a request whose bytes do not decode (e.g. invalid UTF-8 in a string field)."""


_MALFORMED = _Malformed()


def _lenient(message_type: type[Message]) -> Callable[[bytes], Message | _Malformed]:
    def parse(data: bytes) -> Message | _Malformed:
        try:
            return message_type.FromString(data)
        except DecodeError:
            return _MALFORMED

    return parse


def add_to_server(servicer: BillingServicer, server: grpc.Server) -> None:
    """Register BillingService on ``server`` (instead of the generated ``add_..._to_server``).

    Same handlers, but a request whose bytes do not decode reaches the servicer as a marker
    and is answered ``INVALID_ARGUMENT``; grpcio's generated registration answers ``INTERNAL``.
    """
    handlers = {
        "CreateBillingAccount": grpc.unary_unary_rpc_method_handler(
            servicer.CreateBillingAccount,
            request_deserializer=_lenient(billing_pb2.BillingRequest),
            response_serializer=billing_pb2.BillingResponse.SerializeToString,
        ),
        "GetBillingAccount": grpc.unary_unary_rpc_method_handler(
            servicer.GetBillingAccount,
            request_deserializer=_lenient(billing_pb2.GetBillingAccountRequest),
            response_serializer=billing_pb2.BillingResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    context.abort(code, details)
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


def _response(account: billing_service.Account) -> billing_pb2.BillingResponse:
    return billing_pb2.BillingResponse(
        account_id=account.account_id,
        status=account.status,
        patient_id=account.patient_id,
        created_at=account.created_at.astimezone(UTC).isoformat(),
        created=account.created,
    )
