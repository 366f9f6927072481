"""The gateway's keep-alive upstream client against a raw asyncio server whose bytes each test chooses."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from api.gateway.upstream import (
    UpstreamClient,
    UpstreamDisconnected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from pms import process

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, list[bytes]], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + (await reader.readexactly(length) if length else b"")


def _ok(body: bytes, *extra: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: " + str(len(body)).encode() + (
        b"".join(b"\r\n" + h for h in extra)) + b"\r\n\r\n" + body


async def _serve(handler: Handler) -> tuple[asyncio.Server, int, list[bytes], list[int]]:
    """A server on a free port; ``requests`` collects raw requests, ``connections`` counts accepts."""
    requests: list[bytes] = []
    connections: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await handler(reader, writer, requests)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], requests, connections


def _client(**kwargs: float) -> UpstreamClient:
    return UpstreamClient(timeout=kwargs.get("timeout", 5.0), connect_timeout=kwargs.get("connect_timeout", 2.0))


def test_one_request_per_write_keep_alive_reuse_and_the_answer_copied() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, requests: list[bytes]) -> None:
        while True:
            requests.append(await _read_request(reader))
            writer.write(_ok(b'{"n": %d}' % len(requests), b"Location: /patients/1", b"X-Total-Count: 7"))
            await writer.drain()

    async def run() -> None:
        server, port, requests, connections = await _serve(handler)
        client = _client()
        async with server:
            first = await client.request("POST", f"http://127.0.0.1:{port}/patients?x=1",
                                         headers={"content-type": "application/json", "X-Request-ID": "r1"},
                                         content=b'{"a": 1}')
            second = await client.request("GET", f"http://127.0.0.1:{port}/patients", headers={}, content=b"")
            await client.aclose()
        assert (first.status_code, first.content, second.content) == (200, b'{"n": 1}', b'{"n": 2}')
        assert first.headers["location"] == "/patients/1" and first.headers["x-total-count"] == "7"
        assert len(connections) == 1  # the second call reused the first connection
        assert requests[0].startswith(b"POST /patients?x=1 HTTP/1.1\r\nHost: 127.0.0.1:")
        assert b"X-Request-ID: r1\r\n" in requests[0] and requests[0].endswith(b'Content-Length: 8\r\n\r\n{"a": 1}')

    asyncio.run(run())


def test_chunked_answers_and_connection_close_are_understood() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, requests: list[bytes]) -> None:
        requests.append(await _read_request(reader))
        writer.write(b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
                     b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        await writer.drain()

    async def run() -> None:
        server, port, _, connections = await _serve(handler)
        client = _client()
        async with server:
            for _ in range(2):
                reply = await client.request("GET", f"http://127.0.0.1:{port}/x", headers={}, content=b"")
                assert (reply.status_code, reply.content) == (404, b"hello world")
            await client.aclose()
        assert len(connections) == 2  # "connection: close" answers are never reused

    asyncio.run(run())


def test_refused_slow_malformed_and_dropped_upstreams_raise_the_mapped_errors() -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, requests: list[bytes]) -> None:
        requests.append(await _read_request(reader))
        await asyncio.sleep(30)  # fault injection: an upstream that never answers (the client times out)

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, requests: list[bytes]) -> None:
        requests.append(await _read_request(reader))
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, requests: list[bytes]) -> None:
        requests.append(await _read_request(reader))  # read it, then close without a word

    async def run() -> None:
        with pytest.raises(UpstreamUnavailable):
            await _client().request("GET", f"http://127.0.0.1:{process.free_port()}/", headers={}, content=b"")
        for handler, error in ((slow, UpstreamTimeout), (garbage, UpstreamUnavailable), (drop, UpstreamUnavailable)):
            server, port, requests, _ = await _serve(handler)
            async with server:
                with pytest.raises(error) as caught:
                    await _client(timeout=0.5).request("GET", f"http://127.0.0.1:{port}/", headers={}, content=b"")
            assert requests, handler.__name__
            # A fresh connection that closes is an outage (502), not the retryable stale keep-alive case.
            assert not isinstance(caught.value, UpstreamDisconnected)

    asyncio.run(run())


def test_a_reused_connection_the_upstream_closed_is_retryable_and_header_injection_is_dropped() -> None:
    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, requests: list[bytes]) -> None:
        requests.append(await _read_request(reader))
        writer.write(_ok(b"{}"))
        await writer.drain()
        await _read_request(reader)  # the next request on this connection: closed unanswered

    async def run() -> None:
        server, port, requests, _ = await _serve(once)
        client = _client()
        async with server:
            reply = await client.request("GET", f"http://127.0.0.1:{port}/a",
                                         headers={"X-Evil": "x\r\nX-Injected: 1", "Accept": "application/json"},
                                         content=b"")
            assert reply.status_code == 200
            # The server closes only after reading the next request: the client cannot see it coming.
            with pytest.raises(UpstreamDisconnected):
                await client.request("GET", f"http://127.0.0.1:{port}/b", headers={}, content=b"")
            await client.aclose()
        assert b"X-Injected" not in requests[0] and b"Accept: application/json\r\n" in requests[0]

    asyncio.run(run())


def test_https_and_head_are_left_to_httpx() -> None:
    client = _client()
    assert client.supports("http://127.0.0.1:4000/patients", "POST")
    assert not client.supports("https://patient.internal/patients", "GET")
    assert not client.supports("http://127.0.0.1:4000/patients", "HEAD")
