#!/bin/sh
# The connector's least-privilege role for trigger-mode capture (docs/security.md,
# "Trigger mode"), created by the table owner. Its password comes from PGPASSWORD in
# deploy/compose/connector.env, the same file the connector reads.
set -eu
: "${PGPASSWORD:?set PGPASSWORD in deploy/compose/connector.env}"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     --no-password --host /var/run/postgresql \
     -v connector_password="$PGPASSWORD" <<'SQL'
CREATE ROLE connector_app LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION
    PASSWORD :'connector_password';
REVOKE ALL ON DATABASE legacy FROM PUBLIC;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT CONNECT ON DATABASE legacy TO connector_app;
-- the state schema: the connector creates and migrates its tables inside it
CREATE SCHEMA connector;
GRANT USAGE, CREATE ON SCHEMA connector TO connector_app;
-- the source table: read it (initial sync) and put the capture trigger on it
GRANT USAGE ON SCHEMA public TO connector_app;
GRANT SELECT, TRIGGER ON TABLE public.orders TO connector_app;
SQL
