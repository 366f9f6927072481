"""Forward one request to an upstream service with the pooled aiohttp session, and copy the answer back.

Why aiohttp: the gateway forwards every API call, so its upstream client is on the hot path. httpx
(+ httpcore, h11, anyio) cost about half of the gateway's CPU per forwarded create; a hand-rolled
httptools client (``88bbec9``) was cheap but was ours to keep safe (smuggling, header handling,
chunked edge cases). aiohttp's client parses with its C (llhttp) parser, pools keep-alive
connections, refuses CR/LF in headers and is maintained by others; measured in the same runs, it
costs about as much gateway CPU per forwarded create as the httptools client (docs: Auth service
and API gateway).

The session is built by :func:`upstream_session` (once, in the gateway's lifespan) so that the
tests drive the very same configuration.
"""

from __future__ import annotations

import logging
from urllib.parse import quote

import aiohttp
from fastapi import Request, Response
from multidict import CIMultiDictProxy
from prometheus_client import CollectorRegistry, Counter
from yarl import URL

from api.gateway.rules import Upstream, gateway_location, upstream_path
from pms import forwarding
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
#: Pooled connections per upstream: the bench's 64 in flight plus headroom; beyond it a call waits for
#: a free connection (inside the same timeout) instead of opening ever more sockets.
CONNECTIONS_PER_UPSTREAM = 100
#: Idle connections are dropped after this many seconds: below uvicorn's 5 s ``timeout_keep_alive``, so
#: the gateway seldom sends on a connection the upstream is just closing.
KEEPALIVE_S = 4.0
#: Largest upstream answer kept in memory (an OpenAPI document is ~100 KB; a list page less). Larger: 502.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
#: Headers aiohttp would otherwise add on its own: the upstream sees only what the caller sent
#: (no ``Content-Type: application/octet-stream`` invented for a body without one, no compression).
_NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "Content-Type", "User-Agent")


class _TooLarge(Exception):
    """The upstream answer exceeds :data:`MAX_RESPONSE_BYTES`."""


def upstream_session(*, timeout: float, connect_timeout: float) -> aiohttp.ClientSession:
    """The gateway's one upstream session (create it inside the running event loop).

    ``trust_env=False``: never route patient data through a proxy from the environment (nor read
    ``.netrc``). ``DummyCookieJar``: a cookie one caller's answer set must never ride along on
    another caller's request. Redirects are not followed (``forward`` passes them back).
    aiohttp retries an idempotent request once when a connection breaks before the answer starts
    (a pooled keep-alive connection the upstream closed, e.g. while restarting; RFC 9112 9.3.1);
    POST and PATCH are never retried.
    """
    connector = aiohttp.TCPConnector(
        limit=3 * CONNECTIONS_PER_UPSTREAM,  # auth, patient, analytics
        limit_per_host=CONNECTIONS_PER_UPSTREAM,
        keepalive_timeout=KEEPALIVE_S,
    )
    return aiohttp.ClientSession(
        connector=connector,
        # total: the whole call (waiting for a pooled connection, sending, the full answer) -> 504.
        timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout),
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=_NO_AUTO_HEADERS,
        raise_for_status=False,
    )


def upstream_error_counter(registry: CollectorRegistry) -> Counter:
    """``gateway_upstream_errors_total{upstream, kind}``: how often each upstream was down or slow."""
    return Counter("gateway_upstream_errors", "Upstream calls answered 502/504 by the gateway",
                   ["upstream", "kind"], registry=registry)


def upstream_target(upstream: Upstream, subpath: str) -> str:
    """The percent-encoded upstream path for a (decoded) gateway sub-path."""
    return upstream_path(upstream, quote(subpath, safe="/:@!$&'()*+,;=-._~"))


def client_address(request: Request) -> str:
    """The caller's address: the connection's, or the browser's when the dashboard vouches for it.

    Logins through the dashboard all arrive from the dashboard's address; counted by it, one person
    typing wrong passwords would lock every member of staff out (see :mod:`pms.forwarding`).
    """
    state = request.state
    if getattr(state, "client_address", None) is None:
        peer = request.client.host if request.client else "unknown"
        vouched = forwarding.verified_address(request.app.state.forwarding_key,
                                              request.headers.get(forwarding.ADDRESS_HEADER),
                                              request.headers.get(forwarding.SIGNATURE_HEADER))
        state.client_address = vouched or peer
    return str(state.client_address)


