"""Find patients (server-side search and paging), open one, edit, delete, audit, FHIR export."""

from __future__ import annotations

import json
from datetime import date
from typing import Any

import streamlit as st

from dashboard import ui
from dashboard.client import Conflict, GatewayClient, InvalidInput, NotFound, cached_patients, forget_patients

PAGE_SIZES = (10, 25, 50, 100)


def _close_record() -> None:
    """Forget the open record and all that belongs to it: its edit (kept or typed), errors, confirmation."""
    patient_id = st.session_state.pop(ui.PATIENT_ID_KEY, None)
    for key in ("confirm_delete", "edit_errors", "edit_conflict", ui.EDIT_BASE_KEY, ui.EDIT_REOPEN_KEY):
        st.session_state.pop(key, None)
    if patient_id:
        for key in [k for k in st.session_state if ui.is_edit_field_key(k, str(patient_id))]:
            del st.session_state[key]


auth = ui.require_session()
st.title(":material/groups: Patients")

search_col, size_col = st.columns([4, 1])
# max_chars: the API's own limit for q (a longer term was a 400 that emptied the page).
q = search_col.text_input("Search", key="patients_q", placeholder="Name, e-mail, MRN or phone", max_chars=200,
                          label_visibility="collapsed", icon=":material/search:")
limit = size_col.selectbox("Rows per page", PAGE_SIZES, index=1, key="patients_limit",
                           label_visibility="collapsed", format_func=lambda v: f"{v} per page")

# A new search or page size starts again at the first page.
if st.session_state.get("_patients_last") != (q, limit):
    st.session_state["_patients_last"] = (q, limit)
    st.session_state["patients_page"] = 0
page_no = int(st.session_state.get("patients_page", 0))

