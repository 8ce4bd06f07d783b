"""The isolated application stack: networks, volumes, Redis, PostgreSQL, the api, Caddy.

Isolation: each stack has its own networks. ``frontend`` joins Caddy and the api;
``backend`` is internal (no egress, no published ports) and joins the api, Redis,
PostgreSQL and the exporters. Containers join only their own stack's networks, and
pulumi-docker detaches them from Docker's default bridge, so nothing of staging can
reach prod. Only prod's Caddy publishes on all interfaces; every other published port
binds 127.0.0.1; databases publish nothing.

Image users (why each container runs as it does, with every capability dropped):
- PostgreSQL runs as ``postgres`` from the start: the entrypoint then skips its
  chown/gosu code, which would need CHOWN, DAC_READ_SEARCH, FOWNER, SETGID, SETUID
  (docker-library/postgres #649, #907). Fresh volumes inherit the image's ownership.
- Redis runs as ``redis`` from the start for the same reason (no gosu).
- Caddy runs as the image's root with only NET_BIND_SERVICE (binds 80/443 inside).
- The api runs as ``apiUser`` (default 1000:1000), the app image's unprivileged user.

Shape: each service is a pure spec builder (``redis_spec``, ``postgres_spec``,
``migration_spec``, ``api_spec``, ``caddy_spec``) that returns its ``ServiceSpec`` from
``AppStackInputs``; ``AppStack`` only creates the shared networks and volumes and declares
each spec hardened. A new service is a new builder and one ``declare`` line. Clients build
their PostgreSQL/Redis settings with ``components.clients``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_docker as docker

from components.clients import (
    client_pgpass,
    libpq_env,
    postgres_url,
    redis_client_env,
    redis_client_url,
)
from components.config import StackConfig
from components.containers import (
    CONFIG_DIR,
    ConfigFile,
    NetworkAttachment,
    PublishedPort,
    ServiceSpec,
    bind_mount,
    hardened_container,
    require_success,
    stack_volume,
    volume_mount,
)
from components.images import image
from components.redis_tls import RedisTls
from components.service_files import (
    API_PORT,
    POSTGRES_APP_USER,
    POSTGRES_DB,
    POSTGRES_USER,
    POSTGRES_WAL_SETTINGS,
    REDIS_PORT,
    PostgresPasswords,
    RedisServerPaths,
    render_caddyfile,
    render_pg_hba,
    render_postgres_migration,
    render_redis_acl,
    render_redis_conf,
)
from components.stack_secrets import StackSecrets

REDIS_IMAGE = image("redis")
POSTGRES_IMAGE = image("postgres")
CADDY_IMAGE = image("caddy")
POSTGRES_DATA_DIR = "/var/lib/postgresql/data"  # the volume's mount point
POSTGRES_SOCKET_DIR = "/var/run/postgresql"
CHROMA_DIR = "/workspace/data/chroma"

# Paths the api reads (documented in the README's app contract).
API_TLS_DIR = f"{CONFIG_DIR}/tls"
API_SECRETS_DIR = f"{CONFIG_DIR}/secrets"


@dataclass(frozen=True)
class AppStackArgs:
    config: StackConfig
    image_ref: pulumi.Input[str]
    secrets: StackSecrets
    redis_tls: RedisTls


BRIDGE_NAME_OPTION = "com.docker.network.bridge.name"


def backend_bridge_name(stack: str) -> str:
    """Host interface of the stack's backend bridge: rag-prod-be, rag-staging-be; long
    (ephemeral) names are hashed to fit Linux's 15 characters."""
    name = f"rag-{stack}-be"
    if len(name) <= 15:
        return name
    return f"rag-{hashlib.sha256(stack.encode()).hexdigest()[:8]}-be"


def postgres_pgdata(cfg: StackConfig) -> str:
    """The cluster lives in a subdirectory of its volume, so a physical restore can swap
    directories by rename (a mount point cannot be renamed). An adopted compose volume
    keeps its cluster at the volume root, where it already is (docs: moving it once
    enables physical restores)."""
    if "postgres" in cfg.adopt_volumes:
        return POSTGRES_DATA_DIR
    return f"{POSTGRES_DATA_DIR}/pgdata"


@dataclass(frozen=True)
class AppStackInputs:
    """What the spec builders need beyond the config: networks, volumes, secrets, certs."""

    config: StackConfig
    frontend: docker.Network
    backend: docker.Network
    volumes: Mapping[str, pulumi.Input[str]]  # redis, postgres, chroma, caddy-*, socket
    docs_mounts: Sequence[docker.ContainerMountArgs]
    secrets: StackSecrets
    tls: RedisTls
    image_ref: pulumi.Input[str]


