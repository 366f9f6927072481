"""The OpenAPI documents say what the services answer: 400 (the one error shape) for bad input, never 422.

``pms.errors`` turns every request validation error into a 400 ``{"message", "errors"}`` in all
services, and ``pms.web.create_service_app`` documents it that way. Building the apps needs no
server: only the documents are read here (the 400 answers themselves are tested per service, and
by Schemathesis in tests/faults against the running stack).
"""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Query
from fastapi.testclient import TestClient
from jsonschema import Draft202012Validator

from pms.settings import Settings
from pms.web import create_service_app, document_validation_as_400

SERVICES = ("api.auth.main", "api.patient.main", "api.analytics.main", "api.gateway.main")
ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}


@pytest.fixture(scope="module")
def app_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(_env_file=None, data_dir=Path(tmp_path_factory.mktemp("openapi")))  # type: ignore[call-arg]


def _operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method.upper(), path, operation) for path, operations in document["paths"].items()
            for method, operation in operations.items()]


@pytest.mark.parametrize("module", SERVICES)
def test_no_service_documents_422_and_bad_input_is_a_documented_400(module: str, app_settings: Settings) -> None:
    app: FastAPI = importlib.import_module(module).create_app(app_settings)
    document = app.openapi()
    text = json.dumps(document)
    assert '"422"' not in text
    assert "HTTPValidationError" not in text and "#/components/schemas/ValidationError" not in text
    takes_input = [(m, p, op) for m, p, op in _operations(document) if op.get("parameters") or op.get("requestBody")]
    assert takes_input, module
    for method, path, operation in takes_input:
        answer = operation["responses"].get("400")
        assert answer is not None, (module, method, path)
        assert answer["content"]["application/json"]["schema"] == ERROR_REF, (module, method, path)
    error = document["components"]["schemas"]["ErrorBody"]
    assert error["required"] == ["message"] and set(error["properties"]) == {"message", "errors"}
    assert app.openapi() == document  # asked again (served per request): the same document


@pytest.mark.parametrize("module", SERVICES)
def test_every_operation_id_is_unique(module: str, app_settings: Settings) -> None:
    """OpenAPI requires it, and generated clients name their methods by it. FastAPI gave every method of a
    multi-method route (the gateway's forwarding routes) one id, with a warning."""
    app: FastAPI = importlib.import_module(module).create_app(app_settings)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Duplicate Operation ID ..." is a UserWarning
        document = app.openapi()
    ids = [operation["operationId"] for _method, _path, operation in _operations(document)]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


def test_the_analytics_400_answer_matches_its_documented_schema(app_settings: Settings) -> None:
    from api.analytics.main import create_app
    from pms.security import Role, encode_token

    app = create_app(app_settings)
    document = app.openapi()
    token = encode_token(app_settings, sub="someone@pms.local", role=Role.ANALYST)
    with TestClient(app) as client:  # validation answers before any database access
        answer = client.get("/analytics/geography?top=0", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 400
    documented = document["paths"]["/analytics/geography"]["get"]["responses"]
    assert documented["400"]["content"]["application/json"]["schema"] == ERROR_REF
    schema = {**document["components"]["schemas"]["ErrorBody"], "components": document["components"]}
    Draft202012Validator(schema).validate(answer.json())
    assert set(documented) >= {"200", "400", "401", "403", "503"}
    assert "Retry-After" in documented["503"]["headers"]


def test_an_operation_with_its_own_400_keeps_it_and_plain_documents_are_untouched(app_settings: Settings) -> None:
    app = create_service_app(name="probe", settings=app_settings, title="probe")

    @app.get("/own", responses={400: {"description": "mine"}})
    def own(x: int = Query()) -> dict[str, int]:
        return {"x": x}

    @app.get("/own-schema", responses={400: {"description": "mine", "content": {"text/plain": {}}}})
    def own_schema(x: int = Query()) -> dict[str, int]:
        return {"x": x}

    @app.get("/plain")
    def plain() -> dict[str, str]:
        return {}

    document = app.openapi()
    assert document["paths"]["/own"]["get"]["responses"]["400"] == {
        "description": "mine", "content": {"application/json": {"schema": ERROR_REF}}}
    assert document["paths"]["/own-schema"]["get"]["responses"]["400"] == {
        "description": "mine", "content": {"text/plain": {}}}
    assert "422" not in document["paths"]["/own"]["get"]["responses"]
    assert set(document["paths"]["/plain"]["get"]["responses"]) == {"200"}
    untouched = {"paths": {"/x": {"get": {"responses": {"200": {"description": "ok"}}}}}}
    assert document_validation_as_400(json.loads(json.dumps(untouched)))["paths"] == untouched["paths"]
