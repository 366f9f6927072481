"""Page logic with Streamlit's AppTest against the stand-in gateway (a real HTTP server)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta

import httpx
import pytest
from streamlit.testing.v1 import AppTest

from dashboard.client import AuthSession, GatewayClient
from pms import process
from pms.settings import get_settings
from tests.dashboard.conftest import login, new_app, signed_in_app, texts
from tests.dashboard.stub_gateway import PASSWORD, StubGateway


def _patient(n: int, **extra: str) -> dict[str, str]:
    return {"name": f"Patient {n:03d}", "email": f"p{n}@example.com", "address": f"{n} High St",
            "dateOfBirth": "1970-01-01", "registeredDate": date.today().isoformat(), "city": "Leeds", **extra}


def _seed(stub: StubGateway, count: int) -> list[str]:
    c = GatewayClient(stub.url, stub.token("STAFF"))
    return [c.create_patient(_patient(n)).patient["id"] for n in range(count)]


# --- login -----------------------------------------------------------------------------------


def test_signed_out_shows_only_the_login_page(stub: StubGateway) -> None:
    at = new_app(stub.url).run()
    assert not at.exception
    assert "Patient Management" in at.title[0].value
    assert at.text_input(key="login_email") is not None
    with pytest.raises(ValueError, match="navigation page"):
        at.switch_page("app_pages/patients.py")


def test_wrong_login_says_so_and_keeps_no_token(stub: StubGateway) -> None:
    at = login(new_app(stub.url), "staff@pms.local", "not-the-password")
    assert any("not correct" in t for t in texts(at.error))
    assert "auth" not in at.session_state


def test_empty_login_is_refused_without_a_call(stub: StubGateway) -> None:
    at = login(new_app(stub.url), "", "")
    assert any("Enter your e-mail and password" in t for t in texts(at.error))
    assert stub.state.calls["POST /auth/login"] == 0


def test_too_many_attempts_says_when_to_retry(stub: StubGateway) -> None:
    at = new_app(stub.url)
    for _ in range(5):
        login(at, "staff@pms.local", "wrong-password")
    at = login(at, "staff@pms.local", PASSWORD)
    assert any("Too many sign-in attempts" in t and "300 s" in t for t in texts(at.error))
    assert "auth" not in at.session_state


def test_login_while_the_gateway_is_unreachable_shows_the_banner(stub: StubGateway) -> None:
    at = login(new_app(f"http://127.0.0.1:{process.free_port()}"), "staff@pms.local")
    assert not at.exception
    assert any("not reachable" in t for t in texts(at.error))
    assert "auth" not in at.session_state
    assert at.text_input(key="login_email").value == "staff@pms.local"  # the form keeps what was typed


def test_login_opens_the_staff_pages_and_forgets_the_password(stub: StubGateway) -> None:
    at = login(new_app(stub.url), "staff@pms.local")
    assert not at.exception
    auth = at.session_state["auth"]
    assert isinstance(auth, AuthSession) and auth.role == "STAFF"
    assert "login_password" not in at.session_state
    assert at.title[0].value.endswith("Patients")
    at.switch_page("app_pages/register.py").run()
    assert at.title[0].value.endswith("Register patient")
    with pytest.raises(ValueError, match="navigation page"):
        at.switch_page("app_pages/users.py")


def test_sign_out_returns_to_login_and_gives_the_token_up(stub: StubGateway) -> None:
    at = login(new_app(stub.url), "staff@pms.local")
    token = at.session_state["auth"].token
    at.button(key="sign_out").click().run()
    assert "auth" not in at.session_state
    assert any("signed out" in t for t in texts(at.info))
    assert at.session_state["gateway_url"] == stub.url
    assert stub.state.calls["POST /auth/logout"] == 1
    assert httpx.get(stub.url + "/auth/me", headers={"Authorization": f"Bearer {token}"}).status_code == 401


def test_sign_out_still_signs_out_when_the_gateway_is_down(stub: StubGateway) -> None:
    at = login(new_app(stub.url), "staff@pms.local")
    stub.state.down = True
    at.button(key="sign_out").click().run()
    assert not at.exception
    assert "auth" not in at.session_state
    assert any("signed out" in t for t in texts(at.info))


def test_expired_token_sends_back_to_login_with_a_note(stub: StubGateway) -> None:
    # The server refuses the token although the dashboard thinks it is still valid (revoked/expired).
    at = signed_in_app(stub, "STAFF")
    at.session_state["auth"] = AuthSession(token=stub.token("STAFF", ttl_s=-60), role="STAFF",
                                           email="staff@pms.local", expires_at=time.time() + 600)
    at.run()
    assert not at.exception
    assert "auth" not in at.session_state
    assert any("session has expired" in t for t in texts(at.info))


def test_locally_expired_session_goes_to_login_without_calling(stub: StubGateway) -> None:
    at = signed_in_app(stub, "STAFF")
    at.session_state["auth"] = AuthSession(token=stub.token("STAFF"), role="STAFF", email="staff@pms.local",
                                           expires_at=time.time() - 1)
    at.run()
    assert "auth" not in at.session_state
    assert any("session has expired" in t for t in texts(at.info))
    assert stub.state.calls["GET /api/patients"] == 0


def test_gateway_down_shows_a_banner_and_recovers(stub: StubGateway) -> None:
    at = signed_in_app(stub, "STAFF")
    stub.state.down = True
    at.run()
    assert not at.exception
    assert any("not reachable" in t for t in texts(at.error))
    stub.state.down = False
    at.run()
    assert not any("not reachable" in t for t in texts(at.error))
    assert any("No patients yet" in t for t in texts(at.info))


# --- role gating -----------------------------------------------------------------------------


def test_server_refusal_is_a_banner_not_a_stack_trace(stub: StubGateway) -> None:
    # The session still says ADMIN but the token is a STAFF one (role changed since sign-in).
    at = signed_in_app(stub, "ADMIN")
    at.session_state["auth"] = AuthSession(token=stub.token("STAFF"), role="ADMIN", email="admin@pms.local",
                                           expires_at=time.time() + 600)
    at.run()
    at.switch_page("app_pages/users.py").run()
    assert not at.exception
    assert any("Your role does not allow this" in t for t in texts(at.error))
    assert stub.state.calls["GET /auth/users"] == 1


def test_analyst_sees_analytics_only(stub: StubGateway) -> None:
    at = signed_in_app(stub, "ANALYST").run()
    assert not at.exception
    assert at.title[0].value.endswith("Analytics")
    for page in ("app_pages/patients.py", "app_pages/register.py", "app_pages/users.py"):
        with pytest.raises(ValueError, match="navigation page"):
            at.switch_page(page)


def test_audit_tab_is_for_admin_only(stub: StubGateway) -> None:
    [pid] = _seed(stub, 1)
    labels = {}
    for role in ("STAFF", "ADMIN"):
        at = signed_in_app(stub, role).run()
        at.selectbox(key="patients_open").select(pid).run()
        assert not at.exception
        labels[role] = [t.label for t in at.tabs]
    assert "Audit trail" not in labels["STAFF"]
    assert "Audit trail" in labels["ADMIN"]
    at.switch_page("app_pages/patients.py").run()
    assert any("CREATE" in str(df.value.to_dict()) for df in at.dataframe)


def test_users_page_refuses_non_admin_even_if_opened(stub: StubGateway) -> None:
    at = signed_in_app(stub, "ADMIN").run()
    at.switch_page("app_pages/users.py")
    at.session_state["auth"] = AuthSession(token=stub.token("STAFF"), role="STAFF", email="staff@pms.local",
                                           expires_at=time.time() + 600)
    at.run()
    assert stub.state.calls["GET /auth/users"] == 0


# --- register --------------------------------------------------------------------------------


def _fill_register(at, **values: object) -> None:  # type: ignore[no-untyped-def]
    n = at.session_state["register_form_n"]
    for name, value in values.items():
        widget = at.date_input(key=f"reg_{n}_{name}") if name in ("dateOfBirth", "registeredDate") else (
            at.selectbox(key=f"reg_{n}_{name}") if name == "gender" else at.text_input(key=f"reg_{n}_{name}"))
        widget.set_value(value) if name == "gender" else widget.input(value) if isinstance(value, str) \
            else widget.set_value(value)


def test_a_future_birth_date_is_refused_not_replaced_by_the_one_typed_before(stub: StubGateway) -> None:
    """A date outside a field's bounds used to be swapped silently for the last valid one and saved."""
    at = signed_in_app(stub, "STAFF").run()
    at.switch_page("app_pages/register.py").run()
    _fill_register(at, name="Futura Check", email="futura@example.com", address="1 Road", dateOfBirth=date(1975, 2, 3))
    _fill_register(at, dateOfBirth=date.today() + timedelta(days=3 * 365))
    at.form_submit_button[0].click().run()
    assert not at.exception
    assert "Must not be in the future" in texts(at.error)
    assert not stub.state.patients