def redis_spec(inputs: AppStackInputs) -> ServiceSpec:
    """Redis: TLS only, ACL users from a file, AOF on."""
    paths = RedisServerPaths()
    secrets, tls = inputs.secrets, inputs.tls
    acl = pulumi.Output.all(**dict(secrets.redis_passwords.items())).apply(render_redis_acl)
    # -e: an error reply (BUSY, LOADING, ...) fails the check; redis-cli exits 0 otherwise.
    ping_over_tls = [
        *("redis-cli", "-e", "--tls", "--cacert", paths.ca_file),
        *("--cert", paths.cert_file, "--key", paths.key_file),
        *("-h", "localhost", "-p", str(REDIS_PORT), "ping"),
    ]
    return ServiceSpec(
        service="redis",
        image=REDIS_IMAGE,
        command=["redis-server", f"{CONFIG_DIR}/redis.conf"],
        user="redis",
        files_owner="redis:redis",
        networks=[NetworkAttachment(inputs.backend, aliases=["redis"])],
        mounts=[volume_mount(inputs.volumes["redis"], paths.data_dir)],
        tmpfs={"/tmp": "rw,noexec,nosuid,size=16m"},
        memory_mb=512,
        healthcheck=["CMD", *ping_over_tls],
        files=[
            ConfigFile("redis.conf", render_redis_conf(paths)),
            ConfigFile("users.acl", pulumi.Output.secret(acl), secret=True),
            ConfigFile("tls/ca.crt", tls.ca_cert_pem),
            ConfigFile("tls/server.crt", tls.server.cert_pem),
            ConfigFile("tls/server.key", tls.server.key_pem, secret=True),
        ],
    )


def postgres_spec(inputs: AppStackInputs) -> ServiceSpec:
    """PostgreSQL: superuser password from a file, scram-sha-256, no published port."""
    return ServiceSpec(
        service="postgres",
        image=POSTGRES_IMAGE,
        command=[
            *("postgres", "-c", "password_encryption=scram-sha-256"),
            *("-c", f"hba_file={CONFIG_DIR}/pg_hba.conf"),
            *(
                arg
                for key, value in POSTGRES_WAL_SETTINGS.items()
                for arg in ("-c", f"{key}={value}")
            ),
        ],
        user="postgres",
        files_owner="postgres:postgres",
        env={
            "POSTGRES_USER": POSTGRES_USER,
            "POSTGRES_DB": POSTGRES_DB,
            "POSTGRES_PASSWORD_FILE": f"{CONFIG_DIR}/secrets/postgres_password",
            "POSTGRES_INITDB_ARGS": "--auth-host=scram-sha-256",
            "POSTGRES_HOST_AUTH_METHOD": "scram-sha-256",
            "PGDATA": postgres_pgdata(inputs.config),
        },
        networks=[NetworkAttachment(inputs.backend, aliases=["postgres"])],
        mounts=[
            volume_mount(inputs.volumes["postgres"], POSTGRES_DATA_DIR),
            volume_mount(inputs.volumes["postgres-socket"], POSTGRES_SOCKET_DIR),
        ],
        tmpfs={"/tmp": "rw,noexec,nosuid,size=64m"},
        memory_mb=1024,
        # Over TCP: the entrypoint's first-init server listens on the socket only,
        # so this turns healthy once the real server runs (not during initdb).
        healthcheck=[
            *("CMD", "pg_isready", "-h", "127.0.0.1"),
            *("-U", POSTGRES_USER, "-d", POSTGRES_DB),
        ],
        files=[
            ConfigFile("pg_hba.conf", render_pg_hba()),
            ConfigFile("secrets/postgres_password", inputs.secrets.postgres_password, secret=True),
        ],
    )


def migration_sql(secrets: StackSecrets) -> pulumi.Output[str]:
    """The migration job's SQL (role verifiers inside), a secret Output."""
    sql = pulumi.Output.all(
        secrets.postgres_password,
        secrets.postgres_app_password,
        secrets.postgres_backup_password,
        secrets.postgres_monitor_password,
    ).apply(lambda pws: render_postgres_migration(PostgresPasswords(*pws)))
    return pulumi.Output.secret(sql)


def migration_trigger(sql: pulumi.Input[str], postgres: docker.Container) -> pulumi.Output[str]:
    """When the migration job must run again: its SQL changed (roles, passwords, grants,
    extensions) or the PostgreSQL container it targets was replaced (new image, new
    volume, a restore that recreated it). Derived from the SQL, so it stays a secret."""

    def digest(parts: list[str]) -> str:
        h = hashlib.sha256()
        for part in parts:
            h.update(part.encode() + b"\0")
        return h.hexdigest()

    hashed = pulumi.Output.all(sql, POSTGRES_IMAGE, postgres.id).apply(digest)
    return pulumi.Output.secret(hashed)


