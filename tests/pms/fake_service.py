"""A stand-in service for the supervisor tests (the real services are written elsewhere).

``python -m tests.pms.fake_service MODE PORT``:
- ``http``: answers ``/ready`` and ``/health`` with 200, ``/config`` with digests of the
  secrets it received (so a test can check the children share the supervisor's config);
- ``grpc``: a gRPC server whose standard health service answers SERVING;
- ``crash``: prints a failure line and exits with code 3 (like a module that cannot import);
- ``never-ready``: listens, but ``/ready`` answers 503 forever;
- ``stubborn``: like ``http`` but ignores SIGTERM (only SIGKILL stops it);
- ``chatty``: like ``http`` and prints a numbered 100-byte line every 2 ms (to fill its log).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CRASH_MESSAGE = "fake failure: this stand-in cannot start"
CRASH_EXIT_CODE = 3


def digest(name: str) -> str:
    return hashlib.sha256(os.environ.get(name, "").encode()).hexdigest()


class Handler(BaseHTTPRequestHandler):
    ready = True

    def do_GET(self) -> None:
        if self.path == "/config":
            body = json.dumps({
                "jwt": digest("PMS_JWT__SECRET"),
                "admin": digest("PMS_ADMIN_PASSWORD"),
                "data_dir": os.environ.get("PMS_DATA_DIR", ""),
            }).encode()
            status = 200
        elif self.path in ("/ready", "/health"):
            status = 200 if (self.ready or self.path == "/health") else 503
            body = b'{"status": "ok"}' if status == 200 else b'{"status": "starting"}'
        else:
            status, body = 404, b"{}"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def serve_http(port: int, *, ready: bool, then: Callable[[], None] | None = None) -> None:
    Handler.ready = ready
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"fake http service listening on {port}", flush=True)
    if then is not None:  # after the first line, so a log's first line is always this one
        then()
    server.serve_forever()


def serve_grpc(port: int) -> None:
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"fake grpc service listening on {port}", flush=True)
    server.wait_for_termination()


def chatter() -> None:
    """Numbered lines, so a test can see that a rotated log continues where its copy ends."""
    number = 0
    stop = threading.Event()
    while not stop.wait(0.002):
        print(f"chatty line {number:08d} " + "." * 78, flush=True)
        number += 1


def main(argv: list[str]) -> None:
    mode, port = argv[0], int(argv[1])
    if mode == "crash":
        print(CRASH_MESSAGE, file=sys.stderr, flush=True)
        sys.exit(CRASH_EXIT_CODE)
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    then = threading.Thread(target=chatter, daemon=True).start if mode == "chatty" else None
    if mode == "grpc":
        serve_grpc(port)
    else:
        serve_http(port, ready=mode != "never-ready", then=then)


if __name__ == "__main__":
    main(sys.argv[1:])
