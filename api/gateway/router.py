"""The gateway's routes: every one checks the caller, applies the role rule and forwards."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request, Response

from api.gateway import proxy
from api.gateway.dependencies import authorize, http_client, identify, limit_rate
from api.gateway.rules import ALL_METHODS, DOCS, READ_METHODS, Upstream, access_for, base_url
from pms.errors import NotFound
from pms.security import get_app_settings

router = APIRouter()

_PROXY_DOC = {
    401: {"description": "Missing, invalid or expired token"},
    403: {"description": "Role not allowed"},
    429: {"description": "Too many requests (Retry-After)"},
    502: {"description": "Upstream unavailable"},
    504: {"description": "Upstream timed out"},
}


async def _proxy(request: Request, upstream: Upstream, subpath: str) -> Response:
    caller = identify(request)
    limit_rate(request, caller)
    access = access_for(upstream, subpath)
    if access is None:
        raise NotFound()
    principal = authorize(caller, access)
    return await proxy.forward(
        client=http_client(request),
        request=request,
        upstream=upstream,
        base_url=base_url(get_app_settings(request), upstream),
        path=proxy.upstream_target(upstream, subpath),
        principal=principal,
    )


async def auth_route(subpath: str, request: Request) -> Response:
    """Forward to the auth service with ``/auth`` stripped (user management: ADMIN only)."""
    return await _proxy(request, Upstream.AUTH, subpath)


async def patients_root(request: Request) -> Response:
    """Forward to the patient service's ``/patients`` (STAFF and ADMIN)."""
    return await _proxy(request, Upstream.PATIENT, "")


async def patients_route(subpath: str, request: Request) -> Response:
    """Forward to the patient service's ``/patients/...`` (STAFF and ADMIN)."""
    return await _proxy(request, Upstream.PATIENT, subpath)


async def analytics_route(subpath: str, request: Request) -> Response:
    """Forward reads to the analytics API's ``/analytics/...`` (ANALYST, STAFF, ADMIN)."""
    return await _proxy(request, Upstream.ANALYTICS, subpath)


def _forward_route(path: str, endpoint: Callable[..., Awaitable[Response]], methods: tuple[str, ...], tag: str) -> None:
    """One route per method: FastAPI gives every method of a multi-method route the same operationId,
    and OpenAPI requires them unique (generated clients refuse or overwrite duplicates)."""
    for method in methods:
        router.add_api_route(path, endpoint, methods=[method], tags=[tag], responses=_PROXY_DOC, response_model=None,
                             operation_id=f"{endpoint.__name__}_{method.lower()}")


_forward_route("/auth/{subpath:path}", auth_route, ALL_METHODS, "auth")
_forward_route("/api/patients", patients_root, ALL_METHODS, "patients")
_forward_route("/api/patients/{subpath:path}", patients_route, ALL_METHODS, "patients")
_forward_route("/api/analytics/{subpath:path}", analytics_route, READ_METHODS, "analytics")


@router.get("/api-docs/{service}", tags=["docs"], response_model=None,
            responses={404: {"description": "Unknown service"}, 502: {"description": "Service unavailable"}})
async def api_docs(service: str, request: Request) -> Response:
    """Return a service's OpenAPI document (as the seed's ``/api-docs/<service>``)."""
    upstream = DOCS.get(service)
    if upstream is None:
        raise NotFound("Unknown service", errors={"service": f"one of {', '.join(sorted(DOCS))}"})
    caller = identify(request)
    limit_rate(request, caller)
    return await proxy.forward(
        client=http_client(request),
        request=request,
        upstream=upstream,
        base_url=base_url(get_app_settings(request), upstream),
        path="/openapi.json",
        principal=caller.principal,
    )
