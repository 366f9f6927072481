"""The write-path bench's load generator: every body sent exactly once, failures counted, not raised."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench.harness import post_load


class _Recorder(BaseHTTPRequestHandler):
    """Answers 201 to an even ``n``, 400 to an odd one; remembers every ``n`` and Authorization seen."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the bench's upstreams
    seen: list[int]
    auth: set[str]
    lock: threading.Lock

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            self.seen.append(body["n"])
            self.auth.add(self.headers.get("Authorization", ""))
        status = 201 if body["n"] % 2 == 0 else 400
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Recorder]]]:
    handler = type("Handler", (_Recorder,), {"seen": [], "auth": set(), "lock": threading.Lock()})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/patients", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_each_body_is_sent_once_and_non_201_answers_count_as_errors(server: tuple[str, type[_Recorder]]) -> None:
    url, handler = server
    result = post_load(url, [{"n": n} for n in range(50)], headers={"Authorization": "Bearer t"}, concurrency=8)
    assert sorted(handler.seen) == list(range(50))
    assert handler.auth == {"Bearer t"}
    assert result.ops == 50
    assert result.errors == 25
    assert len(result.latencies_ms) == 50
    assert result.seconds > 0


def test_a_refused_connection_is_an_error_not_an_exception() -> None:
    with ThreadingHTTPServer(("127.0.0.1", 0), _Recorder) as closed:
        port = closed.server_address[1]  # bound, then closed on leaving the block: nothing listens
    result = post_load(f"http://127.0.0.1:{port}/patients", [{"n": 0}, {"n": 2}], headers={}, concurrency=2)
    assert (result.ops, result.errors) == (2, 2)
