"""Register a patient: every field, the server's reasons next to each field, duplicates before confirming."""

from __future__ import annotations

import unicodedata

import streamlit as st

from dashboard import ui
from dashboard.client import (
    Conflict,
    Created,
    GatewayError,
    GatewayUnavailable,
    InvalidInput,
    NotFound,
    forget_patients,
)

FIELDS = ("name", "email", "phone", "address", "city", "dateOfBirth", "gender", "registeredDate")

ui.require_session()
st.title(":material/person_add: Register patient")
st.caption("Fields marked * are required. The server checks every field; its reasons appear next to them.")

n = st.session_state.setdefault(ui.REGISTER_FORM_N_KEY, 0)
errors: dict[str, str] = st.session_state.get("register_errors", {})


def _key(name: str) -> str:
    return ui.register_field_key(n, name)


def _saved_anyway(data: dict[str, object]) -> dict[str, object] | None:
    """After a create that got no answer: the patient it made, if the platform can say.

    The create may have committed before the gateway or this client gave up waiting; registering again
    would then only meet "Email already used". Emails are unique among active patients, so one lookup
    finds the holder of the e-mail, which is this registration only if name and date of birth are the
    ones submitted too (otherwise the e-mail belonged to someone else and the create would have been
    refused: say "not confirmed", never show another person as registered).
    """
    email = str(data["email"])
    try:
        page = ui.client().list_patients(q=email, limit=5)
    except GatewayError:
        return None
    name = unicodedata.normalize("NFC", str(data["name"]))  # as the service stores names
    return next((p for p in page.items if str(p.get("email", "")).lower() == email.lower()
                 and p.get("name") == name and p.get("dateOfBirth") == data.get("dateOfBirth")), None)


if ui.draft_restored(ui.REGISTER_PAGE):
    if _key("name") in st.session_state:
        st.info("Your session expired before this patient was registered. What you had entered is back: "
                "check it and register again.", icon=":material/restore:")
    if st.session_state.get(ui.REGISTER_RESULT_KEY) is not None:
        st.info("Your session expired before you decided about the possible duplicate below. The new record "
                "is registered: keep it or discard it.", icon=":material/restore:")
if errors:
    st.error(f"{ui.md_text(st.session_state.get('register_message') or 'Not registered')}: please correct the "
             "fields below.",
             icon=":material/error:")
unconfirmed = st.session_state.get("register_unconfirmed")
if unconfirmed:
    st.warning(f"**The registration was not confirmed.** {ui.md_text(unconfirmed)} It may have been saved all "
               "the same: search for this e-mail on the Patients page before you register again.",
               icon=":material/help:")

with st.form(f"register_{n}", border=True):
    left, right = st.columns(2)
    with left:
        name = st.text_input("Full name *", key=_key("name"), max_chars=100)
        ui.field_error(errors, "name")
        email = st.text_input("E-mail *", key=_key("email"), placeholder="name@example.com")
        ui.field_error(errors, "email")
        phone = st.text_input("Phone", key=_key("phone"), placeholder="+44 20 7946 0000")
        ui.field_error(errors, "phone")
        address = st.text_input("Street address *", key=_key("address"))
        ui.field_error(errors, "address")
    with right:
        city = st.text_input("City", key=_key("city"))
        ui.field_error(errors, "city")
        today = ui.browser_today()
        dob = st.date_input("Date of birth *", value=None, **ui.DATE_BOUNDS, key=_key("dateOfBirth"),
                            format="YYYY-MM-DD")
        ui.field_error(errors, "dateOfBirth")
        gender = st.selectbox("Gender", ui.GENDERS, key=_key("gender"),
                              format_func=lambda g: g.title() if g else "Not stated")
        ui.field_error(errors, "gender")
        # No default over a value given back after an expired session (Streamlit would warn of both).
        registered = st.date_input("Registered on *",
                                   value=None if _key("registeredDate") in st.session_state else today,
                                   **ui.DATE_BOUNDS, key=_key("registeredDate"), format="YYYY-MM-DD")
        ui.field_error(errors, "registeredDate")
    ui.show_other_errors(errors, set(FIELDS))
    submitted = st.form_submit_button("Register patient", type="primary", icon=":material/save:")

