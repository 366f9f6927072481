"""The billing gRPC client the patient service uses (one channel per process, thread-safe).

Errors are split by who must act: ``INVALID_ARGUMENT`` is a caller bug and raises
:class:`ValueError`; everything else that stops an answer (billing down, deadline
exceeded, connection reset, server error) raises :class:`BillingUnavailable`, which the
patient service turns into ``billingStatus: PENDING`` and a later retry. Because
``CreateBillingAccount`` is idempotent on ``patient_id``, retrying is always safe.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import NoReturn

import grpc

from pms.contracts import billing_pb2, billing_pb2_grpc

#: Reconnect quickly after billing comes back: gRPC's default backoff grows to 120 s, which
#: would keep a recovered billing server looking "down" to the retry worker for minutes.
_CHANNEL_OPTIONS: list[tuple[str, object]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.max_receive_message_length", 1024 * 1024),
]


@dataclass(frozen=True, slots=True)
class BillingAccount:
    """A patient's billing account as billing reports it."""

    account_id: str
    status: str
    patient_id: str
    #: True when the call that returned it opened the account; False when it already existed.
    created: bool


class BillingUnavailable(Exception):
    """Billing could not answer: down, too slow for the deadline, or any transport failure."""

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class BillingClient:
    """Calls the billing server over one reused channel; safe to share between threads."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        # The stub is built once, here: grpcio crashes the interpreter (SIGSEGV) when a
        # stub is built on an already closed channel.
        self._stub = billing_pb2_grpc.BillingServiceStub(self._channel)
        self._lock = threading.Lock()
        self._closed = False

    def create_account(self, *, patient_id: str, name: str, email: str, timeout: float) -> BillingAccount:
        """Open (or fetch the already open) billing account of a patient.

        Args:
            patient_id: the patient's UUID; the account is unique per patient.
            name, email: sent because the contract carries them; billing does not store them.
            timeout: seconds before the call gives up with :class:`BillingUnavailable`.

        Raises:
            ValueError: billing rejected the arguments (``INVALID_ARGUMENT``), or ``timeout`` <= 0.
            BillingUnavailable: billing is down, too slow, or failed.
        """
        request = billing_pb2.BillingRequest(patient_id=patient_id, name=name, email=email)
        reply = self._call("CreateBillingAccount", request, timeout=timeout)
        assert reply is not None  # NOT_FOUND is not an answer of Create
        return _account(reply)

    def get_account(self, *, patient_id: str, timeout: float) -> BillingAccount | None:
        """Return the billing account of a patient, or None when the patient has none.

        Raises:
            ValueError: ``patient_id`` is not a UUID (``INVALID_ARGUMENT``), or ``timeout`` <= 0.
            BillingUnavailable: billing is down, too slow, or failed.
        """
        request = billing_pb2.GetBillingAccountRequest(patient_id=patient_id)
        reply = self._call("GetBillingAccount", request, timeout=timeout, not_found_ok=True)
        return None if reply is None else _account(reply)

    def close(self) -> None:
        """Close the channel; later calls raise :class:`BillingUnavailable`. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._channel.close()

    def __enter__(self) -> BillingClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(
        self, method: str, request: object, *, timeout: float, not_found_ok: bool = False
    ) -> billing_pb2.BillingResponse | None:
        _refuse_early(timeout=timeout, closed=self._closed)
        try:
            return getattr(self._stub, method)(request, timeout=timeout)
        except grpc.RpcError as exc:
            if not_found_ok and _code(exc) is grpc.StatusCode.NOT_FOUND:
                return None
            _raise_for(exc, method)
        except ValueError as exc:
            # grpcio raises ValueError when the channel was closed by another thread meanwhile.
            if self._closed:
                raise BillingUnavailable("billing client is closed") from exc
            raise


class AsyncBillingClient:
    """The same calls on a ``grpc.aio`` channel, for callers on an event loop (the patient create).

    Build it inside the running loop that will use it; the errors are those of :class:`BillingClient`.
    """

    def __init__(self, address: str) -> None:
        self._channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self._stub = billing_pb2_grpc.BillingServiceStub(self._channel)
        self._closed = False

    async def create_account(self, *, patient_id: str, name: str, email: str, timeout: float) -> BillingAccount:
        """See :meth:`BillingClient.create_account`."""
        _refuse_early(timeout=timeout, closed=self._closed)
        request = billing_pb2.BillingRequest(patient_id=patient_id, name=name, email=email)
        try:
            reply = await self._stub.CreateBillingAccount(request, timeout=timeout)
        except grpc.RpcError as exc:
            _raise_for(exc, "CreateBillingAccount")
        return _account(reply)

    async def close(self) -> None:
        """Close the channel; later calls raise :class:`BillingUnavailable`. Idempotent."""
        if not self._closed:
            self._closed = True
            await self._channel.close()


def _refuse_early(*, timeout: float, closed: bool) -> None:
    """What is wrong before a call is even made: a deadline that is not positive, or a closed client."""
    if not timeout > 0:
        raise ValueError("timeout must be a positive number of seconds")
    if closed:
        raise BillingUnavailable("billing client is closed")


def _code(exc: grpc.RpcError) -> grpc.StatusCode | None:
    return exc.code() if isinstance(exc, grpc.Call | grpc.aio.AioRpcError) else None


def _raise_for(exc: grpc.RpcError, method: str) -> NoReturn:
    """Raise what a failed call means to its caller: ValueError for bad arguments, else BillingUnavailable."""
    code = _code(exc)
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        raise ValueError(_details(exc) or "invalid billing request") from None
    name = code.name if code is not None else "UNKNOWN"
    raise BillingUnavailable(f"billing {method} failed: {name}", code=code) from exc


def _details(exc: grpc.RpcError) -> str:
    details = exc.details() if isinstance(exc, grpc.Call | grpc.aio.AioRpcError) else None
    return str(details or "")


def _account(reply: billing_pb2.BillingResponse) -> BillingAccount:
    return BillingAccount(
        account_id=reply.account_id,
        status=reply.status,
        patient_id=reply.patient_id,
        created=reply.created,
    )