def migration_spec(inputs: AppStackInputs, sql: pulumi.Input[str]) -> ServiceSpec:
    """One-shot psql job: pgcrypto and roles, also over adopted data."""
    return ServiceSpec(
        service="postgres-migrate",
        image=POSTGRES_IMAGE,
        # Superuser over the shared Unix socket (the image trusts local connections),
        # so it also works on adopted data with an old password.
        command=[
            *("psql", "-h", POSTGRES_SOCKET_DIR, "-U", POSTGRES_USER, "-d", POSTGRES_DB),
            *("-f", f"{CONFIG_DIR}/migrate.sql"),
        ],
        user="postgres",
        files_owner="postgres:postgres",
        mounts=[volume_mount(inputs.volumes["postgres-socket"], POSTGRES_SOCKET_DIR)],
        memory_mb=128,
        healthcheck=["NONE"],
        files=[ConfigFile("migrate.sql", sql, secret=True)],
        one_shot=True,
    )


def api_spec(inputs: AppStackInputs) -> ServiceSpec:
    """The api: Chroma embedded (data volume), docs read-only, Redis over mTLS."""
    cfg, secrets = inputs.config, inputs.secrets
    api_tls = inputs.tls.clients["api"]
    pgpass_file = f"{API_SECRETS_DIR}/pgpass"
    return ServiceSpec(
        service="api",
        image=inputs.image_ref,
        user=cfg.app.user,
        files_owner=cfg.app.user,
        networks=[
            NetworkAttachment(inputs.frontend, aliases=["api"]),
            NetworkAttachment(inputs.backend, aliases=["api"]),
        ],
        mounts=[volume_mount(inputs.volumes["chroma"], CHROMA_DIR), *inputs.docs_mounts],
        tmpfs={"/tmp": "rw,noexec,nosuid,size=256m"},
        memory_mb=2048,
        cpu_shares=1024,
        healthcheck=[
            *("CMD", "python", "-c"),
            "import urllib.request; "
            f"urllib.request.urlopen('http://127.0.0.1:{API_PORT}/health', timeout=5)",
        ],
        health_start_period="60s",
        env={
            "ENVIRONMENT": cfg.stack,
            "LOG_LEVEL": cfg.app.log_level,
            "SESSION_QUERIES_PER_HOUR": str(cfg.app.session_queries_per_hour),
            "CHROMA_PERSIST_DIR": CHROMA_DIR,
            **redis_client_env(cfg, "app", API_TLS_DIR, f"{API_SECRETS_DIR}/redis_password"),
            "SESSION_REDIS_URL": redis_client_url(cfg, "app", API_TLS_DIR),
            **libpq_env(cfg, POSTGRES_APP_USER, pgpass_file),
            "PGSSLMODE": "prefer",
            "DATABASE_URL": postgres_url(cfg, POSTGRES_APP_USER),
            "DATA_ENCRYPTION_KEY_FILE": f"{API_SECRETS_DIR}/data_encryption_key",
        },
        files=[
            ConfigFile("tls/ca.crt", inputs.tls.ca_cert_pem),
            ConfigFile("tls/client.crt", api_tls.cert_pem),
            ConfigFile("tls/client.key", api_tls.key_pem, secret=True),
            ConfigFile("secrets/redis_password", secrets.redis_passwords["app"], secret=True),
            ConfigFile(
                "secrets/pgpass",
                client_pgpass(cfg, POSTGRES_APP_USER, secrets.postgres_app_password),
                secret=True,
            ),
            ConfigFile("secrets/data_encryption_key", secrets.data_encryption_key, secret=True),
        ],
    )


def caddy_spec(inputs: AppStackInputs) -> ServiceSpec:
    """Caddy: the only public entry point (prod); 127.0.0.1 elsewhere."""
    cfg = inputs.config
    bind_ip = "0.0.0.0" if cfg.ports.caddy_public else "127.0.0.1"  # noqa: S104
    upstream = f"{cfg.resource_name('api')}:{API_PORT}"
    return ServiceSpec(
        service="caddy",
        image=CADDY_IMAGE,
        command=["caddy", "run", "--config", f"{CONFIG_DIR}/Caddyfile"],
        capabilities=["NET_BIND_SERVICE"],
        files_owner="root:root",
        networks=[NetworkAttachment(inputs.frontend)],
        ports=[
            PublishedPort(80, cfg.ports.http, bind_ip),
            PublishedPort(443, cfg.ports.https, bind_ip),
        ],
        mounts=[
            volume_mount(inputs.volumes["caddy-data"], "/data"),
            volume_mount(inputs.volumes["caddy-state"], "/config"),
        ],
        tmpfs={"/tmp": "rw,noexec,nosuid,size=16m"},
        memory_mb=256,
        healthcheck=["CMD", "wget", "-q", "-O", "/dev/null", "http://localhost:2019/config/"],
        files=[
            ConfigFile(
                "Caddyfile",
                render_caddyfile(cfg.domain, upstream, cfg.caddy_tls, cfg.alert_email),
            )
        ],
    )


