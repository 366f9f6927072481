"""Fixtures for the dashboard tests: the stand-in gateway and AppTest helpers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from dashboard.client import AuthSession
from pms.settings import Settings
from tests.dashboard.stub_gateway import PASSWORD, USERS, StubGateway

APP = Path(__file__).resolve().parents[2] / "dashboard" / "streamlit_app.py"


@pytest.fixture(scope="session")
def stub_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(_env_file=None, data_dir=tmp_path_factory.mktemp("dash-data"))  # type: ignore[call-arg]


@pytest.fixture(scope="package")
def stub_server(stub_settings: Settings) -> Iterator[StubGateway]:
    server = StubGateway(stub_settings).start()
    yield server
    server.stop()


@pytest.fixture
def stub(stub_server: StubGateway) -> StubGateway:
    """The stand-in gateway, emptied and up, with one user per role."""
    stub_server.reset()
    st.cache_data.clear()
    return stub_server


def new_app(gateway_url: str) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=30)
    at.session_state["gateway_url"] = gateway_url
    return at


def signed_in_app(stub: StubGateway, role: str, *, ttl_s: int = 3600) -> AppTest:
    """An app already holding a valid token for ``role`` (the login flow has its own tests)."""
    at = new_app(stub.url)
    email = next(e for e, r in USERS.items() if r == role)
    at.session_state["auth"] = AuthSession(token=stub.token(role, ttl_s=ttl_s), role=role, email=email,
                                           expires_at=time.time() + ttl_s)
    return at


def login(at: AppTest, email: str, password: str = PASSWORD) -> AppTest:
    at.run()
    at.text_input(key="login_email").input(email)
    at.text_input(key="login_password").input(password)
    return at.form_submit_button[0].click().run()


def texts(elements: object) -> list[str]:
    return [str(e.value) for e in elements]  # type: ignore[attr-defined]


@pytest.fixture(scope="package")
def real_stack(servers: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The real services behind a real gateway (skips, naming them, when some have not landed).

    Package scope: started once for test_real_stack.py and test_e2e.py, stopped when the
    dashboard tests are done so it does not idle through the rest of the suite.
    """
    from tests.dashboard.stack import CORE, missing_services, running_stack

    missing = missing_services(CORE)
    if missing:
        pytest.skip(f"real stack not available yet: no code for {', '.join(missing)}")
    with running_stack(servers, tmp_path_factory.mktemp("dash-stack-logs")) as stack:  # type: ignore[arg-type]
        yield stack