if submitted:
    if ui.undecided_duplicate() is None:
        # The last registration's banner belongs to it, not to this attempt (an undecided duplicate stays).
        st.session_state.pop(ui.REGISTER_RESULT_KEY, None)
    data: dict[str, object] = {
        "name": name.strip(),
        "email": email.strip(),
        "address": address.strip(),
    }
    # A date left empty is omitted, so the server answers "Field required" for it.
    if dob:
        data["dateOfBirth"] = dob.isoformat()
    if registered:
        data["registeredDate"] = registered.isoformat()
    if phone.strip():
        data["phone"] = phone.strip()
    if city.strip():
        data["city"] = city.strip()
    if gender:
        data["gender"] = gender
    st.session_state.pop("register_unconfirmed", None)
    created: Created | None = None
    try:
        created = ui.client().create_patient(data)
    except GatewayUnavailable as exc:
        # No answer is not a "no": the create may have committed before the gateway or this page gave up
        # waiting (a retry would then only meet "Email already used"). Look before offering a retry.
        saved = _saved_anyway(data)
        if saved is None:
            st.session_state["register_unconfirmed"] = exc.message
        else:
            created = Created(patient=saved)
    except InvalidInput as exc:
        st.session_state["register_errors"] = exc.errors or {"form": exc.message}
        st.session_state["register_message"] = exc.message
    except Conflict as exc:
        st.session_state["register_errors"] = {"email": exc.errors.get("email") or exc.message}
        st.session_state["register_message"] = exc.message
    if created is not None:
        forget_patients()
        st.session_state[ui.REGISTER_RESULT_KEY] = created
        st.session_state.pop(ui.REGISTER_CONFIRMED_KEY, None)
        st.session_state.pop("register_errors", None)
        st.session_state.pop("register_message", None)
        st.session_state[ui.REGISTER_FORM_N_KEY] = n + 1  # a fresh, empty form for the next patient
    st.rerun()

result = st.session_state.get(ui.REGISTER_RESULT_KEY)
if isinstance(result, Created):
    patient = result.patient
    if result.possible_duplicates and not st.session_state.get(ui.REGISTER_CONFIRMED_KEY):
        with st.container(border=True):
            st.warning(
                f"**Possible duplicate.** {len(result.possible_duplicates)} existing record(s) look like the "
                "same person. Check them before you keep the new record.",
                icon=":material/content_copy:",
            )
            st.dataframe(
                [{"MRN": d.get("mrn"), "Name": d.get("name"), "Date of birth": d.get("dateOfBirth"),
                  "Phone": d.get("phone"),
                  "Why": ", ".join(r.replace("_", " ") for r in d.get("reasons") or []) or "similar record",
                  "Name similarity": f"{float(d['score']):.0%}" if d.get("score") is not None else "—"}
                 for d in result.possible_duplicates],
                hide_index=True, width="stretch",
            )
            keep, discard = st.columns(2)
            if keep.button("Keep the new record", type="primary", icon=":material/check:", key="dup_keep"):
                st.session_state[ui.REGISTER_CONFIRMED_KEY] = True
                st.rerun()
            if discard.button("Discard it (it is a duplicate)", icon=":material/delete:", key="dup_discard"):
                try:
                    ui.client().delete_patient(str(patient["id"]))
                    note = "The new record was discarded."
                except NotFound:  # a colleague deleted it first (e.g. while this session had expired)
                    note = "The new record had already been deleted."
                forget_patients()
                st.session_state.pop(ui.REGISTER_RESULT_KEY, None)
                st.toast(note, icon=":material/delete:")
                st.rerun()
    else:
        billing = patient.get("billingStatus") or "PENDING"
        st.success(
            f"**{ui.md_text(patient.get('name', 'Patient'))}** registered. "
            f"MRN **{ui.md_text(patient.get('mrn', '—'))}** · billing **{ui.md_text(billing)}**",
            icon=":material/check_circle:",
        )
        if billing == "PENDING":
            st.caption("Billing is opening the account in the background; the status turns ACTIVE by itself.")
        if st.button("Dismiss", key="register_dismiss"):
            st.session_state.pop(ui.REGISTER_RESULT_KEY, None)
            st.session_state.pop(ui.REGISTER_CONFIRMED_KEY, None)
            st.rerun()
