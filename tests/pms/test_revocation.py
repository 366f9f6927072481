"""pms.revocation, every verifier's copy of auth's revocation list: what it refuses, and how it
behaves when auth is away.

A small aiohttp stand-in plays auth's ``GET /revocations`` on a free local port, and the list
reads it through the gateway's own upstream session (:func:`api.gateway.proxy.upstream_session`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
from aiohttp import web

from api.gateway.proxy import upstream_session
from pms import process
from pms.errors import Unauthorized
from pms.revocation import RevocationList
from pms.security import Principal, Role, decode_token, internal_audience
from pms.settings import Settings

Handler = Callable[[web.Request], web.Response]


def _settings(port: int) -> Settings:
    return Settings(jwt={"secret": "s" * 40, "revocation_refresh_s": 0.1}, auth={"port": port})


def _principal(sub: str = "staff@clinic.example", *, iat: float = 1000.0, jti: str = "a") -> Principal:
    return Principal(sub=sub, role=Role.STAFF, jti=jti, exp=int(iat) + 3600, iat=iat)


def _answer(users: list[dict], token_ids: list[str]) -> web.Response:
    return web.json_response({"asOf": 2000.0, "users": users, "tokenIds": token_ids})


@dataclass
class FakeAuth:
    settings: Settings
    revocations: RevocationList
    site: web.AppRunner


@asynccontextmanager
async def fake_auth(handler: Handler) -> AsyncIterator[FakeAuth]:
    """Auth's revocation endpoint answered by ``handler``, and a list reading it."""
    app = web.Application()
    app.router.add_get("/revocations", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = process.free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    settings = _settings(port)
    session = upstream_session(timeout=5, connect_timeout=2)
    try:
        yield FakeAuth(settings, RevocationList(settings, session, service="gateway"), runner)
    finally:
        await session.close()
        await runner.cleanup()


def test_refuses_tokens_before_the_cutoff_and_listed_ids() -> None:
    seen: list[tuple[str, str]] = []

    def handler(request: web.Request) -> web.Response:
        seen.append((str(request.url), request.headers["Authorization"]))
        return _answer([{"sub": "staff@clinic.example", "tokensValidAfter": 1000.5}], ["gone"])

    async def scenario() -> tuple[RevocationList, Settings]:
        async with fake_auth(handler) as auth:
            assert not auth.revocations.refuses(_principal(iat=999.0))  # nothing known yet
            assert auth.revocations.age_s() == -1.0
            await auth.revocations.refresh()
            return auth.revocations, auth.settings

    revocations, settings = asyncio.run(scenario())
    assert revocations.refuses(_principal(iat=1000.4))          # issued before the cut-off
    assert not revocations.refuses(_principal(iat=1000.7))      # a login after it, same second
    assert not revocations.refuses(_principal("other@clinic.example", iat=1.0))
    assert revocations.refuses(_principal("other@clinic.example", jti="gone"))
    assert 0 <= revocations.age_s() < 5
    # It asks auth with its own short-lived admin token.
    url, authorization = seen[0]
    token = authorization.removeprefix("Bearer ")
    service = decode_token(settings, token, audience=internal_audience(settings))
    assert service.sub == "service:gateway" and service.role == Role.ADMIN and service.exp - service.iat <= 61
    assert url == settings.auth.base_url.rstrip("/") + "/revocations"
    with pytest.raises(Unauthorized):  # no user-facing verifier accepts it
        decode_token(settings, token)


@pytest.mark.parametrize("failure", ["status", "garbage", "shape", "connect"])
def test_a_failed_refresh_keeps_the_last_list(failure: str) -> None:
    calls = {"n": 0}

    def handler(request: web.Request) -> web.Response:
        calls["n"] += 1
        if calls["n"] == 1:
            return _answer([], ["gone"])
        if failure == "status":
            return web.json_response({"message": "down"}, status=503)
        if failure == "garbage":
            return web.Response(body=b"<html>", content_type="text/html")
        return web.Response(body=json.dumps({"users": "nope"}).encode(), content_type="application/json")

    async def scenario() -> RevocationList:
        async with fake_auth(handler) as auth:
            await auth.revocations.refresh()
            if failure == "connect":
                await auth.site.cleanup()  # auth is gone: the connection is refused
            with pytest.raises(Exception):  # noqa: B017 - each failure kind raises its own error
                await auth.revocations.refresh()
            return auth.revocations

    revocations = asyncio.run(scenario())
    assert revocations.refuses(_principal(jti="gone"))


def test_run_keeps_refreshing_through_an_outage() -> None:
    calls = {"n": 0}

    def handler(request: web.Request) -> web.Response:
        calls["n"] += 1
        if calls["n"] <= 2:
            return web.json_response({"message": "down"}, status=503)
        return _answer([], ["late"])

    async def scenario() -> None:
        async with fake_auth(handler) as auth:
            task = asyncio.create_task(auth.revocations.run())
            deadline = asyncio.get_running_loop().time() + 10
            while not auth.revocations.refuses(_principal(jti="late")):
                assert asyncio.get_running_loop().time() < deadline, "the list never arrived"
                await asyncio.sleep(0.02)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(scenario())
    assert calls["n"] >= 3
