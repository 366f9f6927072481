"""Property-based API tests (Schemathesis) through the gateway, from the services' own OpenAPI documents.

The patient and analytics APIs are loaded from the gateway's ``/api-docs/<service>`` and every
operation is called through the gateway's ``/api`` prefix with a valid ADMIN token: positive
examples (valid by the schema), negative ones (invalid on purpose) and, for ``{patient_id}``
routes, examples on a real patient. No answer may be a 5xx, and every documented answer must
match its schema and content type. Examples are bounded (``MAX_EXAMPLES`` per operation).

The stack runs on the session's PostgreSQL and broker (nothing is killed here) with its own
ports, topic and an effectively unlimited gateway rate limit.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
)

from pms import db, process
from pms.security import encode_token
from pms.settings import Settings
from tests.faults.load import patient_body
from tests.faults.stack import PATIENT_KNOBS, Stack
from tests.fixtures.servers import TEST_AUTH_LIMITS, ServerSet

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

MAX_EXAMPLES = 25
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance, response_headers_conformance]
#: Start waves (parallel inside a wave); no pipeline: nothing here needs events.
WAVES = (("billing", "auth"), ("patient", "analytics"), ("gateway",))

#: Every operation of the two APIs, as (gateway docs name, method, path in the service's document).
OPERATIONS = [
    ("patients", "GET", "/patients"),
    ("patients", "POST", "/patients"),
    ("patients", "GET", "/patients/{patient_id}"),
    ("patients", "PUT", "/patients/{patient_id}"),
    ("patients", "DELETE", "/patients/{patient_id}"),
    ("patients", "GET", "/patients/{patient_id}/duplicates"),
    ("patients", "GET", "/patients/{patient_id}/fhir"),
    ("patients", "GET", "/patients/{patient_id}/audit"),
    ("analytics", "GET", "/analytics/summary"),
    ("analytics", "GET", "/analytics/registrations"),
    ("analytics", "GET", "/analytics/demographics"),
    ("analytics", "GET", "/analytics/geography"),
    ("analytics", "GET", "/analytics/billing"),
    ("analytics", "GET", "/analytics/freshness"),
]
#: Routes of the service itself, not served under the gateway's /api prefix.
SERVICE_ONLY = {"/health", "/ready", "/metrics"}


@dataclass
class Api:
    base_url: str
    token: str
    documents: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def schema(self, service: str) -> Any:
        return schemathesis.openapi.from_dict(self.documents[service])

    def new_patient(self) -> str:
        response = httpx.post(f"{self.base_url}/patients", json=patient_body(int(uuid.uuid4().int % 10_000)),
                              headers=self.headers, timeout=15)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])


def _settings(servers: ServerSet) -> Settings:
    port = process.free_port
    kafka = {**servers.settings.kafka.model_dump(), "topic": f"schemathesis-{uuid.uuid4().hex[:10]}"}
    return servers.make_settings(
        kafka=kafka, patient={"port": port(), **PATIENT_KNOBS}, auth={"port": port(), **TEST_AUTH_LIMITS},
        gateway={"port": port(), "rate_limit_per_minute": 1_000_000}, analytics={"port": port()},
        billing={"port": port(), "metrics_port": port()}, dashboard={"port": port()}, pipeline={"port": port()},
    )


@pytest.fixture(scope="module")
def api(servers: ServerSet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    settings = _settings(servers)
    db.migrate(settings, "analytics")  # the pipeline owns these tables; the API only reads them
    stack = Stack(settings, None, None, Path(tmp_path_factory.mktemp("schemathesis-logs")))
    try:
        for wave in WAVES:
            stack.start_services(wave)
        api = Api(stack.gateway_url + "/api", encode_token(settings, sub="schemathesis", role="ADMIN"))
        for service in ("patients", "analytics"):
            response = httpx.get(f"{stack.gateway_url}/api-docs/{service}", headers=api.headers, timeout=10)
            assert response.status_code == 200, response.text
            api.documents[service] = response.json()
        yield api
    finally:
        stack.stop()


def test_every_operation_of_the_documents_is_covered(api: Api) -> None:
    documented = {
        (service, method.upper(), path)
        for service, document in api.documents.items()
        for path, operations in document["paths"].items() if path not in SERVICE_ONLY
        for method in operations
    }
    assert documented == set(OPERATIONS)


def _strategy(api: Api, operation: Any, path: str) -> Any:
    strategies = [operation.as_strategy(generation_mode=GenerationMode.POSITIVE)]
    if operation.body or any(True for _ in operation.iter_parameters()):
        strategies.append(operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))
    if "{patient_id}" in path:
        # Random ids only ever find nothing: also aim at a real patient (one per operation).
        strategies.append(operation.as_strategy(path_parameters={"patient_id": api.new_patient()}))
    return st.one_of(strategies)


def _valid_case(api: Api, operation: Any, method: str, path: str) -> Any:
    """One request that must succeed, so a wrong token or route cannot pass as 'no 5xx'."""
    kwargs: dict[str, Any] = {}
    if "{patient_id}" in path:
        kwargs["path_parameters"] = {"patient_id": api.new_patient()}
    if method in ("POST", "PUT"):
        body = patient_body(int(uuid.uuid4().int % 10_000))
        if method == "PUT":
            body.pop("registeredDate")
        kwargs["body"] = body
        kwargs["media_type"] = "application/json"
    return operation.Case(**kwargs)


#: Real findings, reported to the owners and marked here (strict: the mark must go when they are fixed).
KNOWN: dict[tuple[str, str], pytest.MarkDecorator] = {}


def _params() -> list[Any]:
    return [pytest.param(service, method, path, id=f"{method} {path}",
                         marks=[KNOWN[(method, path)]] if (method, path) in KNOWN else [])
            for service, method, path in OPERATIONS]


@pytest.mark.parametrize("service", ["patients", "analytics"])
def test_documents_list_the_status_answered_for_invalid_input(api: Api, service: str) -> None:
    """Clients generated from the OpenAPI must learn that bad input answers 400, not FastAPI's 422."""
    document = api.documents[service]
    undocumented = [
        f"{method.upper()} {path}"
        for path, operations in document["paths"].items() if path not in SERVICE_ONLY
        for method, operation in operations.items()
        if operation.get("parameters") or operation.get("requestBody")
        if "400" not in operation.get("responses", {}) or "422" in operation.get("responses", {})
    ]
    assert not undocumented, undocumented


@pytest.mark.parametrize(("service", "method", "path"), _params())
def test_no_server_error_and_answers_match_the_schema(api: Api, service: str, method: str, path: str) -> None:
    operation = api.schema(service)[path][method]
    valid = _valid_case(api, operation, method, path).call_and_validate(
        base_url=api.base_url, headers=api.headers, checks=CHECKS, timeout=15)
    assert 200 <= valid.status_code < 300, (valid.status_code, valid.text[:300])

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck))
    @given(case=_strategy(api, operation, path))
    def run(case: Any) -> None:
        case.call_and_validate(base_url=api.base_url, headers=api.headers, checks=CHECKS, timeout=15)

    run()
