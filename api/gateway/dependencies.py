"""Gateway dependencies: the pooled upstream session, the caller, the rate limit, the role check."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from fastapi import Request

from api.gateway.proxy import client_address
from api.gateway.ratelimit import RateLimiter
from api.gateway.rules import Access
from pms.errors import Forbidden, TooManyRequests, Unauthorized
from pms.security import Principal, verified_principal


@dataclass(frozen=True, slots=True)
class Caller:
    """The verified principal, or why there is none (raised only where a route needs a token)."""

    principal: Principal | None
    error: Unauthorized | None


def http_client(request: Request) -> aiohttp.ClientSession:
    """The upstream session every forwarded call shares (built in the lifespan by proxy.upstream_session)."""
    return request.app.state.upstream_session


def identify(request: Request) -> Caller:
    """Verify the bearer token locally with the shared key (no round trip to auth), then refuse it
    if auth has revoked it (logout, deactivation, role or password change)."""
    try:
        principal = verified_principal(request)
    except Unauthorized as exc:
        return Caller(None, exc)
    request.state.principal = principal
    return Caller(principal, None)


def limit_rate(request: Request, caller: Caller) -> None:
    """Count the request against its caller: the token subject, else the client address."""
    limiter: RateLimiter = request.app.state.rate_limiter
    key = "sub:" + caller.principal.sub if caller.principal is not None else "addr:" + client_address(request)
    wait = limiter.hit(key)
    if wait is not None:
        raise TooManyRequests("Too many requests; slow down", retry_after=wait)


def authorize(caller: Caller, access: Access) -> Principal | None:
    """Apply a route's role rule: 401 without a valid token, 403 for a role not allowed."""
    if access.public:
        return caller.principal
    if caller.principal is None:
        raise caller.error or Unauthorized()
    if caller.principal.role not in access.roles:
        raise Forbidden()
    return caller.principal
