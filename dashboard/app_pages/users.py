"""ADMIN: list users, create one with a role, change a role, deactivate or reactivate."""

from __future__ import annotations

import streamlit as st

from dashboard import ui
from dashboard.client import Conflict, InvalidInput, cached_users, forget_users

ROLES = (ui.STAFF, ui.ANALYST, ui.ADMIN)

auth = ui.require_session()
st.title(":material/admin_panel_settings: Users")
if auth.role != ui.ADMIN:
    st.error("Only administrators manage users.", icon=":material/block:")
    st.stop()

users = cached_users(ui.gateway_url(), auth.token)
active = sum(1 for u in users if u.get("active", True))
st.caption(f"{ui.plural(len(users), 'account')} · {ui.fmt_int(active)} active")
if users:
    st.dataframe(
        [{"E-mail": u.get("email"), "Role": u.get("role"), "Active": bool(u.get("active", True)),
          "Created": ui.fmt_date(u.get("createdAt"))} for u in users],
        hide_index=True, width="stretch",
        column_config={"Active": st.column_config.CheckboxColumn("Active")},
    )
else:
    ui.empty_state("No users yet.", "Create the first one below.", icon=":material/person_off:")

create_col, edit_col = st.columns(2)
with create_col, st.container(border=True):
    st.subheader(":material/person_add: New user")
    errors: dict[str, str] = st.session_state.get("user_errors", {})
    n = st.session_state.setdefault("user_form_n", 0)
    with st.form(f"new_user_{n}", border=False):
        email = st.text_input("E-mail", key=f"user_{n}_email")
        ui.field_error(errors, "email")
        password = st.text_input("Initial password", type="password", key=f"user_{n}_password",
                                 help="At least 12 characters, not a common password.")
        ui.field_error(errors, "password")
        role = st.selectbox("Role", ROLES, key=f"user_{n}_role")
        ui.field_error(errors, "role")
        ui.show_other_errors(errors, {"email", "password", "role"})
        create = st.form_submit_button("Create user", type="primary", icon=":material/save:")
    if create:
        try:
            ui.client().create_user(email=email.strip(), password=password, role=role)
        except InvalidInput as exc:
            st.session_state["user_errors"] = exc.errors or {"form": exc.message}
        except Conflict as exc:
            st.session_state["user_errors"] = {"email": exc.errors.get("email") or exc.message}
        else:
            st.session_state.pop("user_errors", None)
            st.session_state["user_form_n"] = n + 1
            forget_users()
            st.toast("User created.", icon=":material/check_circle:")
        st.rerun()

with edit_col, st.container(border=True):
    st.subheader(":material/manage_accounts: Change a user")
    if not users:
        st.caption("Nothing to change yet.")
    else:
        by_id = {str(u["id"]): u for u in users}
        chosen = st.selectbox("User", list(by_id), key="user_edit_id",
                              format_func=lambda i: f"{by_id[i].get('email')} ({by_id[i].get('role')})")
        target = by_id[chosen]
        is_self = str(target.get("email", "")).lower() == auth.email
        new_role = st.selectbox("Role", ROLES, index=ROLES.index(target["role"]) if target.get("role") in ROLES else 0,
                                key=f"user_edit_role_{chosen}", disabled=is_self)
        new_active = st.toggle("Active", value=bool(target.get("active", True)), key=f"user_edit_active_{chosen}",
                               disabled=is_self)
        if is_self:
            st.caption("You cannot change your own role or deactivate yourself here.")
        if st.button("Save", type="primary", icon=":material/save:", key="user_edit_save", disabled=is_self):
            try:
                ui.client().update_user(
                    chosen,
                    role=new_role if new_role != target.get("role") else None,
                    active=new_active if new_active != bool(target.get("active", True)) else None,
                )
            except (InvalidInput, Conflict) as exc:
                st.error(ui.md_text(next(iter(exc.errors.values()), exc.message)), icon=":material/error:")
            else:
                forget_users()
                st.toast("User updated.", icon=":material/check_circle:")
                st.rerun()
