"""Tiny stand-ins for the patient and analytics services, served by real uvicorn servers in threads.

They behave like the real services at the HTTP level (token check, list + X-Total-Count,
201 + Location, ETag, 204) and record what reached them, so tests can see exactly what the
gateway forwarded -- and what it did not.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from pms import process
from pms.errors import PMSError, install_error_handlers
from pms.security import bearer_token, decode_token
from pms.settings import Settings

ECHO_HEADERS = ("x-request-id", "x-user-sub", "x-user-role", "x-forwarded-for", "authorization", "cookie",
                "x-pms-client-address", "x-pms-client-address-signature",
                "if-match")


@dataclass
class Seen:
    """What one stand-in received: method, path, query and the headers tests care about."""

    requests: list[dict[str, Any]] = field(default_factory=list)

    def request_ids(self) -> set[str]:
        return {r["headers"].get("x-request-id", "") for r in self.requests}


def _record(seen: Seen, request: Request) -> dict[str, Any]:
    entry = {
        "method": request.method,
        "path": request.url.path,
        "query": request.url.query,
        "headers": {k: v for k in ECHO_HEADERS if (v := request.headers.get(k)) is not None},
    }
    seen.requests.append(entry)
    return entry


def _check_token(settings: Settings, request: Request) -> None:
    """Defence in depth, like the real services: verify the token again."""
    decode_token(settings, bearer_token(request))


def patient_app(settings: Settings, seen: Seen, public_base: str) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    patients: dict[str, dict[str, Any]] = {}

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Response:
        if request.url.path.startswith("/patients"):
            _record(seen, request)
            try:
                _check_token(settings, request)
            except PMSError as exc:
                return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
        return await call_next(request)

    @app.get("/patients")
    def list_patients(request: Request, response: Response) -> list[dict[str, Any]]:
        response.headers["X-Total-Count"] = str(len(patients))
        return list(patients.values())

    @app.post("/patients", status_code=201)
    async def create(request: Request, response: Response) -> dict[str, Any]:
        body = await request.json()
        pid = str(uuid.uuid4())
        patients[pid] = {"id": pid, **body, "version": 1}
        response.headers["Location"] = f"{public_base}/patients/{pid}"  # absolute, as FastAPI's url_for gives
        return patients[pid]

    @app.get("/patients/echo")
    def echo(request: Request) -> dict[str, Any]:
        return seen.requests[-1]

    @app.get("/patients/slow")
    async def slow() -> dict[str, str]:
        await asyncio.sleep(5)  # slower than the gateway's upstream timeout in the tests
        return {"status": "late"}

    @app.get("/patients/{pid}")
    def get(pid: str, response: Response) -> dict[str, Any]:
        if pid not in patients:
            raise _not_found()
        response.headers["ETag"] = f'"{patients[pid]["version"]}"'
        return patients[pid]

    @app.put("/patients/{pid}")
    async def put(pid: str, request: Request) -> dict[str, Any]:
        if pid not in patients:
            raise _not_found()
        patients[pid] = {**patients[pid], **(await request.json()), "version": patients[pid]["version"] + 1}
        return patients[pid]

    @app.delete("/patients/{pid}", status_code=204)
    def delete(pid: str) -> Response:
        if patients.pop(pid, None) is None:
            raise _not_found()
        return Response(status_code=204)

    return app


def _not_found() -> PMSError:
    from pms.errors import NotFound

    return NotFound("Patient not found")


def analytics_app(settings: Settings, seen: Seen) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/analytics/{name}")
    def view(name: str, request: Request) -> dict[str, Any]:
        _record(seen, request)
        _check_token(settings, request)
        return {"view": name, "query": request.url.query}

    return app


class ThreadServer:
    """A uvicorn server in a thread on a fixed port; can be stopped and started again."""

    def __init__(self, app: FastAPI, port: int) -> None:
        self.app = app
        self.port = port
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ThreadServer:
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_config=None, access_log=False,
                                lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        server = self.server
        process.wait_until(lambda: server.started, timeout=10, message="stand-in upstream to start",
                           alive=lambda: self.thread is not None and self.thread.is_alive())
        return self

    def stop(self) -> None:
        if self.server is not None and self.thread is not None:
            self.server.should_exit = True
            self.thread.join(timeout=10)
        self.server = None
        self.thread = None
