"""``python -m infra.dbinit``: create pms's roles, databases and extensions on a managed PostgreSQL.

The one-off ECS task ``<stack>-db-init`` runs this once after RDS is created (compose uses
docker/postgres/10-pms-databases.sh, embedded mode pms.embedded): the same
:func:`pms.embedded.bootstrap_databases`, fed from Secrets Manager through the environment.
Idempotent, so a rerun after a failure is safe.
"""

from __future__ import annotations

import os
import sys

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

from pms.embedded import ANALYST_ROLE, APP_ROLE, bootstrap_databases, libpq_dsn

REQUIRED = ("PMS_DBINIT_SUPERUSER_URL", "PMS_DB_APP_PASSWORD", "PMS_DB_ANALYST_PASSWORD")


def grant_app_role_to_master(dsn: str) -> None:
    """Make the master login a member of the application role before the bootstrap runs.

    RDS's master user is not a superuser: since PostgreSQL 16, ``CREATE DATABASE ... OWNER pms``
    and ``ALTER DEFAULT PRIVILEGES FOR ROLE pms`` need the right to SET ROLE pms, which a role's
    creator does not get by default. Harmless where the login is a real superuser.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (APP_ROLE,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(APP_ROLE)))
        conn.execute(sql.SQL("GRANT {} TO CURRENT_USER").format(sql.Identifier(APP_ROLE)))


def main() -> int:
    missing = [name for name in REQUIRED if not os.environ.get(name)]
    if missing:
        sys.stderr.write(f"db-init: missing environment variables: {', '.join(missing)}\n")
        return 2
    dsn = libpq_dsn(make_url(os.environ["PMS_DBINIT_SUPERUSER_URL"]))
    grant_app_role_to_master(dsn)
    bootstrap_databases(
        superuser_dsn=dsn,
        app_role=APP_ROLE,
        app_password=os.environ["PMS_DB_APP_PASSWORD"],
        analyst_role=ANALYST_ROLE,
        analyst_password=os.environ["PMS_DB_ANALYST_PASSWORD"],
    )
    sys.stdout.write("db-init: roles, databases and extensions are ready\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
