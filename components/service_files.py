"""Pure renderers for the files the app stack's services read.

No Pulumi here: the integration tests feed the exact output to a real redis-server,
PostgreSQL and ``caddy validate``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field

from components.containers import CONFIG_DIR
from components.monitoring_config import SERVICE_PORTS

# Paths inside the Redis container.
REDIS_TLS_DIR = f"{CONFIG_DIR}/tls"
REDIS_PORT = 6379
POSTGRES_PORT = 5432
POSTGRES_DB = "rag_feedback"
# Each PostgreSQL client its own role (least privilege):
POSTGRES_USER = "rag"  # the bootstrap superuser: the migration job only, never over TCP
POSTGRES_APP_USER = "rag_app"  # the api: owns the app's tables, nothing else
POSTGRES_BACKUP_USER = "rag_backup"  # pg_dump (pg_read_all_data), pg_basebackup, WAL
POSTGRES_MONITOR_USER = "rag_monitor"  # postgres_exporter (pg_monitor)
# Role -> (attributes, the only predefined roles it may be a member of).
POSTGRES_CLIENT_ROLES: Mapping[str, tuple[str, tuple[str, ...]]] = {
    POSTGRES_APP_USER: ("NOREPLICATION", ()),
    POSTGRES_BACKUP_USER: ("REPLICATION", ("pg_read_all_data",)),
    POSTGRES_MONITOR_USER: ("NOREPLICATION", ("pg_monitor",)),
}
API_PORT = 8000
# PostgreSQL server settings for continuous WAL archiving (the backup job's pg_receivewal
# over a replication slot), on the server's command line so an adopted cluster's
# postgresql.conf cannot weaken them. A slot keeps WAL on the server until it is received:
# max_slot_wal_keep_size caps that, so a dead archiver cannot fill the data volume (past
# it the slot is invalidated, wal-archive fails and WalArchiveFailing fires: docs/runbooks.md).
POSTGRES_WAL_SETTINGS: Mapping[str, str] = {
    "wal_level": "replica",
    "max_wal_senders": "10",  # pg_basebackup + pg_receivewal, with room to spare
    "max_replication_slots": "10",
    "max_slot_wal_keep_size": "2GB",
}


@dataclass(frozen=True)
class RedisServerPaths:
    cert_file: str = f"{REDIS_TLS_DIR}/server.crt"
    key_file: str = f"{REDIS_TLS_DIR}/server.key"
    ca_file: str = f"{REDIS_TLS_DIR}/ca.crt"
    acl_file: str = f"{CONFIG_DIR}/users.acl"
    data_dir: str = "/data"


def render_redis_conf(paths: RedisServerPaths = RedisServerPaths()) -> str:
    """TLS-only Redis with ACL users from a file and AOF persistence."""
    directives: list[tuple[str, str]] = [
        ("port", "0"),  # no plaintext listener at all
        ("tls-port", str(REDIS_PORT)),
        ("tls-cert-file", paths.cert_file),
        ("tls-key-file", paths.key_file),
        ("tls-ca-cert-file", paths.ca_file),
        ("tls-auth-clients", "yes"),  # mutual TLS: every client shows a cert from our CA
        ("tls-protocols", '"TLSv1.2 TLSv1.3"'),  # one value: quoted, or Redis refuses it
        ("bind", "* -::*"),
        # The default user may only PING (the healthcheck); it is passwordless, which
        # protected mode would refuse from other hosts. Peers are already
        # authenticated by their client certificates.
        ("protected-mode", "no"),
        ("aclfile", paths.acl_file),
        ("dir", paths.data_dir),
        ("appendonly", "yes"),
        ("appendfsync", "everysec"),
        ("save", "3600 1 300 100 60 10000"),
        # No replicas: the only SYNC is the backup's redis-cli --rdb; don't make it wait 5 s.
        ("repl-diskless-sync-delay", "0"),
    ]
    return "".join(f"{key} {value}\n" for key, value in directives)


def redis_acl_password_hash(password: str) -> str:
    """Redis ACL '#<sha256>' form: the file never holds a password in plaintext."""
    return "#" + hashlib.sha256(password.encode()).hexdigest()


# What each ACL user may do, and nothing more (tests/encryption/test_redis_acl.py proves
# each against a real server): the app everything but @admin/@dangerous; the exporter
# what redis_exporter runs (server state, no keys: its ACL LOG stays empty); the backup user what
# `redis-cli --rdb` (REPLCONF rdb-only, SYNC) and the job's INFO/PING need, no keys.
# Restores never touch the live server (they swap files), so nobody needs CONFIG SET.
REDIS_ACL_RULES: Mapping[str, str] = {
    "app": "~* &* +@all -@admin -@dangerous",
    "exporter": (
        "resetkeys resetchannels -@all +hello +client|setname +client|list +info +ping "
        "+config|get +slowlog|get +slowlog|len +latency|latest +select"
    ),
    "backup": "resetkeys resetchannels -@all +ping +info +replconf +sync +psync",
}


def render_redis_acl(passwords: Mapping[str, str]) -> str:
    lines = ["user default on nopass resetkeys resetchannels -@all +ping +hello"]
    for user, password in passwords.items():
        rules = REDIS_ACL_RULES[user]
        lines.append(f"user {user} on {redis_acl_password_hash(password)} {rules}")
    return "\n".join(lines) + "\n"


def scram_sha256_verifier(password: str, salt: bytes, iterations: int = 4096) -> str:
    """The verifier PostgreSQL stores for scram-sha-256 (RFC 5802/7677).

    Handing PostgreSQL the verifier instead of the password keeps the plaintext out
    of SQL files and server logs. The salt is derived from the password so re-renders
    are stable (no replacement on every deploy).
    """
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _stable_salt(password: str, purpose: str) -> bytes:
    return hmac.new(password.encode(), purpose.encode(), "sha256").digest()[:16]


@dataclass(frozen=True)
class PostgresPasswords:
    """Plaintext role passwords, only ever turned into SCRAM verifiers here."""

    superuser: str = field(repr=False)
    app: str = field(repr=False)
    backup: str = field(repr=False)
    monitor: str = field(repr=False)

    def of(self, role: str) -> str:
        return {
            POSTGRES_USER: self.superuser,
            POSTGRES_APP_USER: self.app,
            POSTGRES_BACKUP_USER: self.backup,
            POSTGRES_MONITOR_USER: self.monitor,
        }[role]


def _verifier(password: str, role: str) -> str:
    # The salt purpose for the superuser stays "app" (its role was the app's before).
    purpose = {POSTGRES_USER: "app", POSTGRES_MONITOR_USER: "monitor"}.get(role, role)
    return scram_sha256_verifier(password, _stable_salt(password, purpose))


# Objects of the app in schema public that the bootstrap superuser owns (compose created
# them as that user) are handed to the app role; extension members (pgcrypto's functions)
# and sequences that belong to a table (they follow their table) stay as they are.
_APP_OBJECTS_TO_TRANSFER = """DO $$
DECLARE
  obj record;
