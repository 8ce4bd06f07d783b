"""Pure renderers for the files the app stack's services read.

No Pulumi here: the integration tests feed the exact output to a real redis-server,
PostgreSQL and ``caddy validate``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from components.containers import CONFIG_DIR
from components.monitoring_config import SERVICE_PORTS

# Paths inside the Redis container.
REDIS_TLS_DIR = f"{CONFIG_DIR}/tls"
REDIS_PORT = 6379
POSTGRES_PORT = 5432
POSTGRES_DB = "rag_feedback"
POSTGRES_USER = "rag"
POSTGRES_MONITOR_USER = "rag_monitor"
API_PORT = 8000


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


# What each ACL user may do. The exporter reads server state only; the backup user
# needs replication (SYNC for redis-cli --rdb) and, for restores, CONFIG/BGREWRITEAOF.
REDIS_ACL_RULES: Mapping[str, str] = {
    "app": "~* &* +@all -@admin -@dangerous",
    "exporter": (
        "resetkeys ~* -@all +@connection +info +ping +config|get +client|list "
        "+slowlog|get +slowlog|len +latency|latest +memory|stats +dbsize +scan +type "
        "+strlen +llen +scard +zcard +hlen +xlen +pfcount +cluster|info +select"
    ),
    "backup": "~* &* +@all",
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


def render_postgres_migration(app_password: str, monitor_password: str) -> str:
    """Idempotent SQL run on every deploy (also on adopted, already-initialised data).

    Runs as the superuser over the shared Unix socket. Sets the app role's password
    to the stack's managed secret, enables pgcrypto, creates the monitoring role.
    """
    app_verifier = scram_sha256_verifier(app_password, _stable_salt(app_password, "app"))
    monitor_verifier = scram_sha256_verifier(
        monitor_password, _stable_salt(monitor_password, "monitor")
    )
    return f"""\
\\set ON_ERROR_STOP on
SET password_encryption = 'scram-sha-256';
CREATE EXTENSION IF NOT EXISTS pgcrypto;
ALTER ROLE {POSTGRES_USER} WITH LOGIN PASSWORD '{app_verifier}';
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{POSTGRES_MONITOR_USER}') THEN
    CREATE ROLE {POSTGRES_MONITOR_USER} LOGIN;
  END IF;
END
$$;
ALTER ROLE {POSTGRES_MONITOR_USER} WITH LOGIN PASSWORD '{monitor_verifier}';
GRANT pg_monitor TO {POSTGRES_MONITOR_USER};
"""


def render_pg_hba(user: str = POSTGRES_USER) -> str:
    """pg_hba.conf: trust only on the Unix socket (a volume shared with the migration job
    alone), scram-sha-256 for every TCP connection, and replication (the backup job's
    pg_basebackup) only for ``user`` from the stack's own networks."""
    return (
        "# TYPE  DATABASE     USER   ADDRESS  METHOD\n"
        "local   all          all             trust\n"
        "host    all          all    all      scram-sha-256\n"
        f"host    replication  {user}    samenet  scram-sha-256\n"
    )


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