def test_a_record_born_after_the_viewers_today_opens_and_edits(stub: StubGateway) -> None:
    """The API accepts any date some time zone has reached; a newborn registered ahead of the viewer's
    time zone stopped the whole page (its date was above the field's maximum)."""
    [pid] = _seed(stub, 1)
    stub.state.patients[pid]["dateOfBirth"] = (date.today() + timedelta(days=1)).isoformat()
    at = signed_in_app(stub, "STAFF").run()
    at.selectbox(key="patients_open").select(pid).run()
    assert not at.exception
    assert at.date_input(key=_edit_key(pid, "dateOfBirth")).value == date.today() + timedelta(days=1)


def test_a_failed_registration_after_a_good_one_does_not_keep_the_old_success_banner(stub: StubGateway) -> None:
    at = signed_in_app(stub, "STAFF").run()
    at.switch_page("app_pages/register.py").run()
    _fill_register(at, name="Ada Lovelace", email="ada@example.com", address="12 St James Sq",
                   dateOfBirth=date(1965, 12, 10))
    at.form_submit_button[0].click().run()
    assert any("registered" in t for t in texts(at.success))
    _fill_register(at, name="Grace Hopper", email="not-an-email", address="1 Navy Rd", dateOfBirth=date(1906, 12, 9))
    at.form_submit_button[0].click().run()
    assert "Not a valid email address" in texts(at.error)
    assert not at.success  # "Ada Lovelace registered" beside Grace's errors read as if Grace was saved


def test_register_shows_each_server_reason_under_its_field(stub: StubGateway) -> None:
    at = signed_in_app(stub, "STAFF").run()
    at.switch_page("app_pages/register.py").run()
    _fill_register(at, email="not-an-email", phone="abc")
    at.form_submit_button[0].click().run()
    assert not at.exception
    errors = texts(at.error)
    for reason in ("Name is required", "Not a valid email address", "Address is required", "Field required",
                   "Not a valid phone number"):
        assert reason in errors, errors
    # Each reason sits in the form column of its field, right after it.
    left, right = (at.form[0].columns[i].children.values() for i in (0, 1))
    assert [type(e).__name__ for e in left] == ["TextInput", "Error"] * 4  # name, email, phone, address
    assert [type(e).__name__ for e in right] == ["TextInput", "DateInput", "Error", "Selectbox", "DateInput"]
    assert not stub.state.patients


