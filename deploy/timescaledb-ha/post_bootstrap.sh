#!/bin/bash
# Patroni `bootstrap.post_bootstrap` for the vietmarket cluster
# (deploy/nomad/jobs/timescaledb-ha.nomad.hcl renders it to /local/post_bootstrap.sh).
#
# Patroni runs it once, on the member that initialises a new cluster, right after initdb, with
# the superuser connection URL as $1 (and PGPASSFILE set). Patroni 3 dropped `bootstrap.users`,
# so the roles the cluster needs are created here:
#   * vietmarket: the application's login role, owner of the vietmarket database (with the
#     timescaledb extension, which needs a superuser to create);
#   * pgleader:   the proxy's health-check role: LOGIN and pg_monitor, nothing else (no
#     superuser, no database, no write privilege).
# Passwords come from the environment (the job reads them from the Nomad Variable
# nomad/jobs/timescaledb-ha); they are passed to psql as variables, never spliced into SQL text.
#
# Idempotent, so the same script is the documented manual step for a cluster that already
# exists (docs/runbook.md): `post_bootstrap.sh "postgres://postgres@/postgres?host=/var/run/postgresql"`.
# tests/deploy_files.rs runs it against a real PostgreSQL and logs in as both roles.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 SUPERUSER_CONNECTION_URL" >&2
  exit 2
fi
: "${VIETMARKET_PASSWORD:?VIETMARKET_PASSWORD is not set (Nomad Variable nomad/jobs/timescaledb-ha, key vietmarket_password)}"
: "${PGLEADER_PASSWORD:?PGLEADER_PASSWORD is not set (Nomad Variable nomad/jobs/timescaledb-ha, key pgleader_password)}"

psql "$1" --no-psqlrc --quiet -v ON_ERROR_STOP=1 \
  -v vietmarket_password="$VIETMARKET_PASSWORD" \
  -v pgleader_password="$PGLEADER_PASSWORD" <<'SQL'
-- Runs before the first replica joins; do not wait for a synchronous standby that is not there.
SET synchronous_commit TO off;
SET client_min_messages TO warning;

SELECT 'CREATE ROLE vietmarket' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'vietmarket') \gexec
ALTER ROLE vietmarket WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'vietmarket_password';

SELECT 'CREATE ROLE pgleader' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgleader') \gexec
ALTER ROLE pgleader WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD :'pgleader_password';
GRANT pg_monitor TO pgleader;

SELECT 'CREATE DATABASE vietmarket OWNER vietmarket'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'vietmarket') \gexec

\connect vietmarket
SET synchronous_commit TO off;
-- Always present in the timescaledb-ha image; the guard only lets the tests run this script on a
-- plain PostgreSQL. deploy/timescaledb/schema.sql fails loudly if the extension is missing.
SELECT 'CREATE EXTENSION IF NOT EXISTS timescaledb'
WHERE EXISTS (SELECT FROM pg_available_extensions WHERE name = 'timescaledb') \gexec
SQL

echo "post_bootstrap: roles vietmarket and pgleader (pg_monitor) and database vietmarket are in place"
