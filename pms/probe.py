"""Readiness probes of the registry's services, the one implementation.

The supervisor, ``pms status``, the container HEALTHCHECK, the test fixtures and the benchmarks
all ask "is this service ready?" the same way: ``GET <probe_path>`` answers 200, or the standard
gRPC health service answers SERVING.
"""

from __future__ import annotations

from pms.registry import Probe, ServiceSpec


def http_ready(url: str, *, timeout: float = 1.0) -> bool:
    """Whether ``GET url`` answers 200 right now."""
    import httpx

    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def grpc_serving(address: str, *, timeout: float = 1.0) -> bool:
    """Whether the standard gRPC health service at ``address`` answers SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


def probe(kind: str, host: str, port: int, path: str, *, timeout: float = 1.0) -> bool:
    """Run one readiness probe (``http``: GET path answers 200; ``grpc``: health SERVING)."""
    if kind == Probe.GRPC:
        return grpc_serving(f"{host}:{port}", timeout=timeout)
    return http_ready(f"http://{host}:{port}{path}", timeout=timeout)


def ready(spec: ServiceSpec, *, host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether ``spec`` answers its readiness probe on ``host:port``."""
    return probe(spec.probe, host, port, spec.probe_path, timeout=timeout)
