"""``python -m infra.dbinit``: create pms's roles, databases and extensions on a managed PostgreSQL.

The one-off ECS task ``<stack>-db-init`` runs this once after RDS is created (compose uses
docker/postgres/10-pms-databases.sh, embedded mode pms.embedded): the same
:func:`pms.embedded.bootstrap_databases`, fed from Secrets Manager through the environment.
Idempotent, so a rerun after a failure is safe.
"""

from __future__ import annotations

import os
import sys

from pms.embedded import ANALYST_ROLE, APP_ROLE, bootstrap_databases

REQUIRED = ("PMS_DBINIT_SUPERUSER_URL", "PMS_DB_APP_PASSWORD", "PMS_DB_ANALYST_PASSWORD")


def _libpq(url: str) -> str:
    # SQLAlchemy URLs name the driver (postgresql+psycopg://); libpq wants postgresql://.
    scheme, sep, rest = url.partition("://")
    return f"postgresql{sep}{rest}" if scheme.startswith("postgresql") else url


def main() -> int:
    missing = [name for name in REQUIRED if not os.environ.get(name)]
    if missing:
        sys.stderr.write(f"db-init: missing environment variables: {', '.join(missing)}\n")
        return 2
    bootstrap_databases(
        superuser_dsn=_libpq(os.environ["PMS_DBINIT_SUPERUSER_URL"]),
        app_role=APP_ROLE,
        app_password=os.environ["PMS_DB_APP_PASSWORD"],
        analyst_role=ANALYST_ROLE,
        analyst_password=os.environ["PMS_DB_ANALYST_PASSWORD"],
    )
    sys.stdout.write("db-init: roles, databases and extensions are ready\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
