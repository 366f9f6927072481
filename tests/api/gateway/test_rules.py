"""The gateway's policy and rate limiter as plain functions (no servers)."""

from __future__ import annotations

import pytest

from api.gateway.ratelimit import RateLimiter
from api.gateway.rules import (
    ADMIN_ONLY,
    ANALYTICS_ROLES,
    PATIENT_ROLES,
    Upstream,
    access_for,
    gateway_location,
    safe_subpath,
    upstream_path,
)
from pms.security import Role


@pytest.mark.parametrize(("upstream", "subpath", "roles"), [
    (Upstream.AUTH, "login", frozenset()),
    (Upstream.AUTH, "validate", frozenset()),
    (Upstream.AUTH, "me", frozenset()),
    (Upstream.AUTH, "me/password", frozenset()),
    (Upstream.AUTH, "users", ADMIN_ONLY),
    (Upstream.AUTH, "users/abc", ADMIN_ONLY),
    (Upstream.AUTH, "usersX", None),
    (Upstream.AUTH, "metrics", None),
    (Upstream.AUTH, "", None),
    (Upstream.AUTH, "me/../users", None),
    (Upstream.AUTH, "login/..", None),
    (Upstream.PATIENT, "", PATIENT_ROLES),
    (Upstream.PATIENT, "123/audit", ADMIN_ONLY),
    (Upstream.PATIENT, "123/fhir", PATIENT_ROLES),
    (Upstream.PATIENT, "../admin", None),
    (Upstream.ANALYTICS, "summary", ANALYTICS_ROLES),
    (Upstream.ANALYTICS, "a//b", None),
])
def test_access_rules(upstream: Upstream, subpath: str, roles: frozenset[Role] | None) -> None:
    access = access_for(upstream, subpath)
    assert (access.roles if access else None) == roles


def test_analyst_reads_analytics_only() -> None:
    assert Role.ANALYST in ANALYTICS_ROLES
    assert Role.ANALYST not in PATIENT_ROLES and Role.ANALYST not in ADMIN_ONLY
    assert Role.STAFF in ANALYTICS_ROLES and Role.STAFF not in ADMIN_ONLY


@pytest.mark.parametrize(("subpath", "ok"), [("", True), ("a/b/", True), ("a\\b", False), ("./a", False)])
def test_safe_subpath(subpath: str, ok: bool) -> None:
    assert safe_subpath(subpath) is ok


@pytest.mark.parametrize(("upstream", "subpath", "path"), [
    (Upstream.AUTH, "login", "/login"),
    (Upstream.PATIENT, "", "/patients"),
    (Upstream.PATIENT, "7", "/patients/7"),
    (Upstream.ANALYTICS, "summary", "/analytics/summary"),
])
def test_upstream_path(upstream: Upstream, subpath: str, path: str) -> None:
    assert upstream_path(upstream, subpath) == path


@pytest.mark.parametrize(("upstream", "location", "expected"), [
    (Upstream.PATIENT, "http://up:4000/patients/7", "/api/patients/7"),
    (Upstream.PATIENT, "/patients/7", "/api/patients/7"),
    (Upstream.PATIENT, "/patients?x=1", "/api/patients?x=1"),
    (Upstream.PATIENT, "/other/7", "/other/7"),
    (Upstream.PATIENT, "https://elsewhere.example/x", "https://elsewhere.example/x"),
    (Upstream.AUTH, "/users/9", "/auth/users/9"),
    (Upstream.AUTH, "http://up:4000/users/9", "/auth/users/9"),
    (Upstream.ANALYTICS, "/analytics/summary", "/api/analytics/summary"),
])
def test_location_rewrite(upstream: Upstream, location: str, expected: str) -> None:
    assert gateway_location(upstream, location, "http://up:4000") == expected


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_bucket() -> None:
    clock = FakeClock()
    limiter = RateLimiter(60, clock=clock)  # one per second sustained, bursts of 60
    assert all(limiter.hit("a") is None for _ in range(60))
    assert limiter.hit("a") == 1
    assert limiter.hit("b") is None  # callers are independent
    clock.now += 1.0
    assert limiter.hit("a") is None
    assert limiter.hit("a") == 1
    clock.now += 120
    assert all(limiter.hit("a") is None for _ in range(60))  # refilled, but never above the burst
    assert limiter.hit("a") is not None


def test_rate_limiter_retry_after_and_memory_bound() -> None:
    clock = FakeClock()
    limiter = RateLimiter(2, max_callers=3, clock=clock)
    limiter.hit("x")
    limiter.hit("x")
    assert limiter.hit("x") == 30  # 2 per minute: the next token comes in 30 s
    for key in ("p", "q", "r"):
        limiter.hit(key)
    assert len(limiter._buckets) == 3 and "x" not in limiter._buckets  # least recently seen forgotten
    with pytest.raises(ValueError):
        RateLimiter(0)
