#!/usr/bin/env bash
# Start Debian's PostgreSQL 15 cluster "main" on 127.0.0.1:5432 without systemd, and make sure
# role kd (password kd) and database mlflow (owned by kd) exist. Idempotent. Needs root.
# Prints the URI on stdout as its last line.
set -euo pipefail

VERSION=15
CLUSTER=main
BIN=/usr/lib/postgresql/$VERSION/bin   # Debian's binaries, whatever else is on PATH
URI=postgresql://kd:kd@127.0.0.1:5432/mlflow

if [ "$(id -u)" -ne 0 ]; then
    echo "start_postgres.sh: must run as root" >&2
    exit 1
fi
cd /   # postgres cannot read every working directory

as_postgres() {
    runuser -u postgres -- "$@"
}

psql_admin() {  # run one SQL statement as the superuser over the local socket
    as_postgres "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -tA -p 5432 -c "$1"
}

if ! pg_lsclusters -h "$VERSION" "$CLUSTER" >/dev/null 2>&1; then
    echo "start_postgres.sh: creating cluster $VERSION/$CLUSTER" >&2
    pg_createcluster --port 5432 "$VERSION" "$CLUSTER" >&2
fi

conf_file=/etc/postgresql/$VERSION/$CLUSTER/conf.d/kd-ci.conf
conf="listen_addresses = '127.0.0.1'
port = 5432"
if [ "$(cat "$conf_file" 2>/dev/null)" != "$conf" ]; then
    install -d -o postgres -g postgres "$(dirname "$conf_file")"
    printf '%s\n' "$conf" >"$conf_file"
    chown postgres:postgres "$conf_file"
    if pg_ctlcluster "$VERSION" "$CLUSTER" status >/dev/null 2>&1; then
        echo "start_postgres.sh: restarting cluster for the new settings" >&2
        pg_ctlcluster "$VERSION" "$CLUSTER" restart >&2
    fi
fi

install -d -o postgres -g postgres -m 2775 /run/postgresql
if ! pg_ctlcluster "$VERSION" "$CLUSTER" status >/dev/null 2>&1; then
    echo "start_postgres.sh: starting cluster $VERSION/$CLUSTER" >&2
    pg_ctlcluster "$VERSION" "$CLUSTER" start >&2
fi

for _ in $(seq 30); do
    "$BIN/pg_isready" -q -h 127.0.0.1 -p 5432 && break
    sleep 1
done
"$BIN/pg_isready" -h 127.0.0.1 -p 5432 >&2

if [ "$(psql_admin "SELECT 1 FROM pg_roles WHERE rolname = 'kd'")" = 1 ]; then
    psql_admin "ALTER ROLE kd WITH LOGIN PASSWORD 'kd'"
else
    psql_admin "CREATE ROLE kd WITH LOGIN PASSWORD 'kd'"
fi
if [ "$(psql_admin "SELECT 1 FROM pg_database WHERE datname = 'mlflow'")" != 1 ]; then
    psql_admin "CREATE DATABASE mlflow OWNER kd"
fi

# Check the URI really works (TCP + password), then print it.
"$BIN/psql" -X -q -tA -c "SELECT 1" "$URI" >/dev/null
echo "$URI"
