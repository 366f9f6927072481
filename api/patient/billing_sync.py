"""Opening billing accounts: once inside the create request, then by a retry worker.

Billing being down or slow never fails a registration: the create waits at most
``settings.patient.billing_timeout_s``, answers ``billingStatus: PENDING``, and the
:class:`BillingRetryWorker` opens the account later with per-patient backoff. The billing
server is idempotent on patient_id, so a retry after a lost answer opens no second account.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from api.patient import repository as patient_repository
from api.patient import service as patient_service
from pms.settings import Settings

if TYPE_CHECKING:
    from billing.client import AsyncBillingClient, BillingAccount

log = logging.getLogger(__name__)

#: Audit actor of changes made by the retry worker.
WORKER_ACTOR = "system:billing-retry"


@dataclass(frozen=True, slots=True)
class OpenedAccount:
    account_id: str
    status: str


class BillingGateway:
    """The billing client with a short circuit breaker, so a dead billing server costs creates nothing."""

    def __init__(self, settings: Settings) -> None:
        self._address = settings.billing.address
        self._timeout = settings.patient.billing_timeout_s
        self._breaker_initial_s = max(settings.patient.billing_retry_initial_s, 0.05)
        self._breaker_max_s = max(settings.patient.billing_retry_max_s, self._breaker_initial_s)
        self._client: Any = None
        self._async_client: AsyncBillingClient | None = None
        self._lock = threading.Lock()
        self._open_until = 0.0
        self._failures = 0

    def _get_client(self) -> Any:
        with self._lock:
            if self._client is None:
                from billing.client import BillingClient

                self._client = BillingClient(self._address)
            return self._client

    @property
    def is_open(self) -> bool:
        """True while in-request calls are skipped (billing failed recently)."""
        return time.monotonic() < self._open_until

    def open_account(self, *, patient_id: uuid.UUID, name: str, email: str) -> OpenedAccount | None:
        """Open (or fetch) the patient's account; ``None`` when billing cannot answer now.

        The retry worker's call (blocking, from its threads): it ignores the breaker, and
        closes it again as soon as billing answers.
        """
        try:
            account = self._get_client().create_account(patient_id=str(patient_id), name=name, email=email,
                                                        timeout=self._timeout)
        except Exception as exc:  # sorted out in _failed
            return self._failed(patient_id, exc)
        return self._answered(account)

    async def open_account_in_request(self, *, patient_id: uuid.UUID, name: str, email: str
                                      ) -> OpenedAccount | None:
        """The create's call, on the event loop (one grpc.aio channel); ``None`` when billing cannot answer.

        It skips billing while the breaker is open, leaving the work to the retry worker instead
        of making the caller wait for a deadline. The breaker stays open for a doubling time per
        consecutive failure (capped at the retry maximum).
        """
        if self.is_open:
            return None
        try:
            if self._async_client is None:
                from billing.client import AsyncBillingClient

                self._async_client = AsyncBillingClient(self._address)
            account = await self._async_client.create_account(patient_id=str(patient_id), name=name, email=email,
                                                              timeout=self._timeout)
        except Exception as exc:  # sorted out in _failed
            return self._failed(patient_id, exc)
        return self._answered(account)

    def _failed(self, patient_id: uuid.UUID, exc: Exception) -> None:
        if isinstance(exc, ValueError):
            # Billing refused this patient's arguments: a problem of this patient, not an outage.
            log.warning("billing refused a patient", extra={"fields": {"patient_id": str(patient_id)}})
            return None
        # BillingUnavailable (down, too slow) or any transport error: open the breaker.
        with self._lock:
            if self._failures == 0:  # log the transition only, not every failed retry
                log.warning("billing unavailable; patients stay PENDING until it answers",
                            extra={"fields": {"error": type(exc).__name__}})
            self._failures += 1
            open_for = min(self._breaker_max_s, self._breaker_initial_s * 2 ** min(self._failures - 1, 20))
            self._open_until = time.monotonic() + open_for
        return None

    def _answered(self, account: BillingAccount) -> OpenedAccount:
        if self._failures:
            with self._lock:
                if self._failures:
                    log.info("billing answers again")
                self._failures = 0
                self._open_until = 0.0
        return OpenedAccount(account_id=str(account.account_id), status=str(account.status or "ACTIVE"))

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                try:
                    self._client.close()
                finally:
                    self._client = None

    async def aclose(self) -> None:
        """Close both channels (the async one belongs to the loop this runs on)."""
        if self._async_client is not None:
            client, self._async_client = self._async_client, None
            await client.close()
        self.close()


class BillingRetryWorker:
    """Background thread that opens the accounts of PENDING patients when billing answers.

    Each round probes billing with the most overdue patient; only when that succeeds does it
    call for the rest of the batch, ``concurrency`` calls at a time, and record all outcomes
    in one transaction. A billing outage therefore costs one call per round, and a backlog
    (a million seeded patients) drains at thousands of accounts per second, not dozens.
    """

    def __init__(self, settings: Settings, factory: sessionmaker[Session], gateway: BillingGateway,
                 *, batch_size: int = 200, concurrency: int = 8) -> None:
        self.settings = settings
        self.factory = factory
        self.gateway = gateway
        self.batch_size = batch_size
        self.concurrency = concurrency
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="billing-retry", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        idle = max(0.05, self.settings.patient.billing_retry_initial_s)
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="billing-call") as pool:
            while not self._stop.is_set():
                try:
                    done = self.run_once(pool)
                except Exception as exc:  # the database may be restarting: try again later
                    log.warning("billing retry round failed", extra={"fields": {"error": type(exc).__name__}})
                    done = 0
                if done == 0:
                    self._stop.wait(idle)

    def _open(self, due: tuple[uuid.UUID, str, str]) -> OpenedAccount | None:
        patient_id, name, email = due
        return self.gateway.open_account(patient_id=patient_id, name=name, email=email)

    def run_once(self, pool: ThreadPoolExecutor | None = None) -> int:
        """Try the due PENDING patients once; return how many accounts were opened."""
        with self.factory() as session:
            due = patient_repository.pending_billing(session, now=datetime.now(UTC), limit=self.batch_size)
        if not due:
            return 0
        first = self._open(due[0])
        if first is None:  # billing is down: postpone the probe patient, leave the rest alone
            with self.factory() as session:
                patient_service.billing_failed(session=session, patient_ids=[due[0][0]], settings=self.settings)
            return 0
        rest = list(pool.map(self._open, due[1:])) if pool is not None else [self._open(d) for d in due[1:]]
        outcomes = dict(zip((d[0] for d in due), [first, *rest], strict=True))
        opened = {pid: (acct.account_id, acct.status) for pid, acct in outcomes.items() if acct is not None}
        failed = [pid for pid, acct in outcomes.items() if acct is None]
        with self.factory() as session:
            count = patient_service.billing_opened(session=session, accounts=opened, actor=WORKER_ACTOR)
        if failed:
            with self.factory() as session:
                patient_service.billing_failed(session=session, patient_ids=failed, settings=self.settings)
        return count