BEGIN
  FOR obj IN
    SELECT CASE c.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW'
             WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'f' THEN 'FOREIGN TABLE'
             WHEN 'c' THEN 'TYPE' ELSE 'TABLE' END AS kind,
           format('%I.%I', n.nspname, c.relname) AS name
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S', 'c')
      AND c.relowner = '{superuser}'::regrole
      AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                      AND d.objid = c.oid AND d.deptype IN ('e', 'a', 'i'))
    UNION ALL
    SELECT CASE p.prokind WHEN 'p' THEN 'PROCEDURE' WHEN 'a' THEN 'AGGREGATE'
             ELSE 'FUNCTION' END,
           p.oid::regprocedure::text
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname = 'public' AND p.proowner = '{superuser}'::regrole
      AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                      AND d.objid = p.oid AND d.deptype = 'e')
    UNION ALL
    SELECT CASE t.typtype WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' END, t.oid::regtype::text
    FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
    WHERE n.nspname = 'public' AND t.typtype IN ('e', 'd', 'r')
      AND t.typowner = '{superuser}'::regrole
      AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_type'::regclass
                      AND d.objid = t.oid AND d.deptype = 'e')
  LOOP
    EXECUTE format('ALTER %s %s OWNER TO {app}', obj.kind, obj.name);
  END LOOP;
END
$$;
"""


def _client_role_sql(role: str, verifier: str) -> str:
    """Create ``role`` if missing, then force its attributes, password and memberships:
    a role that exists with more (an adopted cluster, a hand edit) is brought back."""
    attributes, granted = POSTGRES_CLIENT_ROLES[role]
    allowed = "ARRAY[" + ", ".join(f"'{g}'" for g in granted) + "]::name[]"
    grants = "".join(f"GRANT {g} TO {role};\n" for g in granted)
    # Role names are this module's constants; a verifier is base64 and "$": no quotes.
    return f"""\