def build_headers(request: Request, principal: Principal | None) -> dict[str, str]:
    """The headers an upstream sees: the allowed ones, the request id, the caller's address and identity."""
    headers = {name: value for name in FORWARD_REQUEST_HEADERS if (value := request.headers.get(name)) is not None}
    headers[REQUEST_ID_HEADER] = request.state.request_id  # set by create_service_app's middleware
    # Replaced, not appended: the caller cannot choose the address the auth service limits by.
    headers["X-Forwarded-For"] = client_address(request)
    headers["X-Forwarded-Proto"] = request.url.scheme
    if principal is not None:
        headers["X-User-Sub"] = principal.sub
        headers["X-User-Role"] = str(principal.role)
    # Never let a value split the request: aiohttp would refuse the whole call (a 500); drop the header.
    return {name: value for name, value in headers.items() if not _breaks_line(name) and not _breaks_line(value)}


def _breaks_line(text: str) -> bool:
    return "\r" in text or "\n" in text or "\0" in text


async def forward(
    *,
    client: aiohttp.ClientSession,
    request: Request,
    upstream: Upstream,
    base_url: str,
    path: str,
    principal: Principal | None,
) -> Response:
    """Send ``request`` to ``path`` on ``upstream`` and return its status, body and selected headers.

    Raises:
        BadGateway: the upstream refused the connection, broke it or answered garbage (502).
        GatewayTimeout: the upstream did not answer within the timeout (504).
    """
    url = base_url + path
    if request.url.query:
        url += "?" + request.url.query
    body = await request.body()
    # HEAD is the upstream's GET without the body (FastAPI routes answer GET only; uvicorn sends no
    # body for HEAD), so every readable route answers HEAD as the README's route table says.
    method = "GET" if request.method == "HEAD" else request.method
    try:
        # encoded=True: the path was percent-encoded by upstream_target; send it exactly as built.
        async with client.request(method, URL(url, encoded=True), headers=build_headers(request, principal),
                                  data=body or None, allow_redirects=False) as reply:
            content = await _read_bounded(reply)
            return _response(reply.status, content, reply.headers, upstream, base_url)
    except TimeoutError as exc:  # aiohttp's ServerTimeoutError and the session's total timeout
        _count(request, upstream, "timeout")
        log.warning("upstream timeout", extra={"fields": {"upstream": str(upstream), "error": type(exc).__name__}})
        raise GatewayTimeout(f"The {upstream} service did not answer in time") from exc
    except (aiohttp.ClientError, _TooLarge) as exc:  # refused, reset, closed mid-answer, malformed, too large
        _count(request, upstream, "unavailable")
        raise _bad_gateway(upstream, exc) from exc


async def _read_bounded(reply: aiohttp.ClientResponse) -> bytes:
    """The whole answer body, refusing one larger than :data:`MAX_RESPONSE_BYTES`."""
    length = reply.content_length
    if length is not None:
        if length > MAX_RESPONSE_BYTES:
            raise _TooLarge(f"answer of {length} bytes")
        return await reply.read()  # the parser stops at Content-Length
    content = bytearray()
    async for chunk in reply.content.iter_any():
        content += chunk
        if len(content) > MAX_RESPONSE_BYTES:
            raise _TooLarge("chunked answer over the limit")
    return bytes(content)


def _response(status_code: int, content: bytes, headers: CIMultiDictProxy[str], upstream: Upstream,
              base_url: str) -> Response:
    response = Response(content=content, status_code=status_code)
    for name in COPY_RESPONSE_HEADERS:
        values = headers.getall(name, ())
        if not values:
            continue
        value = values[0] if len(values) == 1 else ", ".join(values)
        if name == "location":
            value = gateway_location(upstream, value, base_url)
        response.headers[name] = value
    return response


def _count(request: Request, upstream: Upstream, kind: str) -> None:
    request.app.state.upstream_errors.labels(str(upstream), kind).inc()


def _bad_gateway(upstream: Upstream, exc: Exception) -> BadGateway:
    log.warning("upstream unavailable", extra={"fields": {"upstream": str(upstream), "error": type(exc).__name__}})
    return BadGateway(f"The {upstream} service is unavailable")
