"""Page logic against the real gateway, auth and patient services (real Postgres, broker, gRPC billing)."""

from __future__ import annotations

import re
import uuid
from datetime import date

import pytest
import streamlit as st

from dashboard.client import GatewayClient, PermissionDenied
from tests.dashboard.conftest import login, new_app, texts
from tests.dashboard.stack import ADMIN_EMAIL, ADMIN_PASSWORD, Stack

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(real_stack: Stack) -> Stack:
    st.cache_data.clear()
    return real_stack


def _register(at, **values: object) -> None:  # type: ignore[no-untyped-def]
    n = at.session_state["register_form_n"]
    for name, value in values.items():
        if isinstance(value, date):
            at.date_input(key=f"reg_{n}_{name}").set_value(value)
        elif name == "gender":
            at.selectbox(key=f"reg_{n}_{name}").select(value)
        else:
            at.text_input(key=f"reg_{n}_{name}").input(value)
    at.form_submit_button[0].click().run()


def test_login_wrong_and_right(stack: Stack) -> None:
    at = login(new_app(stack.gateway_url), ADMIN_EMAIL, "certainly-not-the-password")
    assert any("not correct" in t for t in texts(at.error))
    at = login(new_app(stack.gateway_url), ADMIN_EMAIL, ADMIN_PASSWORD)
    assert not at.exception
    assert at.session_state["auth"].role == "ADMIN"
    at.switch_page("app_pages/users.py").run()
    assert not at.exception
    assert any(re.fullmatch(r"\d+ accounts? · \d+ active", t) for t in texts(at.caption)), texts(at.caption)


def test_register_shows_real_field_errors_then_registers_and_finds(stack: Stack) -> None:
    at = login(new_app(stack.gateway_url), ADMIN_EMAIL, ADMIN_PASSWORD)
    at.switch_page("app_pages/register.py").run()
    _register(at, name="Grace Hopper", email="not an email", phone="12", address="1 Navy Way")
    assert not at.exception
    errors = texts(at.error)
    assert "Must be a valid email address" in errors, errors
    assert "Must be a valid phone number" in errors, errors
    assert "Field required" in errors, errors
    # Each reason is rendered right under its own field.
    left, right = (at.form[0].columns[i].children.values() for i in (0, 1))
    assert [type(e).__name__ for e in left] == ["TextInput", "TextInput", "Error", "TextInput", "Error", "TextInput"]
    assert [type(e).__name__ for e in right] == ["TextInput", "DateInput", "Error", "Selectbox", "DateInput"]
    assert stack.services["patient"].proc is not None

    unique = uuid.uuid4().hex[:8]
    _register(at, name=f"Grace Hopper {unique}", email=f"grace.{unique}@example.com", address="1 Navy Way",
              city="Arlington", phone="+1 202 456 1414", dateOfBirth=date(1956, 12, 9), gender="female")
    assert not at.exception
    success = texts(at.success)
    assert any("MRN" in t for t in success), (success, texts(at.error), texts(at.warning))

    at.switch_page("app_pages/patients.py").run()
    at.text_input(key="patients_q").input(unique).run()
    assert at.dataframe[0].value["Name"].tolist() == [f"Grace Hopper {unique}"]
    assert any("of **1**" in t for t in texts(at.caption))


def test_analyst_is_gated_in_the_ui_and_refused_by_the_server(stack: Stack) -> None:
    admin = GatewayClient(stack.gateway_url).login(email=ADMIN_EMAIL, password=ADMIN_PASSWORD)
    email = f"analyst.{uuid.uuid4().hex[:8]}@pms.local"
    at = new_app(stack.gateway_url)
    at.session_state["auth"] = admin
    at.run()
    at.switch_page("app_pages/users.py").run()
    at.text_input(key="user_0_email").input(email)
    at.text_input(key="user_0_password").input("analyst-password-long-enough")
    at.selectbox(key="user_0_role").select("ANALYST")
    at.form_submit_button[0].click().run()
    assert not at.exception and not texts(at.error), texts(at.error)

    at = login(new_app(stack.gateway_url), email, "analyst-password-long-enough")
    assert at.session_state["auth"].role == "ANALYST"
    with pytest.raises(ValueError, match="navigation page"):
        at.switch_page("app_pages/patients.py")
    with pytest.raises(PermissionDenied):
        GatewayClient(stack.gateway_url, at.session_state["auth"].token).list_patients()


def test_analytics_page_reads_the_real_analytics_api(stack: Stack) -> None:
    if not stack.has_analytics:
        pytest.skip("pipeline/analytics API not available in this checkout")
    at = login(new_app(stack.gateway_url), ADMIN_EMAIL, ADMIN_PASSWORD)
    at.switch_page("app_pages/analytics.py").run()
    assert not at.exception
    assert not texts(at.error), texts(at.error)
    tiles = {m.label: m.value for m in at.metric}
    assert set(tiles) == {"Active patients", "New today", "New in 7 days", "New in 30 days"}
    assert all(v.replace(",", "").isdigit() for v in tiles.values()), tiles
    assert any("as of" in t for t in texts(at.markdown))