def test_register_success_shows_mrn_and_billing_and_clears_the_form(stub: StubGateway) -> None:
    at = signed_in_app(stub, "STAFF").run()
    at.switch_page("app_pages/register.py").run()
    _fill_register(at, name="Ada Lovelace", email="ada@example.com", address="12 St James Sq", city="London",
                   phone="+44 20 7946 0000", dateOfBirth=date(1965, 12, 10),
                   gender="female")
    at.form_submit_button[0].click().run()
    assert not at.exception
    [patient] = stub.state.patients.values()
    assert patient["gender"] == "female" and patient["city"] == "London"
    success = texts(at.success)
    assert any(patient["mrn"] in t and "ACTIVE" in t for t in success), success
    assert at.session_state["register_form_n"] == 1
    assert at.text_input(key="reg_1_name").value == ""


def _expire(at: AppTest, stub: StubGateway, how: str) -> None:
    """End the signed-in session: locally (its expiry passed) or at the server (the token is refused)."""
    auth = at.session_state["auth"]
    if how == "locally":
        at.session_state["auth"] = AuthSession(token=auth.token, role=auth.role, email=auth.email,
                                               expires_at=time.time() - 1)
    else:
        at.session_state["auth"] = AuthSession(token=stub.token(auth.role, ttl_s=-60), role=auth.role,
                                               email=auth.email, expires_at=time.time() + 600)


@pytest.mark.parametrize("how", ["locally", "at the server"])
def test_a_registration_cut_short_by_an_expired_session_is_given_back_after_signing_in(
        stub: StubGateway, how: str) -> None:
    at = signed_in_app(stub, "STAFF").run()
    at.switch_page("app_pages/register.py").run()
    _fill_register(at, name="Ada Lovelace", email="ada@example.com", address="12 St James Sq", city="London",
                   dateOfBirth=date(1965, 12, 10), gender="female")
    _expire(at, stub, how)
    at.form_submit_button[0].click().run()
    assert not at.exception
    assert "auth" not in at.session_state and not stub.state.patients
    assert any("session has expired" in t for t in texts(at.info))
    assert not [k for k in at.session_state if str(k).startswith("reg_")]  # nothing of it while signed out

    login(at, "staff@pms.local")
    assert not at.exception
    assert at.title[0].value.endswith("Register patient")  # straight back to the interrupted form
    assert any("What you had entered is back" in t for t in texts(at.info))
    assert at.text_input(key="reg_0_name").value == "Ada Lovelace"
    assert at.text_input(key="reg_0_city").value == "London"
    assert at.date_input(key="reg_0_dateOfBirth").value == date(1965, 12, 10)
    assert at.selectbox(key="reg_0_gender").value == "female"
    at.form_submit_button[0].click().run()
    assert not at.exception
    [patient] = stub.state.patients.values()
    assert (patient["name"], patient["email"], patient["dateOfBirth"]) == ("Ada Lovelace", "ada@example.com",
                                                                          "1965-12-10")
    at.run()
    assert not any("What you had entered is back" in t for t in texts(at.info))  # said once


def test_an_expired_sessions_draft_is_never_shown_to_someone_else(stub: StubGateway) -> None:
    at = signed_in_app(stub, "STAFF").run()
    at.switch_page("app_pages/register.py").run()
    _fill_register(at, name="Ada Lovelace", email="ada@example.com", address="12 St James Sq")
    _expire(at, stub, "locally")
    at.form_submit_button[0].click().run()
    login(at, "admin@pms.local")  # another member of staff on the same browser
    assert not at.exception
    assert at.title[0].value.endswith("Patients")
    assert "expired_draft" not in at.session_state
    at.switch_page("app_pages/register.py").run()
    assert at.text_input(key="reg_0_name").value == ""
    assert not any("What you had entered is back" in t for t in texts(at.info))
    # Signing out on purpose keeps nothing either, for anyone.
    _fill_register(at, name="Grace Hopper")
    at.button(key="sign_out").click().run()
    assert not [k for k in at.session_state if str(k).startswith(("reg_", "expired_draft"))]


