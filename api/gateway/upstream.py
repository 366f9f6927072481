"""A small keep-alive HTTP/1.1 client for the gateway's upstream calls.

Why not httpx here: the gateway forwards every API call, and profiling the write bench
showed httpx + httpcore + h11 + anyio costing ~2-3 ms of CPU per forwarded create -- more
than the patient service spent on the create's own Python -- in request/response models,
URL merging, pure-Python HTTP parsing, two socket writes per request and the connection
pool's bookkeeping. This client writes each request in one ``transport.write``, parses the
answer with ``httptools`` (llhttp, the parser uvicorn uses) and keeps idle connections per
upstream for reuse.

It is deliberately small: one request per connection at a time, whole bodies in memory
(the gateway forwards JSON bodies bounded by ``max_body_bytes``), no redirects, no proxies,
no TLS (upstreams are local services; HTTPS URLs, HEAD and anything unusual go through
httpx in :mod:`api.gateway.proxy`). Errors map to the exceptions proxy.forward already
handles: :class:`UpstreamTimeout` (504), :class:`UpstreamUnavailable` (502) and
:class:`UpstreamDisconnected` (a reused keep-alive connection the upstream had closed:
retried once when the method is idempotent).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools

#: Largest upstream answer kept in memory (an OpenAPI document is ~100 KB; a list page less).
MAX_RESPONSE_BYTES = 64 * 1024 * 1024


class UpstreamError(Exception):
    """The upstream gave no usable answer."""


class UpstreamTimeout(UpstreamError):
    """No complete answer within the timeout."""


class UpstreamUnavailable(UpstreamError):
    """Connection refused or broken before an answer."""


class UpstreamDisconnected(UpstreamUnavailable):
    """A reused idle connection was closed by the upstream before it answered (safe to retry once)."""


@dataclass(slots=True)
class UpstreamReply:
    status_code: int
    #: Header names lower-cased; repeated headers joined with ", " (none of the copied ones repeat).
    headers: dict[str, str]
    content: bytes


@dataclass(slots=True)
class _Answer:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    header_name: bytes = b""


class _Connection(asyncio.Protocol):
    """One upstream connection; answers one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._waiter: asyncio.Future[UpstreamReply] | None = None
        self._answer = _Answer()
        self._parser = httptools.HttpResponseParser(self)
        self._received_any = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._received_any = True
        if self._waiter is None:  # bytes nobody asked for: the connection is unusable
            self._fail(UpstreamUnavailable("unexpected bytes from upstream"))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamUnavailable(f"malformed upstream answer: {type(exc).__name__}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            if not self._received_any:
                self._waiter.set_exception(UpstreamDisconnected("upstream closed the connection"))
            else:
                self._waiter.set_exception(UpstreamUnavailable("upstream closed the connection mid-answer"))

    # -- httptools callbacks
    def on_status(self, status: bytes) -> None:
        self._answer.status = self._parser.get_status_code()

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        previous = self._answer.headers.get(key)
        self._answer.headers[key] = text if previous is None else f"{previous}, {text}"

    def on_body(self, body: bytes) -> None:
        self._answer.body += body
        if len(self._answer.body) > MAX_RESPONSE_BYTES:
            self._fail(UpstreamUnavailable("upstream answer too large"))

    def on_message_complete(self) -> None:
        answer, waiter = self._answer, self._waiter
        self._answer, self._waiter = _Answer(), None
        if not self._parser.should_keep_alive():
            self.close()
        if waiter is not None and not waiter.done():
            waiter.set_result(UpstreamReply(answer.status or self._parser.get_status_code(), answer.headers,
                                            bytes(answer.body)))

    # -- use
    def send(self, data: bytes, loop: asyncio.AbstractEventLoop) -> asyncio.Future[UpstreamReply]:
        assert self.transport is not None and self._waiter is None
        self._waiter = loop.create_future()
        self._received_any = False
        self.transport.write(data)
        return self._waiter

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        self.close()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamClient:
    """Keep-alive connections per (host, port); ``request`` sends one request and reads the whole answer."""

    def __init__(self, *, timeout: float, connect_timeout: float, max_idle_per_host: int = 64) -> None:
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_idle_per_host = max_idle_per_host
        self._idle: dict[tuple[str, int], deque[_Connection]] = {}
        self._closed = False

    @staticmethod
    def supports(url: str, method: str) -> bool:
        """Whether this client handles the call (plain http, a method whose answer has a body)."""
        return url.startswith("http://") and method != "HEAD"

    async def request(self, method: str, url: str, *, headers: dict[str, str], content: bytes) -> UpstreamReply:
        """Send one request and return the complete answer.

        Raises:
            UpstreamTimeout: no complete answer within ``timeout`` (connecting: ``connect_timeout``).
            UpstreamDisconnected: a reused connection turned out closed (nothing was answered).
            UpstreamUnavailable: refused, reset, or a malformed answer.
        """
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        head = [f"{method} {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n"]
        for name, value in headers.items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                continue  # never let a header value split the request (h11 refuses them too)
            head.append(f"{name}: {value}\r\n")
        head.append(f"Content-Length: {len(content)}\r\n\r\n")
        data = "".join(head).encode("latin-1", errors="replace") + content

        loop = asyncio.get_running_loop()
        connection, reused = await self._acquire(loop, host, port)
        try:
            async with asyncio.timeout(self.timeout):
                reply = await connection.send(data, loop)
        except TimeoutError as exc:
            connection.close()
            raise UpstreamTimeout(f"no answer from {host}:{port} in {self.timeout} s") from exc
        except UpstreamDisconnected:
            connection.close()
            if reused:
                raise
            raise UpstreamUnavailable(f"{host}:{port} closed the connection") from None
        except BaseException:
            connection.close()
            raise
        self._release((host, port), connection)
        return reply

    async def _acquire(self, loop: asyncio.AbstractEventLoop, host: str, port: int) -> tuple[_Connection, bool]:
        idle = self._idle.get((host, port))
        while idle:
            connection = idle.pop()
            if not connection.closed and connection.transport is not None and not connection.transport.is_closing():
                return connection, True
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, protocol = await loop.create_connection(_Connection, host, port)
        except TimeoutError as exc:
            raise UpstreamTimeout(f"connecting to {host}:{port} timed out") from exc
        except OSError as exc:
            raise UpstreamUnavailable(f"cannot connect to {host}:{port}: {type(exc).__name__}") from exc
        return protocol, False

    def _release(self, key: tuple[str, int], connection: _Connection) -> None:
        if connection.closed or self._closed:
            connection.close()
            return
        idle = self._idle.setdefault(key, deque())
        if len(idle) >= self.max_idle_per_host:
            connection.close()
            return
        idle.append(connection)

    async def aclose(self) -> None:
        """Close every idle connection; requests in flight close theirs when they end."""
        self._closed = True
        for idle in self._idle.values():
            while idle:
                with contextlib.suppress(Exception):
                    idle.pop().close()
        self._idle.clear()