class AppStack(pulumi.ComponentResource):
    frontend_network: docker.Network
    backend_network: docker.Network
    volume_names: dict[str, pulumi.Output[str]]
    containers: dict[str, docker.Container]

    def __init__(
        self, name: str, args: AppStackArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("personal-rag:index:AppStack", name, None, opts)
        cfg = args.config
        n = cfg.resource_name
        child = pulumi.ResourceOptions(parent=self)

        self.frontend_network = docker.Network(
            n("frontend"), name=n("frontend"), driver="bridge", internal=False, opts=child
        )
        self.backend_network = docker.Network(
            n("backend"),
            name=n("backend"),
            driver="bridge",
            internal=True,
            # A fixed interface name, so the host firewall can close the host itself to
            # the backend (Docker's internal networks block forwarding, not the host).
            options={BRIDGE_NAME_OPTION: backend_bridge_name(cfg.stack)},
            opts=child,
        )
        self.volume_names = self._data_volumes(cfg)
        inputs = AppStackInputs(
            config=cfg,
            frontend=self.frontend_network,
            backend=self.backend_network,
            volumes={
                **self.volume_names,
                "postgres-socket": stack_volume(n("postgres-socket"), self, "socket", False).name,
                "caddy-data": stack_volume(n("caddy-data"), self, "certificates", True).name,
                "caddy-state": stack_volume(n("caddy-state"), self, "state", False).name,
            },
            docs_mounts=self._docs_mounts(cfg),
            secrets=args.secrets,
            tls=args.redis_tls,
            image_ref=args.image_ref,
        )

        def declare(spec: ServiceSpec, **kwargs: Any) -> docker.Container:
            return hardened_container(n(spec.service), spec, parent=self, **kwargs)

        redis = declare(redis_spec(inputs))
        postgres = declare(postgres_spec(inputs))
        # Created on the first deploy (pgcrypto and roles also over adopted data), then
        # re-run only when its SQL or its server changes: previews stay quiet.
        sql = migration_sql(args.secrets)
        migrate = declare(
            migration_spec(inputs, sql),
            depends_on=[postgres],
            replacement_trigger=migration_trigger(sql, postgres),
        )
        migration_ok = require_success(migrate, n("postgres-migrate"))
        api = declare(
            api_spec(inputs),
            depends_on=[redis, postgres, migrate],
            # Not created unless the migration (role password, pgcrypto) succeeded.
            labels={"personal-rag.postgres-migration": migration_ok},
        )
        caddy = declare(caddy_spec(inputs), depends_on=[api])

        self.containers = {"redis": redis, "postgres": postgres, "api": api, "caddy": caddy}
        self.register_outputs(
            {
                "frontendNetwork": self.frontend_network.name,
                "backendNetwork": self.backend_network.name,
                "volumes": self.volume_names,
                "postgresMigration": migration_ok,
            }
        )

    def _data_volumes(self, cfg: StackConfig) -> dict[str, pulumi.Output[str]]:
        names = {}
        for role in ("redis", "postgres", "chroma"):
            adopted = cfg.adopt_volumes.get(role)
            if adopted:
                # Today's compose volume, used in place and never managed: Pulumi cannot
                # delete what it did not create.
                names[role] = pulumi.Output.from_input(adopted)
            else:
                names[role] = stack_volume(
                    cfg.resource_name(f"{role}-data"), self, "data", True
                ).name
        return names

    def _docs_mounts(self, cfg: StackConfig) -> list[docker.ContainerMountArgs]:
        """The documents the api indexes, read-only: a host folder or a stack volume."""
        mounts = []
        for folder, host_path in (("docs", cfg.docs_host_path), ("mds", cfg.mds_host_path)):
            target = f"/workspace/data/{folder}"
            if host_path:
                mounts.append(bind_mount(host_path, target, read_only=True))
            else:
                volume = stack_volume(cfg.resource_name(folder), self, "documents", True)
                mounts.append(volume_mount(volume.name, target, read_only=True))
        return mounts
