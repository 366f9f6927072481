"""Entry point of the staff dashboard: page config, sidebar, navigation by role.

Run it with ``pms serve dashboard`` (or ``streamlit run dashboard/streamlit_app.py``).
Signed out, only the login page exists. Signed in, the pages a role may use are listed;
the gateway refuses the rest anyway. Two failures are handled once, here, for every page:
an expired/revoked token (back to login with a note) and a gateway that is down or slow
(a banner; the next rerun works again when it returns).
"""

from __future__ import annotations

import importlib
import threading

import streamlit as st

from dashboard import ui
from dashboard.client import GatewayError, NotAuthenticated

st.set_page_config(
    page_title="PMS · Staff dashboard",
    page_icon=":material/local_hospital:",
    layout="wide",
    initial_sidebar_state="expanded",
)


@st.cache_resource(show_spinner=False)
def _preload_charting() -> threading.Thread:
    """Import Polars and Altair once per server process in the background (seconds on a busy box),
    so the first user to open Analytics does not wait for it."""
    thread = threading.Thread(target=importlib.import_module, args=("dashboard.charts",), daemon=True,
                              name="preload-charts")
    thread.start()
    return thread


_preload_charting()

auth = ui.current_session()
if auth is not None and auth.expired:
    ui.sign_out(ui.SESSION_EXPIRED_NOTE, keep_draft=True)
    auth = None

login = st.Page("app_pages/login.py", title="Sign in", icon=":material/login:", url_path="login")
register = st.Page("app_pages/register.py", title="Register patient", icon=":material/person_add:",
                   url_path="register")
patients = st.Page("app_pages/patients.py", title="Patients", icon=":material/groups:", url_path="patients")
analytics = st.Page("app_pages/analytics.py", title="Analytics", icon=":material/monitoring:",
                    url_path="analytics")
users = st.Page("app_pages/users.py", title="Users", icon=":material/admin_panel_settings:", url_path="users")

if auth is None:
    ui.drop_stale_draft()
    page = st.navigation([login], position="hidden")
else:
    sections: dict[str, list[st.Page]] = {}
    if auth.role in ui.PATIENT_ROLES:
        sections["Patients"] = [patients, register]
    if auth.role in ui.ANALYTICS_ROLES:
        sections["Insights"] = [analytics]
    if auth.role == ui.ADMIN:
        sections["Administration"] = [users]
    page = st.navigation(sections)
    # Once, after a sign-in that gave a draft back: to the form the expired session interrupted.
    back_to = {ui.REGISTER_PAGE: register, ui.PATIENTS_PAGE: patients}.get(st.session_state.pop(ui.DRAFT_OPEN_KEY, ""))
    if back_to is not None and page.title != back_to.title:
        st.switch_page(back_to)

with st.sidebar:
    st.markdown("### :material/local_hospital: Patient Management")
    if auth is not None:
        st.caption(f"Signed in as **{ui.md_text(auth.email)}**")
        st.badge(auth.role.title(), icon=":material/badge:", color="blue")
        if st.button("Sign out", icon=":material/logout:", key="sign_out", width="stretch"):
            ui.sign_out("You have signed out.", revoke=True)
            st.rerun()

banner = st.container()
try:
    page.run()
except NotAuthenticated:
    ui.expire_session()
except GatewayError as exc:
    ui.error_banner(exc, banner)
