"""infra.healthcheck, the one probe the Dockerfile, compose and ECS task definitions run.

Real servers: a gRPC server with the standard health service and a plain HTTP server, each on
a free port; the check runs as the container runs it, `python -m infra.healthcheck NAME`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from infra import healthcheck
from pms.registry import by_name

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def grpc_health() -> Iterator[tuple[int, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, servicer
    server.stop(grace=None)


class _Handler(BaseHTTPRequestHandler):
    ready = True

    def do_GET(self) -> None:
        status = 200 if self.path in ("/ready", "/_stcore/health") and type(self).ready else 503
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture(scope="module")
def http_server() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    thread.join(timeout=5)


def run_check(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PMS_")}
    return subprocess.run(
        [sys.executable, "-m", "infra.healthcheck", *args],
        env={**base, "PMS_DATA_DIR": str(tmp_path), **env}, capture_output=True, text=True, timeout=60,
    )


def test_grpc_service_healthy_then_not_serving(tmp_path: Path, grpc_health: tuple[int, health.HealthServicer]) -> None:
    port, servicer = grpc_health
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert run_check(tmp_path, "billing", PMS_BILLING__PORT=str(port)).returncode == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        assert not healthcheck.check(by_name("billing"), host="127.0.0.1", port=port)
    finally:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)


def test_http_service_uses_its_port_and_probe_path(tmp_path: Path, http_server: int) -> None:
    # A service bound to 0.0.0.0 (as in containers) is probed over loopback; the name comes from PMS_SERVICE.
    env = {"PMS_GATEWAY__PORT": str(http_server), "PMS_GATEWAY__HOST": "0.0.0.0", "PMS_SERVICE": "gateway"}
    assert run_check(tmp_path, **env).returncode == 0
    dash = by_name("dashboard")
    assert dash.probe_path == "/_stcore/health"
    assert healthcheck.check(dash, host="127.0.0.1", port=http_server)
    _Handler.ready = False
    try:
        assert not healthcheck.check(by_name("gateway"), host="127.0.0.1", port=http_server)
    finally:
        _Handler.ready = True


def test_nothing_listening_is_unhealthy_not_a_crash(tmp_path: Path) -> None:
    from pms import process

    port = process.free_port()
    result = run_check(tmp_path, "patient", PMS_PATIENT__PORT=str(port))
    assert result.returncode == 1
    assert "patient is not ready" in result.stderr
    assert not healthcheck.check(by_name("billing"), host="127.0.0.1", port=port)


def test_unknown_or_missing_service_name_is_a_usage_error(tmp_path: Path) -> None:
    result = run_check(tmp_path, "nope")
    assert result.returncode == 2
    assert "unknown service" in result.stderr


def test_service_name_from_the_container_command_line() -> None:
    assert healthcheck.service_from_cmdline(b"/opt/venv/bin/python\0/opt/venv/bin/pms\0serve\0patient\0") == "patient"
    assert healthcheck.service_from_cmdline(b"pms\0serve\0") is None
    assert healthcheck.service_from_cmdline(b"") is None
    assert healthcheck.resolve_service(["auth"], {"PMS_SERVICE": "gateway"}) == "auth"
    assert healthcheck.resolve_service([], {"PMS_SERVICE": "gateway"}) == "gateway"