DO $$
DECLARE
  membership record;
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN
    CREATE ROLE {role};
  END IF;
  FOR membership IN
    SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
    WHERE m.member = '{role}'::regrole AND g.rolname <> ALL ({allowed})
  LOOP
    EXECUTE format('REVOKE %I FROM {role}', membership.rolname);
  END LOOP;
END
$$;
ALTER ROLE {role} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS {attributes}
  PASSWORD '{verifier}';
{grants}"""  # noqa: S608


def render_postgres_migration(passwords: PostgresPasswords) -> str:
    """Idempotent SQL for a fresh and an adopted (already-initialised) cluster.

    Runs as the bootstrap superuser over the shared Unix socket: enables pgcrypto,
    sets every role's password to its managed secret (as a SCRAM verifier, never the
    plaintext), creates or fixes the client roles, and hands the app's objects in
    schema public to the app role.
    """
    superuser_verifier = _verifier(passwords.superuser, POSTGRES_USER)
    roles = "".join(
        _client_role_sql(role, _verifier(passwords.of(role), role))
        for role in POSTGRES_CLIENT_ROLES
    )
    app = POSTGRES_APP_USER
    return f"""\
\\set ON_ERROR_STOP on
SET password_encryption = 'scram-sha-256';
BEGIN;
CREATE EXTENSION IF NOT EXISTS pgcrypto;
ALTER ROLE {POSTGRES_USER} WITH LOGIN PASSWORD '{superuser_verifier}';
{roles}REVOKE ALL ON DATABASE {POSTGRES_DB} FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE {POSTGRES_DB} TO {app};
GRANT CONNECT ON DATABASE {POSTGRES_DB} TO {POSTGRES_BACKUP_USER}, {POSTGRES_MONITOR_USER};
-- wal-archive closes the current segment each cycle (its slot it creates itself, REPLICATION).
GRANT EXECUTE ON FUNCTION pg_catalog.pg_switch_wal() TO {POSTGRES_BACKUP_USER};
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO {app};
{_APP_OBJECTS_TO_TRANSFER.format(superuser=POSTGRES_USER, app=app)}COMMIT;
"""


def render_pg_hba() -> str:
    """pg_hba.conf: trust only on the Unix socket (a volume shared with the migration job
    alone); the bootstrap superuser never over TCP; scram-sha-256 for the client roles;
    replication (the backup job's pg_basebackup and pg_receivewal) only for the backup role,
    only from the stack's own networks. First match wins."""
    rows = [
        ("# TYPE", "DATABASE", "USER", "ADDRESS", "METHOD"),
        ("local", "all", "all", "", "trust"),
        ("host", "all", POSTGRES_USER, "all", "reject"),
        ("host", "replication", POSTGRES_BACKUP_USER, "samenet", "scram-sha-256"),
        ("host", "all", ",".join(POSTGRES_CLIENT_ROLES), "all", "scram-sha-256"),
    ]
    return "".join("  ".join(f"{column:<12}" for column in row).rstrip() + "\n" for row in rows)


def render_pgpass(host: str, user: str, password: str, database: str = "*") -> str:
    """libpq password file line (PGPASSFILE); ':' and '\\' escaped as libpq wants."""

    def esc(value: str) -> str:
        return value.replace("\\", "\\\\").replace(":", "\\:")

    return f"{esc(host)}:{POSTGRES_PORT}:{esc(database)}:{esc(user)}:{esc(password)}\n"


def render_caddyfile(
    domain: str,
    upstream: str,
    tls_mode: str,
    email: str,
    metrics_port: int = SERVICE_PORTS["caddy-metrics"],
) -> str:
    """Caddy: ``domain`` -> api; public ACME certificates in prod, Caddy's CA elsewhere.

    ``servers { metrics }`` turns on per-request HTTP metrics (the api's SLOs); a plain-HTTP
    listener on ``metrics_port`` serves them to Prometheus on the stack network only (the
    port is never published on the host).
    """
    global_options = [f"email {email}", "admin localhost:2019", "servers {", "\tmetrics", "}"]
    site = [f"reverse_proxy {upstream}", "encode zstd gzip"]
    if tls_mode == "internal":
        site.insert(0, "tls internal")
    body = "\n".join(f"\t{line}" for line in site)
    options = "\n".join(f"\t{line}" for line in global_options)
    metrics_site = f"http://:{metrics_port} {{\n\tmetrics /metrics\n}}\n"
    return f"{{\n{options}\n}}\n\n{domain} {{\n{body}\n}}\n\n{metrics_site}"
