"""A small in-memory stand-in for the gateway, speaking the REST contract of DESIGN.md section 3.

The dashboard's page logic is tested against it where the real stack is not needed (or not
yet built): login with 401/429, roles, patient CRUD with per-field 400s, 409 on duplicate
email and stale ``If-Match``, ``possibleDuplicates``, audit, FHIR, analytics views, users.
It signs real JWTs with :mod:`pms.security`, answers errors in the one shape via
:mod:`pms.errors`, and can be switched "down" (every call 502) to test the banner.
It runs as a real HTTP server (uvicorn in a thread), so the client's real httpx path is used.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.responses import JSONResponse

from pms import process
from pms.errors import (
    BadGateway,
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    TooManyRequests,
    Unauthorized,
    error_response,
    install_error_handlers,
)
from pms.security import Principal, decode_token, encode_token
from pms.settings import Settings

PASSWORD = "correct-horse-battery-staple"
USERS = {"admin@pms.local": "ADMIN", "staff@pms.local": "STAFF", "analyst@pms.local": "ANALYST"}
PATIENT_FIELDS = {"name", "email", "address", "dateOfBirth", "registeredDate", "gender", "phone", "city"}
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


@dataclass
class StubState:
    patients: dict[str, dict[str, Any]] = field(default_factory=dict)
    audit: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: Counter[str] = field(default_factory=Counter)
    down: bool = False
    token_ttl_s: int | None = None
    next_mrn: int = 1000
    calls: Counter[str] = field(default_factory=Counter)
    last_query: dict[str, dict[str, str]] = field(default_factory=dict)
    revoked: set[str] = field(default_factory=set)
    #: path -> status the stand-in answers there instead (in the one error shape), e.g. a 500 on summary.
    fail: dict[str, int] = field(default_factory=dict)
    #: "METHOD /path" -> status answered AFTER the request was carried out (a write whose answer was lost).
    lose_answer: dict[str, int] = field(default_factory=dict)
    #: What the analytics answers say of the pipeline (False: its heartbeat stopped an hour ago).
    pipeline_running: bool = True


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _validate(body: Any, *, create: bool) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("Malformed JSON", errors={"body": "Expected a JSON object"})
    errors: dict[str, str] = {}
    for key in body.keys() - PATIENT_FIELDS:
        errors[key] = "Unknown field"
    name = str(body.get("name") or "").strip()
    if not name:
        errors["name"] = "Name is required"
    elif len(name) > 100:
        errors["name"] = "Name must be at most 100 characters"
    if not _EMAIL.match(str(body.get("email") or "")):
        errors["email"] = "Not a valid email address"
    if not str(body.get("address") or "").strip():
        errors["address"] = "Address is required"
    for key, required in (("dateOfBirth", True), ("registeredDate", create)):
        raw = body.get(key)
        if raw in (None, ""):
            if required:
                errors[key] = "Field required"
            continue
        try:
            value = date.fromisoformat(str(raw))
        except ValueError:
            errors[key] = "Must be an ISO date (YYYY-MM-DD)"
            continue
        if value > date.today():
            errors[key] = "Must not be in the future"
        elif value.year < 1900:
            errors[key] = "Must not be before 1900"
    if body.get("gender") not in (None, "", "male", "female", "other", "unknown"):
        errors["gender"] = "Must be one of male, female, other, unknown"
    phone = body.get("phone")
    if phone and not re.fullmatch(r"\+?[0-9 ()-]{6,20}", str(phone)):
        errors["phone"] = "Not a valid phone number"
    if errors:
        raise BadRequest("Validation failed", errors=errors)
    return {k: v for k, v in body.items() if v not in (None, "")}


def create_app(settings: Settings, state: StubState) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.middleware("http")
    async def _down(request: Request, call_next: Any) -> Response:
        state.calls[f"{request.method} {request.url.path}"] += 1
        state.last_query[request.url.path] = dict(request.query_params)
        if state.down and request.url.path != "/health":
            return error_response(502, "Upstream service unavailable")
        if request.url.path in state.fail:
            return error_response(state.fail[request.url.path], "Injected failure")
        response = await call_next(request)
        lost = state.lose_answer.get(f"{request.method} {request.url.path}")
        return error_response(lost, "Upstream service timed out") if lost else response

    def principal(authorization: str | None = Header(default=None)) -> Principal:
        if not authorization or not authorization.startswith("Bearer "):
            raise Unauthorized("Authentication required")
        verified = decode_token(settings, authorization.removeprefix("Bearer "))
        if verified.jti in state.revoked:
            raise Unauthorized("Token revoked; log in again")
        return verified

    def need(p: Principal, *roles: str) -> None:
        if str(p.role) not in roles:
            raise Forbidden()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "UP"}

    @app.post("/auth/login")
    def login(body: dict[str, Any]) -> dict[str, Any]:
        email = str(body.get("email") or "").strip().lower()
        if state.failures[email] >= 5:
            raise TooManyRequests("Too many failed logins", retry_after=300)
        user = state.users.get(email)
        if user is None or body.get("password") != user["password"] or not user["active"]:
            state.failures[email] += 1
            raise Unauthorized("Invalid email or password")
        ttl = state.token_ttl_s if state.token_ttl_s is not None else settings.jwt.ttl_s
        token = encode_token(settings, sub=email, role=user["role"], ttl_s=ttl)
        return {"token": token, "tokenType": "Bearer", "expiresIn": ttl, "role": user["role"]}

    @app.post("/auth/logout", status_code=204)
    def logout(p: Principal = Depends(principal)) -> Response:
        state.revoked.add(p.jti)
        return Response(status_code=204)

    @app.get("/auth/me")
    def me(p: Principal = Depends(principal)) -> dict[str, Any]:
        return {"email": p.sub, "role": str(p.role)}

    def _user_read(u: dict[str, Any]) -> dict[str, Any]:
        return {k: u[k] for k in ("id", "email", "role", "active", "createdAt", "updatedAt")}

    @app.get("/auth/users")
    def users(p: Principal = Depends(principal)) -> list[dict[str, Any]]:
        need(p, "ADMIN")
        return [_user_read(u) for u in state.users.values()]

    @app.post("/auth/users", status_code=201)
    def create_user(body: dict[str, Any], p: Principal = Depends(principal)) -> dict[str, Any]:
        need(p, "ADMIN")
        email = str(body.get("email") or "").strip().lower()
        errors = {}
        if not _EMAIL.match(email):
            errors["email"] = "Not a valid email address"
        if len(str(body.get("password") or "")) < 12:
            errors["password"] = "Password must be at least 12 characters"
        if body.get("role") not in ("ADMIN", "STAFF", "ANALYST"):
            errors["role"] = "Unknown role"
        if errors:
            raise BadRequest("Validation failed", errors=errors)
        if email in state.users:
            raise Conflict("Email already registered", errors={"email": "Email already registered"})
        state.users[email] = _new_user(email, str(body["password"]), str(body["role"]))
        return _user_read(state.users[email])

    @app.patch("/auth/users/{user_id}")
    def update_user(user_id: str, body: dict[str, Any], p: Principal = Depends(principal)) -> dict[str, Any]:
        need(p, "ADMIN")
        user = next((u for u in state.users.values() if u["id"] == user_id), None)
        if user is None:
            raise NotFound("User not found")
        if "role" in body:
            if body["role"] not in ("ADMIN", "STAFF", "ANALYST"):
                raise BadRequest("Validation failed", errors={"role": "Unknown role"})
            user["role"] = body["role"]
        if "active" in body:
            user["active"] = bool(body["active"])
        user["updatedAt"] = _now()
        return _user_read(user)

    def _live(pid: str) -> dict[str, Any]:
        patient = state.patients.get(pid)
        if patient is None or patient.get("_deleted"):
            raise NotFound("Patient not found")
        return patient

    def _public(patient: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in patient.items() if not k.startswith("_")}

    def _active() -> list[dict[str, Any]]:
        return [p for p in state.patients.values() if not p.get("_deleted")]

    def _email_taken(email: str, but: str | None = None) -> bool:
        return any(p["email"].lower() == email.lower() and p["id"] != but for p in _active())

    @app.get("/api/patients")
    def list_patients(response: Response, q: str = "", limit: int = 50, offset: int = 0,
                      p: Principal = Depends(principal)) -> list[dict[str, Any]]:
        need(p, "ADMIN", "STAFF")
        if not 1 <= limit <= 500 or offset < 0:
            raise BadRequest("Validation failed", errors={"limit": "Must be between 1 and 500"})
        term = q.strip().lower()
        found = [x for x in _active() if not term or any(term in str(x.get(k) or "").lower()
                                                        for k in ("name", "email", "mrn", "phone"))]
        found.sort(key=lambda x: (x["name"].lower(), x["id"]))
        response.headers["X-Total-Count"] = str(len(found))
        return [_public(x) for x in found[offset:offset + limit]]

    @app.post("/api/patients", status_code=201)
    def create_patient(body: dict[str, Any], response: Response, p: Principal = Depends(principal)) -> dict[str, Any]:
        need(p, "ADMIN", "STAFF")
        data = _validate(body, create=True)
        if _email_taken(data["email"]):
            raise Conflict("Email already used", errors={"email": "A patient with this email already exists"})
        duplicates = [{"id": x["id"], "mrn": x["mrn"], "name": x["name"], "dateOfBirth": x["dateOfBirth"],
                       "phone": x.get("phone"), "reasons": ["similar_name"], "score": 1.0}
                      for x in _active() if x.get("dateOfBirth") == data["dateOfBirth"]
                      and x["name"].lower() == data["name"].lower()]
        pid = str(uuid.uuid4())
        state.next_mrn += 1
        patient = {"id": pid, **data, "mrn": f"MRN{state.next_mrn}", "billingStatus": "ACTIVE",
                   "billingAccountId": f"BA-{state.next_mrn}", "version": 1, "createdAt": _now(), "updatedAt": _now()}
        state.patients[pid] = patient
        state.audit[pid] = [{"at": _now(), "actor": p.sub, "action": "CREATE", "fields": sorted(data),
                            "version": 1, "requestId": None}]
        response.headers["Location"] = f"/api/patients/{pid}"
        return {**_public(patient), "possibleDuplicates": duplicates}

    @app.get("/api/patients/{pid}")
    def get_patient(pid: str, p: Principal = Depends(principal)) -> dict[str, Any]:
        need(p, "ADMIN", "STAFF")
        return _public(_live(pid))

    @app.put("/api/patients/{pid}")
    def update_patient(pid: str, body: dict[str, Any], p: Principal = Depends(principal),
                       if_match: str | None = Header(default=None)) -> dict[str, Any]:
        need(p, "ADMIN", "STAFF")
        patient = _live(pid)
        if if_match is not None and if_match.strip('"') != str(patient["version"]):
            raise Conflict("Patient was changed by someone else",
                           errors={"version": f"Current version is {patient['version']}"})
        data = _validate(body, create=False)
        if _email_taken(data["email"], but=pid):
            raise Conflict("Email already used", errors={"email": "A patient with this email already exists"})
        changed = sorted(k for k, v in data.items() if patient.get(k) != v)
        for key in ("phone", "city", "gender"):
            patient.pop(key, None)
        patient.update(data)
        patient["version"] += 1
        patient["updatedAt"] = _now()
        state.audit[pid].append({"at": _now(), "actor": p.sub, "action": "UPDATE", "fields": changed,
                                 "version": patient["version"], "requestId": None})
        return _public(patient)

    @app.delete("/api/patients/{pid}", status_code=204)
    def delete_patient(pid: str, p: Principal = Depends(principal)) -> Response:
        need(p, "ADMIN", "STAFF")
        patient = _live(pid)
        patient["_deleted"] = True
        patient["_removed_on"] = date.today().isoformat()
        state.audit[pid].append({"at": _now(), "actor": p.sub, "action": "DELETE", "fields": [],
                                 "version": patient["version"] + 1, "requestId": None})
        return Response(status_code=204)

    @app.get("/api/patients/{pid}/audit")
    def audit(pid: str, p: Principal = Depends(principal)) -> list[dict[str, Any]]:
        need(p, "ADMIN")
        _live(pid)
        return state.audit[pid]

    @app.get("/api/patients/{pid}/fhir")
    def fhir(pid: str, p: Principal = Depends(principal)) -> JSONResponse:
        need(p, "ADMIN", "STAFF")
        x = _live(pid)
        return JSONResponse({"resourceType": "Patient", "id": pid,
                             "identifier": [{"system": "urn:pms:mrn", "value": x["mrn"]}],
                             "name": [{"text": x["name"]}], "birthDate": x["dateOfBirth"]},
                            media_type="application/fhir+json")

    # Analytics in the shapes of api/analytics/schemas.py: counts as {"value", "suppressed"},
    # rows under buckets/cells/cities/statuses, and a suppression object.
    def _analytics(p: Principal) -> dict[str, Any]:
        need(p, "ADMIN", "STAFF", "ANALYST")
        return {"applied": str(p.role) == "ANALYST", "threshold": 10}

    def _hide(n: int, suppression: dict[str, Any]) -> bool:
        return bool(suppression["applied"]) and 0 < n < suppression["threshold"]

    def _pipeline() -> dict[str, Any]:
        beat = datetime.now(UTC) - (timedelta(0) if state.pipeline_running else timedelta(hours=1))
        return {"running": state.pipeline_running, "heartbeatAt": beat.isoformat()}

    @app.get("/api/analytics/summary")
    def summary(p: Principal = Depends(principal)) -> dict[str, Any]:
        sup = _analytics(p)
        today = date.today()
        regs = [date.fromisoformat(x["registeredDate"]) for x in _active()]

        def count(n: int) -> dict[str, Any]:
            return {"value": None if _hide(n, sup) else n, "suppressed": _hide(n, sup)}

        return {"asOf": _now(), "activePatients": count(len(regs)), "newToday": count(sum(d == today for d in regs)),
                "new7d": count(sum(d > today - timedelta(days=7) for d in regs)),
                "new30d": count(sum(d > today - timedelta(days=30) for d in regs)),
                "removedTotal": count(sum(1 for x in state.patients.values() if x.get("_deleted"))),
                "lastEventAt": _now(), "lagMessages": 0, "pipeline": _pipeline(), "suppression": sup}

    @app.get("/api/analytics/registrations")
    def registrations(p: Principal = Depends(principal), granularity: str = "day",
                      start: date | None = Query(default=None, alias="from"),
                      end: date | None = Query(default=None, alias="to")) -> dict[str, Any]:
        sup = _analytics(p)
        if granularity not in ("day", "week", "month"):
            raise BadRequest("Validation failed", errors={"granularity": "Must be day, week or month"})
        if start and end and granularity == "day" and (end - start).days + 1 > 3700:  # the real API's limit
            raise BadRequest("Validation failed", errors={"from": "range too long for granularity 'day'"})
        per_day = Counter(x["registeredDate"] for x in state.patients.values())
        hidden = any(_hide(n, sup) for n in per_day.values())
        total = sum(per_day.values())
        return {"asOf": _now(), "granularity": granularity, "suppression": sup, "buckets": [
            {"period": d, "registrations": None if _hide(n, sup) else n, "removals": 0,
             "registrationsSuppressed": _hide(n, sup), "removalsSuppressed": False}
            for d, n in sorted(per_day.items())],
            # Like the real API: a total is hidden when it would reveal a hidden period.
            "totalRegistrations": {"value": None if hidden else total, "suppressed": hidden},
            "totalRemovals": {"value": 0, "suppressed": False}}

    @app.get("/api/analytics/demographics")
    def demographics(p: Principal = Depends(principal)) -> dict[str, Any]:
        sup = _analytics(p)
        cells: Counter[tuple[str, str]] = Counter()
        for x in _active():
            age = date.today().year - int(x["dateOfBirth"][:4])
            band = next(b for lo, b in ((80, "80+"), (65, "65-79"), (50, "50-64"), (35, "35-49"), (18, "18-34"),
                                        (0, "0-17")) if age >= lo)
            cells[(band, x.get("gender") or "unknown")] += 1
        return {"asOf": _now(), "suppression": sup, "cells": [
            {"ageBand": b, "gender": g, "patients": None if _hide(n, sup) else n, "suppressed": _hide(n, sup)}
            for (b, g), n in sorted(cells.items())]}

    @app.get("/api/analytics/geography")
    def geography(p: Principal = Depends(principal), top: int = 10) -> dict[str, Any]:
        sup = _analytics(p)
        cities = Counter(x.get("city") or "unknown" for x in _active())
        # As the analytics API: a city too small to show is left out and its patients counted in "other".
        shown = [(c, n) for c, n in cities.most_common(top) if not _hide(n, sup)]
        total = sum(cities.values())
        other = total - sum(n for _, n in shown)
        # "other" is hidden with the total (api/analytics/service.py), not on its own.
        return {"asOf": _now(), "suppression": sup, "cities": [
            {"city": c, "patients": n, "suppressed": False} for c, n in shown],
            "other": {"value": None if _hide(total, sup) else other, "suppressed": _hide(total, sup)}}

    @app.get("/api/analytics/billing")
    def billing(p: Principal = Depends(principal)) -> dict[str, Any]:
        sup = _analytics(p)
        statuses = Counter(x.get("billingStatus") or "unknown" for x in _active())
        return {"asOf": _now(), "suppression": sup, "statuses": [
            {"billingStatus": b, "patients": None if _hide(n, sup) else n, "suppressed": _hide(n, sup)}
            for b, n in sorted(statuses.items())]}

    @app.get("/api/analytics/freshness")
    def freshness(p: Principal = Depends(principal)) -> dict[str, Any]:
        _analytics(p)
        return {"asOf": _now(), "lastEventAt": _now(), "lagMessages": 0, "p50Ms": 40.0, "p99Ms": 180.0,
                "samples": len(state.patients), "eventsProcessed": len(state.patients), "pipeline": _pipeline()}

    @app.get("/boom")
    def boom() -> None:
        raise BadGateway()

    return app


def _new_user(email: str, password: str, role: str) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "email": email, "password": password, "role": role, "active": True,
            "createdAt": _now(), "updatedAt": _now()}


class StubGateway:
    """The stand-in running on a free localhost port in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state = StubState()
        self.reset()
        self.port = process.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(settings, self.state), host="127.0.0.1", port=self.port,
                                log_level="warning", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="stub-gateway", daemon=True)

    def reset(self) -> None:
        self.state.patients.clear()
        self.state.audit.clear()
        self.state.failures.clear()
        self.state.calls.clear()
        self.state.last_query.clear()
        self.state.revoked.clear()
        self.state.fail.clear()
        self.state.lose_answer.clear()
        self.state.down = False
        self.state.token_ttl_s = None
        self.state.users.clear()
        for email, role in USERS.items():
            self.state.users[email] = _new_user(email, PASSWORD, role)

    def token(self, role: str = "STAFF", *, ttl_s: int | None = None) -> str:
        email = next(e for e, r in USERS.items() if r == role)
        return encode_token(self.settings, sub=email, role=role, ttl_s=ttl_s)

    def start(self) -> StubGateway:
        self._thread.start()
        process.wait_until(lambda: self._server.started, timeout=15, message="stub gateway to start")
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