result = cached_patients(ui.gateway_url(), auth.token, q.strip(), int(limit), page_no * int(limit))
last_page = max(0, (result.total - 1) // int(limit))
if not result.items and page_no > last_page:
    # The list shrank under this page (the last patient on it was deleted, here or by a colleague):
    # go to the new last page rather than show "no patients" with no way back.
    st.session_state["patients_page"] = last_page
    st.rerun()

if not result.items:
    if q.strip():
        ui.empty_state("No patient matches this search.", "Check the spelling, or search by MRN or phone.",
                       icon=":material/search_off:")
    else:
        ui.empty_state("No patients yet.", "Registered patients appear here.", icon=":material/group_off:")
else:
    first = result.offset + 1
    st.caption(f"Showing **{ui.fmt_int(first)} to {ui.fmt_int(result.offset + len(result.items))}** of "
               f"**{ui.fmt_int(result.total)}** {'patient' if result.total == 1 else 'patients'}")
    st.dataframe(
        [{"MRN": p.get("mrn"), "Name": p.get("name"), "E-mail": p.get("email"), "Phone": p.get("phone"),
          "Date of birth": p.get("dateOfBirth"), "City": p.get("city"), "Billing": p.get("billingStatus")}
         for p in result.items],
        hide_index=True, width="stretch",
    )
    prev_col, info_col, next_col = st.columns([1, 3, 1])
    if prev_col.button("Previous", icon=":material/chevron_left:", disabled=page_no <= 0, key="patients_prev"):
        st.session_state["patients_page"] = page_no - 1
        st.rerun()
    info_col.markdown(f"<div style='text-align:center'>Page {page_no + 1:,} of {last_page + 1:,}</div>",
                      unsafe_allow_html=True)
    if next_col.button("Next", icon=":material/chevron_right:", disabled=page_no >= last_page, key="patients_next"):
        st.session_state["patients_page"] = page_no + 1
        st.rerun()

    ids = [str(p["id"]) for p in result.items]
    labels = {str(p["id"]): f"{p.get('mrn') or '—'} · {p.get('name') or 'unnamed'}" for p in result.items}
    selected = st.selectbox("Open a record", [None, *ids], key="patients_open",
                            format_func=lambda i: "Choose a patient…" if i is None else labels.get(i, i))
    if selected and selected != st.session_state.get(ui.PATIENT_ID_KEY):
        _close_record()
        st.session_state[ui.PATIENT_ID_KEY] = selected

patient_id = st.session_state.get(ui.PATIENT_ID_KEY)


def _show_detail(patient: dict[str, Any]) -> None:
    st.subheader(f":material/person: {ui.md_text(patient.get('name', ''))}")
    st.caption(f"{ui.md_text(patient.get('mrn') or 'No MRN')} · version {ui.md_text(patient.get('version', '—'))} · "
               f"updated {ui.fmt_date(patient.get('updatedAt'))}")
    tabs = ["Overview", "Edit"] + (["Audit trail"] if auth.role == ui.ADMIN else []) + ["FHIR"]
    # An edit given back after an expired session opens on its tab (until it is saved or left).
    reopen = "Edit" if st.session_state.get(ui.EDIT_REOPEN_KEY) == patient["id"] else None
    # Keyed per record: the browser takes ``default`` when the tabs first appear, so each record
    # opens on its own default instead of on the tab the previous record was left on.
    tab = dict(zip(tabs, st.tabs(tabs, default=reopen, key=f"patient_tabs_{patient['id']}"), strict=True))
    with tab["Overview"]:
        _overview(patient)
    with tab["Edit"]:
        _edit(patient)
    if "Audit trail" in tab:
        with tab["Audit trail"]:
            _audit(patient)
    with tab["FHIR"]:
        _fhir(str(patient["id"]))


def _fhir(patient_id: str) -> None:
    # Fetched only when asked for: a download click or the preview toggle, not on every rerun.
    base, token = ui.gateway_url(), auth.token

    def resource() -> bytes:
        return GatewayClient(base, token).patient_fhir(patient_id)

    st.download_button("Download FHIR R4 Patient (JSON)", data=resource, file_name=f"patient-{patient_id}.json",
                       mime="application/fhir+json", icon=":material/download:", key="fhir_download")
    if st.toggle("Preview the resource", key=f"fhir_preview_{patient_id}"):
        try:
            st.json(json.loads(resource()), expanded=False)
        except ValueError:
            st.caption("The server sent a resource that is not valid JSON.")


def _overview(patient: dict[str, Any]) -> None:
    left, right = st.columns(2)
    shown = {key: ui.md_text(patient.get(key) or "—") for key in (
        "email", "phone", "address", "city", "dateOfBirth", "registeredDate", "billingStatus")}
    shown["gender"] = ui.md_text((patient.get("gender") or "—").title())
    shown["billingAccountId"] = ui.md_text(patient.get("billingAccountId") or "")
    left.markdown(f"**E-mail** {shown['email']}  \n**Phone** {shown['phone']}  \n"
                  f"**Address** {shown['address']}  \n**City** {shown['city']}")
    right.markdown(f"**Date of birth** {shown['dateOfBirth']}  \n"
                   f"**Gender** {shown['gender']}  \n**Registered** {shown['registeredDate']}  \n"
                   f"**Billing** {shown['billingStatus']} {shown['billingAccountId']}")
    if not st.session_state.get("confirm_delete"):
        if st.button("Delete patient", icon=":material/delete:", key="delete_patient"):
            st.session_state["confirm_delete"] = True
            st.rerun()
        return
    st.warning("Delete this patient? The record disappears from lists; its history is kept.",
               icon=":material/warning:")
    yes, no = st.columns(2)
    if yes.button("Yes, delete", type="primary", icon=":material/delete_forever:", key="delete_confirm"):
        ui.client().delete_patient(str(patient["id"]))
        forget_patients()
        _close_record()
        st.session_state.pop("patients_open", None)
        st.toast("Patient deleted.", icon=":material/delete:")
        st.rerun()
    if no.button("Cancel", key="delete_cancel"):
        st.session_state.pop("confirm_delete", None)
        st.rerun()


def _edit(patient: dict[str, Any]) -> None:
    errors: dict[str, str] = st.session_state.get("edit_errors", {})
    conflict = st.session_state.get("edit_conflict")
    if conflict:
        st.warning(conflict, icon=":material/sync_problem:")
    # The form edits the version the user opened, not whatever the last rerun fetched: otherwise
    # a colleague's save would silently swap the form (and drop this user's typing) instead of
    # answering this user's save with a 409 that we can explain.
    base = st.session_state.get(ui.EDIT_BASE_KEY)
    if not base or base[0] != patient["id"]:
        base = (patient["id"], patient.get("version"), dict(patient))
        st.session_state[ui.EDIT_BASE_KEY] = base
    _, version, shown = base

    def key(field: str) -> str:
        """The field's widget key, holding the record's value until the user changes it (or an edit
        given back after an expired session): set here, not as ``value=``, which Streamlit would
        refuse next to a value already in session state."""
        name = ui.edit_field_key(patient["id"], version, field)
        if name not in st.session_state:
            st.session_state[name] = ui.edit_shown_value(shown, field)
        return name

    with st.form(f"edit_{patient['id']}_{version}", border=False):
        values: dict[str, Any] = {"name": st.text_input("Full name", key=key("name"), max_chars=100)}
        ui.field_error(errors, "name")
        values["email"] = st.text_input("E-mail", key=key("email"))
        ui.field_error(errors, "email")
        values["phone"] = st.text_input("Phone", key=key("phone"))
        ui.field_error(errors, "phone")
        values["address"] = st.text_input("Street address", key=key("address"))
        ui.field_error(errors, "address")
        values["city"] = st.text_input("City", key=key("city"))
        ui.field_error(errors, "city")
        values["dateOfBirth"] = st.date_input("Date of birth", key=key("dateOfBirth"), **ui.DATE_BOUNDS,
                                              format="YYYY-MM-DD")
        ui.field_error(errors, "dateOfBirth")
        values["gender"] = st.selectbox("Gender", ui.GENDERS, key=key("gender"),
                                        format_func=lambda g: g.title() if g else "Not stated")
        ui.field_error(errors, "gender")
        ui.show_other_errors(errors, set(ui.EDIT_FIELDS))
        saved = st.form_submit_button("Save changes", type="primary", icon=":material/save:")
    if not saved:
        return
    data = {k: (v.isoformat() if isinstance(v, date) else (v.strip() if isinstance(v, str) else v))
            for k, v in values.items()}
    # An emptied optional field is sent as null, which clears it (an omitted field keeps its value).
    data = {k: (None if v == "" and k not in ("name", "email", "address") else v) for k, v in data.items()}
    for stale in ("edit_conflict", "edit_errors"):
        st.session_state.pop(stale, None)
    try:
        ui.client().update_patient(str(patient["id"]), data, version=version)
    except Conflict as exc:
        if exc.errors.get("email"):
            st.session_state["edit_errors"] = {"email": exc.errors["email"]}
        else:
            st.session_state["edit_conflict"] = (
                f"Someone else changed this record after you opened it (you edited version {version}). "
                "It has been reloaded with their changes; make your edit again. "
                f"Server: {ui.md_text(exc.message)}"
            )
            st.session_state.pop(ui.EDIT_BASE_KEY, None)
            st.session_state.pop(ui.EDIT_REOPEN_KEY, None)
    except InvalidInput as exc:
        st.session_state["edit_errors"] = exc.errors or {"form": exc.message}
    else:
        st.session_state.pop(ui.EDIT_BASE_KEY, None)
        st.session_state.pop(ui.EDIT_REOPEN_KEY, None)
        forget_patients()
        st.toast("Changes saved.", icon=":material/check_circle:")
    st.rerun()


def _audit(patient: dict[str, Any]) -> None:
    entries = ui.client().patient_audit(str(patient["id"]))
    if not entries:
        ui.empty_state("No audit entries.", "Changes to this record are listed here.", icon=":material/history:")
        return
    st.dataframe(
        [{"When": ui.fmt_date(e.get("at") or e.get("occurredAt") or e.get("timestamp")),
          "Who": e.get("actor"), "Action": e.get("action"),
          "Fields changed": ", ".join(e.get("fields") or e.get("changedFields") or [])} for e in entries],
        hide_index=True, width="stretch",
    )


if patient_id:
    st.divider()
    try:
        opened = ui.client().get_patient(str(patient_id))
    except NotFound:
        given_back = ui.draft_restored(ui.PATIENTS_PAGE)
        _close_record()
        ui.empty_state("This patient no longer exists.", "It may have been deleted by a colleague."
                       + (" The changes kept from your expired session could not be saved." if given_back else ""),
                       icon=":material/person_off:")
    else:
        if ui.draft_restored(ui.PATIENTS_PAGE):
            st.info("Your session expired before your changes to this record were saved. They are back in its "
                    "Edit tab: check them and save again.", icon=":material/restore:")
        _show_detail(opened)
