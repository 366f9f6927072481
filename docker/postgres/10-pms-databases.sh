#!/usr/bin/env bash
# Creates what pms needs on a fresh PostgreSQL (run once by the postgres image's entrypoint from
# /docker-entrypoint-initdb.d, or by hand with PG* variables set): the application role `pms`, the
# read-only role `pms_analyst`, one database per service and their extensions. It mirrors
# pms.embedded.bootstrap_databases, and tests/infra/test_postgres_init.py runs it against a real
# server and checks it against that function's lists. Safe to run again (idempotent).
#
# Needs PMS_DB_APP_PASSWORD and PMS_DB_ANALYST_PASSWORD (from .env; never baked into the image).
set -euo pipefail

: "${PMS_DB_APP_PASSWORD:?PMS_DB_APP_PASSWORD must be set}"
: "${PMS_DB_ANALYST_PASSWORD:?PMS_DB_ANALYST_PASSWORD must be set}"
APP_ROLE="${PMS_DB_APP_ROLE:-pms}"
ANALYST_ROLE="${PMS_DB_ANALYST_ROLE:-pms_analyst}"

psql_super() {
    psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet \
        --username "${POSTGRES_USER:-postgres}" "$@"
}

# Passwords travel as psql variables (quoted by %L), never as part of the command line text.
psql_super --dbname "${POSTGRES_DB:-postgres}" \
    -v app_role="$APP_ROLE" -v analyst_role="$ANALYST_ROLE" \
    -v app_password="$PMS_DB_APP_PASSWORD" -v analyst_password="$PMS_DB_ANALYST_PASSWORD" <<'SQL'
SELECT format('CREATE ROLE %I', :'app_role')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'app_role') \gexec
SELECT format('ALTER ROLE %I WITH LOGIN CREATEDB PASSWORD %L', :'app_role', :'app_password') \gexec
SELECT format('CREATE ROLE %I', :'analyst_role')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'analyst_role') \gexec
SELECT format('ALTER ROLE %I WITH LOGIN PASSWORD %L', :'analyst_role', :'analyst_password') \gexec

SELECT format('CREATE DATABASE %I OWNER %I', db, :'app_role')
  FROM unnest(ARRAY['auth', 'patients', 'billing', 'analytics']) AS db
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = db) \gexec
SELECT format('REVOKE ALL ON DATABASE %I FROM PUBLIC', db)
  FROM unnest(ARRAY['auth', 'patients', 'billing', 'analytics']) AS db \gexec
SELECT format('GRANT ALL ON DATABASE %I TO %I', db, :'app_role')
  FROM unnest(ARRAY['auth', 'patients', 'billing', 'analytics']) AS db \gexec
SELECT format('GRANT CONNECT ON DATABASE analytics TO %I', :'analyst_role') \gexec
REVOKE CONNECT ON DATABASE postgres FROM PUBLIC;
REVOKE CONNECT ON DATABASE template1 FROM PUBLIC;
SELECT format('GRANT CONNECT ON DATABASE postgres TO %I', :'app_role') \gexec
SQL

# database -> extensions (keep in step with pms.embedded.EXTENSIONS; a test compares them)
declare -A EXTENSIONS=(
    [auth]="citext"
    [patients]="pg_trgm fuzzystrmatch citext unaccent"
    [billing]=""
    [analytics]=""
)

for db in auth patients billing analytics; do
    {
        for ext in ${EXTENSIONS[$db]}; do
            echo "CREATE EXTENSION IF NOT EXISTS \"$ext\";"
        done
        echo "SELECT format('GRANT ALL ON SCHEMA public TO %I', :'app_role') \\gexec"
        if [ "$db" = "analytics" ]; then
            cat <<'SQL'
SELECT format('GRANT USAGE ON SCHEMA public TO %I', :'analyst_role') \gexec
SELECT format('ALTER DEFAULT PRIVILEGES FOR ROLE %I IN SCHEMA public GRANT SELECT ON TABLES TO %I',
              :'app_role', :'analyst_role') \gexec
SELECT format('GRANT SELECT ON ALL TABLES IN SCHEMA public TO %I', :'analyst_role') \gexec
SELECT format('ALTER ROLE %I SET default_transaction_read_only = on', :'analyst_role') \gexec
SQL
        fi
    } | psql_super --dbname "$db" -v app_role="$APP_ROLE" -v analyst_role="$ANALYST_ROLE"
done

echo "pms: roles $APP_ROLE, $ANALYST_ROLE and databases auth, patients, billing, analytics are ready"
