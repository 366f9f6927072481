"""The gateway's revocation list: what it refuses, and how it behaves when auth is away."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from api.gateway.revocation import SERVICE_SUBJECT, RevocationList
from pms.errors import Unauthorized
from pms.security import Principal, Role, decode_token, internal_audience
from pms.settings import Settings


def _settings() -> Settings:
    return Settings(jwt={"secret": "s" * 40}, gateway={"revocation_refresh_s": 0.1})


def _principal(sub: str = "staff@clinic.example", *, iat: float = 1000.0, jti: str = "a") -> Principal:
    return Principal(sub=sub, role=Role.STAFF, jti=jti, exp=int(iat) + 3600, iat=iat)


def _answer(users: list[dict], token_ids: list[str]) -> dict:
    return {"asOf": 2000.0, "users": users, "tokenIds": token_ids}


def _list(handler: httpx.MockTransport) -> tuple[RevocationList, httpx.AsyncClient]:
    client = httpx.AsyncClient(transport=handler)
    return RevocationList(_settings(), client), client


def test_refuses_tokens_before_the_cutoff_and_listed_ids() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=_answer([{"sub": "staff@clinic.example", "tokensValidAfter": 1000.5}],
                                                ["gone"]))

    revocations, client = _list(httpx.MockTransport(handler))

    async def scenario() -> None:
        assert not revocations.refuses(_principal(iat=999.0))  # nothing known yet
        assert revocations.age_s() == -1.0
        await revocations.refresh()
        await client.aclose()

    asyncio.run(scenario())
    assert revocations.refuses(_principal(iat=1000.4))          # issued before the cut-off
    assert not revocations.refuses(_principal(iat=1000.7))      # a login after it, same second
    assert not revocations.refuses(_principal("other@clinic.example", iat=1.0))
    assert revocations.refuses(_principal("other@clinic.example", jti="gone"))
    assert 0 <= revocations.age_s() < 5
    # It asks auth with its own short-lived admin token.
    token = seen[0].headers["Authorization"].removeprefix("Bearer ")
    service = decode_token(_settings(), token, audience=internal_audience(_settings()))
    assert service.sub == SERVICE_SUBJECT and service.role == Role.ADMIN and service.exp - service.iat <= 61
    assert str(seen[0].url) == _settings().auth.base_url.rstrip("/") + "/revocations"
    with pytest.raises(Unauthorized):  # no user-facing verifier accepts it
        decode_token(_settings(), token)


@pytest.mark.parametrize("failure", ["status", "garbage", "shape", "connect"])
def test_a_failed_refresh_keeps_the_last_list(failure: str) -> None:
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] == 1:
            return httpx.Response(200, json=_answer([], ["gone"]))
        if failure == "status":
            return httpx.Response(503, json={"message": "down"})
        if failure == "garbage":
            return httpx.Response(200, content=b"<html>")
        if failure == "shape":
            return httpx.Response(200, content=json.dumps({"users": "nope"}).encode())
        raise httpx.ConnectError("refused", request=request)

    revocations, client = _list(httpx.MockTransport(handler))

    async def scenario() -> None:
        await revocations.refresh()
        with pytest.raises(Exception):  # noqa: B017 - each failure kind raises its own error
            await revocations.refresh()
        await client.aclose()

    asyncio.run(scenario())
    assert revocations.refuses(_principal(jti="gone"))


def test_run_keeps_refreshing_through_an_outage() -> None:
    replies = iter([httpx.Response(503), httpx.Response(503),
                    httpx.Response(200, json=_answer([], ["late"]))])

    def handler(request: httpx.Request) -> httpx.Response:
        try:
            return next(replies)
        except StopIteration:
            return httpx.Response(200, json=_answer([], ["late"]))

    revocations, client = _list(httpx.MockTransport(handler))

    async def scenario() -> None:
        task = asyncio.create_task(revocations.run())
        deadline = asyncio.get_running_loop().time() + 10
        while not revocations.refuses(_principal(jti="late")):
            assert asyncio.get_running_loop().time() < deadline, "the list never arrived"
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await client.aclose()

    asyncio.run(scenario())
