"""The gateway's forwarding through aiohttp against a raw asyncio upstream whose bytes each test chooses.

The real gateway app (``create_app``: its lifespan builds the one upstream session) runs in-process
with its patient upstream pointed at the raw server, so every case goes through the router, the role
check and ``proxy.forward``'s error mapping: reuse, chunked, close, timeout, refused, garbage, a
dropped or stale connection, header injection, cookies, redirects, proxies from the environment and
the response size bound.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from api.gateway import proxy
from api.gateway.main import create_app
from pms import process
from pms.security import Role, encode_token
from pms.settings import Settings

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Upstream"], Awaitable[None]]
TIMEOUT_S = 0.5


@dataclass
class Upstream:
    port: int
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0


@dataclass
class Gateway:
    client: httpx.AsyncClient
    upstream: Upstream
    token: str

    def auth(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", **extra}


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + (await reader.readexactly(length) if length else b"")


def _ok(body: bytes, *extra: bytes, status: bytes = b"200 OK") -> bytes:
    return b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncontent-length: " + (
        str(len(body)).encode()) + b"".join(b"\r\n" + h for h in extra) + b"\r\n\r\n" + body


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateway-proxy")


@asynccontextmanager
async def gateway_to(handler: Handler | None, data_dir: Path, *, sub: str = "staff@clinic.example.org"
                     ) -> AsyncIterator[Gateway]:
    """A raw upstream running ``handler`` per connection (None: a port nobody listens on), and the real
    gateway app forwarding to it."""
    upstream = Upstream(port=process.free_port())

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream.connections += 1
        try:
            assert handler is not None
            await handler(reader, writer, upstream)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async with AsyncExitStack() as stack:
        if handler is not None:
            server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
            upstream.port = server.sockets[0].getsockname()[1]
            await stack.enter_async_context(server)
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None, data_dir=data_dir,
            patient={"port": upstream.port},
            auth={"port": process.free_port()},  # nobody there: the revocation list stays empty (fail-open)
            gateway={"upstream_timeout_s": TIMEOUT_S},
        )
        app = create_app(settings)
        await stack.enter_async_context(app.router.lifespan_context(app))
        client = await stack.enter_async_context(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway.test"))
        yield Gateway(client, upstream, encode_token(settings, sub=sub, role=Role.STAFF, ttl_s=600))


def _error_shape(reply: httpx.Response) -> bool:
    return set(reply.json()) == {"message", "errors"}


async def _errors_counted(gateway: Gateway, kind: str) -> float:
    metrics = (await gateway.client.get("/metrics")).text
    for line in metrics.splitlines():
        if line.startswith("gateway_upstream_errors_total{") and f'kind="{kind}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_keep_alive_reuse_request_shape_and_answer_headers(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy from the environment must be ignored (trust_env off): nothing listens there.
    dead_proxy = f"http://127.0.0.1:{process.free_port()}"
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, dead_proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream) -> None:
        while True:
            upstream.requests.append(await _read_request(reader))
            writer.write(_ok(b'{"n": %d}' % len(upstream.requests), b"Location: /patients/1", b"X-Total-Count: 7",
                             b"Vary: Accept", b"Vary: Accept-Language", b"Set-Cookie: sid=secret-of-caller-1",
                             b"X-Internal: not-copied", status=b"201 Created"))
            await writer.drain()

    async def run() -> None:
        async with gateway_to(handler, data_dir) as gw:
            first = await gw.client.post("/api/patients?x=1", content=b'{"a": 1}',
                                         headers=gw.auth(**{"Content-Type": "application/json",
                                                            "X-Request-ID": "r1", "Cookie": "c=1"}))
            second = await gw.client.get("/api/patients/a%20b%C3%A9", headers=gw.auth())
            requests, connections = gw.upstream.requests, gw.upstream.connections
        assert (first.status_code, first.content, second.content) == (201, b'{"n": 1}', b'{"n": 2}')
        assert first.headers["location"] == "/api/patients/1" and first.headers["x-total-count"] == "7"
        # Repeated headers joined, as before (CORS appends its own ", Origin").
        assert first.headers["vary"].startswith("Accept, Accept-Language")
        assert "set-cookie" not in first.headers and "x-internal" not in first.headers
        assert connections == 1  # the second call reused the first connection
        post, get = requests
        assert post.startswith(f"POST /patients?x=1 HTTP/1.1\r\nHost: 127.0.0.1:{gw.upstream.port}\r\n".encode())
        assert b"X-Request-ID: r1\r\n" in post and b"X-User-Sub: staff@clinic.example.org\r\n" in post
        assert b"content-type: application/json\r\n" in post and post.endswith(b'\r\n\r\n{"a": 1}')
        assert b"Content-Length: 8\r\n" in post
        assert get.startswith(b"GET /patients/a%20b%C3%A9 HTTP/1.1\r\n")  # the encoded path is sent as built
        for request in requests:
            lowered = request.lower()
            # No cookie of the caller, none stored from another answer; nothing aiohttp adds by itself.
            assert b"cookie" not in lowered and b"aiohttp" not in lowered and b"accept-encoding" not in lowered
        assert b"content-type" not in get.lower()  # no body, no invented Content-Type

    asyncio.run(run())


def test_chunked_answers_and_connection_close_are_understood(data_dir: Path) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream) -> None:
        upstream.requests.append(await _read_request(reader))
        writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n"
                     b"connection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        await writer.drain()

    async def run() -> None:
        async with gateway_to(handler, data_dir) as gw:
            for _ in range(2):
                reply = await gw.client.get("/api/patients/x", headers=gw.auth())
                assert (reply.status_code, reply.content) == (404, b"hello world")
            assert gw.upstream.connections == 2  # "connection: close" answers are never reused

    asyncio.run(run())


def test_redirects_are_passed_back_not_followed(data_dir: Path) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream) -> None:
        while True:
            upstream.requests.append(await _read_request(reader))
            location = f"Location: http://127.0.0.1:{upstream.port}/patients/7".encode()
            writer.write(_ok(b"", location, status=b"302 Found"))
            await writer.drain()

    async def run() -> None:
        async with gateway_to(handler, data_dir) as gw:
            reply = await gw.client.get("/api/patients/old", headers=gw.auth())
            assert reply.status_code == 302 and reply.headers["location"] == "/api/patients/7"
            assert len(gw.upstream.requests) == 1

    asyncio.run(run())


def test_refused_slow_malformed_and_dropped_upstreams_map_to_502_and_504(data_dir: Path) -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream) -> None:
        upstream.requests.append(await _read_request(reader))
        await asyncio.sleep(30)  # fault injection: an upstream that never answers (the gateway times out)

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream) -> None:
        upstream.requests.append(await _read_request(reader))
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream) -> None:
        upstream.requests.append(await _read_request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"partial\"")  # then closed mid-body
        await writer.drain()

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream) -> None:
        upstream.requests.append(await _read_request(reader))  # read it, then close without a word

    async def call(handler: Handler | None, method: str = "GET") -> tuple[httpx.Response, float, Gateway]:
        async with gateway_to(handler, data_dir) as gw:
            started = time.perf_counter()
            reply = await gw.client.request(method, "/api/patients", headers=gw.auth(), content=b"{}")
            elapsed = time.perf_counter() - started
            kind = "timeout" if reply.status_code == 504 else "unavailable"
            assert await _errors_counted(gw, kind) == 1, (handler, method)
            return reply, elapsed, gw

    async def run() -> None:
        reply, elapsed, _ = await call(None)  # refused
        assert reply.status_code == 502 and _error_shape(reply) and elapsed < TIMEOUT_S
        assert reply.json()["message"] == "The patient service is unavailable"
        reply, elapsed, gw = await call(slow)
        assert reply.status_code == 504 and _error_shape(reply) and len(gw.upstream.requests) == 1
        assert TIMEOUT_S <= elapsed < TIMEOUT_S + 2
        for handler in (garbage, cut):
            reply, _, gw = await call(handler, "POST")
            assert reply.status_code == 502 and _error_shape(reply) and len(gw.upstream.requests) == 1
        # A dropped POST is not retried (it may have been done); a dropped GET is, once (aiohttp's
        # RFC 9112 retry of idempotent requests), then it is a 502 too.
        for method, attempts in (("POST", 1), ("GET", 2)):
            reply, _, gw = await call(drop, method)
            assert reply.status_code == 502 and len(gw.upstream.requests) == attempts, method

    asyncio.run(run())


def test_a_stale_keep_alive_connection_is_retried_for_idempotent_calls_only(data_dir: Path) -> None:
    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream) -> None:
        upstream.requests.append(await _read_request(reader))
        writer.write(_ok(b"{}"))
        await writer.drain()
        upstream.requests.append(await _read_request(reader))  # the next one on this connection: closed unanswered

    async def run() -> None:
        async with gateway_to(once, data_dir) as gw:
            assert (await gw.client.get("/api/patients/a", headers=gw.auth())).status_code == 200
            # The upstream closes only after reading the next request: the client cannot see it coming.
            retried = await gw.client.get("/api/patients/b", headers=gw.auth())
            assert retried.status_code == 200 and gw.upstream.connections == 2
            stale_post = await gw.client.post("/api/patients", headers=gw.auth(), content=b"{}")
            assert stale_post.status_code == 502 and _error_shape(stale_post)
            paths = [request.split(b" ", 2)[:2] for request in gw.upstream.requests]
            assert paths == [[b"GET", b"/patients/a"], [b"GET", b"/patients/b"], [b"GET", b"/patients/b"],
                             [b"POST", b"/patients"]]
            assert gw.upstream.connections == 2  # the POST was sent once, on the stale connection, not again

    asyncio.run(run())


def test_header_injection_through_the_identity_is_dropped(data_dir: Path) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream) -> None:
        upstream.requests.append(await _read_request(reader))
        writer.write(_ok(b"[]"))
        await writer.drain()

    async def run() -> None:
        # A subject with CR/LF (a token signed with the real key) must not split the upstream request.
        async with gateway_to(handler, data_dir, sub="x@clinic.example.org\r\nX-Injected: 1") as gw:
            reply = await gw.client.get("/api/patients", headers=gw.auth(Accept="application/json"))
            assert reply.status_code == 200
            (request,) = gw.upstream.requests
        assert b"X-Injected" not in request and b"X-User-Sub" not in request
        assert b"X-User-Role: STAFF\r\n" in request and b"accept: application/json\r\n" in request

    asyncio.run(run())


def test_answers_over_the_size_bound_are_502(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy, "MAX_RESPONSE_BYTES", 1000)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream) -> None:
        while True:
            request = await _read_request(reader)
            upstream.requests.append(request)
            size = int(request.split(b" ", 2)[1].rsplit(b"/", 1)[1])
            if b"chunked" in request:
                chunk = b"x" * size
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                             + f"{size:x}\r\n".encode() + chunk + b"\r\n0\r\n\r\n")
            else:
                writer.write(_ok(b"x" * size))
            await writer.drain()

    async def run() -> None:
        async with gateway_to(handler, data_dir) as gw:
            for mode in ("length", "chunked"):
                headers = gw.auth(**({"Idempotency-Key": "chunked"} if mode == "chunked" else {}))
                ok = await gw.client.get("/api/patients/1000", headers=headers)
                assert ok.status_code == 200 and ok.content == b"x" * 1000, mode
                too_big = await gw.client.get("/api/patients/1001", headers=headers)
                assert too_big.status_code == 502 and _error_shape(too_big), mode

    asyncio.run(run())
