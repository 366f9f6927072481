"""A service's copy of auth's token revocation list, refreshed in the background.

Every service verifies tokens locally (no round trip to auth per request), so on its own it would
accept a token until it expires even after logout, deactivation, a role change or a password
change. Auth publishes what to refuse at ``GET /revocations``; the gateway, the patient and the
analytics services fetch it every ``settings.jwt.revocation_refresh_s`` and check each verified
principal against it (:func:`pms.security.verified_principal`), which costs a dictionary lookup
per request. A service called directly, past the gateway, refuses a revoked token too.

When auth cannot be reached the last list is kept (fail-open for availability: staff keep
working, tokens still expire) and ``<service>_revocation_list_age_seconds`` grows, so an alert
can say that revocations are not being applied.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Gauge

from pms.security import Principal, Role, encode_token, internal_audience
from pms.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One answer of auth: per-subject cut-offs (Unix time) and revoked token ids."""

    cutoffs: dict[str, float] = field(default_factory=dict)
    token_ids: frozenset[str] = frozenset()
    fetched_at: float | None = None  # time.monotonic() of the fetch; None before the first one


class RevocationList:
    """Decides whether a verified principal was revoked, from the latest snapshot of auth's list."""

    def __init__(self, settings: Settings, client: aiohttp.ClientSession, *, service: str,
                 registry: CollectorRegistry | None = None) -> None:
        self._settings = settings
        self._client = client
        self._url = settings.auth.base_url.rstrip("/") + "/revocations"
        self._interval = max(0.1, settings.jwt.revocation_refresh_s)
        #: Subject of this service's own short-lived token for reading the list.
        self._subject = f"service:{service}"
        self.snapshot = Snapshot()
        self._failing = False
        if registry is not None:
            age = Gauge(f"{service}_revocation_list_age_seconds",
                        "Seconds since the revocation list was last fetched from auth (-1: never)",
                        registry=registry)
            age.set_function(self.age_s)

    def refuses(self, principal: Principal) -> bool:
        """True for a token given up by logout or issued before its user's last cut-off."""
        snapshot = self.snapshot
        cutoff = snapshot.cutoffs.get(principal.sub)
        return (cutoff is not None and principal.iat < cutoff) or principal.jti in snapshot.token_ids

    def age_s(self) -> float:
        fetched = self.snapshot.fetched_at
        return -1.0 if fetched is None else time.monotonic() - fetched

    async def refresh(self) -> None:
        """Fetch the list once and replace the snapshot; raises on any failure (the old one stays)."""
        token = encode_token(self._settings, sub=self._subject, role=Role.ADMIN, ttl_s=60,
                             audience=internal_audience(self._settings))
        async with self._client.get(self._url, headers={"Authorization": f"Bearer {token}"}) as reply:
            reply.raise_for_status()
            body = await reply.json(content_type=None)
        self.snapshot = Snapshot(
            cutoffs={str(entry["sub"]): float(entry["tokensValidAfter"]) for entry in body["users"]},
            token_ids=frozenset(str(jti) for jti in body["tokenIds"]),
            fetched_at=time.monotonic(),
        )

    async def run(self) -> None:
        """Refresh every interval until cancelled; one log line per outage, not one per attempt."""
        while True:
            try:
                await self.refresh()
                if self._failing:
                    log.info("revocation list refreshed again")
                    self._failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # auth down, slow or answering nonsense: keep the last list
                if not self._failing:
                    log.warning("cannot refresh the revocation list from auth; keeping the last one",
                                extra={"fields": {"error": type(exc).__name__}})
                    self._failing = True
            await asyncio.sleep(self._interval)  # the refresh period, not a synchronisation


@asynccontextmanager
async def refreshing(app: FastAPI, settings: Settings, session: aiohttp.ClientSession, *,
                     service: str) -> AsyncIterator[RevocationList]:
    """Keep ``app.state.revocations`` fresh (a background task reading auth through ``session``)."""
    revocations = RevocationList(settings, session, service=service,
                                 registry=getattr(app.state, "metrics_registry", None))
    app.state.revocations = revocations
    refresher = asyncio.create_task(revocations.run(), name="revocation-list")
    try:
        yield revocations
    finally:
        refresher.cancel()
        with suppress(asyncio.CancelledError):
            await refresher


def with_revocations(service: str, settings: Settings,
                     inner: Callable[[FastAPI], AbstractAsyncContextManager[Any]] | None
                     ) -> Callable[[FastAPI], AbstractAsyncContextManager[Any]]:
    """A lifespan that keeps ``app.state.revocations`` fresh around ``inner`` (the service's own).

    For services without an HTTP client of their own (patient, analytics); the gateway runs
    :func:`refreshing` on its upstream session instead.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False, cookie_jar=aiohttp.DummyCookieJar()) \
                as session, refreshing(app, settings, session, service=service):
            if inner is None:
                yield
            else:
                async with inner(app):
                    yield

    return lifespan
