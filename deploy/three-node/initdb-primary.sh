#!/bin/sh
# Run once by the postgres image on the primary's first start (docker-compose.yml): a
# replication role for the replica's pg_basebackup, and the replica named as synchronous
# standby (an acknowledged message is then on both servers). Set here rather than with
# "-c synchronous_standby_names" so the image's own set-up commits do not wait for a replica
# that does not exist yet.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD '$REPLICATION_PASSWORD';
ALTER SYSTEM SET synchronous_standby_names = 'blindpost_replica';
SQL
echo "host replication replicator all scram-sha-256" >> "$PGDATA/pg_hba.conf"
