"""dead letters: the analyst role reads every column but ``raw``

``dead_letters.raw`` keeps the bytes of a message the pipeline could not read; a garbled
``PatientEvent`` still carries the patient's name and email, so those bytes are health data.
The analyst role (notebooks, ``pms export``, the analytics API) gets column-level ``SELECT`` on
every other column instead of ``SELECT`` on the table; the pipeline (the table's owner) still
writes and reads it all. Every other role that could read the table (a ``PUBLIC`` grant
included) is narrowed the same way.

A column added to ``dead_letters`` later is NOT readable by the analyst until its migration
grants it: the safe default for a table that holds raw message bytes.

Revision ID: 0002_dead_letter_privacy
Revises: 0001_analytics_tables
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0002_dead_letter_privacy"
down_revision: str | None = "0001_analytics_tables"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The columns of ``dead_letters`` an analyst may read (all but ``raw``), as of this revision.
READABLE = ("id", "topic", "partition", "kafka_offset", "reason", "raw_digest", "received_at")


def _analyst_role() -> str:
    """The analyst role's name, from the settings ``pms.db.migrate`` hands to Alembic (see
    :func:`pms.embedded.analyst_role`)."""
    from pms.embedded import analyst_role

    return analyst_role(context.config.attributes.get("settings"))


def _quote(name: str) -> str:
    return op.get_bind().dialect.identifier_preparer.quote(name)


def _readers() -> list[str]:
    """Roles other than the owner holding SELECT on the whole table (``PUBLIC`` as ``public``)."""
    rows = op.get_bind().execute(sa.text(
        "SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'public' ELSE r.rolname END "
        "FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee "
        "WHERE c.oid = 'dead_letters'::regclass AND a.privilege_type = 'SELECT' AND a.grantee <> c.relowner"
    ))
    return sorted(str(row[0]) for row in rows)


def _role_exists(name: str) -> bool:
    return op.get_bind().execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :n"), {"n": name}).first() is not None


def upgrade() -> None:
    analyst = _analyst_role()
    # The analyst is narrowed even when it holds no grant yet (bootstrap not run): a column-level grant
    # is what tells pms.embedded.bootstrap_databases to leave the table alone on later starts.
    roles = set(_readers()) | ({analyst} if _role_exists(analyst) else set())
    columns = ", ".join(_quote(c) for c in READABLE)
    for role in sorted(roles):
        grantee = "PUBLIC" if role == "public" else _quote(role)
        # Identifiers quoted by the dialect; no value is interpolated.
        op.execute(f"REVOKE SELECT ON TABLE dead_letters FROM {grantee}")  # noqa: S608
        op.execute(f"GRANT SELECT ({columns}) ON TABLE dead_letters TO {grantee}")


def downgrade() -> None:
    analyst = _analyst_role()
    if _role_exists(analyst):
        # A table-level REVOKE also drops the column grants; then the table as 0001 left it.
        op.execute(f"REVOKE SELECT ON TABLE dead_letters FROM {_quote(analyst)}")  # noqa: S608
        op.execute(f"GRANT SELECT ON TABLE dead_letters TO {_quote(analyst)}")