def test_a_draft_nobody_came_back_for_in_time_is_dropped(stub: StubGateway,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    at = signed_in_app(stub, "STAFF").run()
    at.switch_page("app_pages/register.py").run()
    _fill_register(at, name="Ada Lovelace", email="ada@example.com", address="12 St James Sq")
    _expire(at, stub, "locally")
    at.form_submit_button[0].click().run()
    draft = at.session_state["expired_draft"]
    at.session_state["expired_draft"] = dataclasses.replace(draft, kept_at=draft.kept_at - 3601)
    at.run()  # signed out, within the hour
    assert "expired_draft" in at.session_state
    monkeypatch.setenv("PMS_DASHBOARD__DRAFT_MAX_AGE_S", "3600")
    get_settings.cache_clear()
    try:
        at.run()  # the login page, idle: the stale draft goes
        assert "expired_draft" not in at.session_state
        at.session_state["expired_draft"] = dataclasses.replace(draft, kept_at=draft.kept_at - 3601)
        login(at, "staff@pms.local")  # nor is one given back at sign-in
        assert at.title[0].value.endswith("Patients")
        assert not [k for k in at.session_state if str(k).startswith(("reg_", "expired_draft"))]
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize("where", ["another page", "an untouched form", "the result of a registration"])
def test_an_expiry_with_nothing_typed_in_the_register_form_gives_nothing_back(stub: StubGateway,
                                                                                where: str) -> None:
    at = signed_in_app(stub, "STAFF").run()
    at.switch_page("app_pages/register.py").run()
    if where == "the result of a registration":
        _fill_register(at, name="Ada Lovelace", email="ada@example.com", address="12 St James Sq",
                       dateOfBirth=date(1965, 12, 10))
        at.form_submit_button[0].click().run()
        assert len(stub.state.patients) == 1 and at.session_state["register_form_n"] == 1
    elif where == "another page":
        at.switch_page("app_pages/patients.py").run()
    _expire(at, stub, "locally")
    at.run()
    assert "auth" not in at.session_state and "expired_draft" not in at.session_state
    login(at, "staff@pms.local")
    assert not at.exception
    assert at.title[0].value.endswith("Patients")  # no detour to a form there is nothing to give back from
    assert not any("What you had entered is back" in t for t in texts(at.info))


def test_register_duplicate_email_is_shown_on_the_email_field(stub: StubGateway) -> None:
    _seed(stub, 1)
    at = signed_in_app(stub, "STAFF").run()
    at.switch_page("app_pages/register.py").run()
    _fill_register(at, name="Someone Else", email="P0@example.com", address="9 Road", dateOfBirth=date(1990, 1, 1))
    at.form_submit_button[0].click().run()
    assert "A patient with this email already exists" in texts(at.error)
    assert len(stub.state.patients) == 1


def _fill_register_form(at: object) -> None:
    form = at.form[0]  # type: ignore[attr-defined]
    form.text_input(key="reg_0_name").input("Ada Lovelace")
    form.text_input(key="reg_0_email").input("ada@example.org")
    form.text_input(key="reg_0_address").input("1 Main St")
    form.date_input(key="reg_0_dateOfBirth").set_value(date(1990, 1, 1))
    form.form_submit_button[0].click()


def test_a_registration_whose_answer_was_lost_is_found_not_retried(stub: StubGateway) -> None:
    """The gateway timed out after the patient service saved: the page finds the record by its e-mail."""
    stub.state.lose_answer["POST /api/patients"] = 504
    at = signed_in_app(stub, "STAFF").run()
    at.switch_page("app_pages/register.py").run()
    _fill_register_form(at)
    at.run()
    assert not at.exception and not texts(at.error)
    assert len(stub.state.patients) == 1
    mrn = next(iter(stub.state.patients.values()))["mrn"]
    assert any("Ada Lovelace" in t and str(mrn) in t for t in texts(at.success))


def test_a_lost_answer_never_shows_another_patient_with_that_email_as_registered(stub: StubGateway) -> None:
    GatewayClient(stub.url, stub.token("STAFF")).create_patient(
        _patient(1, name="Grace Hopper", email="ada@example.org"))
    stub.state.lose_answer["POST /api/patients"] = 504  # (the stand-in refuses the duplicate, then loses that)
    at = signed_in_app(stub, "STAFF").run()
    at.switch_page("app_pages/register.py").run()
    _fill_register_form(at)
    at.run()
    assert not at.exception
    assert not any("Grace Hopper" in t for t in texts(at.success))
    assert any("was not confirmed" in t for t in texts(at.warning))
    assert at.form[0].text_input(key="reg_0_name").value == "Ada Lovelace"  # the form is kept


def test_an_unconfirmed_registration_says_so_instead_of_inviting_a_retry(stub: StubGateway) -> None:
    stub.state.down = True  # no answer to the create, nor to the lookup after it
    at = signed_in_app(stub, "STAFF").run()
    at.switch_page("app_pages/register.py").run()
    _fill_register_form(at)
    at.run()
    assert not at.exception
    assert any("was not confirmed" in t and "search for this e-mail" in t for t in texts(at.warning))
    assert at.form[0].text_input(key="reg_0_email").value == "ada@example.org"  # the form is kept


def _register_a_likely_duplicate(stub: StubGateway, *, name: str, email: str) -> AppTest:
    """Signed in as STAFF, one patient on file ("Patient 000", born 1970-01-01), register someone like them."""
    _seed(stub, 1)
    at = signed_in_app(stub, "STAFF").run()
    at.switch_page("app_pages/register.py").run()
    _fill_register(at, name=name, email=email, address="9 Road", dateOfBirth=date(1970, 1, 1))
    at.form_submit_button[0].click().run()
    return at


def test_possible_duplicates_are_shown_and_can_be_discarded(stub: StubGateway) -> None:
    at = _register_a_likely_duplicate(stub, name="patient 000", email="other@example.com")
    assert any("Possible duplicate" in t for t in texts(at.warning))
    assert not at.success
    at.button(key="dup_discard").click().run()
    assert not at.exception
    assert sum(1 for p in stub.state.patients.values() if not p.get("_deleted")) == 1


def test_possible_duplicate_can_be_kept(stub: StubGateway) -> None:
    at = _register_a_likely_duplicate(stub, name="Patient 000", email="keep@example.com")
    at.button(key="dup_keep").click().run()
    assert any("registered" in t for t in texts(at.success))
    assert sum(1 for p in stub.state.patients.values() if not p.get("_deleted")) == 2


@pytest.mark.parametrize("how", ["locally", "at the server"])
def test_a_duplicate_decision_cut_short_by_an_expired_session_is_asked_again(stub: StubGateway, how: str) -> None:
    at = _register_a_likely_duplicate(stub, name="patient 000", email="other@example.com")
    assert any("Possible duplicate" in t for t in texts(at.warning))
    _expire(at, stub, how)
    at.button(key="dup_discard").click().run()
    assert not at.exception and "auth" not in at.session_state
    assert sum(1 for p in stub.state.patients.values() if not p.get("_deleted")) == 2  # not discarded

    login(at, "staff@pms.local")
    assert not at.exception
    assert at.title[0].value.endswith("Register patient")
    assert any("before you decided about the possible duplicate" in t for t in texts(at.info))
    assert not any("What you had entered is back" in t for t in texts(at.info))
    assert any("Possible duplicate" in t for t in texts(at.warning))
    at.button(key="dup_discard").click().run()
    assert not at.exception
    assert sum(1 for p in stub.state.patients.values() if not p.get("_deleted")) == 1


def test_a_decided_duplicate_or_another_user_gets_no_review_back(stub: StubGateway) -> None:
    at = _register_a_likely_duplicate(stub, name="Patient 000", email="keep@example.com")
    at.button(key="dup_keep").click().run()
    _expire(at, stub, "locally")
    at.run()
    assert "expired_draft" not in at.session_state  # kept already: nothing left to decide

    login(at, "staff@pms.local")
    at.switch_page("app_pages/register.py").run()
    _fill_register(at, name="patient 000", email="third@example.com", address="9 Road", dateOfBirth=date(1970, 1, 1))
    at.form_submit_button[0].click().run()
    _expire(at, stub, "locally")
    at.run()
    login(at, "admin@pms.local")
    assert at.title[0].value.endswith("Patients")
    assert "register_result" not in at.session_state


def test_discarding_a_duplicate_someone_already_deleted_says_so(stub: StubGateway) -> None:
    at = _register_a_likely_duplicate(stub, name="patient 000", email="other@example.com")
    GatewayClient(stub.url, stub.token("ADMIN")).delete_patient(at.session_state["register_result"].patient["id"])
    at.button(key="dup_discard").click().run()
    assert not at.exception and not at.error
    assert "register_result" not in at.session_state
    assert any("had already been deleted" in t for t in texts(at.toast))


# --- patients --------------------------------------------------------------------------------


def test_search_and_server_side_pagination(stub: StubGateway) -> None:
    _seed(stub, 30)
    at = signed_in_app(stub, "STAFF").run()
    assert any("1 to 25" in t and "30" in t for t in texts(at.caption))
    assert len(at.dataframe[0].value) == 25
    at.button(key="patients_next").click().run()
    assert any("26 to 30" in t for t in texts(at.caption))
    assert len(at.dataframe[0].value) == 5
    assert at.button(key="patients_next").disabled
    assert stub.state.calls["GET /api/patients"] == 2
    at.text_input(key="patients_q").input("p17@").run()
    assert any("1 to 1" in t and "of **1**" in t for t in texts(at.caption))
    assert at.dataframe[0].value["Name"].tolist() == ["Patient 017"]
    at.text_input(key="patients_q").input("nobody-like-this").run()
    assert any("No patient matches" in t for t in texts(at.info))


def test_a_page_emptied_under_the_user_moves_to_the_new_last_page(stub: StubGateway) -> None:
    ids = _seed(stub, 26)
    at = signed_in_app(stub, "STAFF").run()
    at.button(key="patients_next").click().run()
    assert any("26 to 26" in t for t in texts(at.caption))
    GatewayClient(stub.url, stub.token("STAFF")).delete_patient(ids[-1])  # a colleague deletes it
    import streamlit as st

    st.cache_data.clear()
    at.run()
    assert not at.exception
    assert any("1 to 25" in t and "of **25**" in t for t in texts(at.caption))
    assert not any("No patients yet" in t for t in texts(at.info))


def test_edit_saves_with_version_and_explains_a_conflict(stub: StubGateway) -> None:
    [pid] = _seed(stub, 1)
    at = signed_in_app(stub, "STAFF").run()
    at.selectbox(key="patients_open").select(pid).run()
    form = at.form[0]
    form.text_input[4].input("York")  # city
    form.form_submit_button[0].click()
    at.run()
    assert not at.exception
    assert stub.state.patients[pid]["city"] == "York" and stub.state.patients[pid]["version"] == 2
    # A colleague saves in between: our form still holds version 2.
    c = GatewayClient(stub.url, stub.token("ADMIN"))
    c.update_patient(pid, {**{k: stub.state.patients[pid][k] for k in ("name", "email", "address", "dateOfBirth")},
                           "city": "Hull"}, version=2)
    at.form[0].text_input[4].input("Leeds")
    at.form[0].form_submit_button[0].click()
    at.run()
    assert any("Someone else changed this record" in t for t in texts(at.warning))
    assert stub.state.patients[pid]["city"] == "Hull"
    assert at.form[0].text_input[4].value == "Hull"  # reloaded with their change


def test_edit_shows_field_errors(stub: StubGateway) -> None:
    [pid] = _seed(stub, 1)
    at = signed_in_app(stub, "STAFF").run()
    at.selectbox(key="patients_open").select(pid).run()
    at.form[0].text_input[1].input("broken")
    at.form[0].form_submit_button[0].click()
    at.run()
    assert "Not a valid email address" in texts(at.error)
    assert stub.state.patients[pid]["version"] == 1


def _edit_key(pid: str, field: str, version: int = 1) -> str:
    return f"edit_{pid}_v{version}_{field}"


def _first_tab(at: AppTest) -> str:
    """The tab the record's tab container tells the browser to open on (its ``default``). The browser
    takes it when the container first appears; that the Edit tab really opens was checked in Chromium."""
    def blocks(node: object) -> Iterator[object]:
        yield node
        for child in getattr(node, "children", {}).values():
            yield from blocks(child)

    [container] = [b for b in blocks(at._tree) if getattr(b, "type", None) == "tab_container"]
    return [t.label for t in at.tabs][container.proto.tab_container.default_tab_index]  # type: ignore[attr-defined]


def _edit_city_then_expire(stub: StubGateway, pid: str) -> AppTest:
    """Signed in as STAFF, open ``pid``, change its city to York and press Save after the session expired."""
    at = signed_in_app(stub, "STAFF").run()
    at.selectbox(key="patients_open").select(pid).run()
    at.text_input(key=_edit_key(pid, "city")).input("York")
    _expire(at, stub, "locally")
    at.form_submit_button[0].click().run()
    assert "auth" not in at.session_state
    return at


@pytest.mark.parametrize("how", ["locally", "at the server"])
def test_an_edit_cut_short_by_an_expired_session_is_given_back_after_signing_in(stub: StubGateway,
                                                                                 how: str) -> None:
    [pid] = _seed(stub, 1)
    at = signed_in_app(stub, "STAFF").run()
    at.selectbox(key="patients_open").select(pid).run()
    at.text_input(key=_edit_key(pid, "city")).input("York")
    at.date_input(key=_edit_key(pid, "dateOfBirth")).set_value(date(1971, 2, 3))
    at.selectbox(key=_edit_key(pid, "gender")).set_value("other")
    _expire(at, stub, how)
    at.form_submit_button[0].click().run()
    assert not at.exception
    assert "auth" not in at.session_state and stub.state.patients[pid]["version"] == 1
    assert any("session has expired" in t for t in texts(at.info))
    assert not [k for k in at.session_state if str(k).startswith(("edit_", "patient_id"))]  # none while signed out

    login(at, "staff@pms.local")
    assert not at.exception
    assert at.title[0].value.endswith("Patients")
    assert any("changes to this record were saved. They are back" in t for t in texts(at.info))
    assert _first_tab(at) == "Edit"
    assert at.text_input(key=_edit_key(pid, "city")).value == "York"
    assert at.text_input(key=_edit_key(pid, "name")).value == "Patient 000"  # untouched fields as they were
    assert at.date_input(key=_edit_key(pid, "dateOfBirth")).value == date(1971, 2, 3)
    assert at.selectbox(key=_edit_key(pid, "gender")).value == "other"
    at.form_submit_button[0].click().run()
    assert not at.exception
    saved = stub.state.patients[pid]
    assert (saved["city"], saved["dateOfBirth"], saved["gender"], saved["version"]) == ("York", "1971-02-03",
                                                                                        "other", 2)
    assert "edit_reopen" not in at.session_state
    at.run()
    assert _first_tab(at) == "Overview"  # a record opened from now on starts on its overview
    assert not any("They are back" in t for t in texts(at.info))  # said once


def test_an_edit_given_back_still_meets_a_colleagues_save(stub: StubGateway) -> None:
    """The kept edit is of the version the user opened: a save by someone else meanwhile is a 409, not lost."""
    [pid] = _seed(stub, 1)
    at = _edit_city_then_expire(stub, pid)
    c = GatewayClient(stub.url, stub.token("ADMIN"))
    c.update_patient(pid, {**{k: stub.state.patients[pid][k] for k in ("name", "email", "address", "dateOfBirth")},
                           "city": "Hull"}, version=1)
    login(at, "staff@pms.local")
    assert at.text_input(key=_edit_key(pid, "city")).value == "York"
    at.form_submit_button[0].click().run()
    assert any("Someone else changed this record" in t for t in texts(at.warning))
    assert stub.state.patients[pid]["city"] == "Hull"
    assert at.text_input(key=_edit_key(pid, "city", version=2)).value == "Hull"


def test_an_edit_given_back_for_a_patient_deleted_meanwhile_is_dropped_and_said_so(stub: StubGateway) -> None:
    [pid] = _seed(stub, 1)
    at = _edit_city_then_expire(stub, pid)
    GatewayClient(stub.url, stub.token("ADMIN")).delete_patient(pid)
    login(at, "staff@pms.local")
    assert not at.exception
    assert not any("They are back" in t for t in texts(at.info))
    assert any("no longer exists" in t and "could not be saved" in t for t in texts(at.markdown) + texts(at.caption)
               + texts(at.info))
    assert not [k for k in at.session_state if str(k).startswith(("edit_", "patient_id"))]
    _expire(at, stub, "locally")
    at.run()
    assert "expired_draft" not in at.session_state  # nothing left to keep again


def test_choosing_another_record_after_an_edit_was_given_back_opens_it_on_its_overview(stub: StubGateway) -> None:
    first, second = _seed(stub, 2)
    at = _edit_city_then_expire(stub, first)
    login(at, "staff@pms.local")
    assert _first_tab(at) == "Edit"
    at.selectbox(key="patients_open").select(second).run()
    assert not at.exception
    assert _first_tab(at) == "Overview"
    assert not [k for k in at.session_state if str(k).startswith((f"edit_{first}", "edit_reopen"))]
    assert stub.state.patients[first]["version"] == 1  # the given-back edit was left, not saved


def test_an_unchanged_edit_or_another_user_gets_nothing_back(stub: StubGateway) -> None:
    [pid] = _seed(stub, 1)
    at = signed_in_app(stub, "STAFF").run()
    at.selectbox(key="patients_open").select(pid).run()
    _expire(at, stub, "locally")
    at.form_submit_button[0].click().run()  # "Save changes" with nothing changed
    assert "auth" not in at.session_state and "expired_draft" not in at.session_state
    login(at, "staff@pms.local")
    assert not any("They are back" in t for t in texts(at.info))
    assert "patient_id" not in at.session_state

    at.selectbox(key="patients_open").select(pid).run()
    assert _first_tab(at) == "Overview"
    at.text_input(key=_edit_key(pid, "city")).input("York")
    _expire(at, stub, "locally")
    at.form_submit_button[0].click().run()
    assert "expired_draft" in at.session_state
    login(at, "admin@pms.local")  # another member of staff on the same browser
    assert not at.exception
    assert "expired_draft" not in at.session_state and "patient_id" not in at.session_state
    assert not [k for k in at.session_state if str(k).startswith("edit_")]
    assert not any("They are back" in t for t in texts(at.info))


def test_a_record_is_shown_as_text_never_as_markdown(stub: StubGateway) -> None:
    """Found by exploratory testing: a name rendered a link, an address made the browser fetch an image."""
    pid = GatewayClient(stub.url, stub.token("STAFF")).create_patient(_patient(
        1, name="Eve [verify](https://evil.example)", address="![p](http://127.0.0.1:9/t.png) :red[Call]",
        city="$x^2$ City")).patient["id"]
    at = signed_in_app(stub, "STAFF").run()
    at.selectbox(key="patients_open").select(pid).run()
    assert not at.exception
    shown = " ".join(texts(at.subheader) + texts(at.markdown))
    for markup in ("](https://", "![p](", ":red[", "$x^2$"):
        assert markup not in shown, shown
    assert "Eve \\[verify\\]" in shown


def test_delete_needs_confirmation(stub: StubGateway) -> None:
    [pid] = _seed(stub, 1)
    at = signed_in_app(stub, "STAFF").run()
    at.selectbox(key="patients_open").select(pid).run()
    at.button(key="delete_patient").click().run()
    assert not stub.state.patients[pid].get("_deleted")
    at.button(key="delete_cancel").click().run()
    at.button(key="delete_patient").click().run()
    at.button(key="delete_confirm").click().run()
    assert not at.exception
    assert stub.state.patients[pid]["_deleted"]
    assert any("No patients yet" in t for t in texts(at.info))


def test_fhir_download_is_offered(stub: StubGateway) -> None:
    [pid] = _seed(stub, 1)
    at = signed_in_app(stub, "STAFF").run()
    at.selectbox(key="patients_open").select(pid).run()
    assert at.get("download_button")
    assert stub.state.calls[f"GET /api/patients/{pid}/fhir"] == 0  # nothing fetched until asked for
    at.toggle(key=f"fhir_preview_{pid}").set_value(True).run()
    assert not at.exception
    assert stub.state.calls[f"GET /api/patients/{pid}/fhir"] == 1
    assert at.json[0].value and '"resourceType": "Patient"' in at.json[0].value


# --- analytics -------------------------------------------------------------------------------


def test_analytics_tiles_and_charts(stub: StubGateway) -> None:
    _seed(stub, 12)
    at = signed_in_app(stub, "STAFF").run()
    at.switch_page("app_pages/analytics.py").run()
    assert not at.exception
    tiles = {m.label: m.value for m in at.metric}
    assert tiles["Active patients"] == "12"
    assert tiles["New today"] == "12"
    assert len(at.get("vega_lite_chart")) == 3
    assert any("Billing accounts of active patients: **ACTIVE** 12" in t for t in texts(at.caption))
    badge = [t for t in texts(at.markdown) if "as of" in t]
    assert badge and "lag 0 events" in badge[0] and "p99 freshness 180 ms" in badge[0]
    assert not any("not running" in t for t in texts(at.markdown))


def test_analytics_says_so_when_the_pipeline_stopped_instead_of_a_green_badge(stub: StubGateway) -> None:
    """Lag and p99 keep the last batch's values after the pipeline stops: shown green, they lied."""
    _seed(stub, 3)
    stub.state.pipeline_running = False
    at = signed_in_app(stub, "STAFF").run()
    at.switch_page("app_pages/analytics.py").run()
    assert not at.exception
    badge = [t for t in texts(at.markdown) if "as of" in t]
    assert badge and "Analytics pipeline not running (last heartbeat 1 h ago)" in badge[0]
    assert "lag" not in badge[0] and "p99" not in badge[0]
    assert badge[0].startswith(":red-badge[:material/error:")
    assert any("catches up by itself" in t for t in texts(at.caption))
    assert {m.label: m.value for m in at.metric}["Active patients"] == "3"  # the figures are still shown


def test_analytics_with_the_gateway_down_pauses_tiles_and_shows_the_banner(stub: StubGateway) -> None:
    at = signed_in_app(stub, "ANALYST").run()
    at.toggle(key="analytics_auto").set_value(True).run()
    stub.state.down = True
    import streamlit as st

    st.cache_data.clear()
    at.run()
    assert not at.exception
    assert any("Live figures paused" in t for t in texts(at.warning))
    assert any("not reachable" in t for t in texts(at.error))
    stub.state.down = False
    at.run()
    assert not texts(at.warning) and {m.label: m.value for m in at.metric}["Active patients"] == "0"


def test_registrations_follow_the_range_and_granularity(stub: StubGateway) -> None:
    at = signed_in_app(stub, "ANALYST").run()
    sent = stub.state.last_query["/api/analytics/registrations"]
    assert sent["granularity"] == "week"
    assert date.fromisoformat(sent["to"]) == datetime.now(UTC).date()  # the API's days are UTC days
    at.segmented_control(key="analytics_gran").set_value("month")
    at.date_input(key="analytics_range").set_value((date(2026, 1, 1), date(2026, 3, 31))).run()
    assert not at.exception
    assert stub.state.last_query["/api/analytics/registrations"] == {
        "from": "2026-01-01", "to": "2026-03-31", "granularity": "month"}
    assert stub.state.last_query["/api/analytics/geography"] == {"top": "10"}


def test_analytics_empty_states_and_suppression_for_analyst(stub: StubGateway) -> None:
    at = signed_in_app(stub, "ANALYST").run()
    assert {m.label: m.value for m in at.metric}["Active patients"] == "0"
    assert any("No city data yet" in t for t in texts(at.info))
    _seed(stub, 3)
    import streamlit as st

    st.cache_data.clear()
    at.run()
    assert not at.exception
    tiles = {m.label: m.value for m in at.metric}
    assert tiles["Active patients"] == "Suppressed"  # 3 < threshold 10: never shown to an ANALYST
    captions = texts(at.caption)
    assert any("Counts below 10 are suppressed" in t for t in captions)
    assert any("period(s) suppressed for privacy" in t for t in captions)
    assert "3" not in tiles.values()
    # Every group and city is below the threshold: said so, not an empty chart or "no data yet".
    infos = texts(at.info)
    assert any("Every age and gender group is too small to show" in t and "fewer than 10" in t for t in infos)
    assert any("Every city is too small to show" in t for t in infos)
    assert not any("No city data yet" in t for t in infos)
    assert not at.get("vega_lite_chart")[1:]  # the registrations chart at most


@pytest.mark.parametrize(("status", "banner"), [(500, "could not complete"), (403, "does not allow"),
                                              (429, "request failed")])
def test_a_failing_kpi_call_is_a_banner_and_the_rest_of_the_page_stays(stub: StubGateway, status: int,
                                                                       banner: str) -> None:
    """The tiles are a fragment: what it raises never reaches the app's handlers, so it handles every error."""
    _seed(stub, 12)
    stub.state.fail["/api/analytics/summary"] = status
    at = signed_in_app(stub, "STAFF").run()
    at.switch_page("app_pages/analytics.py").run()
    assert not at.exception
    assert any(banner in t for t in texts(at.error))
    assert {h.value for h in at.subheader} >= {"Registrations over time", "Age and gender", "Top cities"}


def test_a_range_too_long_for_the_granularity_says_why_and_keeps_the_page(stub: StubGateway) -> None:
    _seed(stub, 12)
    at = signed_in_app(stub, "STAFF").run()
    at.switch_page("app_pages/analytics.py").run()
    at.segmented_control(key="analytics_gran").set_value("day")
    at.date_input(key="analytics_range").set_value((date(2016, 8, 28), date.today())).run()
    assert not at.exception and not texts(at.error)
    assert any("range too long for granularity 'day'" in t for t in texts(at.warning))
    assert len(at.get("vega_lite_chart")) == 2  # pyramid and cities still drawn


def test_the_period_caption_gives_the_api_totals_never_a_sum_of_the_shown_periods(stub: StubGateway) -> None:
    for n in range(12):
        GatewayClient(stub.url, stub.token("STAFF")).create_patient(_patient(n))
    GatewayClient(stub.url, stub.token("STAFF")).create_patient(
        _patient(99, registeredDate=(date.today() - timedelta(days=3)).isoformat()))
    staff = signed_in_app(stub, "STAFF").run()
    staff.switch_page("app_pages/analytics.py").run()
    assert any("13 registrations, 0 removals in the period" in t for t in texts(staff.caption))
    analyst = signed_in_app(stub, "ANALYST").run()
    captions = texts(analyst.caption)
    assert any("Registrations suppressed, 0 removals in the period" in t for t in captions), captions
    assert not any("12 registrations" in t for t in captions)


# --- users -----------------------------------------------------------------------------------


def test_admin_creates_user_with_field_errors_then_changes_role(stub: StubGateway) -> None:
    at = signed_in_app(stub, "ADMIN").run()
    at.switch_page("app_pages/users.py").run()
    assert not at.exception
    assert any("3 accounts" in t for t in texts(at.caption))
    at.text_input(key="user_0_email").input("new@pms.local")
    at.text_input(key="user_0_password").input("short")
    at.form_submit_button[0].click().run()
    assert "Password must be at least 12 characters" in texts(at.error)
    at.text_input(key="user_0_password").input("a-long-enough-password")
    at.selectbox(key="user_0_role").select("ANALYST")
    at.form_submit_button[0].click().run()
    assert stub.state.users["new@pms.local"]["role"] == "ANALYST"
    assert any("4 accounts" in t for t in texts(at.caption))
    uid = stub.state.users["new@pms.local"]["id"]
    at.selectbox(key="user_edit_id").select(uid).run()
    at.selectbox(key=f"user_edit_role_{uid}").select("STAFF")
    at.toggle(key=f"user_edit_active_{uid}").set_value(False)
    at.button(key="user_edit_save").click().run()
    assert not at.exception
    assert stub.state.users["new@pms.local"]["role"] == "STAFF"
    assert stub.state.users["new@pms.local"]["active"] is False


def test_admin_cannot_demote_themselves_from_the_ui(stub: StubGateway) -> None:
    at = signed_in_app(stub, "ADMIN").run()
    at.switch_page("app_pages/users.py").run()
    me = stub.state.users["admin@pms.local"]["id"]
    at.selectbox(key="user_edit_id").select(me).run()
    assert at.button(key="user_edit_save").disabled
