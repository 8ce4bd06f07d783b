"""How a client container reaches the stack's PostgreSQL and Redis.

One place for the libpq environment and one for a Redis client's URL and environment:
the api, the backup job and the exporters all build theirs here, so the ports and the
address scheme live in one module. Credentials never appear in what these return; the
clients read them from files (PGPASSFILE, REDIS_PASSWORD_FILE).
"""

from __future__ import annotations

import pulumi

from components.config import StackConfig
from components.service_files import POSTGRES_DB, POSTGRES_PORT, REDIS_PORT, render_pgpass


def postgres_host(cfg: StackConfig) -> str:
    return cfg.resource_name("postgres")


def postgres_address(cfg: StackConfig) -> str:
    """host:port of the stack's PostgreSQL on the backend network."""
    return f"{postgres_host(cfg)}:{POSTGRES_PORT}"


def postgres_url(cfg: StackConfig, user: str, database: str = POSTGRES_DB) -> str:
    """postgresql:// URL without a password (libpq takes it from PGPASSFILE)."""
    return f"postgresql://{user}@{postgres_address(cfg)}/{database}"


def libpq_env(
    cfg: StackConfig, user: str, passfile: str, database: str = POSTGRES_DB
) -> dict[str, str]:
    """PG* variables for a libpq client that logs in as ``user`` with ``passfile``."""
    return {
        "PGHOST": postgres_host(cfg),
        "PGPORT": str(POSTGRES_PORT),
        "PGUSER": user,
        "PGDATABASE": database,
        "PGPASSFILE": passfile,
    }


def client_pgpass(
    cfg: StackConfig, user: str, password: pulumi.Input[str], database: str = POSTGRES_DB
) -> pulumi.Output[str]:
    """The pgpass file for ``user`` against the stack's server, as a secret Output."""
    line = pulumi.Output.from_input(password).apply(
        lambda pw: render_pgpass(postgres_host(cfg), user, pw, database)
    )
    return pulumi.Output.secret(line)


def redis_address(cfg: StackConfig) -> str:
    """rediss://host:port of the stack's Redis (TLS only)."""
    return f"rediss://{cfg.resource_name('redis')}:{REDIS_PORT}"


def redis_client_url(cfg: StackConfig, user: str, tls_dir: str) -> str:
    """rediss:// URL with CA verification and the client certificate; no password in it
    (clients read REDIS_PASSWORD_FILE). Query names are redis-py's connection kwargs."""
    host = cfg.resource_name("redis")
    return (
        f"rediss://{user}@{host}:{REDIS_PORT}/0?ssl_cert_reqs=required"
        f"&ssl_ca_certs={tls_dir}/ca.crt&ssl_certfile={tls_dir}/client.crt"
        f"&ssl_keyfile={tls_dir}/client.key"
    )


def redis_client_env(
    cfg: StackConfig, user: str, tls_dir: str, password_file: str
) -> dict[str, str]:
    """REDIS_* variables of a client that logs in as ACL user ``user`` over mutual TLS
    with the certificate in ``tls_dir`` and the password in ``password_file``."""
    return {
        "REDIS_URL": redis_client_url(cfg, user, tls_dir),
        "REDIS_PASSWORD_FILE": password_file,
        "REDIS_TLS_CA_FILE": f"{tls_dir}/ca.crt",
        "REDIS_TLS_CERT_FILE": f"{tls_dir}/client.crt",
        "REDIS_TLS_KEY_FILE": f"{tls_dir}/client.key",
    }
