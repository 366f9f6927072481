"""Forward one request to an upstream service with the pooled client, and copy the answer back.

Plain-HTTP calls go through :class:`api.gateway.upstream.UpstreamClient` (``app.state.upstream_client``,
much cheaper per call); HEAD, HTTPS upstreams and apps without that client use the pooled httpx client.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from urllib.parse import quote

import httpx
from fastapi import Request, Response
from prometheus_client import CollectorRegistry, Counter

from api.gateway.rules import Upstream, gateway_location, upstream_path
from api.gateway.upstream import (
    UpstreamClient,
    UpstreamDisconnected,
    UpstreamReply,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from pms.errors import BadGateway, GatewayTimeout
from pms.security import Principal
from pms.web import REQUEST_ID_HEADER

log = logging.getLogger(__name__)

#: Request headers passed on; everything else (cookies, client-made X-User-*, hop-by-hop) stays here.
FORWARD_REQUEST_HEADERS = (
    "accept", "accept-language", "authorization", "content-type", "if-match", "if-none-match",
    "if-modified-since", "if-unmodified-since", "idempotency-key", "user-agent",
)
#: Response headers copied back to the caller.
COPY_RESPONSE_HEADERS = (
    "content-type", "location", "x-total-count", "etag", "last-modified", "retry-after", "www-authenticate",
    "cache-control", "content-disposition", "link", "allow", "content-language", "vary",
)
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


def upstream_error_counter(registry: CollectorRegistry) -> Counter:
    """``gateway_upstream_errors_total{upstream, kind}``: how often each upstream was down or slow."""
    return Counter("gateway_upstream_errors", "Upstream calls answered 502/504 by the gateway",
                   ["upstream", "kind"], registry=registry)


def upstream_target(upstream: Upstream, subpath: str) -> str:
    """The percent-encoded upstream path for a (decoded) gateway sub-path."""
    return upstream_path(upstream, quote(subpath, safe="/:@!$&'()*+,;=-._~"))


def build_headers(request: Request, principal: Principal | None) -> dict[str, str]:
    """The headers an upstream sees: the allowed ones, the request id, the caller's address and identity."""
    headers = {name: value for name in FORWARD_REQUEST_HEADERS if (value := request.headers.get(name)) is not None}
    headers[REQUEST_ID_HEADER] = request.state.request_id  # set by create_service_app's middleware
    if request.client is not None:
        # Replaced, not appended: the caller cannot choose the address the auth service limits by.
        headers["X-Forwarded-For"] = request.client.host
    headers["X-Forwarded-Proto"] = request.url.scheme
    if principal is not None:
        headers["X-User-Sub"] = principal.sub
        headers["X-User-Role"] = str(principal.role)
    return headers


async def forward(
    *,
    client: httpx.AsyncClient,
    request: Request,
    upstream: Upstream,
    base_url: str,
    path: str,
    principal: Principal | None,
) -> Response:
    """Send ``request`` to ``path`` on ``upstream`` and return its status, body and selected headers.

    Raises:
        BadGateway: the upstream refused the connection or broke it (502).
        GatewayTimeout: the upstream did not answer within the timeout (504).
    """
    url = base_url + path
    if request.url.query:
        url += "?" + request.url.query
    body = await request.body()
    headers = build_headers(request, principal)
    attempts = 2 if request.method in _IDEMPOTENT else 1
    fast: UpstreamClient | None = getattr(request.app.state, "upstream_client", None)
    if fast is not None and fast.supports(url, request.method):
        reply = await _forward_fast(fast, request, upstream, url, headers, body, attempts)
        return _response(reply.status_code, reply.content, reply.headers, upstream, base_url)
    for attempt in range(attempts):
        try:
            reply = await client.request(request.method, url, headers=headers, content=body)
            break
        except httpx.TimeoutException as exc:
            _count(request, upstream, "timeout")
            log.warning("upstream timeout", extra={"fields": {"upstream": str(upstream), "error": type(exc).__name__}})
            raise GatewayTimeout(f"The {upstream} service did not answer in time") from exc
        except httpx.RemoteProtocolError as exc:
            # A pooled keep-alive connection the upstream closed (e.g. it restarted): retry once if safe.
            if attempt + 1 < attempts:
                continue
            _count(request, upstream, "unavailable")
            raise _bad_gateway(upstream, exc) from exc
        except httpx.TransportError as exc:
            _count(request, upstream, "unavailable")
            raise _bad_gateway(upstream, exc) from exc
    return _response(reply.status_code, reply.content, reply.headers, upstream, base_url)


async def _forward_fast(client: UpstreamClient, request: Request, upstream: Upstream, url: str,
                        headers: dict[str, str], body: bytes, attempts: int) -> UpstreamReply:
    """The same call and error mapping as the httpx path, through :class:`UpstreamClient`."""
    for attempt in range(attempts):
        try:
            return await client.request(request.method, url, headers=headers, content=body)
        except UpstreamTimeout as exc:
            _count(request, upstream, "timeout")
            log.warning("upstream timeout", extra={"fields": {"upstream": str(upstream), "error": type(exc).__name__}})
            raise GatewayTimeout(f"The {upstream} service did not answer in time") from exc
        except UpstreamDisconnected as exc:
            # A pooled keep-alive connection the upstream closed (e.g. it restarted): retry once if safe.
            if attempt + 1 < attempts:
                continue
            _count(request, upstream, "unavailable")
            raise _bad_gateway(upstream, exc) from exc
        except UpstreamUnavailable as exc:
            _count(request, upstream, "unavailable")
            raise _bad_gateway(upstream, exc) from exc
    raise AssertionError("unreachable")  # pragma: no cover - every path above returns or raises


def _response(status_code: int, content: bytes, headers: Mapping[str, str], upstream: Upstream,
              base_url: str) -> Response:
    response = Response(content=content, status_code=status_code)
    for name in COPY_RESPONSE_HEADERS:
        value = headers.get(name)
        if value is None:
            continue
        if name == "location":
            value = gateway_location(upstream, value, base_url)
        response.headers[name] = value
    return response


def _count(request: Request, upstream: Upstream, kind: str) -> None:
    request.app.state.upstream_errors.labels(str(upstream), kind).inc()


def _bad_gateway(upstream: Upstream, exc: Exception) -> BadGateway:
    log.warning("upstream unavailable", extra={"fields": {"upstream": str(upstream), "error": type(exc).__name__}})
    return BadGateway(f"The {upstream} service is unavailable")
