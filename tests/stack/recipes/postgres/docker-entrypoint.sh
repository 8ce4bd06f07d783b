#!/usr/bin/env bash
# The behaviour of the official postgres image's entrypoint, written for the local test
# image (what is and is not reproduced: tests/stack/recipes/README.md).
set -Eeo pipefail

# VAR from $VAR or from the file named by $VAR_FILE (never both), else the default.
from_env_or_file() {
  local name="$1" default="${2:-}" file_name="${1}_FILE"
  if [ -n "${!name:-}" ] && [ -n "${!file_name:-}" ]; then
    echo "error: both $name and $file_name are set (they are exclusive)" >&2
    exit 1
  fi
  local value="$default"
  if [ -n "${!name:-}" ]; then
    value="${!name}"
  elif [ -n "${!file_name:-}" ]; then
    value="$(<"${!file_name}")"
  fi
  export "$name=$value"
  unset "$file_name"
}

wants_help() {
  local arg
  for arg; do
    case "$arg" in -'?' | --help | --describe-config | -V | --version) return 0 ;; esac
  done
  return 1
}

sql() { # psql on the socket as the bootstrap superuser; stops at the first error
  local args=(-v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --no-password --no-psqlrc)
  [ -z "$POSTGRES_DB" ] || args+=(--dbname "$POSTGRES_DB")
  PGHOST= PGHOSTADDR= psql "${args[@]}" "$@"
}

initialize() { # $@ = the server's command line (postgres -c ...)
  if [ -z "$POSTGRES_PASSWORD" ] && [ "$POSTGRES_HOST_AUTH_METHOD" != trust ]; then
    echo "Error: Database is uninitialized and superuser password is not specified." >&2
    echo "       Set POSTGRES_PASSWORD (or POSTGRES_PASSWORD_FILE)." >&2
    exit 1
  fi
  ls /docker-entrypoint-initdb.d/ >/dev/null
  # POSTGRES_INITDB_ARGS is word-split by the shell, as the official image does (eval).
  eval 'initdb --username="$POSTGRES_USER" --pwfile=<(printf "%s\n" "$POSTGRES_PASSWORD") '"$POSTGRES_INITDB_ARGS"
  shift # "postgres"
  local method
  method="$(postgres -C password_encryption "$@")"
  : "${POSTGRES_HOST_AUTH_METHOD:=$method}"
  printf '\nhost all all all %s\n' "$POSTGRES_HOST_AUTH_METHOD" >>"$PGDATA/pg_hba.conf"

  export PGPASSWORD="${PGPASSWORD:-$POSTGRES_PASSWORD}"
  # A first-init server on the socket only: nothing outside sees a half-made cluster.
  PGUSER="${PGUSER:-$POSTGRES_USER}" pg_ctl -D "$PGDATA" \
    -o "$(printf '%q ' "$@" -c listen_addresses='' -p "${PGPORT:-5432}")" -w start
  local exists
  exists="$(POSTGRES_DB= sql --dbname postgres --set db="$POSTGRES_DB" --tuples-only \
    <<<"SELECT 1 FROM pg_database WHERE datname = :'db';")"
  if [ -z "$exists" ]; then
    POSTGRES_DB= sql --dbname postgres --set db="$POSTGRES_DB" <<<'CREATE DATABASE :"db";'
  fi
  local f
  for f in /docker-entrypoint-initdb.d/*; do
    case "$f" in
      *.sh) if [ -x "$f" ]; then "$f"; else . "$f"; fi ;;
      *.sql) sql -f "$f" ;;
      *.sql.gz) gunzip -c "$f" | sql ;;
      *.sql.xz) xzcat "$f" | sql ;;
      *.sql.zst) zstd -dc "$f" | sql ;;
      *) [ ! -e "$f" ] || echo "$0: ignoring $f" ;;
    esac
  done
  PGUSER="${PGUSER:-postgres}" pg_ctl -D "$PGDATA" -m fast -w stop
  unset PGPASSWORD
  echo "PostgreSQL init process complete; ready for start up."
}

if [ "${1:0:1}" = - ]; then
  set -- postgres "$@"
fi
if [ "$1" = postgres ] && ! wants_help "$@"; then
  from_env_or_file POSTGRES_PASSWORD
  from_env_or_file POSTGRES_USER postgres
  from_env_or_file POSTGRES_DB "$POSTGRES_USER"
  from_env_or_file POSTGRES_INITDB_ARGS
  : "${POSTGRES_HOST_AUTH_METHOD:=}"

  mkdir -p "$PGDATA"
  chmod 00700 "$PGDATA" || :
  mkdir -p /var/run/postgresql || :
  chmod 03775 /var/run/postgresql || :
  if [ "$(id -u)" = 0 ]; then
    # As root: hand the directories to postgres, then run this script again as postgres.
    find "$PGDATA" \! -user postgres -exec chown postgres '{}' +
    find /var/run/postgresql \! -user postgres -exec chown postgres '{}' +
    exec gosu postgres "${BASH_SOURCE[0]}" "$@"
  fi
  if [ -s "$PGDATA/PG_VERSION" ]; then
    echo "PostgreSQL Database directory appears to contain a database; Skipping initialization"
  else
    initialize "$@"
  fi
fi
exec "$@"
