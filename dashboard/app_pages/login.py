"""Sign in with e-mail and password against ``POST /auth/login``."""

from __future__ import annotations

import streamlit as st

from dashboard import ui
from dashboard.client import GatewayClient, InvalidInput, NotAuthenticated, RateLimited

_, middle, _ = st.columns([1, 2, 1])
with middle:
    st.title(":material/local_hospital: Patient Management")
    st.caption("Staff dashboard — sign in with your work account.")

    note = st.session_state.get(ui.NOTE_KEY)
    if note:
        st.info(note, icon=":material/info:")

    with st.form("login", border=True):
        email = st.text_input("E-mail", key="login_email", autocomplete="username",
                              placeholder="you@clinic.example")
        password = st.text_input("Password", type="password", key="login_password",
                                 autocomplete="current-password")
        submitted = st.form_submit_button("Sign in", type="primary", icon=":material/login:", width="stretch")

    if submitted:
        if not email.strip() or not password:
            st.error("Enter your e-mail and password.", icon=":material/error:")
        else:
            try:
                auth = GatewayClient(ui.gateway_url()).login(email=email.strip(), password=password,
                                                             on_behalf_of=st.context.ip_address,
                                                             forwarding_key=ui.forwarding_key())
            except NotAuthenticated:
                st.error("E-mail or password is not correct.", icon=":material/lock:")
            except RateLimited as exc:
                wait = f" Try again in {exc.retry_after} s." if exc.retry_after else " Try again later."
                st.error(f"Too many sign-in attempts.{wait}", icon=":material/timer:")
            except InvalidInput as exc:
                st.error(ui.md_text(exc.errors.get("email") or exc.message), icon=":material/error:")
            else:
                ui.sign_in(auth)
                st.rerun()
