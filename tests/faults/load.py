"""A steady, bounded create load through the gateway, recording every answer.

Runs in a background thread at a fixed pace (``rate`` creates/s) until stopped or until
``max_count`` requests or ``max_seconds`` have gone by, whichever comes first. Each attempt
keeps its start and end (monotonic clock) so the checks can tell whether an error answer
fell inside an outage window.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import date

import httpx

CITIES = ("Oslo", "Leeds", "Lyon", "Porto", None)
GENDERS = ("female", "male", "other", "unknown", None)


@dataclass(frozen=True, slots=True)
class Attempt:
    seq: int
    started: float
    ended: float
    #: HTTP status, or 0 when no answer came at all (transport error or client timeout).
    status: int
    patient_id: str | None
    email: str
    error: str | None = None

    @property
    def acknowledged(self) -> bool:
        return self.status == 201


def patient_body(seq: int) -> dict[str, object]:
    """A valid create body; the fields analytics counts vary with ``seq`` (no real person's data)."""
    body: dict[str, object] = {
        "name": f"Fault Load {seq}",
        "email": f"fault-{seq}-{uuid.uuid4().hex[:8]}@example.com",
        "address": f"{seq} Test Road",
        "dateOfBirth": date(1940 + seq % 60, 1 + seq % 12, 1 + seq % 28).isoformat(),
        "registeredDate": date(2026, 1 + seq % 10, 1 + seq % 27).isoformat(),
    }
    if (city := CITIES[seq % len(CITIES)]) is not None:
        body["city"] = city
    if (gender := GENDERS[seq % len(GENDERS)]) is not None:
        body["gender"] = gender
    return body


@dataclass
class CreateLoad:
    """POST /api/patients through the gateway at ``rate`` per second, in a background thread."""

    base_url: str
    token: str
    rate: float = 8.0
    max_count: int = 1500
    max_seconds: float = 180.0
    timeout_s: float = 15.0
    attempts: list[Attempt] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="create-load", daemon=True)
        self.crashed: BaseException | None = None

    def start(self) -> CreateLoad:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.timeout_s + 5)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def snapshot(self) -> list[Attempt]:
        with self._lock:
            return list(self.attempts)

    def acknowledged_after(self, moment: float) -> int:
        """Creates answered 201 that were sent after ``moment`` (monotonic)."""
        return sum(1 for a in self.snapshot() if a.acknowledged and a.started > moment)

    def attempts_after(self, moment: float) -> int:
        return sum(1 for a in self.snapshot() if a.started > moment)

    def _run(self) -> None:
        interval = 1.0 / self.rate
        began = time.monotonic()
        next_at = began
        headers = {"Authorization": f"Bearer {self.token}"}
        try:
            with httpx.Client(base_url=self.base_url, headers=headers, timeout=self.timeout_s,
                              trust_env=False) as client:
                for seq in range(self.max_count):
                    if self._stop.is_set() or time.monotonic() - began > self.max_seconds:
                        return
                    self._one(client, seq)
                    next_at += interval
                    # Pacing, not synchronisation: hold the rate steady (returns at once when behind).
                    self._stop.wait(max(0.0, next_at - time.monotonic()))
        except BaseException as exc:  # surfaced by the checks; a dead load thread must not pass silently
            self.crashed = exc

    def _one(self, client: httpx.Client, seq: int) -> None:
        body = patient_body(seq)
        started = time.monotonic()
        status, patient_id, error = 0, None, None
        try:
            response = client.post("/api/patients", json=body)
            status = response.status_code
            if status == 201:
                patient_id = response.json()["id"]
            elif status >= 400:
                error = response.text[:300]
        except httpx.HTTPError as exc:
            error = type(exc).__name__
        attempt = Attempt(seq, started, time.monotonic(), status, patient_id, str(body["email"]), error)
        with self._lock:
            self.attempts.append(attempt)
